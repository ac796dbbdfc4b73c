"""Prediction store: compact per-picture top-k probabilities, streamed to disk.

A store is a folder::

    STORE/manifest.json        n_classes, k, n_views, prob_dtype, chunk list, meta; written last
    STORE/chunk_00000.npz      product_id (n,) int64, img_idx (n,) int8, cls (n, views, k) uint16,
    STORE/chunk_00001.npz      prob (n, views, k) uint8|float16|float32, rest (n, views) float16|float32
    ...

Per picture and TTA view it keeps the k most probable classes (sorted by probability, descending),
their probabilities and ``rest``, the probability mass outside the top-k. Readers that need the
probability of a class outside the top-k spread ``rest`` uniformly over the ``n_classes - k`` other
classes (`spread`).

Quantization (``prob_dtype="uint8"``, the default) stores ``q = round(255 * sqrt(p))`` and reads back
``(q / 255) ** 2``. Square-root steps are fine near 0, where most top-k entries live, and coarse
near 1, where a small absolute error does not matter. Absolute error bound::

    |p - p_read| <= sqrt(p) / 255 + 1 / 260100     (<= 0.0039 at p = 1, <= 0.0004 at p = 0.01)

and any p < 3.8e-6 reads back as 0. ``rest`` is stored separately as float16 (relative error
<= 2**-11), not derived from the quantized top-k, so a near-certain prediction keeps a near-zero rest.
At k = 20: 20 * 2 (uint16 classes) + 20 * 1 (uint8) + 2 (rest) = 62 bytes per picture per view,
plus 9 bytes per picture (product_id, img_idx); see `nominal_bytes_per_view` and `bytes_per_view`.
``prob_dtype="float16"`` (82 bytes at k=20) and ``"float32"`` are the lossless-er options; with
``k = n_classes`` and ``"float32"`` a store holds the exact probabilities (exact mode, small data).

`StoreWriter` appends chunks to a temporary folder next to the target and moves it into place in
`close` with ``os.replace``; a writer that never closed leaves only that temporary folder, which
`load_store` refuses and the next writer beside it sweeps away. The manifest holds the sha256 of
each chunk file, checked at load: a damaged chunk, or one copied in from another store, is a
StoreError naming the store and the chunk (stores written before the checksums load unchecked);
the manifest carries the sha256 of its own body too (a flipped digit in `n_classes` is not a valid
store). `verify_store` checks every chunk without keeping the arrays: the freshness check of step 06
uses it, so a damaged store is rebuilt rather than reused. A writer may put `rebuild` into `meta` (the
step and command that write the store again): every damage message then ends with it.
NaN or infinite probabilities are refused when added, naming the first bad row's product.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cdkit.base.errors import CdkitError, shorten
from cdkit.base.io import DiskFullError, disk_full_as_error, makedirs, replace_dir, sweep_temps, temps_of, tmp_path

FORMAT = "cdkit-predstore"
VERSION = 1
PROB_DTYPES = ("uint8", "float16", "float32")
MANIFEST = "manifest.json"


class StoreError(CdkitError, ValueError):
    "A prediction store is missing, unfinished, corrupt, or incompatible with another"


def quantize(p, prob_dtype):
    "Probabilities in [0, 1] -> the stored representation"
    p = np.clip(np.asarray(p, np.float32), 0, 1)
    if prob_dtype == "uint8": return np.rint(np.sqrt(p) * 255).astype(np.uint8)
    return p.astype(prob_dtype)


def dequantize(q):
    "Stored representation -> float32 probabilities"
    if q.dtype == np.uint8: return np.square(q.astype(np.float32) / 255)
    return q.astype(np.float32)


def _rest_dtype(prob_dtype): return np.float32 if prob_dtype == "float32" else np.float16


def nominal_bytes_per_view(k, prob_dtype="uint8", n_views=1):
    "Bytes per picture per view of the stored arrays (before the few hundred bytes of file headers)"
    per_view = 2 * k + np.dtype(prob_dtype).itemsize * k + np.dtype(_rest_dtype(prob_dtype)).itemsize
    return per_view + (8 + 1) / n_views


def topk(probs, k):
    "(..., n_classes) probabilities -> cls (..., k) sorted by probability descending, prob, rest"
    if hasattr(probs, "detach"):  # a torch tensor: top-k where it lives (GPU), move only k columns
        import torch
        p = probs.detach().float()
        val, idx = torch.topk(p, k, dim=-1, sorted=True)
        rest = (p.sum(-1) - val.sum(-1)).clamp_min(0)
        return idx.cpu().numpy(), val.cpu().numpy(), rest.cpu().numpy()
    p = np.asarray(probs, np.float32)
    n_classes = p.shape[-1]
    if k == n_classes: idx = np.argsort(-p, axis=-1, kind="stable")
    else:
        idx = np.argpartition(-p, k - 1, axis=-1)[..., :k]
        val = np.take_along_axis(p, idx, -1)
        idx = np.take_along_axis(idx, np.argsort(-val, axis=-1, kind="stable"), -1)
    val = np.take_along_axis(p, idx, -1)
    rest = np.maximum(p.sum(-1, dtype=np.float64) - val.sum(-1, dtype=np.float64), 0)
    return idx, val, rest.astype(np.float32)


def spread(rest, n_classes, k):
    "Probability given to each class outside a row's top-k: its rest spread uniformly"
    rest = np.asarray(rest, np.float32)
    k = np.asarray(k)
    free = n_classes - k
    return np.where(free > 0, rest / np.maximum(free, 1), 0).astype(np.float32)


def picture_key(product_id, img_idx):
    "(n,) int64 key of each picture, unique in a data set: product_id * 256 + img_idx (a product has <= 255 pictures here)"
    return np.asarray(product_id, np.int64) * 256 + (np.asarray(img_idx).astype(np.int64) & 0xFF)


def shard_rows(n, shard, num_shards):
    "The contiguous `range` of rows that shard `shard` of `num_shards` handles out of `n` rows"
    for name, v in (("n", n), ("shard", shard), ("num_shards", num_shards)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n < 0: raise ValueError(f"n must be >= 0, got {n}")
    if num_shards < 1: raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in 0..{num_shards - 1} (num_shards={num_shards}), got {shard}")
    return range(shard * n // num_shards, (shard + 1) * n // num_shards)


@dataclass
class PredStore:
    "Top-k predictions per picture and view (see the module docstring); `prob` is dequantized float32"
    product_id: np.ndarray  # (n,) int64
    img_idx: np.ndarray     # (n,) int8, position of the picture in its product
    cls: np.ndarray         # (n, views, k) uint16, sorted by probability descending
    prob: np.ndarray        # (n, views, k) float32
    rest: np.ndarray        # (n, views) float32, mass outside the top-k
    n_classes: int
    meta: dict = field(default_factory=dict)
    prob_dtype: str = "float32"
    path: Path | None = None

    @property
    def k(self): return self.cls.shape[2]
    @property
    def n_views(self): return self.cls.shape[1]
    def __len__(self): return len(self.product_id)

    def spread(self):
        "(n, views) probability of each class outside the top-k"
        return spread(self.rest, self.n_classes, self.k)

    def dense(self, view=None):
        "Full (n, n_classes) probabilities of one view, or the mean over views when `view` is None"
        views = range(self.n_views) if view is None else [view]
        out = np.zeros((len(self), self.n_classes), np.float32)
        rows = np.arange(len(self))[:, None]
        for v in views:
            d = np.repeat(self.spread()[:, v, None], self.n_classes, axis=1)
            d[rows, self.cls[:, v].astype(np.int64)] = self.prob[:, v]
            out += d
        return out / len(views)

    def keys(self):
        "(n,) int64 key of each picture (`picture_key`)"
        return picture_key(self.product_id, self.img_idx)


class StoreWriter:
    "Stream (batch, n_views, n_classes) probabilities into a compact top-k store at `path`"
    def __init__(self, path, n_classes, k, n_views=1, prob_dtype="uint8", meta=None,
                 chunk_rows=65536, overwrite=False):
        if prob_dtype not in PROB_DTYPES: raise ValueError(f"prob_dtype must be one of {PROB_DTYPES}, got {prob_dtype!r}")
        if not 1 <= k <= n_classes: raise ValueError(f"k must be in 1..n_classes={n_classes}, got {k}")
        if n_classes > 65536: raise ValueError(f"classes are stored as uint16: n_classes={n_classes} > 65536")
        self.path, self.n_classes, self.k, self.n_views = Path(path), int(n_classes), int(k), int(n_views)
        self.prob_dtype, self.meta, self.chunk_rows, self.overwrite = prob_dtype, dict(meta or {}), chunk_rows, overwrite
        if self.path.exists() and not overwrite: raise StoreError(f"{self.path} exists (pass overwrite=True to replace it)")
        makedirs(self.path.parent)
        sweep_temps(self.path.parent)  # stores whose writers were killed
        self.tmp = tmp_path(self.path)
        self.tmp.mkdir()
        self.chunks, self.buf, self.n_buf, self.n_rows, self.closed = [], [], 0, 0, False
        self.tmp.joinpath("WRITING").write_text("close() has not run: this is not a complete store\n")

    def add(self, product_id, img_idx, probs):
        "Append a batch: product_id (b,), img_idx (b,), probs (b, n_views, n_classes) numpy or torch"
        if self.closed: raise StoreError("add() after close()")
        shape = tuple(probs.shape)
        if len(shape) == 2 and self.n_views == 1: probs, shape = probs[:, None], (shape[0], 1, shape[1])
        if len(shape) != 3 or shape[1:] != (self.n_views, self.n_classes):
            raise ValueError(f"probs must be (batch, n_views={self.n_views}, n_classes={self.n_classes}), got {shape}")
        pid, img = np.asarray(_cpu(product_id), np.int64).reshape(-1), np.asarray(_cpu(img_idx)).reshape(-1)
        if len(pid) != shape[0] or len(img) != shape[0]:
            raise ValueError(f"product_id ({len(pid)}), img_idx ({len(img)}) and probs ({shape[0]}) lengths differ")
        self._refuse_non_finite(probs, pid, "probabilities")
        cls, val, rest = topk(probs, self.k)
        self.buf.append(dict(product_id=pid, img_idx=img.astype(np.int8), cls=cls.astype(np.uint16),
                             prob=quantize(val, self.prob_dtype), rest=rest.astype(_rest_dtype(self.prob_dtype))))
        self.n_buf += shape[0]
        if self.n_buf >= self.chunk_rows: self.flush()

    def add_topk(self, product_id, img_idx, cls, prob, rest):
        "Append rows that are already top-k (cls, prob (b, views, k) sorted descending, rest (b, views))"
        if self.closed: raise StoreError("add_topk() after close()")
        cls = np.asarray(cls)
        if cls.shape[1:] != (self.n_views, self.k):
            raise ValueError(f"cls must be (batch, {self.n_views}, {self.k}), got {cls.shape}")
        q = np.asarray(prob)
        pid = np.asarray(product_id, np.int64).reshape(-1)
        self._refuse_non_finite(q, pid, "probabilities")
        self._refuse_non_finite(np.asarray(rest), pid, "rest")
        if q.dtype != np.dtype(self.prob_dtype): q = quantize(q, self.prob_dtype)
        self.buf.append(dict(product_id=np.asarray(product_id, np.int64), img_idx=np.asarray(img_idx).astype(np.int8),
                             cls=cls.astype(np.uint16), prob=q, rest=np.asarray(rest).astype(_rest_dtype(self.prob_dtype))))
        self.n_buf += len(cls)
        if self.n_buf >= self.chunk_rows: self.flush()

    def _refuse_non_finite(self, values, product_id, what):
        "StoreError naming the store and the first row's product when `values` (b, ...) hold NaN or inf"
        if hasattr(values, "detach"):
            import torch
            bad = ~torch.isfinite(values.detach()).reshape(len(values), -1).all(1)
            if not bool(bad.any()): return
            row = int(bad.nonzero()[0, 0])
        else:
            if not np.issubdtype(values.dtype, np.floating): return
            bad = ~np.isfinite(values).reshape(len(values), -1).all(1)
            if not bad.any(): return
            row = int(np.flatnonzero(bad)[0])
        raise StoreError(f"{self.path}: {what} of {int(bad.sum())} row(s) are NaN or infinite, first at row {row} "
                         f"(product_id {int(product_id[row])}); nothing of this batch was stored")

    def flush(self):
        "Write the buffered rows as one chunk file (its sha256 goes into the manifest)"
        if not self.buf: return
        arrays = {key: np.concatenate([b[key] for b in self.buf]) for key in self.buf[0]}
        name = f"chunk_{len(self.chunks):05d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        try:
            with disk_full_as_error(self.path), open(self.tmp / name, "wb") as f: f.write(data)
        except DiskFullError:
            self.abort()  # the space the partial store holds goes back at once
            raise
        self.chunks.append(dict(file=name, rows=self.n_buf, sha256=hashlib.sha256(data).hexdigest()))
        self.n_rows += self.n_buf
        self.buf, self.n_buf = [], 0

    def close(self):
        "Write the last chunk and the manifest, then move the store into place atomically"
        if self.closed: return self.path
        self.flush()
        manifest = dict(format=FORMAT, version=VERSION, n_classes=self.n_classes, k=self.k, n_views=self.n_views,
                        prob_dtype=self.prob_dtype, n_rows=self.n_rows, chunks=self.chunks, meta=self.meta)
        manifest = json.loads(json.dumps(manifest, default=_json_default))  # meta as it will read back
        manifest["sha256"] = _manifest_digest(manifest)
        with disk_full_as_error(self.path), open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush(); os.fsync(f.fileno())
        self.tmp.joinpath("WRITING").unlink()
        if self.path.exists() and not self.overwrite:
            raise StoreError(f"{self.path} exists (pass overwrite=True to replace it)")
        replace_dir(self.tmp, self.path)
        self.closed = True
        return self.path

    def abort(self):
        "Drop everything written so far"
        self.closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, exc_type, *_):
        if exc_type is None: self.close()
        else: self.abort()


def _cpu(x): return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _json_default(o):
    if isinstance(o, np.generic): return o.item()
    if isinstance(o, (Path, np.ndarray)): return str(o) if isinstance(o, Path) else o.tolist()
    raise TypeError(f"meta value {o!r} is not JSON serializable")


def _manifest_digest(manifest) -> str:
    "sha256 of a manifest's content without its own checksum (key order and spacing do not count)"
    body = {key: v for key, v in manifest.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rebuild_hint(manifest) -> str:
    hint = manifest.get("meta", {}).get("rebuild") if isinstance(manifest.get("meta"), dict) else None
    return f"; {hint} writes it again" if hint else "; run the step that wrote it again"


def load_manifest(path, error, absent: str):
    """The JSON value of the manifest.json of a store folder (a prediction store, a feature store): `error`
    with the message `absent` when there is none, `error` naming the file when it is not JSON"""
    mf = Path(path) / MANIFEST
    if not mf.exists():
        raise error(absent)
    try:
        return json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{mf} is corrupt (not JSON: {e})") from None


def read_manifest(path):
    "The manifest of a complete store; StoreError saying why otherwise"
    path = Path(path)
    if not path.exists():
        tmps = temps_of(path)
        hint = f"; an unfinished store exists at {tmps[0]} (its writer's close() never ran)" if tmps else ""
        raise StoreError(f"no prediction store at {path}{hint}")
    mf = path / MANIFEST
    manifest = load_manifest(path, StoreError, f"{path} is not a complete prediction store: no {MANIFEST} (its "
                             "writer's close() never ran)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{mf} is not a {FORMAT} manifest")
    if "sha256" in manifest and manifest["sha256"] != _manifest_digest(manifest):
        raise StoreError(f"{mf} does not match its own checksum (damaged){_rebuild_hint(manifest)}")
    if manifest.get("version") != VERSION: raise StoreError(f"{mf}: unsupported version {manifest.get('version')}")
    missing = [key for key in ("n_classes", "k", "n_views", "prob_dtype", "n_rows", "chunks", "meta") if key not in manifest]
    if missing: raise StoreError(f"{mf} is corrupt: no {', '.join(missing)}")
    if manifest["prob_dtype"] not in PROB_DTYPES: raise StoreError(f"{mf}: unknown prob_dtype {manifest['prob_dtype']!r}")
    for c in manifest["chunks"]:
        if not isinstance(c, dict) or "file" not in c or "rows" not in c:
            raise StoreError(f"{mf} is corrupt: chunk entry {c!r}")
        if not (path / c["file"]).exists():
            raise StoreError(f"{path}: chunk {c['file']} is missing{_rebuild_hint(manifest)}")
    if not isinstance(manifest["meta"], dict): raise StoreError(f"{mf} is corrupt: meta is not a mapping")
    if sum(int(c["rows"]) for c in manifest["chunks"]) != manifest["n_rows"]:
        raise StoreError(f"{mf} is corrupt: its chunks' rows do not add up to n_rows{_rebuild_hint(manifest)}")
    return manifest


_CHUNK_ARRAYS = {"product_id": 1, "img_idx": 1, "cls": 3, "prob": 3, "rest": 2}  # name: ndim


def _read_chunk(path, c, views, k, hint=""):
    "The arrays of one chunk, checked against the manifest entry `c` (checksum, rows, shapes)"
    where = f"{path}: chunk {c['file']}"
    data = (path / c["file"]).read_bytes()
    if "sha256" in c and hashlib.sha256(data).hexdigest() != c["sha256"]:
        raise StoreError(f"{where} does not match the checksum in the manifest (damaged, or copied in from "
                         f"another store){hint}")
    try:
        with np.load(io.BytesIO(data)) as z:
            arrays = {key: z[key] for key in _CHUNK_ARRAYS}
    except (zipfile.BadZipFile, zlib.error, ValueError, KeyError, OSError, EOFError) as e:
        raise StoreError(f"{where} is unreadable ({type(e).__name__}: {shorten(str(e))}){hint}") from None
    n = len(arrays["product_id"])
    if n != c["rows"]: raise StoreError(f"{where}: row count differs from the manifest{hint}")
    for key, ndim in _CHUNK_ARRAYS.items():
        a = arrays[key]
        want = (n, views, k)[:ndim]
        if a.shape != want: raise StoreError(f"{where}: {key} has shape {a.shape}, the manifest says {want}{hint}")
    return arrays


def verify_store(path):
    """The manifest of a complete store whose every chunk matches its checksum, rows and shapes;
    StoreError naming the store, the chunk and the step that rebuilds it otherwise"""
    path = Path(path)
    manifest = read_manifest(path)
    for c in manifest["chunks"]:
        _read_chunk(path, c, manifest["n_views"], manifest["k"], _rebuild_hint(manifest))
    return manifest


def _load_raw(path):
    "Manifest and the stored (still quantized) arrays, concatenated over chunks"
    path = Path(path)
    manifest = read_manifest(path)
    k, views, rdt = manifest["k"], manifest["n_views"], _rest_dtype(manifest["prob_dtype"])
    empty = dict(product_id=np.zeros(0, np.int64), img_idx=np.zeros(0, np.int8), cls=np.zeros((0, views, k), np.uint16),
                 prob=np.zeros((0, views, k), manifest["prob_dtype"]), rest=np.zeros((0, views), rdt))
    parts = {key: [v] for key, v in empty.items()}
    for c in manifest["chunks"]:
        arrays = _read_chunk(path, c, views, k, _rebuild_hint(manifest))
        for key in parts: parts[key].append(arrays[key])
    return manifest, {key: np.concatenate(v) for key, v in parts.items()}


def load_store(path) -> PredStore:
    "Load a complete store written by `StoreWriter` or `merge_stores`"
    manifest, a = _load_raw(path)
    return PredStore(product_id=a["product_id"], img_idx=a["img_idx"], cls=a["cls"], prob=dequantize(a["prob"]),
                     rest=a["rest"].astype(np.float32), n_classes=manifest["n_classes"], meta=manifest["meta"],
                     prob_dtype=manifest["prob_dtype"], path=Path(path))


def bytes_per_view(path):
    "Bytes on disk (chunk files and manifest) per picture per view of the store at `path`"
    manifest = read_manifest(path)
    size = sum((Path(path) / c["file"]).stat().st_size for c in manifest["chunks"]) + (Path(path) / MANIFEST).stat().st_size
    return size / max(manifest["n_rows"] * manifest["n_views"], 1)


def save_store(store: PredStore, path, prob_dtype=None, overwrite=False, chunk_rows=65536):
    "Write an in-memory `PredStore` (e.g. an ensemble) to `path`; quantizes to `prob_dtype` (default: the store's)"
    prob_dtype = prob_dtype or store.prob_dtype
    w = StoreWriter(path, store.n_classes, store.k, store.n_views, prob_dtype, store.meta, chunk_rows, overwrite)
    try:
        for a in range(0, max(len(store), 1), chunk_rows):
            s = slice(a, a + chunk_rows)
            w.add_topk(store.product_id[s], store.img_idx[s], store.cls[s], store.prob[s], store.rest[s])
        return w.close()
    except BaseException:
        w.abort(); raise


def merge_stores(paths, out, overwrite=False, meta=None):
    """Concatenate shard stores (in the given order) into one store at `out`, without requantizing;
    `meta` updates the first shard's meta in the merged store"""
    paths = [Path(p) for p in paths]
    if not paths: raise ValueError("merge_stores needs at least one store")
    loaded = [_load_raw(p) for p in paths]
    m0 = loaded[0][0]
    for p, (m, _) in zip(paths[1:], loaded[1:]):
        for key in ("n_classes", "k", "n_views", "prob_dtype"):
            if m[key] != m0[key]: raise StoreError(f"cannot merge {p} with {paths[0]}: {key} {m[key]} != {m0[key]}")
    pid = np.concatenate([a["product_id"] for _, a in loaded])
    img = np.concatenate([a["img_idx"] for _, a in loaded])
    key = np.sort(picture_key(pid, img))
    dup = key[1:][key[1:] == key[:-1]]
    if len(dup):
        ex = ", ".join(f"product_id {d // 256} img_idx {d % 256}" for d in np.unique(dup)[:5])
        raise StoreError(f"{len(np.unique(dup))} picture(s) appear in more than one shard, e.g. {ex}")
    meta = dict(m0["meta"], **(meta or {}), merged_from=[str(p) for p in paths])
    w = StoreWriter(out, m0["n_classes"], m0["k"], m0["n_views"], m0["prob_dtype"], meta, overwrite=overwrite)
    try:
        for _, a in loaded:
            if len(a["product_id"]): w.add_topk(a["product_id"], a["img_idx"], a["cls"], a["prob"], a["rest"])
            w.flush()
        return w.close()
    except BaseException:
        w.abort(); raise


