"""The kit's write invariants, each tested over a class of cases (hypothesis), not one example:

1. the raw data is never written: no spelling of a path into a folder holding competition BSON files
   (`..`, `./`, symlinks, sub-folders, trailing slashes) gets a file created, replaced or removed there,
   by `index`, `prepare`, `synth` or any step's run_dir / work_dir; every writer goes through cdkit.base.io
   (a walk of the source finds any other);
2. only what the kit created is deleted: temp names are the kit's own, swept only in folders the kit
   made; a run folder that is a user's tree is refused;
3. one entry for every step: a run folder in use is refused (command line and `step.run`), settings are
   saved only by a step that succeeds, a kernel child of the pipeline runs inside its lock;
4. one run folder never mixes two data sets;
5. nothing is written before the parameters pass."""
import ast
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdkit.steps.entry import RUN_MARK, DataSetMismatchError, RunFolderError, step_entry
from cdkit.base.errors import CdkitError
from cdkit.base.io import FolderBusyError, RawDataError, folder_lock, lend_locks_to_children, sweep_temps, sweep_tree
from cdkit.base.io import tmp_path as io_tmp_path
from cdkit.base.params import RunParams, make_params
from cdkit.steps.pipeline import STEPS

ROOT = Path(__file__).resolve().parents[1]
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def snapshot(folder):
    "Every entry under `folder` (symlinks not followed): its bytes' hash and mtime (files) or its kind"
    out = {}
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(here) / name
            st_ = p.lstat()
            content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir/link"
            out[str(p.relative_to(folder))] = (content, st_.st_mtime_ns)
    return out


def cli(args):
    """(exit status, stderr lines) of `cdkit ARGS`; a CdkitError is the command line's one-line refusal
    (`ERROR: <message>`), whether its catch is in cdkit.__main__ or here"""
    import contextlib
    import io
    from cdkit.__main__ import main
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(args)
    err = buf.getvalue().strip()
    return code, (err.removeprefix("ERROR: ") if err.startswith("ERROR: ") else err) or None


@pytest.fixture(scope="module")
def raw(tmp_path_factory, tiny_data):
    """A competition folder the kit did not write (the tiny set's files, no marker), with an existing
    sub-folder, a symlink to it, and a kit-prepared work folder outside it"""
    base = tmp_path_factory.mktemp("raw")
    d = base / "cdiscount"
    d.mkdir()
    for name in ("train.bson", "test.bson", "category_names.csv"):
        shutil.copy2(tiny_data / name, d / name)
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("the user's")
    (base / "link").symlink_to(d)
    from cdkit.data.prepare import create_prepared
    create_prepared(d, base / "work", valid_frac=0.2, log=lambda *a: None)
    return d


# spellings of a folder inside the raw data: through the symlink, `..`, `./`, sub-folders, a trailing slash
SPELLINGS = st.builds(
    lambda via, dots, below, slash: via + dots + below + slash,
    st.sampled_from(["{d}", "{link}", "{d}/sub"]),
    st.sampled_from(["", "/.", "/./", "/../cdiscount", "/../link", "/sub/.."]),
    st.sampled_from(["", "/derived", "/a/b", "/sub", "/sub/deeper"]),
    st.sampled_from(["", "/", "//"]))


def spell(template, raw):
    return template.format(d=raw, link=raw.parent / "link")


def refused(raw, call):
    "`call()` is refused with a CdkitError naming the raw folder, and nothing in it changed"
    before = snapshot(raw.parent)
    with pytest.raises(RawDataError, match=str(raw)):
        call()
    assert snapshot(raw.parent) == before


@FEW
@given(where=SPELLINGS, name=st.sampled_from(["i.parquet", "train.bson", "test_index.parquet", "x"]))
def test_index_never_writes_into_the_raw_data(raw, where, name):
    out = spell(where, raw).rstrip("/") + "/" + name
    before = snapshot(raw.parent)
    code, err = cli(["index", str(raw / "train.bson"), "--out", out])
    assert code != 0 and err and str(raw) in err and "\n" not in err
    assert snapshot(raw.parent) == before


def test_index_outside_the_raw_data_is_written(raw, tmp_path):
    assert cli(["index", str(raw.parent / "link" / "train.bson"), "--out", str(tmp_path / "i.parquet")])[0] in (0, None)
    assert (tmp_path / "i.parquet").exists()


