"""Step 08: from picture predictions to product predictions: mean vs belief aggregation, then MD5.

Rows: `pictures` aggregates the stage's ensemble store (one prediction per picture, step 07); `all`
aggregates every picture x model x view of the members' stores (the study's wording). Mean and
belief aggregation both run; `method="auto"` keeps the one better on validation for test, and chooses
inside folds for validation (`cdkit.infer.selection.choose_per_fold`: each fold of validation products takes
the method better on the other folds), so the final validation figure is out of fold.

MD5 is applied after aggregation, to whichever method won: a product with pictures byte-identical to
train pictures takes those pictures' train labels (blended with weight `md5_alpha`; 1 = override),
and a product whose whole set of pictures equals a train product's takes that product's label
(`md5_products`, applied last). Only decisive matches count (`md5_min_share`: most train copies agree
on the label); a generic picture shared by many categories says nothing about the product. Applied before aggregation, as rows among the others, the train
labels were excluded as outliers by belief aggregation (bench/md5_compose.py measures both). On
validation the lookup uses only the train products outside the validation split, so the validation
figure is an honest estimate of what the lookup adds on test.

Writes `RunLayout.products(stage, split)`: product_id, pred_class, category_id, score, md5."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from cdkit.steps.entry import step_entry
from cdkit.base.metrics import accuracy_by_level, accuracy_by_n_pictures
from cdkit.infer.aggregate import (ProductPredictions, aggregate_stores,
                         blend_products, mean_aggregate, prediction_rows)
from cdkit.base.params import RunParams, Seed
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.runs import SPLITS, ModelNames, RunLayout
from cdkit.steps.predict import DEMO_MEMBERS


class AggregateParams(RunParams):
    "Parameters of notebooks/08_belief_aggregation.ipynb and `cdkit aggregate`"
    models: ModelNames = Field(default_factory=lambda: list(DEMO_MEMBERS), min_length=1)  # members, for rows "all" and the re-ranker
    stage: Literal["base", "pseudo"] = "base"  # base: steps 06-08 on the trained models; pseudo: step 09's pass
    rows: Literal["pictures", "all"] = "pictures"  # pictures: one prediction per picture, the ensemble of 07; all: every picture x model x view (the study's wording)
    method: Literal["auto", "mean", "belief", "rerank"] = "auto"  # auto: whichever is better on validation (the re-ranker's figure is out of fold)
    m: int = Field(5, ge=1, le=100)       # candidates: union of each prediction's top-m classes
    z: float = Field(1.96, gt=0, le=10)   # 95% Gaussian interval
    rule: Literal["gaussian", "ratio"] = "gaussian"  # gaussian (the study) or ratio (the authors' code: 0.5x / 2x)
    score: Literal["sum", "mean"] = "sum"  # sum of included probabilities (the study) or their mean
    min_preds: int = Field(3, ge=2, le=10000)  # below this many predictions nothing is excluded
    ddof: int = Field(1, ge=0, le=1)      # sd of the other predictions: 1 sample, 0 population (gaussian rule)
    atol: float = Field(0.01, ge=0, le=1)  # a value within this of the others' mean is never excluded (0: the literal rule)
    all_excluded: Literal["zero", "mean"] = "zero"  # score of a candidate whose every prediction is excluded: 0, or the plain mean (the authors')
    belief: Literal["poster", "authors", "kit"] = "kit"  # named settings of belief aggregation (docs/STUDY.md): poster and authors fix m, z, rule, score, min_preds, ddof, atol, all_excluded; kit takes them as given
    md5: bool = True                      # pictures identical to train pictures take their train labels (after aggregation)
    md5_alpha: float = Field(1.0, ge=0, le=1)  # weight of the train labels in that blend (1: override)
    md5_min_share: float = Field(0.5, gt=0, le=1)  # a match counts when this share of its train copies carry its top label (generic pictures shared by many categories do not)
    md5_products: bool = True             # a product whose set of pictures equals a train product's takes its label
    n_grid: int = Field(8, ge=0, le=64)   # products shown where belief aggregation excluded a picture
    rerank: bool = True                   # second level: LightGBM over the candidates of mean, belief and each member, trained on validation out of fold
    rerank_k: int = Field(5, ge=1, le=50)  # candidates: each prediction's top-k
    rerank_folds: int = Field(5, ge=2, le=20)  # folds of the validation products (each scored by the model trained without it)
    rerank_seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1, max_length=100)  # one fold assignment and LightGBM seed each; the re-ranker averages them, the report gives their spread

    @model_validator(mode="before")
    @classmethod
    def _belief_settings(cls, data):
        """belief='poster' or 'authors' fills in its settings; a value given that differs is refused after. A
        value equal to the class default counts as not given: a notebook's parameters cell repeats every
        default, so `-p belief authors` (or a params file) must not collide with them"""
        from cdkit.infer.aggregate import BELIEF_SETTINGS
        if isinstance(data, dict) and data.get("belief") in ("poster", "authors"):
            named = BELIEF_SETTINGS[data["belief"]]
            kept = {k: v for k, v in data.items() if not (k in named and v == cls.model_fields[k].default)}
            data = {**named, **kept}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        from cdkit.infer.aggregate import BELIEF_SETTINGS, min_preds_needed
        if self.belief != "kit":
            bad = {k: v for k, v in BELIEF_SETTINGS[self.belief].items() if getattr(self, k) != v}
            if bad:
                raise ValueError(f"belief={self.belief!r} sets " + ", ".join(f"{k}={v!r}" for k, v in bad.items())
                                 + "; given " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                                 + ". Drop those keys, or use belief='kit' to set them freely")
        need = min_preds_needed(self.rule, self.ddof)
        if self.min_preds < need:
            raise ValueError(f"min_preds={self.min_preds} with rule={self.rule!r} and ddof={self.ddof}: at least {need} "
                             "predictions are needed to exclude one (the sd of the others needs two values)")
        if self.md5_products and not self.md5:
            raise ValueError("md5_products=True needs md5=True (the product-set lookup uses the same picture digests)")
        if self.method == "rerank" and not self.rerank:
            raise ValueError("method='rerank' contradicts rerank=False: the re-ranker would not be trained")
        if len(set(self.rerank_seeds)) != len(self.rerank_seeds) or any(x < 0 for x in self.rerank_seeds):
            raise ValueError(f"rerank_seeds={self.rerank_seeds}: distinct non-negative integers")
        return self


def belief_kwargs(P: AggregateParams) -> dict:
    "The settings `cdkit.infer.aggregate.belief_aggregate` runs with (those of `P.belief`, filled in by the params)"
    return dict(m=P.m, z=P.z, rule=P.rule, score=P.score, min_preds=P.min_preds, ddof=P.ddof, atol=P.atol,
                all_excluded=P.all_excluded)


@dataclass
class Md5Summary:
    "What the lookup matched on one split"
    pictures: int = 0                     # pictures byte-identical to (non-validation) train pictures that agree on a label
    generic: int = 0                      # pictures matched too, but whose train copies spread over categories (not used)
    products: int = 0                     # products with at least one such picture
    product_sets: int = 0                 # products whose whole set of pictures equals a train product's
    changed: int = 0                      # products whose prediction the lookup changed


@dataclass
class AggregateResult:
    stage: str
    chosen: str                           # mean, belief or rerank: the method the products were made with
    accuracy: pd.DataFrame                # index mean, belief (, rerank), final (chosen + MD5); columns valid, test
    products: dict                        # {split: Path} written
    md5: dict = field(default_factory=dict)           # {split: Md5Summary}
    by_pictures: pd.DataFrame = None      # accuracy by pictures per product, per split and method
    by_level: pd.DataFrame = None         # accuracy at each hierarchy level, per split and method
    predictions: dict = field(default_factory=dict)   # {(split, method): ProductPredictions} (for plots)
    stores: dict = field(default_factory=dict)        # {split: [PredStore]} whose rows were aggregated
    rerank_seeds: pd.DataFrame = None     # per re-ranker seed: validation (out of fold) and test accuracy
    chosen_per_fold: dict = None          # method="auto": {fold of validation products: method better on the other folds}
    in_sample: float = None               # method="auto": validation accuracy of `chosen` (+MD5) on all of validation, chosen there

    @property
    def final_name(self) -> str:
        return f"{self.chosen} + MD5" if self.md5 else self.chosen


def _stores(P: AggregateParams, layout: RunLayout, split):
    from cdkit.infer.store import load_store
    if P.rows == "all":
        return [load_store(layout.store(m, split)) for m in P.models]
    return [load_store(layout.ensemble_store(P.stage, split))]


def _check_pairs(P: AggregateParams, layout: RunLayout, stores):
    "Each store's valid and test halves come from one run of the step that wrote them"
    from cdkit.runs import rewrites_ensemble, rewrites_store, same_generation
    names = P.models if P.rows == "all" else [f"ensemble-{P.stage}"]
    for i, name in enumerate(names):
        same_generation([stores[s][i] for s in SPLITS],
                        rewrites_store(name) if P.rows == "all" else rewrites_ensemble(P.stage))


def picture_hashes(prep: Prepared, which, log=print):
    "MD5 digests (n, 16) of every picture of train or test in image-table order, hashed once and cached"
    from cdkit.data.bsonfile import BsonReader
    from cdkit.base.io import atomic_write
    from cdkit.infer.md5 import hash_pictures
    images = prep.train_images() if which == "train" else prep.test_images()
    cache = prep.work_dir / f"{which}_md5.npy"
    if cache.exists() and cache.stat().st_mtime_ns >= (prep.work_dir / f"{which}_index.parquet").stat().st_mtime_ns:
        hashes = np.load(cache)
        if hashes.shape == (len(images), 16):
            return hashes, images
    log(f"hashing {len(images):,} {which} pictures (MD5)")
    hashes = hash_pictures(BsonReader(prep.train_bson if which == "train" else prep.test_bson), images)
    atomic_write(cache, lambda tmp: np.save(open(tmp, "wb"), hashes))
    return hashes, images


def md5_votes(prep: Prepared, split, min_share=0.5, product_sets=True, log=print):
    """The MD5 lookup of one split, before it touches any prediction: (votes, sets, summary).
    votes: ProductPredictions of the decisive picture matches (the train labels of a product's pictures
    that are byte-identical to train pictures, where at least `min_share` of the copies agree), or None;
    sets: (product_id, cls, prob) of the products whose whole set of pictures equals a train product's, or
    None. The lookup table holds the train pictures outside the validation split (all of train for test)."""
    from cdkit.infer.md5 import md5_label_table, md5_lookup, product_keys
    train_h, train_img = picture_hashes(prep, "train", log)
    if split == "valid":  # validation products look up the other train products only
        lookup = ~prep.valid_mask(train_img)
        h, images = train_h[~lookup], train_img[~lookup].reset_index(drop=True)
    else:  # test products look up every labeled product
        lookup = np.ones(len(train_img), bool)
        h, images = picture_hashes(prep, "test", log)
    n_classes = prep.catalog.n_classes
    table = md5_label_table(train_h[lookup], train_img["label"].to_numpy()[lookup], n_classes)
    match = md5_lookup(h, table)
    decisive = match.found & (match.prob[:, 0] >= min_share)
    summary = Md5Summary(pictures=int(decisive.sum()), generic=int((match.found & ~decisive).sum()))
    pid, cls, prob = images["product_id"].to_numpy()[decisive], match.cls[decisive], match.prob[decisive]
    votes = sets = None
    if len(pid):
        votes = mean_aggregate(pid, cls, prob, np.zeros(len(pid), np.float32), n_classes, k_out=cls.shape[1])
        votes.score = np.where(np.isfinite(votes.score), votes.score, 0.0)
        summary.products = len(votes.product_id)
    if product_sets:
        tr_pid, tr_key = product_keys(train_h[lookup], train_img["product_id"].to_numpy()[lookup])
        idx = prep.train_index.set_index("product_id")["category_id"]
        tr_cls = prep.catalog.to_class(idx.reindex(tr_pid).to_numpy())
        te_pid, te_key = product_keys(h, images["product_id"].to_numpy())
        pmatch = md5_lookup(te_key, md5_label_table(tr_key, tr_cls, n_classes))
        sel = pmatch.found & (pmatch.prob[:, 0] >= min_share)
        summary.product_sets = int(sel.sum())
        if sel.any():
            sets = (te_pid[sel], pmatch.cls[sel], pmatch.prob[sel])
    return votes, sets, summary


def apply_md5(pp: ProductPredictions, prep: Prepared, split, alpha=1.0, product_sets=True, min_share=0.5, log=print,
              lookup=None):
    """MD5 after aggregation on one split: (ProductPredictions, Md5Summary). A match is used only when
    at least `min_share` of its train copies carry its top label: a generic picture (a logo, a "no image"
    placeholder) is byte-identical across many categories, and overriding a product with its spread
    labels lowered the demo's test accuracy from 0.743 to 0.710, where decisive matches alone raise it
    to 0.756. `lookup`: `md5_votes`' result when already computed."""
    from dataclasses import replace
    votes, sets, summary = lookup or md5_votes(prep, split, min_share, product_sets, log)
    summary = replace(summary)
    out = pp
    if votes is not None:
        k = min(votes.cls.shape[1], pp.cls.shape[1])
        out, _ = blend_products(pp, votes.product_id, votes.cls[:, :k], votes.score[:, :k], alpha)
    if product_sets and sets is not None:
        out, _ = blend_products(out, *sets, alpha)
    summary.changed = int((out.pred_class != pp.pred_class).sum())
    return out, summary


