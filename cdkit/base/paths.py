"""Where things live. Importing this module has no side effects.

The rule for relative paths, the one a shell user expects:

- a path typed on the command line is relative to the current folder: a positional argument
  (`cdkit synth data/tiny`, `cdkit index BSON --out PATH`), a params file (`-f params/x.yaml`) and a
  path-valued override (`run_dir=runs/x`, any field typed `params.PathStr`); the command line makes
  them absolute (`typed`) before anything else sees them;
- a path written inside a params file or a notebook's parameters cell (and every default) is relative
  to the repository root (`resolve`), so a notebook behaves the same in JupyterLab (cwd = notebooks/),
  under papermill and from the command line in any folder.

CDKIT_ROOT overrides the root; absolute paths are used as they are; `~` is expanded in both."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("CDKIT_ROOT", Path(__file__).resolve().parents[2]))
DATA = ROOT / "data"            # downloaded or generated data sets (never committed)
RUNS = ROOT / "runs"            # run folders (cdkit.runs.RunLayout), e.g. runs/demo/
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"


def resolve(p) -> Path:
    "An absolute path: `p` itself if absolute, else relative to the repository root"
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else ROOT / p


def typed(p) -> Path:
    "A path typed on the command line, made absolute: relative to the current folder"
    return Path(os.path.abspath(os.path.expanduser(str(p))))


# ---- where a Kaggle notebook keeps things ----
# The competition's files are mounted read-only in a Kaggle notebook; only /kaggle/working is kept
# (and written). There, the folder defaults below stand for these instead: the portable ones (the
# demo's, the notebooks' parameters cells) and the real data's (params/cdiscount.yaml), so that the
# notebooks and the README's real-data commands stay the same literals everywhere. CDKIT_KAGGLE_INPUT and
# CDKIT_KAGGLE_WORKING move both folders (tests; other mounts).
PORTABLE_DEFAULTS = {"data_dir": "data/demo", "work_dir": "data/demo_prepared", "run_dir": "runs/demo"}
REAL_DATA_DEFAULTS = {"data_dir": "data/cdiscount", "work_dir": "data/cdiscount_prepared", "run_dir": "runs/cdiscount"}


def kaggle_input() -> Path:
    return Path(os.environ.get("CDKIT_KAGGLE_INPUT", "/kaggle/input/cdiscount-image-classification-challenge"))


def kaggle_working() -> Path:
    return Path(os.environ.get("CDKIT_KAGGLE_WORKING", "/kaggle/working"))


def on_kaggle() -> bool:
    "The competition's input folder is mounted (a Kaggle notebook with the competition's data attached)"
    return (kaggle_input() / "train.bson").exists()


def environment_default(name, value):
    """`value` of the folder parameter `name`, unless it is a default (the demo's or params/cdiscount.yaml's)
    and this is a Kaggle notebook: then the competition's input folder (data_dir) or a folder under
    /kaggle/working. A real-data folder that holds the data itself (a download into the clone) is kept."""
    if name not in PORTABLE_DEFAULTS or not on_kaggle():
        return value
    if value == REAL_DATA_DEFAULTS[name]:
        if (resolve(REAL_DATA_DEFAULTS["data_dir"]) / "train.bson").exists():
            return value
    elif value != PORTABLE_DEFAULTS[name]:
        return value
    return str({"data_dir": kaggle_input(), "work_dir": kaggle_working() / "prepared",
                "run_dir": kaggle_working() / "runs" / "cdiscount"}[name])
