"""Where the kit runs: Kaggle's folders as defaults, a real-data folder never filled with synthetic data,
a submit without credentials in one line (CLI and notebook 10), accelerate's silent one-process launch
refused, make lab as root, weights/ ignored, an install that keeps a preinstalled torch."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cdkit.__main__ import main
from cdkit.base.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def test_kaggle_input_folder_is_the_default_data_dir(tiny_data, tmp_path, monkeypatch):
    from cdkit.steps.explore import ExploreParams
    from cdkit.steps.train import TrainParams
    monkeypatch.setenv("CDKIT_KAGGLE_INPUT", str(tiny_data))  # stands for the mounted competition folder
    monkeypatch.setenv("CDKIT_KAGGLE_WORKING", str(tmp_path / "working"))
    P = TrainParams()
    assert P.data_dir == str(tiny_data) and ExploreParams().data_dir == str(tiny_data)
    assert P.work_dir == str(tmp_path / "working" / "prepared")
    assert P.run_dir == str(tmp_path / "working" / "runs" / "cdiscount")
    assert TrainParams(data_dir="data/other").data_dir == "data/other"  # a value given is used as it is
    monkeypatch.setenv("CDKIT_KAGGLE_INPUT", str(tmp_path / "absent"))  # any other machine
    assert (TrainParams().data_dir, TrainParams().run_dir) == ("data/demo", "runs/demo")


@pytest.mark.parametrize("name", ["cdiscount", "real-data"])
def test_synthetic_data_never_lands_in_a_real_data_folder(tmp_path, name, capsys):
    from cdkit.data.synth import ensure_data
    target = tmp_path / name
    with pytest.raises(FileNotFoundError, match="synthetic data is written only into a folder whose name says so"):
        ensure_data(target, "tiny")
    assert not target.exists()
    assert main(["explore", f"data_dir={target}", "synth_preset=tiny"]) == 1  # one line, no traceback
    assert "Download the competition files there" in capsys.readouterr().err
    assert not target.exists()


def test_synthetic_data_goes_into_a_folder_that_says_so(tmp_path):
    from cdkit.data.synth import ensure_data
    (tmp_path / "my-demo").mkdir()
    (tmp_path / "my-demo" / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="holds other files"):
        ensure_data(tmp_path / "my-demo", "tiny")
    assert sorted(p.name for p in (tmp_path / "my-demo").iterdir()) == ["notes.txt"]
    d = ensure_data(tmp_path / "tiny-synth", "tiny", log=lambda *a: None)
    assert (d / "train.bson").exists()


@pytest.fixture()
def products_run(tiny_data, tmp_path):
    "A run folder holding stage base's products (every product predicted as the most frequent category)"
    from cdkit.data.prepare import create_prepared
    from cdkit.runs import RunLayout
    prep = create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)
    layout = RunLayout.of(tmp_path / "run")
    cat = int(prep.train_index["category_id"].mode().iloc[0])
    cls = int(prep.catalog.to_class([cat])[0])
    for split, ids in (("valid", prep.train_index["product_id"][prep.valid_mask(prep.train_index)]),
                       ("test", prep.test_index["product_id"])):
        path = layout.products("base", split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"product_id": ids.to_numpy(), "pred_class": cls, "category_id": cat, "score": 1.0}).to_parquet(path)
    return dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "prep"), run_dir=str(tmp_path / "run"))


@pytest.fixture()
def no_kaggle_credentials(tmp_path, monkeypatch):
    for k in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_submit_without_credentials_is_one_line(products_run, no_kaggle_credentials, capsys):
    rc = main(["submit", *[f"{k}={v}" for k, v in products_run.items()], "submit=true"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().startswith("ERROR: no Kaggle credentials found (looked in") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert Path(products_run["run_dir"], "submission.csv.gz").exists()  # the file is written and validated first


def test_notebook_10_without_credentials_names_the_cause(products_run, no_kaggle_credentials):
    from cdkit.steps.pipeline import NotebookFailed, run_pipeline
    with pytest.raises(NotebookFailed, match=r"10_submit.ipynb failed in cell \d+ \(SubmissionError: no Kaggle "
                                             r"credentials found \(looked in"):
        run_pipeline(products_run["run_dir"], only=["10"], overrides=dict(products_run, submit=True),
                     log=lambda *a: None, heartbeat=0)


def test_accelerate_cpu_launch_of_two_processes_is_refused(tmp_path, monkeypatch):
    from cdkit.train.distributed import check_launch
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParamsError, match="asked for 2 processes but started one.*--multi_gpu"):
        check_launch(["accelerate", "launch", "--num_processes", "2", "--cpu", "-m", "cdkit", "train"])
    check_launch(["accelerate", "launch", "--num_processes", "1", "--cpu", "-m", "cdkit", "train"])
    # the real launcher: refused before any data is read, in one line
    args = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--cpu",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cdkit", "train",
            f"run_dir={tmp_path / 'run'}", f"work_dir={tmp_path / 'nowhere'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "asked for 2 processes but started one" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_make_lab_allows_root_and_weights_are_ignored():
    out = subprocess.run(["make", "-n", "lab"], capture_output=True, text=True, cwd=ROOT).stdout
    assert ("--allow-root" in out) == (os.getuid() == 0)
    assert subprocess.run(["git", "check-ignore", "-q", "weights/resnet101.pth"], cwd=ROOT).returncode == 0



def test_make_weights_saves_each_arch_under_its_file_name(tmp_path):
    "The recipe of `make weights`, run with a stand-in timm: weights/FILE.pth holds the state dict of timm's ARCH"
    import shlex
    import torch
    out = subprocess.run(["make", "-n", "weights", "ARCHS=resnet18 xception=legacy_xception"],
                         capture_output=True, text=True, cwd=ROOT).stdout
    assert "mkdir -p weights" in out
    line = next(x for x in out.splitlines() if " -c " in x and "timm" in x)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "timm.py").write_text("import torch\n"
                                  "def create_model(name, pretrained=False):\n"
                                  "    assert pretrained\n"
                                  "    open('calls.txt', 'a').write(name + '\\n')\n"
                                  "    return torch.nn.Linear(2, len(name))\n")
    (tmp_path / "weights").mkdir()
    r = subprocess.run([sys.executable, *shlex.split(line)[1:]], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(stub)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "calls.txt").read_text().split() == ["resnet18", "legacy_xception"]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["resnet18.pth", "xception.pth"]
    sd = torch.load(tmp_path / "weights" / "xception.pth", weights_only=True)
    assert sd["weight"].shape == (len("legacy_xception"), 2)


def _names(reqs):
    import re
    return {re.split(r"[<>=\[ ;]", r.strip(), 1)[0].lower() for r in reqs if r.strip() and not r.strip().startswith("#")}


def test_pyproject_groups_match_requirements():
    import tomllib
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [line.split("#")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()]
    groups = proj["optional-dependencies"]
    assert _names(proj["dependencies"]) | _names(groups["notebook"]) | _names(groups["dev"]) == _names(reqs)
    # the same ranges too, as pyproject.toml says
    declared = [*proj["dependencies"], *groups["notebook"], *groups["dev"]]
    assert sorted("".join(r.split()) for r in declared) == sorted("".join(r.split()) for r in reqs if r.strip())
    assert {"torch", "torchvision"} <= _names(proj["dependencies"])  # ranges, satisfied by a preinstalled torch
    assert not _names(proj["dependencies"]) & {"jupyterlab", "ipywidgets", "pytest", "ruff"}


def test_install_keeps_a_preinstalled_torch(tmp_path):
    "A fresh venv that sees an existing torch (as a cloud notebook has): `pip install -e .[notebook]` replaces nothing"
    import sysconfig
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the notebook's preinstalled packages: this environment's site-packages, seen through a .pth file
    (purelib / "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    seen = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__file__)"],
                          capture_output=True, text=True, timeout=300)
    assert seen.returncode == 0 and seen.stdout.startswith(sysconfig.get_paths()["purelib"]), seen  # the venv sees it
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--no-index",
                        "--no-build-isolation", "--disable-pip-version-check", "-e", f"{ROOT}[notebook]"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    would = [line for line in r.stdout.splitlines() if line.startswith("Would install")]
    assert would and "torch" not in would[0].replace("cdkit", ""), would
