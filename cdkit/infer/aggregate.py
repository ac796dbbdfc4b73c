"""From picture predictions to product predictions, vectorized over products.

Input: prediction rows (one per picture x model x view): the row's product id, its top-k classes
`cls` (rows, k) sorted by probability descending (-1 pads a row that has fewer), their
probabilities `prob` and `rest`, the mass outside the top-k. A class missing from a row's top-k takes
the row's rest spread uniformly over its other classes (`cdkit.infer.store.spread`). `prediction_rows`
builds these arrays from one or more `cdkit.infer.store.PredStore`.

Products are grouped by their number of predictions n; each group is processed in fixed-size 3-D
blocks (products, n, k). Inside a block every product's n*k entries are sorted by class, which
gives the union of its candidate classes and, for each candidate, its probability in each of the n
predictions (`candidate_runs`). Products with one prediction skip the sort. Blocks run in a small
thread pool (`threads`, default min(cores, 4)); numpy releases the GIL in the heavy calls. No Python
loop runs per product.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cdkit.infer.store import align_stores
from cdkit.infer.topk import candidate_runs, row_spread, top_runs, top_table

MAX_ENTRIES = 1 << 17   # entries (products x n x k) per block: ~10 MB of work arrays, cache friendly
SLACK = 1e-12           # float rounding allowance in the exclusion tests (exact ties are never outliers)


def stable_argsort(a):
    "np.argsort(a, kind='stable') for integers, ~4x faster: one SIMD sort of (a - min) * len + row"
    a = np.asarray(a)
    n = len(a)
    if n == 0 or a.dtype.kind not in "iu": return np.argsort(a, kind="stable")
    lo, hi = int(a.min()), int(a.max())
    if (hi - lo + 1) * n >= 2**63: return np.argsort(a, kind="stable")
    key = (a.astype(np.int64) - lo) * n + np.arange(n)
    key.sort()
    return key % n


def group_blocks(product_id, width, max_entries=MAX_ENTRIES):
    """Products sorted by id, their prediction counts, and blocks (n, product positions (B,), rows (B, n)):
    every product whose n predictions are the input rows `rows[b]`, in input order"""
    pid = np.asarray(product_id)
    order = stable_argsort(pid)
    sp = pid[order]
    first = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]) if len(sp) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[first, len(sp)])
    def blocks():
        for n in np.unique(counts):
            sel = np.flatnonzero(counts == n)
            step = max(1, max_entries // (int(n) * width))
            for a in range(0, len(sel), step):
                s = sel[a:a + step]
                yield int(n), s, order[first[s][:, None] + np.arange(n)]
    return sp[first], counts, blocks()


@dataclass
class ProductPredictions:
    "Product-level predictions; `cls`/`score` hold each product's k_out best candidates (-1 / -inf pad)"
    product_id: np.ndarray  # (P,) sorted
    n_preds: np.ndarray     # (P,) prediction rows per product
    pred_class: np.ndarray  # (P,) the winning class (class index, not category id)
    cls: np.ndarray         # (P, k_out) int64
    score: np.ndarray       # (P, k_out) float64
    excluded: np.ndarray | None = None  # (rows,) input-aligned: row excluded for its product's winning class

    def to_frame(self):
        "product_id, n_preds, pred_class, score of the winner"
        df = pd.DataFrame(dict(product_id=self.product_id, n_preds=self.n_preds, pred_class=self.pred_class,
                               score=self.score[:, 0]))
        return df


def _aggregate(product_id, cls, prob, rest, n_classes, m, k_out, scorer, want_excluded, max_entries, threads):
    cls, prob = np.asarray(cls), np.asarray(prob)
    if cls.ndim != 2 or prob.shape != cls.shape: raise ValueError(f"cls and prob must be (rows, k) alike, got {cls.shape}, {prob.shape}")
    if len(product_id) != len(cls): raise ValueError(f"product_id has {len(product_id)} rows, cls {len(cls)}")
    k = cls.shape[1]
    m = k if m is None else min(m, k)
    k_out = m if k_out is None else k_out
    spread = row_spread(cls, rest, n_classes)
    pids, counts, blocks = group_blocks(product_id, k, max_entries)
    out_cls, out_score = np.full((len(pids), k_out), -1, np.int64), np.full((len(pids), k_out), -np.inf)
    excluded = np.zeros(len(cls), bool) if want_excluded else None

    def block(n, s, rows):  # writes disjoint slices of the outputs: blocks can run in threads
        if n == 1:  # one prediction: its own top-m, scored alone; nothing can be excluded
            r = rows[:, 0]
            C, p1 = cls[r, :m].astype(np.int64), prob[r, :m]
            D = scorer(p1.reshape(1, -1).astype(np.float64), 1)[0].reshape(p1.shape)
            padded = cls.dtype.kind != "u" and bool((C < 0).any())
            if padded: D[C < 0] = -np.inf
            if k_out > m:
                D = np.concatenate([D, np.full((len(s), k_out - m), -np.inf)], 1)
                C = np.concatenate([C, np.full((len(s), k_out - m), -1, np.int64)], 1)
            order = top_table(D, k_out, C)
            top_score, top_cls = np.take_along_axis(D, order, 1), np.take_along_axis(C, order, 1)
            if padded or k_out > m: top_cls[top_score == -np.inf] = -1
            out_cls[s], out_score[s] = top_cls, top_score
            return
        runs = candidate_runs(cls[rows], prob[rows], spread[rows], m)
        score, excl = scorer(runs.values, n)
        top_cls, top_score, best = top_runs(runs, score, k_out)
        out_cls[s], out_score[s] = top_cls, top_score
        if want_excluded and excl[1].size: excluded[rows] = _excluded_at(*excl, best).T

    threads = min(os.cpu_count() or 1, 4) if threads is None else threads
    if threads > 1:  # numpy releases the GIL in the heavy calls
        with ThreadPoolExecutor(threads) as ex:
            for f in [ex.submit(block, *b) for b in blocks]: f.result()
    else:
        for b in blocks: block(*b)
    return ProductPredictions(pids, counts, out_cls[:, 0].copy(), out_cls, out_score, excluded)


def _excluded_at(cols, excl, runs):
    "(n, len(runs)) exclusions of the given runs, from `_exclusions`' (cols, excl)"
    if cols is None: return excl[:, runs]
    pos = np.minimum(np.searchsorted(cols, runs), len(cols) - 1)
    return excl[:, pos] & (cols[pos] == runs)


def mean_aggregate(product_id, cls, prob, rest, n_classes, k_out=None, max_entries=MAX_ENTRIES, threads=None):
    "Mean probability over each product's predictions; candidates: every class in any top-k"
    return _aggregate(product_id, cls, prob, rest, n_classes, None, k_out,
                      lambda X, n: (X.mean(0), (None, np.zeros((0, 0), bool))), False, max_entries, threads)


def logmean_aggregate(product_id, cls, prob, rest, n_classes, eps=1e-6, k_out=None, max_entries=MAX_ENTRIES,
                      threads=None):
    "Mean log-probability (score = mean log max(p, eps)); a class missing from a top-k takes the rest spread"
    return _aggregate(product_id, cls, prob, rest, n_classes, None, k_out,
                      lambda X, n: (np.log(np.maximum(X, eps)).mean(0), (None, np.zeros((0, 0), bool))), False, max_entries, threads)


def belief_exclusions(X, z=1.96, rule="gaussian", min_preds=3, ddof=1, atol=0.01):
    """(n, R) candidate values -> (n, R) bool, True where prediction j is excluded for the candidate.

    Leave-one-out statistics of the other n-1 values: mu, and sd with `ddof` (1: sample sd).
    gaussian: excluded iff |p - mu| > max(z * sd, atol)   (plus 1e-12 for float rounding)
    ratio:    excluded iff (p < mu / 2 or p > 2 * mu) and |p - mu| > atol
    Nothing is excluded when n < min_preds."""
    cols, _, excl = _exclusions(X, z, rule, min_preds, ddof, atol)
    if cols is None: return excl
    out = np.zeros(X.shape, bool)
    out[:, cols] = excl
    return out


def _exclusions(X, z, rule, min_preds, ddof, atol):
    """Exclusions of the candidates that may exclude something: cols (indices, or None for all),
    their values X[:, cols] and their (n, len(cols)) exclusions"""
    n, R = X.shape
    if n < min_preds: return np.zeros(0, np.int64), X[:, :0], np.zeros((n, 0), bool)
    cols = None
    if atol > 0:  # |p_j - mu| <= max - min: candidates whose values span <= atol cannot exclude anything
        wide = np.flatnonzero(X.max(0) - X.min(0) > atol)
        if len(wide) < R // 2: cols, X = wide, np.take(X, wide, axis=1)
    a = n / (n - 1)
    y = X - X.mean(0)
    if rule == "gaussian":
        y2 = y * y
        thr = y2.sum(0) - a * y2  # (n - 1 - ddof) * leave-one-out variance
        thr *= 1 / (n - 1 - ddof)
        np.maximum(thr, 0, out=thr); np.sqrt(thr, out=thr); thr *= z
        np.maximum(thr, atol, out=thr); thr += SLACK
        dev = np.abs(y, out=y); dev *= a  # |p_j - mean of the others|
        return cols, X, dev > thr
    if rule == "ratio":
        dev = np.abs(y, out=y); dev *= a
        mu = (X.sum(0) - X) / (n - 1)
        return cols, X, ((X < 0.5 * mu - SLACK) | (X > 2 * mu + SLACK)) & (dev > atol + SLACK)
    raise ValueError(f"rule must be 'gaussian' or 'ratio', got {rule!r}")


def min_preds_needed(rule, ddof):
    "The fewest predictions with which a rule can exclude: gaussian needs the others' sd (two values + ddof), ratio one other"
    return 2 + ddof if rule == "gaussian" else 2


# Named sets of belief-aggregation settings (docs/STUDY.md gives each one's sources):
# poster:  the rule as the study prints it: each prediction's top-1 class is a candidate; a value outside the
#          95% interval (z=1.96) of the product's other predictions is excluded, with nothing added for
#          rounding (atol=0); the score sums the included values (their average over all predictions, the
#          same ranking). The sample sd (ddof=1), hence min_preds=3, is the kit's reading.
# authors: test_ensemble_final.py's ensemble_predict: top-1 candidates; a value below half or above twice the
#          mean of the others is excluded (TTA_threshold=0.5); the score is the mean of the kept values, or
#          the plain mean of all when every one is excluded; two predictions already compare.
# kit:     the kit's defaults: candidates from each prediction's top 5, the Gaussian interval floored at
#          0.01 (atol, above the stores' uint8 rounding), sample sd, summed score.
BELIEF_SETTINGS = {
    "poster": dict(m=1, rule="gaussian", z=1.96, score="sum", min_preds=3, ddof=1, atol=0.0, all_excluded="zero"),
    "authors": dict(m=1, rule="ratio", z=1.96, score="mean", min_preds=2, ddof=1, atol=0.0, all_excluded="mean"),
    "kit": dict(m=5, rule="gaussian", z=1.96, score="sum", min_preds=3, ddof=1, atol=0.01, all_excluded="zero"),
}


def belief_aggregate(product_id, cls, prob, rest, n_classes, m=5, z=1.96, rule="gaussian", score="sum",
                     min_preds=3, ddof=1, atol=0.01, k_out=None, max_entries=MAX_ENTRIES, threads=None,
                     all_excluded="zero"):
    """Belief-based prediction aggregation (the study's Algorithm 1), vectorized.

    For each product, candidates are the union of the top-m classes of its predictions (m=5; None:
    all k; a class outside every picture's top 5 practically never wins, and fewer candidates make it
    ~2x faster). A candidate's probability in a prediction is looked up in that row's full top-k.
    For a candidate c and each prediction j, p_c(j) is compared with the mean mu and standard
    deviation sd of p_c over the product's *other* predictions (leave-one-out); p_c(j) outside
    [mu - z*sd, mu + z*sd] is excluded, otherwise it adds to c's score. The best score wins.

    What the study leaves open, decided here:
    - Fewer than `min_preds` (3) predictions: nothing is excluded (the score is the plain sum/mean).
      With one prediction there is nothing to compare; with two, leave-one-out leaves one value and
      no spread, so any difference would exclude both predictions symmetrically: no evidence for
      either. min_preds must be >= 2 + ddof so that the sd is defined.
    - sd: the sample sd of the others (ddof=1), the usual estimate from few values; ddof=0 gives
      the population sd of the others (stricter with 3-4 pictures).
    - sd = 0 and tiny sds: the interval half-width is floored at `atol` (0.01): a value within one
      percentage point of the others' mean is never an outlier. This keeps exact agreement of the
      others (sd = 0) from excluding a value that differs only by rounding, and exceeds the store's
      uint8 quantization error (<= 0.004 per value), so quantization alone never excludes. atol=0 gives the
      literal rule (sd = 0: anything different from the others is excluded).
    - rule="ratio" (the variant in the authors' code): excluded when p_c(j) < mu/2 or > 2*mu, and
      also differing from mu by more than atol.
    - Probability of a class outside a prediction's top-k: that row's rest spread uniformly.
    - score="sum" (default): the study's "adds to the score"; a class loses the mass of its excluded
      predictions, which is how an outlier picture is outvoted. score="mean": mean of the included
      values. Ties: the lower class index wins.
    - all_excluded: the score of a candidate whose every prediction is excluded: "zero" (nothing was
      included), or "mean", the plain mean of all of them (the authors' `ensemble_predict`).
    - min_preds: >= 2 + ddof with rule="gaussian" (the others' sd needs two values), >= 2 with "ratio".

    `BELIEF_SETTINGS` names three sets of these settings (the poster's rule, the authors' code, the kit's).

    Returns `ProductPredictions` whose table holds the k_out (default m) best candidates, padded with
    class -1 / score -inf when a product has fewer, and `excluded` (rows,): True where that input row
    was excluded for its product's winning class.
    """
    if score not in ("sum", "mean"): raise ValueError(f"score must be 'sum' or 'mean', got {score!r}")
    if rule not in ("gaussian", "ratio"): raise ValueError(f"rule must be 'gaussian' or 'ratio', got {rule!r}")
    if all_excluded not in ("zero", "mean"): raise ValueError(f"all_excluded must be 'zero' or 'mean', got {all_excluded!r}")
    need = min_preds_needed(rule, ddof)
    if min_preds < need: raise ValueError(f"min_preds must be >= {need} with rule={rule!r} and ddof={ddof}, got {min_preds}")
    def scorer(X, n):
        cols, Xc, excl = _exclusions(X, z, rule, min_preds, ddof, atol)
        sc = np.where(excl, 0, Xc).sum(0)  # the same summation order as summing the included values
        if score == "mean":
            sc /= np.maximum(n - excl.sum(0), 1).astype(np.float64)
            if cols is None: s = sc
            else: s = X.sum(0) / n; s[cols] = sc
        else:
            if cols is None: s = sc
            else: s = X.sum(0); s[cols] = sc
        if all_excluded == "mean" and excl.size:
            gone = excl.all(0)  # every prediction excluded: the plain mean of them all
            if gone.any():
                idx = np.flatnonzero(gone) if cols is None else cols[gone]
                s[idx] = Xc[:, gone].mean(0)
        return s, (cols, excl)
    return _aggregate(product_id, cls, prob, rest, n_classes, m, k_out, scorer, True, max_entries, threads)


@dataclass
class PredRows:
    "Prediction rows (picture x model x view) flattened from stores, ready for the aggregators"
    product_id: np.ndarray
    img_idx: np.ndarray
    model: np.ndarray   # index of the store
    view: np.ndarray
    cls: np.ndarray     # (rows, k) int64, -1 pads stores with a smaller k
    prob: np.ndarray    # (rows, k) float32
    rest: np.ndarray    # (rows,) float32
    n_classes: int


def prediction_rows(stores, views=None):
    "Flatten stores (models) x views (all, or the listed view indices) into `PredRows`"
    stores = list(stores)
    if len({s.n_classes for s in stores}) != 1: raise ValueError("stores have different n_classes")
    k = max(s.k for s in stores)
    parts = []
    for i, s in enumerate(stores):
        vs = list(range(s.n_views)) if views is None else list(views)
        n, V = len(s), len(vs)
        cls = np.full((n, V, k), -1, np.int64); prob = np.zeros((n, V, k), np.float32)
        cls[:, :, :s.k], prob[:, :, :s.k] = s.cls[:, vs], s.prob[:, vs]
        parts.append((np.repeat(s.product_id, V), np.repeat(s.img_idx, V), np.full(n * V, i),
                      np.tile(vs, n), cls.reshape(-1, k), prob.reshape(-1, k), s.rest[:, vs].reshape(-1)))
    cols = [np.concatenate(c) for c in zip(*parts)]
    return PredRows(*cols, n_classes=stores[0].n_classes)


def iter_product_blocks(stores, views=None, max_rows=1 << 21):
    """Prediction rows of stores x views, a block of whole products at a time: yields (PredRows, positions)
    where positions (rows,) are the rows' indices in `prediction_rows(stores, views)`. Memory: the stores
    and one block (about `max_rows` rows), instead of every row at once (4 models x 2 views of the test
    set: 24.8 M rows, 6 GB as int64 classes and float32 probabilities)."""
    stores = list(stores)
    if len({s.n_classes for s in stores}) != 1: raise ValueError("stores have different n_classes")
    k = max(s.k for s in stores)
    same_k = all(s.k == k and s.cls.dtype.kind == "u" for s in stores)  # no padding: keep the compact classes
    vs = [list(range(s.n_views)) if views is None else list(views) for s in stores]
    perms = align_stores(stores)
    offsets = np.cumsum([0] + [len(s) * len(v) for s, v in zip(stores, vs)])
    order = stable_argsort(stores[0].product_id)
    pid = stores[0].product_id[order]
    cuts = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]])  # first picture of each product
    step = max(1, max_rows // max(sum(len(v) for v in vs), 1))
    # block starts: the first picture of the product at or before every `step`-th picture
    cuts = np.r_[np.unique(cuts[np.searchsorted(cuts, np.arange(0, len(pid), step), "right") - 1]), len(pid)]
    per = sum(len(v) for v in vs)
    cdt = stores[0].cls.dtype if same_k else np.int64
    model = np.repeat(np.arange(len(stores)), [len(v) for v in vs])
    view = np.concatenate([np.asarray(v, np.int64) for v in vs])
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a == b: continue
        pics0, n = order[a:b], b - a
        # rows in (picture, store, view) order: a product's rows are contiguous, its gathers cache-friendly
        cls = np.full((n, per, k), -1, cdt) if not same_k else np.empty((n, per, k), cdt)
        prob = np.zeros((n, per, k), np.float32)
        rest, pos = np.empty((n, per), np.float32), np.empty((n, per), np.int64)
        j = 0
        for i, (s, perm, v) in enumerate(zip(stores, perms, vs)):
            r, sel = perm[pics0], (slice(None) if v == list(range(s.n_views)) else v)
            cls[:, j:j + len(v), :s.k], prob[:, j:j + len(v), :s.k] = s.cls[r][:, sel], s.prob[r][:, sel]
            rest[:, j:j + len(v)] = s.rest[r][:, sel]
            pos[:, j:j + len(v)] = offsets[i] + r[:, None] * len(v) + np.arange(len(v))
            j += len(v)
        yield PredRows(np.repeat(stores[0].product_id[pics0], per), np.repeat(stores[0].img_idx[pics0], per),
                       np.tile(model, n), np.tile(view, n), cls.reshape(n * per, k), prob.reshape(n * per, k),
                       rest.reshape(-1), n_classes=stores[0].n_classes), pos.reshape(-1)


def aggregate_stores(stores, method="belief", views=None, max_rows=1 << 21, **kw):
    """`belief_aggregate` (method="belief") or `mean_aggregate` ("mean") over every picture x store x view
    row of `stores`, a block of whole products at a time (`iter_product_blocks`): the same result as
    aggregating `prediction_rows(stores, views)`, with `excluded` aligned to those rows, in the memory
    of the stores and one block. `kw` go to the aggregator. Where every store has the same k, the
    blocks keep the stores' uint16 classes (no padding to mark), a quarter of int64's memory traffic."""
    fn = {"belief": belief_aggregate, "mean": mean_aggregate}.get(method)
    if fn is None: raise ValueError(f"method must be 'belief' or 'mean', got {method!r}")
    stores = list(stores)
    n_rows = sum(len(s) * (s.n_views if views is None else len(views)) for s in stores)
    parts, excluded = [], np.zeros(n_rows, bool) if method == "belief" else None
    for rows, pos in iter_product_blocks(stores, views, max_rows):
        pp = fn(rows.product_id, rows.cls, rows.prob, rows.rest, rows.n_classes, **kw)
        if excluded is not None: excluded[pos] = pp.excluded
        parts.append((pp.product_id, pp.n_preds, pp.pred_class, pp.cls, pp.score))
    if not parts:
        k_out = kw.get("k_out") or (kw.get("m", 5) if method == "belief" else max((s.k for s in stores), default=1))
        parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, k_out), np.int64),
                  np.zeros((0, k_out)))]
    return ProductPredictions(*[np.concatenate(c) for c in zip(*parts)], excluded=excluded)


def blend_products(pp: ProductPredictions, product_id, cls, prob, alpha=1.0):
    """Blend each listed product's distribution (cls, prob: (n, k), -1 / 0 pads, one row per product)
    into `pp`: alpha * given + (1 - alpha) * pp's own scores normalized to sum to 1 over its kept
    candidates (alpha=1: the given distribution decides). Products of `pp` not listed are unchanged.
    Returns (new ProductPredictions, changed: (P,) bool where the winning class moved)."""
    if not 0 <= alpha <= 1: raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    product_id, cls, prob = np.asarray(product_id, np.int64), np.asarray(cls, np.int64), np.asarray(prob, np.float64)
    pos = np.searchsorted(pp.product_id, product_id)
    ok = (pos < len(pp.product_id)) & (pp.product_id[np.minimum(pos, len(pp.product_id) - 1)] == product_id) \
        if len(pp.product_id) else np.zeros(len(product_id), bool)
    pos, cls, prob = pos[ok], cls[ok], prob[ok]
    new = ProductPredictions(pp.product_id, pp.n_preds, pp.pred_class.copy(), pp.cls.copy(), pp.score.copy(),
                             pp.excluded)
    changed = np.zeros(len(pp.product_id), bool)
    if not len(pos):
        return new, changed
    own_c, own_s = pp.cls[pos], np.where(np.isfinite(pp.score[pos]) & (pp.cls[pos] >= 0), pp.score[pos], 0.0)
    tot = own_s.sum(1, keepdims=True)
    own_s = np.divide(own_s, tot, out=np.zeros_like(own_s), where=tot > 0)
    r = np.arange(len(pos))
    long = pd.DataFrame({"r": np.r_[np.repeat(r, cls.shape[1]), np.repeat(r, own_c.shape[1])],
                         "c": np.r_[cls.ravel(), own_c.ravel()],
                         "v": np.r_[alpha * prob.ravel(), (1 - alpha) * own_s.ravel()]})
    long = long[long["c"] >= 0].groupby(["r", "c"], sort=False)["v"].sum().reset_index()
    # best first; ties to the class the product's own ranking put first, then the lower class
    own = pd.DataFrame({"r": np.repeat(r, own_c.shape[1]), "c": own_c.ravel(),
                        "own": np.tile(np.arange(own_c.shape[1]), len(r))})
    long = long.merge(own[own["c"] >= 0], on=["r", "c"], how="left").fillna({"own": 1 << 30})
    long = long.sort_values(["r", "v", "own", "c"], ascending=[True, False, True, True])
    long["j"] = long.groupby("r").cumcount()
    k_out = pp.cls.shape[1]
    long = long[long["j"] < k_out]
    cls_out, score_out = np.full((len(pos), k_out), -1, np.int64), np.full((len(pos), k_out), -np.inf)
    cls_out[long["r"].to_numpy(), long["j"].to_numpy()] = long["c"].to_numpy()
    score_out[long["r"].to_numpy(), long["j"].to_numpy()] = long["v"].to_numpy()
    new.cls[pos], new.score[pos] = cls_out, score_out
    new.pred_class[pos] = cls_out[:, 0]
    changed[pos] = new.pred_class[pos] != pp.pred_class[pos]
    return new, changed


def correct_by_product(parts: dict, truth) -> pd.DataFrame:
    """1.0 where a method's prediction is the product's true class, else 0.0: one column per method of
    `parts` ({method: ProductPredictions}), indexed by the first method's product ids; `truth`: pd.Series
    of true classes indexed by product_id"""
    ids = next(iter(parts.values())).product_id
    t = truth.reindex(ids).to_numpy()
    correct = {m: (pd.Series(pp.pred_class, index=pp.product_id).reindex(ids).to_numpy() == t).astype(float)
               for m, pp in parts.items()}
    return pd.DataFrame(correct, index=ids)


def pick_products(parts: dict, pick: pd.Series) -> ProductPredictions:
    "ProductPredictions of the products of `pick` (index product_id, ascending), each taken from parts[pick[product]]"
    ids = pick.index.to_numpy(np.int64)
    k = max(pp.cls.shape[1] for pp in parts.values())
    cls, score = np.full((len(ids), k), -1, np.int64), np.full((len(ids), k), -np.inf)
    pred, n_preds = np.full(len(ids), -1, np.int64), np.zeros(len(ids), np.int64)
    for m, pp in parts.items():
        sel = np.flatnonzero(pick.to_numpy() == m)
        pos = pd.Series(np.arange(len(pp.product_id)), index=pp.product_id).reindex(ids[sel])
        if pos.isna().any():
            raise ValueError(f"method {m!r} has no prediction for product(s) {pos.index[pos.isna()][:3].tolist()}")
        pos = pos.to_numpy(np.int64)
        kk = pp.cls.shape[1]
        cls[sel, :kk], score[sel, :kk] = pp.cls[pos], pp.score[pos]
        pred[sel], n_preds[sel] = pp.pred_class[pos], pp.n_preds[pos]
    return ProductPredictions(ids, n_preds, pred, cls, score)


def excluded_products(stores, pp, n=8, seed=0):
    """Product ids where belief aggregation excluded at least one prediction row for the winning class
    (`pp.excluded` is aligned to `prediction_rows(stores)`: store by store, picture by picture, view by view)"""
    ids, start = [], 0
    for s in stores:
        size = len(s) * s.n_views
        ex = pp.excluded[start:start + size].reshape(len(s), s.n_views).any(1)
        ids.append(s.product_id[ex])
        start += size
    ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=min(n, len(ids)), replace=False)) if len(ids) else ids


def rows_of_products(stores, pp, ids):
    "The prediction rows of the products `ids` and their `excluded` flags of `pp` (in prediction_rows order)"
    from cdkit.infer.store import PredStore
    subs, flags, start = [], [], 0
    for s in stores:
        keep = np.isin(s.product_id, ids)
        subs.append(PredStore(s.product_id[keep], s.img_idx[keep], s.cls[keep], s.prob[keep], s.rest[keep],
                              s.n_classes))
        flags.append(pp.excluded[start:start + len(s) * s.n_views].reshape(len(s), s.n_views)[keep].ravel())
        start += len(s) * s.n_views
    return prediction_rows(subs), np.concatenate(flags)


def excluded_pictures(stores, pp, ids) -> pd.DataFrame:
    """Per picture of the products `ids` that has prediction rows: product_id, img_idx, excluded (the share
    of its rows that belief aggregation `pp` excluded for the winning class), top (its rows' most frequent top class)"""
    rows, excluded = rows_of_products(stores, pp, ids)
    df = pd.DataFrame(dict(product_id=rows.product_id, img_idx=rows.img_idx, excluded=excluded.astype(float),
                           top=rows.cls[:, 0].clip(0)))
    g = df.groupby(["product_id", "img_idx"])
    return pd.DataFrame({"excluded": g["excluded"].mean(),
                         "top": g["top"].agg(lambda c: np.bincount(c).argmax())}).reset_index()


def accuracy_breakdowns(preds: dict, truth: dict, n_pictures: dict, level1, level2):
    """(accuracy by pictures per product, accuracy at each hierarchy level): a block per (split, method) of
    `preds` ({(split, method): ProductPredictions}) whose split has a truth. truth: {split: pd.Series of
    classes or None}; n_pictures: {split: pd.Series}, both indexed by product_id; level1, level2: per class"""
    from cdkit.base.metrics import accuracy_by_level, accuracy_by_n_pictures
    bp, bl = [], []
    for (split, name), pp in preds.items():
        if truth[split] is None:
            continue
        t = truth[split].reindex(pp.product_id).to_numpy()
        npic = n_pictures[split].reindex(pp.product_id).to_numpy()
        bp.append(accuracy_by_n_pictures(pp.pred_class, t, npic).assign(split=split, method=name))
        bl.append(accuracy_by_level(pp.pred_class, t, level1, level2).assign(split=split, method=name))
    return (pd.concat(bp, ignore_index=True) if bp else pd.DataFrame(),
            pd.concat(bl, ignore_index=True) if bl else pd.DataFrame())
