"""Learner assembly for training one backbone in a model folder (steps 03-05; step 09's fine-tune takes
its optimizer and product sampling): is the folder free, may a run resume there, which pictures it
trains on, the optimizer, the loggers, the learner with its callbacks and resumed state, lr_find, the
fit with exact resume, and the model card saved beside the weights.

`P`, where a function takes it, is the training settings: any object with the fields of
`cdkit.steps.train.TrainParams` (the library never imports the step's class).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from cdkit.base.params import ParamsError, changed_params, save_params
from cdkit.base.rng import rng_state
from cdkit.train.files import ModelFiles

log = logging.getLogger(__name__)

# files of a run in models/<name>/: one of them there means the name is taken
RUN_FILES = ModelFiles.trained_names()
# settings that may differ when a run resumes: every other changes the model or the data order
RESUMABLE_CHANGES = {"resume", "stop_after", "num_workers", "lr_find", "lr_find_iters", "epochs", "overwrite",
                     "checkpoint_every", "callbacks"}
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TAKEN_ADVICE = (": pass overwrite=True to replace it, resume=True to continue it, or another name (name=... or "
                "run_dir=...)")


# ---- the model folder ----

def held_files(folder, names=RUN_FILES) -> list:
    "What of a run `folder` holds: those of `names` there; names=None: every file in it"
    folder = Path(folder)
    if names is None: return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return [n for n in names if (folder / n).exists()]


def check_fresh(folder, resume=False, overwrite=False, names=RUN_FILES, what="a run", advice=TAKEN_ADVICE,
                where="", clear=True) -> list:
    """Refuse a folder that holds `what` (files of `names`; None: any file) unless `resume` or `overwrite`
    says what to do with it; with overwrite and `clear`, remove it first (no stale model card outlives a
    failed retrain; names=None: the whole folder). `where` leads the message, `advice` ends it. Returns
    what the folder held."""
    folder = Path(folder)
    found = held_files(folder, names)
    if resume: return found
    if found and not overwrite:
        listed = f" ({', '.join(found)})" if names is not None else ""
        raise ParamsError(f"{where}{folder} already holds {what}{listed}{advice}")
    if overwrite and clear:
        from cdkit.base.io import remove
        for p in [folder] if names is None else [folder / n for n in found]: remove(p)
        if found and names is not None: log.info("overwrite: removed %s from %s", ", ".join(found), folder)
    return found


def finished_epochs(model_dir: Path) -> Optional[int]:
    """The epochs of a finished model in `model_dir` (model.json, and no checkpoint: a run removes its
    checkpoint when it trained all its epochs); None when there is none"""
    from cdkit.train.models import read_card
    if ModelFiles(model_dir).checkpoint.exists() or not ModelFiles(model_dir).card.exists(): return None
    return read_card(model_dir).epochs_done


def check_resume(P, model_dir: Path):
    """Refuse to resume a run whose saved parameters differ in anything that changes the model or the data
    order (paths compared by what they point to), and to continue a finished model to more epochs"""
    import yaml
    saved_path = ModelFiles(model_dir).params
    finished = finished_epochs(model_dir) if P.resume else None
    if not (P.resume and saved_path.exists() and (ModelFiles(model_dir).checkpoint.exists()
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


def resumed_lr(P, model_dir: Path):
    "lr='find' on resume: the lr the run found and saved when it began"
    import yaml
    saved = ModelFiles(model_dir).params
    if P.lr == "find" and P.resume and saved.exists():
        lr = (yaml.safe_load(saved.read_text()) or {}).get("lr")
        if isinstance(lr, float): return P.replace(lr=lr)
    return P


# ---- data, optimizer, loggers, card ----

def sample_products(images, max_images, seed):
    "Rows of whole products, drawn at random, totalling at most `max_images` pictures (at least one product)"
    if max_images is None or len(images) <= max_images: return images
    counts = images.groupby("product_id", sort=False).size()
    order = counts.sample(frac=1.0, random_state=seed)
    keep = order.index[np.cumsum(order.to_numpy()) <= max_images]
    if len(keep) == 0: keep = order.index[:1]
    return images[images["product_id"].isin(keep)]


def training_images(prep, max_train_images, max_valid_images, seed):
    "(image table: sampled training rows then validation rows, validation mask) of the prepared data"
    images = prep.train_images()
    valid_rows = prep.valid_mask(images)
    train = sample_products(images[prep.train_mask(images)], max_train_images, seed)
    valid = sample_products(images[valid_rows], max_valid_images, seed)
    return pd.concat([train, valid], ignore_index=True), np.r_[np.zeros(len(train), bool), np.ones(len(valid), bool)]


def opt_func(optimizer="adam", momentum=0.9):
    "fastai's Adam (decoupled weight decay), or SGD with momentum and L2 weight decay as the study's torch code"
    from functools import partial
    from fastai.optimizer import SGD, Adam
    return partial(SGD, mom=momentum, decouple_wd=False) if optimizer == "sgd" else Adam


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
            cbs.append(CSVLogger(ModelFiles(model_dir).history, append=True))
        elif n == "tensorboard":
            from fastai.callback.tensorboard import TensorBoardCallback
            cbs.append(TensorBoardCallback(log_dir=ModelFiles(model_dir).tensorboard, trace_model=False))
        elif n == "wandb":
            from fastai.callback.wandb import WandbCallback
            cbs.append(WandbCallback(log_preds=False, log_model=False))
    return cbs


def model_card(P, n_classes, epochs_done, n_levels=(0, 0)):
    """The card saved beside the weights: how to rebuild the model and feed it (`n_levels`: the catalog's
    level-1 and level-2 counts, recorded when the model has level heads)"""
    from cdkit.train.models import ModelCard, norm_stats
    mean, std = norm_stats(P.arch, P.mean, P.std)
    n1, n2 = (int(n) for n in n_levels) if P.hierarchy_weights else (0, 0)
    return ModelCard(arch=P.arch, n_classes=int(n_classes), size=P.size, item_size=P.item_size, mean=tuple(mean),
                     std=tuple(std), head_hidden=P.head_hidden, head_dropout=P.head_dropout,
                     label_smoothing=P.label_smoothing, epochs_done=epochs_done,
                     hierarchy_weights=list(P.hierarchy_weights) if P.hierarchy_weights else None,
                     n_level1=n1, n_level2=n2)


# ---- the learner ----

@dataclass
class TrainSetup:
    """A learner ready to fit, from `open_run` (`cdkit.steps.train.setup`): look at it (`S.dls.show_batch()`),
    find a learning rate (`find_lr(S)`), then fit. The model folder stays locked until the fit returns
    (or `S.close()`)."""
    params: object                        # effective TrainParams (input sizes filled in)
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


def open_run(P, model_dir: Path) -> TrainSetup:
    """The learner of the effective settings `P` in `model_dir`, ready to fit: folder locked and checked
    (refused when it holds a run and neither resume nor overwrite is asked), data loaded, resumed state
    restored. Parameters and inputs are checked before the lock: a refused run writes nothing."""
    from cdkit.train.distributed import check_launch, rank, world_size
    from cdkit.base.io import folder_lock
    check_launch()  # `accelerate launch --cpu --num_processes 2` would silently train in one process
    if world_size() > 1 and P.lr == "find":
        raise ParamsError("lr='find' runs lr_find, which takes one process: run it once without the launcher "
                          "(lr_find=True) and pass the lr it suggests")
    if world_size() > 1 and P.checkpoint_every:
        raise ParamsError("checkpoint_every: mid-epoch checkpoints are written by one-process runs only; "
                          "data-parallel runs checkpoint after each epoch")
    check_resume(resumed_lr(P, model_dir), model_dir)
    logger_callbacks(P.callbacks, None)
    prep = None
    if world_size() == 1:
        from cdkit.data.prepare import load_prepared
        prep = load_prepared(P.data_dir, P.work_dir)
    if rank() == 0 and not P.overwrite: check_fresh(model_dir, P.resume, P.overwrite)
    lock = contextlib.ExitStack()
    try:
        if rank() == 0:  # data-parallel: rank 0 holds the folder for every process of the run
            lock.enter_context(folder_lock(model_dir, "model folder"))
            check_fresh(model_dir, P.resume, P.overwrite)
        S = build_learner(P, model_dir, prep)
    except BaseException:
        lock.close()
        raise
    S.lock = lock
    return S


def build_learner(P, model_dir: Path, prep=None) -> TrainSetup:
    "The learner of `P` over the prepared data, its callbacks and metrics, writing into `model_dir` (not locked here)"
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
    P = resumed_lr(P, model_dir)
    check_resume(P, model_dir)
    cb_loggers = logger_callbacks(P.callbacks, model_dir) if rank() == 0 else []
    if state is not None:
        with state.main_process_first():  # one process rebuilds a stale index, the others read it
            prep = load_prepared(P.data_dir, P.work_dir)
    elif prep is None:
        prep = load_prepared(P.data_dir, P.work_dir)
    from cdkit.base.io import makedirs
    makedirs(model_dir)
    if rank() == 0: save_params(P, ModelFiles(model_dir).params)
    set_seed(P.seed + rank())
    images, valid_mask = training_images(prep, P.max_train_images, P.max_valid_images, P.seed)
    mean, std = norm_stats(P.arch, P.mean, P.std)
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
    ckpt = ModelFiles(model_dir).checkpoint
    resuming = P.resume and ckpt.exists()
    finished = finished_epochs(model_dir) if P.resume and not resuming else None  # check_resume: epochs <= these
    if P.resume and not resuming and finished is None:
        log.warning("resume: no checkpoint at %s; starting from scratch", ckpt)
    saved = C.read_checkpoint(ckpt) if resuming else None  # a safe load: refused, never executed, if not plain
    start_epoch = int(saved["epoch"]) if resuming else finished or 0
    precision, note = C.precision_callbacks(P.mixed_precision, P.channels_last, dls.device)
    if note: log.info(note)
    cbs = [C.GradAccum(P.acc_steps)] if P.acc_steps > 1 or P.max_bs else []
    if P.batch_growth_epochs:
        cbs.append(C.BatchGrowth(P.batch_growth_epochs, P.batch_growth_factor, P.max_bs))
    cbs += precision + [C.EpochLog(ModelFiles(model_dir).metrics, start_epoch), C.FiniteLoss(),
                        C.Checkpoint(ckpt, start_epoch, every=P.checkpoint_every)] + cb_loggers
    if P.stop_after: cbs.append(C.StopAfter(P.stop_after))
    cat = prep.catalog
    levels = (cat.level1, cat.level2, cat.n_level(1), cat.n_level(2)) if P.hierarchy_weights else None
    learn = make_learner(dls, P.arch, cat.n_classes, P.pretrained_file, mean, std, P.head_hidden,
                         P.head_dropout, levels=levels, loss_func=loss, path=model_dir, wd=P.wd, cbs=cbs,
                         opt_func=opt_func(P.optimizer, P.momentum),
                         metrics=[accuracy, C.ProductAccuracy(valid_images["product_id"], valid_images["label"])])
    if levels is not None:
        heads = level_heads(learn.model)
        learn.loss_func = HierarchyLoss(loss, heads, P.hierarchy_weights)
        # a head without loss gets no gradient: frozen, so data-parallel training does not wait for it
        heads.level2.requires_grad_(P.hierarchy_weights[1] > 0)
        heads.level1.requires_grad_(P.hierarchy_weights[2] > 0)
        learn.metrics += [LevelAccuracy(cat.level2, 2), LevelAccuracy(cat.level1, 1)]
    learn.metrics += [ValueMetric(partial(effective_batch, learn), "batch"), ValueMetric(partial(current_lr, learn), "lr")]
    learn.model.to(dls.device)
    if finished is not None:  # a finished model: its weights; fit has nothing left to do
        learn.model.load_state_dict(C.safe_load(ModelFiles(model_dir).weights))
    if resuming:
        saved = C.load_checkpoint(learn, ckpt, saved)
        learn.cbs.filter(lambda c: isinstance(c, C.Checkpoint))[0].resumed = {
            k: saved.get(k) for k in ("scaler", "smooth_loss", "mid_epoch")}
        mid = saved.get("mid_epoch")
        log.info("resuming %s after epoch %d%s", model_dir, start_epoch,
                 f" and {mid['batches']} batches of the next" if mid else "")
    # what a notebook does between setup and fit (show_batch, lr_find) draws from the RNGs and the
    # loaders' shuffle; fit puts these back, so looking at the data never changes the training
    rng = (rng_state(), [C.inner_dl(dl).rng.getstate() for dl in dls.loaders])
    return TrainSetup(P, learn, prep, valid_images, start_epoch, t0, resuming, rng=rng)


def effective_batch(learn):
    "Pictures per optimizer step over all processes"
    from cdkit.train.callbacks import GradAccum, inner_dl
    from cdkit.train.distributed import world_size
    acc = learn.cbs.filter(lambda c: isinstance(c, GradAccum))
    return inner_dl(learn.dls.train).bs * (acc[0].acc_steps if acc else 1) * world_size()


def current_lr(learn): return learn.opt.hypers[-1]["lr"] if learn.opt is not None else None


def _run_callbacks(learn):
    "The callbacks that keep the run's files: the epoch log, checkpoint, guards and fastai's loggers"
    from fastai.callback.progress import CSVLogger
    from cdkit.train.callbacks import Checkpoint, EpochLog, FiniteLoss, StopAfter
    return learn.cbs.filter(lambda c: isinstance(c, (Checkpoint, EpochLog, FiniteLoss, StopAfter, CSVLogger))
                            or type(c).__name__ in ("TensorBoardCallback", "WandbCallback"))


# ---- lr_find and fit ----

def find_lr(S: TrainSetup, iters=None) -> float:
    """fastai's lr_find on the learner of `S` (without touching the run's log or checkpoint): saves
    lr_find.png, returns the suggestion (valley), which `fit(S)` uses when lr='find'"""
    from cdkit.train.distributed import world_size
    if world_size() > 1: raise ParamsError("lr_find takes one process: run it without the launcher")
    S.lr_suggestion = lr_find(S.learn, S.model_dir, iters or S.params.lr_find_iters)
    return S.lr_suggestion


def lr_find(learn, model_dir, iters=100) -> float:
    "fastai's lr_find without the run's callbacks; its curve saved as model_dir/lr_find.png; the valley"
    import matplotlib
    import matplotlib.pyplot as plt
    from cdkit.base.io import atomic_write
    # lr_find is a short fit of its own: it must not write the run's log, checkpoint or loggers, and it
    # drives the loss to diverge on purpose (FiniteLoss would stop it)
    with learn.removed_cbs(_run_callbacks(learn)):
        suggestion = learn.lr_find(num_it=iters, show_plot=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs, losses = learn.recorder.lrs, learn.recorder.losses
    ax.plot(lrs, [float(l) for l in losses])
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss")
    ax.set_title("learning-rate finder")
    ax.axvline(suggestion.valley, color="r", ls="--", label=f"valley {suggestion.valley:.2e}")
    ax.legend()
    atomic_write(ModelFiles(model_dir).lr_find, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    if matplotlib.get_backend().lower() == "agg": plt.close(fig)
    return float(suggestion.valley)


def fit(S: TrainSetup, lr=None) -> int:
    """Train the learner of `S` to `epochs` (from where a resumed run stopped), save model.pth + model.json;
    returns the epochs done. `lr`: None takes P.lr, or the lr_find suggestion when lr='find' (lr_find runs
    first if it has not). The folder stays locked: the caller closes `S`."""
    from cdkit.base.io import remove
    from cdkit.base.rng import set_rng_state
    from cdkit.train.callbacks import Checkpoint, check_finite_weights, fit_schedule, inner_dl
    from cdkit.train.distributed import distrib_ctx, rank
    from cdkit.train.models import save_trained
    P, learn, start_epoch, model_dir = S.params, S.learn, S.start_epoch, S.model_dir
    if lr is None and P.lr == "find":
        lr = S.lr_suggestion if S.lr_suggestion is not None else find_lr(S)
        log.info("lr='find': training at lr_find's suggestion %.2e", lr)
    if lr is not None and lr != P.lr:
        P = S.params = P.replace(lr=float(lr))
        if rank() == 0: save_params(P, ModelFiles(model_dir).params)  # the lr a resume must keep
    epochs_done = start_epoch
    if S.rng is not None:
        set_rng_state(S.rng[0])
        for dl, st in zip(learn.dls.loaders, S.rng[1]): inner_dl(dl).rng.setstate(st)
    if start_epoch < P.epochs:
        with distrib_ctx(learn, sync_bn=P.sync_bn):
            fit_schedule(learn, P.epochs, P.lr, P.one_cycle, P.pct_start, P.lr_steps, P.lr_step_factors,
                         start_epoch=start_epoch)
        ck = learn.cbs.filter(lambda c: isinstance(c, Checkpoint))
        epochs_done = ck[0].done if ck else learn.epoch + 1  # an interruption mid-epoch: the whole epochs
    cat = S.prep.catalog
    check_finite_weights(learn.model, str(model_dir))
    if rank() == 0:
        save_trained(learn.model, model_dir, model_card(P, cat.n_classes, epochs_done, (cat.n_level(1), cat.n_level(2))))
        if epochs_done >= P.epochs:
            # finished: the checkpoint (weights + optimizer state, 3x model.pth) only served a resume, and
            # continuing a finished schedule is refused (check_resume); a stopped run keeps it
            remove(ModelFiles(model_dir).checkpoint)
    # the learner goes on to notebooks (get_preds, plots): its run bookkeeping must not rewrite
    # metrics.csv, the checkpoint or the loggers when they run a validation pass
    learn.remove_cbs(_run_callbacks(learn))
    return epochs_done


def batch_history(learn) -> list:
    "(epoch, bs, acc_steps) as BatchGrowth saw them; [] without batch growth"
    from cdkit.train.callbacks import BatchGrowth
    growth = learn.cbs.filter(lambda c: isinstance(c, BatchGrowth))
    return growth[0].history if growth else []


def rebuild_learner(P, model_dir: Path, card, device=None):
    """The trained model of `model_dir` (its model card `card`) as a fastai Learner again, over the data and
    with the loaders, loss and metrics of its settings `P` (read back from its params.yaml); safe loads
    only, nothing written"""
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.metrics import accuracy
    from cdkit.train import callbacks as C
    from cdkit.data.loaders import make_dataloaders
    from cdkit.train.hierarchy import HierarchyLoss, LevelAccuracy
    from cdkit.train.models import make_learner
    from cdkit.data.prepare import load_prepared
    prep = load_prepared(P.data_dir, P.work_dir)
    images, valid_mask = training_images(prep, P.max_train_images, P.max_valid_images, P.seed)
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, valid_mask=valid_mask, size=card.size,
                           item_size=card.item_size, bs=P.bs, num_workers=P.num_workers, mean=card.mean, std=card.std,
                           aug=dict(flip=P.flip, max_rotate=P.max_rotate, max_zoom=P.max_zoom), seed=P.seed,
                           device=device, vocab=prep.catalog.category_ids)
    valid_images = images[valid_mask].reset_index(drop=True)
    cat = prep.catalog
    levels = (cat.level1, cat.level2, cat.n_level(1), cat.n_level(2)) if card.has_level_heads else None
    loss = LabelSmoothingCrossEntropyFlat(eps=P.label_smoothing) if P.label_smoothing else CrossEntropyLossFlat()
    learn = make_learner(dls, card.arch, card.n_classes, None, card.mean, card.std, card.head_hidden,
                         card.head_dropout, levels=levels, loss_func=loss, path=model_dir, wd=P.wd,
                         opt_func=opt_func(P.optimizer, P.momentum),
                         metrics=[accuracy, C.ProductAccuracy(valid_images["product_id"], valid_images["label"])])
    learn.model.load_state_dict(C.safe_load(ModelFiles(model_dir).weights))
    if levels is not None:
        from cdkit.train.hierarchy import level_heads
        learn.loss_func = HierarchyLoss(loss, level_heads(learn.model), P.hierarchy_weights)
        learn.metrics += [LevelAccuracy(cat.level2, 2), LevelAccuracy(cat.level1, 1)]
    learn.model.to(dls.device).eval()
    return learn
