"""Where a training step's time goes: data wait, transfer, batch augmentation, model, each callback.

`StepTimer` is a fastai callback. Added to a Learner (`learn.fit(..., cbs=StepTimer())`), it records
for every training step, in seconds of host (wall-clock) time:

    data_wait   from the end of the previous step to the moment the batch left the loader
                (waiting for workers, collating, pinning; on the first step, starting the workers)
    transfer    copying the batch to the device (done by the timer in the loader's place, as the loader
                would: the same `to_device` call, just timed)
    augment     the loader's batch transforms (`after_batch`: uint8 -> float, flip/rotate/zoom, normalize)
    forward, loss, backward, opt_step, zero_grad   the Learner's own work between the events
    cb:<Name>   the time spent in each other callback's event methods during the step
    other       the rest (fastai's loop between the events)

On a GPU most work is asynchronous: host times then show where the host waits (often at a callback
that reads a value, `.item()`), not where the device works. `sync=True` synchronizes the device at
every boundary, which attributes device time to its part at some cost in speed.

`summary()` gives each part's total, mean per step and share of the step time, over the steps after
the first `skip` (worker start-up and warm-up).
"""
from __future__ import annotations

import time
from collections import defaultdict

import pandas as pd
from fastai.callback.core import Callback, _events
from fastai.torch_core import to_device
from fastcore.basics import store_attr

_STEP_EVENTS = ("before_batch", "after_pred", "after_loss", "before_backward", "after_backward", "before_step",
                "after_step", "after_batch")
# model work between the end of one event's handlers and the start of the next event's
_GAPS = {"after_pred": ("before_batch", "forward"), "after_loss": ("after_pred", "loss"),
         "before_backward": ("after_loss", "other"), "after_backward": ("before_backward", "backward"),
         "before_step": ("after_backward", "other"), "after_step": ("before_step", "opt_step"),
         "after_batch": ("after_step", "zero_grad")}


class _TimedPipeline:
    "Stands in for a loader's `after_batch`: moves the batch to the device and runs the transforms, timed"
    def __init__(self, pipeline, device, timer):
        self.pipeline, self.device, self.timer = pipeline, device, timer

    def __call__(self, b):
        t0 = self.timer._clock()
        if self.device is not None: b = to_device(b, self.device)
        t1 = self.timer._clock()
        b = self.pipeline(b)
        t2 = self.timer._clock()
        self.timer._loader(t0, t1, t2)
        return b

    def __getattr__(self, name): return getattr(self.pipeline, name)  # decode, fs, ... as the pipeline's


