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
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from cdkit.steps.entry import step_entry
from cdkit.base.params import ParamsError, PathStr, RunParams, changed_params, save_params
from cdkit.base.rng import rng_state
from cdkit.runs import RunLayout, check_name

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


# what may differ when a run resumes: everything else changes the model or the data order
RESUMABLE_CHANGES = {"resume", "stop_after", "num_workers", "lr_find", "lr_find_iters", "epochs", "overwrite",
                     "checkpoint_every", "callbacks"}
# files of a run in models/<name>/: one of them there means the name is taken
RUN_FILES = ("model.json", "model.pth", "metrics.csv", "checkpoints", "lr_find.png", "history.csv", "tensorboard")
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


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


def finished_epochs(model_dir: Path) -> Optional[int]:
    """The epochs of a finished model in `model_dir` (model.json, and no checkpoint: a run removes its
    checkpoint when it trained all its epochs); None when there is none"""
    from cdkit.train.models import read_card
    if (model_dir / "checkpoints" / "last.pth").exists() or not (model_dir / "model.json").exists(): return None
    return read_card(model_dir).epochs_done


def check_resume(P: TrainParams, model_dir: Path):
    """Refuse to resume a run whose saved parameters differ in anything that changes the model or the data
    order (paths compared by what they point to), and to continue a finished model to more epochs"""
    import yaml
    saved_path = model_dir / "params.yaml"
    finished = finished_epochs(model_dir) if P.resume else None
    if not (P.resume and saved_path.exists() and ((model_dir / "checkpoints" / "last.pth").exists()
                                                  or finished is not None)):
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diff = changed_params(saved, P, [k for k in type(P).model_fields if k not in RESUMABLE_CHANGES])
    if diff:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ParamsError(f"resume=True: {model_dir} was trained with other parameters ({what}); resuming would "
                          "change the model or the data order. Use the saved values, or another name")
    if finished is not None and P.epochs > finished:
        # its schedule ran to its end (one-cycle annealed to ~0): more epochs would not be the longer run
        raise ParamsError(f"resume=True epochs={P.epochs}: {model_dir} is a finished model of {finished} epochs "
                          f"(model.pth); a finished run keeps no checkpoint to continue from. Train another name "
                          f"with epochs={P.epochs}, or overwrite=true")


def _sample_products(images, max_images, seed):
    "Rows of whole products, drawn at random, totalling at most `max_images` pictures (at least one product)"
    if max_images is None or len(images) <= max_images: return images
    counts = images.groupby("product_id", sort=False).size()
    order = counts.sample(frac=1.0, random_state=seed)
    keep = order.index[np.cumsum(order.to_numpy()) <= max_images]
    if len(keep) == 0: keep = order.index[:1]
    return images[images["product_id"].isin(keep)]


def _images(prep, P):
    images = prep.train_images()
    valid_rows = prep.valid_mask(images)
    train = _sample_products(images[prep.train_mask(images)], P.max_train_images, P.seed)
    valid = _sample_products(images[valid_rows], P.max_valid_images, P.seed)
    return pd.concat([train, valid], ignore_index=True), np.r_[np.zeros(len(train), bool), np.ones(len(valid), bool)]


def _effective_batch(learn):
    from cdkit.train.callbacks import GradAccum, inner_dl
    from cdkit.train.distributed import world_size
    acc = learn.cbs.filter(lambda c: isinstance(c, GradAccum))
    return inner_dl(learn.dls.train).bs * (acc[0].acc_steps if acc else 1) * world_size()


def _lr(learn): return learn.opt.hypers[-1]["lr"] if learn.opt is not None else None


