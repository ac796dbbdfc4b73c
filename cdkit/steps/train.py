"""Step 03-05: train one backbone on the prepared data; every training notebook and
`python -m cdkit train --params FILE [key=value ...]` call `run(params)` (alias `train`).

A model lives in run_dir/models/<name>/ (`RunLayout.model_dir`):

    params.yaml              the effective parameters
    metrics.csv              one line per epoch: losses, image and product accuracy (and level-2/level-1
                             accuracy with hierarchy_weights), batch, lr, time
    checkpoints/last.pth     weights, optimizer, epoch, RNG and callback states (exact resume), tensors and
                             plain values only (loaded with weights_only); removed when the run finishes
    model.pth, model.json    the trained weights and the model card (`cdkit.train.models.load_trained`)
    lr_find.png              when lr_find is on

The folder is locked while a process trains into it (parameters and data are checked first: a refused
run writes nothing). `resume=True` continues from the checkpoint and refuses parameters that would change
the model or the data order since the run began (paths compared by what they name); on a finished model
it does nothing, and more epochs are refused (its schedule has ended). A non-finite loss stops the run
(`cdkit.train.callbacks.DivergedError`) before anything final is saved.

Several processes (`accelerate launch -m cdkit train ...`, or torchrun) train data-parallel.

The step reads its parameters and orchestrates; the learner is assembled, fitted and saved by
`cdkit.train.learner`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from cdkit.base.params import ParamsError, PathStr, RunParams
from cdkit.runs import ModelFiles, RunLayout, check_name
from cdkit.steps.entry import step_entry
from cdkit.train import learner
# the library's names that notebooks, tests and other steps reach through this step
from cdkit.train.learner import RUN_FILES, TrainSetup, find_lr, open_run  # noqa: F401

log = logging.getLogger(__name__)


# list types shared with the fine-tune of step 09 (`train_field` copies a field, not its annotation)
LrSteps = list[Annotated[int, Field(le=1000)]]
LrFactors = list[Annotated[float, Field(le=100)]]


class TrainParams(RunParams):
    "Parameters of notebook 03 and `cdkit train`: defaults train briefly on the demo data on a CPU; params/*_full.yaml hold the full settings"
    # run
    name: str = "resnet"                  # the model's folder: run_dir/models/<name>/
    # data (the split is made once by step 02 and reused by every model)
    max_train_images: Optional[int] = Field(3000, ge=1, le=10**9)  # None: all; fewer (whole products) for quick runs
    max_valid_images: Optional[int] = Field(None, ge=1, le=10**9)  # None: the whole validation split
    # model
    arch: str = "resnet18"                # demo stand-in for resnet101 (study names: resnet101, seresnet50, inception_v3, inception_v4, xception; or any timm name)
    pretrained_file: Optional[PathStr] = None  # local ImageNet state dict for the backbone; None: random init (no internet)
    item_size: Optional[int] = Field(None, ge=16, le=180)  # side of the random crop of the 180x180 picture; None: the study's (160 ResNets, 180 Inception/Xception)
    size: Optional[int] = Field(64, ge=16, le=1024)  # model input side, the crop resized on the device; None: item_size (demo: 64 for CPU minutes)
    mean: Optional[list[Annotated[float, Field(ge=-10, le=10)]]] = Field(None, min_length=3, max_length=3)  # normalization; None: the backbone's pretraining statistics
    std: Optional[list[Annotated[float, Field(le=10)]]] = Field(None, min_length=3, max_length=3)   # idem
    head_hidden: int = Field(0, ge=0, le=16384)  # 0: one linear layer after pooling; >0: fastai's head with this hidden width
    head_dropout: float = Field(0.25, ge=0, lt=1)  # dropout before the last linear layer
    hierarchy_weights: Optional[list[Annotated[float, Field(le=100)]]] = Field(None, max_length=3)  # None: categories only; [category, level 2, level 1] loss weights of auxiliary level heads (rwightman: [0.8, 0.1, 0.1])
    # optimization
    bs: int = Field(32, ge=1, le=65536)   # pictures per batch and process (study: 64x4 or 160x2)
    acc_steps: int = Field(1, ge=1, le=1024)  # batches per optimizer step (gradient accumulation)
    epochs: int = Field(3, ge=1, le=1000)  # passes over the training pictures
    lr: Union[Annotated[float, Field(gt=0, le=10)], Literal["find"]] = 3e-3  # peak learning rate (Adam); "find": lr_find's suggestion (valley)
    optimizer: Literal["adam", "sgd"] = "adam"  # adam (the kit's recipe) or sgd with momentum (the study's)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd's momentum (the study: 0.1, its authors' trainer.py)
    one_cycle: bool = True                # one-cycle schedule; False: flat lr, or the steps of lr_steps, or batch growth in place of decay
    lr_steps: LrSteps = Field(default_factory=list, max_length=100)  # epochs at which the lr steps down (the study: [1, 3]), with one_cycle off
    lr_step_factors: LrFactors = Field(default_factory=list, max_length=100)  # the lr from each step on, times lr (the study: [0.5, 0.05], 0.01 to 0.005 to 0.0005)
    pct_start: float = Field(0.25, gt=0, lt=1)  # share of the one cycle spent warming up
    wd: float = Field(0.01, ge=0, le=10)  # weight decay: decoupled with adam, L2 (as torch's SGD) with sgd (the study: 1e-4)
    label_smoothing: float = Field(0.1, ge=0, lt=1)  # 0: plain cross-entropy
    batch_growth_epochs: list[Annotated[int, Field(le=1000)]] = Field(default_factory=list, max_length=100)  # epochs at which the effective batch grows instead of the lr decaying (Smith et al. 2017), with one_cycle off
    batch_growth_factor: Union[Annotated[int, Field(ge=2, le=1000)], Annotated[list[Annotated[int, Field(ge=2, le=1000)]], Field(max_length=100)]] = 2  # growth factor at each of those epochs, or one per epoch (the study: [2, 10], the inverse of the lr steps x0.5, x0.1)
    max_bs: Optional[int] = Field(None, ge=1, le=65536)  # most pictures per batch that fit in memory; growth beyond goes to accumulation
    # augmentation (the random crop is the shift)
    flip: bool = True                     # random horizontal flip
    max_rotate: float = Field(10.0, ge=0, le=180)  # degrees
    max_zoom: float = Field(1.1, ge=1, le=4)  # zoom in up to this factor
    # hardware
    mixed_precision: Literal["bf16", "fp16", "none"] = "bf16"  # GPU only
    channels_last: bool = True            # GPU only
    sync_bn: bool = True                  # synchronized BatchNorm across GPUs in data-parallel runs
    num_workers: int = Field(2, ge=0, le=256)  # decoding processes per training process
    # control
    seed: int = Field(0, ge=0, le=2**32 - 1)  # weights, shuffling, augmentation
    resume: bool = False                  # continue from models/<name>/checkpoints/last.pth if it exists
    stop_after: Optional[int] = Field(None, ge=1, le=1000)  # stop after this many epochs as an interruption would; resume continues
    overwrite: bool = False               # replace what models/<name>/ holds (else a finished or started run there is refused)
    checkpoint_every: Optional[int] = Field(None, ge=1, le=10**9)  # also checkpoint every this many optimizer steps, mid-epoch (resume continues there)
    lr_find: bool = False                 # run fastai's lr_find before training and save lr_find.png (with lr "find", train at its suggestion)
    lr_find_iters: int = Field(100, ge=2, le=10000)  # mini-batches lr_find tries
    callbacks: list[Literal["csv", "tensorboard", "wandb"]] = Field(default_factory=list)  # extra loggers: csv (history.csv), tensorboard, wandb (fastai's own; the package must be installed)

    @model_validator(mode="after")
    def _consistent(self):
        check_name(self.name, "name")
        if self.one_cycle and self.batch_growth_epochs:
            raise ValueError(f"one_cycle=True contradicts batch_growth_epochs={self.batch_growth_epochs}: the one-cycle "
                             "schedule decays the lr while the batch grows; the study grows the batch instead of "
                             "decaying the lr, so set one_cycle=False with batch growth (or drop batch_growth_epochs)")
        check_schedule(self)
        bad = [e for e in self.batch_growth_epochs if not 0 < e < self.epochs]
        if bad:
            raise ValueError(f"batch_growth_epochs={self.batch_growth_epochs}: each must lie in 1..epochs-1={self.epochs - 1}")
        if isinstance(self.batch_growth_factor, list) and len(self.batch_growth_factor) != len(self.batch_growth_epochs):
            raise ValueError(f"batch_growth_factor={self.batch_growth_factor}: one factor per epoch of "
                             f"batch_growth_epochs={self.batch_growth_epochs} (or one int for all)")
        if self.stop_after is not None and self.stop_after > self.epochs:
            raise ValueError(f"stop_after={self.stop_after} is beyond epochs={self.epochs}")
        if self.max_bs is not None and self.max_bs < self.bs:
            raise ValueError(f"max_bs={self.max_bs} is below bs={self.bs}")
        w = self.hierarchy_weights
        if w is not None and (len(w) != 3 or any(x < 0 for x in w) or w[0] <= 0):
            raise ValueError(f"hierarchy_weights={w}: three loss weights [category, level 2, level 1], each >= 0 and "
                             "the category's > 0 (e.g. [0.8, 0.1, 0.1]); None for no level heads")
        if self.resume and self.overwrite:
            raise ValueError("resume=True contradicts overwrite=True: continue the run in models/<name>/, or replace it")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"mean={self.mean} and std={self.std}: give both (the normalization of your inputs) or "
                             "neither (the backbone's pretraining statistics); one alone would be ignored")
        if self.std is not None and not all(0 < s < float("inf") for s in self.std):
            raise ValueError(f"std={self.std} (with mean={self.mean}): each std must be finite and > 0 (dividing by "
                             "it normalizes the inputs)")
        if self.mean is not None and not all(abs(m) < float("inf") for m in self.mean):
            raise ValueError(f"mean={self.mean} (with std={self.std}): each mean must be finite")
        return self


def check_schedule(P):
    """The lr schedule's consistency (one_cycle, lr_steps, lr_step_factors against epochs) for any step that
    trains: step 03-05 and step 09's fine-tune share these parameters (`SCHEDULE_FIELDS`), checked here once"""
    if P.one_cycle and P.lr_steps:
        raise ValueError(f"one_cycle=True contradicts lr_steps={P.lr_steps}: two schedules for one lr; set "
                         "one_cycle=False for the stepped schedule")
    if len(P.lr_steps) != len(P.lr_step_factors):
        raise ValueError(f"lr_steps={P.lr_steps} and lr_step_factors={P.lr_step_factors} differ in length")
    if any(b <= a for a, b in zip(P.lr_steps, P.lr_steps[1:])) or any(not 0 < e < P.epochs for e in P.lr_steps):
        raise ValueError(f"lr_steps={P.lr_steps}: increasing epochs in 1..epochs-1={P.epochs - 1}")
    if any(f <= 0 for f in P.lr_step_factors):
        raise ValueError(f"lr_step_factors={P.lr_step_factors}: each must be > 0")