def rerank_products(P, prep: Prepared, stores, members, md5, log=print):
    """The second level (`cdkit.infer.rerank`): candidates of the mean and belief products and of each member's
    own products, picture-position features from the aggregated store, MD5 suggestions; fitted on the
    validation products out of fold, one re-ranker per seed, their probabilities averaged. Returns
    ({split: ProductPredictions}, DataFrame of each seed's accuracy)."""
    from cdkit.infer.rerank import candidate_table, fit_oof
    truth = prep.truth("valid")
    n_pics = {"valid": prep.train_index, "test": prep.test_index}
    inputs = {}
    for split in SPLITS:
        idx = n_pics[split]
        inputs[split] = dict(n_pictures=pd.Series(idx["n_imgs"].to_numpy(), index=idx["product_id"].to_numpy()),
                             pictures=stores[split][0] if len(stores[split]) == 1 else None,
                             md5=md5[split][0] if md5.get(split) else None)
    if any(inputs[s]["md5"] is not None for s in SPLITS):  # the same features on both sides, matches or not
        for s in SPLITS:
            if inputs[s]["md5"] is None:
                inputs[s]["md5"] = pd.DataFrame({"product_id": np.zeros(0, np.int64), "cls": np.zeros(0, np.int64),
                                                 "share": np.zeros(0)})
    valid = candidate_table(members["valid"], k=P.rerank_k, n_classes=prep.catalog.n_classes, **inputs["valid"])
    per_seed, out, rows = {}, {}, {}
    for seed in P.rerank_seeds:
        rr = fit_oof(valid, truth, n_folds=min(P.rerank_folds, len(valid.product_id)), seed=seed)
        # test: the candidate table a block of products at a time (the whole test table would be ~3.7 GB)
        per_seed[seed] = {"valid": rr.oof_predictions(), "test": rr.predict_members(members["test"], **inputs["test"])}
        rows[seed] = {s: prep.accuracy(pp.product_id, pp.pred_class, s) for s, pp in per_seed[seed].items()}
        log(f"re-ranker seed {seed}: validation (out of fold) {rows[seed]['valid']:.4f}, test {rows[seed]['test']:.4f}")
    for split in SPLITS:
        parts = [per_seed[s][split] for s in P.rerank_seeds]
        out[split] = _average_products(parts, P.rerank_k, prep.catalog.n_classes)
    return out, pd.DataFrame(rows).T.rename_axis("seed")[list(SPLITS)]


