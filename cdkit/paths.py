"""Where things live. Importing this module has no side effects.

One rule for every relative path the kit is given (params, notebooks, the command line, `cdkit synth`
and `cdkit index` alike): it is taken from the repository root, so a notebook behaves the same in
JupyterLab (cwd = notebooks/), under papermill and on the command line from any folder. CDKIT_ROOT
overrides the root; absolute paths are used as they are."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("CDKIT_ROOT", Path(__file__).resolve().parents[1]))
DATA = ROOT / "data"            # downloaded or generated data sets (never committed)
RUNS = ROOT / "runs"            # run folders (cdkit.runs.RunLayout), e.g. runs/demo/
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"


def resolve(p) -> Path:
    "An absolute path: `p` itself if absolute, else relative to the repository root"
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else ROOT / p
