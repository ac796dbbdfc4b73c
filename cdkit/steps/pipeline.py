"""Run the numbered notebooks in order with papermill: `make demo` / `python -m cdkit demo`.

One registry (`STEPS`) ties each notebook to its step module and Params class; the command line
and the tests read it too. Each notebook runs with the defaults of its parameters cell, updated by
the pipeline-wide values (`data_dir`, `work_dir`, `run_dir` and any key=value given) for the keys it
declares. Its executed copy goes to run_dir/notebooks/. One progress line per notebook, papermill's
bar of cells on a terminal, and while a notebook runs a line a minute naming its running cell; a
failing notebook stops the run with the notebook, the cell and the executed copy to open."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cdkit.base.errors import CdkitError
from cdkit.base.params import ParamsError, notebook_parameters, parse_overrides, read_params_file, shared_subset
from cdkit.base.paths import resolve
from cdkit.steps.registry import STEPS, Step, notebook_for_params, params_class, step_of  # noqa: F401 (the registry, as the pipeline's)


class NotebookFailed(CdkitError, RuntimeError):
    "A notebook of the pipeline raised; the message names the notebook, the cell and the executed copy"


def step_parameters(notebook, params_files=(), overrides=None):
    """The parameters to inject into `notebook`: its params files (later files win), then the
    pipeline-wide overrides that it declares. A key in a file that the notebook does not declare is
    an error; the result is validated by the notebook's Params class before anything runs."""
    from cdkit.base.params import make_params
    if isinstance(params_files, (str, Path)):
        params_files = [params_files]
    declared = notebook_parameters(notebook)
    values = {}
    for f in params_files or ():
        data = shared_subset(params_class(notebook), f, read_params_file(resolve(f)))  # shared: what it declares
        unknown = sorted(set(data) - set(declared))
        if unknown:
            raise ParamsError(f"{f}: unknown parameter(s) {unknown} for {Path(notebook).name}; "
                              f"its parameters cell declares {sorted(declared)}")
        values.update(data)
    values.update({k: v for k, v in seeded(notebook, declared, values, overrides).items() if k in declared})
    make_params(params_class(notebook), {**declared, **values}, where=f"{Path(notebook).name} parameters")
    return values


# The steps that average several seeds (06b's fusion heads, 08's re-rankers) take a list of them
SEED_LISTS = ("seeds", "rerank_seeds")


def seeded(notebook, declared, values, overrides):
    """The overrides with a pipeline-wide `seed=N` made the seed of everything the run trains or draws: each
    step's `seed`, and each seed list (default [0, 1, 2]) shifted to [3N, 3N+1, 3N+2] so that runs of
    different seeds share none; a list given explicitly (file or override) stays. Not step 02's split seed:
    the split is made once for every model of the data (another one is refused), and runs over seeds
    compare on the same validation products."""
    over = dict(overrides or {})
    if "seed" not in over:
        return over
    seed = int(over["seed"])
    if step_of(notebook).module == "prepare":
        del over["seed"]
    for k in SEED_LISTS:
        if k in declared and k not in over and k not in values:
            base = list(declared[k])
            over[k] = [seed * len(base) + s for s in base]
    return over