def _average_products(parts, k_out, n_classes):
    "The mean of several ProductPredictions' scores over the same products: mean aggregation of their rows"
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


def save_products(pp: ProductPredictions, prep: Prepared, path, md5_changed=None, generation=None):
    """product_id, pred_class, category_id, score (+ md5: the lookup changed it) as Parquet, atomically,
    with the generation that the stage's valid and test products share"""
    from cdkit.runs import new_generation, write_products
    df = pp.to_frame()
    df["category_id"] = prep.catalog.to_category(np.maximum(df["pred_class"].to_numpy(), 0))
    if md5_changed is not None:
        df["md5"] = md5_changed
    return write_products(df, path, generation or new_generation())


@step_entry("aggregate", saves_params=True)
def run(P: AggregateParams, prep: Prepared = None, log=print, save=True) -> AggregateResult:
    "Aggregate, choose, apply MD5, write the products; `save`: record P as the step-08 settings (step 09 replays them)"
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    layout = RunLayout.of(P.run_dir)
    belief_kw = belief_kwargs(P)
    preds, stores = {}, {}
    for split in SPLITS:
        # a block of whole products at a time: every picture x model x view row of the test set would
        # not fit in memory at once (rows="all": 62 M rows with 4 models x 5 views)
        stores[split] = _stores(P, layout, split)
        preds[(split, "mean")] = aggregate_stores(stores[split], "mean")
        preds[(split, "belief")] = aggregate_stores(stores[split], "belief", **belief_kw)
    _check_pairs(P, layout, stores)
    lookups = {split: md5_votes(prep, split, P.md5_min_share, P.md5_products, log) for split in SPLITS} if P.md5 else {}
    rerank_seeds = None
    if P.rerank:
        from cdkit.infer.store import load_store
        from cdkit.runs import check_stores
        for m in P.models:
            check_stores(layout, m)
        members = {split: {"mean": preds[(split, "mean")], "belief": preds[(split, "belief")],
                           **{m: aggregate_stores([load_store(layout.store(m, split))], "mean") for m in P.models}}
                   for split in SPLITS}
        rr, rerank_seeds = rerank_products(P, prep, stores, members, lookups, log)
        for split in SPLITS:
            preds[(split, "rerank")] = rr[split]
    acc = {(split, name): prep.accuracy(pp.product_id, pp.pred_class, split) for (split, name), pp in preds.items()}
    methods = ["mean", "belief"] + (["rerank"] if P.rerank else [])
    chosen, per_fold, in_sample, unfolded = P.method, None, None, {}
    if P.method == "auto":  # ties to the simpler method (the earlier in `methods`)
        chosen, per_fold, pick = _choose(preds, methods, prep)
        unfolded = {"valid": preds[("valid", chosen)]}  # the old figure: chosen on all of validation
        preds[("valid", "chosen per fold")] = _pick_products({m: preds[("valid", m)] for m in methods}, pick)
    md5, paths = {}, {}
    from cdkit.runs import new_generation
    generation = new_generation()  # valid and test products: one generation, so a kill between them shows
    for split in SPLITS:
        made = preds[(split, "chosen per fold")] if (split, "chosen per fold") in preds else preds[(split, chosen)]
        final = made
        changed = None
        if P.md5:
            final, md5[split] = apply_md5(final, prep, split, P.md5_alpha, P.md5_products, P.md5_min_share, log,
                                          lookup=lookups[split])
            changed = final.pred_class != made.pred_class
            log(f"MD5 ({split}): {md5[split].pictures} pictures ({md5[split].generic} generic ones left out), "
                f"{md5[split].products} products matched, "
                f"{md5[split].product_sets} whole product sets; {md5[split].changed} predictions changed")
        if split in unfolded:
            u = apply_md5(unfolded[split], prep, split, P.md5_alpha, P.md5_products, P.md5_min_share, log,
                          lookup=lookups[split])[0] if P.md5 else unfolded[split]
            in_sample = prep.accuracy(u.product_id, u.pred_class, split)
        preds[(split, "final")] = final
        acc[(split, "final")] = prep.accuracy(final.product_id, final.pred_class, split)
        paths[split] = save_products(final, prep, layout.products(P.stage, split), changed, generation)
    preds.pop(("valid", "chosen per fold"), None)
    by_pictures, by_level = _breakdowns(preds, prep)
    table = pd.Series(acc).unstack(0).reindex(methods + ["final"])[list(SPLITS)]
    return AggregateResult(P.stage, chosen, table, paths, md5, by_pictures, by_level, preds, stores, rerank_seeds,
                           per_fold, in_sample)


