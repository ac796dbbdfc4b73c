"""fastai callbacks for long image-classification runs: batch growth, gradient accumulation in
optimizer steps, checkpoint/exact resume, an appendable epoch log, product-level accuracy.

Each is a small class doing one thing; `train.py` puts them together.
"""
from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import (
    Callback,
    CancelBatchException,
    CancelFitException,
    CancelStepException,
)
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.learner import Metric
from fastai.torch_core import rank_distrib
from fastcore.basics import store_attr

from .io import append_open, atomic_write, makedirs, process_alive, remove, sweep_temps


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel / DataParallel


def _inner_dl(dl):
    return getattr(dl, "dl", dl)  # fastai's DistributedDL wraps the real loader


class GradAccum(Callback):
    "Accumulate gradients over `acc_steps` batches per optimizer step, scaled as one large batch"
    order, run_valid = MixedPrecision.order - 4, False

    def __init__(self, acc_steps=1): store_attr()

    def before_fit(self): self.count, self.seen = 0, 0

    def after_loss(self):
        # A mean loss over b of B samples weighs b/B of the large batch's mean; B = acc_steps full batches
        bs = len(self.learn.yb[0])
        self.learn.loss_grad = self.loss_grad * (bs / (self.acc_steps * _inner_dl(self.dl).bs))
        self.seen += bs

    def before_step(self):
        if getattr(self, "flushing", False): return
        self.count += 1
        if self.count < self.acc_steps: raise CancelBatchException()  # no step, no zero_grad yet
        self.count, self.seen = 0, 0

    def after_train(self):
        "Step on what an epoch's last incomplete group accumulated, so no gradient crosses a checkpoint"
        if not self.count: return
        full = self.acc_steps * _inner_dl(self.dl).bs
        for p in self.learn.model.parameters():
            if p.grad is not None: p.grad.mul_(full / self.seen)  # the mean over the samples seen
        self.flushing = True
        try: self.learn._with_events(self.learn._step, "step", CancelStepException)
        finally: self.flushing = False
        self.learn.opt.zero_grad()
        self.count, self.seen = 0, 0


def grown_batch(epoch, bs, acc_steps, growth_epochs, factor, max_bs=None):
    """(batch size, accumulation steps) in `epoch` when the effective batch bs*acc_steps is multiplied
    by `factor` at each of `growth_epochs`; beyond `max_bs` samples per step it grows by accumulation"""
    n = sum(1 for e in growth_epochs if e <= epoch)
    effective = bs * acc_steps * factor ** n
    new_bs = bs * factor ** n if max_bs is None else max(bs, min(bs * factor ** n, max_bs))
    if effective % new_bs:
        raise ValueError(f"batch growth: effective batch {effective} is not a multiple of batch {new_bs}")
    return new_bs, effective // new_bs


class BatchGrowth(Callback):
    "Multiply the effective batch by `factor` at `epochs` instead of decaying the learning rate"
    order, run_valid = GradAccum.order - 1, False

    def __init__(self, epochs=(), factor=2, max_bs=None): store_attr()

    def before_fit(self):
        self.base_bs = _inner_dl(self.dls.train).bs
        acc = self.learn.cbs.filter(lambda c: isinstance(c, GradAccum))
        self.accum = acc[0] if acc else None
        self.base_acc = self.accum.acc_steps if self.accum else 1
        if self.max_bs is not None and self.accum is None:
            raise ValueError("BatchGrowth(max_bs=...) grows through accumulation: add a GradAccum callback")
        self.history = []

    def before_train(self):
        # The schedule is a function of the epoch alone, so a resumed run picks it up exactly.
        # fastai's schedulers advance pct_train by 1/n_iter per batch, so fewer, larger batches still
        # cover the epoch's share of the LR schedule.
        bs, acc = grown_batch(self.epoch, self.base_bs, self.base_acc, self.epochs, self.factor, self.max_bs)
        for dl in {id(d): d for d in (self.dls.train, _inner_dl(self.dls.train), self.learn.dl,
                                      _inner_dl(self.learn.dl))}.values():
            dl.bs = bs
        if self.accum is not None: self.accum.acc_steps = acc
        self.bs, self.acc_steps = bs, acc
        self.history.append((self.epoch, bs, acc))

    def after_fit(self):
        for dl in (self.dls.train, _inner_dl(self.dls.train)): dl.bs = self.base_bs
        if self.accum is not None: self.accum.acc_steps = self.base_acc

    def state_dict(self): return dict(epochs=list(self.epochs), factor=self.factor, max_bs=self.max_bs,
                                      bs=getattr(self, "bs", None), acc_steps=getattr(self, "acc_steps", None))