class StepTimer(Callback):
    "Time each part of every training step: data wait, transfer, augmentation, model, each callback"
    order, run_valid = 100, False  # after the others: their before_train may replace the loader

    def __init__(self, sync=False, skip=1, max_records=100_000): store_attr()

    # --------------------------------------------------------------------------------- clock
    def _clock(self):
        if self.sync and self._cuda:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    # ------------------------------------------------------------------------------ wrapping
    def before_fit(self):
        import torch
        self._cuda = torch.cuda.is_available() and next(self.learn.model.parameters()).is_cuda
        self.records, self.n_steps = [], 0
        self.totals = defaultdict(float)
        self._wrapped, self._dl = [], None
        self._prev_end = None
        for cb in self.learn.cbs:
            if cb is self: continue
            for ev in _events:
                if not callable(getattr(type(cb), ev, None)): continue  # the class's own methods only
                cb.__dict__[ev] = self._timed(cb, ev, getattr(cb, ev))
                self._wrapped.append((cb, ev))

    def _timed(self, cb, event, method):
        name = type(cb).__name__
        def timed():
            if event not in _STEP_EVENTS or not self.learn.training or self._dl is None: return method()
            t0 = self._clock()
            self._event_start(event, t0)
            try: return method()
            finally:
                t1 = self._clock()
                if self._cur is not None: self._cur["cb:" + name] += t1 - t0
                self._event_end(event, t1)
        return timed

    def before_train(self):
        "Take over the train loader's device copy and batch transforms (restored after the epoch)"
        dl = self.learn.dl
        self._dl, self._dl_device, self._dl_after = dl, dl.device, dl.after_batch
        dl.after_batch = _TimedPipeline(dl.after_batch, dl.device, self)
        dl.device = None  # the timed pipeline copies to the device, exactly where the loader would
        self._prev_end, self._cur, self._starts, self._ends = self._clock(), None, {}, {}
        self._pending = None

    def after_train(self): self._restore_dl()
    def after_cancel_train(self): self._restore_dl()

    def _restore_dl(self):
        if self._dl is not None:
            self._dl.after_batch, self._dl.device, self._dl = self._dl_after, self._dl_device, None

    def after_fit(self):
        self._restore_dl()
        for cb, ev in self._wrapped: cb.__dict__.pop(ev, None)
        self._wrapped = []

    # ------------------------------------------------------------------------------- timing
    def _loader(self, t0, t1, t2):
        "Called by the timed pipeline when a training batch leaves the loader"
        self._pending = dict(data_wait=t0 - self._prev_end, transfer=t1 - t0, augment=t2 - t1, _t=t2)

    def _event_start(self, event, t):
        if event == "before_batch" and self._cur is None:
            self._cur = defaultdict(float)
            p = self._pending or dict(data_wait=t - self._prev_end, transfer=0.0, augment=0.0, _t=t)
            self._cur.update({k: v for k, v in p.items() if k != "_t"})
            self._cur["other"] += t - p["_t"]  # fastai's loop: setting the device, splitting the batch
            self._step_start, self._pending = p["_t"] - p["transfer"] - p["augment"] - p["data_wait"], None
        if self._cur is not None and event in _GAPS and event not in self._starts:
            prev, part = _GAPS[event]
            if prev in self._ends: self._cur[part] += t - self._ends[prev]
        self._starts.setdefault(event, t)

    def _event_end(self, event, t):
        self._ends[event] = t

    def _own(self, event):
        "StepTimer's own handler of a step event: it runs last (order 100), so it closes the event"
        t = self._clock()
        self._event_start(event, t)
        self._event_end(event, t)
        if event == "after_batch" and self._cur is not None: self._close_step(t)

    def before_batch(self): self._own("before_batch")
    def after_pred(self): self._own("after_pred")
    def after_loss(self): self._own("after_loss")
    def before_backward(self): self._own("before_backward")
    def after_backward(self): self._own("after_backward")
    def before_step(self): self._own("before_step")
    def after_step(self): self._own("after_step")
    def after_batch(self): self._own("after_batch")

    def after_cancel_batch(self):
        self._cur, self._starts, self._ends = None, {}, {}
        self._prev_end = self._clock()

    def _close_step(self, t):
        rec = dict(self._cur)
        rec["step"] = t - self._step_start
        rec["other"] = rec["step"] - sum(v for k, v in rec.items() if k not in ("step", "other"))  # loop, own handlers
        self.n_steps += 1
        if self.n_steps > self.skip:
            for k, v in rec.items(): self.totals[k] += v
        if len(self.records) < self.max_records: self.records.append(rec)
        self._cur, self._starts, self._ends = None, {}, {}
        self._prev_end = t

    # ------------------------------------------------------------------------------ results
    def summary(self) -> pd.DataFrame:
        "part, seconds, ms per step, share of the step time; over the steps after the first `skip`"
        n = max(self.n_steps - self.skip, 0)
        total = self.totals.get("step", 0.0)
        rows = [(k, v, 1000 * v / max(n, 1), v / total if total else float("nan"))
                for k, v in self.totals.items() if k != "step"]
        df = pd.DataFrame(rows, columns=["part", "seconds", "ms_per_step", "share"])
        df = df.sort_values("seconds", ascending=False, kind="stable").reset_index(drop=True)
        df.attrs.update(steps=n, step_seconds=total)
        return df

    def shares(self) -> dict:
        "part -> share of the step time"
        return dict(zip(*self.summary()[["part", "share"]].to_numpy().T))
