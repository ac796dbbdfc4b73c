"""Top-k kernels shared by ensembling, aggregation, MD5 lookup and the re-ranker: the union of the classes
of a group's predictions (`candidate_runs`), the k best of each group (`top_runs`), and the probability a
prediction leaves outside its top-k (`row_spread`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdkit.infer.store import spread as _spread_rest


@dataclass
class Runs:
    "Union of the classes of each group's n predictions: one run per (group, class)"
    group: np.ndarray      # (R,) group (product) index within the block, ascending
    cls: np.ndarray        # (R,) class, ascending within a group
    values: np.ndarray     # (n, R) float64: the class's probability in each of the group's n predictions
    offsets: np.ndarray    # (B+1,): the runs of group b are offsets[b]:offsets[b+1]


def candidate_runs(cls, prob, spread, m=None):
    """cls, prob (B, n, k) and spread (B, n) -> `Runs` of the classes in the top-m (default: all k) of
    at least one of a group's predictions; classes -1 are padding and ignored"""
    B, n, k = cls.shape
    E, m = n * k, k if m is None else min(m, k)
    # key = (class + 1, position * n + prediction) packed in bits: one sort per row groups a product's
    # classes, and each run (class) starts with its best-ranked entry
    eb = (E - 1).bit_length()
    dt = np.int32 if (65537 << eb) < 2**31 else np.int64
    key = cls.transpose(0, 2, 1).reshape(B, E).astype(dt)
    key += 1; key <<= eb; key |= np.arange(E, dtype=dt)
    key.sort(axis=1)
    key = key.ravel()
    c, e = key >> eb, key & ((1 << eb) - 1)  # class + 1 (0: padding), position * n + prediction
    start = np.empty(B * E, bool)
    start[::E] = True
    np.not_equal(c[1:], c[:-1], out=start[1:])
    start[::E] = True
    padded = bool((c[::E] == 0).any())  # padding sorts first
    if m < k or padded:
        if m < k:  # keep the classes whose best entry is in the top-m of its prediction
            run_id = np.cumsum(start, dtype=np.int32 if B * E < 2**31 else np.int64)
            run_id -= 1
            keep = (e[start] < m * n)[run_id]
            if padded: keep &= c > 0
        else: keep = c > 0
        idx = np.flatnonzero(keep)
        b, c, e = idx // E, c[idx], e[idx]
        start = np.ones(len(idx), bool)
        start[1:] = (c[1:] != c[:-1]) | (b[1:] != b[:-1])
    else: b = np.repeat(np.arange(B), E)
    run_id = np.cumsum(start) - 1
    group, run_cls = b[start], c[start].astype(np.int64) - 1
    values = np.take(np.ascontiguousarray(np.asarray(spread, np.float64).T), group, axis=1)  # (n, R), C order
    j, pos = e % n, e // n
    values[j, run_id] = prob.reshape(B * E)[b * E + j * k + pos]
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(np.bincount(group, minlength=B), out=offsets[1:])
    return Runs(group, run_cls, values, offsets)


def top_table(score, k_out, cls=None):
    """score (B, W) -> column positions (B, k_out) of the k_out best per row; ties: lower class first,
    the class given by `cls` (B, W), or by the column when columns are in class order (cls=None)"""
    B, W = score.shape
    tie = np.broadcast_to(np.arange(W), (B, W)) if cls is None else np.where(cls < 0, np.iinfo(np.int64).max, cls)
    if W > k_out:
        sel = np.argpartition(-score, k_out - 1, axis=1)[:, :k_out]
        s, t = np.take_along_axis(score, sel, 1), np.take_along_axis(tie, sel, 1)
        return np.take_along_axis(sel, np.lexsort((t, -s), axis=-1), 1)
    order = np.broadcast_to(np.arange(W), (B, W)).copy()
    # rows already in (score desc, class asc) order (a single prediction's top-k) need no sort
    a, b, ta, tb = score[:, :-1], score[:, 1:], tie[:, :-1], tie[:, 1:]
    bad = (a < b) | ((a == b) & (ta > tb))
    todo = np.unique(np.flatnonzero(bad) // max(W - 1, 1))
    if len(todo): order[todo] = np.lexsort((tie[todo], -score[todo]), axis=-1)
    return order


def top_runs(runs, score, k_out):
    "Per group, the k_out best runs by score (ties: lower class first) -> cls, score (B, k_out), best run index (B,)"
    B = len(runs.offsets) - 1
    col = np.arange(len(runs.group)) - runs.offsets[runs.group]
    counts = np.diff(runs.offsets)
    width = max(int(counts.max(initial=0)), k_out)
    D = np.full((B, width), -np.inf)
    D[runs.group, col] = score
    order = top_table(D, k_out)
    top_score = np.take_along_axis(D, order, 1)
    idx = runs.offsets[:-1, None] + order
    safe = np.minimum(idx, max(len(runs.cls) - 1, 0))
    top_cls = np.where(order < counts[:, None], runs.cls[safe] if len(runs.cls) else -1, -1)
    top_cls[top_score == -np.inf] = -1
    return top_cls, top_score, idx[:, 0]


def row_spread(cls, rest, n_classes):
    "(rows,) probability of each class outside a row's top-k (padding -1 does not count in k)"
    if rest is None: return np.zeros(len(cls), np.float32)
    cls = np.asarray(cls)
    k = cls.shape[1] if cls.dtype.kind == "u" else np.count_nonzero(cls >= 0, axis=1)
    return _spread_rest(rest, n_classes, k)
