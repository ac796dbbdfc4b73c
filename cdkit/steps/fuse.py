"""Step 06b: learned product-level fusion over each backbone's picture features (the 2nd place's fuse net).

For each backbone of `models`, step 06 stored the pooled features of every picture of the fusion
split (train products that no backbone trained on: step 02's `fusion_frac`), the validation and the
test set (`RunLayout.features`). Here a small network over a product's 1-4 pictures
(`cdkit.infer.fusion.FusionNet`: dropout, a squeeze-excitation gate, max/sum/mean over the pictures, an
MLP) learns on the fusion split and validates on the validation products, in two variants:
order-aware (the first picture is usually the main photo) and order-invariant, each with several
seeds. `order="auto"` keeps the variant whose seeds' heads, averaged, are better on validation: that
variant predicts every test product into `RunLayout.store("<model>-fusion", "test")`; the validation
store is made inside folds (`cdkit.infer.selection.choose_per_fold`: each fold of validation products from the
variant better on the other folds), so the member that steps 07 and 08 read holds no choice made on the
products it scores. One row per picture carries the product's distribution, so the fusion head enters
the ensemble (step 07) and the aggregation (step 08) like any other member.

    run_dir/models/<model>-fusion/   fusion.json (what was trained and chosen), <variant>_seed<s>.pth,
                                     <variant>_seed<s>_metrics.csv, checkpoints/ (while a head trains: resume)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from cdkit.steps.entry import step_entry
from cdkit.base.params import ParamsError, RunParams, Seed
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.runs import FEATURE_SPLITS, SPLITS, ModelNames, RunLayout, fusion_member, same_generation
from cdkit.steps.predict import DEMO_MODELS

VARIANTS = ("aware", "invariant")


class FuseParams(RunParams):
    "Parameters of notebooks/06b_fusion_head.ipynb and `cdkit fuse`"
    models: ModelNames = Field(default_factory=lambda: list(DEMO_MODELS), min_length=1)  # backbones whose features (step 06 with features on) feed a fusion head each
    order: Literal["auto", "aware", "invariant"] = "auto"  # aware: position embedding + the main photo's vector; invariant: any order gives the same; auto: both, keep the better on validation
    pool: Literal["max", "sum", "mean"] = "max"  # over a product's pictures (the 2nd place: sum or max)
    gate: bool = True                     # squeeze-excitation gate over the feature channels
    hidden: int = Field(256, ge=8, le=8192)  # width of the per-picture projection and the MLP (the full recipe: 1024)
    dropout: float = Field(0.3, ge=0, lt=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1, max_length=100)  # one head per seed; the member averages them, the report gives their spread
    epochs: int = Field(10, ge=1, le=1000)
    lr: float = Field(2e-3, gt=0, le=1)   # one-cycle peak (Adam)
    bs: int = Field(128, ge=1, le=65536)  # products per batch
    wd: float = Field(0.01, ge=0, le=10)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    k: int = Field(20, ge=1, le=10000)    # classes kept per product in the member's store
    prob_dtype: Literal["uint8", "float16", "float32"] = "uint8"
    block: int = Field(2048, ge=1, le=1 << 20)  # products per inference block (memory: block x 4 x d floats)
    device: str = ""                      # cpu, cuda, ...; "": the GPU when there is one
    resume: bool = False                  # keep finished heads, continue unfinished ones from their checkpoints
    overwrite: bool = False               # replace what models/<model>-fusion/ holds (else a finished run there is refused)

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds={self.seeds}: distinct non-negative integers")
        if self.resume and self.overwrite:
            raise ValueError("resume=True contradicts overwrite=True: continue the heads in models/<model>-fusion/, "
                             "or replace them")
        return self


@dataclass
class FuseResult:
    "Per backbone: each variant's heads (validation and test product accuracy per seed), the chosen variant and its blend"
    table: pd.DataFrame                   # rows (model, variant, seed|'blend'); columns valid, test
    chosen: dict                          # {model: variant}
    stores: dict                          # {(member, split): Path}
    baseline: pd.DataFrame                # per model: mean aggregation of its own step-06 store (all views), valid/test
    seconds: float = 0.0
    histories: dict = field(default_factory=dict)  # {(model, variant, seed): metrics DataFrame}
    member_valid: dict = field(default_factory=dict)  # {model: validation accuracy of the member's store, out of fold}

    def spread(self) -> pd.DataFrame:
        "mean and standard deviation over seeds per (model, variant) and split"
        t = self.table[self.table.index.get_level_values("seed") != "blend"]
        g = t.groupby(level=["model", "variant"])
        out = pd.concat({"mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0)}, axis=1)
        out.columns = [f"{s} {stat}" for stat, s in out.columns]
        return out[[f"{s} {stat}" for s in ("valid", "test") for stat in ("mean", "sd")]]


def _features(layout: RunLayout, model, split):
    from cdkit.infer.features import FeatureStoreError, load_features
    path = layout.features(model, split)
    try:
        return load_features(path)
    except (FeatureStoreError, FileNotFoundError) as e:
        raise ParamsError(f"{model}: no {split} features at {path} ({e}); run step 06 with features=true for this "
                          "model (and step 02 with fusion_frac > 0 for the fusion split)") from None


def _check_fresh(P: FuseParams):
    "Refuse fusion folders that hold heads (unless resume or overwrite); with overwrite, empty them first"
    from cdkit.train.learner import check_fresh
    for m in P.models:
        check_fresh(RunLayout.of(P.run_dir).model_dir(RunLayout.fusion_member(m)), P.resume, P.overwrite, names=None,
                    what="fusion heads", advice=": pass overwrite=true to retrain them (make demo does), resume=true "
                    "to continue them, or another run_dir")


def fuse_model(P: FuseParams, prep: Prepared, model, log=print):
    "Train the heads over one backbone's features, choose the variant, write the member's stores"
    import torch
    from cdkit.infer.fusion import FitSpec, FusionCard, HeadSpec, ProductSet, fit_heads, fusion_to_store, product_groups
    from cdkit.base.io import tmp_path
    from cdkit.infer.selection import choose_store, install_choice, pick_rows
    from cdkit.infer.store import load_store
    from cdkit.runs import GENERATION, new_generation, rewrites_store
    from cdkit.steps.predict import store_accuracy
    layout = RunLayout.of(P.run_dir)
    member = fusion_member(model)
    out_dir = layout.model_dir(member)
    if not prep.n_fusion:
        raise ParamsError("the split has no fusion products: run step 02 with fusion_frac > 0 (force=true remakes the "
                          "split; every backbone must then be retrained, since some of its training products move)")
    fs = {s: _features(layout, model, s) for s in FEATURE_SPLITS}
    same_generation(list(fs.values()), "step 06 (`cdkit predict`)")  # one model, one setting of step 06
    device = torch.device(P.device) if P.device else None
    groups = {s: product_groups(f.product_id, f.img_idx) for s, f in fs.items()}
    labels = {s: prep.truth(s).reindex(groups[s].product_id).to_numpy() for s in ("fusion", "valid")}
    for s in ("fusion", "valid"):
        if np.isnan(labels[s].astype(float)).any():
            raise ValueError(f"{layout.features(model, s)} holds products that are not in the {s} split: step 02 was "
                             f"run again after step 06; run step 06 again")
    variants = VARIANTS if P.order == "auto" else (P.order,)
    specs = {v: HeadSpec(fs["fusion"].d, prep.catalog.n_classes, P.hidden, P.dropout, v, P.pool, P.gate) for v in variants}
    data = {s: ProductSet(fs[s].x, groups[s], labels[s].astype(np.int64)) for s in ("fusion", "valid")}
    heads, hist = fit_heads(specs, P.seeds, FitSpec(P.epochs, P.lr, P.bs, P.wd, P.label_smoothing), data["fusion"],
                            data["valid"], out_dir, P.resume, device)
    # each head alone on validation and test; the chosen variant's heads together make the member
    per_head, rows = {}, {}
    meta = {GENERATION: new_generation(), "rebuild": rewrites_store(member)}  # one generation: valid and test
    for split in SPLITS:
        truth = prep.truth(split)
        for variant in variants:
            tmp = tmp_path(layout.store(member, split))  # a killed run's leftovers are swept like any temp
            _, accs, _ = fusion_to_store([heads[(variant, s)] for s in P.seeds], fs[split], tmp, P.k, P.prob_dtype,
                                         P.block, meta={**meta, "split": split}, device=device, truth=truth,
                                         groups=groups[split])
            # the member's figure from the store it wrote (quantized as every member's), as step 07 will read it
            per_head[(variant, split)] = (tmp, accs, store_accuracy(load_store(tmp), prep, split))
    for variant in variants:
        for i, seed in enumerate(P.seeds):
            rows[(model, variant, str(seed))] = {s: per_head[(variant, s)][1][i] for s in SPLITS}
        rows[(model, variant, "blend")] = {s: per_head[(variant, s)][2] for s in SPLITS}
    blends = {v: load_store(per_head[(v, "valid")][0]) for v in variants}
    chosen, pick = choose_store(blends, prep.truth("valid"))
    stores = {}
    for split in SPLITS:  # validation: each fold's products from the variant chosen on the other folds
        picked = pick_rows(blends, pick) if split == "valid" and pick is not None else None
        stores[(member, split)] = install_choice({v: per_head[(v, split)][0] for v in variants},
                                                 layout.store(member, split), chosen, picked, P.prob_dtype)
    FusionCard(model, member, chosen, list(variants), list(P.seeds), {v: asdict(specs[v]) for v in variants},
               {s: str(layout.features(model, s)) for s in fs}, P.model_dump()).write(layout.fusion_card(model))
    log(f"{member}: {chosen} heads chosen (validation {per_head[(chosen, 'valid')][2]:.4f} for their blend); "
        f"stores {stores}")
    return rows, chosen, stores, {(model, v, seed): h for (v, seed), h in hist.items()}


@step_entry("fuse", saves_params=True)
def run(P: FuseParams, prep: Prepared = None, log=print, save=True) -> FuseResult:
    "Train the fusion heads of every backbone of P.models and write their members' stores"
    from cdkit.steps.predict import store_accuracy
    from cdkit.infer.store import load_store
    t0 = time.time()
    layout = RunLayout.of(P.run_dir)
    _check_fresh(P)
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    rows, chosen, stores, hist, base, member_valid = {}, {}, {}, {}, {}, {}
    for m in P.models:
        r, chosen[m], s, h = fuse_model(P, prep, m, log)
        rows.update(r), stores.update(s), hist.update(h)
        base[m] = {split: store_accuracy(load_store(layout.store(m, split)), prep, split) for split in SPLITS}
        member_valid[m] = store_accuracy(load_store(layout.store(fusion_member(m), "valid")), prep, "valid")
    table = pd.DataFrame.from_dict(rows, orient="index")[list(SPLITS)]
    table.index = pd.MultiIndex.from_tuples(table.index, names=["model", "variant", "seed"])
    return FuseResult(table, chosen, stores, pd.DataFrame(base).T[list(SPLITS)], time.time() - t0, hist, member_valid)


def record(run_dir, R: FuseResult, step="fuse"):
    "Each fusion member against its backbone's own pictures (mean aggregation), and the heads' spread over seeds"
    from cdkit.steps.report import LEVERS, VALID_IS, recorder
    rec = recorder(step)
    from cdkit.infer.selection import HELD_OUT, IN_SAMPLE, OUT_OF_FOLD
    sp, table = R.spread(), R.table.sort_index()  # .loc on an unsorted MultiIndex warns (PerformanceWarning)
    for m, variant in R.chosen.items():
        blend = table.loc[(m, variant, "blend")]
        several = len(table.loc[m].index.get_level_values("variant").unique()) > 1
        rec(run_dir, "06b fusion", f"{m}: pictures (mean aggregation, step 06)",
            {**R.baseline.loc[m].round(4).to_dict(), VALID_IS: HELD_OUT})
        # the member's validation store is made per fold (each fold from the variant better on the other folds)
        rec(run_dir, "06b fusion", f"{m}: fusion member ({variant}, {len(table.loc[(m, variant)]) - 1} seeds averaged)",
            {**blend.round(4).to_dict(), "valid": round(float(R.member_valid.get(m, blend["valid"])), 4),
             VALID_IS: OUT_OF_FOLD if several else HELD_OUT})
        if several:
            rec(run_dir, "06b fusion", f"{m}: {variant} heads, chosen on all of validation",
                {"valid": round(float(blend["valid"]), 4), VALID_IS: IN_SAMPLE})
    for (m, variant), row in sp.iterrows():
        rec(run_dir, "06b fusion", f"{m}: one {variant} head, mean and sd over seeds",
            {**row.round(4).to_dict(), VALID_IS: HELD_OUT})
    rec(run_dir, "06b fusion", "minutes", round(R.seconds / 60, 2))
    for m, variant in R.chosen.items():  # the comparison of the levers, on the same validation and test products
        row = sp.loc[(m, variant)]
        several = len(table.loc[m].index.get_level_values("variant").unique()) > 1
        rec(run_dir, LEVERS, f"fusion head over {m} (one {variant} head)",
            {"valid": row["valid mean"], "valid sd": row["valid sd"], "test": row["test mean"],
             "test sd": row["test sd"], "seeds": len(table.loc[(m, variant)]) - 1,
             VALID_IS: IN_SAMPLE if several else HELD_OUT})
        rec(run_dir, LEVERS, f"mean of {m}'s pictures", {**R.baseline.loc[m].round(4).to_dict(), "seeds": 1,
                                                         VALID_IS: HELD_OUT})


def plot(R: FuseResult):
    "Validation and test accuracy: each backbone's pictures (mean) against its fusion heads (mean +- sd over seeds)"
    import matplotlib.pyplot as plt
    sp = R.spread()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    for ax, split in zip(axes, SPLITS):
        labels, vals, errs = [], [], []
        for m in R.baseline.index:
            labels.append(f"{m}\npictures"), vals.append(R.baseline.loc[m, split]), errs.append(0)
            for v in sp.loc[m].index:
                labels.append(f"{m}\n{v}"), vals.append(sp.loc[(m, v), f"{split} mean"]), errs.append(sp.loc[(m, v), f"{split} sd"])
        ax.bar(range(len(vals)), vals, yerr=errs, capsize=3, color=["#999" if "pictures" in lab else "C0" for lab in labels])
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
        ax.set(title=f"{split}: product accuracy", ylim=(max(0, min(vals) - 0.1), 1))
    fig.tight_layout()
    plt.close(fig)
    return fig


def what_this_shows(R: FuseResult) -> str:
    sp = R.spread()
    parts = []
    for m, v in R.chosen.items():
        d = sp.loc[(m, v), "valid mean"] - R.baseline.loc[m, "valid"]
        other = [x for x in sp.loc[m].index if x != v]
        vs = (f"; {other[0]}: {sp.loc[(m, other[0]), 'valid mean']:.3f}" if other else "")
        parts.append(f"{m}: one {v} head {sp.loc[(m, v), 'valid mean']:.3f} +- {sp.loc[(m, v), 'valid sd']:.3f} on "
                     f"validation{vs}, against {R.baseline.loc[m, 'valid']:.3f} for the mean of its pictures ({d:+.3f})")
    return ("Fusion heads over each backbone's picture features, trained on the fusion split: " + "; ".join(parts) +
            ". A head that does not beat the mean of its backbone's pictures is reported as such; the ensemble "
            "(step 07) weighs each member on validation.")