def _choose(preds, methods, prep: Prepared):
    """(method better on all validation products, {fold: method better on the other folds}, the method
    each validation product is scored with), the folds those of `cdkit.infer.selection.validation_folds`"""
    from cdkit.infer.selection import choose_per_fold, validation_folds
    truth = prep.truth("valid")
    ids = preds[("valid", methods[0])].product_id
    t = truth.reindex(ids).to_numpy()
    correct = {}
    for m in methods:
        pp = preds[("valid", m)]
        got = pd.Series(pp.pred_class, index=pp.product_id).reindex(ids).to_numpy()
        correct[m] = (got == t).astype(float)
    chosen, per_fold, pick, _, _ = choose_per_fold(pd.DataFrame(correct, index=ids), validation_folds(truth.index))
    return chosen, per_fold, pick


def _pick_products(parts: dict, pick: pd.Series) -> ProductPredictions:
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


def _breakdowns(preds, prep: Prepared):
    bp, bl = [], []
    n_pics = {"valid": prep.train_index, "test": prep.test_index}
    for (split, name), pp in preds.items():
        true = prep.truth(split)
        if true is None:
            continue
        t = true.reindex(pp.product_id).to_numpy()
        idx = n_pics[split]
        npic = pd.Series(idx["n_imgs"].to_numpy(), index=idx["product_id"].to_numpy()).reindex(pp.product_id).to_numpy()
        bp.append(accuracy_by_n_pictures(pp.pred_class, t, npic).assign(split=split, method=name))
        bl.append(accuracy_by_level(pp.pred_class, t, prep.catalog.level1, prep.catalog.level2)
                  .assign(split=split, method=name))
    return (pd.concat(bp, ignore_index=True) if bp else pd.DataFrame(),
            pd.concat(bl, ignore_index=True) if bl else pd.DataFrame())