# the optimizer and schedule a fine-tune takes from training: the same names, bounds and checks
SCHEDULE_FIELDS = ("optimizer", "momentum", "one_cycle", "lr_steps", "lr_step_factors", "pct_start", "wd")


def train_field(name, default=None):
    "TrainParams' field `name` (its bounds and choices), with another default where given"
    from copy import copy
    f = copy(TrainParams.model_fields[name])
    if default is not None: f.default, f.default_factory = default, None
    return f


class InceptionTrainParams(TrainParams):
    "TrainParams of notebook 04: the same fields, Inception v3 by default (75 px: its smallest input)"
    name: str = "inception"
    arch: str = "inception_v3"            # Inception v3 (inception_v4: the study's other Inception)
    size: Optional[int] = Field(75, ge=16, le=1024)  # Inception v3 needs at least 75 px
    epochs: int = Field(2, ge=1, le=1000)
    max_train_images: Optional[int] = Field(1500, ge=1, le=10**9)


class XceptionTrainParams(TrainParams):
    "TrainParams of notebook 05: the same fields, Xception by default"
    name: str = "xception"
    arch: str = "xception"                # Chollet's Xception (timm legacy_xception), the study's
    epochs: int = Field(2, ge=1, le=1000)
    max_train_images: Optional[int] = Field(1500, ge=1, le=10**9)