@dataclass
class TrainSetup:
    """A learner ready to fit, from `setup(P)`: look at it (`S.dls.show_batch()`), find a learning rate
    (`find_lr(S)`), then `fit(S)`. The model folder stays locked from `setup` until `fit` returns
    (or `S.close()`)."""
    params: TrainParams                   # effective parameters (input sizes filled in)
    learn: object                         # the fastai Learner
    prep: object                          # cdkit.data.prepare.Prepared
    valid_images: pd.DataFrame            # the validation rows, in the validation loader's order
    start_epoch: int                      # epochs a resumed run has done already
    t0: float = field(default_factory=time.time)
    resuming: bool = False                # continues from a checkpoint (lr_find would disturb it)
    lr_suggestion: Optional[float] = None
    lock: object = None                   # contextlib.ExitStack holding the model folder's lock
    rng: object = None                    # RNG states at the end of setup: fit starts from them

    @property
    def dls(self): return self.learn.dls

    @property
    def model_dir(self) -> Path: return Path(self.learn.path)

    def close(self):
        "Release the model folder"
        if self.lock is not None: self.lock.close()
        self.lock = None


def check_fresh(P: TrainParams, model_dir: Path):
    """Refuse to train into a folder that holds another run's files unless `resume` or `overwrite` says
    what to do with them; with `overwrite`, remove them first (no stale model card outlives a failed retrain)"""
    from cdkit.base.io import remove
    found = [n for n in RUN_FILES if (model_dir / n).exists()]
    if not found or getattr(P, "resume", False): return
    if not P.overwrite:
        raise ParamsError(f"{model_dir} already holds a run ({', '.join(found)}): pass overwrite=True to replace it, "
                          f"resume=True to continue it, or another name (name=... or run_dir=...)")
    for n in found:
        f = model_dir / n
        remove(f)
    log.info("overwrite: removed %s from %s", ", ".join(found), model_dir)


def logger_callbacks(names, model_dir):
    """fastai's own logging callbacks by name (csv, tensorboard, wandb); ParamsError naming the package
    that a chosen one needs and that is not installed"""
    import importlib.util
    missing = [f"{n!r} needs the package {LOGGER_PACKAGES[n]!r} (pip install {LOGGER_PACKAGES[n]})"
               for n in names if n in LOGGER_PACKAGES and importlib.util.find_spec(LOGGER_PACKAGES[n]) is None]
    if missing: raise ParamsError("parameter 'callbacks': " + "; ".join(missing))
    cbs = []
    if model_dir is None: return cbs  # the check alone
    for n in dict.fromkeys(names):
        if n == "csv":
            from fastai.callback.progress import CSVLogger
            cbs.append(CSVLogger(Path(model_dir) / "history.csv", append=True))
        elif n == "tensorboard":
            from fastai.callback.tensorboard import TensorBoardCallback
            cbs.append(TensorBoardCallback(log_dir=Path(model_dir) / "tensorboard", trace_model=False))
        elif n == "wandb":
            from fastai.callback.wandb import WandbCallback
            cbs.append(WandbCallback(log_preds=False, log_model=False))
    return cbs


def setup(P: TrainParams) -> TrainSetup:
    """The learner of `P`, ready to fit: model folder locked and checked (refused when it holds a run
    and neither resume nor overwrite is asked), data loaded, resumed state restored"""
    import contextlib
    from cdkit.train.distributed import check_launch, rank, world_size
    from cdkit.base.io import folder_lock
    P = effective(P)
    check_launch()  # `accelerate launch --cpu --num_processes 2` would silently train in one process
    if world_size() > 1 and P.lr == "find":
        raise ParamsError("lr='find' runs lr_find, which takes one process: run it once without the launcher "
                          "(lr_find=True) and pass the lr it suggests")
    if world_size() > 1 and P.checkpoint_every:
        raise ParamsError("checkpoint_every: mid-epoch checkpoints are written by one-process runs only; "
                          "data-parallel runs checkpoint after each epoch")
    model_dir = RunLayout.of(P.run_dir).model_dir(P.name)
    # parameters and inputs are checked before the lock: a refused run writes nothing, not even the folder
    check_resume(_resumed_lr(P, model_dir), model_dir)
    logger_callbacks(P.callbacks, None)
    prep = None
    if world_size() == 1:
        from cdkit.data.prepare import load_prepared
        prep = load_prepared(P.data_dir, P.work_dir)
    if rank() == 0 and not P.overwrite: check_fresh(P, model_dir)
    lock = contextlib.ExitStack()
    try:
        if rank() == 0:  # data-parallel: rank 0 holds the folder for every process of the run
            lock.enter_context(folder_lock(model_dir, "model folder"))
            check_fresh(P, model_dir)
        S = _setup(P, model_dir, prep)
    except BaseException:
        lock.close()
        raise
    S.lock = lock
    return S


