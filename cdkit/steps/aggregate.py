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

Stage by stage, as notebooks/08_belief_aggregation.ipynb runs it: `R = start(P)`, then `mean(R)`, `belief(R)`,
`rerank(R)`, `choose(R)`, `md5(R)`, each filling in its fields of the result, and `finish(R)` writes the
products; `run(P)` is that chain.

Writes `RunLayout.products(stage, split)`: product_id, pred_class, category_id, score, md5."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from cdkit.base.params import RunParams, Seed
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.infer.aggregate import accuracy_breakdowns, aggregate_stores, correct_by_product, excluded_pictures, excluded_products, pick_products
from cdkit.infer.md5 import apply_md5, md5_votes, picture_hashes  # noqa: F401  (picture_hashes: the digests the step uses, for tests)
from cdkit.infer.rerank import fit_seeds
from cdkit.infer.selection import choose_per_fold, validation_folds
from cdkit.infer.store import load_store
from cdkit.runs import SPLITS, ModelNames, RunLayout, check_stores, new_generation, rewrites_ensemble, rewrites_store, same_generation, save_products
from cdkit.steps.entry import step_context, step_entry
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



@dataclass(frozen=True)
class Accuracy:
    "Product accuracy of each method on one split (NaN where the split's truth is unknown)"
    mean: float
    belief: float
    final: float                          # the products written: the chosen method's, + MD5 when on
    rerank: float | None = None           # None: the re-ranker was off


@dataclass(repr=False)
class AggregateResult:
    "What step 08 produced; its stages (`start`, `mean`, ..., `finish`) fill it in, each a few fields"
    P: AggregateParams
    prep: Prepared
    log: Callable
    stores: dict                          # {split: [PredStore]} whose rows are aggregated
    lookups: dict                         # {split: cdkit.infer.md5.Md5Votes} ({}: MD5 off)
    predictions: dict = field(default_factory=dict)   # {(split, method): ProductPredictions}, "final": as written
    rerank_seeds: pd.DataFrame = None     # per re-ranker seed: validation (out of fold) and test accuracy
    chosen: str = None                    # mean, belief or rerank: the method the products are made with
    chosen_per_fold: dict = None          # method="auto": {fold of validation products: method better on the other folds}
    made: dict = field(default_factory=dict)          # {split: ProductPredictions} of `chosen` (per fold), before MD5
    md5: dict = field(default_factory=dict)           # {split: Md5Summary}
    in_sample: float = None               # method="auto": validation accuracy of `chosen` (+MD5) on all of validation, chosen there
    valid: Accuracy = None                # every method's validation accuracy (out of fold)
    test: Accuracy = None
    products: dict = field(default_factory=dict)      # {split: Path} written
    by_pictures: pd.DataFrame = None      # accuracy by pictures per product, per split and method
    by_level: pd.DataFrame = None         # accuracy at each hierarchy level, per split and method

    stage = property(lambda self: self.P.stage)
    final_name = property(lambda self: f"{self.chosen} + MD5" if self.md5 else self.chosen)

    @property
    def accuracy(self) -> pd.DataFrame:
        "The accuracies as a table to show: index mean, belief (, rerank), final; columns valid, test"
        rows = ["mean", "belief"] + (["rerank"] if self.valid.rerank is not None else []) + ["final"]
        return pd.DataFrame({split: [getattr(getattr(self, split), m) for m in rows] for split in SPLITS}, index=rows)


def _accuracy(R: AggregateResult, method, split="valid") -> float:
    pp = R.predictions[(split, method)] if method != "made" else R.made[split]
    return R.prep.accuracy(pp.product_id, pp.pred_class, split)


def _n_pictures(prep: Prepared, split) -> pd.Series:
    idx = prep.train_index if split == "valid" else prep.test_index
    return pd.Series(idx["n_imgs"].to_numpy(), index=idx["product_id"].to_numpy())


def _breakdowns(R: AggregateResult):
    return accuracy_breakdowns(R.predictions, {s: R.prep.truth(s) for s in SPLITS}, {s: _n_pictures(R.prep, s) for s in SPLITS},
                               R.prep.catalog.level1, R.prep.catalog.level2)


