"""The command line: one command per step with the notebook's parameters, one-line errors, the raw
data folder never written."""
import subprocess
import sys
from pathlib import Path

from cdkit.__main__ import main
from cdkit.steps.pipeline import STEPS

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_has_a_command_with_its_notebooks_parameters(capsys):
    "`cdkit <command> --check` takes the step's Params class with its defaults (what its notebook's parameters cell holds)"
    import yaml
    from cdkit.base.params import defaults
    for s in STEPS:
        if s.command.startswith("train-"):
            continue  # `cdkit train arch=...`: 04 and 05 differ from 03 only in their defaults
        status = main([s.command, "--check"])
        out = capsys.readouterr().out
        assert status in (0, 1), (s.command, out)  # 1: the demo data is not on disk here
        shown = yaml.safe_load(out.split("\nmissing: ")[0].split("\nnothing missing on disk")[0])
        assert shown == yaml.safe_load(yaml.safe_dump(defaults(s.params_class()), sort_keys=False)), s.command


def test_a_command_prints_the_result_its_step_names():
    import pandas as pd
    from cdkit.__main__ import SHOWN, summary_lines
    from cdkit.steps.submit import SubmitResult
    assert set(SHOWN) == {s.module for s in STEPS}  # every step says what its command prints
    R = SubmitResult(Path("runs/x/submission.csv.gz"), "pseudo", {"base": 0.5, "pseudo": 0.6}, 3, 0, None, pd.DataFrame())
    assert summary_lines("submit", R) == ["stage: pseudo", "path: runs/x/submission.csv.gz"]  # no test truth: not shown
    R.test_accuracy = 0.61234
    assert summary_lines("submit", R)[-1] == "test_accuracy: 0.61234"


def test_a_step_without_step_02_says_so_in_one_line(tiny_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cdkit", "ensemble", f"data_dir={tiny_data}", f"work_dir={tmp_path / 'w'}",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "run step 02 first" in r.stderr and "Traceback" not in r.stderr


def test_bad_parameters_exit_2_before_writing(tmp_path):
    assert main(["predict", f"run_dir={tmp_path / 'run'}", "n_tta=-1"]) == 2
    assert main(["aggregate", f"run_dir={tmp_path / 'run'}", "md5=false", "md5_products=true"]) == 2
    assert not (tmp_path / "run").exists()