def record(run_dir, R: AggregateResult, step="aggregate"):
    "The study's rows of this stage, each from its own aggregation"
    from cdkit.steps.report import LEVERS, VALID_IS, recorder
    rec = recorder(step)
    from cdkit.infer.selection import IN_SAMPLE, OUT_OF_FOLD
    a = R.accuracy
    # every row's validation figure is out of fold: the ensemble store is, the re-ranker is fitted out of fold,
    # and with method="auto" each fold's products take the method chosen on the other folds
    if R.stage == "base":
        rec(run_dir, "study", "ensemble + belief aggregation",
            {"test": a.loc["belief", "test"], "valid": a.loc["belief", "valid"], VALID_IS: OUT_OF_FOLD,
             "mean of the same rows": a.loc["mean", "test"]})
        if R.md5:
            rec(run_dir, "study", "+MD5 lookup", {"test": a.loc["final", "test"], "valid": a.loc["final", "valid"],
                                                  VALID_IS: OUT_OF_FOLD, "on": R.chosen})
    section = f"08 aggregation ({R.stage})"
    rec(run_dir, section, "chosen on validation", R.chosen)
    if R.chosen_per_fold is not None:
        rec(run_dir, section, "chosen per fold of validation products", R.chosen_per_fold)
        rec(run_dir, section, f"final, {R.chosen} chosen on all of validation",
            {"valid": round(float(R.in_sample), 4), VALID_IS: IN_SAMPLE})
    rec(run_dir, section, "product accuracy", {R.final_name if k == "final" else k: {**v, VALID_IS: OUT_OF_FOLD}
                                               for k, v in a.round(4).to_dict(orient="index").items()})
    for split, s in R.md5.items():
        rec(run_dir, section, f"MD5 {split}", dict(s.__dict__))
    if R.by_level is not None and len(R.by_level):
        lv = R.by_level[R.by_level["method"] == "final"]
        rec(run_dir, section, "accuracy per hierarchy level (final)",
            {f"{r.split} {r.level}": round(float(r.accuracy), 4) for r in lv.itertuples()})
    if R.rerank_seeds is not None:
        t = R.rerank_seeds
        mean, sd = t.mean(), (t.std(ddof=1) if len(t) > 1 else t.mean() * 0)
        rec(run_dir, section, "re-ranker, mean and sd over seeds",
            {f"{s} {stat}": round(float(v[s]), 4) for s in SPLITS for stat, v in (("mean", mean), ("std", sd))}
            | {"seeds": len(t)})
    if R.stage == "base":
        for m, name in (("mean", "mean aggregation of the ensemble"), ("belief", "belief aggregation of the ensemble")):
            rec(run_dir, LEVERS, name, {**a.loc[m].round(4).to_dict(), "seeds": 1, VALID_IS: OUT_OF_FOLD})
        if R.rerank_seeds is not None:
            rec(run_dir, LEVERS, "re-ranker, one seed (out of fold on validation)",
                {"valid": mean["valid"], "valid sd": sd["valid"], "test": mean["test"], "test sd": sd["test"],
                 "seeds": len(t), VALID_IS: OUT_OF_FOLD})
            rec(run_dir, LEVERS, "re-ranker, seeds averaged", {**a.loc["rerank"].round(4).to_dict(), "seeds": len(t),
                                                                VALID_IS: OUT_OF_FOLD})
        rec(run_dir, LEVERS, f"final ({R.final_name}, chosen on validation)",
            {**a.loc["final"].round(4).to_dict(), "seeds": 1, VALID_IS: OUT_OF_FOLD})