@FEW
@given(where=SPELLINGS)
def test_synth_never_writes_into_another_data_set(raw, where):
    from cdkit.data.synth import write_dataset
    refused(raw, lambda: write_dataset(spell(where, raw), preset="tiny"))
    refused(raw, lambda: write_dataset(raw, preset="tiny"))  # the same folder, a competition data set


RUN_STEPS = [s for s in STEPS if s.command in ("train", "predict", "fuse", "ensemble", "aggregate", "pseudo", "submit")]


@FEW
@given(where=SPELLINGS, step=st.sampled_from(RUN_STEPS + [s for s in STEPS if s.module == "prepare"]),
       field=st.sampled_from(["run_dir", "work_dir"]))
def test_no_step_writes_into_the_raw_data(raw, where, step, field):
    import importlib
    if field == "run_dir" and step.module == "prepare":
        field = "work_dir"
    cls = step.params_class()
    values = dict(data_dir=str(raw), work_dir=str(raw.parent / "work"), run_dir=str(raw.parent / "run"))
    values[field] = spell(where, raw)
    P = make_params(cls, {k: v for k, v in values.items() if k in cls.model_fields})
    mod = importlib.import_module(f"cdkit.steps.{step.module}")
    refused(raw, lambda: mod.run(P))


def test_prepare_command_refuses_the_raw_folder_as_work_dir(raw):
    for work in (raw, raw / "derived", raw.parent / "link" / ".." / "cdiscount" / "x"):
        before = snapshot(raw)
        code, err = cli(["prepare", f"data_dir={raw}", f"work_dir={work}"])
        assert code != 0 and err and str(raw) in err and "\n" not in err
        assert snapshot(raw) == before


@FEW
@given(where=st.sampled_from(["{d}", "{d}/.", "{d}/..", "{d}/sub", "{d}/sub/notes.txt", "{d}/train.bson",
                               "{link}/test.bson", "{link}/../cdiscount/sub"]))
def test_no_removal_reaches_the_raw_data(raw, where):
    from cdkit.base.io import remove
    refused(raw, lambda: remove(spell(where, raw)))


def test_kit_written_data_set_may_be_written_again(tmp_path):
    from cdkit.base.io import DATA_MARK
    from cdkit.data.synth import write_dataset
    write_dataset(tmp_path / "d", preset="tiny")
    assert (tmp_path / "d" / DATA_MARK).exists()
    write_dataset(tmp_path / "d", preset="tiny", seed=1)  # its own folder: the marker says the kit wrote it
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "mine.txt").write_text("a user's file")
    with pytest.raises(RawDataError, match="the kit did not write"):
        write_dataset(tmp_path / "e", preset="tiny")


# --- every writer goes through cdkit.base.io --------------------------------------------------------------

RAW_WRITE_ATTRS = {"write_text", "write_bytes", "mkdir", "unlink", "rmdir", "touch", "symlink_to"}
PATH_WRITERS = {"to_csv", "to_parquet", "to_json", "to_pickle", "savefig", "save"}  # write a path, or a buffer
RAW_WRITE_FUNCS = {("shutil", "rmtree"), ("shutil", "move"), ("shutil", "copy"), ("shutil", "copy2"),
                   ("shutil", "copyfile"), ("shutil", "copytree"), ("os", "replace"), ("os", "rename"),
                   ("os", "remove"), ("os", "unlink"), ("os", "makedirs"), ("os", "mkdir"), ("os", "rmdir"),
                   ("torch", "save"), ("np", "save")}
# The few writes outside cdkit/base/io.py that stay raw, (file, enclosing function), each with why. A write
# inside `lambda tmp: ...` (the callback of io.atomic_write, handed the primitive's temp path) is fine.
STORE_TEMP = "a prediction store fills its own temp folder (io.tmp_path, guarded) chunk by chunk, moved by io.replace_dir"
ALLOWED = {
    ("cdkit/infer/store.py", "__init__"): STORE_TEMP,
    ("cdkit/infer/store.py", "flush"): STORE_TEMP,
    ("cdkit/infer/store.py", "close"): STORE_TEMP,
    ("cdkit/infer/store.py", "abort"): STORE_TEMP,
    ("cdkit/infer/features.py", "close"): "the manifest of a feature store, into the temp folder of io.atomic_dir",
    ("cdkit/infer/features.py", "__init__"): "the feature writer's own temp folder (io.tmp_path, guarded), as the store's",
    ("cdkit/infer/features.py", "abort"): "the feature writer's own temp folder (io.tmp_path, guarded), as the store's",
}


