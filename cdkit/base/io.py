"""Base I/O: atomic writes of a file or a folder, the guard of the raw data, the sweep of the kit's
temporary files, a lock per folder.

Every write of the kit goes through here (`atomic_write`, `atomic_open`, `atomic_dir`, `replace_dir`,
`makedirs`, `remove`, `append_open`; tests/test_invariants_io.py walks the source for any other), so that:

- the raw data is never written: `guard` refuses to create, replace or remove anything inside a
  folder that holds competition BSON files (a `*.bson` in it or in any folder above it), on real
  paths (`..`, `./`, symlinks resolved); only a synthetic writer, inside `writing_dataset(folder)`,
  writes its own data folder (marked by `.cdkit-data.json` before the first BSON byte);
- a crash, a kill or a full disk never leaves a half-written file under its final name;
- what an interrupted write leaves is unmistakably the kit's, and the next start removes it:

    .cdkit-tmp-<pid>-<random>-<name>      a file or folder being written (atomic_write, atomic_open, atomic_dir)

  `sweep_temps(folder)` removes those of dead processes beside a file about to be written (one folder,
  never recursive); `sweep_tree(folder)` walks a folder the kit made (a run or work folder with its
  marker, cdkit.steps.entry), never following symlinks.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from cdkit.base.errors import CdkitError


TMP_PREFIX = ".cdkit-tmp-"
DATA_MARK = ".cdkit-data.json"  # in a data folder a synthetic writer of the kit made (written before its first BSON byte)


class RawDataError(CdkitError, PermissionError):
    "A write, replacement or removal inside a folder that holds competition BSON files (the raw data)"


class DiskFullError(CdkitError, OSError):
    "No space left on the device (or past the file size limit, EFBIG) while writing a named path"


def tmp_path(path: Path) -> Path:
    "Where a write of `path` goes before it is moved into place (found by `sweep_temps`); guarded"
    path = Path(path)
    guard(path)
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")


def temp_owner(name: str):
    "The PID in a temp name of the kit (`.cdkit-tmp-<pid>-...`), or None for any other name"
    if not name.startswith(TMP_PREFIX):
        return None
    pid = name[len(TMP_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def temps_of(path) -> list:
    "The kit's unfinished writes of `path` (temp entries beside it, any owner)"
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir()
                  if temp_owner(p.name) is not None and p.name.split("-", 4)[-1] == path.name)


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# ---- the raw-data guard -------------------------------------------------------------------------------

_OWN_DATA: set = set()  # real paths of the data folders this process is writing (writing_dataset)
_BSON_CACHE: dict = {}  # real folder -> (mtime_ns, ino, name of a BSON file in it or None)


def real_path(p) -> Path:
    "The absolute path of `p` with `~`, `..`, `.` and every symlink resolved (also for a path not yet created)"
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def _bson_in(folder: Path):
    "The name of a *.bson entry of `folder`, or None (cached on the folder's mtime)"
    try:
        st = folder.stat()
    except OSError:
        return None
    hit = _BSON_CACHE.get(folder)
    if hit and hit[:2] == (st.st_mtime_ns, st.st_ino):
        return hit[2]
    found = None
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for e in it:
            if e.name.lower().endswith(".bson"):
                found = e.name
                break
    _BSON_CACHE[folder] = (st.st_mtime_ns, st.st_ino, found)
    return found


def raw_data_folder(folder):
    """The folder (real path) holding BSON files that `folder` is or lies inside, or None. A data
    folder this process is writing (`writing_dataset`) does not count."""
    real = real_path(folder)
    for f in (real, *real.parents):
        if f in _OWN_DATA:
            return None
        if _bson_in(f):
            return f
    return None


def guard(path, what="writing"):
    """Refuse (RawDataError) to create, replace or remove `path` when it lies inside the raw data: a
    folder holding *.bson files, or one below such a folder. A BSON file is written only by a
    synthetic writer into its own data folder (`writing_dataset`)."""
    real = real_path(path)
    raw = raw_data_folder(real.parent)
    if raw is not None:
        raise RawDataError(f"{what} {path}: {real.parent} is inside the raw data folder {raw} (it holds "
                           f"{_bson_in(raw)}); the raw data stays read-only, choose a folder outside it")
    if real.name.lower().endswith(".bson") and real.parent not in _OWN_DATA:
        raise RawDataError(f"{what} {path}: a BSON file is written only by the kit's synthetic writers, into "
                           "their own data folder")
    return real


def check_writable(folder, what="folder"):
    "Refuse (RawDataError) a folder a step will write into when it is, or lies inside, the raw data"
    raw = raw_data_folder(folder)
    if raw is not None:
        raise RawDataError(f"{what} {folder} is inside the raw data folder {raw} (it holds {_bson_in(raw)}); the "
                           "raw data stays read-only, choose a folder outside it")
    return real_path(folder)


def _is_kit_data(folder: Path) -> bool:
    "A data folder a synthetic writer of the kit made: its marker, or (written before the marker) its synth.json"
    if (folder / DATA_MARK).exists():
        return True
    try:
        meta = json.loads((folder / "synth.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "preset" in meta and "counts" in meta


@contextlib.contextmanager
def writing_dataset(folder, writer="cdkit synth"):
    """The one way to write BSON files: into `folder`, new, empty or written by the kit before (its
    marker). Refused (RawDataError) inside another data folder or over files the kit did not write. The
    marker goes in before the first BSON byte, so the kit knows later that it wrote this folder."""
    real = real_path(folder)
    named = f"{folder}" if Path(folder) == real else f"{folder} (= {real})"
    raw = raw_data_folder(real.parent)
    if raw is not None:
        raise RawDataError(f"data folder {named} is inside the raw data folder {raw}; write synthetic data "
                           "into a new folder outside it")
    if real.exists():
        if not real.is_dir():
            raise RawDataError(f"data folder {named} is a file, not a folder")
        foreign = sorted(p.name for p in real.iterdir() if p.name not in (DATA_MARK, INCOMPLETE)
                         and temp_owner(p.name) is None)
        if foreign and not _is_kit_data(real):
            raise RawDataError(f"data folder {named} holds files the kit did not write ({', '.join(foreign[:3])}"
                               f"{', ...' if len(foreign) > 3 else ''}); synthetic data goes into a new or empty folder")
    _OWN_DATA.add(real)
    try:
        makedirs(real)
        if not (real / DATA_MARK).exists():
            atomic_write(real / DATA_MARK, lambda tmp: Path(tmp).write_text(
                json.dumps({"writer": writer, "note": "written by the kit: a synthetic data set"}) + "\n"))
        yield real
    finally:
        _OWN_DATA.discard(real)


def makedirs(path) -> Path:
    "Create the folder `path` and its parents (guarded)"
    path = Path(path)
    if not path.is_dir():
        guard(path / ".", "creating")
        path.mkdir(parents=True, exist_ok=True)
    return path


def remove(path):
    "Remove a file or a folder tree (guarded; a symlink is removed, never followed)"
    path = Path(path)
    guard(path, "removing")
    if path.is_dir() and not path.is_symlink():  # nor a folder that holds raw data somewhere below it
        for here, _, files in os.walk(path, followlinks=False):
            if any(f.lower().endswith(".bson") for f in files) and real_path(here) not in _OWN_DATA:
                raise RawDataError(f"removing {path}: {here} holds competition BSON files; the raw data stays read-only")
    _remove(path)


def output_current(path, stamp, read_manifest, verify, errors, what="written", log=None) -> bool:
    """Whether the output folder `path` (a prediction or feature store) exists, its manifest's meta carries
    `stamp` and `verify(path)` passes (its checksums); `log` says why an existing one is rebuilt. `errors`:
    the exceptions that mean "damaged" (the store's own, OSError, ValueError)"""
    if not Path(path).exists():
        return False
    try:
        if read_manifest(path).get("meta", {}).get("stamp") != stamp:
            if log:
                log(f"rebuilding {path}: {what} with another model, card, data or settings")
            return False
        verify(path)
    except errors as e:
        if log:
            log(f"rebuilding {path}: {e}")
        return False
    return True


def file_sha256(path) -> str:
    "sha256 of a file's content, read in blocks of 4 MiB"
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_torch(obj, path):
    """torch.save of `obj` to `path`, atomically. Saved through a file object, so the archive inside is named
    `archive/` whatever the temp file's name: the same state gives the same bytes (torch names the archive
    after the file it is given, and a temp name carries the PID)"""
    import torch

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return atomic_write(path, write)


def append_open(path, mode="a", **kw):
    "A file opened for appending (a log that grows as a run goes: not atomic by design); guarded"
    path = Path(path)
    guard(path)
    makedirs(path.parent)
    return open(path, mode, **kw)


def write_memmap(path, dtype, shape, mode="w+"):
    "np.memmap opened for writing at `path` (guarded; meant for a temp path inside an atomic write)"
    import numpy as np
    guard(path)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# how torch.save (inline_container.cc), pyarrow and numpy report a full disk in their own words
_FULL_WORDS = ("no space left", "unexpected pos", "disk quota", "file write failed", "file too large")


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(s in text for s in _FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def disk_full_as_error(path):
    """Turn whatever a full disk raises inside the block (ENOSPC, EDQUOT, EFBIG, torch's
    `unexpected pos`, pyarrow's and numpy's words for it) into DiskFullError naming `path`"""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if _is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}") from e
        raise


_words_on_disk_full = disk_full_as_error


def atomic_write(path, write):
    """Call write(tmp_path), then move tmp_path onto `path`: a crash never leaves a half-written file.
    On failure the temp file is removed; a full disk is reported as DiskFullError naming `path`."""
    path = Path(path)
    tmp = tmp_path(path)
    makedirs(path.parent)
    try:
        with _words_on_disk_full(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


@contextlib.contextmanager
def atomic_open(path, mode="wb", **kw):
    "A file object on a temp file beside `path`, moved over it only when the block succeeds"
    path = Path(path)
    tmp = tmp_path(path)
    makedirs(path.parent)
    try:
        with _words_on_disk_full(path):
            with open(tmp, mode, **kw) as f:
                yield f
            os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path, overwrite=False):
    """Yield a temp folder beside `path`; when the block succeeds it replaces `path` (which must not
    exist unless `overwrite`). On failure the temp folder is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tmp = tmp_path(path)
    makedirs(path.parent)
    tmp.mkdir()
    try:
        with _words_on_disk_full(path):
            yield tmp
            replace_dir(tmp, path)
    finally:
        _remove(tmp)


def replace_dir(tmp, path):
    "Move the finished folder `tmp` onto `path`, the old one (if any) removed only after the move"
    tmp, path = Path(tmp), Path(path)
    guard(path, "replacing")
    if path.exists():
        old = tmp_path(path.with_name(f"old-{path.name}"))
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    "Whether process `pid` is running (this process counts as running)"
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_pid_alive = process_alive


def _dead_temp(name: str) -> bool:
    owner = temp_owner(name)
    return owner is not None and not process_alive(owner)


def sweep_temps(folder) -> list:
    """Remove the kit's temp files and folders (`.cdkit-tmp-<pid>-...`) that writes of processes no
    longer running left in `folder` (this folder only, never below it; nothing inside the raw data);
    returns what was removed"""
    folder = Path(folder)
    if not folder.is_dir() or raw_data_folder(folder) is not None:
        return []
    removed = []
    for p in folder.iterdir():
        if _dead_temp(p.name):
            _remove(p)
            removed.append(p)
    return removed


def sweep_tree(folder, max_depth=6) -> list:
    """`sweep_temps` in `folder` and its sub-folders, for a folder the kit made (a run or work folder:
    cdkit.steps.entry checks its marker first); symlinks are never followed, a temp folder is removed whole"""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink() or raw_data_folder(folder) is not None:
        return []
    removed, base = [], len(folder.parts)
    for here, dirs, files in os.walk(folder, followlinks=False):
        here = Path(here)
        for name in [*dirs, *files]:
            if _dead_temp(name):
                _remove(here / name)
                removed.append(here / name)
        dirs[:] = [d for d in dirs if temp_owner(d) is None and len(here.parts) - base < max_depth
                   and not (here / d).is_symlink()]
    return removed


class FolderBusyError(CdkitError, RuntimeError):
    "Another process holds the lock of a run or work folder"


_HELD: dict = {}
# The PID that lends the locks it holds to its child processes: the pipeline (`cdkit demo`) holds the
# run folder while the notebooks run in papermill kernels, its children, which take the lock again.
LOCK_HOLDER_ENV = "CDKIT_LOCK_HOLDER"


def _parent_pid(pid: int):
    "The parent of process `pid` (Linux /proc; elsewhere `ps`), or None"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import subprocess
    try:
        out = subprocess.run(["ps", "-o", "ppid=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _is_ancestor(pid: int) -> bool:
    "Whether process `pid` is a parent, grandparent, ... of this process"
    p = os.getppid()
    for _ in range(64):
        if p == pid:
            return True
        if p in (None, 0, 1):
            return False
        p = _parent_pid(p)
    return False


def _lent_to_me(holder: str) -> bool:
    "The holder of a lock lent it to its children (LOCK_HOLDER_ENV) and this process is one of them"
    lent = os.environ.get(LOCK_HOLDER_ENV, "")
    return holder.isdigit() and lent == holder and _is_ancestor(int(holder))


@contextlib.contextmanager
def lend_locks_to_children():
    "While the block runs, child processes (papermill kernels) may take the locks this process holds"
    old = os.environ.get(LOCK_HOLDER_ENV)
    os.environ[LOCK_HOLDER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LOCK_HOLDER_ENV, None)
        else:
            os.environ[LOCK_HOLDER_ENV] = old


def holds_lock(folder) -> bool:
    "Whether this process holds (or was lent) the lock of `folder`"
    return real_path(folder) in _HELD


@contextlib.contextmanager
def folder_lock(folder, what="run folder"):
    """Hold `folder`/.lock for the duration of the block; a second process gets FolderBusyError
    naming the PID that holds it (filelock: the lock goes with the process, also after kill -9). A
    child of the holder that lent its locks (`lend_locks_to_children`) runs inside the holder's lock."""
    from filelock import FileLock, Timeout
    folder = real_path(folder)
    if folder in _HELD:  # this process holds it already (a step inside a pipeline): nest
        _HELD[folder] += 1
        try:
            yield folder
        finally:
            _HELD[folder] -= 1
        return
    makedirs(folder)
    guard(folder / ".lock")
    lock = FileLock(str(folder / ".lock"))
    pid_file = folder / ".lock.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = pid_file.read_text().strip()
        except OSError:
            holder = ""
        if _lent_to_me(holder):
            _HELD[folder] = 1
            try:
                yield folder
            finally:
                del _HELD[folder]
            return
        raise FolderBusyError(f"{what} {folder} is in use by PID {holder or '(unknown)'}; wait for it or use "
                              "another folder") from None
    _HELD[folder] = 1
    try:
        atomic_write(pid_file, lambda tmp: Path(tmp).write_text(str(os.getpid())))
        yield folder
    finally:
        del _HELD[folder]
        with contextlib.suppress(OSError):
            pid_file.unlink()  # the lock's own bookkeeping, in the folder guarded above
        lock.release()


# A folder whose writing takes long (a synthetic data set, a full-size rehearsal set) carries this
# marker from its first byte to its last: a killed or failed writer leaves it behind, and every reader
# of the folder refuses it instead of failing later on a missing or truncated file.
INCOMPLETE = ".cdkit-incomplete"


class IncompleteFolderError(CdkitError, RuntimeError):
    "A folder whose writer did not finish (killed, disk full)"


def mark_incomplete(folder, what="writing"):
    "Put the marker into `folder` before writing its files"
    folder = Path(folder)
    atomic_write(folder / INCOMPLETE, lambda tmp: Path(tmp).write_text(f"{what} started by PID {os.getpid()} and not finished\n"))


def mark_complete(folder):
    "Remove the marker: the last step of a writer that finished"
    if (Path(folder) / INCOMPLETE).exists():
        remove(Path(folder) / INCOMPLETE)


def check_complete(folder):
    "Raise IncompleteFolderError naming the folder when its writer did not finish"
    marker = Path(folder) / INCOMPLETE
    if marker.exists():
        raise IncompleteFolderError(f"{folder} is incomplete: {marker.read_text().strip()}. Delete the folder and "
                                    "write it again (e.g. `python -m cdkit synth ...`)")
    return Path(folder)