def plot_by_pictures(R: AggregateResult):
    "Product accuracy by number of pictures per product, one bar group per method"
    import matplotlib.pyplot as plt
    t = R.by_pictures
    split = "test" if (t["split"] == "test").any() else "valid"
    t = t[t["split"] == split]
    piv = t.pivot_table(index="n_pictures", columns="method", values="accuracy")
    ax = piv.plot.bar(figsize=(7, 3.5), rot=0)
    ax.set(xlabel="pictures per product", ylabel="product accuracy",
           title=f"{split} ({R.stage}): accuracy by pictures per product",
           ylim=(max(0, float(np.nanmin(piv.to_numpy())) - 0.1), 1))
    ax.legend(loc="lower left", fontsize=8)
    ax.figure.tight_layout()
    plt.close(ax.figure)
    return ax.figure


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


def _rows_of(stores, pp, ids):
    "The prediction rows of the products `ids` and their `excluded` flags (in prediction_rows order)"
    from cdkit.infer.store import PredStore
    subs, flags, start = [], [], 0
    for s in stores:
        keep = np.isin(s.product_id, ids)
        subs.append(PredStore(s.product_id[keep], s.img_idx[keep], s.cls[keep], s.prob[keep], s.rest[keep],
                              s.n_classes))
        flags.append(pp.excluded[start:start + len(s) * s.n_views].reshape(len(s), s.n_views)[keep].ravel())
        start += len(s) * s.n_views
    return prediction_rows(subs), np.concatenate(flags)


