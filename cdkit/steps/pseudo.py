"""Step 09: pseudo-label fine-tuning (Lee, 2013), fed back into the final predictions.

1. Labels: by default (`labels_from="products"`) the best product predictions the kit has, step
   08's final products of stage `base` (ensemble + TTA + aggregation + MD5), with each product's
   confidence the mean probability of its predicted class over its pictures in the ensemble store
   (1 for products the MD5 lookup decided); `labels_from="model"` takes the base model's own
   predictions (its step-06 store, all views). A threshold the source cannot reach under its
   models' label smoothing is refused before anything runs.
2. Selection (`cdkit.pseudo.pseudolabel.select_pseudo`) and fine-tuning of the base model on batches of
   labeled + pseudo-labeled pictures with the loss weight alpha(t) (`AlphaRamp`, `alpha_form`), on the
   training step's optimizer and schedule (the same parameters, `train.SCHEDULE_FIELDS`).
3. The fine-tuned model is saved as run_dir/models/<name>/ and steps 06, 07 and 08 run again as
   stage `pseudo` with the settings they ran with (run_dir/params/*.yaml), the fine-tuned model in
   its base model's place and the base model's fusion member left out (`pseudo_members`: its heads
   read the base model's features): `RunLayout.products("pseudo", split)`, which step 10 may submit."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from cdkit.steps.entry import step_entry
from cdkit.base.params import ParamsError, RunParams, load_params
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.runs import RunLayout, check_name
from cdkit.steps import aggregate as step08
from cdkit.steps import ensemble as step07
from cdkit.steps import predict as step06
from cdkit.steps.train import LrFactors, LrSteps, check_schedule, train_field


class PseudoParams(RunParams):
    "Parameters of notebooks/09_pseudo_label_finetune.ipynb and `cdkit pseudo`"
    name: str = "pseudo"                  # the fine-tuned model: run_dir/models/<name>/
    base: str = "resnet"                  # the model to fine-tune; it gives its place in the ensemble to <name>
    labels_from: Literal["products", "model"] = "products"  # products: step 08's final products (ensemble+TTA+aggregation+MD5); model: the base model alone
    # selection
    threshold: float = Field(0.5, ge=0, le=1)  # keep products whose confidence (mean probability of the label) is at least this
    margin: float = Field(0.0, ge=0, le=1)     # and whose top-1 minus top-2 probability is at least this
    rank_by: Literal["prob", "margin"] = "prob"  # confidence used by fraction and cap
    fraction: float = Field(1.0, gt=0, le=1)   # then keep at most this share of all test products, most confident first
    cap_per_category: int = Field(0, ge=0, le=10**9)  # then at most this many products per class (0: no cap)
    # loss weight alpha(t), `cdkit.pseudo.pseudolabel.alpha_schedule`; docs/STUDY.md gives the three forms and their sources
    alpha_form: Literal["poster", "lee", "authors"] = "lee"  # lee: a_f*(t-T1)/(T2-T1) up to T2; poster: (t-T1)/(T2-T1) up to T2, then a_f; authors: StepAlpha, alpha_min up to T1, a_f*t/T2 up to T2
    alpha_final: float = Field(0.3, ge=0, le=10)  # a_f, the weight after T2 (the authors' StepAlpha: 2)
    alpha_min: float = Field(0.5, ge=0, le=10)  # the weight up to T1 in the authors' form (StepAlpha: 0.5); unused by the others
    T1: float = Field(0.0, ge=0, le=1e9)  # the model is already trained: pseudo-labels count from the start
    T2: float = Field(1.0, ge=0, le=1e9)  # full weight after the first epoch
    alpha_unit: Literal["epoch", "iter"] = "epoch"  # unit of t, T1, T2: (fractional) epochs or optimizer steps
    # batches
    pseudo_per_labeled: float = Field(3.0, ge=0, le=64)  # pseudo-labeled pictures per labeled picture in every batch (authors: 3)
    epoch_size: Literal["pseudo", "labeled"] = "pseudo"  # an epoch is one pass over the pseudo-labeled pictures, or over the labeled
    bs: int = Field(32, ge=1, le=65536)   # labeled pictures per step; a step's batch holds bs*(1+pseudo_per_labeled)
    epochs: int = Field(2, ge=1, le=1000)  # fine-tuning epochs
    # optimizer and schedule: the training step's parameters (same names, bounds and checks, `train.SCHEDULE_FIELDS`)
    optimizer: Literal["adam", "sgd"] = train_field("optimizer")  # adam (the kit's fine-tune) or sgd with momentum (the authors')
    momentum: float = train_field("momentum")  # sgd's momentum (the authors' trainer_pseudo.py: 0.1)
    one_cycle: bool = train_field("one_cycle")  # one-cycle schedule; False: flat lr, or the steps of lr_steps
    lr: float = Field(1e-4, gt=0, le=1)   # peak of the one-cycle schedule, or the flat / first lr: a fine-tune (1e-3 undid the demo model's training)
    lr_steps: LrSteps = train_field("lr_steps")  # epochs at which the lr steps down, with one_cycle off (the authors: [1, 3])
    lr_step_factors: LrFactors = train_field("lr_step_factors")  # the lr from each step on, times lr (the authors: [0.5, 0.05])
    pct_start: float = train_field("pct_start")  # share of the one cycle spent warming up
    wd: float = train_field("wd")         # weight decay: decoupled with adam, L2 with sgd (the authors: 1e-4)
    max_train_images: int | None = Field(None, ge=1, le=10**9)  # labeled pictures drawn from (whole products); None: all
    num_workers: int = Field(0, ge=0, le=256)  # DataLoader worker processes
    seed: int = Field(0, ge=0, le=2**32 - 1)  # batch order and augmentation
    device: str = ""                      # cpu, cuda, cuda:1, ...; "": the GPU when there is one
    overwrite: bool = False               # replace what models/<name>/ holds (else a finished fine-tune there is refused)

    @model_validator(mode="after")
    def _consistent(self):
        check_name(self.name, "name"), check_name(self.base, "base")
        if self.name == self.base:
            raise ValueError(f"name={self.name!r} equals base={self.base!r}: the fine-tuned model needs its own folder")
        if self.T1 > self.T2:
            raise ValueError(f"T1={self.T1} is after T2={self.T2}")
        if self.alpha_form == "authors" and self.T2 <= 0:
            raise ValueError("alpha_form='authors' ramps a_f*t/T2: T2 must be > 0")
        check_schedule(self)
        return self


@dataclass
class PseudoResult:
    "What step 09 produced; the fine-tuned model's stages 06-08 are in predict/ensemble/aggregate"
    labels_from: str
    selection: pd.DataFrame               # chosen products: product_id, pred_class, prob, margin, label, rank
    selection_table: pd.DataFrame         # per class: predicted, chosen, pictures (precision where the truth is known)
    selection_summary: pd.DataFrame       # one row: products, chosen, share, precision, ...
    alpha: pd.DataFrame                   # per training step: iter, epoch, t, alpha, n_labeled, n_pseudo, losses
    predict: step06.PredictResult = None  # the fine-tuned model's stores (same settings as step 06)
    ensemble: step07.EnsembleResult = None
    aggregate: step08.AggregateResult = None
    single_model: pd.DataFrame = None     # base vs fine-tuned model alone: product accuracy (1 view, all views)
    changed: dict = field(default_factory=dict)  # {split: products whose final prediction differs from stage base}
    seconds: float = 0.0


def pseudo_members(models, base, name) -> list:
    """Stage pseudo's ensemble members: step 07's, with the fine-tuned model `name` in its base model's place
    and without the base model's fusion member. That member's heads were trained over the base model's
    features (not the fine-tuned model's): kept, it carried the base model into stage pseudo (0.70 of the
    demo's weights against 0.28 for the fine-tuned model), so stage pseudo measured mostly stage base."""
    base_fusion = RunLayout.fusion_member(base)
    return [name if m == base else m for m in models if m != base_fusion]


def _saved(layout: RunLayout, cls, step):
    path = layout.step_params(step)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: step 09 repeats steps 06-08 with their settings, so run them "
                                "first in this run folder")
    return load_params(cls, [path])


