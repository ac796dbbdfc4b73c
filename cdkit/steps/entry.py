"""One entry for every step: `@step_entry("predict")` on each `cdkit/steps/<step>.py` `run`.

The command line and the notebooks both call `run(P)`, so both go through the same entry. Before the
step's work, with its parameters already validated (nothing is written before that):

1. the folders it writes (run_dir, work_dir) are resolved to real paths and refused when they lie
   inside the raw data (`io.check_writable`);
2. the run folder must be new, empty, or one the kit made (its marker `.cdkit-run.json`); a folder
   written by the kit before the marker (only the layout's names, holding results.json, models/ or
   params/) is adopted; anything else (a user's tree, `~`, `.`) is refused, naming it;
3. the marker records the data set of the run (resolved data_dir, size and hash of the first MiB of
   train.bson and test.bson): a step on another data set is refused, naming both;
4. the run folder's lock is held for the whole step (`io.folder_lock`; a notebook kernel of `cdkit
   demo` runs inside the pipeline's lock), the kit's temps of dead writers are swept from it;
5. the step's settings go to run_dir/params/<step>.yaml only when it succeeds.

Step 02 (prepare) claims its work folder the same way (`.cdkit-work.json`). A run folder that this
entry created and that a failing step left empty is removed again."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path

from cdkit.base.errors import CdkitError
from cdkit.runs import RunLayout
from cdkit.base.io import (TMP_PREFIX, atomic_write, check_writable, folder_lock, holds_lock, real_path, remove,
                 sweep_tree, temp_owner)

RUN_MARK = ".cdkit-run.json"
WORK_MARK = ".cdkit-work.json"
LOCK_FILES = (".lock", ".lock.pid")
# what the kit writes at the top of a run folder (cdkit.runs.RunLayout, the pipeline's notebooks/)
RUN_NAMES = frozenset({*RunLayout.top_names(), *LOCK_FILES})
RUN_SIGNS = ("results.json", "models", "params", "preds", "products")  # a pre-marker run folder holds one of these
# what step 02 writes into a work folder (cdkit.data.prepare) and the md5 cache of step 08
WORK_NAMES = frozenset({"train_index.parquet", "test_index.parquet", "split.parquet", "split.json",
                        "train_md5.npy", "test_md5.npy", *LOCK_FILES})
WORK_SIGNS = ("train_index.parquet", "split.parquet")
HEAD_BYTES = 1 << 20


class RunFolderError(CdkitError, ValueError):
    "A run or work folder that is neither new, empty, nor one the kit made"


class DataSetMismatchError(CdkitError, ValueError):
    "A step on a run folder that belongs to another data set"


def data_identity(data_dir) -> dict:
    "The data set a run belongs to: its resolved folder, and size + sha256 of the first MiB of each BSON file"
    d = real_path(data_dir)
    files = {}
    for name in ("train.bson", "test.bson"):
        p = d / name
        if p.is_file():
            with open(p, "rb") as f:
                head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()[:16]
            files[name] = {"bytes": p.stat().st_size, "head_sha256": head}
    return {"data_dir": str(d), "files": files}


def _marker(folder: Path, mark: str):
    try:
        data = json.loads((folder / mark).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_claimable(folder, kind="run"):
    """Refuse (RunFolderError) a folder the kit may not write its `kind` ("run" or "work") folder into:
    one that exists and is neither empty, nor marked by the kit, nor written by the kit before the marker"""
    folder = Path(folder)
    mark, names, signs = (RUN_MARK, RUN_NAMES, RUN_SIGNS) if kind == "run" else (WORK_MARK, WORK_NAMES, WORK_SIGNS)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunFolderError(f"{kind}_dir {folder} is a file, not a folder; pass a new folder")
    if (folder / mark).is_file():
        return
    entries = sorted(p.name for p in folder.iterdir() if temp_owner(p.name) is None and p.name not in LOCK_FILES)
    # executed notebooks: papermill writes its output copy (`papermill nb.ipynb runs/x/03.ipynb`, as the README
    # does) before the kernel that runs the step has started
    executed = [n for n in entries if n.endswith(".ipynb") and (folder / n).is_file()]
    foreign = [n for n in entries if n not in names and n not in executed]
    if not foreign and (len(executed) == len(entries) or any(s in entries for s in signs)):
        return  # empty, only executed copies of the kit's notebooks, or a folder the kit wrote before its markers
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    raise RunFolderError(f"{kind}_dir {folder} holds files the kit did not write ({shown or ', '.join(entries[:3])}); "
                         f"pass a new or empty folder, or one the kit made (it holds {mark})")


def _write_marker(folder: Path, mark: str, content: dict):
    atomic_write(folder / mark, lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1) + "\n"))


def check_data(run_dir, identity: dict):
    "Refuse (DataSetMismatchError) a step on `run_dir` with another data set than the one it belongs to"
    mark = _marker(Path(run_dir), RUN_MARK)
    had = (mark or {}).get("data")
    if not had or not identity or not identity.get("files") or not had.get("files"):
        return
    if had["files"] != identity["files"]:
        raise DataSetMismatchError(f"run_dir {run_dir} belongs to the data set {had['data_dir']}, not to "
                                   f"{identity['data_dir']} (another train.bson/test.bson); use another run_dir")


def claim(folder, kind="run", identity=None):
    "Mark `folder` as the kit's (creating it); records the data set of a run folder"
    folder = Path(folder)
    mark = RUN_MARK if kind == "run" else WORK_MARK
    current = _marker(folder, mark)
    if current is not None and (kind != "run" or current.get("data") or not identity):
        return
    _write_marker(folder, mark, {"kind": kind, "written_by": "cdkit", **({"data": identity} if identity else {})})


def _is_leftover(folder: Path) -> bool:
    "Only the kit's bookkeeping is in `folder` and its sub-folders (markers, locks: a failing step wrote nothing else)"
    if not folder.is_dir() or folder.is_symlink():
        return False
    return all(_is_leftover(p) if p.is_dir() and not p.is_symlink() else
               p.name in (RUN_MARK, WORK_MARK, *LOCK_FILES) or p.name.startswith(TMP_PREFIX) for p in folder.iterdir())


def _rank() -> int:
    from cdkit.train.distributed import rank, world_size
    return rank() if world_size() > 1 else 0


@contextlib.contextmanager
def step_context(step: str, P, save=True):
    """The entry of step `step` with validated params `P` (see the module's docstring); yields the run
    folder (or the work folder of a step without one)"""
    from cdkit.base.params import save_params
    from cdkit.runs import RunLayout
    from cdkit.base.paths import resolve
    # real paths: a run folder reached through a symlink is the folder it points to, checked as such
    run_dir = real_path(resolve(P.run_dir)) if hasattr(P, "run_dir") else None
    work_dir = real_path(resolve(P.work_dir)) if hasattr(P, "work_dir") else None
    data_dir = resolve(P.data_dir) if hasattr(P, "data_dir") else None
    # 1. every folder the step writes: never inside the raw data
    if run_dir is not None:
        check_writable(run_dir, "run_dir")
    if work_dir is not None:
        check_writable(work_dir, "work_dir")
    owns_work = step == "prepare"
    # a step inside another step of this process (step 09 runs step 06), or a rank of a data-parallel
    # launch other than 0: the outer step / rank 0 holds the folders
    nested = (run_dir is not None and holds_lock(run_dir)) or (owns_work and holds_lock(work_dir))
    if nested or _rank() != 0:
        yield run_dir or work_dir
        return
    # 2.-3. before anything is written: whose folders, which data set
    identity = data_identity(data_dir) if data_dir is not None and run_dir is not None else None
    identity = identity if identity and identity["files"] else None  # no data set yet: recorded by a later step
    created = []
    for folder, kind in ((run_dir, "run"), (work_dir if owns_work else None, "work")):
        if folder is not None:
            check_claimable(folder, kind)
            if kind == "run":
                check_data(folder, identity)
            if not folder.exists():
                created.append(folder)
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            for folder, kind in ((run_dir, "run"), (work_dir if owns_work else None, "work")):
                if folder is None:
                    continue
                stack.enter_context(folder_lock(folder, f"{kind} folder"))
                check_claimable(folder, kind)  # again, now that no other step can change it
                if kind == "run":
                    check_data(folder, identity)
                claim(folder, kind, identity if kind == "run" else None)
                sweep_tree(folder)
            yield run_dir or work_dir
            if save and run_dir is not None:
                save_params(P, RunLayout.of(run_dir).step_params(step))
            ok = True
    finally:
        if not ok:
            for folder in created:  # a step that failed before writing anything leaves no folder behind
                if _is_leftover(folder):
                    remove(folder)


def step_entry(step: str, saves_params=False):
    """Decorator of a step's `run(P, ...)`: the step runs inside `step_context(step, P)`. `saves_params`:
    the step's settings go to run_dir/params/<step>.yaml when it succeeds (later steps read them), unless
    it is called with save=False (a step run by another step)"""
    def deco(run):
        @functools.wraps(run)
        def wrapper(P, *args, **kw):
            with step_context(step, P, save=saves_params and kw.get("save", True)):
                return run(P, *args, **kw)
        wrapper.step = step
        return wrapper
    return deco