@dataclass
class TrainResult:
    "What a training run produced"
    model_dir: Path
    params: TrainParams
    history: pd.DataFrame                 # metrics.csv
    epochs_done: int
    seconds: float
    learn: object = None                  # the fastai Learner (in-process use: notebooks, tests)
    prep: object = None                   # cdkit.data.prepare.Prepared
    valid_images: pd.DataFrame = None     # the validation rows, in the validation loader's order
    lr_suggestion: Optional[float] = None
    batch_history: list = field(default_factory=list)  # (epoch, bs, acc_steps) seen by BatchGrowth

    def summary(self) -> pd.DataFrame:
        last = self.history.iloc[-1] if len(self.history) else pd.Series(dtype=float)
        return pd.DataFrame([{"model": self.model_dir.name, "arch": self.params.arch, "epochs": self.epochs_done,
                              "minutes": round(self.seconds / 60, 2),
                              **{k: last.get(k) for k in ("train_loss", "valid_loss", "accuracy", "product_accuracy")}}])


def effective(P: TrainParams) -> TrainParams:
    "The effective parameters: input sizes filled in from the backbone, the backbone checked"
    from cdkit.train.models import resolve_arch
    try:
        backbone = resolve_arch(P.arch)  # unknown names fail here, before any work
    except ValueError as e:
        raise ParamsError(f"parameter 'arch' = {P.arch!r}: {e}") from None
    item_size = P.item_size or backbone.size
    return P.replace(item_size=item_size, size=P.size or item_size)

