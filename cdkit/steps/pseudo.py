"""Step 09: pseudo-label fine-tuning (Lee, 2013), fed back into the final predictions.

1. Labels: by default (`labels_from="products"`) the best product predictions the kit has, step
   08's final products of stage `base` (ensemble + TTA + aggregation + MD5), with each product's
   confidence the mean probability of its predicted class over its pictures in the ensemble store
   (1 for products the MD5 lookup decided); `labels_from="model"` takes the base model's own
   predictions (its step-06 store, all views). A threshold the source cannot reach under its
   models' label smoothing is refused before anything runs.
2. Selection (`cdkit.pseudo.pseudolabel.select_pseudo`) and fine-tuning of the base model on batches of
   labeled + pseudo-labeled pictures with the loss weight alpha(t) (`AlphaRamp`, `alpha_form`), on the
   training step's optimizer and schedule (the same parameters, `train.SCHEDULE_FIELDS`):
   `cdkit.pseudo.finetune.pseudo_finetune`.
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


@step_entry("pseudo")
def run(P: PseudoParams, prep: Prepared = None, log=print) -> PseudoResult:
    from cdkit.base.io import folder_lock
    layout = RunLayout.of(P.run_dir)
    with folder_lock(layout.model_dir(P.name), "model folder"):
        return _run(P, prep, layout, log)


def _run(P: PseudoParams, prep, layout: RunLayout, log) -> PseudoResult:
    from cdkit.base.device import pick_device
    from cdkit.base.params import save_params
    from cdkit.infer.store import load_store
    from cdkit.pseudo.finetune import check_threshold, pseudo_finetune
    from cdkit.runs import read_products
    from cdkit.train.learner import check_fresh
    from cdkit.train.models import load_trained
    t0 = time.time()
    P06, P07, P08 = (_saved(layout, step06.PredictParams, "predict"), _saved(layout, step07.EnsembleParams, "ensemble"),
                     _saved(layout, step08.AggregateParams, "aggregate"))
    if P.base not in P07.models:
        raise ParamsError(f"base={P.base!r} is not among the ensemble's models {P07.models} (step 07): the "
                          "fine-tuned model takes its base model's place")
    members = pseudo_members(P07.models, P.base, P.name)
    check_threshold(P.threshold, {m: layout.model_dir(m) for m in ([P.base] if P.labels_from == "model" else P07.models)})
    check_fresh(layout.model_dir(P.name), overwrite=P.overwrite)
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    device = pick_device(P.device)
    base = load_trained(layout.model_dir(P.base), device=device)
    save_params(P, layout.model(P.name).params)
    # the labels: step 08's final products scored by the ensemble's store (read_products refuses valid and
    # test products of different runs of step 08), or the base model's own store
    if P.labels_from == "products":
        final = read_products(layout, "base")["test"]
        store = load_store(layout.ensemble_store("base", "test"))
    else:
        final, store = None, load_store(layout.store(P.base, "test"))
    ft = pseudo_finetune(P, base, prep, layout.model_dir(P.name), store, final, device, log)

    # steps 06-08 again, as they ran, with the fine-tuned model in its base's place
    pred = step06.run(P06.replace(models=[P.name], features=False), prep, log, save=False)
    ens = step07.run(P07.replace(models=members, stage="pseudo"), prep, log, save=False)
    agg = step08.run(P08.replace(models=members, stage="pseudo"), prep, log, save=False)
    base_table = step06.run(P06.replace(models=[P.base], features=False), prep, log, save=False).table
    single = pd.concat([base_table, pred.table])
    products = {stage: read_products(layout, stage) for stage in ("base", "pseudo")}
    changed = {}
    for split in ("valid", "test"):
        a = products["base"][split].set_index("product_id")["pred_class"]
        b = products["pseudo"][split].set_index("product_id")["pred_class"]
        changed[split] = int((a.reindex(b.index).to_numpy() != b.to_numpy()).sum())
    return PseudoResult(P.labels_from, ft.selection, ft.selection_table, ft.selection_summary, ft.alpha, pred, ens, agg,
                        single, changed, time.time() - t0)


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
