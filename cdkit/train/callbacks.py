"""fastai callbacks for long image-classification runs: batch growth, gradient accumulation in
optimizer steps, checkpoint/exact resume, an appendable epoch log, product-level accuracy.

Each is a small class doing one thing; `cdkit.train.learner` puts them together.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
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
from fastcore.foundation import L

from cdkit.base.errors import CdkitError, shorten
from cdkit.base.io import append_open, atomic_write, makedirs, process_alive, remove, save_torch, sweep_temps
from cdkit.base.rng import rng_state, set_rng_state


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel / DataParallel


def inner_dl(dl):
    "The loader itself: fastai's DistributedDL wraps the real one (its bs, its rng)"
    return getattr(dl, "dl", dl)


class GradAccum(Callback):
    "Accumulate gradients over `acc_steps` batches per optimizer step, scaled as one large batch"
    order, run_valid = MixedPrecision.order - 4, False

    def __init__(self, acc_steps=1): store_attr()

    def before_fit(self): self.count, self.seen = 0, 0

    def after_loss(self):
        # A mean loss over b of B samples weighs b/B of the large batch's mean; B = acc_steps full batches
        bs = len(self.learn.yb[0])
        self.learn.loss_grad = self.loss_grad * (bs / (self.acc_steps * inner_dl(self.dl).bs))
        self.seen += bs

    def before_step(self):
        if getattr(self, "flushing", False): return
        self.count += 1
        if self.count < self.acc_steps: raise CancelBatchException()  # no step, no zero_grad yet
        self.count, self.seen = 0, 0

    def after_train(self):
        "Step on what an epoch's last incomplete group accumulated, so no gradient crosses a checkpoint"
        if not self.count: return
        full = self.acc_steps * inner_dl(self.dl).bs
        for p in self.learn.model.parameters():
            if p.grad is not None: p.grad.mul_(full / self.seen)  # the mean over the samples seen
        self.flushing = True
        try: self.learn._with_events(self.learn._step, "step", CancelStepException)
        finally: self.flushing = False
        self.learn.opt.zero_grad()
        self.count, self.seen = 0, 0


def growth_factors(growth_epochs, factor):
    """One factor per growth epoch: `factor` an int (the same at each) or a list (its own at each, e.g.
    [2, 10] where a stepped lr would fall x0.5 then x0.1)"""
    if isinstance(factor, (int, np.integer)): return [int(factor)] * len(growth_epochs)
    factors = [int(f) for f in factor]
    if len(factors) != len(growth_epochs):
        raise ValueError(f"{len(factors)} growth factors {factors} for {len(growth_epochs)} growth epochs {list(growth_epochs)}")
    return factors


def grown_batch(epoch, bs, acc_steps, growth_epochs, factor, max_bs=None):
    """(batch size, accumulation steps) in `epoch` when the effective batch bs*acc_steps is multiplied
    by the factor of each of `growth_epochs` reached (`growth_factors`); beyond `max_bs` samples per
    step it grows by accumulation"""
    grow = int(np.prod([f for e, f in zip(growth_epochs, growth_factors(growth_epochs, factor)) if e <= epoch],
                       dtype=np.int64))
    effective = bs * acc_steps * grow
    new_bs = bs * grow if max_bs is None else max(bs, min(bs * grow, max_bs))
    if effective % new_bs:
        raise ValueError(f"batch growth: effective batch {effective} is not a multiple of batch {new_bs}")
    return new_bs, effective // new_bs


class BatchGrowth(Callback):
    "Multiply the effective batch by `factor` (one for all, or one each) at `epochs` instead of decaying the learning rate"
    order, run_valid = GradAccum.order - 1, False

    def __init__(self, epochs=(), factor=2, max_bs=None):
        growth_factors(epochs, factor)  # a factor list that does not match the epochs fails here
        store_attr()

    def before_fit(self):
        self.base_bs = inner_dl(self.dls.train).bs
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
        for dl in {id(d): d for d in (self.dls.train, inner_dl(self.dls.train), self.learn.dl,
                                      inner_dl(self.learn.dl))}.values():
            dl.bs = bs
        if self.accum is not None: self.accum.acc_steps = acc
        self.bs, self.acc_steps = bs, acc
        self.history.append((self.epoch, bs, acc))

    def after_fit(self):
        for dl in (self.dls.train, inner_dl(self.dls.train)): dl.bs = self.base_bs
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
    """Per-epoch CSV log that appends on resume, one header, no lines for epochs skipped by a resume.

    The file is opened for each line and closed again: a learner holding this callback pickles
    (`learn.export()`), also after an interrupted fit that never reached after_fit."""

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
        if not keep_header:
            with append_open(path, "a" if self.append else "w") as f: f.write(",".join(self.recorder.metric_names) + "\n")
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        if log[0] < self.start_epoch: return  # epochs a resumed fit skips
        with append_open(self.path / self.fname) as f:
            f.write(",".join([str(t) for t in log]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.old_logger(log)

    def after_fit(self):
        if rank_distrib(): return
        self.learn.logger = self.old_logger

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("file", None)  # none is kept open; an older pickle's handle must not travel
        return state


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


# ---- checkpoints hold tensors and plain values only, so that loading one never runs code ----

class UnsafeCheckpointError(CdkitError, ValueError):
    "A checkpoint that is not tensors and plain values (pickled objects, code): refused, never unpickled"


def safe_load(path):
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings, lists, tuples and dicts only.
    A file that needs anything else to load (a pickled object, which may run code: a crafted file
    received with a run folder, or one written before checkpoints were plain) is refused naming it."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"{path}: refused: it holds pickled objects that loading would execute, not only tensors and plain "
            "values (a file from elsewhere, or from an older cdkit); it was not loaded: delete it, or train anew "
            "with overwrite=true") from None
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError): raise
        raise UnsafeCheckpointError(f"{path}: unreadable checkpoint (truncated or not a torch file: "
                                    f"{' '.join(str(e).split())[:120]}); delete it, or train anew with "
                                    "overwrite=true") from None


def plain(obj):
    "`obj` with numpy values turned into tensors and Python numbers, containers rebuilt: what a safe load accepts"
    if isinstance(obj, np.generic): return obj.item()  # before float: np.float64 is a float subclass
    if isinstance(obj, torch.Tensor):  # fastai's TensorBase is a subclass a safe load refuses
        return obj if type(obj) is torch.Tensor or isinstance(obj, nn.Parameter) else obj.as_subclass(torch.Tensor)
    if obj is None or type(obj) in (bool, int, float, str, bytes): return obj
    if isinstance(obj, np.ndarray): return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict): return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return type(obj)(plain(v) for v in obj)
    if isinstance(obj, L): return [plain(v) for v in obj]  # fastai's optimizer hypers
    if isinstance(obj, Path): return str(obj)
    raise TypeError(f"checkpoint: a {type(obj).__name__} is neither a tensor nor a plain value")


def _plain_rng(state):
    "RNG states as plain values: numpy's (name, uint32 keys, pos, has_gauss, gauss) as a dict with the keys in a tensor"
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    out = dict(state, numpy=dict(kind=str(kind), keys=torch.from_numpy(np.asarray(keys, np.int64)), pos=int(pos),
                                 has_gauss=int(has_gauss), gauss=float(gauss)))
    return plain(out)  # python's getstate() is a tuple of ints already; torch's and cuda's are byte tensors


def _native_rng(state):
    "The inverse of `_plain_rng`"
    n = state["numpy"]
    v, keys, g = state["python"]
    return dict(state, python=(int(v), tuple(int(k) for k in keys), g),
                numpy=(n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _plain_py_rng(state):
    v, keys, g = state
    return (int(v), tuple(int(k) for k in keys), g)


class DivergedError(CdkitError, FloatingPointError):
    "Training produced a non-finite loss or weights: nothing final is saved"


class FiniteLoss(Callback):
    """Stop the fit at the first non-finite training loss, naming the epoch, the batch and the loss.

    The losses stay on the device and are checked together every `every` batches, at the end of each
    training pass (before validation and the epoch's checkpoint) and before a mid-epoch checkpoint:
    one host sync per check, not per batch. After each epoch the weights are checked too, so a
    checkpoint or a final model is only ever written from finite weights."""
    order = 69  # after the Recorder and the log, before Checkpoint (70): a diverged epoch is not checkpointed

    def __init__(self, every=50): store_attr()

    def before_fit(self): self.pending = []

    def after_loss(self):
        if self.training: self.pending.append((self.epoch, self.iter, self.learn.loss.detach()))

    def after_batch(self):
        if len(self.pending) >= self.every: self.check()

    def after_train(self): self.check()

    def check(self):
        "Raise DivergedError if a loss since the last check is not finite (here or, data-parallel, in another process)"
        pending, self.pending = self.pending, []
        if not pending: return
        losses = torch.stack([loss.float().reshape(()) for _, _, loss in pending])
        finite = torch.isfinite(losses)
        if not _any_process((~finite).any()): return
        if bool(finite.all()):
            raise DivergedError(f"training diverged: a non-finite loss in another process by epoch {self.epoch + 1} "
                                f"of {self.n_epoch}, batch {self.iter + 1} of {self.n_iter}; nothing final is saved")
        i = int((~finite).nonzero()[0, 0])
        epoch, batch, loss = pending[i][0], pending[i][1], float(losses[i])
        raise DivergedError(f"training diverged: loss {loss} at epoch {epoch + 1} of {self.n_epoch}, batch "
                            f"{batch + 1} of {self.n_iter}; nothing final is saved (the checkpoint of the last good "
                            "epoch stays): lower lr, check wd, mean and std")

    def after_epoch(self):
        loss = getattr(getattr(self.learn, "recorder", None), "loss", None)  # the validation loss of the epoch
        value = getattr(loss, "value", None) if getattr(loss, "count", 0) else None
        bad = torch.tensor(value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()))
        if _any_process(bad):
            raise DivergedError(f"training diverged: validation loss {shorten(value)} after epoch {self.epoch + 1} "
                                f"of {self.n_epoch}; nothing final is saved (the checkpoint of the last good epoch "
                                "stays): lower lr, check wd, mean and std")
        check_finite_weights(self.learn.model, f"training diverged after epoch {self.epoch + 1} of {self.n_epoch}")


def _any_process(bad) -> bool:
    """`bad` (a bool tensor) in this process or, in data-parallel training, in any: every process then
    stops at the same check instead of one waiting for the others in the next gradient all-reduce"""
    flag = bad.detach().float().reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl": flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def check_finite_weights(model, what):
    """DivergedError naming `what` when a weight or a floating buffer (BatchNorm's running statistics) of
    `model` is not finite; one host sync"""
    ts = [t.detach() for t in _unwrap(model).state_dict().values() if torch.is_floating_point(t)]
    if ts and _any_process(~torch.stack([torch.isfinite(t).all() for t in ts]).all()):
        raise DivergedError(f"{what}: non-finite weights; nothing final is saved (the checkpoint of the last good "
                            "epoch stays): lower lr, check wd, mean and std")


class Checkpoint(Callback):
    """Save everything an exact resume needs after each epoch: weights, optimizer, epoch, RNG states,
    the loaders' shuffle RNGs, callback states (`state_dict()` of any callback that has one).

    With `every`, also every `every` optimizer steps inside an epoch, so that a run that ends
    mid-epoch (a 12-hour notebook, a preempted machine) loses at most that many steps. Such a checkpoint
    also holds the epoch's shuffle state and the batches done: the resumed epoch draws the same order,
    skips those batches without reading them, and continues with the RNG states of the moment of the
    save (exact in one process without loader workers; with workers, the same remaining batches)."""
    order, run_valid = 70, True  # after the Recorder and the log wrote the epoch

    def __init__(self, path, start_epoch=0, resumed=None, every=None): store_attr()

    def before_fit(self):
        "Sweep what an interrupted checkpoint write left; put back what other callbacks' before_fit just reset"
        self.steps, self.due, self.batches, self.epoch_rng = 0, False, 0, None
        self.done = self.start_epoch  # whole epochs done (an interruption mid-epoch does not count its epoch)
        if not rank_distrib(): sweep_checkpoint_temps(self.path)
        if self.resumed is None: return
        if self.resumed.get("scaler") is not None and getattr(self.learn, "scaler", None) is not None:
            self.learn.scaler.load_state_dict(self.resumed["scaler"])  # MixedPrecision made a new one
        if self.resumed.get("smooth_loss") is not None and hasattr(self.learn, "recorder"):
            sl = self.learn.recorder.smooth_loss  # the train_loss column: a running mean across epochs
            sl.count, sl.val = self.resumed["smooth_loss"]

    def before_train(self):
        dl = inner_dl(self.dls.train)
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
        for cb in self.learn.cbs:  # never checkpoint a diverged state
            if isinstance(cb, FiniteLoss): cb.check()
        if not rank_distrib():
            save_checkpoint(self.learn, self.path, self.epoch, mid_epoch=dict(
                batches=self.batches, epoch_rng=self.epoch_rng, rng=rng_state(), pct_train=self.learn.pct_train,
                train_iter=self.learn.train_iter))

    def after_epoch(self):
        if self.epoch < self.start_epoch: return  # skipped by a resumed fit
        if not rank_distrib():
            save_checkpoint(self.learn, self.path, self.epoch + 1)
        self.done = self.epoch + 1
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


def fit_schedule(learn, epochs, lr, one_cycle=True, pct_start=0.25, lr_steps=(), lr_step_factors=(), start_epoch=0,
                 cbs=()):
    """Fit `learn` on the schedule of the training parameters (step 03-05 and step 09 both call this):
    one-cycle peaking at `lr`, or with one_cycle off a flat `lr` that `StepLR` steps to lr * factor[i]
    from epoch lr_steps[i] on"""
    import fastai.callback.schedule  # noqa: F401  (gives Learner its fit_one_cycle)
    if one_cycle:
        return learn.fit_one_cycle(epochs, lr, pct_start=pct_start, start_epoch=start_epoch, cbs=list(cbs))
    steps = [StepLR(lr, list(lr_steps), list(lr_step_factors))] if len(lr_steps) else []
    return learn.fit(epochs, lr, start_epoch=start_epoch, cbs=steps + list(cbs))


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
    to `path` (through cdkit.base.io: a failed write leaves no temp file, a full disk raises DiskFullError naming `path`).
    Everything in it is a tensor or a plain value (`plain`), so `load_checkpoint` loads it with weights_only."""
    cb_states = {type(cb).__name__: cb.state_dict() for cb in learn.cbs
                 if hasattr(cb, "state_dict") and callable(cb.state_dict)}
    if mid_epoch is not None:
        mid_epoch = dict(mid_epoch, rng=_plain_rng(mid_epoch["rng"]), epoch_rng=_plain_py_rng(mid_epoch["epoch_rng"]))
    state = dict(epoch=epochs_done, opt=plain(learn.opt.state_dict()),
                 rng=_plain_rng(rng_state()), dl_rng=[_plain_py_rng(inner_dl(dl).rng.getstate()) for dl in learn.dls.loaders],
                 callbacks=plain(cb_states), train_iter=learn.train_iter,
                 smooth_loss=plain((learn.recorder.smooth_loss.count, learn.recorder.smooth_loss.val))
                 if hasattr(learn, "recorder") else None,
                 scaler=plain(learn.scaler.state_dict()) if getattr(learn, "scaler", None) is not None else None,
                 mid_epoch=plain(mid_epoch))
    state = dict(plain(state), model=_unwrap(learn.model).state_dict())  # e.g. train_iter may be a numpy int
    save_torch(state, path)


def read_checkpoint(path):
    "The checkpoint at `path`, safely loaded (UnsafeCheckpointError naming it otherwise), RNG states made native"
    state = safe_load(path)
    if not isinstance(state, dict) or "epoch" not in state:
        raise UnsafeCheckpointError(f"{path}: not a cdkit checkpoint (no epoch); delete it, or train anew with "
                                    "overwrite=true")
    if "rng" in state: state["rng"] = _native_rng(state["rng"])
    if state.get("mid_epoch"):
        state["mid_epoch"] = dict(state["mid_epoch"], rng=_native_rng(state["mid_epoch"]["rng"]),
                                  epoch_rng=_plain_py_rng(state["mid_epoch"]["epoch_rng"]))
    return state


def load_checkpoint(learn, path, state=None):
    """Restore weights, optimizer, RNG states and the loaders' shuffle RNGs from `path` (or its
    already read `state`); returns the checkpoint (its `epoch` is the number of epochs done, the
    `start_epoch` of the resumed fit)"""
    state = read_checkpoint(path) if state is None else state
    _unwrap(learn.model).load_state_dict(state["model"])
    if learn.opt is None: learn.create_opt()
    learn.opt.load_state_dict(dict(state["opt"], hypers=L(state["opt"]["hypers"])))
    for p, s in learn.opt.state.items():  # saved from wherever the model was; to where it is now
        for k, v in s.items():
            if isinstance(v, torch.Tensor): s[k] = v.to(p.device)
    for dl, s in zip(learn.dls.loaders, state["dl_rng"]): inner_dl(dl).rng.setstate(_plain_py_rng(s))
    set_rng_state(state["rng"])
    return state
