"""The command line: one command per step with the notebook's parameters, one-line errors, the raw
data folder never written."""
import subprocess
import sys
from pathlib import Path

from cdkit.__main__ import main
from cdkit.steps.pipeline import STEPS

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_has_a_command():
    r = subprocess.run([sys.executable, "-m", "cdkit", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0
    for s in STEPS:
        if s.command.startswith("train-"):
            continue  # `cdkit train arch=...`: 04 and 05 differ from 03 only in their defaults
        assert s.command in r.stdout, s.command


def test_a_step_without_step_02_says_so_in_one_line(tiny_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cdkit", "ensemble", f"data_dir={tiny_data}", f"work_dir={tmp_path / 'w'}",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "run step 02 first" in r.stderr and "Traceback" not in r.stderr


def test_bad_parameters_exit_2_before_writing(tmp_path):
    assert main(["predict", f"run_dir={tmp_path / 'run'}", "n_tta=-1"]) == 2
    assert main(["aggregate", f"run_dir={tmp_path / 'run'}", "md5=false", "md5_products=true"]) == 2
    assert not (tmp_path / "run").exists()