def running_cell(out_path):
    "(cell number, cells, first line of its code) of the cell that papermill is executing in `out_path`, or None"
    import json
    try:
        cells = json.loads(Path(out_path).read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None  # not written yet, or being rewritten
    code = [c for c in cells if c.get("cell_type") == "code"]
    for i, c in enumerate(code, 1):
        if c.get("metadata", {}).get("papermill", {}).get("status") == "running":
            src = "".join(c.get("source", "")).strip().splitlines()
            return i, len(code), (src[0][:70] if src else "")
    return None


class Heartbeat:
    """While a notebook runs, a line every `every` seconds: how long, and which cell (read from the
    executed copy that papermill saves as it goes), so a long cell never looks like a hang"""

    def __init__(self, label, out_path, every=60.0, log=print):
        import threading
        self.label, self.out_path, self.every, self.log = label, out_path, every, log
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        while not self.stop.wait(self.every):
            cell = running_cell(self.out_path)
            where = f", cell {cell[0]}/{cell[1]}: {cell[2]}" if cell else ""
            self.log(f"{self.label} running for {(time.perf_counter() - t0) / 60:.0f} min{where}")

    def __enter__(self):
        if self.every: self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


KERNEL_TCP_WARNING = "Kernel is running over TCP without encryption"


def kernel_arguments():
    """The arguments papermill starts each notebook's kernel with: the kernel config of `install_kernel_config`
    (a filter on the 'running over TCP without encryption' warning, printed at every kernel start), written
    once per user into the temp folder, whatever the environment's own config holds"""
    import getpass
    import tempfile
    conf = install_kernel_config(Path(tempfile.gettempdir()) / f"cdkit-kernel-config-{getpass.getuser()}")
    return [f"--IPKernelApp.extra_config_file={conf}"]


def install_kernel_config(config_dir=None):
    """Silence the same warning for a plain `papermill` (or JupyterLab) run of this environment's kernel:
    a filter on that exact message in the IPython kernel config file of `config_dir` (default: the
    environment's, <sys.prefix>/etc/ipython, read by every kernel it starts). Idempotent; `make setup`
    calls it. Returns the file."""
    from cdkit.base.io import atomic_write
    path = Path(config_dir or Path(sys.prefix) / "etc" / "ipython") / "ipython_kernel_config.py"
    marker = "# cdkit: no 'running over TCP without encryption' warning at every kernel start"
    text = path.read_text() if path.exists() else ""
    if marker not in text:
        block = (f"\n{marker}\nimport logging as _logging\n_logging.getLogger('IPKernelApp').addFilter(\n"
                 f"    lambda record: {KERNEL_TCP_WARNING!r} not in record.getMessage())\n")
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + block))
    return path


def run_notebook(notebook, out_path, parameters, progress=None):
    """Execute one notebook with papermill; on failure raise NotebookFailed naming the cell. `progress`:
    papermill's bar of cells (None: on a terminal)"""
    import papermill as pm
    from cdkit.base.progress import enabled
    from cdkit.base.io import makedirs
    out_path = Path(out_path)
    makedirs(out_path.parent)
    try:
        pm.execute_notebook(str(notebook), str(out_path), parameters=parameters, cwd=str(resolve(".")),
                            progress_bar=enabled(progress) and not _in_kernel(), log_output=False,
                            kernel_name="python3", request_save_on_cell_execute=True, autosave_cell_every=30,
                            extra_arguments=kernel_arguments())
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(f"{Path(notebook).name} failed in cell {e.exec_count} "
                             f"({e.ename}: {e.evalue}); open the executed copy {out_path}") from None
    except Exception as e:  # a dead kernel, a timeout: still name the notebook and its copy
        raise NotebookFailed(f"{Path(notebook).name} stopped: {type(e).__name__}: {e}; open the executed copy "
                             f"{out_path}") from None


def _in_kernel():
    from cdkit.base.progress import in_notebook
    return in_notebook()


def check_models_free(plan, only=None):
    """Before anything runs: a training notebook of the plan whose model folder holds a run, without
    resume or overwrite, stops the pipeline here (not after the notebooks before it)"""
    from cdkit.base.params import make_params, notebook_parameters
    from cdkit.runs import RunLayout
    from cdkit.train.learner import RUN_FILES, check_fresh
    for s, params in plan:
        if s.module not in ("train", "pseudo", "fuse") or not selected(s, only):
            continue
        P = make_params(s.params_class(), {**notebook_parameters(s.path), **params}, where=s.notebook)
        layout = RunLayout.of(P.run_dir)
        if s.module == "fuse":  # a fusion member's folder is taken by any file in it
            folders, names, what, it = [layout.model_dir(RunLayout.fusion_member(m)) for m in P.models], None, "fusion heads", "them"
        else:
            folders, names, what, it = [layout.model_dir(P.name)], RUN_FILES, "a run", "it"
        for d in folders:
            check_fresh(d, getattr(P, "resume", False), P.overwrite, names, what, where=f"{s.notebook}: ", clear=False,
                        advice=f"; pass overwrite=true to retrain {it} (make demo does), resume=true to continue {it}, "
                        "or another --run-dir")