def _write_mode(call) -> bool:
    modes = [a for a in call.args[1:2]] + [k.value for k in call.keywords if k.arg == "mode"]
    return any(isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax+") for m in modes) \
        or any(not isinstance(m, ast.Constant) for m in modes)


def raw_writes(path: Path):
    "(line, text, function) of each write in `path` that bypasses cdkit.base.io"
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, func, in_tmp_lambda):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Lambda) and node.args.args and node.args.args[0].arg == "tmp":
            in_tmp_lambda = True  # atomic_write(path, lambda tmp: ...): writes the primitive's temp
        if isinstance(node, ast.Call) and not in_tmp_lambda:
            f, hit = node.func, False
            if isinstance(f, ast.Name) and f.id == "open" and _write_mode(node):
                hit = True
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                hit = ((owner, f.attr) in RAW_WRITE_FUNCS or f.attr in RAW_WRITE_ATTRS
                       or (f.attr == "memmap" and owner in ("np", "numpy") and _memmap_writes(node))
                       or (f.attr == "open" and _write_mode_method(node)))
                hit = hit or (f.attr in PATH_WRITERS and node.args and isinstance(node.args[0], ast.BinOp)
                              and isinstance(node.args[0].op, ast.Div))  # df.to_csv(folder / "x.csv"): a path
            if hit:
                found.append((node.lineno, ast.get_source_segment(path.read_text(), node), func))
        for child in ast.iter_child_nodes(node):
            visit(child, func, in_tmp_lambda)

    visit(tree, None, False)
    return found


def _memmap_writes(call) -> bool:
    modes = [k.value for k in call.keywords if k.arg == "mode"] + list(call.args[2:3])
    return any(not (isinstance(m, ast.Constant) and m.value in ("r", "c")) for m in modes)


