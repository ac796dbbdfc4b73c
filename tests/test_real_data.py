"""Dress rehearsal of the real-data path: the README's real-data commands, extracted from the README itself
(the bash blocks of its section "The real data"), run literally and in their order by bash on a synthetic
set in the real layout (`cdkit.data.synth_full` at a tiny scale, the real taxonomy when its file is there, no
test truth), written where the README tells users to put the download: data/cdiscount of a temporary
folder that stands for the clone (CDKIT_ROOT and the current folder; params/ and notebooks/ copied).

The only difference from a user's run is one small overrides file layered last on every `cdkit` step and
`papermill` notebook (tiny inputs, one epoch, few pictures: CPU minutes), added by `cdkit` and `papermill`
stand-ins put first on PATH; each step gets the keys of that file it declares. The commands that need the
network, a Kaggle account or GPUs are listed with the reason (`NOT_RUN`).

The same commands also run as in a Kaggle notebook: the data in a read-only stand-in for the mounted
competition folder (CDKIT_KAGGLE_INPUT), /kaggle/working a temporary folder (CDKIT_KAGGLE_WORKING); nothing
may be written under the input and the models must land under working."""
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCALE = 1.5e-5        # of the competition's counts: 106 train products (186 pictures), 27 test products (46 pictures)
REAL_CSV = [p / "shared" / "data" / "cdiscount" / "category_names.csv" for p in (ROOT.parent, ROOT.parent.parent)]
# Layered last on every step, each taking the keys it declares: CPU minutes instead of GPU days. What
# epochs=1 forces besides (no lr steps or batch growth after epoch 0), and enough validation products for
# the re-ranker's folds at this scale.
OVERRIDES = {
    "valid_frac": 0.15, "fusion_frac": 0.15,
    "max_train_images": 40, "max_valid_images": 32, "item_size": 80, "size": 75, "bs": 16, "acc_steps": 1,
    "epochs": 1, "lr_steps": [], "lr_step_factors": [], "batch_growth_epochs": [], "batch_growth_factor": 2,
    "num_workers": 0,
    "pretrained_file": None, "n_tta": 0, "hidden": 32, "seeds": [0], "block": 256,
    "rerank_seeds": [0], "rerank_folds": 2, "threshold": 0.0,
}
NOT_RUN = {  # what a line starts with -> why the rehearsal does not run it
    ".venv/bin/kaggle competitions download": "needs the network and a Kaggle account (the rehearsal writes "
                                              "the synthetic set where it would unzip)",
    "cd data/cdiscount && unzip": "needs the competition download",
    "mkdir -p weights && python -c": "downloads ImageNet weights (the overrides file sets pretrained_file: null)",
    "accelerate launch --multi_gpu": "needs GPUs (tests/test_train.py runs accelerate on 2 CPU processes)",
    "git clone": "needs the network",
    "pip install": "needs the network (tests/test_environment.py checks the install resolves)",
}
SUBMIT_TO_KAGGLE = "submit=true"  # sends to Kaggle: needs the network and an account; the line before is the dry run


