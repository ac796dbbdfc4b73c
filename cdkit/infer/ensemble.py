"""Ensembles of prediction stores (models x TTA views), picture by picture, on the top-k representation.

Members are the (store, view) pairs; a store's weight is shared equally by its views unless one
weight per member is given. For each picture, candidates are the union of the members' top-k
classes; a member that lacks a candidate in its top-k contributes its rest spread uniformly over its
non-top-k classes (`cdkit.infer.store.spread`). Every class outside the union has the same combined value,
so the normalizer is exact::

    mean       sum_j w_j p_j(c)
    geometric  exp(sum_j w_j log max(p_j(c), eps))
    power      (sum_j w_j p_j(c) ** p) ** (1 / p)     (p = 0.5: the blend of square roots)

each divided by its sum over all n_classes classes. The result is a `PredStore` with one view and
the k_out best classes.

Weights fitted on the validation pictures and applied to the same pictures make an in-sample
validation store, which every later step (aggregation, the re-ranker's features, the choices made on
validation) would read as if it were honest. `combine_out_of_fold` scores each fold of validation
products with weights fitted on the other folds; test takes the weights fitted on all of validation.
"""
from __future__ import annotations

import numpy as np

from cdkit.infer.store import PredStore, align_stores, take_rows
from cdkit.infer.topk import candidate_runs, row_spread, top_runs

METHODS = ("mean", "geometric", "power")


def _member_weights(stores, weights):
    n_members = sum(s.n_views for s in stores)
    if weights is None: weights = np.ones(len(stores))
    w = np.asarray(weights, np.float64)
    if len(w) == len(stores): w = np.concatenate([np.full(s.n_views, wi / s.n_views) for s, wi in zip(stores, w)])
    elif len(w) != n_members:
        raise ValueError(f"weights: one per store ({len(stores)}) or per member ({n_members}), got {len(w)}")
    if np.any(w < 0) or w.sum() <= 0: raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    return w / w.sum()


def _combine(X, w, method, p, eps):
    "(M, ...) member values -> (...) combined, unnormalized"
    if method == "mean": return w @ X
    if method == "geometric": return np.exp(w @ np.log(np.maximum(X, eps)))
    if method == "power": return (w @ np.maximum(X, 0) ** p) ** (1 / p)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _blocks(stores, perms, chunk_rows):
    "Aligned member blocks: rows slice, cls (B, M, k) with -1 padding, prob, spread (B, M)"
    k = max(s.k for s in stores)
    n_classes = stores[0].n_classes
    for a in range(0, len(perms[0]), chunk_rows):
        cls, prob, spr = [], [], []
        for s, perm in zip(stores, perms):
            r = perm[a:a + chunk_rows]
            c = np.full((len(r), s.n_views, k), -1, np.int64); q = np.zeros((len(r), s.n_views, k), np.float32)
            c[:, :, :s.k], q[:, :, :s.k] = s.cls[r], s.prob[r]
            cls.append(c); prob.append(q)
            spr.append(row_spread(c.reshape(-1, k), s.rest[r].reshape(-1), n_classes).reshape(len(r), s.n_views))
        yield slice(a, a + chunk_rows), np.concatenate(cls, 1), np.concatenate(prob, 1), np.concatenate(spr, 1)


def _evaluate(runs, spr, w, method, p, eps, n_classes):
    "Combined value per run, non-candidate value and normalizer per picture, of one block"
    val = _combine(runs.values, w, method, p, eps)
    g0 = _combine(spr.T.astype(np.float64), w, method, p, eps)
    counts = np.diff(runs.offsets)
    Z = np.bincount(runs.group, val, len(counts)) + (n_classes - counts) * g0
    return val, g0, Z


class _Prepared:
    "Candidate runs of every picture, computed once, so that weights can be evaluated many times (validation)"
    def __init__(self, stores, chunk_rows):
        self.n_classes = stores[0].n_classes
        self.parts = [(sl, candidate_runs(c, q, s), s) for sl, c, q, s in _blocks(stores, align_stores(stores), chunk_rows)]

    def evaluate(self, w, method, p, eps):
        "Per part: runs, combined value per run, non-candidate value and normalizer per picture"
        for sl, runs, spr in self.parts:
            yield (sl, runs) + _evaluate(runs, spr, w, method, p, eps, self.n_classes)


def combine(stores, weights=None, method="mean", p=0.5, k_out=None, eps=1e-7, chunk_rows=50_000):
    "Ensemble of stores (see the module docstring) -> `PredStore` in stores[0]'s picture order, one view"
    stores = list(stores)
    w = _member_weights(stores, weights)
    k_out = max(s.k for s in stores) if k_out is None else k_out
    if not 1 <= k_out <= max(s.k for s in stores): raise ValueError(f"k_out must be in 1..{max(s.k for s in stores)}, got {k_out}")
    n = len(stores[0])
    cls, prob, rest = np.zeros((n, 1, k_out), np.uint16), np.zeros((n, 1, k_out), np.float32), np.zeros((n, 1), np.float32)
    # block by block, keeping nothing but the output: the runs of 3 M pictures x members take GBs
    for sl, c, q, spr in _blocks(stores, align_stores(stores), chunk_rows):
        runs = candidate_runs(c, q, spr)
        val, g0, Z = _evaluate(runs, spr, w, method, p, eps, stores[0].n_classes)
        top_cls, top_val, _ = top_runs(runs, val, k_out)
        cls[sl, 0], prob[sl, 0] = top_cls, top_val / Z[:, None]
        rest[sl, 0] = np.maximum(1 - prob[sl, 0].sum(1, dtype=np.float64), 0)
    meta = dict(ensemble=dict(method=method, p=p if method == "power" else None, weights=w.tolist(),
                              members=[str(s.path) if s.path else f"store {i}" for i, s in enumerate(stores)]))
    s0 = stores[0]
    return PredStore(s0.product_id.copy(), s0.img_idx.copy(), cls, prob, rest, s0.n_classes, meta, "float32")