def precision_callbacks(mixed_precision="bf16", channels_last=True, device=None):
    """fastai callbacks for AMP (bf16 / fp16) and channels_last; none on CPU, where neither pays.
    Returns (callbacks, note) with the note saying what was left out and why."""
    from fastai.callback.channelslast import ChannelsLast
    if mixed_precision not in ("bf16", "fp16", "none"):
        raise ValueError(f"mixed_precision must be bf16, fp16 or none, got {mixed_precision!r}")
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        asked = [k for k, v in (("mixed_precision=" + mixed_precision, mixed_precision != "none"),
                                ("channels_last", channels_last)) if v]
        return [], (f"CPU: ignoring {', '.join(asked)}" if asked else "")
    cbs = []
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        mixed_precision = "fp16"  # pre-Ampere GPUs: fp16 with a grad scaler
    if mixed_precision != "none": cbs.append(MixedPrecision(amp_mode=mixed_precision))
    if channels_last: cbs.append(ChannelsLast())
    return cbs, ""


class EpochLog(CSVLogger):
    "Per-epoch CSV log that appends on resume, one header, no lines for epochs skipped by a resume"

    def __init__(self, fname, start_epoch=0):
        super().__init__(fname, append=start_epoch > 0)
        self.start_epoch = start_epoch

    def before_fit(self):
        if rank_distrib(): return  # one writer in distributed training
        path = self.path / self.fname
        makedirs(path.parent)
        keep_header = self.append and path.exists() and path.stat().st_size > 0
        if self.append and keep_header:
            _truncate_log(path, self.start_epoch)  # an interrupted run may have logged past its checkpoint
        self.file = append_open(path, "a" if self.append else "w")
        if not keep_header: self.file.write(",".join(self.recorder.metric_names) + "\n")
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        if log[0] < self.start_epoch: return  # epochs a resumed fit skips
        super()._write_line(log)

    def after_fit(self):
        if rank_distrib(): return
        super().after_fit()