def _confidence_from_products(layout: RunLayout) -> pd.DataFrame:
    "product_id, pred_class (step 08's final), prob (its mean probability over the product's pictures), margin"
    from cdkit.infer.aggregate import aggregate_stores
    from cdkit.pseudo.pseudolabel import product_confidence
    from cdkit.infer.store import load_store
    from cdkit.runs import read_products
    final = read_products(layout, "base")["test"]  # refuses valid and test products of different runs of step 08
    mean = aggregate_stores([load_store(layout.ensemble_store("base", "test"))], "mean")
    conf = product_confidence(mean).set_index("product_id")
    f = final.set_index("product_id")
    # the mean probability of the final class (0 where it is outside a product's kept candidates)
    pos = pd.Series(np.arange(len(mean.product_id)), index=mean.product_id).reindex(f.index)
    ok = pos.notna().to_numpy()
    p = np.zeros(len(f))
    rows = pos.to_numpy()[ok].astype(np.int64)
    hit = mean.cls[rows] == f["pred_class"].to_numpy()[ok][:, None]
    p[ok] = np.where(hit, np.where(np.isfinite(mean.score[rows]), mean.score[rows], 0), 0).sum(1)
    if "md5" in f:
        p = np.where(f["md5"].to_numpy(bool), 1.0, p)
    out = pd.DataFrame({"product_id": f.index.to_numpy(np.int64), "pred_class": f["pred_class"].to_numpy(np.int64),
                        "prob": p, "margin": conf["margin"].reindex(f.index).fillna(0).to_numpy(),
                        "n_preds": conf["n_preds"].reindex(f.index).fillna(0).to_numpy(np.int64)})
    return out


