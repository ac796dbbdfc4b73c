"""An interrupted `cdkit synth` (a killed subprocess) leaves a folder that readers refuse; a finished one is
complete (cdkit.data.synth, cdkit.base.io.writing_dataset)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdkit.base.io import IncompleteFolderError, check_complete, sweep_temps, writing_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, env=None, check=False):
    "Run `code` in a fresh interpreter at the repository root; (returncode, stdout + stderr)"
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=300)
    if check: assert p.returncode == 0, p.stdout + p.stderr
    return p.returncode, p.stdout + p.stderr


# --- an interrupted synth leaves a folder that readers refuse ------------------------------------

def test_killed_synth_leaves_an_incomplete_folder(tmp_path):
    out = tmp_path / "data"
    code, text = run_python(f"""
        import os, signal
        from cdkit.data import synth
        real_get = synth._Pictures.get
        def get(self, domain, *a):
            if domain == "test": os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while test.bson is written
            return real_get(self, domain, *a)
        synth._Pictures.get = get
        synth.write_dataset({str(out)!r}, preset="tiny", seed=0)
    """)
    assert code == -signal.SIGKILL, text
    assert (out / "train.bson").exists() and not (out / "test.bson").exists()
    with pytest.raises(IncompleteFolderError, match=f"{out} is incomplete"):
        check_complete(out)
    assert sweep_temps(out) == []  # a data folder is swept only by its writer
    with writing_dataset(out):
        assert [p.name.startswith(".cdkit-tmp-") and p.name.endswith("-test.bson") for p in sweep_temps(out)] == [True]


def test_finished_synth_is_complete(tiny_data):
    assert check_complete(tiny_data) == tiny_data