def _truncate_log(path, start_epoch):
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [l for l in lines[1:] if l.split(",", 1)[0].isdigit() and int(l.split(",", 1)[0]) < start_epoch]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def gathered_positions(n, world_size, bs, batch_i):
    """Dataset positions of the `batch_i`-th validation batch after fastai's DistributedDL gathers it:
    rank r holds positions [r*P, (r+1)*P) of the padded order, its batches concatenated by rank;
    padding (positions >= n) is cut"""
    padded = -(-n // world_size) * world_size
    per_rank = padded // world_size
    pos = [np.arange(r * per_rank + batch_i * bs, min(r * per_rank + (batch_i + 1) * bs, (r + 1) * per_rank))
           for r in range(world_size)]
    pos = np.concatenate(pos)
    return pos[pos < n]


class ProductAccuracy(Metric):
    """Product-level top-1 on validation: a product's class is the argmax of the mean of its pictures'
    probabilities. Streams: only products with pictures still to come are held in memory."""

    def __init__(self, product_ids, labels):
        self.product_ids = np.asarray(product_ids)
        uniq, self.codes, self.counts = np.unique(self.product_ids, return_inverse=True, return_counts=True)
        self.labels = np.zeros(len(uniq), np.int64)
        self.labels[self.codes] = np.asarray(labels)

    def reset(self):
        self.partial, self.left, self.correct, self.total, self.batch_i, self.offset = {}, {}, 0, 0, 0, 0

    def _positions(self, dl, n_pred):
        from fastai.distributed import DistributedDL
        if isinstance(dl, DistributedDL):
            pos = gathered_positions(len(self.codes), dl.world_size, dl.bs, self.batch_i)
        else:
            pos = np.arange(self.offset, self.offset + n_pred)
        self.batch_i += 1
        self.offset += n_pred
        if len(pos) != n_pred:
            raise RuntimeError(f"ProductAccuracy: batch of {n_pred} predictions for {len(pos)} positions")
        return pos

    def accumulate(self, learn):
        probs = learn.to_detach(torch.softmax(learn.pred.float(), dim=-1))
        probs = probs.numpy()
        for p, pr in zip(self._positions(learn.dl, len(probs)), probs):
            c = self.codes[p]
            if c in self.partial: self.partial[c] += pr
            else: self.partial[c], self.left[c] = pr.copy(), self.counts[c]
            self.left[c] -= 1
            if self.left[c] == 0:
                self.correct += int(self.partial.pop(c).argmax() == self.labels[c])
                self.total += 1
                del self.left[c]

    @property
    def value(self):
        # products cut off (e.g. a short validation) count on the pictures seen
        for c, pr in self.partial.items():
            self.correct += int(pr.argmax() == self.labels[c])
            self.total += 1
        self.partial, self.left = {}, {}
        return self.correct / self.total if self.total else None

    @property
    def name(self): return "product_accuracy"


def _rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available(): state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available(): torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint(Callback):
    """Save everything an exact resume needs after each epoch: weights, optimizer, epoch, RNG states,
    the loaders' shuffle RNGs, callback states (`state_dict()` of any callback that has one).

    With `every`, also every `every` optimizer steps inside an epoch, so that a session that ends
    mid-epoch (a 12-hour notebook, a preempted machine) loses at most that many steps. Such a checkpoint
    also holds the epoch's shuffle state and the batches done: the resumed epoch draws the same order,
    skips those batches without reading them, and continues with the RNG states of the moment of the
    save (exact in one process without loader workers; with workers, the same remaining batches)."""
    order, run_valid = 70, True  # after the Recorder and the log wrote the epoch

    def __init__(self, path, start_epoch=0, resumed=None, every=None): store_attr()

    def before_fit(self):
        "Sweep what an interrupted checkpoint write left; put back what other callbacks' before_fit just reset"
        self.steps, self.due, self.batches, self.epoch_rng = 0, False, 0, None
        if not rank_distrib(): sweep_checkpoint_temps(self.path)
        if self.resumed is None: return
        if self.resumed.get("scaler") is not None and getattr(self.learn, "scaler", None) is not None:
            self.learn.scaler.load_state_dict(self.resumed["scaler"])  # MixedPrecision made a new one
        if self.resumed.get("smooth_loss") is not None and hasattr(self.learn, "recorder"):
            sl = self.learn.recorder.smooth_loss  # the train_loss column: a running mean across epochs
            sl.count, sl.val = self.resumed["smooth_loss"]

    def before_train(self):
        dl = _inner_dl(self.dls.train)
        mid = (self.resumed or {}).get("mid_epoch")
        self.batches = 0
        if mid and self.epoch == self.start_epoch:  # resume inside this epoch
            dl.rng.setstate(mid["epoch_rng"])  # the same shuffle as the interrupted pass
            dl.skip_batches, dl.resume_rng = mid["batches"], mid["rng"]
            self.learn.pct_train, self.learn.train_iter = mid["pct_train"], mid["train_iter"]
            self.batches = mid["batches"]
            self.resumed = {k: v for k, v in self.resumed.items() if k != "mid_epoch"}
        self.epoch_rng = dl.rng.getstate()  # the loader draws this epoch's order from here when it starts

    def after_step(self):
        self.steps += 1
        if self.every and self.steps % self.every == 0: self.due = True

    def after_batch(self):
        if not self.training: return
        self.batches += 1
        if not self.due: return
        self.due = False  # after an optimizer step: no gradient is pending (GradAccum steps before this)
        if not rank_distrib():
            save_checkpoint(self.learn, self.path, self.epoch, mid_epoch=dict(
                batches=self.batches, epoch_rng=self.epoch_rng, rng=_rng_state(), pct_train=self.learn.pct_train,
                train_iter=self.learn.train_iter))

    def after_epoch(self):
        if self.epoch < self.start_epoch: return  # skipped by a resumed fit
        if not rank_distrib():
            save_checkpoint(self.learn, self.path, self.epoch + 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank runs ahead of a checkpoint it might resume from


class StepLR(Callback):
    "The study's stepped schedule: lr * factors[i] from epoch steps[i] on, set before every training batch"
    order, run_valid = 0, False

    def __init__(self, lr, steps=(), factors=()):
        if len(steps) != len(factors): raise ValueError(f"{len(steps)} steps but {len(factors)} factors")
        store_attr()

    def lr_at(self, epoch):
        f = 1.0
        for s, x in zip(self.steps, self.factors):
            if epoch >= s: f = x
        return self.lr * f

    def before_batch(self):
        if self.training: self.opt.set_hyper("lr", self.lr_at(self.epoch))


class StopAfter(Callback):
    "Stop the fit after `n_epochs` epochs, as an interruption would (resume continues from there)"
    order = Checkpoint.order + 1

    def __init__(self, n_epochs): store_attr()

    def after_epoch(self):
        if self.epoch + 1 >= self.n_epochs: raise CancelFitException()


def sweep_checkpoint_temps(path):
    """Remove the temp files that killed or failed checkpoint writes left beside `path` (those of
    processes no longer running; also the `<name>.tmp<pid>` files of older versions)"""
    path = Path(path)
    removed = sweep_temps(path.parent)
    for p in path.parent.glob(f"{glob.escape(path.name)}.tmp*") if path.parent.is_dir() else []:
        pid = p.name[len(path.name) + 4:]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            remove(p)
            removed.append(p)
    return removed


def save_checkpoint(learn, path, epochs_done, mid_epoch=None):
    """Atomically write the state after `epochs_done` epochs (and `mid_epoch`'s batches of the next one)
    to `path` (through cdkit.io: a failed write leaves no temp file, a full disk raises DiskFullError naming `path`)"""
    cb_states = {type(cb).__name__: cb.state_dict() for cb in learn.cbs
                 if hasattr(cb, "state_dict") and callable(cb.state_dict)}
    state = dict(epoch=epochs_done, model=_unwrap(learn.model).state_dict(), opt=learn.opt.state_dict(),
                 rng=_rng_state(), dl_rng=[_inner_dl(dl).rng.getstate() for dl in learn.dls.loaders],
                 callbacks=cb_states, train_iter=learn.train_iter,
                 smooth_loss=(learn.recorder.smooth_loss.count, learn.recorder.smooth_loss.val)
                 if hasattr(learn, "recorder") else None,
                 scaler=learn.scaler.state_dict() if getattr(learn, "scaler", None) is not None else None,
                 mid_epoch=mid_epoch)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(learn, path):
    """Restore weights, optimizer, RNG states and the loaders' shuffle RNGs from `path`; returns the
    checkpoint (its `epoch` is the number of epochs done, the `start_epoch` of the resumed fit)"""
    state = torch.load(path, map_location="cpu", weights_only=False)
    _unwrap(learn.model).load_state_dict(state["model"])
    if learn.opt is None: learn.create_opt()
    learn.opt.load_state_dict(state["opt"])
    for p, s in learn.opt.state.items():  # saved from wherever the model was; to where it is now
        for k, v in s.items():
            if isinstance(v, torch.Tensor): s[k] = v.to(p.device)
    for dl, s in zip(learn.dls.loaders, state["dl_rng"]): _inner_dl(dl).rng.setstate(s)
    _set_rng_state(state["rng"])
    return state
