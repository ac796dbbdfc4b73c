"""Feature stores: the pooled backbone features of every picture, fp16, for the fusion head (step 06b).

Written by the prediction path itself (`cdkit.predict.predict_to_store(..., features_path=...)`): the
input of the model's last layer on the original view (the concatenated average and max pooling of
the backbone after the head's BatchNorm), captured in the same forward pass that predicts the
store, so features and predictions can never come from different models or pictures.

A store is a folder, written atomically (a crash leaves no half store):

    <name>.features/
        features.npy       (n, d) float16, a NumPy file read memory-mapped (3.1 M test pictures x
                           4,096 ResNet-101 features are 25 GB: they are never loaded at once)
        pictures.parquet   product_id, img_idx of each row
        manifest.json      n, d, dtype and the writer's meta (the freshness stamp of step 06)

Shards are folders of their own, joined in shard order by `merge_features`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_dir, makedirs, sweep_temps

DTYPE = np.float16


class FeatureStoreError(Exception):
    "A feature store that is missing, incomplete or does not match what reads it"


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


class FeatureWriter:
    "Fill a feature store of `n` rows batch by batch; `close()` publishes it, `abort()` drops it"

    def __init__(self, path, n, d, meta=None, overwrite=False):
        self.path, self.n, self.d, self.meta = Path(path), int(n), int(d), dict(meta or {})
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists (pass overwrite=True to replace it)")
        makedirs(self.path.parent)
        sweep_temps(self.path.parent)
        self._ctx = atomic_dir(self.path, overwrite=True)
        self.tmp = self._ctx.__enter__()
        self.x = np.lib.format.open_memmap(self.tmp / "features.npy", mode="w+", dtype=DTYPE, shape=(self.n, self.d))
        self.pid = np.zeros(self.n, np.int64)
        self.img = np.zeros(self.n, np.int16)
        self.done = 0

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
        s = slice(self.done, self.done + b)
        self.x[s] = np.clip(f, -65000, 65000).astype(DTYPE)
        self.pid[s], self.img[s] = np.asarray(product_id, np.int64), np.asarray(img_idx, np.int16)
        self.done += b

    def close(self) -> Path:
        if self.done != self.n:
            self.abort()
            raise FeatureStoreError(f"{self.path}: {self.done} of {self.n} rows written")
        self.x.flush()
        del self.x
        pd.DataFrame({"product_id": self.pid, "img_idx": self.img}).to_parquet(self.tmp / "pictures.parquet", index=False)
        (self.tmp / "manifest.json").write_text(json.dumps(dict(n=self.n, d=self.d, dtype="float16", meta=self.meta),
                                                           indent=1, default=str))
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self):
        if hasattr(self, "x"): del self.x
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def read_manifest(path) -> dict:
    p = Path(path) / "manifest.json"
    if not p.exists():
        raise FeatureStoreError(f"{path} is not a complete feature store (no manifest.json)")
    return json.loads(p.read_text())


def load_features(path, mmap=True) -> FeatureStore:
    "The feature store at `path`, features memory-mapped (mmap=False: read into memory)"
    path = Path(path)
    man = read_manifest(path)
    x = np.load(path / "features.npy", mmap_mode="r" if mmap else None)
    pics = pd.read_parquet(path / "pictures.parquet")
    if x.shape != (man["n"], man["d"]) or len(pics) != man["n"]:
        raise FeatureStoreError(f"{path}: features {x.shape} / {len(pics)} pictures disagree with the manifest "
                                f"({man['n']} x {man['d']})")
    return FeatureStore(pics["product_id"].to_numpy(np.int64), pics["img_idx"].to_numpy(np.int16), x,
                        man.get("meta", {}), path)


def features_current(path, stamp) -> bool:
    "A complete feature store exists and was written with `stamp`"
    try:
        return read_manifest(path).get("meta", {}).get("stamp") == stamp
    except (FeatureStoreError, OSError, ValueError):
        return False


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