def _setup(P: TrainParams, run_dir: Path, prep=None) -> TrainSetup:
    from fastai.learner import ValueMetric
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from functools import partial

    from cdkit.train import callbacks as C
    from cdkit.data.loaders import make_dataloaders
    from cdkit.train.distributed import init_state, rank, world_size
    from cdkit.train.hierarchy import HierarchyLoss, LevelAccuracy, level_heads
    from cdkit.train.models import make_learner, norm_stats
    from cdkit.data.prepare import load_prepared

    t0 = time.time()
    state = init_state() if world_size() > 1 else None
    P = _resumed_lr(P, run_dir)
    check_resume(P, run_dir)
    cb_loggers = logger_callbacks(P.callbacks, run_dir) if rank() == 0 else []
    if state is not None:
        with state.main_process_first():  # one process rebuilds a stale index, the others read it
            prep = load_prepared(P.data_dir, P.work_dir)
    elif prep is None:
        prep = load_prepared(P.data_dir, P.work_dir)
    from cdkit.base.io import makedirs
    makedirs(run_dir)
    if rank() == 0: save_params(P, run_dir / "params.yaml")
    set_seed(P.seed + rank())
    images, valid_mask = _images(prep, P)
    mean, std = (P.mean, P.std) if P.mean is not None else norm_stats(P.arch)
    device = state.device if state is not None else None
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, valid_mask=valid_mask, size=P.size,
                           item_size=P.item_size, bs=P.bs, num_workers=P.num_workers, mean=mean, std=std,
                           aug=dict(flip=P.flip, max_rotate=P.max_rotate, max_zoom=P.max_zoom), seed=P.seed,
                           device=device, vocab=prep.catalog.category_ids)
    # fastai works out `n_inp` lazily by pushing one batch through the augmentations, which draws
    # from the RNGs at the first training batch; done now, a resumed run draws the same numbers.
    for dl in dls.loaders: dl.n_inp
    valid_images = images[valid_mask].reset_index(drop=True)
    loss = LabelSmoothingCrossEntropyFlat(eps=P.label_smoothing) if P.label_smoothing else CrossEntropyLossFlat()
    ckpt = run_dir / "checkpoints" / "last.pth"
    resuming = P.resume and ckpt.exists()
    finished = finished_epochs(run_dir) if P.resume and not resuming else None  # check_resume: epochs <= these
    if P.resume and not resuming and finished is None:
        log.warning("resume: no checkpoint at %s; starting from scratch", ckpt)
    saved = C.read_checkpoint(ckpt) if resuming else None  # a safe load: refused, never executed, if not plain
    start_epoch = int(saved["epoch"]) if resuming else finished or 0
    precision, note = C.precision_callbacks(P.mixed_precision, P.channels_last, dls.device)
    if note: log.info(note)
    cbs = [C.GradAccum(P.acc_steps)] if P.acc_steps > 1 or P.max_bs else []
    if P.batch_growth_epochs:
        cbs.append(C.BatchGrowth(P.batch_growth_epochs, P.batch_growth_factor, P.max_bs))
    cbs += precision + [C.EpochLog(run_dir / "metrics.csv", start_epoch), C.FiniteLoss(),
                        C.Checkpoint(ckpt, start_epoch, every=P.checkpoint_every)] + cb_loggers
    if P.stop_after: cbs.append(C.StopAfter(P.stop_after))
    cat = prep.catalog
    levels = (cat.level1, cat.level2, cat.n_level(1), cat.n_level(2)) if P.hierarchy_weights else None
    learn = make_learner(dls, P.arch, cat.n_classes, P.pretrained_file, mean, std, P.head_hidden,
                         P.head_dropout, levels=levels, loss_func=loss, path=run_dir, wd=P.wd, cbs=cbs,
                         opt_func=opt_func(P),
                         metrics=[accuracy, C.ProductAccuracy(valid_images["product_id"], valid_images["label"])])
    if levels is not None:
        heads = level_heads(learn.model)
        learn.loss_func = HierarchyLoss(loss, heads, P.hierarchy_weights)
        # a head without loss gets no gradient: frozen, so data-parallel training does not wait for it
        heads.level2.requires_grad_(P.hierarchy_weights[1] > 0)
        heads.level1.requires_grad_(P.hierarchy_weights[2] > 0)
        learn.metrics += [LevelAccuracy(cat.level2, 2), LevelAccuracy(cat.level1, 1)]
    learn.metrics += [ValueMetric(partial(_effective_batch, learn), "batch"), ValueMetric(partial(_lr, learn), "lr")]
    learn.model.to(dls.device)
    if finished is not None:  # a finished model: its weights; fit has nothing left to do
        from cdkit.train.callbacks import safe_load
        learn.model.load_state_dict(safe_load(run_dir / "model.pth"))
    if resuming:
        saved = C.load_checkpoint(learn, ckpt, saved)
        learn.cbs.filter(lambda c: isinstance(c, C.Checkpoint))[0].resumed = {
            k: saved.get(k) for k in ("scaler", "smooth_loss", "mid_epoch")}
        mid = saved.get("mid_epoch")
        log.info("resuming %s after epoch %d%s", run_dir, start_epoch,
                 f" and {mid['batches']} batches of the next" if mid else "")
    # what a notebook does between setup and fit (show_batch, lr_find) draws from the RNGs and the
    # loaders' shuffle; fit puts these back, so looking at the data never changes the training
    rng = (rng_state(), [C.inner_dl(dl).rng.getstate() for dl in dls.loaders])
    return TrainSetup(P, learn, prep, valid_images, start_epoch, t0, resuming, rng=rng)


