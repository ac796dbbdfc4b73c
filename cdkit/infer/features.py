"""Feature stores: the pooled backbone features of every picture, fp16, for the fusion head (step 06b).

Written by the prediction path itself (`cdkit.infer.predict.predict_to_store(..., features_path=...)`): the
input of the model's last layer on the original view (the concatenated average and max pooling of
the backbone after the head's BatchNorm), captured in the same forward pass that predicts the
store, so features and predictions can never come from different models or pictures.

A store is a folder, written atomically (a crash leaves no half store):

    <name>.features/
        features.npy       (n, d) float16, a NumPy file read memory-mapped (3.1 M test pictures x
                           4,096 ResNet-101 features are 25 GB: they are never loaded at once)
        pictures.parquet   product_id, img_idx of each row
        manifest.json      n, d, dtype, the sha256 of both files and the writer's meta (the freshness
                           stamp of step 06, the generation, the step that rebuilds the store)

The writer writes features.npy with ordinary writes, rows in order, after reserving the whole file
with `os.posix_fallocate`: a full disk is a `DiskFullError` naming the store (before any row is
written where the file system can reserve), never the SIGBUS that a memory-mapped write gets when a
page cannot be backed. Every reader checks both files against their checksums (`verify_features`):
a damaged or truncated store names itself and the step that writes it again.

Shards are folders of their own, joined in shard order by `merge_features`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cdkit.base.errors import CdkitError
from cdkit.base.io import DiskFullError, disk_full_as_error, file_sha256, makedirs, replace_dir, sweep_temps, tmp_path

DTYPE = np.float16
FILES = ("features.npy", "pictures.parquet")


class FeatureStoreError(CdkitError, ValueError):
    "A feature store that is missing, incomplete, damaged or does not match what reads it"


@dataclass
class FeatureStore:
    "Features of one split's pictures: `x` (n, d) float16, memory-mapped"
    product_id: np.ndarray                # (n,) int64
    img_idx: np.ndarray                   # (n,) int16
    x: np.ndarray                         # (n, d) float16 memmap
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def d(self) -> int: return self.x.shape[1]

    def __len__(self): return len(self.product_id)


def _reserve(fd, size, path):
    "Reserve `size` bytes of the file: ENOSPC here, before any row is written, instead of later"
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot reserve
            return
        raise


class FeatureWriter:
    "Fill a feature store of `n` rows batch by batch; `close()` publishes it, `abort()` drops it"

    def __init__(self, path, n, d, meta=None, overwrite=False):
        self.path, self.n, self.d, self.meta = Path(path), int(n), int(d), dict(meta or {})
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (pass overwrite=True to replace it)")
        makedirs(self.path.parent)
        sweep_temps(self.path.parent)
        self.tmp = tmp_path(self.path)
        self.tmp.mkdir()
        self.pid = np.zeros(self.n, np.int64)
        self.img = np.zeros(self.n, np.int16)
        self.done, self.f, self.sha = 0, None, hashlib.sha256()
        try:
            with disk_full_as_error(self.path):
                self.f = open(self.tmp / "features.npy", "wb")
                header = _npy_header(self.n, self.d)
                _reserve(self.f.fileno(), len(header) + self.n * self.d * np.dtype(DTYPE).itemsize, self.path)
                self._write(header)
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes):
        self.f.write(data)
        self.sha.update(data)

    def add(self, product_id, img_idx, feats):
        "Append a batch: feats (b, d) tensor or array (non-finite values refused, naming the product)"
        f = feats.detach().float().cpu().numpy() if hasattr(feats, "detach") else np.asarray(feats, np.float32)
        b = len(f)
        if f.ndim != 2 or f.shape[1] != self.d:
            raise FeatureStoreError(f"{self.path}: features of shape {f.shape}, expected (b, {self.d})")
        if self.done + b > self.n:
            raise FeatureStoreError(f"{self.path}: more than the {self.n} rows announced")
        bad = ~np.isfinite(f).all(1)
        if bad.any():
            raise FeatureStoreError(f"{self.path}: non-finite features for product {int(np.asarray(product_id)[bad][0])}")
        try:
            with disk_full_as_error(self.path):
                self._write(np.ascontiguousarray(np.clip(f, -65000, 65000).astype(DTYPE)).tobytes())
        except DiskFullError:
            self.abort()  # the space the partial file holds goes back at once
            raise
        s = slice(self.done, self.done + b)
        self.pid[s], self.img[s] = np.asarray(product_id, np.int64), np.asarray(img_idx, np.int16)
        self.done += b

    def close(self) -> Path:
        if self.done != self.n:
            self.abort()
            raise FeatureStoreError(f"{self.path}: {self.done} of {self.n} rows written")
        try:
            with disk_full_as_error(self.path):
                self.f.flush()
                os.fsync(self.f.fileno())
                self.f.close()
                pics = self.tmp / "pictures.parquet"
                pd.DataFrame({"product_id": self.pid, "img_idx": self.img}).to_parquet(pics, index=False)
                sums = {"features.npy": self.sha.hexdigest(), "pictures.parquet": file_sha256(pics)}
                (self.tmp / "manifest.json").write_text(json.dumps(dict(n=self.n, d=self.d, dtype="float16",
                                                                        sha256=sums, meta=self.meta),
                                                                   indent=1, default=str))
                replace_dir(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self):
        import shutil
        if self.f is not None and not self.f.closed:
            self.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _npy_header(n, d) -> bytes:
    "The NumPy file header of an (n, d) float16 array"
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, dict(descr=np.lib.format.dtype_to_descr(np.dtype(DTYPE)),
                                                   fortran_order=False, shape=(n, d)))
    return buf.getvalue()


def _rebuild_hint(man) -> str:
    hint = man.get("meta", {}).get("rebuild") if isinstance(man.get("meta"), dict) else None
    return f"; {hint} writes it again" if hint else "; run the step that wrote it again"


def read_manifest(path) -> dict:
    "The manifest of a complete feature store; FeatureStoreError saying why otherwise"
    from cdkit.infer.store import MANIFEST, load_manifest
    man = load_manifest(path, FeatureStoreError, f"{path} is not a complete feature store (no {MANIFEST})")
    if not isinstance(man, dict) or not all(k in man for k in ("n", "d")):
        raise FeatureStoreError(f"{Path(path) / MANIFEST} is not a feature store manifest")
    return man


def verify_features(path) -> dict:
    """The manifest of a feature store whose files match their checksums; FeatureStoreError naming the file
    and the step that writes it again otherwise (stores written before the checksums are checked by size)"""
    path = Path(path)
    man = read_manifest(path)
    for name in FILES:
        if not (path / name).exists():
            raise FeatureStoreError(f"{path / name} is missing{_rebuild_hint(man)}")
    want = man.get("sha256") or {}
    for name in FILES:
        if name in want and file_sha256(path / name) != want[name]:
            raise FeatureStoreError(f"{path / name} does not match the checksum in its manifest (damaged or "
                                    f"truncated){_rebuild_hint(man)}")
    return man


def load_features(path, mmap=True) -> FeatureStore:
    "The feature store at `path` (checked against its checksums), features memory-mapped (mmap=False: read into memory)"
    path = Path(path)
    man = verify_features(path)
    try:
        x = np.load(path / "features.npy", mmap_mode="r" if mmap else None)
        pics = pd.read_parquet(path / "pictures.parquet")
    except (ValueError, OSError, EOFError) as e:
        raise FeatureStoreError(f"{path} is unreadable ({type(e).__name__}: {e}){_rebuild_hint(man)}") from None
    if x.shape != (man["n"], man["d"]) or len(pics) != man["n"]:
        raise FeatureStoreError(f"{path}: features {x.shape} / {len(pics)} pictures disagree with the manifest "
                                f"({man['n']} x {man['d']}){_rebuild_hint(man)}")
    return FeatureStore(pics["product_id"].to_numpy(np.int64), pics["img_idx"].to_numpy(np.int16), x,
                        man.get("meta", {}), path)


def features_current(path, stamp, log=None) -> bool:
    "A complete feature store exists, was written with `stamp` and matches its checksums; `log` says why not"
    from cdkit.base.io import output_current
    return output_current(path, stamp, read_manifest, verify_features, (FeatureStoreError, OSError, ValueError),
                          "written", log)


def merge_features(paths, out, meta=None, overwrite=False, block=1 << 16) -> Path:
    "Join shard stores (in the given order) into one at `out`, a block of rows at a time"
    parts = [load_features(p) for p in paths]
    d = {f.d for f in parts}
    if len(d) != 1:
        raise FeatureStoreError(f"shards have different feature sizes {sorted(d)}: {[str(p) for p in paths]}")
    w = FeatureWriter(out, sum(len(f) for f in parts), d.pop(), meta=meta, overwrite=overwrite)
    try:
        for f in parts:
            for a in range(0, len(f), block):
                w.add(f.product_id[a:a + block], f.img_idx[a:a + block], np.asarray(f.x[a:a + block], np.float32))
        return w.close()
    except BaseException:
        w.abort()
        raise
