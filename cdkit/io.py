"""Base I/O: atomic writes of a file or a folder, the sweep of their leftovers, a lock per folder.

Every output of the kit goes through here, so that a crash, a kill or a full disk never leaves a
half-written file under its final name, and the temporary files of an interrupted write are named
so that the next start can find and remove them:

    .<name>.tmp-<pid>-<random>      a file being written       (atomic_write, atomic_open)
    .<name>.tmp-<pid>-<random>/     a folder being written     (atomic_dir)
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from .errors import CdkitError

TMP_MARK = ".tmp-"


class DiskFullError(CdkitError, OSError):
    "No space left on the device (or past the file size limit, EFBIG) while writing a named path"


def tmp_path(path: Path) -> Path:
    "Where a write of `path` goes before it is moved into place (found by `sweep_temps`)"
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(p: Path):
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tmp = tmp_path(path)
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
    if path.exists():
        old = path.with_name(f".{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}")
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


def sweep_temps(folder, recursive=False) -> list:
    """Remove the temp files and folders that a killed or failed write left in `folder` (those of
    processes that are no longer running); returns what was removed"""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in (folder.rglob(f".*{TMP_MARK}*") if recursive else folder.glob(f".*{TMP_MARK}*")):
        owner = p.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if owner.isdigit() and process_alive(int(owner)):
            continue
        _remove(p)
        removed.append(p)
    return removed


class FolderBusyError(CdkitError, RuntimeError):
    "Another process holds the lock of a run or work folder"


_HELD: dict = {}


@contextlib.contextmanager
def folder_lock(folder, what="run folder"):
    """Hold `folder`/.lock for the duration of the block; a second process gets FolderBusyError
    naming the PID that holds it (filelock: the lock goes with the process, also after kill -9)"""
    from filelock import FileLock, Timeout
    folder = Path(folder).resolve()
    if folder in _HELD:  # this process holds it already (a step inside a pipeline): nest
        _HELD[folder] += 1
        try:
            yield folder
        finally:
            _HELD[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    pid_file = folder / ".lock.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.exists() else "another process"
        raise FolderBusyError(f"{what} {folder} is in use by PID {holder}; wait for it or use another name") from None
    _HELD[folder] = 1
    try:
        pid_file.write_text(str(os.getpid()))
        yield folder
    finally:
        del _HELD[folder]
        with contextlib.suppress(OSError):
            pid_file.unlink()
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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INCOMPLETE).write_text(f"{what} started by PID {os.getpid()} and not finished\n")


def mark_complete(folder):
    "Remove the marker: the last step of a writer that finished"
    with contextlib.suppress(FileNotFoundError):
        (Path(folder) / INCOMPLETE).unlink()


def check_complete(folder):
    "Raise IncompleteFolderError naming the folder when its writer did not finish"
    marker = Path(folder) / INCOMPLETE
    if marker.exists():
        raise IncompleteFolderError(f"{folder} is incomplete: {marker.read_text().strip()}. Delete the folder and "
                                    "write it again (e.g. `python -m cdkit synth ...`)")
    return Path(folder)
