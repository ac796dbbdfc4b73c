"""Writes killed midway leave orphans that the next start sweeps (index, prediction stores, checkpoints), and
a full disk (a file size limit standing in for it) is an error naming the path (cdkit.base.io and its writers)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cdkit.data.bsonfile import (
    build_index,
)

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, env=None, check=False):
    "Run `code` in a fresh interpreter at the repository root; (returncode, stdout + stderr)"
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=300)
    if check: assert p.returncode == 0, p.stdout + p.stderr
    return p.returncode, p.stdout + p.stderr


# --- orphans swept at the next start; a full disk named as such ----------------------------------

def killed_while_writing(path):
    "Leave what a process killed inside atomic_write of `path` leaves (its temp file)"
    code, text = run_python(f"""
        import os, signal
        from cdkit.base.io import atomic_write
        def write(tmp):
            open(tmp, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(path)!r}, write)
    """)
    assert code == -signal.SIGKILL, text
    left = [p for p in Path(path).parent.iterdir() if p.name.startswith(".cdkit-tmp-") and p.name.endswith(f"-{Path(path).name}")]
    assert len(left) == 1
    return left[0]


def test_index_build_sweeps_temps_of_killed_writes(tmp_path, tiny_data):
    out = tmp_path / "idx" / "train_index.parquet"
    left = killed_while_writing(out)
    build_index(tiny_data / "train.bson", out=out)
    assert not left.exists() and out.exists()


def test_store_writer_sweeps_stores_of_killed_writers(tmp_path):
    from cdkit.infer.store import StoreWriter, load_store
    code, text = run_python(f"""
        import os, signal, numpy as np
        from cdkit.infer.store import StoreWriter
        w = StoreWriter({str(tmp_path / "a.store")!r}, n_classes=5, k=2, chunk_rows=4)
        w.add(np.arange(8), np.zeros(8), np.full((8, 1, 5), 0.2))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert code == -signal.SIGKILL, text
    assert [(p.name[:11], p.name[-8:]) for p in tmp_path.iterdir()] == [(".cdkit-tmp-", "-a.store")]
    with StoreWriter(tmp_path / "b.store", n_classes=5, k=2) as w:
        w.add(np.arange(3), np.zeros(3), np.full((3, 5), 0.2))
    assert [p.name for p in tmp_path.iterdir()] == ["b.store"] and len(load_store(tmp_path / "b.store")) == 3


def test_checkpoint_sweeps_temps_of_killed_writes(tmp_path):
    from test_callbacks import tiny_dls, tiny_learner

    from cdkit.train.callbacks import Checkpoint
    path = tmp_path / "checkpoints" / "last.pth"
    left = killed_while_writing(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    older = path.with_name(f"last.pth.tmp{int(dead.stdout)}")  # how earlier versions named theirs
    older.write_bytes(b"half")
    learn = tiny_learner(tiny_dls(), [Checkpoint(path)])
    learn.fit(1, 0.1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]
    assert not left.exists()


def test_full_disk_during_checkpoint_is_named(tmp_path):
    "RLIMIT_FSIZE makes writes past the limit fail (EFBIG) as a full disk does; torch says `unexpected pos`"
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no file size limit on this system")
    path = tmp_path / "ck" / "last.pth"
    code, text = run_python(f"""
        import resource, signal, sys
        sys.path.insert(0, "tests")
        from test_callbacks import tiny_dls, tiny_learner
        from cdkit.train.callbacks import save_checkpoint
        from cdkit.base.io import DiskFullError, atomic_write
        learn = tiny_learner(tiny_dls())
        learn.create_opt()
        learn.train_iter = 0  # as after an epoch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        for what, write in (("checkpoint", lambda: save_checkpoint(learn, {str(path)!r}, 1)),
                            ("text", lambda: atomic_write({str(path.with_name("big.txt"))!r},
                                                          lambda tmp: open(tmp, "w").write("x" * 10000)))):
            try:
                write()
                print(what, "written")
            except DiskFullError as e:
                print(what, "DiskFullError:", e)
    """, env={"PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT)})
    assert code == 0, text
    assert f"checkpoint DiskFullError: [Errno 28] no space left on device while writing {path}" in text
    assert "text DiskFullError: [Errno 28] no space left on device while writing" in text
    assert not list(path.parent.iterdir())  # no temp file left behind
