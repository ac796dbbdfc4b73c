"""Step 03-05: train one backbone on the prepared data; every training notebook and
`python -m cdkit train --params FILE [key=value ...]` call `train(params)`.

A run writes runs/<run_name>/:

    params.yaml              the effective parameters
    metrics.csv              one line per epoch: losses, image and product accuracy, batch, lr, time
    checkpoints/last.pth     weights, optimizer, epoch, RNG and callback states (exact resume)
    model.pth, model.json    the trained weights and what `load_trained` needs to rebuild the model
    lr_find.png              when lr_find is on

Several processes (`accelerate launch -m cdkit train ...`, or torchrun) train data-parallel.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .params import load_params, parse_overrides, save_params

log = logging.getLogger(__name__)


@dataclass
class TrainParams:
    "Parameters of notebook 03 and `python -m cdkit train`: defaults train briefly on the demo data on a CPU; params/*_full.yaml hold the study's settings"
    # run
    run_name: Optional[str] = "demo/resnet"  # output folder runs/<run_name>/; None: the params file's name, else the arch
    runs_dir: str = "runs"                # where run folders go (relative to the repository root)
    # data (written by step 02; the split is made once and reused by every model)
    data_dir: str = "data/demo"           # train.bson, category_names.csv (`python -m cdkit synth data/demo`)
    work_dir: str = "data/demo_prepared"  # indices and split of that data
    valid_frac: float = 0.1               # share of products held out, used only if the split does not exist yet (study: 0.02)
    max_train_images: Optional[int] = 3000  # None: all; fewer (whole products) for quick runs
    max_valid_images: Optional[int] = None  # None: the whole validation split
    # model
    arch: str = "resnet18"                # demo stand-in for resnet101 (study names: resnet101, seresnet50, inception_v3, inception_v4, xception; or any timm name)
    pretrained_file: Optional[str] = None  # local ImageNet state dict for the backbone; None: random init (no internet)
    item_size: Optional[int] = None       # side of the random crop of the 180x180 picture; None: the study's (160 ResNets, 180 Inception/Xception)
    size: Optional[int] = 64              # model input side, the crop resized on the device; None: item_size (demo: 64 for CPU minutes)
    mean: Optional[list] = None           # normalization; None: the backbone's pretraining statistics
    std: Optional[list] = None            # idem
    head_hidden: int = 0                  # 0: one linear layer after pooling; >0: fastai's head with this hidden width
    head_dropout: float = 0.25            # dropout before the last linear layer
    # optimization
    bs: int = 32                          # pictures per batch and process (study: 64x4 or 160x2)
    acc_steps: int = 1                    # batches per optimizer step (gradient accumulation)
    epochs: int = 3                       # passes over the training pictures
    lr: float = 3e-3                      # peak learning rate (Adam)
    one_cycle: bool = True                # one-cycle schedule; False: flat lr (with batch growth in place of decay)
    pct_start: float = 0.25               # share of the one cycle spent warming up
    wd: float = 0.01                      # decoupled weight decay
    label_smoothing: float = 0.1          # 0: plain cross-entropy
    batch_growth_epochs: list = field(default_factory=list)  # epochs at which the effective batch grows (Smith et al. 2017)
    batch_growth_factor: int = 2          # growth factor at each of those epochs
    max_bs: Optional[int] = None          # most pictures per batch that fit in memory; growth beyond goes to accumulation
    # augmentation (the random crop is the shift)
    flip: bool = True                     # random horizontal flip
    max_rotate: float = 10.0              # degrees
    max_zoom: float = 1.1                 # zoom in up to this factor
    # hardware
    mixed_precision: str = "bf16"         # bf16, fp16 or none; GPU only
    channels_last: bool = True            # GPU only
    sync_bn: bool = True                  # synchronized BatchNorm across GPUs in data-parallel runs
    num_workers: int = 2                  # decoding processes per training process
    # control
    seed: int = 0                         # weights, shuffling, augmentation
    resume: bool = False                  # continue from runs/<run_name>/checkpoints/last.pth if it exists
    stop_after: Optional[int] = None      # stop after this many epochs as an interruption would; resume continues
    lr_find: bool = False                 # run fastai's lr_find first and save lr_find.png
    lr_find_iters: int = 100              # mini-batches lr_find tries


@dataclass
class InceptionTrainParams(TrainParams):
    "TrainParams of notebook 04: the same fields, Inception v3 by default (75 px: its smallest input)"
    run_name: Optional[str] = "demo/inception"
    arch: str = "inception_v3"
    size: Optional[int] = 75
    epochs: int = 2
    max_train_images: Optional[int] = 1500


@dataclass
class XceptionTrainParams(TrainParams):
    "TrainParams of notebook 05: the same fields, Xception by default"
    run_name: Optional[str] = "demo/xception"
    arch: str = "xception"
    epochs: int = 2
    max_train_images: Optional[int] = 1500


@dataclass
class TrainResult:
    "What a training run produced"
    run_dir: Path
    params: TrainParams
    history: pd.DataFrame                 # metrics.csv
    epochs_done: int
    seconds: float
    learn: object = None                  # the fastai Learner (in-process use: notebooks, tests)
    prep: object = None                   # cdkit.prepare.Prepared
    valid_images: pd.DataFrame = None     # the validation rows, in the validation loader's order
    lr_suggestion: Optional[float] = None
    batch_history: list = field(default_factory=list)  # (epoch, bs, acc_steps) seen by BatchGrowth

    def summary(self) -> pd.DataFrame:
        last = self.history.iloc[-1] if len(self.history) else pd.Series(dtype=float)
        return pd.DataFrame([{"run": self.run_dir.name, "arch": self.params.arch, "epochs": self.epochs_done,
                              "minutes": round(self.seconds / 60, 2),
                              **{k: last.get(k) for k in ("train_loss", "valid_loss", "accuracy", "product_accuracy")}}])


def resolve(P: TrainParams, params_file=None) -> TrainParams:
    "The effective parameters: run_name and input sizes filled in, the backbone checked"
    from dataclasses import replace
    from .models import resolve_arch
    backbone = resolve_arch(P.arch)  # unknown names fail here, before any work
    run_name = P.run_name or (Path(params_file).stem if params_file else P.arch)
    item_size = P.item_size or backbone.size
    for k in ("bs", "acc_steps", "epochs", "batch_growth_factor"):
        if getattr(P, k) < 1: raise ValueError(f"{k} must be at least 1, got {getattr(P, k)}")
    return replace(P, run_name=run_name, item_size=item_size, size=P.size or item_size)


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
    train = _sample_products(images[images["fold"] != 0], P.max_train_images, P.seed)
    valid = _sample_products(images[images["fold"] == 0], P.max_valid_images, P.seed)
    return pd.concat([train, valid], ignore_index=True), np.r_[np.zeros(len(train), bool), np.ones(len(valid), bool)]


def _effective_batch(learn):
    from .callbacks import GradAccum, _inner_dl
    from .distributed import world_size
    acc = learn.cbs.filter(lambda c: isinstance(c, GradAccum))
    return _inner_dl(learn.dls.train).bs * (acc[0].acc_steps if acc else 1) * world_size()


def _lr(learn): return learn.opt.hypers[-1]["lr"] if learn.opt is not None else None


def setup(P: TrainParams, params_file=None):
    "(effective params, learner, Prepared, validation rows, start epoch), ready to fit"
    import torch
    from fastai.learner import ValueMetric
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from functools import partial

    from . import callbacks as C
    from .data import make_dataloaders
    from .distributed import init_state, rank, world_size
    from .models import make_learner, norm_stats
    from .paths import resolve as resolve_path
    from .prepare import prepare_data

    P = resolve(P, params_file)
    state = init_state() if world_size() > 1 else None
    run_dir = resolve_path(P.runs_dir) / P.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank() == 0: save_params(P, run_dir / "params.yaml")
    set_seed(P.seed + rank())
    if state is not None:
        with state.main_process_first():  # one process builds the indices and split, the others read them
            prep = prepare_data(P.data_dir, P.work_dir, valid_frac=P.valid_frac, seed=P.seed)
    else:
        prep = prepare_data(P.data_dir, P.work_dir, valid_frac=P.valid_frac, seed=P.seed)
    images, valid_mask = _images(prep, P)
    mean, std = (P.mean, P.std) if P.mean and P.std else norm_stats(P.arch)
    device = state.device if state is not None else None
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, valid_mask=valid_mask, size=P.size,
                           item_size=P.item_size, bs=P.bs, num_workers=P.num_workers, mean=mean, std=std,
                           aug=dict(flip=P.flip, max_rotate=P.max_rotate, max_zoom=P.max_zoom), seed=P.seed,
                           device=device)
    # fastai works out `n_inp` lazily by pushing one batch through the augmentations, which draws
    # from the RNGs at the first training batch; done now, a resumed run draws the same numbers.
    for dl in dls.loaders: dl.n_inp
    valid_images = images[valid_mask].reset_index(drop=True)
    loss = LabelSmoothingCrossEntropyFlat(eps=P.label_smoothing) if P.label_smoothing else CrossEntropyLossFlat()
    ckpt = run_dir / "checkpoints" / "last.pth"
    resuming = P.resume and ckpt.exists()
    if P.resume and not resuming: log.warning("resume: no checkpoint at %s; starting from scratch", ckpt)
    start_epoch = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] if resuming else 0
    precision, note = C.precision_callbacks(P.mixed_precision, P.channels_last, dls.device)
    if note: log.info(note)
    cbs = [C.GradAccum(P.acc_steps)] if P.acc_steps > 1 or P.max_bs else []
    if P.batch_growth_epochs:
        cbs.append(C.BatchGrowth(P.batch_growth_epochs, P.batch_growth_factor, P.max_bs))
    cbs += precision + [C.EpochLog(run_dir / "metrics.csv", start_epoch), C.Checkpoint(ckpt, start_epoch)]
    if P.stop_after: cbs.append(C.StopAfter(P.stop_after))
    learn = make_learner(dls, P.arch, prep.catalog.n_classes, P.pretrained_file, mean, std, P.head_hidden,
                         P.head_dropout, loss_func=loss, path=run_dir, wd=P.wd, cbs=cbs,
                         metrics=[accuracy, C.ProductAccuracy(valid_images["product_id"], valid_images["label"])])
    learn.metrics += [ValueMetric(partial(_effective_batch, learn), "batch"), ValueMetric(partial(_lr, learn), "lr")]
    learn.model.to(dls.device)
    if resuming:
        saved = C.load_checkpoint(learn, ckpt)
        learn.cbs.filter(lambda c: isinstance(c, C.Checkpoint))[0].resumed = {k: saved.get(k) for k in ("scaler", "smooth_loss")}
        log.info("resuming %s after epoch %d", P.run_name, start_epoch)
    return P, learn, prep, valid_images, start_epoch


def _lr_find(learn, run_dir, iters=100):
    import matplotlib
    import matplotlib.pyplot as plt
    from .callbacks import Checkpoint, EpochLog, StopAfter
    # lr_find is a short fit of its own: it must not write the run's log or checkpoint
    with learn.removed_cbs(learn.cbs.filter(lambda c: isinstance(c, (Checkpoint, EpochLog, StopAfter)))):
        suggestion = learn.lr_find(num_it=iters, show_plot=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs, losses = learn.recorder.lrs, learn.recorder.losses
    ax.plot(lrs, [float(l) for l in losses])
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss")
    ax.axvline(suggestion.valley, color="r", ls="--", label=f"valley {suggestion.valley:.2e}")
    ax.legend()
    fig.savefig(run_dir / "lr_find.png", dpi=100, bbox_inches="tight")
    if matplotlib.get_backend().lower() == "agg": plt.close(fig)
    return float(suggestion.valley)


def export(learn, run_dir, P: TrainParams, n_classes, epochs_done):
    "model.pth (state dict) + model.json (what load_trained rebuilds it from)"
    import torch
    from .callbacks import _unwrap
    from .models import norm_stats
    mean, std = (P.mean, P.std) if P.mean and P.std else norm_stats(P.arch)
    torch.save(_unwrap(learn.model).state_dict(), run_dir / "model.pth")
    meta = dict(arch=P.arch, n_classes=int(n_classes), head_hidden=P.head_hidden, head_dropout=P.head_dropout,
                size=P.size, item_size=P.item_size, mean=list(mean), std=list(std), epochs_done=epochs_done)
    (run_dir / "model.json").write_text(json.dumps(meta, indent=1))


def train(P: TrainParams, params_file=None) -> TrainResult:
    "Train one model as `P` says; see the module docstring for what lands in runs/<run_name>/"
    from .callbacks import BatchGrowth, Checkpoint, EpochLog, StopAfter
    from .distributed import distrib_ctx, rank, world_size
    t0 = time.time()
    P, learn, prep, valid_images, start_epoch = setup(P, params_file)
    run_dir = learn.path
    suggestion = None
    if P.lr_find and start_epoch == 0:
        if world_size() > 1: log.warning("lr_find is skipped in data-parallel runs; run it in one process")
        else: suggestion = _lr_find(learn, run_dir, P.lr_find_iters)
    epochs_done = start_epoch
    if start_epoch < P.epochs:
        with distrib_ctx(learn, sync_bn=P.sync_bn):
            if P.one_cycle: learn.fit_one_cycle(P.epochs, P.lr, pct_start=P.pct_start, start_epoch=start_epoch)
            else: learn.fit(P.epochs, P.lr, start_epoch=start_epoch)
        epochs_done = learn.epoch + 1 if hasattr(learn, "epoch") else start_epoch
    if rank() == 0: export(learn, run_dir, P, prep.catalog.n_classes, epochs_done)
    # the learner goes on to notebooks (get_preds, plots): its run bookkeeping must not rewrite
    # metrics.csv or the checkpoint when they run a validation pass
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, (Checkpoint, EpochLog, StopAfter))))
    growth = learn.cbs.filter(lambda c: isinstance(c, BatchGrowth))
    metrics = run_dir / "metrics.csv"
    return TrainResult(run_dir=run_dir, params=P, history=pd.read_csv(metrics) if metrics.exists() else pd.DataFrame(),
                       epochs_done=epochs_done, seconds=time.time() - t0, learn=learn, prep=prep,
                       valid_images=valid_images, lr_suggestion=suggestion,
                       batch_history=growth[0].history if growth else [])


@dataclass
class Trained:
    "A trained model ready for inference, with what its inputs must look like"
    model: object                         # torch module in eval mode (ends with logits over classes)
    arch: str
    n_classes: int
    size: int                             # model input side
    item_size: int                        # centre crop of the 180x180 picture before resizing to `size`
    mean: tuple
    std: tuple
    run_dir: Path


def load_trained(run_dir, device="cpu") -> Trained:
    """The model a run exported (model.pth + model.json); a run stopped before its end has no export,
    then the last checkpoint's weights are used"""
    import torch
    from .models import create_model
    from .paths import resolve as resolve_path
    run_dir = resolve_path(run_dir)
    meta_path = run_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: train the model first (runs/<run_name>/model.json)")
    meta = json.loads(meta_path.read_text())
    model = create_model(meta["arch"], meta["n_classes"], head_hidden=meta["head_hidden"],
                         head_dropout=meta["head_dropout"])
    weights = run_dir / "model.pth"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return Trained(model, meta["arch"], meta["n_classes"], meta["size"], meta["item_size"], tuple(meta["mean"]),
                   tuple(meta["std"]), run_dir)


# ---- reports for the notebooks ----

def plot_history(history: pd.DataFrame):
    "Loss and accuracy per epoch (from metrics.csv)"
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
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
        ax.imshow(ds.decode(int(r["row"])))
        ax.set_title(f"true: {cat.name(int(r['true']))[:28]}\npred: {cat.name(int(r['pred']))[:28]} "
                     f"({r['confidence']:.2f})", fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None):
    "python -m cdkit train --params FILE [key=value ...]"
    p = argparse.ArgumentParser(prog="python -m cdkit train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", help="YAML file holding the differences from TrainParams' defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of single parameters")
    a = p.parse_args(argv)
    P = load_params(TrainParams, a.params, **parse_overrides(a.overrides))  # unknown key / wrong type: error now
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(P, params_file=a.params)
    from .distributed import rank
    if rank() == 0:
        print(result.summary().to_string(index=False))
        print(f"outputs in {result.run_dir}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