def combine_out_of_fold(stores, labels, folds, method="mean", p=0.5, k_out=None, eps=1e-7, chunk_rows=50_000, **fit_kw):
    """The ensemble of validation stores scored out of fold: the pictures of each fold's products are
    combined with weights fitted (`fit_weights`, `fit_kw`) on the other folds' pictures only.

    labels: (n,) true class of each picture in stores[0]'s row order; folds: pd.Series of the fold of
    each product id (`cdkit.infer.selection.validation_folds`). Returns (PredStore in stores[0]'s order, one
    view, {fold: weights})."""
    stores = list(stores)
    labels = np.asarray(labels, np.int64)
    if len(labels) != len(stores[0]): raise ValueError(f"labels has {len(labels)} rows, stores[0] {len(stores[0])}")
    row_fold = []
    for i, s in enumerate(stores):
        f = folds.reindex(s.product_id)
        if f.isna().any():
            raise ValueError(f"store {i}: {int(f.isna().sum())} picture(s) of products without a fold, e.g. product_id "
                             f"{s.product_id[f.isna().to_numpy()][:3].tolist()}")
        row_fold.append(f.to_numpy(np.int64))
    k_out = max(s.k for s in stores) if k_out is None else k_out
    n = len(stores[0])
    cls, prob, rest = np.zeros((n, 1, k_out), np.uint16), np.zeros((n, 1, k_out), np.float32), np.zeros((n, 1), np.float32)
    weights = {}
    for f in np.unique(row_fold[0]):
        fit = [take_rows(s, rf != f) for s, rf in zip(stores, row_fold)]
        weights[int(f)] = np.asarray(fit_weights(fit, labels[row_fold[0] != f], method=method, p=p, eps=eps,
                                                 chunk_rows=chunk_rows, **fit_kw), float)
        here = row_fold[0] == f
        part = combine([take_rows(s, rf == f) for s, rf in zip(stores, row_fold)], weights[int(f)], method, p, k_out,
                       eps, chunk_rows)
        cls[here], prob[here], rest[here] = part.cls, part.prob, part.rest
    meta = dict(ensemble=dict(method=method, p=p if method == "power" else None, out_of_fold=True,
                              fold_weights={f: w.tolist() for f, w in weights.items()},
                              members=[str(s.path) if s.path else f"store {i}" for i, s in enumerate(stores)]))
    s0 = stores[0]
    return PredStore(s0.product_id.copy(), s0.img_idx.copy(), cls, prob, rest, s0.n_classes, meta, "float32"), weights


def _objective(prep, w, labels, method, p, eps, metric):
    total = 0.0
    for sl, runs, val, g0, Z in prep.evaluate(w, method, p, eps):
        y = labels[sl]
        B = len(y)
        # the run of each picture's true label, if the label is among its candidates
        hit = runs.cls == y[runs.group]
        lab = np.full(B, np.nan); lab[runs.group[hit]] = val[hit]
        lab = np.where(np.isnan(lab), g0, lab)
        if metric == "logloss": total += -np.log(np.maximum(lab / Z, 1e-15)).sum()
        else:
            best = np.maximum.reduceat(val, runs.offsets[:-1])
            # correct when the label has the maximum and no lower class ties with it
            first = np.minimum.reduceat(np.where(val == best[runs.group], runs.cls, np.iinfo(np.int64).max), runs.offsets[:-1])
            total -= np.sum((lab >= best) & (first == y))
    return total / len(labels)


def fit_weights(stores, labels, method="mean", p=0.5, metric="logloss", per="store", steps=(0.2, 0.1, 0.05, 0.02, 0.01),
                max_rounds=50, eps=1e-7, chunk_rows=50_000):
    """Ensemble weights (one per store, or per member with per="member") minimizing validation log-loss
    or maximizing accuracy, by coordinate search on the simplex with shrinking steps.

    labels: (n,) true class of each picture in stores[0]'s row order. Returns weights summing to 1."""
    stores = list(stores)
    labels = np.asarray(labels, np.int64)
    if len(labels) != len(stores[0]): raise ValueError(f"labels has {len(labels)} rows, stores[0] {len(stores[0])}")
    if metric not in ("logloss", "accuracy"): raise ValueError(f"metric must be 'logloss' or 'accuracy', got {metric!r}")
    if per not in ("store", "member"): raise ValueError(f"per must be 'store' or 'member', got {per!r}")
    prep = _Prepared(stores, chunk_rows)
    views = np.array([s.n_views for s in stores])
    size = len(stores) if per == "store" else views.sum()
    def loss(w):
        return _objective(prep, _member_weights(stores, w), labels, method, p, eps, metric)
    w = np.full(size, 1 / size)
    best = loss(w)
    for step in steps:
        for _ in range(max_rounds):
            improved = False
            for i in range(size):
                for sign in (1, -1):
                    cand = w.copy(); cand[i] = max(cand[i] + sign * step, 0)
                    if cand.sum() <= 0: continue
                    cand /= cand.sum()
                    c = loss(cand)
                    if c < best - 1e-12: w, best, improved = cand, c, True
            if not improved: break
    return w