@step_entry("train")
def run(P: TrainParams) -> TrainResult:
    """Train one model as `P` says, in run_dir/models/<name>/ (locked while it trains): `setup`, then
    `find_lr` when lr_find=True or lr='find', then `fit` (the notebooks call the three in turn)"""
    from cdkit.train.distributed import world_size
    S = setup(P)
    try:
        if (S.params.lr_find or S.params.lr == "find") and not S.resuming:
            if world_size() > 1: log.warning("lr_find is skipped in data-parallel runs; run it in one process")
            else: find_lr(S)
        return fit(S)
    finally:
        S.close()


train = run


def setup(P: TrainParams) -> TrainSetup:
    """The learner of `P`, ready to fit (`cdkit.train.learner.open_run`): model folder locked and checked
    (refused when it holds a run and neither resume nor overwrite is asked), data loaded, resumed state
    restored; look at it (`S.dls.show_batch()`), `find_lr(S)`, then `fit(S)`"""
    P = effective(P)
    return open_run(P, RunLayout.of(P.run_dir).model_dir(P.name))


def fit(S: TrainSetup, lr=None) -> TrainResult:
    """Train the learner of `S` to `epochs` (from where a resumed run stopped), save model.pth + model.json,
    release the model folder. `lr`: None takes P.lr, or the lr_find suggestion when lr='find' (lr_find
    runs first if it has not)."""
    try:
        epochs_done = learner.fit(S, lr)
        metrics = ModelFiles(S.model_dir).metrics
        return TrainResult(model_dir=S.model_dir, params=S.params,
                           history=pd.read_csv(metrics) if metrics.exists() else pd.DataFrame(),
                           epochs_done=epochs_done, seconds=time.time() - S.t0, learn=S.learn, prep=S.prep,
                           valid_images=S.valid_images, lr_suggestion=S.lr_suggestion,
                           batch_history=learner.batch_history(S.learn))
    finally:
        S.close()


def load_learner(run_dir="runs/demo", name="resnet", device=None):
    """A trained model of run_dir/models/<name>/ as a fastai Learner again (a new notebook after the demo):
    rebuilt from its params.yaml, model.json and model.pth (safe loads only: no pickle is executed) over
    the data it was trained on, with the same loaders, loss and metrics. Nothing in the folder is written
    or locked; `learn.predict`, `get_preds`, `show_results`, `fit` work as on the learner `fit` returned."""
    import yaml
    from cdkit.base.params import make_params
    from cdkit.train.models import read_card
    model_dir = RunLayout.of(run_dir).model_dir(name)
    card = read_card(model_dir)  # FileNotFoundError naming model.json when the model was not trained
    saved = ModelFiles(model_dir).params
    if not saved.exists(): raise FileNotFoundError(f"{saved} not found: the parameters the model was trained with")
    values = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k in TrainParams.model_fields}
    P = make_params(TrainParams, {**values, "resume": False, "overwrite": False}, where=str(saved))
    return learner.rebuild_learner(P, model_dir, card, device)


