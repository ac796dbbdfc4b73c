"""Run the numbered notebooks in order with papermill: `make demo` / `python -m cdkit demo`.

Each notebook runs with the defaults of its parameters cell, updated by the step's params file and
by the pipeline-wide overrides (only those keys the notebook declares), and its executed copy goes to
runs/<run_name>/. One progress line per notebook; a failing notebook stops the run with the
notebook, the cell and the executed copy to open."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from .params import ParamsError, notebook_parameters, parse_overrides
from .paths import NOTEBOOKS, resolve

# (notebook, params file holding what differs from its defaults for the demo, step-specific values).
# "{run}" in a value is the pipeline's run name: model runs live inside the pipeline's folder.
MODELS = ["resnet", "inception", "xception"]
DEMO_STEPS = [
    ("01_explore_data", None, {}),
    ("02_prepare_data", None, {}),
    ("03_train_resnet", None, {"run_name": "{run}/resnet"}),
    ("04_train_inception", None, {"run_name": "{run}/inception"}),
    ("05_train_xception", None, {"run_name": "{run}/xception"}),
    ("06_predict_tta", None, {"models": ["{run}/" + m for m in MODELS]}),
    ("07_ensemble", None, {"models": ["{run}/" + m for m in MODELS]}),
    ("08_belief_aggregation", None, {"models": ["{run}/" + m for m in MODELS]}),
    ("09_pseudo_label_finetune", None,
     {"from_run": "{run}/resnet", "run_name": "{run}/pseudo", "models": ["{run}/" + m for m in MODELS]}),
    ("10_submit", None, {}),
]


def _fill(value, run):
    if isinstance(value, str):
        return value.replace("{run}", run)
    if isinstance(value, list):
        return [_fill(v, run) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, run) for k, v in value.items()}
    return value


# Each notebook's parameters dataclass: its parameters cell repeats these defaults.
NOTEBOOK_PARAMS = {
    "01_explore_data": "cdkit.explore:ExploreParams",
    "02_prepare_data": "cdkit.prepare:PrepareParams",
    "03_train_resnet": "cdkit.train:TrainParams",
    "04_train_inception": "cdkit.train:InceptionTrainParams",
    "05_train_xception": "cdkit.train:XceptionTrainParams",
    "06_predict_tta": "cdkit.evaluate:PredictParams",
    "07_ensemble": "cdkit.evaluate:EnsembleParams",
    "08_belief_aggregation": "cdkit.evaluate:AggregateParams",
    "09_pseudo_label_finetune": "cdkit.pseudo:PseudoParams",
    "10_submit": "cdkit.evaluate:SubmitParams",
}
# params/<prefix>*.yaml belongs to this notebook
PARAMS_FILES = {"prepare": "02_prepare_data", "resnet": "03_train_resnet", "seresnet": "03_train_resnet",
                "inception": "04_train_inception", "xception": "05_train_xception",
                "pseudo": "09_pseudo_label_finetune"}


def params_class(notebook):
    "The parameters dataclass of a notebook (by name, e.g. '03_train_resnet')"
    import importlib
    module, name = NOTEBOOK_PARAMS[Path(notebook).stem].split(":")
    return getattr(importlib.import_module(module), name)


def notebook_for_params(path):
    "The notebook a params file is for, from its file name (params/resnet101_full.yaml -> 03_train_resnet)"
    stem = Path(path).stem
    for prefix in sorted(PARAMS_FILES, key=len, reverse=True):
        if stem.startswith(prefix):
            return PARAMS_FILES[prefix]
    raise ParamsError(f"{path}: no notebook takes params files named like this (prefixes: {sorted(PARAMS_FILES)})")


class NotebookFailed(RuntimeError):
    "A notebook of the pipeline raised; the message names the notebook, the cell and the executed copy"


def step_parameters(notebook, params_file=None, overrides=None, step_values=None):
    """The parameters to inject into `notebook`: its params file, the step's own values, then the
    pipeline-wide overrides that it declares. A key the notebook does not declare is an error."""
    declared = notebook_parameters(notebook)
    values = {}
    if params_file:
        data = yaml.safe_load(resolve(params_file).read_text()) or {}
        unknown = sorted(set(data) - set(declared))
        if unknown:
            raise ParamsError(f"{params_file}: unknown parameter(s) {unknown} for {Path(notebook).name}; "
                              f"its parameters cell declares {sorted(declared)}")
        values.update(data)
    unknown = sorted(set(step_values or {}) - set(declared))
    if unknown:
        raise ParamsError(f"pipeline step values {unknown} are not parameters of {Path(notebook).name}")
    values.update(step_values or {})
    values.update({k: v for k, v in (overrides or {}).items() if k in declared})
    return values


def run_notebook(notebook, out_path, parameters, log=print):
    "Execute one notebook with papermill; on failure raise NotebookFailed naming the cell"
    import papermill as pm
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(notebook), str(out_path), parameters=parameters, cwd=str(resolve(".")),
                            progress_bar=False, log_output=False, kernel_name="python3")
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(f"{Path(notebook).name} failed in cell {e.exec_count} "
                             f"({e.ename}: {e.evalue}); open the executed copy {out_path}") from None


def run_pipeline(run_name="demo", steps=None, overrides=None, only=None, runs_dir="runs", log=print):
    """Run `steps` (default DEMO_STEPS) into <runs_dir>/<run_name>/; returns seconds per notebook.

    `overrides` apply to every notebook that declares the key (e.g. data_dir, work_dir, run_dir).
    `only`: names (or number prefixes) of the steps to run, for resuming after a failure."""
    from .report import record, write_report
    run_dir = resolve(runs_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = {"run_dir": str(run_dir), "runs_dir": str(resolve(runs_dir)), **(overrides or {})}
    steps = steps or DEMO_STEPS
    # every params file is checked against its notebook before anything runs
    plan = [(nb, step_parameters(NOTEBOOKS / f"{nb}.ipynb", pf, overrides, _fill(extra, run_name)))
            for nb, pf, extra in steps]
    timings = {}
    t_all = time.perf_counter()
    for i, (nb, params) in enumerate(plan, 1):
        if only and not any(nb.startswith(o) for o in only):
            continue
        out = run_dir / f"{nb}.ipynb"
        log(f"[{i}/{len(plan)}] {nb} ...")
        t0 = time.perf_counter()
        run_notebook(NOTEBOOKS / f"{nb}.ipynb", out, params, log)
        timings[nb] = time.perf_counter() - t0
        record(run_dir, "time per notebook (s)", nb, round(timings[nb], 1))
        log(f"[{i}/{len(plan)}] {nb} done in {timings[nb]:.0f} s -> {out}")
    report = write_report(run_dir)
    log(f"done in {time.perf_counter() - t_all:.0f} s; report: {report}")
    return timings


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cdkit demo", description=__doc__)
    ap.add_argument("--run-name", default="demo")
    ap.add_argument("--runs-dir", default="runs", help="where run folders go")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                    help="run only these steps, comma-separated (e.g. 06,07,08), to resume after a failure")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every notebook that declares key")
    a = ap.parse_args(argv)
    try:
        run_pipeline(a.run_name, overrides=parse_overrides(a.overrides), only=a.only, runs_dir=a.runs_dir)
    except (NotebookFailed, ParamsError) as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 1
    return 0