def _resumed_lr(P: TrainParams, run_dir: Path) -> TrainParams:
    "lr='find' on resume: the lr the run found and saved when it began"
    import yaml
    saved = run_dir / "params.yaml"
    if P.lr == "find" and P.resume and saved.exists():
        lr = (yaml.safe_load(saved.read_text()) or {}).get("lr")
        if isinstance(lr, float): return P.replace(lr=lr)
    return P


def _plain_cbs():
    from cdkit.train.callbacks import Checkpoint, EpochLog, FiniteLoss, StopAfter
    return (Checkpoint, EpochLog, FiniteLoss, StopAfter)


def find_lr(S: TrainSetup, iters=None) -> float:
    """fastai's lr_find on the learner of `S` (without touching the run's log or checkpoint): saves and
    shows lr_find.png, returns the suggestion (valley), which `fit(S)` uses when lr='find'"""
    from cdkit.train.distributed import world_size
    if world_size() > 1: raise ParamsError("lr_find takes one process: run it without the launcher")
    S.lr_suggestion = _lr_find(S.learn, S.model_dir, iters or S.params.lr_find_iters)
    return S.lr_suggestion


def _lr_find(learn, run_dir, iters=100):
    import matplotlib
    import matplotlib.pyplot as plt
    from cdkit.train.callbacks import Checkpoint, EpochLog, FiniteLoss, StopAfter
    # lr_find is a short fit of its own: it must not write the run's log or checkpoint, and it drives the
    # loss to diverge on purpose (FiniteLoss would stop it)
    from fastai.callback.progress import CSVLogger
    # and not the loggers' (tensorboard, wandb, csv) either
    loggers = tuple(type(c) for c in learn.cbs if type(c).__name__ in ("TensorBoardCallback", "WandbCallback"))
    with learn.removed_cbs(learn.cbs.filter(lambda c: isinstance(c, (Checkpoint, EpochLog, FiniteLoss, StopAfter, CSVLogger) + loggers))):
        suggestion = learn.lr_find(num_it=iters, show_plot=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs, losses = learn.recorder.lrs, learn.recorder.losses
    ax.plot(lrs, [float(l) for l in losses])
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss")
    ax.set_title("learning-rate finder")
    ax.axvline(suggestion.valley, color="r", ls="--", label=f"valley {suggestion.valley:.2e}")
    ax.legend()
    from cdkit.base.io import atomic_write
    atomic_write(run_dir / "lr_find.png", lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    if matplotlib.get_backend().lower() == "agg": plt.close(fig)
    return float(suggestion.valley)


def opt_func(P: TrainParams):
    "fastai's Adam (decoupled weight decay), or SGD with momentum and L2 weight decay as the study's torch code"
    from functools import partial
    from fastai.optimizer import SGD, Adam
    return partial(SGD, mom=P.momentum, decouple_wd=False) if P.optimizer == "sgd" else Adam


def model_card(P: TrainParams, n_classes, epochs_done, n_levels=(0, 0)):
    """The card saved beside the weights: how to rebuild the model and feed it (`n_levels`: the catalog's
    level-1 and level-2 counts, recorded when the model has level heads)"""
    from cdkit.train.models import ModelCard, norm_stats
    mean, std = (P.mean, P.std) if P.mean is not None else norm_stats(P.arch)
    n1, n2 = (int(n) for n in n_levels) if P.hierarchy_weights else (0, 0)
    return ModelCard(arch=P.arch, n_classes=int(n_classes), size=P.size, item_size=P.item_size, mean=tuple(mean),
                     std=tuple(std), head_hidden=P.head_hidden, head_dropout=P.head_dropout,
                     label_smoothing=P.label_smoothing, epochs_done=epochs_done,
                     hierarchy_weights=list(P.hierarchy_weights) if P.hierarchy_weights else None,
                     n_level1=n1, n_level2=n2)


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


def fit(S: TrainSetup, lr=None) -> TrainResult:
    """Train the learner of `S` to `epochs` (from where a resumed run stopped), save model.pth + model.json,
    release the model folder. `lr`: None takes P.lr, or the lr_find suggestion when lr='find' (lr_find
    runs first if it has not)."""
    from cdkit.train.distributed import distrib_ctx, rank
    from cdkit.train.models import save_trained
    from cdkit.train.callbacks import BatchGrowth, Checkpoint, check_finite_weights, fit_schedule
    from cdkit.base.io import remove
    try:
        P, learn, start_epoch = S.params, S.learn, S.start_epoch
        if lr is None and P.lr == "find":
            lr = S.lr_suggestion if S.lr_suggestion is not None else find_lr(S)
            log.info("lr='find': training at lr_find's suggestion %.2e", lr)
        if lr is not None and lr != P.lr:
            P = S.params = P.replace(lr=float(lr))
            if rank() == 0: save_params(P, S.model_dir / "params.yaml")  # the lr a resume must keep
        run_dir = S.model_dir
        epochs_done = start_epoch
        if S.rng is not None:
            from cdkit.base.rng import set_rng_state
            from cdkit.train.callbacks import inner_dl
            set_rng_state(S.rng[0])
            for dl, st in zip(learn.dls.loaders, S.rng[1]): inner_dl(dl).rng.setstate(st)
        if start_epoch < P.epochs:
            with distrib_ctx(learn, sync_bn=P.sync_bn):
                fit_schedule(learn, P.epochs, P.lr, P.one_cycle, P.pct_start, P.lr_steps, P.lr_step_factors,
                             start_epoch=start_epoch)
            ck = learn.cbs.filter(lambda c: isinstance(c, Checkpoint))
            epochs_done = ck[0].done if ck else learn.epoch + 1  # an interruption mid-epoch: the whole epochs
        cat = S.prep.catalog
        check_finite_weights(learn.model, str(run_dir))
        if rank() == 0:
            save_trained(learn.model, run_dir, model_card(P, cat.n_classes, epochs_done, (cat.n_level(1), cat.n_level(2))))
            if epochs_done >= P.epochs:
                # finished: the checkpoint (weights + optimizer state, 3x model.pth) only served a resume, and
                # continuing a finished schedule is refused (check_resume); a stopped run keeps it
                remove(run_dir / "checkpoints" / "last.pth")
        # the learner goes on to notebooks (get_preds, plots): its run bookkeeping must not rewrite
        # metrics.csv, the checkpoint or the loggers when they run a validation pass
        learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, _plain_cbs()) or type(c).__name__ in (
            "CSVLogger", "TensorBoardCallback", "WandbCallback")))
        growth = learn.cbs.filter(lambda c: isinstance(c, BatchGrowth))
        metrics = run_dir / "metrics.csv"
        return TrainResult(model_dir=run_dir, params=P,
                           history=pd.read_csv(metrics) if metrics.exists() else pd.DataFrame(),
                           epochs_done=epochs_done, seconds=time.time() - S.t0, learn=learn, prep=S.prep,
                           valid_images=S.valid_images, lr_suggestion=S.lr_suggestion,
                           batch_history=growth[0].history if growth else [])
    finally:
        S.close()


