"""MD5 lookup: test pictures whose exact bytes occur in train take the labels of those train pictures.

Digests are (n, 16) uint8 rows. Lookups sort the train digests once and use searchsorted, viewing
each row as one 16-byte value (memcmp order), so no Python loop runs per picture except the hashing.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from cdkit.infer.topk import candidate_runs, row_spread, top_runs

_V16 = np.dtype((np.void, 16))
_LOG_FIRST = 10  # unsound pictures logged one by one
log = logging.getLogger(__name__)


def _as_void(hashes):
    h = np.ascontiguousarray(np.asarray(hashes, np.uint8))
    if h.ndim != 2 or h.shape[1] != 16: raise ValueError(f"hashes must be (n, 16) uint8, got {h.shape}")
    return h.view(_V16).ravel()


def hash_pictures(reader, image_table, return_bad=False, progress=None):
    """(n, 16) uint8 md5 digest of every picture of `image_table` (offset, length, img_idx), read with
    `reader`; each product document is read once, however many of its pictures follow each other.

    A picture whose structure is unsound (see `BsonReader.slots`), an empty one, or one that the
    product does not have never stops the hashing: it is counted, logged, and given a digest of its own file,
    offset and position, which matches no picture's. With `return_bad`, also the (n,) bool mask of them.
    `progress`: a bar per picture (None: from 200,000 pictures, in notebooks and on terminals; see cdkit.base.progress)."""
    from cdkit.data.bsonfile import BadPictureError
    out = np.empty((len(image_table), 16), np.uint8)
    bad = np.zeros(len(image_table), bool)
    last, pics, n_bad = None, None, 0
    read = getattr(reader, "slots", reader.pictures)  # slots: a BsonReader's, with the reason of each unsound picture
    cols = (np.asarray(image_table["offset"]), np.asarray(image_table["length"]), np.asarray(image_table["img_idx"]))
    from cdkit.base.progress import bar
    rows = bar(zip(*cols), total=len(out), desc=f"md5 {getattr(reader, 'path', '')}", unit="picture",
               progress=progress if progress is not None or len(out) >= 200_000 else False)
    for row, (o, n, i) in enumerate(rows):
        if o != last:
            last, pics = o, read(int(o), int(n))
        pic = pics[i] if 0 <= i < len(pics) else BadPictureError(
            f"{reader.path}: product at byte offset {o} has {len(pics)} pictures, no picture {i}")
        if not pic:  # an empty picture is no picture either: all of them would share one digest
            pic = BadPictureError(f"{reader.path}: product at byte offset {o}, picture {i}: 0 bytes")
        if not isinstance(pic, bytes):
            bad[row] = True
            n_bad += 1
            if n_bad <= _LOG_FIRST: log.warning("md5: %s; given a digest that matches nothing", pic)
            pic = f"cdkit: no picture {i} at byte offset {o} of {reader.path}".encode()
        out[row] = np.frombuffer(hashlib.md5(pic).digest(), np.uint8)
    if n_bad:
        log.warning("md5: %d unsound picture(s) in %s were counted and match nothing", n_bad, reader.path)
    return (out, bad) if return_bad else out


@dataclass
class Md5Table:
    "Label counts of each distinct train digest, as CSR: rows of `hashes` -> indptr -> (cls, count)"
    hashes: np.ndarray   # (U,) void16, sorted
    indptr: np.ndarray   # (U+1,)
    cls: np.ndarray      # (nnz,) int64, ascending within a digest
    count: np.ndarray    # (nnz,) int64
    n_classes: int

    def __len__(self): return len(self.hashes)


def md5_label_table(train_hashes, train_class, n_classes):
    "Label counts per distinct train digest"
    h, y = _as_void(train_hashes), np.asarray(train_class, np.int64)
    if len(h) != len(y): raise ValueError(f"{len(h)} hashes but {len(y)} classes")
    if len(y) and (y.min() < 0 or y.max() >= n_classes): raise ValueError(f"train_class must be in 0..{n_classes - 1}")
    uniq, inv = np.unique(h, return_inverse=True)
    pair, count = np.unique(inv.ravel() * n_classes + y, return_counts=True)
    row, cls = pair // n_classes, pair % n_classes
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(uniq)))])
    return Md5Table(uniq, indptr, cls, count, n_classes)


@dataclass
class Md5Match:
    "Per test picture: whether its digest is in train, and the normalized train label distribution"
    found: np.ndarray    # (n,) bool
    cls: np.ndarray      # (n, k) int64, most frequent first, -1 pads (all -1 when not found)
    prob: np.ndarray     # (n, k) float32, sums to 1 over a found row (within the k kept labels)
    n_train: np.ndarray  # (n,) train pictures with the same digest (0 when not found)


def md5_lookup(test_hashes, table: Md5Table, k=None):
    "Label distribution of each test picture's digest in `table`, or found=False (k: labels kept per row)"
    h = _as_void(test_hashes)
    n = len(h)
    pos = np.searchsorted(table.hashes, h)
    found = np.zeros(n, bool)
    inside = pos < len(table.hashes)
    found[inside] = table.hashes[pos[inside]] == h[inside]
    width = np.diff(table.indptr)
    k = int(width.max(initial=1)) if k is None else k
    rows = pos[found]
    cls, cnt = np.full((n, k), -1, np.int64), np.zeros((n, k), np.float64)
    if len(rows):
        w = width[rows]
        W = int(w.max())
        j = np.arange(W)
        idx = table.indptr[rows][:, None] + np.minimum(j, w[:, None] - 1)
        c = np.where(j < w[:, None], table.cls[idx], -1)
        q = np.where(j < w[:, None], table.count[idx], 0).astype(np.float64)
        order = np.argsort(-q, axis=1, kind="stable")[:, :k]
        cls[found, :min(k, W)], cnt[found, :min(k, W)] = np.take_along_axis(c, order, 1), np.take_along_axis(q, order, 1)
    total = np.zeros(n, np.int64)
    csum = np.concatenate([[0], np.cumsum(table.count)])
    total[found] = csum[table.indptr[rows + 1]] - csum[table.indptr[rows]]
    prob = np.divide(cnt, cnt.sum(1, keepdims=True), out=np.zeros_like(cnt), where=cnt.sum(1, keepdims=True) > 0)
    return Md5Match(found, cls, prob.astype(np.float32), total)


def apply_md5(cls, prob, rest, match: Md5Match, n_classes, alpha=1.0, min_count=1):
    """Blend prediction rows (top-k cls, prob (n, k), rest (n,)) with the md5 label distribution where
    a digest matched at least `min_count` train pictures: alpha * md5 + (1 - alpha) * prediction
    (alpha=1: override). Returns new cls, prob, rest with the same k; other rows are unchanged."""
    if not 0 <= alpha <= 1: raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    cls, prob = np.array(cls, copy=True), np.array(prob, np.float32, copy=True)
    rest = np.zeros(len(cls), np.float32) if rest is None else np.array(rest, np.float32, copy=True)
    sel = np.flatnonzero(match.found & (match.n_train >= min_count))
    if not len(sel): return cls, prob, rest
    k = cls.shape[1]
    width = max(k, match.cls.shape[1])
    c = np.full((len(sel), 2, width), -1, np.int64); q = np.zeros((len(sel), 2, width), np.float32)
    c[:, 0, :match.cls.shape[1]], q[:, 0, :match.prob.shape[1]] = match.cls[sel], match.prob[sel]
    c[:, 1, :k], q[:, 1, :k] = cls[sel], prob[sel]
    spr = np.stack([np.zeros(len(sel), np.float32), row_spread(cls[sel], rest[sel], n_classes)], 1)
    runs = candidate_runs(c, q, spr)
    val = np.array([alpha, 1 - alpha]) @ runs.values
    top_cls, top_val, _ = top_runs(runs, val, k)
    # a prediction row always has k classes, so the union has at least k runs: no padding survives
    cls[sel], prob[sel] = top_cls, top_val
    rest[sel] = np.maximum(1 - top_val.sum(1), 0)
    return cls, prob, rest


# ---- product level: MD5 applied after aggregation, and the product-set lookup ----

def product_keys(hashes, product_id):
    """(product ids (P,) sorted, keys (P, 16) uint8): each product's key is the MD5 of its pictures'
    digests in sorted order, so two products with the same set of pictures share a key whatever the
    order of their pictures"""
    h = np.ascontiguousarray(np.asarray(hashes, np.uint8))
    pid = np.asarray(product_id, np.int64)
    if len(h) != len(pid): raise ValueError(f"{len(h)} hashes but {len(pid)} product ids")
    if not len(pid):
        return np.zeros(0, np.int64), np.zeros((0, 16), np.uint8)
    order = np.lexsort([h[:, j] for j in range(15, -1, -1)] + [pid])
    h, pid = h[order], pid[order]
    starts = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]])
    ends = np.r_[starts[1:], len(pid)]
    buf = h.tobytes()
    keys = np.frombuffer(b"".join(hashlib.md5(buf[a * 16:b * 16]).digest() for a, b in zip(starts, ends)),
                         np.uint8).reshape(-1, 16)
    return pid[starts], keys