def _folders(plan, run_dir) -> dict:
    "The data and work folders the notebooks of `plan` use (their parameters, defaults included) and run_dir"
    from cdkit.base.params import make_params
    for s, params in plan:
        if s.module != "explore":
            P = make_params(s.params_class(), {**notebook_parameters(s.path), **params}, where=s.notebook)
            return dict(run_dir=str(run_dir), data_dir=P.data_dir, work_dir=P.work_dir)
    return dict(run_dir=str(run_dir))
def selected(step, only) -> bool:
    """Whether `only` (the --only list) names `step`: by its exact number ("06" is step 06 only, 06b is named
    "06b") or its notebook's name; no list: every step"""
    return not only or any(o in (step.notebook, step.notebook.split("_")[0]) for o in only)


def check_only(only, steps=None):
    "Refuse an --only entry that names no step (a typo would otherwise run nothing and say done)"
    steps = steps or STEPS
    bad = [o for o in only or () if not any(selected(s, [o]) for s in steps)]
    if bad:
        raise ParamsError(f"--only {','.join(bad)}: no such step; the steps are "
                          f"{', '.join(s.notebook.split('_')[0] for s in steps)}")


def run_pipeline(run_dir="runs/demo", overrides=None, only=None, steps=None, log=print, heartbeat=60.0):
    """Run the notebooks of `steps` (default: all) into `run_dir`; returns seconds per notebook.

    `overrides` apply to every notebook that declares the key (e.g. data_dir, work_dir, epochs).
    `only`: exact numbers or notebook names of the steps to run ("06" is not 06b), e.g. to resume after a failure.
    `heartbeat`: seconds between the lines that say which cell of a long notebook runs (0: none).
    A training notebook whose model folder holds a run is refused before anything runs, unless the
    overrides say overwrite=true (make demo does) or resume=true."""
    from types import SimpleNamespace
    from cdkit.steps.entry import step_context
    from cdkit.base.io import lend_locks_to_children
    from cdkit.steps.report import record, write_report
    from cdkit.runs import RunLayout
    run_dir = resolve(run_dir)
    overrides = {"run_dir": str(run_dir), **(overrides or {})}
    steps = steps or STEPS
    # every notebook's parameters are validated before anything runs
    plan = [(s, step_parameters(s.path, (), overrides)) for s in steps]
    check_only(only, steps)
    check_models_free(plan, only)
    timings = {}
    t_all = time.perf_counter()
    # the entry of every step, for the whole run: raw-data guard, the run folder claimed for this data
    # set, locked (and lent to the notebooks' kernels, its child processes), the kit's temps swept
    with step_context("demo", SimpleNamespace(**_folders(plan, run_dir)), save=False), lend_locks_to_children():
        for i, (s, params) in enumerate(plan, 1):
            if not selected(s, only):
                continue
            out = RunLayout(run_dir).notebook(s.notebook)
            log(f"[{i}/{len(plan)}] {s.notebook} ...")
            t0 = time.perf_counter()
            with Heartbeat(f"[{i}/{len(plan)}] {s.notebook}", out, heartbeat, log):
                run_notebook(s.path, out, params)
            timings[s.notebook] = time.perf_counter() - t0
            record(run_dir, "time per notebook (s)", s.notebook, round(timings[s.notebook], 1), step=s.module)
            log(f"[{i}/{len(plan)}] {s.notebook} done in {timings[s.notebook]:.0f} s -> {out}")
        report = write_report(run_dir)
    log(f"done in {time.perf_counter() - t_all:.0f} s; report: {report}")
    return timings


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cdkit demo", description=__doc__)
    ap.add_argument("--run-dir", default="runs/demo", help="the run folder")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                    help="run only these steps, comma-separated exact numbers (e.g. 06,07,08; 06b only when named), "
                         "to resume after a failure or rerun a part")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every notebook that declares key")
    a = ap.parse_args(argv)
    try:
        run_pipeline(a.run_dir, overrides=parse_overrides(a.overrides), only=a.only)
    except (NotebookFailed, ParamsError) as e:
        print(f"\nERROR: {e}", file=sys.stderr)
        return 1
    return 0