def start(P: AggregateParams, prep: Prepared = None, log=print) -> AggregateResult:
    """The step's entry checks (folders, data set), then the stores whose rows it aggregates, valid and test
    paired, and the MD5 lookup of both splits when `P.md5` (the re-ranker's features and the last stage use it)"""
    with step_context("aggregate", P, save=False):
        prep = prep or load_prepared(P.data_dir, P.work_dir)
        layout = RunLayout.of(P.run_dir)
        stores = {split: [load_store(layout.store(m, split)) for m in P.models] if P.rows == "all"
                  else [load_store(layout.ensemble_store(P.stage, split))] for split in SPLITS}
        for i, name in enumerate(P.models if P.rows == "all" else [f"ensemble-{P.stage}"]):
            # each store's valid and test halves come from one run of the step that wrote them
            same_generation([stores[s][i] for s in SPLITS], rewrites_store(name) if P.rows == "all" else rewrites_ensemble(P.stage))
    lookups = {split: md5_votes(prep, split, P.md5_min_share, P.md5_products, log) for split in SPLITS} if P.md5 else {}
    return AggregateResult(P, prep, log, stores, lookups)


def mean(R: AggregateResult):
    "Mean aggregation of each product's prediction rows"
    # a block of whole products at a time: every picture x model x view row of the test set would
    # not fit in memory at once (rows="all": 62 M rows with 4 models x 5 views)
    R.predictions |= {(split, "mean"): aggregate_stores(R.stores[split], "mean") for split in SPLITS}


def belief(R: AggregateResult):
    "Belief aggregation of the same rows, with the settings of `P.belief`"
    R.predictions |= {(split, "belief"): aggregate_stores(R.stores[split], "belief", **belief_kwargs(R.P)) for split in SPLITS}


def rerank(R: AggregateResult):
    """The second level (`cdkit.infer.rerank.fit_seeds`) when `P.rerank`: candidates of the mean and belief
    products and of each member's own, picture-position features, MD5 suggestions; out of fold on validation"""
    P, prep, layout = R.P, R.prep, RunLayout.of(R.P.run_dir)
    if not P.rerank: return
    for m in P.models: check_stores(layout, m)
    members = {split: {"mean": R.predictions[(split, "mean")], "belief": R.predictions[(split, "belief")],
                       **{m: aggregate_stores([load_store(layout.store(m, split))], "mean") for m in P.models}} for split in SPLITS}
    inputs = {split: dict(n_pictures=_n_pictures(prep, split), md5=R.lookups[split].votes if R.lookups else None,
                          pictures=R.stores[split][0] if len(R.stores[split]) == 1 else None) for split in SPLITS}
    rr, R.rerank_seeds = fit_seeds(members, prep.truth("valid"), inputs, P.rerank_seeds, lambda pp, split: prep.accuracy(pp.product_id, pp.pred_class, split),
                                   k=P.rerank_k, n_folds=P.rerank_folds, n_classes=prep.catalog.n_classes, log=R.log)
    R.predictions |= {(split, "rerank"): rr[split] for split in SPLITS}


def choose(R: AggregateResult):
    """The method the products are made with: `P.method`, or with "auto" the one better on validation for
    test, and for each fold of validation products the one better on the other folds (ties: the simpler)"""
    R.chosen, parts = R.P.method, {m: R.predictions[("valid", m)] for m in ("mean", "belief", "rerank") if ("valid", m) in R.predictions}
    if R.chosen == "auto":
        truth = R.prep.truth("valid")
        R.chosen, R.chosen_per_fold, pick, _, _ = choose_per_fold(correct_by_product(parts, truth), validation_folds(truth.index))
    R.made = {"valid": pick_products(parts, pick) if R.chosen_per_fold is not None else parts[R.chosen], "test": R.predictions[("test", R.chosen)]}


def md5(R: AggregateResult):
    "The MD5 lookup applied to the chosen products when `P.md5` (`cdkit.infer.md5.apply_md5`): the final products"
    for split in SPLITS:
        R.predictions[(split, "final")] = R.made[split]
        if R.P.md5:
            R.predictions[(split, "final")], R.md5[split] = apply_md5(R.made[split], R.lookups[split], R.P.md5_alpha)
            R.log(f"MD5 ({split}): {R.md5[split]}")
    if R.chosen_per_fold is not None:  # the figure of old: the method chosen on all of validation, applied to all of it
        u = R.predictions[("valid", R.chosen)]
        u = apply_md5(u, R.lookups["valid"], R.P.md5_alpha)[0] if R.P.md5 else u
        R.in_sample = R.prep.accuracy(u.product_id, u.pred_class, "valid")