def _confidence_from_model(layout: RunLayout, base) -> pd.DataFrame:
    from cdkit.infer.aggregate import aggregate_stores
    from cdkit.pseudo.pseudolabel import product_confidence
    from cdkit.infer.store import load_store
    return product_confidence(aggregate_stores([load_store(layout.store(base, "test"))], "mean", k_out=2))


def _reach(layout: RunLayout, member):
    "(highest probability, label smoothing) of a member: a trained model (model.json) or step 06b's fusion heads (fusion.json)"
    from cdkit.base.errors import read_json
    from cdkit.train.models import read_card
    d = layout.model_dir(member)
    if layout.model(member).fusion_card.exists():
        card = read_json(layout.model(member).fusion_card)
        ls, n = card["params"]["label_smoothing"], next(iter(card["spec"].values()))["n_classes"]
        return 1.0 - ls + ls / n, ls
    c = read_card(d)
    return c.max_prob, c.label_smoothing


def check_threshold(P: PseudoParams, layout: RunLayout, members):
    "Refuse a threshold that the label source's models cannot reach under their label smoothing"
    names = [P.base] if P.labels_from == "model" else members
    cards = {m: _reach(layout, m) for m in names}
    reach = max(r for r, _ in cards.values())
    if P.threshold > reach:
        smooth = ", ".join(f"{m}: label_smoothing={ls}" for m, (_, ls) in cards.items())
        raise ParamsError(f"threshold={P.threshold} cannot be reached: with {smooth} the highest probability a "
                          f"model gives is {reach:.5f}, so (MD5 matches aside) no product would be selected. "
                          f"Lower threshold below {reach:.5f} or train without label smoothing")


