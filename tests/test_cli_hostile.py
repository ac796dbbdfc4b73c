"""Every refusal of the command line is one line: every command, given generated hostile parameters or
damaged files in a run folder, ends with exit status 1 or 2 and one line on stderr starting `ERROR:`,
never a traceback. Paths typed on the command line are relative to the current folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdkit.__main__ import main
from cdkit.steps.pipeline import STEPS

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
STEP_COMMANDS = {s.command: s.params_class() for s in STEPS if not s.command.startswith("train-")}


def one_line_refusal(err: str) -> str:
    "The one line of stderr; fails unless it is exactly one line starting ERROR: and no traceback"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), err
    return lines[0]


def run_cli(args, cwd=None):
    "`python -m cdkit ARGS` in a fresh process, the way a user runs it"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cdkit", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=300)


# ---- generated hostile parameters: every step command refuses them before any work (exit 2) ----

hostile_names = st.one_of(
    st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=20).map(lambda s: "a" + s + "\n"),  # `$` matched before it
    st.integers(min_value=101, max_value=400).map(lambda n: "m" * n),
    st.sampled_from(["../escape", "a/b", "..", ".hidden", "", "ensemble-x", "x.shard01of02", "a b", "a\x00b",
                     "/etc/passwd", "~root", "a\\b", "ünï"]),
)
huge_numbers = st.one_of(st.integers(min_value=10**12, max_value=10**60).map(str),
                         st.sampled_from(["1e400", "-1e400", ".inf", "-.inf", ".nan", "9" * 5000, "1.0e+300"]))
wrong_types = st.sampled_from(["[1, 2]", "{a: 1}", "abc", "'3'", "2020-01-01", "!!binary aGk=", "[[[[1]]]]",
                               "&x [*x]", "*undefined"])


def _number_fields(cls):
    import typing
    return sorted(k for k, f in cls.model_fields.items()
                  if any(a in (int, float) for a in (typing.get_args(f.annotation) or (f.annotation,))))


@st.composite
def hostile_step_args(draw):
    command = draw(st.sampled_from(sorted(STEP_COMMANDS)))
    cls = STEP_COMMANDS[command]
    kind = draw(st.sampled_from(["name", "number", "type", "unknown"]))
    names = [k for k in ("name", "base", "models") if k in cls.model_fields]
    if kind == "name" and names:
        key, name = draw(st.sampled_from(names)), draw(hostile_names)
        value = json.dumps([name] if key == "models" else name)  # a YAML double-quoted string keeps "\n"
    elif kind in ("number", "type") and _number_fields(cls):
        key = draw(st.sampled_from(_number_fields(cls)))
        value = draw(huge_numbers if kind == "number" else wrong_types)
    else:
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20).filter(
            lambda k: k not in cls.model_fields))
        value = draw(st.sampled_from(["1", "x", "[1]"]))
    return command, [f"{key}={value}"]


@SETTINGS
@given(case=hostile_step_args())
def test_every_step_refuses_hostile_parameters_in_one_line(tmp_path, capsys, case):
    command, args = case
    run = tmp_path / "run"
    rc = main([command, f"data_dir={tmp_path / 'data'}", f"work_dir={tmp_path / 'work'}", f"run_dir={run}", *args])
    line = one_line_refusal(capsys.readouterr().err)
    assert rc == 2, line
    assert len(line) < 2500  # the value is never printed whole
    assert not run.exists()  # refused before anything was written


@SETTINGS
@given(args=st.one_of(
    st.tuples(st.just("synth"), st.sampled_from(["--preset=huge", "--preset=", "--seed=-1", "--seed=99999999999",
                                                 "--seed=x", "--bogus"])),
    st.tuples(st.just("index"), st.sampled_from(["--out", "--bogus"])),
    st.tuples(st.just("demo"), st.sampled_from(["epochs=1000000000", "n_tta=1e20", "bs=.nan", "name=\"a\\n\"",
                                                "models=[\"../x\"]", "arch=[1, 2]", "lr=.inf"])),
    st.tuples(st.sampled_from(sorted(STEP_COMMANDS)), st.sampled_from(["--bogus", "-f", "--check=maybe"])),
))
def test_synth_index_demo_and_usage_errors_are_one_line(tmp_path, capsys, args):
    command, arg = args
    extra = [str(tmp_path / "out")] if command == "synth" else [str(tmp_path / "none.bson")] if command == "index" else []
    if command == "demo":
        extra = ["--run-dir", str(tmp_path / "run")]
    rc = main([command, *extra, arg])
    assert rc in (1, 2)
    one_line_refusal(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


# ---- damaged files: exit 1, one line naming the file ----

@pytest.fixture
def prepared(tiny_data, tmp_path):
    "A copy of the tiny data set and step 02's work folder, in tmp_path"
    from cdkit.data.prepare import create_prepared
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    create_prepared(data, tmp_path / "work", valid_frac=0.2, log=lambda *a: None)
    return dict(data_dir=str(data), work_dir=str(tmp_path / "work"), run_dir=str(tmp_path / "run"))


def _args(d):
    return [f"{k}={v}" for k, v in d.items()]


def test_a_truncated_results_json_is_named(prepared, capsys, monkeypatch):
    import cdkit.steps.ensemble as step
    run = Path(prepared["run_dir"])
    run.mkdir()
    (run / "results.json").write_text('{"study": {"ensemble": [0.5')  # cut mid-write
    monkeypatch.setattr(step, "run", lambda P: None)  # the step itself is not the point: the report reads results.json
    monkeypatch.setattr(step, "record", lambda run_dir, R: None)
    assert main(["ensemble", *_args(prepared)]) == 1
    assert "results.json" in one_line_refusal(capsys.readouterr().err)


@pytest.mark.parametrize("garbage", [b"", b"{", b"\xff\xfe garbage", b"[1, 2]", b'{"arch": 3}', b"null"])
def test_a_garbage_model_json_is_named(prepared, capsys, garbage):
    card = Path(prepared["run_dir"]) / "models" / "resnet" / "model.json"
    card.parent.mkdir(parents=True)
    card.write_bytes(garbage)
    assert main(["predict", *_args(prepared), "models=[resnet]", "combine_levels=1"]) == 1
    assert "model.json" in one_line_refusal(capsys.readouterr().err)


def test_a_truncated_split_json_is_named(prepared, capsys):
    split_json = Path(prepared["work_dir"]) / "split.json"
    split_json.write_text(split_json.read_text()[:7])
    prep = {k: v for k, v in prepared.items() if k != "run_dir"}
    assert main(["prepare", *_args(prep)]) == 1
    assert "split.json" in one_line_refusal(capsys.readouterr().err)


@pytest.mark.parametrize("garbage", [b"", b"PAR1", b"PAR1 not parquet PAR1", b"\x00" * 100])
def test_damaged_parquet_files_are_named(prepared, capsys, garbage):
    from cdkit.runs import RunLayout
    layout = RunLayout.of(prepared["run_dir"])
    for split in ("valid", "test"):
        layout.products("base", split).parent.mkdir(parents=True, exist_ok=True)
        layout.products("base", split).write_bytes(garbage)
    assert main(["submit", *_args(prepared), "source=base"]) == 1
    assert "base_" in one_line_refusal(capsys.readouterr().err)
    (Path(prepared["work_dir"]) / "split.parquet").write_bytes(garbage)
    assert main(["ensemble", *_args(prepared)]) == 1
    assert "split.parquet" in one_line_refusal(capsys.readouterr().err)


@pytest.mark.parametrize("damage", ["empty train.bson", "garbage train.bson", "non-UTF-8 category_names.csv",
                                    "no category_names.csv columns", "train.bson is a folder"])
def test_damaged_data_files_are_one_line_in_a_fresh_process(tiny_data, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    if damage == "empty train.bson":
        (data / "train.bson").write_bytes(b"")
    elif damage == "garbage train.bson":
        (data / "train.bson").write_bytes(b"\x10\x00\x00\x00garbage that is no BSON" * 50)
    elif damage == "non-UTF-8 category_names.csv":
        (data / "category_names.csv").write_bytes(b"category_id,category_level1\n1000,\xff\xfe\xfd\n")
    elif damage == "no category_names.csv columns":
        (data / "category_names.csv").write_text("a,b\n1,2\n")
    else:
        (data / "train.bson").unlink()
        (data / "train.bson").mkdir()
    r = run_cli(["prepare", f"data_dir={data}", f"work_dir={tmp_path / 'work'}"])
    assert r.returncode == 1, r.stderr
    line = one_line_refusal(r.stderr)
    if damage != "train.bson is a folder":  # os.pread's error names no file; the one line is what is promised
        assert "train.bson" in line or "category_names.csv" in line


# ---- paths: typed on the command line, relative to the current folder ----

@settings(max_examples=8, deadline=None)
@given(spelling=st.sampled_from(["made", "./made", "sub/../made", "sub/./../made"]),
       depth=st.integers(min_value=0, max_value=2))
def test_typed_paths_are_relative_to_the_current_folder(tmp_path_factory, spelling, depth):
    from cdkit.base.paths import ROOT as KIT_ROOT
    from cdkit.base.paths import typed
    cwd = tmp_path_factory.mktemp("cwd")
    for i in range(depth):
        cwd = cwd / f"d{i}"
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "sub").mkdir(exist_ok=True)
    old = os.getcwd()
    try:
        os.chdir(cwd)
        assert typed(spelling) == cwd / "made"
        from cdkit.__main__ import _typed_paths
        from cdkit.steps.train import TrainParams
        got = _typed_paths(TrainParams, {"run_dir": spelling, "pretrained_file": spelling, "name": "made", "epochs": 2})
        assert got == {"run_dir": str(cwd / "made"), "pretrained_file": str(cwd / "made"), "name": "made", "epochs": 2}
    finally:
        os.chdir(old)
    assert KIT_ROOT not in (cwd / "made").parents


def test_demo_paths_are_typed_paths(tmp_path, monkeypatch):
    from cdkit.__main__ import _typed_demo_args
    monkeypatch.chdir(tmp_path)
    got = _typed_demo_args(["--run-dir", "r", "--only", "06,07", "run_dir=x", "data_dir=d", "epochs=2", "--run-dir=q"])
    assert got == ["--run-dir", str(tmp_path / "r"), "--only", "06,07", f"run_dir={tmp_path / 'x'}",
                   f"data_dir={tmp_path / 'd'}", "epochs=2", f"--run-dir={tmp_path / 'q'}"]


def test_command_line_paths_from_another_folder(tiny_data, tmp_path):
    "A -f file, synth's folder and a key=value path from another folder; a path inside a params file stays the root's"
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "mine.yaml").write_text("valid_frac: 0.2\n")
    r = run_cli(["synth", "data/t", "--preset", "tiny"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "t" / "train.bson").exists()
    r = run_cli(["prepare", "-f", "params/mine.yaml", "data_dir=data/t", "work_dir=w", "--check"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"data_dir: {tmp_path / 'data' / 't'}" in r.stdout and "valid_frac: 0.2" in r.stdout
    assert not (tmp_path / "w").exists()  # --check writes nothing
    (tmp_path / "params" / "inner.yaml").write_text("data_dir: data/t\n")
    r = run_cli(["prepare", "-f", "params/inner.yaml", "--check"], cwd=tmp_path)
    assert "data_dir: data/t" in r.stdout  # written in a file: the repository root's data/t, resolved by the step


def test_check_lists_what_is_missing_on_disk(tiny_data, tmp_path, capsys):
    args = [f"data_dir={tiny_data}", f"work_dir={tmp_path / 'work'}", f"run_dir={tmp_path / 'run'}"]
    assert main(["predict", *args, "models=[resnet, other]", "--check"]) == 1
    out = capsys.readouterr()
    missing = [x for x in out.out.splitlines() if x.startswith("missing: ")]
    assert len(missing) == 3 and "split.parquet" in missing[0] and "resnet/model.json" in missing[1]
    one_line_refusal(out.err)
    assert main(["train", *args, f"pretrained_file={tmp_path / 'w.pth'}", "--check"]) == 1
    assert "w.pth not found (pretrained_file)" in capsys.readouterr().out
    assert main(["prepare", f"data_dir={tiny_data}", f"work_dir={tmp_path / 'work'}", "--check"]) == 0
    assert "nothing missing on disk" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # a pure check: nothing written


def test_help_keeps_the_brackets(capsys):
    assert main(["--help"]) == 0
    assert "[-f FILE ...] [key=value ...]" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(STEP_COMMANDS))
def test_step_help_lists_every_parameter(command, capsys):
    from cdkit.base.params import defaults, field_comments
    cls = STEP_COMMANDS[command]
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.split("\n\n")[1].strip().startswith("Step ")  # the step module's docstring, not the notebook's name
    comments, values = field_comments(cls), defaults(cls)
    for k in cls.model_fields:
        line = next(x.strip() for x in out.splitlines() if x.strip().startswith(f"{k} ("))
        assert f"default {values[k]!r}" in line and comments.get(k, "") in line, line