def real_data_lines(readme=None):
    "Every command line of the bash blocks of README.md's section 'The real data', in order"
    text = (readme or ROOT / "README.md").read_text()
    start = text.index("\n## The real data\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    lines = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", section, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def plan(line):
    "('run', line) or ('skip', why) for one real-data line"
    for start, why in NOT_RUN.items():
        if line.startswith(start):
            return "skip", why
    if SUBMIT_TO_KAGGLE in line.split(" #")[0].split():
        return "skip", "sends the submission to Kaggle (network, account); the dry run before it is run"
    return "run", line


# ---- the stand-ins for `cdkit` and `papermill` that layer the overrides file last ----
SHIM = r'''
import os, sys
from pathlib import Path
import yaml
tool, args = sys.argv[1], sys.argv[2:]
overrides = yaml.safe_load(Path(os.environ["REHEARSAL_OVERRIDES"]).read_text())
declared = None
if tool == "cdkit" and args:
    from cdkit.steps.pipeline import STEPS
    step = next((s for s in STEPS if s.command == args[0]), None)
    declared = step and step.params_class().model_fields
elif tool == "papermill" and args:
    from cdkit.base.params import notebook_parameters
    declared = notebook_parameters(args[0])
if declared:
    out = Path(os.environ["REHEARSAL_TMP"]) / f"overrides-{os.getpid()}.yaml"
    out.write_text(yaml.safe_dump({k: v for k, v in overrides.items() if k in declared}))
    args = [*args, "-f", str(out)]
log = Path(os.environ["REHEARSAL_TMP"]) / "commands.log"
with open(log, "a") as f:
    f.write(" ".join([tool, *args]) + "\n")
cmd = [sys.executable, "-m", "cdkit"] if tool == "cdkit" else [sys.executable, "-m", "papermill"]
os.execv(sys.executable, [*cmd, *args])
'''


def make_clone(where: Path) -> Path:
    "A folder that stands for a fresh clone: what the README's commands read (params/, notebooks/)"
    clone = where / "clone"
    for sub in ("params", "notebooks"):
        shutil.copytree(ROOT / sub, clone / sub)
    return clone


def shell_env(clone: Path, tmp: Path, extra=None) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp / "shim.py").write_text(SHIM)
    for tool in ("cdkit", "papermill"):
        p = bin_dir / tool
        p.write_text(f"#!/bin/bash\nexec {shlex.quote(sys.executable)} {shlex.quote(str(tmp / 'shim.py'))} {tool} \"$@\"\n")
        p.chmod(0o755)
    (tmp / "overrides.yaml").write_text(yaml.safe_dump(OVERRIDES))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDKIT_", "KAGGLE_"))}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "CDKIT_ROOT": str(clone), "REHEARSAL_OVERRIDES": str(tmp / "overrides.yaml"),
                "REHEARSAL_TMP": str(tmp), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "HOME": str(tmp / "home"), "CDKIT_PROGRESS": "0", **(extra or {})})
    return env


