"""Callbacks on a tiny synthetic problem (a linear model: no BatchNorm, so accumulation is exact)."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from torch import nn

from cdkit.train.callbacks import (BatchGrowth, GradAccum, ProductAccuracy, gathered_positions, grown_batch,
                             precision_callbacks)


def tiny_dls(n=48, bs=4, shuffle=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    items = list(zip(x, y))
    train = DataLoader(items, bs=bs, shuffle=shuffle, drop_last=False)
    valid = DataLoader(items[:8], bs=bs)
    return DataLoaders(train, valid, device="cpu")


def tiny_learner(dls, cbs=(), opt_func=SGD):
    torch.manual_seed(0)
    return Learner(dls, nn.Linear(5, 3), loss_func=CrossEntropyLossFlat(), opt_func=opt_func, cbs=list(cbs))


class Trace(Callback):
    "Record batch sizes per epoch, the lr of each batch, and optimizer steps per epoch"
    order = GradAccum.order + 1  # its before_step runs only when GradAccum lets the step happen

    def before_fit(self): self.bs, self.lrs, self.steps, self.grads = {}, [], {}, []
    def after_batch(self):
        if self.training:
            self.bs.setdefault(self.epoch, []).append(len(self.yb[0]))
            self.lrs.append((self.pct_train_before, self.opt.hypers[-1]["lr"]))
    def before_batch(self): self.pct_train_before = self.pct_train
    def before_step(self):
        self.steps[self.epoch] = self.steps.get(self.epoch, 0) + 1
        self.grads.append([p.grad.clone() for p in self.model.parameters()])


def test_grown_batch():
    assert grown_batch(0, 64, 4, [2, 4], 2) == (64, 4)
    assert grown_batch(2, 64, 4, [2, 4], 2) == (128, 4)
    assert grown_batch(5, 64, 4, [2, 4], 2) == (256, 4)
    # memory-capped: batch stops at max_bs, accumulation takes the rest of the growth
    assert grown_batch(5, 64, 4, [2, 4], 2, max_bs=128) == (128, 8)


def test_batch_growth_sizes_and_flat_lr():
    dls = tiny_dls(n=48, bs=4)
    learn = tiny_learner(dls, [BatchGrowth(epochs=[1, 2], factor=2), Trace()])
    learn.fit(3, lr=0.1)
    t = learn.trace
    assert {e: set(b) for e, b in t.bs.items()} == {0: {4}, 1: {8}, 2: {16}}
    assert [len(t.bs[e]) for e in range(3)] == [12, 6, 3]
    assert all(lr == pytest.approx(0.1) for _, lr in t.lrs)  # fit: no decay, the batch grows instead
    assert dls.train.bs == 4  # restored after the fit


def test_batch_growth_one_cycle_lr_trace():
    dls = tiny_dls(n=48, bs=4)
    learn = tiny_learner(dls, [BatchGrowth(epochs=[1, 2], factor=2), Trace()])
    learn.fit_one_cycle(3, lr_max=0.1, pct_start=0.25)
    t = learn.trace
    assert [len(t.bs[e]) for e in range(3)] == [12, 6, 3]
    sched = combined_cos(0.25, 0.1 / 25, 0.1, 0.1 / 1e5)
    pcts = np.array([p for p, _ in t.lrs])
    # the schedule still covers each epoch's share: epoch e starts at pct e/3 whatever its batch count
    starts = np.cumsum([0, 12, 6])
    assert pcts[starts] == pytest.approx([0, 1 / 3, 2 / 3])
    assert [lr for _, lr in t.lrs] == pytest.approx([float(sched(p)) for p in pcts])
    assert max(lr for _, lr in t.lrs) == pytest.approx(0.1, rel=0.05)


def test_batch_growth_through_accumulation():
    dls = tiny_dls(n=48, bs=4)
    learn = tiny_learner(dls, [GradAccum(1), BatchGrowth(epochs=[1, 2], factor=2, max_bs=4), Trace()])
    learn.fit(3, lr=0.1)
    t = learn.trace
    assert {e: set(b) for e, b in t.bs.items()} == {0: {4}, 1: {4}, 2: {4}}
    assert t.steps == {0: 12, 1: 6, 2: 3}  # effective batch 4, 8, 16
    assert learn.batch_growth.history == [(0, 4, 1), (1, 4, 2), (2, 4, 4)]


def _large_batch_grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_equals_large_batch():
    n, bs, acc = 20, 4, 3  # 5 batches: one full group of 3, then an epoch-end group of 2
    dls = tiny_dls(n=n, bs=bs, shuffle=False)
    learn = tiny_learner(dls, [GradAccum(acc), Trace()])
    ref = nn.Linear(5, 3)
    ref.load_state_dict(learn.model.state_dict())
    learn.fit(1, lr=0.0)  # lr 0: weights stay put, so every group's gradient is taken at the same point
    x = torch.stack([dls.train.dataset[i][0] for i in range(n)])
    y = torch.stack([dls.train.dataset[i][1] for i in range(n)])
    got = learn.trace.grads
    assert len(got) == 2
    for g, want in zip(got[0], _large_batch_grads(ref, x[:12], y[:12])):
        assert torch.allclose(g, want, atol=1e-6)
    for g, want in zip(got[1], _large_batch_grads(ref, x[12:], y[12:])):
        assert torch.allclose(g, want, atol=1e-6)


def test_accumulation_steps_once_per_group():
    dls = tiny_dls(n=48, bs=4)
    learn = tiny_learner(dls, [GradAccum(4), Trace()])
    learn.fit(2, lr=0.1)
    assert learn.trace.steps == {0: 3, 1: 3}


class _FakeLearn:
    def __init__(self, pred, dl=None): self.pred, self.dl = pred, dl
    def to_detach(self, t): return t.detach().cpu()


def test_product_accuracy_averages_pictures():
    # product 1: pictures say class 0 (weakly) and class 1 (strongly) -> product class 1 (right)
    # product 2: one picture, class 2 (wrong: label 0)
    pids, labels = [1, 1, 2], [1, 1, 0]
    m = ProductAccuracy(pids, labels)
    m.reset()
    logits = torch.log(torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.9, 0.0001], [0.1, 0.1, 0.8]]))
    m.accumulate(_FakeLearn(logits[:2]))
    m.accumulate(_FakeLearn(logits[2:]))
    assert m.value == pytest.approx(0.5)


def test_gathered_positions_match_distributed_split():
    # 10 items, 2 ranks, batches of 3: rank 0 holds 0..4, rank 1 holds 5..9
    assert gathered_positions(10, 2, 3, 0).tolist() == [0, 1, 2, 5, 6, 7]
    assert gathered_positions(10, 2, 3, 1).tolist() == [3, 4, 8, 9]
    # 9 items: padded to 10, the padding (position 9) is cut
    assert gathered_positions(9, 2, 3, 1).tolist() == [3, 4, 8]


def test_precision_callbacks_cpu_ignored():
    cbs, note = precision_callbacks("bf16", True, "cpu")
    assert cbs == [] and "ignoring" in note
    with pytest.raises(ValueError, match="mixed_precision"):
        precision_callbacks("fp8", False, "cpu")