def plot_excluded(R: AggregateResult, prep: Prepared, split="test", n=8, seed=0):
    """Products in which belief aggregation excluded a picture: each picture titled with its
    prediction's top class; pictures excluded for the winning class framed in red"""
    import matplotlib.pyplot as plt
    from cdkit.data.bsonfile import BsonReader
    stores, pp = R.stores[split], R.predictions[(split, "belief")]
    ids = excluded_products(stores, pp, n, seed)
    if not len(ids):
        return None
    rows, excluded = _rows_of(stores, pp, ids)
    index = prep.test_index if split == "test" else prep.train_index
    reader = BsonReader(prep.test_bson if split == "test" else prep.train_bson)
    by_id = index.set_index("product_id")
    winner = pd.Series(pp.pred_class, index=pp.product_id)
    fig, axes = plt.subplots(len(ids), 4, figsize=(8, 2.2 * len(ids)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, pid in enumerate(ids):
        row = by_id.loc[pid]
        pics = reader.images(int(row["offset"]), int(row["length"]))
        sel = rows.product_id == pid
        for j, im in enumerate(pics[:4]):
            ax = axes[r, j]
            ax.imshow(im if im is not None else np.full((180, 180, 3), 128, np.uint8))
            here = sel & (rows.img_idx == j)
            excl = excluded[here].mean() if here.any() else 0
            top = np.bincount(rows.cls[here, 0].clip(0)).argmax() if here.any() else -1
            ax.set_title(f"{pid}/{j}: {prep.catalog.name(top)[:18] if top >= 0 else '?'}\nexcluded {excl:.0%}",
                         fontsize=7, color="red" if excl > 0.5 else "black")
            if excl > 0.5:
                ax.axis("on"); ax.set_xticks([]); ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_edgecolor("red"); s.set_linewidth(3)
        axes[r, 0].text(-10, 90, f"-> {prep.catalog.name(winner[pid])[:22]}", ha="right", fontsize=7, rotation=90,
                        va="center")
    fig.suptitle(f"{split}: products in which belief aggregation excluded a picture", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def what_this_shows(R: AggregateResult) -> str:
    a = R.accuracy
    d = a.loc["belief", "valid"] - a.loc["mean", "valid"]
    out = (f"on validation belief aggregation is {d:+.3f} against the mean of the same rows")
    if "rerank" in a.index:
        out += (f"; the re-ranker (out of fold, {len(R.rerank_seeds)} seeds averaged) is "
                f"{a.loc['rerank', 'valid'] - a.loc['mean', 'valid']:+.3f} against the mean")
    out += f", so the {R.chosen} products are kept ({R.stage})."
    if R.md5:
        s = R.md5.get("test")
        out += (f" The MD5 lookup then moves validation accuracy {a.loc['final', 'valid'] - a.loc[R.chosen, 'valid']:+.3f}"
                + (f"; on test it matched {s.pictures} pictures in {s.products} products ({s.product_sets} whole product "
                   f"sets) and changed {s.changed} predictions." if s else "."))
    return out
