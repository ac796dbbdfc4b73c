"""StepTimer on a tiny learner: known delays land in the part they belong to, and nothing stays patched.
The delays are spent on a virtual clock (the timer's only clock), so the attribution is exact, whatever the
machine's load"""
import types

import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Learner
from fastai.data.core import Transform
from torch import nn

from cdkit.base import instrument
from cdkit.base.instrument import StepTimer

BS, N, ITEM_S, AUG_S, CB_S = 8, 64, 0.001, 0.010, 0.015


class VirtualClock:
    "time that moves only when a part of the step spends it"
    now = 1000.0

    @classmethod
    def spend(cls, seconds): cls.now += seconds


def sleep(seconds): VirtualClock.spend(seconds)


@pytest.fixture
def virtual_clock(monkeypatch):
    VirtualClock.now = 1000.0
    monkeypatch.setattr(instrument, "time", types.SimpleNamespace(perf_counter=lambda: VirtualClock.now))


class SlowItems:
    "Dataset whose items take ITEM_S each: the loader makes the step wait for data"
    def __len__(self): return N
    def __getitem__(self, i):
        sleep(ITEM_S)
        return torch.full((4,), float(i % 3)), torch.tensor(i % 3)


class SlowAug(Transform):
    "Batch transform that takes AUG_S (on the pictures; labels pass through)"
    def encodes(self, x: torch.Tensor):
        if x.is_floating_point(): sleep(AUG_S)
        return x


class SlowCallback(Callback):
    "A callback whose after_batch takes CB_S (a stand-in for a logger that syncs)"
    def after_batch(self):
        if self.training: sleep(CB_S)


def tiny_learner():
    train = TfmdDL(SlowItems(), bs=BS, shuffle=True, after_batch=[SlowAug()], device="cpu", num_workers=0)
    valid = TfmdDL(SlowItems(), bs=BS, device="cpu", num_workers=0)
    dls = DataLoaders(train, valid, device="cpu")
    return Learner(dls, nn.Linear(4, 3), loss_func=nn.CrossEntropyLoss(), cbs=[SlowCallback()])


def test_step_timer_attributes_known_delays(virtual_clock):
    learn = tiny_learner()
    timer = StepTimer()
    learn.fit(1, cbs=[timer])
    s = timer.summary().set_index("part")
    steps = N // BS
    assert s.attrs["steps"] == steps - 1 == len(timer.records) - 1
    ms = s["ms_per_step"]
    assert ms["cb:SlowCallback"] == pytest.approx(CB_S * 1000)
    assert ms["augment"] == pytest.approx(AUG_S * 1000)
    assert ms["data_wait"] == pytest.approx(BS * ITEM_S * 1000)
    assert ms["forward"] == ms["transfer"] == 0  # they spend no virtual time
    assert s.attrs["step_seconds"] == pytest.approx((steps - 1) * (CB_S + AUG_S + BS * ITEM_S))
    assert abs(s["share"].sum() - 1) < 1e-9  # the parts add up to the step
    for rec in timer.records: assert abs(sum(v for k, v in rec.items() if k != "step") - rec["step"]) < 1e-9


def test_step_timer_leaves_nothing_patched(virtual_clock):
    learn = tiny_learner()
    dl = learn.dls.train
    before = (dl.after_batch, dl.device)
    learn.fit(1, cbs=[StepTimer()])
    assert (dl.after_batch, dl.device) == before
    for cb in learn.cbs: assert not any(k.startswith(("before_", "after_")) for k in vars(cb))
    # a second fit without the timer trains as usual
    learn.fit(1)