@step_entry("pseudo")
def run(P: PseudoParams, prep: Prepared = None, log=print) -> PseudoResult:
    from cdkit.base.io import folder_lock
    layout = RunLayout.of(P.run_dir)
    with folder_lock(layout.model_dir(P.name), "model folder"):
        return _run(P, prep, layout, log)


def _run(P: PseudoParams, prep, layout: RunLayout, log) -> PseudoResult:
    import torch
    from fastai.torch_core import set_seed
    from cdkit.train.models import load_trained, save_trained
    from cdkit.base.params import save_params
    from cdkit.pseudo.pseudolabel import finetune, finetune_learner, mixed_dataloaders, pseudo_images, select_pseudo, selection_report
    from cdkit.steps.train import _sample_products, check_fresh, opt_func
    t0 = time.time()
    P06, P07, P08 = (_saved(layout, step06.PredictParams, "predict"), _saved(layout, step07.EnsembleParams, "ensemble"),
                     _saved(layout, step08.AggregateParams, "aggregate"))
    if P.base not in P07.models:
        raise ParamsError(f"base={P.base!r} is not among the ensemble's models {P07.models} (step 07): the "
                          "fine-tuned model takes its base model's place")
    members = pseudo_members(P07.models, P.base, P.name)
    check_threshold(P, layout, P07.models)
    check_fresh(P, layout.model_dir(P.name))
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    device = torch.device(P.device) if P.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_trained(layout.model_dir(P.base), device=device)
    save_params(P, layout.model(P.name).params)

    conf = (_confidence_from_products(layout) if P.labels_from == "products"
            else _confidence_from_model(layout, P.base))
    chosen = select_pseudo(conf, P.threshold, P.margin, P.fraction, P.cap_per_category, P.rank_by)
    test_images = prep.test_images()
    pseudo = pseudo_images(chosen, test_images)
    truth = prep.truth("test")
    table, summary = selection_report(chosen, conf, truth, prep.catalog, pseudo)
    log(f"{len(chosen)} of {len(conf)} test products pseudo-labeled ({len(pseudo)} pictures) from {P.labels_from}")
    if not len(chosen):
        raise ValueError(f"no test product reached threshold={P.threshold} / margin={P.margin}: nothing to "
                         "fine-tune on; lower them")

    train_images = prep.train_images()
    valid_rows = prep.valid_mask(train_images)
    # the labeled side: what the backbones train on (neither validation nor the fusion split)
    labeled = _sample_products(train_images[prep.train_mask(train_images)], P.max_train_images, P.seed).reset_index(drop=True)
    valid = train_images[valid_rows].reset_index(drop=True)
    set_seed(P.seed)
    dls = mixed_dataloaders(labeled, pseudo, prep.train_bson, prep.test_bson, valid, prep.catalog.n_classes, bs=P.bs,
                            pseudo_per_labeled=P.pseudo_per_labeled, epoch_size=P.epoch_size, size=base.size,
                            item_size=base.item_size, mean=base.mean, std=base.std, num_workers=P.num_workers,
                            seed=P.seed, device=device)
    learn = finetune_learner(base.model, dls, wd=P.wd, path=layout.model_dir(P.name), opt_func=opt_func(P))
    alpha = finetune(learn, P.epochs, P.lr, P.pct_start, P.T1, P.T2, P.alpha_final, P.alpha_unit,
                     alpha_form=P.alpha_form, alpha_min=P.alpha_min, one_cycle=P.one_cycle, lr_steps=P.lr_steps,
                     lr_step_factors=P.lr_step_factors)
    card = base.card
    card.base_model, card.epochs_done = P.base, card.epochs_done + P.epochs
    save_trained(base.model, layout.model_dir(P.name), card)
    from cdkit.base.io import atomic_write
    atomic_write(layout.model(P.name).pseudo_alpha, lambda tmp: alpha.to_csv(tmp, index=False))
    atomic_write(layout.model(P.name).pseudo_selection, lambda tmp: chosen.to_parquet(tmp, index=False))

    # steps 06-08 again, as they ran, with the fine-tuned model in its base's place
    pred = step06.run(P06.replace(models=[P.name], features=False), prep, log, save=False)
    ens = step07.run(P07.replace(models=members, stage="pseudo"), prep, log, save=False)
    agg = step08.run(P08.replace(models=members, stage="pseudo"), prep, log, save=False)
    base_table = step06.run(P06.replace(models=[P.base], features=False), prep, log, save=False).table
    single = pd.concat([base_table, pred.table])
    changed = {}
    from cdkit.runs import read_products
    products = {stage: read_products(layout, stage) for stage in ("base", "pseudo")}
    for split in ("valid", "test"):
        a = products["base"][split].set_index("product_id")["pred_class"]
        b = products["pseudo"][split].set_index("product_id")["pred_class"]
        changed[split] = int((a.reindex(b.index).to_numpy() != b.to_numpy()).sum())
    return PseudoResult(P.labels_from, chosen, table, summary, alpha, pred, ens, agg, single, changed, time.time() - t0)