def _write_mode_method(call) -> bool:
    "Path.open with a mode that writes (`os.open(path, flags)`, `Image.open(buffer)` take no mode string)"
    modes = list(call.args[:1]) + [k.value for k in call.keywords if k.arg == "mode"]
    return any(isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax+") for m in modes)


def test_every_write_of_the_kit_goes_through_cdkit_io():
    offenders = []
    for path in sorted((ROOT / "cdkit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "cdkit/base/io.py":
            continue
        offenders += [f"{rel}:{line} ({func}): {text}" for line, text, func in raw_writes(path) if (rel, func) not in ALLOWED]
    assert not offenders, "writes that bypass cdkit.base.io (use its primitives):\n" + "\n".join(offenders)


def test_the_source_walk_finds_raw_writes(tmp_path):
    "The walker itself: each kind of raw write is found, the temp of an io primitive is not"
    src = tmp_path / "m.py"
    src.write_text(textwrap.dedent("""
        def f(p, q):
            open(p, "w").write("x")
            p.write_text("x")
            q.mkdir(parents=True)
            shutil.rmtree(p)
            os.replace(p, q)
            np.memmap(p, mode="w+", shape=(3,))
            torch.save({}, p)
            p.open("ab")
            df.to_parquet(p / "x.parquet")
            atomic_write(p, lambda tmp: Path(tmp).write_text("fine"))
            open(p).read()
            np.memmap(p, mode="r")
            fig.savefig(buf, format="png")
    """))
    assert [line for line, _, _ in raw_writes(src)] == [3, 4, 5, 6, 7, 8, 9, 10, 11]


# --- 2. only what the kit created is deleted --------------------------------------------------------

def dead_pid():
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


USER_NAMES = st.from_regex(r"\.[a-z]{1,8}\.tmp-[a-z0-9]{1,6}", fullmatch=True) | \
    st.from_regex(r"\.cdkit-tmp-[a-z]{1,6}", fullmatch=True) | st.sampled_from([".thesis.tmp-v2", ".x.tmp-123-abc", "tmp-1"])


@FEW
@given(names=st.lists(USER_NAMES, min_size=1, max_size=4, unique=True), as_dir=st.booleans())
def test_the_sweep_removes_only_the_kits_temps_of_dead_writers(tmp_path_factory, names, as_dir):
    run = tmp_path_factory.mktemp("run")
    (run / RUN_MARK).write_text("{}")
    outside = tmp_path_factory.mktemp("outside")
    (outside / f".cdkit-tmp-{dead_pid()}-0000-x").write_text("not in the run folder")
    (run / "preds").mkdir()
    (run / "preds" / "linked").symlink_to(outside)  # never followed
    for n in names:
        p = run / "preds" / n
        p.mkdir() if as_dir else p.write_text("a user's")
    dead = run / "preds" / f".cdkit-tmp-{dead_pid()}-1234abcd-a.store"
    live = io_tmp_path(run / "preds" / "b.store")
    dead.mkdir(), live.write_text("being written")
    assert sweep_tree(run) == [dead]
    assert sorted(p.name for p in (run / "preds").iterdir()) == sorted([*names, "linked", live.name])
    assert len(list(outside.iterdir())) == 1


@FEW
@given(name=USER_NAMES)
def test_a_run_folder_holding_a_users_files_is_refused(tmp_path_factory, name):
    d = tmp_path_factory.mktemp("user")
    (d / name).mkdir()
    (d / name / "chapter1.tex").write_text("years of work")
    before = snapshot(d)
    code, err = cli(["submit", f"run_dir={d}"])
    assert code != 0 and err and str(d) in err and "did not write" in err and "\n" not in err
    assert snapshot(d) == before


def test_a_folder_holding_only_executed_notebooks_is_claimed_and_one_with_user_files_is_not(tmp_path):
    "papermill writes its output copy (runs/x/03.ipynb, as the README does) before the step runs: that folder is the run's"
    from cdkit.steps.entry import check_claimable
    run = tmp_path / "run"
    run.mkdir()
    (run / "02.ipynb").write_text("{}")
    (run / "03.ipynb").write_text("{}")
    check_claimable(run)  # no refusal
    (run / "thesis.tex").write_text("mine")
    with pytest.raises(RunFolderError, match="thesis.tex"):
        check_claimable(run)
    (run / "thesis.tex").unlink()
    (run / "notes.ipynb").mkdir()  # a folder named like a notebook is not an executed copy
    with pytest.raises(RunFolderError, match="notes.ipynb"):
        check_claimable(run)


def test_the_repository_or_home_as_run_dir_is_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    from cdkit.steps.submit import SubmitParams, run
    for where in (".", "~", str(home) + "/"):
        before = snapshot(home)
        with pytest.raises(RunFolderError, match="did not write"):
            run(SubmitParams(run_dir=where))
        assert snapshot(home) == before


def test_a_run_folder_the_kit_wrote_before_markers_is_adopted(tmp_path):
    run = tmp_path / "run"
    (run / "models" / "resnet").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    with pytest.raises(ProbeFailed):
        probe(run=run, fail=True)
    assert (run / RUN_MARK).exists() and (run / "results.json").read_text() == "{}"


def test_temp_names_are_the_kits_and_a_lone_sweep_never_goes_below(tmp_path):
    t = io_tmp_path(tmp_path / "a.parquet")
    assert t.name.startswith(f".cdkit-tmp-{os.getpid()}-") and t.name.endswith("-a.parquet")
    old = t.with_name(f".cdkit-tmp-{dead_pid()}-00000000-a.parquet")
    deep = tmp_path / "sub" / f".cdkit-tmp-{dead_pid()}-00000000-b.parquet"
    deep.parent.mkdir()
    old.write_text("half"), deep.write_text("half")
    (tmp_path / ".a.parquet.tmp-1-x").write_text("the old pattern: not the kit's any more")
    assert sweep_temps(tmp_path) == [old]
    assert deep.exists() and (tmp_path / ".a.parquet.tmp-1-x").exists()


# --- 3. one entry for every step ---------------------------------------------------------------------

class ProbeParams(RunParams):
    "A step of the test: it writes one result file into its run folder, or fails"
    fail: bool = False


class ProbeFailed(CdkitError):
    pass


@step_entry("probe", saves_params=True)
def probe_run(P: ProbeParams):
    from cdkit.base.io import atomic_write
    if P.fail:
        raise ProbeFailed("failed as asked")
    atomic_write(Path(P.run_dir) / "probe.txt", lambda tmp: Path(tmp).write_text("done"))
    return "ok"


def probe(run, data=None, fail=False):
    return probe_run(ProbeParams(run_dir=str(run), data_dir=str(data or run.parent / "nodata"), fail=fail))


def test_settings_are_saved_only_when_the_step_succeeds(tmp_path):
    run = tmp_path / "run"
    probe(run)
    saved = (run / "params" / "probe.yaml").read_text()
    assert "fail: false" in saved
    with pytest.raises(ProbeFailed):
        probe(run, fail=True)
    assert (run / "params" / "probe.yaml").read_text() == saved


def test_a_failing_predict_keeps_the_saved_settings(tmp_path, tiny_data):
    run = tmp_path / "run"
    (run / "params").mkdir(parents=True)
    (run / "params" / "predict.yaml").write_text("models: [resnet]\n")
    code, err = cli(["predict", f"data_dir={tiny_data}", f"run_dir={run}", "models=[typo]"])
    assert code != 0
    assert (run / "params" / "predict.yaml").read_text() == "models: [resnet]\n"


def test_a_step_failing_on_its_parameters_leaves_no_folder(tmp_path):
    with pytest.raises(ProbeFailed):
        probe(tmp_path / "new", fail=True)
    assert not (tmp_path / "new").exists()
    from cdkit.__main__ import main
    assert main(["train", f"run_dir={tmp_path / 'run'}", "arch=resnet1O1"]) == 1
    assert not (tmp_path / "run").exists()  # no folder, no .lock, no marker: nothing before the parameters pass


HOLD = """
import sys, time
from cdkit.base.io import folder_lock, lend_locks_to_children
with folder_lock(sys.argv[1]), lend_locks_to_children():
    print('held', flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    "A run folder claimed by the kit and held by another process (its PID)"
    run = tmp_path / "run"
    probe(run)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    yield run, p.pid
    p.kill()
    p.wait()


def test_a_second_command_on_a_run_folder_is_refused(held, capsys):
    run, pid = held
    before = snapshot(run)
    with pytest.raises(FolderBusyError, match=f"in use by PID {pid}"):
        probe(run)
    code, err = cli(["predict", f"run_dir={run}"])
    lines = (err or capsys.readouterr().err).strip().splitlines()
    assert code == 1 and len(lines) == 1 and f"in use by PID {pid}" in lines[0]
    assert snapshot(run) == before


def test_a_process_that_is_not_the_holders_child_is_not_let_in(held, monkeypatch):
    run, pid = held
    monkeypatch.setenv("CDKIT_LOCK_HOLDER", str(pid))  # names the holder, but this process is not its child
    with pytest.raises(FolderBusyError):
        with folder_lock(run):
            pass


def test_a_kernel_child_of_the_pipeline_runs_inside_its_lock(tmp_path):
    run = tmp_path / "run"
    probe(run)
    child = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); import test_invariants_io as t; "
             "from pathlib import Path; print(t.probe(Path(sys.argv[1])))", str(run), str(ROOT / "tests")]
    with folder_lock(run):
        shut_out = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert "FolderBusyError" in shut_out.stderr
        with lend_locks_to_children():  # papermill starts its kernels with the environment of this moment
            let_in = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert let_in.returncode == 0 and let_in.stdout.strip().endswith("ok"), let_in.stderr


def test_results_are_recorded_under_the_lock(held):
    from cdkit.steps.report import record
    run, pid = held
    with pytest.raises(FolderBusyError):
        record(run, "section", "name", 1.0, step="predict")


# --- 4. one run folder, one data set -----------------------------------------------------------------

def test_a_run_folder_never_mixes_two_data_sets(tmp_path, tiny_data):
    from cdkit.steps.pipeline import run_pipeline
    from cdkit.data.synth import write_dataset
    other = tmp_path / "other"
    write_dataset(other, preset="tiny", seed=1)
    run = tmp_path / "run"
    probe(run, data=tiny_data)
    before = snapshot(run)
    with pytest.raises(DataSetMismatchError, match=f"{tiny_data}.*{other}"):
        probe(run, data=other)
    with pytest.raises(DataSetMismatchError, match=str(other)):  # the pipeline, before any notebook runs
        run_pipeline(run, overrides=dict(data_dir=str(other)), only=["01", "02"], log=lambda *a: None)
    assert snapshot(run) == before
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    assert probe(run, data=moved) == "ok"  # the same files elsewhere are the same data set
    assert probe(run) == "ok"  # a step whose data folder holds no BSON file (yet) is not refused on that account