def finish(R: AggregateResult, save=True) -> AggregateResult:
    """Write the final products of both splits, one generation (a kill between the two files shows), and
    measure every method; `save`: record P as the step-08 settings (step 09 replays them)"""
    with step_context("aggregate", R.P, save=save):
        generation = new_generation()
        for split in SPLITS:
            final = R.predictions[(split, "final")]
            changed = final.pred_class != R.made[split].pred_class if R.P.md5 else None
            R.products[split] = save_products(final, R.prep.catalog, RunLayout.of(R.P.run_dir).products(R.stage, split), changed, generation)
    R.valid, R.test = (Accuracy(**{m: _accuracy(R, m, split) for sp, m in R.predictions if sp == split}) for split in SPLITS)
    R.by_pictures, R.by_level = _breakdowns(R)
    return R


@step_entry("aggregate", saves_params=True)
def run(P: AggregateParams, prep: Prepared = None, log=print, save=True) -> AggregateResult:
    "Aggregate, choose, apply MD5, write the products: the stages above, in order; `save`: as `finish`'s"
    R = start(P, prep, log)
    for stage in (mean, belief, rerank, choose, md5):
        stage(R)
    return finish(R, save)


def record(run_dir, R: AggregateResult, step="aggregate"):
    "The study's rows of this stage, each from its own aggregation"
    from cdkit.steps.report import LEVERS, VALID_IS, recorder
    rec = recorder(step)
    from cdkit.infer.selection import IN_SAMPLE, OUT_OF_FOLD
    # every row's validation figure is out of fold: the ensemble store is, the re-ranker is fitted out of fold,
    # and with method="auto" each fold's products take the method chosen on the other folds
    a, oof, section = R.accuracy.round(4), {VALID_IS: OUT_OF_FOLD}, f"08 aggregation ({R.stage})"
    if R.stage == "base":
        rec(run_dir, "study", "ensemble + belief aggregation",
            {"test": R.test.belief, "valid": R.valid.belief, **oof, "mean of the same rows": R.test.mean})
        if R.md5: rec(run_dir, "study", "+MD5 lookup", {"test": R.test.final, "valid": R.valid.final, **oof, "on": R.chosen})
    rec(run_dir, section, "chosen on validation", R.chosen)
    if R.chosen_per_fold is not None:
        rec(run_dir, section, "chosen per fold of validation products", R.chosen_per_fold)
        rec(run_dir, section, f"final, {R.chosen} chosen on all of validation", {"valid": round(float(R.in_sample), 4), VALID_IS: IN_SAMPLE})
    rec(run_dir, section, "product accuracy", {R.final_name if k == "final" else k: {**v, **oof} for k, v in a.to_dict(orient="index").items()})
    for split, s in R.md5.items(): rec(run_dir, section, f"MD5 {split}", dict(s.__dict__))
    if R.by_level is not None and len(R.by_level):
        rec(run_dir, section, "accuracy per hierarchy level (final)",
            {f"{r.split} {r.level}": round(float(r.accuracy), 4) for r in R.by_level[R.by_level["method"] == "final"].itertuples()})
    if R.rerank_seeds is not None:
        t = R.rerank_seeds
        mu, sd = t.mean(), (t.std(ddof=1) if len(t) > 1 else t.mean() * 0)
        rec(run_dir, section, "re-ranker, mean and sd over seeds",
            {f"{s} {stat}": round(float(v[s]), 4) for s in SPLITS for stat, v in (("mean", mu), ("std", sd))} | {"seeds": len(t)})
    if R.stage == "base":
        for m, name in (("mean", "mean aggregation of the ensemble"), ("belief", "belief aggregation of the ensemble")):
            rec(run_dir, LEVERS, name, {**a.loc[m].to_dict(), "seeds": 1, **oof})
        if R.rerank_seeds is not None:
            rec(run_dir, LEVERS, "re-ranker, one seed (out of fold on validation)",
                {"valid": mu["valid"], "valid sd": sd["valid"], "test": mu["test"], "test sd": sd["test"], "seeds": len(t), **oof})
            rec(run_dir, LEVERS, "re-ranker, seeds averaged", {**a.loc["rerank"].to_dict(), "seeds": len(t), **oof})
        rec(run_dir, LEVERS, f"final ({R.final_name}, chosen on validation)", {**a.loc["final"].to_dict(), "seeds": 1, **oof})