def run_line(line, clone, env):
    # errexit: a failing command inside a README loop fails the line (a loop's status is only its last command's)
    r = subprocess.run(["bash", "-e", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, f"README line failed: {line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """The competition's files in the real layout: train.bson, test.bson, category_names.csv,
    sample_submission.csv (no test truth, no synth.json: the steps must do without them)"""
    from cdkit.data.synth_full import write_full_dataset
    d = tmp_path_factory.mktemp("download") / "cdiscount"
    csv = next((p for p in REAL_CSV if p.exists()), None)  # the real taxonomy when it is there (never committed)
    write_full_dataset(d, scale=SCALE, seed=0, category_csv=csv, progress=False)
    for name in ("test_truth.csv", "synth.json"):
        (d / name).unlink()
    return d


def test_every_real_data_line_is_run_or_listed():
    lines = real_data_lines()
    runs = [line for line in lines if plan(line)[0] == "run"]
    assert any(line.startswith("cdkit prepare") for line in runs)
    for what in ("train", "predict", "fuse", "ensemble", "aggregate", "pseudo", "submit"):
        assert any(re.search(rf"cdkit (\$step|{what})\b", line) for line in runs), what
    # every *_full.yaml and study_*.yaml is layered by a line that runs (through a loop variable or by name)
    text = " ".join(runs)
    for f in sorted((ROOT / "params").glob("*.yaml")):
        if f.stem == "cdiscount":
            continue
        stem = f.stem
        loops = re.findall(r"for (\w+) in ([\w ]+?); do (.*?); done", text)
        by_loop = any(re.sub(r"\$\{?%s\}?" % var, v, body).count(f"params/{stem}.yaml")
                      for var, values, body in loops for v in values.split())
        assert by_loop or f"params/{stem}.yaml" in text, f"no README real-data command uses params/{stem}.yaml"


# ---- the rules the commands need, fast ----

def test_a_shared_file_gives_each_step_the_keys_it_declares(tmp_path):
    from cdkit.base.params import ParamsError, load_params, take_params
    from cdkit.steps.pipeline import step_of, step_parameters
    from cdkit.steps.prepare import PrepareParams
    from cdkit.steps.train import TrainParams
    shared, prep = ROOT / "params" / "cdiscount.yaml", ROOT / "params" / "prepare_full.yaml"
    P = load_params(PrepareParams, [shared, prep])  # step 02 has no run_dir: it takes data_dir and work_dir
    assert (P.data_dir, P.work_dir, P.valid_frac) == ("data/cdiscount", "data/cdiscount_prepared", 0.02)
    assert load_params(TrainParams, [shared]).run_dir == "runs/cdiscount"
    nb = step_of("02").path
    assert step_parameters(nb, [shared, prep])["data_dir"] == "data/cdiscount"
    # the notebook sees papermill's injected names, not their file: the shared file's values pass ...
    ns = {**step_parameters(nb, [prep]), "data_dir": "data/cdiscount", "run_dir": "runs/cdiscount"}
    assert take_params(PrepareParams, ns).valid_frac == 0.02
    # ... any other run_dir is a parameter step 02 does not have
    with pytest.raises(ParamsError, match="run_dir"):
        take_params(PrepareParams, {**ns, "run_dir": "runs/elsewhere"})
    # a step's own file stays strict, and a key of the shared file that no step declares is an error
    own = tmp_path / "prepare_mine.yaml"
    own.write_text("valid_frac: 0.02\nrun_dir: runs/cdiscount\n")
    with pytest.raises(ParamsError, match="run_dir"):
        load_params(PrepareParams, [own])
    typo = tmp_path / "cdiscount.yaml"
    typo.write_text("data_dir: data/cdiscount\nrun_dri: runs/cdiscount\n")
    for cls in (PrepareParams, TrainParams):
        with pytest.raises(ParamsError, match="run_dri"):
            load_params(cls, [typo])
    with pytest.raises(ParamsError, match="run_dri"):
        step_parameters(nb, [typo])


def test_on_kaggle_the_real_data_folders_are_the_mounted_input_and_working(tmp_path, monkeypatch):
    from cdkit.base.params import load_params
    from cdkit.steps.prepare import PrepareParams
    from cdkit.steps.train import TrainParams
    shared = ROOT / "params" / "cdiscount.yaml"
    kaggle_input, working = tmp_path / "input", tmp_path / "working"
    monkeypatch.setenv("CDKIT_KAGGLE_INPUT", str(kaggle_input))
    monkeypatch.setenv("CDKIT_KAGGLE_WORKING", str(working))
    P = load_params(TrainParams, [shared])
    assert (P.data_dir, P.run_dir) == ("data/cdiscount", "runs/cdiscount")  # no competition mounted: as written
    kaggle_input.mkdir()
    (kaggle_input / "train.bson").write_bytes(b"")
    P = load_params(TrainParams, [shared])
    assert (P.data_dir, P.work_dir, P.run_dir) == (str(kaggle_input), str(working / "prepared"),
                                                   str(working / "runs" / "cdiscount"))
    assert load_params(PrepareParams, [shared]).work_dir == str(working / "prepared")
    assert load_params(TrainParams, [shared], ["run_dir=runs/mine"]).run_dir == "runs/mine"  # others as given


def test_missing_real_data_never_advises_synthetic_data_there(tmp_path, capsys):
    "The message names the download; synthetic data is advised only for a folder meant for it"
    from cdkit.__main__ import main
    real = tmp_path / "data" / "cdiscount"
    assert main(["train", "-f", str(ROOT / "params" / "cdiscount.yaml"), f"data_dir={real}",
                 f"work_dir={tmp_path / 'w'}", f"run_dir={tmp_path / 'r'}"]) == 1
    err = capsys.readouterr().err
    assert "download the competition files there" in err and "synth" not in err.replace("synthetic run", "")
    assert not real.exists()
    assert main(["prepare", f"data_dir={tmp_path / 'data' / 'demo'}", f"work_dir={tmp_path / 'w'}"]) == 1
    assert f"cdkit synth {tmp_path / 'data' / 'demo'}" in capsys.readouterr().err


def test_only_names_exact_steps_and_the_stale_advice_runs(tmp_path):
    """`--only 06` is step 06, not 06b; an --only entry that names no step is refused. After a demo (fusion
    heads and the fine-tuned model in place), `--only 06,07,08` passes the check that runs before any
    notebook, and the report's advice for stale rows passes it too"""
    import re
    import shlex
    from cdkit.base.params import ParamsError, parse_overrides
    from cdkit.steps.pipeline import STEPS, check_models_free, check_only, selected, step_parameters
    from cdkit.steps.report import write_report
    assert [s.notebook for s in STEPS if selected(s, ["06"])] == ["06_predict_tta"]
    assert [s.notebook for s in STEPS if selected(s, ["06b", "09_pseudo_label_finetune"])] == [
        "06b_fusion_head", "09_pseudo_label_finetune"]
    with pytest.raises(ParamsError, match="--only 6: no such step"):
        check_only(["6"])
    run = tmp_path / "run"
    for held in ("resnet-fusion", "pseudo"):  # what a finished demo leaves
        (run / "models" / held).mkdir(parents=True)
        (run / "models" / held / "model.pth").write_bytes(b"weights")

    def check(only, overrides=None):
        plan = [(s, step_parameters(s.path, (), {"run_dir": str(run), **(overrides or {})})) for s in STEPS]
        check_only(only)
        check_models_free(plan, only)
    check(["06", "07", "08"])
    with pytest.raises(ParamsError, match="06b_fusion_head"):
        check(["06b"])
    with pytest.raises(ParamsError, match="09_pseudo"):
        check(["09"])
    # the report's advice for stale rows is a command that passes
    (run / "results.json").write_text(json.dumps({
        "study": {"+pseudo-labels": {"test": 0.5}, "baseline": {"test": 0.4}},
        "_meta": {"study": {"+pseudo-labels": {"step": "pseudo", "time": 1.0}, "baseline": {"step": "predict", "time": 2.0}}}}))
    advice = re.search(r"`cdkit demo ([^`]*)`", write_report(run).read_text())
    assert advice
    args = shlex.split(advice.group(1))
    only = args[args.index("--only") + 1].split(",")
    check(only, parse_overrides([a for a in args if "=" in a]))
    assert "09" in only


def test_real_data_commands_run_literally(download, tmp_path):
    "Every runnable real-data line of the README, in its order, on the synthetic download in data/cdiscount"
    clone = make_clone(tmp_path)
    shutil.copytree(download, clone / "data" / "cdiscount")
    env = shell_env(clone, tmp_path)
    ran = []
    for line in real_data_lines():
        kind, _ = plan(line)
        if kind == "run":
            run_line(line, clone, env)
            ran.append(line)
    run = clone / "runs" / "cdiscount"
    sub = run / "submission.csv.gz"
    assert sub.exists(), sorted(p.name for p in run.iterdir())
    import pandas as pd
    from cdkit.submit.submission import validate_submission
    ids = pd.read_csv(download / "category_names.csv")["category_id"]
    validate_submission(sub, download / "sample_submission.csv", ids.to_numpy())
    assert len(pd.read_csv(sub)) == len(pd.read_csv(download / "sample_submission.csv"))
    for name in ("resnet101", "seresnet50", "inception_v3", "inception_v4", "xception", "resnet101_pseudo",
                 "study_resnet101", "study_seresnet50", "study_inception_v3", "study_xception", "study_resnet101_pseudo"):
        assert (run / "models" / name / "model.pth").exists(), name
    # the download stays as it was (the raw folder is never written)
    assert sorted(p.name for p in (clone / "data" / "cdiscount").iterdir()) == sorted(p.name for p in download.iterdir())
    log = (tmp_path / "commands.log").read_text()
    assert log.count("-f " + str(tmp_path)) >= len(ran)  # every step took the overrides file


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_real_data_commands_in_a_kaggle_notebook(download, tmp_path):
    """The same literal commands where /kaggle/input holds the competition (read-only) and only
    /kaggle/working is kept: params/cdiscount.yaml's folders stand for those, nothing is written under
    the input, the prepared files and the models land under working. Prepare and the first training line."""
    kaggle_input = tmp_path / "input" / "cdiscount-image-classification-challenge"
    shutil.copytree(download, kaggle_input)
    working = tmp_path / "working"
    working.mkdir()
    clone = make_clone(working)  # a notebook clones the kit into /kaggle/working
    for p in [kaggle_input, *kaggle_input.iterdir()]:  # mounted read-only, as far as this user can make it
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _tree(kaggle_input)
    env = shell_env(clone, tmp_path, {"CDKIT_KAGGLE_INPUT": str(kaggle_input), "CDKIT_KAGGLE_WORKING": str(working)})
    try:
        lines = [line for line in real_data_lines() if plan(line)[0] == "run"]
        first_train = next(i for i, line in enumerate(lines) if "notebooks/03_" in line or "cdkit train" in line)
        for line in lines[:first_train + 1]:
            run_line(line, clone, env)
        assert _tree(kaggle_input) == before  # nothing written, moved or touched under the input
        assert (working / "prepared" / "split.parquet").exists()
        assert (working / "runs" / "cdiscount" / "models" / "resnet101" / "model.pth").exists()
        assert not (clone / "data").exists()  # no data/cdiscount(_prepared) inside the clone
        assert not (clone / "runs" / "cdiscount" / "models").exists()
    finally:
        for p in [kaggle_input, *kaggle_input.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