def record(run_dir, R: PseudoResult, step="pseudo"):
    "The study's pseudo-label row: stage `pseudo`'s final products, computed from its own files"
    from cdkit.steps.report import recorder
    rec = recorder(step)
    agg = R.aggregate
    from cdkit.steps.report import VALID_IS
    from cdkit.infer.selection import OUT_OF_FOLD
    rec(run_dir, "study", "+pseudo-labels", {"test": agg.test.final, "valid": agg.valid.final,
                                             VALID_IS: OUT_OF_FOLD, "labels from": R.labels_from,
                                             "test products changed": R.changed["test"]})
    s = R.selection_summary.iloc[0].to_dict()
    rec(run_dir, "09 pseudo-labels", "selection", {k: v for k, v in s.items()})
    rec(run_dir, "09 pseudo-labels", "single model (product accuracy)", R.single_model.round(4).to_dict(orient="index"))
    rec(run_dir, "09 pseudo-labels", "products changed against stage base", R.changed)
    step07.record(run_dir, R.ensemble, step=step)
    step08.record(run_dir, R.aggregate, step=step)


def plot_alpha(alpha: pd.DataFrame):
    "alpha(t) as applied at each training step, and the two parts' cross entropies"
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.2))
    x = np.arange(len(alpha))
    ax.plot(x, alpha["alpha"], color="C3", label="alpha (applied)")
    ax.set(xlabel="training step", ylabel="alpha", title="pseudo-label loss weight alpha(t) and the two losses")
    handles = ax.get_legend_handles_labels()
    if "loss_labeled" in alpha:
        ax2 = ax.twinx()
        ax2.plot(x, alpha["loss_labeled"], color="C0", alpha=0.6, lw=0.8, label="CE labeled")
        ax2.plot(x, alpha["loss_pseudo"], color="C1", alpha=0.6, lw=0.8, label="CE pseudo")
        ax2.set_ylabel("loss")
        h2 = ax2.get_legend_handles_labels()
        handles = (handles[0] + h2[0], handles[1] + h2[1])
    # one legend outside the axes: it never covers the curves
    fig.legend(*handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def what_this_shows(R: PseudoResult) -> str:
    s = R.selection_summary.iloc[0]
    prec = f", precision {s['precision']:.3f}" if "precision" in s and s["precision"] == s["precision"] else ""
    return (f"{int(s['chosen'])} of {int(s['products'])} test products were pseudo-labeled from {R.labels_from}{prec}. "
            f"With the fine-tuned model in its base's place, the final predictions changed for {R.changed['test']} test "
            f"products; validation accuracy of the final products {R.aggregate.valid.final:.4f} (stage pseudo). "
            "Step 10 submits this stage only if it beats stage base on validation.")