def plot_by_pictures(R: AggregateResult):
    "Product accuracy by number of pictures per product, one bar group per method aggregated so far"
    import matplotlib.pyplot as plt
    t = R.by_pictures if R.by_pictures is not None else _breakdowns(R)[0]
    split = "test" if (t["split"] == "test").any() else "valid"
    piv = t[t["split"] == split].pivot_table(index="n_pictures", columns="method", values="accuracy")
    ax = piv.plot.bar(figsize=(7, 3.5), rot=0)
    ax.set(xlabel="pictures per product", ylabel="product accuracy", title=f"{split} ({R.stage}): accuracy by pictures "
           "per product", ylim=(max(0, float(np.nanmin(piv.to_numpy())) - 0.1), 1))
    ax.legend(loc="lower left", fontsize=8)
    ax.figure.tight_layout()
    plt.close(ax.figure)
    return ax.figure


def plot_excluded(R: AggregateResult, split="test", n=8, seed=0):
    """Products in which belief aggregation excluded a picture: each picture titled with its
    prediction's top class; pictures excluded for the winning class framed in red"""
    import matplotlib.pyplot as plt
    prep, stores, pp = R.prep, R.stores[split], R.predictions[(split, "belief")]
    ids = excluded_products(stores, pp, n, seed)
    if not len(ids): return None
    pics = excluded_pictures(stores, pp, ids).set_index(["product_id", "img_idx"])
    by_id = (prep.test_index if split == "test" else prep.train_index).set_index("product_id")
    reader, winner = prep.reader("test" if split == "test" else "train"), pd.Series(pp.pred_class, index=pp.product_id)
    fig, axes = plt.subplots(len(ids), 4, figsize=(8, 2.2 * len(ids)), squeeze=False)
    for ax in axes.flat: ax.axis("off")
    for r, pid in enumerate(ids):
        row = by_id.loc[pid]
        for j, im in enumerate(reader.images(int(row["offset"]), int(row["length"]))[:4]):
            ax, (excl, top) = axes[r, j], (pics.loc[(pid, j)] if (pid, j) in pics.index else (0, -1))
            ax.imshow(im if im is not None else np.full((180, 180, 3), 128, np.uint8))
            ax.set_title(f"{pid}/{j}: {prep.catalog.name(int(top))[:18] if top >= 0 else '?'}\nexcluded {excl:.0%}",
                         fontsize=7, color="red" if excl > 0.5 else "black")
            if excl > 0.5:
                ax.axis("on"); ax.set_xticks([]); ax.set_yticks([])
                for s in ax.spines.values(): s.set_edgecolor("red"); s.set_linewidth(3)
        axes[r, 0].text(-10, 90, f"-> {prep.catalog.name(winner[pid])[:22]}", ha="right", fontsize=7, rotation=90, va="center")
    fig.suptitle(f"{split}: products in which belief aggregation excluded a picture", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig


def finding(R: AggregateResult, stage) -> str:
    "What one stage found, in numbers (validation out of fold): stage mean, belief, rerank, choose or md5"
    if stage in ("mean", "belief", "rerank"):
        if ("valid", stage) not in R.predictions: return f"{stage}: off"
        v, out = _accuracy(R, stage), f"{stage}: validation {_accuracy(R, stage):.4f} (test {_accuracy(R, stage, 'test'):.4f})"
        if stage != "mean": out += f", {v - _accuracy(R, 'mean'):+.4f} against the mean"
        if stage == "belief":
            b, m = R.predictions[("valid", "belief")], R.predictions[("valid", "mean")]
            out += (f"; it excluded a row for the winner in {len(excluded_products(R.stores['valid'], b, len(b.product_id)))} of "
                    f"{len(b.product_id)} validation products and changed {(b.pred_class != m.pred_class).sum()} winners")
        return out
    if stage == "choose":
        return f"{R.chosen} chosen on validation" + (f" (per fold of validation products: {R.chosen_per_fold})" if R.chosen_per_fold else "")
    return "MD5: off" if not R.md5 else (f"MD5 on {R.chosen}: validation {_accuracy(R, 'made'):.4f} -> {_accuracy(R, 'final'):.4f}; "
                                         f"{R.md5['valid'].changed} validation and {R.md5['test'].changed} test predictions changed")


def what_this_shows(R: AggregateResult) -> str:
    return "; ".join(finding(R, stage) for stage in ("belief", "rerank", "choose", "md5")) + f" ({R.stage})."
