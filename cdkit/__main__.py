"""Command line: `cdkit <step> [-f FILE ...] [key=value ...]` (also `python -m cdkit`).

Every step of the pipeline is a command taking the same parameters as its notebook, with the same
defaults (its Params class): params files hold only the differences (later files win), then key=value
overrides. Parameters are validated before anything is written (`--check`: validate, print them and
what is missing on disk, stop). A path typed here (an argument, a -f file, a path-valued key=value) is
relative to the current folder; a path inside a params file, to the repository root. Besides the
steps: `synth` (write a synthetic data set), `index` (index one BSON file), `demo` (every notebook).

A refusal is one line on stderr, `ERROR: <message>`: exit status 2 for bad parameters, 1 for a state
to fix (a missing or damaged file, a busy folder, no split yet); a traceback means a bug."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

# rich markup off: it would swallow the brackets of `[key=value ...]` in the help texts
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

PARAMS_OPT = typer.Option(None, "--params", "-f", help="YAML file of parameters that differ from the defaults (repeatable; "
                          "relative to the current folder)")
OVERRIDES_ARG = typer.Argument(None, metavar="key=value ...", help="parameter overrides, parsed as YAML scalars")

# OS errors that name what the user can fix (a file, a folder, a disk): one line, not a traceback
PATH_ERRORS = (PermissionError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


# What a command prints after its step ran: per step module (registry.STEPS), the named tables and values of its
# Result. A step whose Result gains something worth printing adds it here.
SHOWN = {
    "explore": lambda R: {},  # its tables and plots are the notebook's
    "prepare": lambda R: {"summary": R.summary},
    "train": lambda R: {"summary": R.summary(), "model_dir": R.model_dir},
    "predict": lambda R: {"table": R.table},
    "fuse": lambda R: {"table": R.table, "chosen": R.chosen},
    "ensemble": lambda R: {"table": R.table, "stage": R.stage},
    "aggregate": lambda R: {"accuracy": R.accuracy, "chosen": R.chosen, "stage": R.stage},
    "pseudo": lambda R: {"single_model": R.single_model, "selection_summary": R.selection_summary, "changed": R.changed},
    "submit": lambda R: {"stage": R.stage, "path": R.path, "test_accuracy": R.test_accuracy},
}


def summary_lines(module, result) -> list:
    "The lines `cdkit <step>` prints about its result: tables (rounded) and values, each under its name"
    import pandas as pd
    lines = []
    for name, v in SHOWN[module](result).items():
        if isinstance(v, (pd.DataFrame, pd.Series)):
            if len(v): lines.append(f"{name}:\n{v.round(4).to_string()}")
        elif v is not None:
            lines.append(f"{name}: {v}")
    return lines


def refusal(e: BaseException):
    """The one line that reports `e`, or None when `e` is a bug (its traceback is kept): a CdkitError,
    an OS error that names a path (or the disk), a file that does not parse (the reader names it)"""
    from cdkit.base.errors import CdkitError
    if isinstance(e, CdkitError):
        text = str(e)
    elif isinstance(e, PATH_ERRORS) or (isinstance(e, OSError) and e.filename is not None):
        text = f"{e.strerror}: {e.filename}" if e.strerror and e.filename is not None else str(e)
    else:
        return None
    return " ".join(text.split()) or type(e).__name__


def _fail(message, status):
    typer.echo(f"ERROR: {message}", err=True)
    raise typer.Exit(status)


def _typed_paths(cls, overrides: dict) -> dict:
    "Path-valued overrides made absolute from the current folder (a path typed on the command line)"
    from cdkit.base.params import path_fields
    from cdkit.base.paths import typed
    paths = path_fields(cls)
    return {k: (str(typed(v)) if k in paths and isinstance(v, str) and v else v) for k, v in overrides.items()}


def _load(cls, params, overrides):
    "The validated parameters of a command; exit status 2 with one line for anything wrong in them"
    from cdkit.base.params import ParamsError, load_params, parse_overrides
    from cdkit.base.paths import typed
    try:
        values = _typed_paths(cls, parse_overrides(overrides or []))
        return load_params(cls, [typed(f) for f in params or []], values)
    except ParamsError as e:
        _fail(" ".join(str(e).split()), 2)


def missing_on_disk(step, P) -> list:
    """What a step would find missing before hours of work: the data files, the split of step 02, a
    weights file the parameters name, the models and stores the step reads. Reads nothing but names"""
    from cdkit.base.paths import resolve
    from cdkit.runs import RunLayout
    problems = []
    data, work = resolve(P.data_dir), resolve(P.work_dir)
    early = step.module in ("explore", "prepare")
    wanted = ["train.bson"] if early else ["train.bson", "test.bson"]
    if not (step.module == "explore" and P.synth_preset):  # step 01 writes synthetic data when asked
        problems += [f"{data / f} not found (data_dir)" for f in wanted if not (data / f).is_file()]
    if not early and not (work / "split.parquet").is_file():
        problems.append(f"{work / 'split.parquet'} not found: run step 02 first (cdkit prepare)")
    if getattr(P, "pretrained_file", None) and not resolve(P.pretrained_file).is_file():
        problems.append(f"{resolve(P.pretrained_file)} not found (pretrained_file)")
    if not hasattr(P, "run_dir"):
        return problems
    layout = RunLayout.of(P.run_dir)
    reads = []  # (path, what writes it)
    if step.module == "predict":
        reads = [(layout.model(m).card, "train it (cdkit train)") for m in P.models]
    elif step.module == "pseudo":
        reads = [(layout.model(P.base).card, "train it (cdkit train)")]
    elif step.module == "fuse":
        reads = [(layout.features(m, s), "cdkit predict with features on") for m in P.models for s in ("fusion", "valid", "test")]
    elif step.module == "ensemble":
        reads = [(layout.store(m, s), "cdkit predict (or cdkit fuse for -fusion members)") for m in P.models for s in ("valid", "test")]
    elif step.module == "aggregate":
        reads = [(layout.ensemble_store(P.stage, s), "cdkit ensemble") for s in ("valid", "test")]
    elif step.module == "submit":
        stages = ("base",) if P.source in ("auto", "base") else ("pseudo",)
        reads = [(layout.products(st, s), "cdkit aggregate") for st in stages for s in ("valid", "test")]
    problems += [f"{p} not found: {how}" for p, how in reads if not p.exists()]
    return problems


def _step_command(step):
    def command(params: Optional[List[Path]] = PARAMS_OPT, overrides: Optional[List[str]] = OVERRIDES_ARG,
                check: bool = typer.Option(False, "--check", help="validate the parameters, print them and what is "
                                           "missing on disk (exit 1 if anything is), write nothing, stop")):
        import importlib
        import logging

        from cdkit.steps.report import write_report
        P = _load(step.params_class(), params, overrides)
        if check:
            import yaml
            typer.echo(yaml.safe_dump(P.model_dump(), sort_keys=False).rstrip())
            problems = missing_on_disk(step, P)
            for p in problems:
                typer.echo(f"missing: {p}")
            if problems:
                _fail(f"{len(problems)} thing(s) missing on disk (listed above)", 1)
            typer.echo("nothing missing on disk")
            return
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        mod = importlib.import_module(f"cdkit.steps.{step.module}")
        result = mod.run(P)
        if hasattr(mod, "record") and hasattr(P, "run_dir"):
            mod.record(P.run_dir, result)
            write_report(P.run_dir)
        for line in summary_lines(step.module, result):
            typer.echo(line)
    return command


def _describe_step(step) -> str:
    "The first sentence of the step module's docstring"
    import importlib
    doc = importlib.import_module(f"cdkit.steps.{step.module}").__doc__ or ""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    return para.split(". ")[0].rstrip(".") + "."


def parameters_help(cls) -> str:
    "One line per parameter: name (type, default): the comment on its Field's line"
    from cdkit.base.params import defaults, field_comments, type_name
    comments, values = field_comments(cls), defaults(cls)
    lines = [f"  {k} ({type_name(f.annotation)}, default {values[k]!r}): {comments.get(k, '')}".rstrip(": ")
             for k, f in cls.model_fields.items()]
    return "Parameters (key=value, or key: value in a -f file):\n\n\b\n" + "\n".join(lines)


def _register():
    from cdkit.steps.registry import STEPS
    for s in STEPS:
        if s.module == "train" and s.command != "train":
            continue  # `cdkit train arch=...` trains any backbone; 04/05 differ only in defaults
        cls = s.params_class()
        app.command(s.command, help=f"{_describe_step(s)} (notebooks/{s.notebook}.ipynb)",
                    epilog=parameters_help(cls))(_step_command(s))


@app.command()
def synth(out_dir: Path = typer.Argument(..., help="folder to write (relative to the current folder)"),
          preset: str = typer.Option("demo", help="tiny, demo or bench"), seed: int = typer.Option(0, min=0, max=2**32 - 1)):
    "Write a synthetic data set in the competition's format (train.bson, test.bson, csv files)"
    from cdkit.base.paths import typed
    from cdkit.data.synth import PRESETS, write_dataset
    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}", 2)
    out_dir = typed(out_dir)
    summary = write_dataset(out_dir, preset=preset, seed=seed)
    typer.echo(f"wrote {out_dir}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))


@app.command()
def index(bson: Path = typer.Argument(..., help="the BSON file (relative to the current folder)"),
          out: Path = typer.Option(..., help="Parquet path of the index (never inside the raw data folder)")):
    "Index one competition BSON file (Parquet) and print its summary"
    from cdkit.data.bsonfile import build_index
    from cdkit.base.paths import typed
    bson, out = typed(bson), typed(out)
    _, stats = build_index(bson, out=out, return_stats=True)
    typer.echo(stats.summary())
    typer.echo(f"index written to {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo(ctx: typer.Context):
    "Run every notebook on the synthetic demo data (make demo): [--run-dir D] [--only 06,07] [key=value ...]"
    from cdkit.steps.pipeline import main as pipeline_main
    raise typer.Exit(pipeline_main(_typed_demo_args(ctx.args)))


def _typed_demo_args(args) -> list:
    "`cdkit demo`'s --run-dir and path-valued key=value made absolute from the current folder"
    from cdkit.base.params import path_fields
    from cdkit.steps.registry import STEPS
    from cdkit.base.paths import typed
    keys = set().union(*(path_fields(s.params_class()) for s in STEPS))
    out = list(args)
    for i, a in enumerate(out):
        if a == "--run-dir" and i + 1 < len(out):
            out[i + 1] = str(typed(out[i + 1]))
        elif a.startswith("--run-dir="):
            out[i] = "--run-dir=" + str(typed(a.split("=", 1)[1]))
        elif not a.startswith("-") and "=" in a and a.split("=", 1)[0].strip() in keys and a.split("=", 1)[1]:
            k, v = a.split("=", 1)
            out[i] = f"{k}={typed(v)}"
    return out


_register()


def _click_exceptions():
    "click's exception classes as typer uses them (recent typer vendors its own copy of click)"
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv=None):
    click = _click_exceptions()
    try:
        return app(args=list(sys.argv[1:] if argv is None else argv), standalone_mode=False) or 0
    except typer.Exit as e:
        return e.exit_code
    except click.NoArgsIsHelpError as e:  # `cdkit` alone: the help
        e.show()
        return 0
    except click.ClickException as e:  # a usage error (unknown option, missing argument): one line too
        typer.echo(f"ERROR: {' '.join(e.format_message().split())} (see cdkit --help)", err=True)
        return e.exit_code
    except Exception as e:
        line = refusal(e)
        if line is None:
            raise  # a bug: keep the traceback
        typer.echo(f"ERROR: {line}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