def record(run_dir, result: TrainResult, step="train"):
    "The last epoch's validation figures of a trained model, under 'training' in the run's results"
    from cdkit.steps.report import recorder
    rec = recorder(step)
    last = result.history.iloc[-1] if len(result.history) else {}
    rec(run_dir, "03-05 training", result.model_dir.name,
        {"arch": result.params.arch, "epochs": result.epochs_done, "minutes": round(result.seconds / 60, 2),
         "lr": float(result.params.lr),
         **{k: float(last[k]) for k in ("valid_loss", "accuracy", "product_accuracy") if k in last}})
    if len(result.history):  # the curves go into the report beside this row
        import matplotlib.pyplot as plt
        from cdkit.steps.report import save_figure
        fig = plot_history(result.history, title=result.model_dir.name)
        save_figure(fig, run_dir, f"03_history_{result.model_dir.name}")
        plt.close(fig)
    from cdkit.steps.report import write_report
    write_report(run_dir)  # a notebook run alone (papermill, JupyterLab) leaves its report too, as `cdkit demo` does


# ---- reports for the notebooks ----

def plot_history(history: pd.DataFrame, title=None):
    "Loss and accuracy per epoch (from metrics.csv), titled with the model's name"
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    a.set_title(f"{title}: loss" if title else "loss"), b.set_title(f"{title}: validation accuracy" if title else "validation accuracy")
    h = history.copy()
    for k in ("train_loss", "valid_loss"):
        if k in h: a.plot(h["epoch"] + 1, h[k], marker="o", label=k)
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    for k, lab in (("accuracy", "image top-1"), ("product_accuracy", "product top-1")):
        if k in h: b.plot(h["epoch"] + 1, h[k], marker="o", label=lab)
    b.set_xlabel("epoch"), b.set_ylabel("validation accuracy"), b.legend()
    fig.tight_layout()
    return fig


def show_lr_find(run_dir):
    "The lr_find plot a run saved"
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.imshow(plt.imread(ModelFiles(run_dir).lr_find)), ax.axis("off")
    return fig


def misclassified(result: TrainResult, n=16) -> pd.DataFrame:
    "The `n` validation pictures predicted wrong with the highest confidence"
    probs, targets = result.learn.get_preds(dl=result.learn.dls.valid)
    conf, pred = probs.max(dim=1)
    t = result.valid_images.copy()
    t["true"], t["pred"], t["confidence"] = targets.numpy(), pred.numpy(), conf.numpy()
    t["row"] = np.arange(len(t))
    return t[t["true"] != t["pred"]].sort_values("confidence", ascending=False).head(n)


def show_misclassified(result: TrainResult, n=16, cols=4):
    "A grid of the most confidently wrong validation pictures, with true and predicted category names"
    import matplotlib.pyplot as plt
    wrong = misclassified(result, n)
    if wrong.empty:
        print("no misclassified validation picture")
        return None
    ds, cat = result.learn.dls.valid.dataset, result.prep.catalog
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat: ax.axis("off")
    for ax, (_, r) in zip(axes.flat, wrong.iterrows()):
        ax.imshow(ds.decode_row(int(r["row"])))
        ax.set_title(f"true: {cat.name(int(r['true']))[:28]}\npred: {cat.name(int(r['pred']))[:28]} "
                     f"({r['confidence']:.2f})", fontsize=8)
    fig.suptitle(f"{result.model_dir.name}: the most confidently misclassified validation pictures", fontsize=10)
    fig.tight_layout()
    return fig


def what_this_shows(result: TrainResult) -> str:
    h = result.history
    if not len(h):
        return "no epoch ran (stop_after or an existing finished checkpoint)."
    first, last = h.iloc[0], h.iloc[-1]
    n_classes = result.prep.catalog.n_classes
    return (f"{result.params.arch} trained {result.epochs_done} epoch(s) in {result.seconds / 60:.1f} min: validation "
            f"product accuracy {first.get('product_accuracy', float('nan')):.3f} after the first epoch, "
            f"{last.get('product_accuracy', float('nan')):.3f} after the last (chance: {1 / n_classes:.4f}); image "
            f"accuracy {last.get('accuracy', float('nan')):.3f}. Product accuracy above image accuracy means "
            "averaging a product's pictures already corrects single-picture mistakes.")
