"""Command line: `cdkit <step> --params FILE [--params FILE2 ...] [key=value ...]` (also `python -m cdkit`).

Every step of the pipeline is a command taking the same parameters as its notebook, with the same
defaults (its Params class): params files hold only the differences (later files win), then
key=value overrides. Parameters are validated before anything is written. Besides the steps:
`synth` (write a synthetic data set), `index` (index one BSON file), `demo` (every notebook)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

PARAMS_OPT = typer.Option(None, "--params", "-f", help="YAML file of parameters that differ from the defaults (repeatable)")
OVERRIDES_ARG = typer.Argument(None, metavar="[key=value]...", help="parameter overrides, parsed as YAML scalars")


def _show(result):
    import pandas as pd
    for name in ("summary", "table", "accuracy", "single_model", "selection_summary"):
        v = getattr(result, name, None)
        v = v() if callable(v) else v
        if isinstance(v, (pd.DataFrame, pd.Series)) and len(v):
            typer.echo(f"{name}:\n{v.round(4).to_string()}")
    for name in ("chosen", "stage", "path", "model_dir", "test_accuracy", "changed"):
        v = getattr(result, name, None)
        if v is not None and not callable(v):
            typer.echo(f"{name}: {v}")


def _expected_errors():
    from .io import DiskFullError, FolderBusyError, IncompleteFolderError
    from .params import ParamsError
    from .prepare import SplitMissingError
    from .submission import SubmissionError  # e.g. no Kaggle credentials: one line names where it looked
    return (ParamsError, FolderBusyError, IncompleteFolderError, SplitMissingError, DiskFullError, FileNotFoundError,
            SubmissionError)


EXPECTED = _expected_errors()


def _step_command(step):
    def command(params: Optional[List[Path]] = PARAMS_OPT, overrides: Optional[List[str]] = OVERRIDES_ARG,
                check: bool = typer.Option(False, "--check", help="validate the parameters, print them and stop")):
        import importlib
        import logging
        from .params import ParamsError, load_params
        from .report import write_report
        cls = step.params_class()
        try:
            P = load_params(cls, params or [], overrides or [])
        except ParamsError as e:
            typer.echo(f"ERROR: {e}", err=True)
            raise typer.Exit(2)
        if check:
            import yaml
            typer.echo(yaml.safe_dump(P.model_dump(), sort_keys=False).rstrip())
            return
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        mod = importlib.import_module(f"cdkit.steps.{step.module}")
        try:
            result = mod.run(P)
        except EXPECTED as e:  # a state the user can fix: one line, no traceback
            typer.echo(f"ERROR: {e}", err=True)
            raise typer.Exit(1)
        if hasattr(mod, "record") and hasattr(P, "run_dir"):
            mod.record(P.run_dir, result)
            write_report(P.run_dir)
        _show(result)
    command.__doc__ = f"step {step.notebook.split('_')[0]}: {step.params_class().__doc__}"
    return command


def _register():
    from .pipeline import STEPS
    for s in STEPS:
        if s.module == "train" and s.command != "train":
            continue  # `cdkit train arch=...` trains any backbone; 04/05 differ only in defaults
        app.command(s.command)(_step_command(s))


@app.command()
def synth(out_dir: Path, preset: str = typer.Option("demo", help="tiny, demo or bench"), seed: int = 0):
    "Write a synthetic data set in the competition's format (train.bson, test.bson, csv files)"
    from .paths import resolve
    from .synth import write_dataset
    out_dir = resolve(out_dir)
    summary = write_dataset(out_dir, preset=preset, seed=seed)
    typer.echo(f"wrote {out_dir}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))


@app.command()
def index(bson: Path, out: Path = typer.Option(..., help="Parquet path of the index (never inside the raw data folder)")):
    "Index one competition BSON file (Parquet) and print its summary"
    from .bsonfile import build_index
    from .paths import resolve
    bson, out = resolve(bson), resolve(out)
    _, stats = build_index(bson, out=out, return_stats=True)
    typer.echo(stats.summary())
    typer.echo(f"index written to {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(ctx: typer.Context):
    "Run every notebook on the synthetic demo data (make demo): [--run-dir D] [--only 06,07] [key=value ...]"
    from .pipeline import main as pipeline_main
    raise typer.Exit(pipeline_main(ctx.args))


_register()


def main(argv=None):
    try:
        return app(args=list(sys.argv[1:] if argv is None else argv), standalone_mode=False) or 0
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click's usage errors print themselves
        import click
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