def align_stores(stores):
    "Row permutation of each store that puts its pictures in the order of stores[0]; error if they differ"
    keys0 = stores[0].keys()
    o0 = np.argsort(keys0, kind="stable")
    if np.any(keys0[o0][1:] == keys0[o0][:-1]): raise ValueError("stores[0] has a picture twice")
    perms = []
    for i, s in enumerate(stores):
        if s.n_classes != stores[0].n_classes: raise ValueError(f"store {i}: n_classes {s.n_classes} != {stores[0].n_classes}")
        keys = s.keys()
        oi = np.argsort(keys, kind="stable")
        if len(keys) != len(keys0) or np.any(keys[oi] != keys0[o0]):
            extra, missing = np.setdiff1d(keys, keys0), np.setdiff1d(keys0, keys)
            ex = [(int(x // 256), int(x % 256)) for x in np.concatenate([extra, missing])[:3]]
            raise ValueError(f"store {i} does not cover the same pictures as store 0: {len(extra)} extra, "
                             f"{len(missing)} missing, e.g. (product_id, img_idx) {ex}")
        perm = np.empty(len(keys), np.int64)
        perm[o0] = oi
        perms.append(perm)
    return perms


def take_rows(store, rows):
    "The rows `rows` (boolean mask or positions) of a store, as a PredStore"
    return PredStore(store.product_id[rows], store.img_idx[rows], store.cls[rows], store.prob[rows], store.rest[rows],
                     store.n_classes, dict(store.meta or {}), store.prob_dtype, store.path)
