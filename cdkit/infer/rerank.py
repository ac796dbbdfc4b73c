"""Second-level re-ranker: LightGBM over the top-k candidate classes of several product predictions.

Members are product-level predictions (`ProductPredictions`: "mean", "belief", a fusion, per-model
means, ...). A product's candidates are the union of every member's top-k classes (and the class an
MD5 lookup suggests, when given: otherwise the re-ranker could never pick it). Each (product,
candidate) row gets features (`candidate_table`), a LightGBM model scores the rows, and a product's
candidates are re-ordered by that score, softmax-normalized over the product so that it blends like
the other members' scores.

Training uses the validation products only, out of fold (`fit_oof`): the products are split into
folds (seeded, by product, so a product's candidates stay together); each fold's model is trained on
the other folds and scores only its own fold. `Reranker.oof_predictions()` are therefore honest
estimates of what the re-ranker does on test, and `Reranker.predict(table)` scores other products
(test) with the mean of the fold models' raw scores. That holds only when the members' validation
predictions are themselves out of sample: a member fitted on validation (one made in-sample raised the
out-of-fold figure from 0.56 to 0.81 while test fell) is a feature the folds cannot see through, which
is why step 07 writes its validation ensemble out of fold (docs/CONTRACTS.md, "Which figures are honest").

Objective: binary (candidate == truth) by default. On demo-like data (`bench/rerank.py --compare`:
48 classes, 1-4 pictures per product, members mean, belief and two per-model means; 400 validation and
900 test products, 5 seeds; 200 rounds at rate 0.05) the best member scored 0.720 on test, binary
0.745 out of fold / 0.748 on test, lambdarank 0.737 / 0.746: binary is as good or better, needs no
group bookkeeping, and its logits mean something alone; `objective="lambdarank"` remains available.
LightGBM runs one thread by default (see PARAMS).

Cost (bench/rerank.py): `candidate_table` ~25 s per million products (3 members, k=5, one core);
prediction ~20 us per candidate row and thread. `Reranker.predict_members` streams a test set by
blocks of products in ~0.3 GB.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cdkit.infer.aggregate import ProductPredictions, mean_aggregate
from cdkit.infer.topk import Runs, top_runs

BLOCK_PRODUCTS = 100_000  # products per block in candidate_table / predict_members: ~1 M rows, ~0.2 GB of work arrays
OBJECTIVES = ("binary", "lambdarank")
OBJECTIVE = "binary"      # within noise of lambdarank on demo-like data (bench/rerank.py --compare); simpler
ROUNDS = 100              # boosting rounds: demo-like OOF / test accuracy 0.742 / 0.748, at 200 rounds and rate 0.05 0.745 / 0.748, at half the prediction cost
PARAMS = dict(            # small-data-safe LightGBM settings; `params` of fit_oof override them
    learning_rate=0.1,    # with ROUNDS; 0.05 x 200 rounds is no better on demo-like data (bench/rerank.py)
    num_leaves=15,        # shallow trees: a few hundred products
    min_data_in_leaf=10,  # no leaf for a handful of rows
    feature_fraction=0.9,
    lambda_l2=1.0,
    deterministic=True,   # same seed, same models
    force_row_wise=True,  # no auto choice (and no message) between row- and column-wise histograms
    num_threads=1,        # OpenMP threads spin at barriers: on 2 busy cores 2 threads fitted 6,000 rows 13x slower (57 s vs 4.3 s)
    verbose=-1,
)


@dataclass
class Candidates:
    """Candidate rows: one per (product, candidate class), a product's rows contiguous and in class order.

    `X` holds the features (columns `names`; float32, NaN where undefined: LightGBM's missing value).
    Per member m (score 0 / rank k where m does not hold the candidate in its top-k):
    `m:score`, `m:rank` (0 = best), `m:rel` (score / m's top score), `m:top1`, and per product
    `m:margin` (m's top score minus its second). Across members: `n_first` (members putting it first),
    `n_in` (members holding it), `mean_score`. `n_pictures` when known. With a picture store:
    `pic_first` (its probability in the product's first picture), `pic_later_max` (max over the later
    pictures; NaN with one picture), `pic_top1` (pictures whose top-1 it is, averaged over views).
    With an MD5 lookup: `md5_is` (it is the suggested class), `md5_share` (the product's lookup share)."""
    product_id: np.ndarray  # (P,) sorted: the union of the members' products
    offsets: np.ndarray     # (P+1,) rows of product i are offsets[i]:offsets[i+1]
    cls: np.ndarray         # (R,) int64 candidate class
    X: np.ndarray           # (R, F) float32
    names: list             # F feature names
    n_preds: np.ndarray     # (P,) the largest n_preds among the members holding the product
    k: int                  # candidates taken from each member's top-k
    n_classes: int | None = None

    def __len__(self): return len(self.cls)

    @property
    def row_product(self):
        "(R,) position in `product_id` of each row's product"
        return np.repeat(np.arange(len(self.product_id)), np.diff(self.offsets))

    def frame(self):
        "The table as a DataFrame: product_id, cls and one column per feature"
        df = pd.DataFrame(self.X, columns=self.names)
        df.insert(0, "cls", self.cls)
        df.insert(0, "product_id", self.product_id[self.row_product])
        return df

    def take(self, products):
        "The rows of the products at the given (ascending) positions"
        products = np.asarray(products, np.int64)
        counts = np.diff(self.offsets)[products]
        rows = np.repeat(self.offsets[products] - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())
        return Candidates(self.product_id[products], np.r_[0, np.cumsum(counts)], self.cls[rows], self.X[rows],
                          list(self.names), self.n_preds[products], self.k, self.n_classes)


def concat_candidates(parts):
    "One `Candidates` from blocks of consecutive products"
    parts = list(parts)
    if len(parts) == 1: return parts[0]
    offsets = np.r_[0, np.cumsum(np.concatenate([np.diff(p.offsets) for p in parts]))]
    p0 = parts[0]
    return Candidates(np.concatenate([p.product_id for p in parts]), offsets, np.concatenate([p.cls for p in parts]),
                      np.concatenate([p.X for p in parts]), list(p0.names), np.concatenate([p.n_preds for p in parts]),
                      p0.k, p0.n_classes)


# ---- inputs aligned to the products ----

def _aligned(pp, universe, k, name):
    "(P, k) classes (-1 absent), scores (0 absent), n_preds of a member over `universe`"
    pid = np.asarray(pp.product_id, np.int64)
    order = np.argsort(pid, kind="stable")
    spid = pid[order]
    if len(spid) > 1 and (spid[1:] == spid[:-1]).any():
        raise ValueError(f"member {name!r}: product_id {int(spid[1:][spid[1:] == spid[:-1]][0])} appears more than once")
    pos = np.searchsorted(universe, spid)
    P, kk = len(universe), min(k, pp.cls.shape[1])
    cls, score, n_preds = np.full((P, k), -1, np.int64), np.zeros((P, k)), np.zeros(P, np.int64)
    c, s = np.asarray(pp.cls)[order, :kk].astype(np.int64), np.asarray(pp.score, np.float64)[order, :kk]
    ok = (c >= 0) & np.isfinite(s)
    cls[pos, :kk] = np.where(ok, c, -1)
    score[pos, :kk] = np.where(ok, s, 0)
    n_preds[pos] = np.asarray(pp.n_preds)[order]
    return cls, score, n_preds


def _by_product(values, universe, what, fill):
    "A pd.Series (index product_id) or mapping -> (P,) float64 aligned to `universe`, `fill` where absent"
    if isinstance(values, dict): values = pd.Series(values)
    if not isinstance(values, pd.Series): raise ValueError(f"{what} must be a pd.Series indexed by product_id (or a dict)")
    if values.index.has_duplicates: raise ValueError(f"{what}: product ids appear more than once")
    return values.reindex(universe).astype(np.float64).fillna(fill).to_numpy()


def _md5_arrays(md5, universe):
    "md5: DataFrame product_id, cls, share (or ProductPredictions: cls[:, 0], score[:, 0]) -> (P,) class (-1), share (0)"
    if isinstance(md5, ProductPredictions):
        md5 = pd.DataFrame(dict(product_id=md5.product_id, cls=md5.cls[:, 0], share=md5.score[:, 0]))
    missing = {"product_id", "cls", "share"} - set(md5.columns)
    if missing: raise ValueError(f"md5 needs columns product_id, cls, share; missing {sorted(missing)}")
    m = md5.set_index("product_id")
    if m.index.has_duplicates: raise ValueError("md5: product ids appear more than once")
    m = m.reindex(universe)
    cls = m["cls"].fillna(-1).to_numpy(np.int64)
    share = np.where(cls >= 0, m["share"].fillna(0).to_numpy(np.float64), 0)
    return cls, share


def _picture_index(store, universe):
    "(P, J) store rows of each product's pictures in img_idx order (-1 pads), and (P,) picture counts"
    pid = np.asarray(store.product_id, np.int64)
    order = np.lexsort((np.asarray(store.img_idx), pid))
    spid = pid[order]
    pos = np.searchsorted(universe, spid)
    inside = (pos < len(universe)) & (universe[np.minimum(pos, max(len(universe) - 1, 0))] == spid) if len(universe) \
        else np.zeros(len(spid), bool)
    order, spid, pos = order[inside], spid[inside], pos[inside]
    first = np.flatnonzero(np.r_[True, spid[1:] != spid[:-1]]) if len(spid) else np.zeros(0, np.int64)
    counts_s = np.diff(np.r_[first, len(spid)])
    j = np.arange(len(spid)) - np.repeat(first, counts_s)
    J = int(counts_s.max(initial=1))
    pic = np.full((len(universe), J), -1, np.int64)
    pic[pos, j] = order
    counts = np.zeros(len(universe), np.int64)
    counts[pos[first]] = counts_s
    return pic, counts


# ---- the table ----

def candidate_table(members, n_pictures=None, pictures=None, md5=None, k=5, n_classes=None, block=BLOCK_PRODUCTS):
    """Candidates and features (`Candidates`) of every product of `members` (dict name -> ProductPredictions).

    Members are aligned by product_id: each may list the products in any order or miss some (a missing
    product contributes score 0 / rank k for every candidate). `n_pictures`: pd.Series (index product_id)
    of pictures per product; None: counted from `pictures` when given, else the feature is left out.
    `pictures`: a PredStore (one row per picture, e.g. step 07's ensemble store) for the picture-position
    features. `md5`: DataFrame product_id, cls, share (the class the MD5 lookup suggests and the share of
    matched train copies carrying it), or the lookup's ProductPredictions; its class joins the candidates.
    `n_classes` (default: the store's, or the members' own `n_classes` attribute): a member or store with
    another one, or a class index outside it, is a ValueError naming it.

    Cost: no Python loop per product; products are processed in blocks of `block` (about 10 rows each
    with 3 members x k=5), so the work arrays stay ~0.2 GB while the result holds R x F float32 features
    (about 1.8 GB for the 1.77 M test products x 3 members; `Reranker.predict_members` streams instead).
    bench/rerank.py measures time and peak memory."""
    return concat_candidates(iter_candidate_tables(members, n_pictures, pictures, md5, k, n_classes, block))


def iter_candidate_tables(members, n_pictures=None, pictures=None, md5=None, k=5, n_classes=None, block=BLOCK_PRODUCTS):
    "`candidate_table`'s blocks of `block` consecutive products (in product_id order), one `Candidates` each"
    if not members: raise ValueError("members is empty")
    if k < 1: raise ValueError(f"k must be >= 1, got {k}")
    names = list(members)
    n_classes = _check_classes(members, pictures, n_classes)
    universe = np.unique(np.concatenate([np.asarray(members[m].product_id, np.int64) for m in names]))
    aligned = [_aligned(members[m], universe, k, m) for m in names]
    n_preds = np.max([a[2] for a in aligned], axis=0)
    pic, counts = _picture_index(pictures, universe) if pictures is not None else (None, None)
    npic = _by_product(n_pictures, universe, "n_pictures", np.nan) if n_pictures is not None else \
        (counts.astype(np.float64) if counts is not None else None)
    md5c, md5s = _md5_arrays(md5, universe) if md5 is not None else (None, None)
    for a in range(0, max(len(universe), 1), block):
        b = min(a + block, len(universe))
        yield _block(names, [(c[a:b], s[a:b]) for c, s, _ in aligned], universe[a:b], n_preds[a:b], k, n_classes,
                     None if npic is None else npic[a:b], pictures, None if pic is None else pic[a:b],
                     None if md5c is None else (md5c[a:b], md5s[a:b]))


def _check_classes(members, pictures, n_classes):
    own = {m: getattr(pp, "n_classes", None) for m, pp in members.items()}
    if n_classes is None and pictures is not None: n_classes = int(pictures.n_classes)
    if n_classes is None: n_classes = next((v for v in own.values() if v is not None), None)
    if n_classes is None: return None
    if pictures is not None and int(pictures.n_classes) != n_classes:
        raise ValueError(f"the picture store has n_classes={pictures.n_classes}, expected {n_classes}")
    for m, pp in members.items():
        if own[m] is not None and own[m] != n_classes:
            raise ValueError(f"member {m!r} has n_classes={own[m]}, expected {n_classes}")
        c = np.asarray(pp.cls)
        if c.size and int(c.max()) >= n_classes:
            raise ValueError(f"member {m!r} holds class {int(c.max())}, outside n_classes={n_classes}")
    return n_classes


def _block(names, aligned, pid, n_preds, k, n_classes, npic, store, pic, md5):
    "The `Candidates` of one block of products"
    B, M = len(pid), len(names)
    C = np.concatenate([c for c, _ in aligned] + ([md5[0][:, None]] if md5 is not None else []), axis=1)
    C.sort(axis=1)
    new = C >= 0
    new[:, 1:] &= C[:, 1:] != C[:, :-1]
    bi, col = np.nonzero(new)  # row-major: products in order, classes ascending within each
    c = C[bi, col]
    counts = np.bincount(bi, minlength=B)
    fnames = feature_names(names, npic is not None, store is not None, md5 is not None)
    X = np.empty((len(c), len(fnames)), np.float32)  # columns written one at a time: no float64 copies of the table
    col = iter(range(len(fnames)))
    def put(v): X[:, next(col)] = v
    n_first, n_in, total = np.zeros(len(c), np.float32), np.zeros(len(c), np.float32), np.zeros(len(c))
    for mc, ms in aligned:
        eq = mc[bi] == c[:, None]
        has = eq.any(1)
        rank = np.where(has, eq.argmax(1), k)
        score = np.where(has, ms[bi, np.minimum(rank, k - 1)], 0.0)
        top = ms[bi, 0]
        second = ms[:, 1] if k > 1 else np.zeros(B)
        put(score); put(rank)
        put(np.divide(score, top, out=np.zeros_like(score), where=top > 0))
        put(rank == 0)
        put(np.where(mc[:, 0] >= 0, ms[:, 0] - second, 0.0)[bi])
        n_first += rank == 0; n_in += has; total += score
    put(n_first); put(n_in); put(total / M)
    if npic is not None: put(npic[bi])
    if store is not None:
        for v in _picture_features(store, pic[bi], c): put(v)
    if md5 is not None:
        put(md5[0][bi] == c); put(md5[1][bi])
    return Candidates(pid, np.r_[0, np.cumsum(counts)], c, X, fnames, n_preds, k, n_classes)


def feature_names(members, n_pictures=False, pictures=False, md5=False):
    "The table's feature columns, in order (see `Candidates`)"
    out = [f"{m}:{f}" for m in members for f in ("score", "rank", "rel", "top1", "margin")] + ["n_first", "n_in", "mean_score"]
    return out + ["n_pictures"] * n_pictures + ["pic_first", "pic_later_max", "pic_top1"] * pictures + ["md5_is", "md5_share"] * md5


def _picture_features(store, pic, c):
    "pic (R, J) store rows of each candidate row's product -> pic_first, pic_later_max, pic_top1 (R,)"
    R, J = pic.shape
    first, later, top1 = np.zeros(R), np.full(R, np.nan), np.zeros(R)
    spread = store.spread()  # (n, views)
    cc = c.astype(np.int32)
    for j in range(J):  # J: the most pictures of a product (4 in the competition)
        sel = np.flatnonzero(pic[:, j] >= 0)
        if not len(sel): continue
        rows = pic[sel, j]
        sc = store.cls[rows]                       # (S, V, k)
        eq = sc == cc[sel, None, None]
        p = np.where(eq.any(-1), (store.prob[rows] * eq).sum(-1), spread[rows]).mean(1)
        top1[sel] += (sc[:, :, 0] == cc[sel, None]).mean(1)
        if j == 0: first[sel] = p
        else: later[sel] = np.fmax(later[sel], p)
    return first, later, top1


# ---- the model ----

def _params(objective, seed, params):
    if objective not in OBJECTIVES: raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    p = dict(PARAMS, objective=objective, seed=seed)
    if objective == "lambdarank": p.update(metric="ndcg", eval_at=[1])
    p.update(params or {})
    return p


def train_model(X, label, group_sizes, params, rounds=ROUNDS):
    "A LightGBM booster over candidate rows (group_sizes: rows per product, for lambdarank)"
    import lightgbm as lgb
    ds = lgb.Dataset(X, label=label.astype(np.float32), group=group_sizes if params["objective"] == "lambdarank" else None,
                     params=dict(verbose=-1), free_raw_data=True)
    return lgb.train(params, ds, num_boost_round=rounds)


def _labels(table, truth):
    "truth (pd.Series indexed by product_id, or (P,) aligned to table.product_id) -> (P,) classes"
    if isinstance(truth, (pd.Series, dict)):
        t = pd.Series(truth)
        missing = np.setdiff1d(table.product_id, t.index.to_numpy())
        if len(missing):
            raise ValueError(f"truth is missing for {len(missing)} product(s), e.g. product_id {missing[:5].tolist()}")
        return t.reindex(table.product_id).to_numpy(np.int64)
    t = np.asarray(truth)
    if t.shape != table.product_id.shape:
        raise ValueError(f"truth has shape {t.shape}; expected one class per product, {table.product_id.shape} "
                         "(or a pd.Series indexed by product_id)")
    if (t < 0).any(): raise ValueError(f"truth is missing (negative) for {int((t < 0).sum())} product(s)")
    return t.astype(np.int64)


def product_folds(n_products, n_folds, seed):
    "(P,) fold of each product: a seeded permutation dealt round-robin, so fold sizes differ by at most one"
    if n_folds < 2: raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n_products < n_folds: raise ValueError(f"{n_products} products are fewer than n_folds={n_folds}")
    fold = np.empty(n_products, np.int64)
    fold[np.random.default_rng(seed).permutation(n_products)] = np.arange(n_products) % n_folds
    return fold


@dataclass
class Reranker:
    "Fold models of `fit_oof`, their training and scored products, and the out-of-fold scores of the validation table"
    models: list            # lightgbm.Booster per fold
    train_ids: list         # per fold: product ids the model was trained on
    scored_ids: list        # per fold: product ids the model scored out of fold (disjoint from its train_ids)
    names: list             # feature names the models expect
    k: int
    n_classes: int | None
    objective: str
    params: dict
    rounds: int
    table: Candidates = field(repr=False)      # the validation table
    oof_raw: np.ndarray = field(repr=False)    # (R,) each row's raw score from the model that did not see it

    def oof_predictions(self, k_out=None) -> ProductPredictions:
        "Out-of-fold ProductPredictions of the validation products"
        return _to_predictions(self.table, self.oof_raw, k_out or self.k)

    def raw_scores(self, table, num_threads=None):
        """(R,) mean of the fold models' raw scores. Costs ~20 us per row and thread (5 folds x 100 trees),
        ~5 min of one core for the 1.77 M test products x ~9 candidates; `num_threads` (default: the
        fit's, 1) on an otherwise idle machine divides it."""
        self._check(table)
        if not len(table): return np.zeros(0)
        nt = num_threads or self.params.get("num_threads", 1)
        return np.mean([m.predict(table.X, raw_score=True, num_threads=nt) for m in self.models], axis=0)

    def predict(self, table, k_out=None, num_threads=None) -> ProductPredictions:
        "Re-ranked ProductPredictions of the table's products (test): candidates by mean fold score, softmax per product"
        return _to_predictions(table, self.raw_scores(table, num_threads), k_out or self.k)

    def predict_members(self, members, n_pictures=None, pictures=None, md5=None, k_out=None, block=BLOCK_PRODUCTS,
                        num_threads=None):
        "`predict(candidate_table(...))` a block of products at a time: the memory of one block's table"
        parts = [self.predict(t, k_out, num_threads) for t in iter_candidate_tables(members, n_pictures, pictures, md5,
                                                                                     self.k, self.n_classes, block)]
        return ProductPredictions(*[np.concatenate(x) for x in zip(*[(p.product_id, p.n_preds, p.pred_class, p.cls, p.score)
                                                                      for p in parts])])

    def _check(self, table):
        if list(table.names) != list(self.names):
            raise ValueError(f"the table's features {table.names} differ from the models' {self.names} "
                             "(other members, or pictures / md5 / n_pictures given at fit but not here, or the reverse)")
        if table.k != self.k: raise ValueError(f"the table takes top-{table.k} candidates, the models top-{self.k}")
        if self.n_classes is not None and table.n_classes is not None and table.n_classes != self.n_classes:
            raise ValueError(f"the table has n_classes={table.n_classes}, the models {self.n_classes}")


def fit_oof(table, truth, n_folds=5, seed=0, params=None, objective=OBJECTIVE, rounds=ROUNDS) -> Reranker:
    """Fit the re-ranker on validation products out of fold: `Reranker` with one model per fold.

    `truth`: the true class of every product of `table` (pd.Series indexed by product_id, or an array
    aligned to table.product_id). Folds are by product (`product_folds`, seeded). A product whose true
    class is not among its candidates still trains (all its rows negative). `params` override PARAMS
    (LightGBM names); `objective` "binary" (label: candidate == truth) or "lambdarank" (grouped by product)."""
    y = _labels(table, truth)
    P = len(table.product_id)
    fold = product_folds(P, n_folds, seed)
    p = _params(objective, seed, params)
    label = (table.cls == y[table.row_product]).astype(np.float32)
    row_fold = fold[table.row_product]
    counts = np.diff(table.offsets)
    models, train_ids, scored_ids = [], [], []
    raw = np.full(len(table), np.nan)
    for f in range(n_folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        rows = row_fold != f
        model = train_model(table.X[rows], label[rows], counts[tr][counts[tr] > 0], p, rounds)
        scored = row_fold == f
        if scored.any(): raw[scored] = model.predict(table.X[scored], raw_score=True, num_threads=p.get("num_threads", 1))
        models.append(model)
        train_ids.append(table.product_id[tr]); scored_ids.append(table.product_id[te])
    return Reranker(models, train_ids, scored_ids, list(table.names), table.k, table.n_classes, objective, p, rounds,
                    table, raw)


def _to_predictions(table, raw, k_out):
    "Rows' raw scores -> ProductPredictions: candidates by score (ties: lower class), softmax over each product"
    counts = np.diff(table.offsets)
    prob = np.zeros(len(raw))
    if len(raw):
        starts = table.offsets[:-1][counts > 0]
        mx = np.maximum.reduceat(raw, starts)
        e = np.exp(raw - np.repeat(mx, counts[counts > 0]))
        prob = e / np.repeat(np.add.reduceat(e, starts), counts[counts > 0])
    runs = Runs(table.row_product, table.cls, None, table.offsets)
    cls, score, _ = top_runs(runs, prob, k_out)
    return ProductPredictions(table.product_id.copy(), table.n_preds.copy(), cls[:, 0].copy(), cls, score)


def average_seeds(parts, k_out, n_classes) -> ProductPredictions:
    "The mean of several ProductPredictions' scores over the same products (one per seed): mean aggregation of their rows"
    base = parts[0]
    if len(parts) == 1:
        return base
    if any(not np.array_equal(pp.product_id, base.product_id) for pp in parts):
        raise ValueError("re-ranker seeds scored different products")
    cls = np.concatenate([pp.cls for pp in parts])
    score = np.concatenate([pp.score for pp in parts])
    prob = np.where((cls >= 0) & np.isfinite(score), score, 0.0)
    mean = mean_aggregate(np.tile(base.product_id, len(parts)), cls, prob, None, n_classes, k_out=k_out)
    return ProductPredictions(base.product_id, base.n_preds, mean.pred_class, mean.cls, mean.score)


def fit_seeds(members, truth, inputs, seeds, accuracy, k=5, n_folds=5, n_classes=None, log=print):
    """One re-ranker per seed (its own fold assignment and LightGBM seed), fitted out of fold on the
    validation products, scoring test a block of products at a time; their probabilities averaged.

    members: {"valid"/"test": {name: ProductPredictions}}; inputs: {split: dict(n_pictures=, pictures=,
    md5=)}, the features `candidate_table` takes; accuracy(pp, split) -> float scores each seed.
    Returns ({split: ProductPredictions, seeds averaged}, DataFrame of each seed's accuracy per split)."""
    splits = ("valid", "test")
    inputs = {s: dict(inputs[s]) for s in splits}
    if any(inputs[s].get("md5") is not None for s in splits):  # the same features on both sides, matches or not
        for s in splits:
            if inputs[s].get("md5") is None:
                inputs[s]["md5"] = pd.DataFrame({"product_id": np.zeros(0, np.int64), "cls": np.zeros(0, np.int64),
                                                 "share": np.zeros(0)})
    valid = candidate_table(members["valid"], k=k, n_classes=n_classes, **inputs["valid"])
    per_seed, rows = {}, {}
    for seed in seeds:
        rr = fit_oof(valid, truth, n_folds=min(n_folds, len(valid.product_id)), seed=seed)
        # test: the candidate table a block of products at a time (the whole test table would be ~3.7 GB)
        per_seed[seed] = {"valid": rr.oof_predictions(), "test": rr.predict_members(members["test"], **inputs["test"])}
        rows[seed] = {s: accuracy(pp, s) for s, pp in per_seed[seed].items()}
        log(f"re-ranker seed {seed}: validation (out of fold) {rows[seed]['valid']:.4f}, test {rows[seed]['test']:.4f}")
    out = {s: average_seeds([per_seed[seed][s] for seed in seeds], k, n_classes) for s in splits}
    return out, pd.DataFrame(rows).T.rename_axis("seed")[list(splits)]