def load_learner(run_dir="runs/demo", name="resnet", device=None):
    """A trained model of run_dir/models/<name>/ as a fastai Learner again (a new notebook after the demo):
    rebuilt from its params.yaml, model.json and model.pth (safe loads only: no pickle is executed) over
    the data it was trained on, with the same loaders, loss and metrics. Nothing in the folder is written
    or locked; `learn.predict`, `get_preds`, `show_results`, `fit` work as on the learner `fit` returned."""
    import yaml
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.metrics import accuracy
    from cdkit.train import callbacks as C
    from cdkit.data.loaders import make_dataloaders
    from cdkit.train.hierarchy import HierarchyLoss, LevelAccuracy
    from cdkit.train.models import make_learner, read_card
    from cdkit.base.params import make_params
    from cdkit.data.prepare import load_prepared
    model_dir = RunLayout.of(run_dir).model_dir(name)
    card = read_card(model_dir)  # FileNotFoundError naming model.json when the model was not trained
    saved = model_dir / "params.yaml"
    if not saved.exists(): raise FileNotFoundError(f"{saved} not found: the parameters the model was trained with")
    values = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k in TrainParams.model_fields}
    P = make_params(TrainParams, {**values, "resume": False, "overwrite": False}, where=str(saved))
    prep = load_prepared(P.data_dir, P.work_dir)
    images, valid_mask = _images(prep, P)
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, valid_mask=valid_mask, size=card.size,
                           item_size=card.item_size, bs=P.bs, num_workers=P.num_workers, mean=card.mean, std=card.std,
                           aug=dict(flip=P.flip, max_rotate=P.max_rotate, max_zoom=P.max_zoom), seed=P.seed,
                           device=device, vocab=prep.catalog.category_ids)
    valid_images = images[valid_mask].reset_index(drop=True)
    cat = prep.catalog
    levels = (cat.level1, cat.level2, cat.n_level(1), cat.n_level(2)) if card.has_level_heads else None
    loss = LabelSmoothingCrossEntropyFlat(eps=P.label_smoothing) if P.label_smoothing else CrossEntropyLossFlat()
    learn = make_learner(dls, card.arch, card.n_classes, None, card.mean, card.std, card.head_hidden,
                         card.head_dropout, levels=levels, loss_func=loss, path=model_dir, wd=P.wd, opt_func=opt_func(P),
                         metrics=[accuracy, C.ProductAccuracy(valid_images["product_id"], valid_images["label"])])
    learn.model.load_state_dict(C.safe_load(model_dir / "model.pth"))
    if levels is not None:
        from cdkit.train.hierarchy import level_heads
        learn.loss_func = HierarchyLoss(loss, level_heads(learn.model), P.hierarchy_weights)
        learn.metrics += [LevelAccuracy(cat.level2, 2), LevelAccuracy(cat.level1, 1)]
    learn.model.to(dls.device).eval()
    return learn


def record(run_dir, result: TrainResult):
    "The last epoch's validation figures of a trained model, under 'training' in the run's results"
    from cdkit.steps.report import record as rec
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
    ax.imshow(plt.imread(Path(run_dir) / "lr_find.png")), ax.axis("off")
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
