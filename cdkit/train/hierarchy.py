"""The category hierarchy as auxiliary heads: level-1 and level-2 classifiers beside the category one.

The catalog has three levels (real data: 49 level-1, 483 level-2, 5,270 categories). `add_level_heads`
replaces the last `nn.Linear` of the fastai head by `LevelHeads`, which keeps that Linear for the
categories and adds one Linear per upper level on the same features. Its forward still returns the
category logits, so everything that reads the model's output (fastai's metrics, get_preds, tta,
show_results, interpretation; the kit's prediction) sees `n_classes` outputs as before; the level
logits of the last call wait on the module for `HierarchyLoss`, which weighs the three
cross-entropies (rwightman's Cdiscount solution: 0.8 category, 0.1 level 2, 0.1 level 1).

At prediction, `combine` > 0 reweighs each category's log-probability by its parents'
(`combine_levels`); 0 leaves the category logits untouched.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from fastai.learner import Metric
from torch import nn


def combine_levels(category, level1, level2, level1_of, level2_of, weight=1.0):
    """log p(category) + weight * (log p(level 1 of it) + log p(level 2 of it)), per row.

    `category` (N, C), `level1` (N, L1), `level2` (N, L2) are logits; `level1_of`, `level2_of` (C,) the
    parent indices of each category. A softmax of the result gives p3 * (p1 * p2) ** weight, renormalized."""
    parents = F.log_softmax(level1, -1)[:, level1_of] + F.log_softmax(level2, -1)[:, level2_of]
    return F.log_softmax(category, -1) + weight * parents


def _like(linear: nn.Linear, n_out: int) -> nn.Linear:
    "A Linear on the same features as `linear`, initialized as fastai initializes its head (kaiming, zero bias)"
    lin = nn.Linear(linear.in_features, n_out, bias=linear.bias is not None)
    nn.init.kaiming_normal_(lin.weight)
    if lin.bias is not None: nn.init.zeros_(lin.bias)
    return lin.to(device=linear.weight.device, dtype=linear.weight.dtype)


class LevelHeads(nn.Module):
    """The category Linear plus level-1 and level-2 Linears on the same features; returns the category
    logits (combined with the levels' when `combine` > 0) and keeps the level logits of the last call
    in `aux` = (level1, level2) for `HierarchyLoss`"""

    def __init__(self, category: nn.Linear, level1_of, level2_of, n_level1=None, n_level2=None, combine=0.0):
        super().__init__()
        # own copies: buffers sharing memory with the caller's (or each other's) would load into both
        level1_of = torch.as_tensor(np.asarray(level1_of), dtype=torch.long).clone()
        level2_of = torch.as_tensor(np.asarray(level2_of), dtype=torch.long).clone()
        n = category.out_features
        if level1_of.shape != (n,) or level2_of.shape != (n,):
            raise ValueError(f"level maps of shapes {tuple(level1_of.shape)} and {tuple(level2_of.shape)} for {n} "
                             "categories: one parent index per category expected")
        n_level1 = int(level1_of.max()) + 1 if n_level1 is None else int(n_level1)
        n_level2 = int(level2_of.max()) + 1 if n_level2 is None else int(n_level2)
        if int(level1_of.max()) >= n_level1 or int(level2_of.max()) >= n_level2 or min(level1_of.min(), level2_of.min()) < 0:
            raise ValueError(f"level maps index outside 0..{n_level1 - 1} (level 1) or 0..{n_level2 - 1} (level 2)")
        self.category = category
        self.level1 = _like(category, n_level1)
        self.level2 = _like(category, n_level2)
        # buffers: a saved state dict carries the maps, a reloaded model rebuilds them
        self.register_buffer("level1_of", level1_of.to(category.weight.device))
        self.register_buffer("level2_of", level2_of.to(category.weight.device))
        self.combine = float(combine)
        self.aux = None

    @property
    def n_level1(self): return self.level1.out_features

    @property
    def n_level2(self): return self.level2.out_features

    def forward(self, x):
        logits = self.category(x)
        self.aux = (self.level1(x), self.level2(x))
        if self.combine > 0:
            return combine_levels(logits, *self.aux, self.level1_of, self.level2_of, self.combine)
        return logits

    def __getstate__(self):
        # the last call's logits may hang on an autograd graph: not part of the model (pickle, deepcopy)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "aux": None}

    def extra_repr(self): return f"combine={self.combine}"


def level_heads(model) -> LevelHeads | None:
    "The `LevelHeads` of `model` (DDP unwrapped), or None for a model without them"
    model = getattr(model, "module", model)
    return next((m for m in model.modules() if isinstance(m, LevelHeads)), None)


def add_level_heads(model, level1_of, level2_of, n_level1=None, n_level2=None, combine=0.0) -> LevelHeads:
    """Put `LevelHeads` in place of the last Linear of the head `model[1]` (timm body + fastai head);
    returns them. The optimizer of a learner over `model` must be created afterwards."""
    model = getattr(model, "module", model)
    if level_heads(model) is not None:
        raise ValueError("the model has level heads already")
    head = model[1]
    if not (isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear)):
        raise ValueError(f"expected a fastai head ending in nn.Linear as model[1], got {type(head[-1]).__name__}")
    heads = LevelHeads(head[-1], level1_of, level2_of, n_level1, n_level2, combine)
    head[len(head) - 1] = heads
    return heads


class HierarchyLoss:
    """weights[0] * base(category logits) + weights[1] * CE(level 2) + weights[2] * CE(level 1), the level
    targets being the true category's parents. A zero weight skips its term (its head gets no gradient).

    A fastai `loss_func`: `activation`, `decodes` and `reduction` are the base loss's, so get_preds,
    predict and `loss_not_reduced` work as with the base loss."""

    def __init__(self, base, heads: LevelHeads, weights=(0.8, 0.1, 0.1)):
        if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
            raise ValueError(f"hierarchy weights {list(weights)}: three values (category, level 2, level 1), "
                             "each >= 0, the category's > 0")
        self.base, self.heads, self.weights = base, heads, tuple(float(w) for w in weights)

    @property
    def reduction(self): return getattr(self.base, "reduction", "mean")

    @reduction.setter
    def reduction(self, value): self.base.reduction = value

    def __call__(self, pred, target, **kwargs):
        w3, w2, w1 = self.weights
        loss = self.base(pred, target, **kwargs)
        if w3 != 1.0: loss = w3 * loss
        if not (w1 or w2): return loss
        if self.heads.aux is None or len(self.heads.aux[0]) != len(pred):
            raise RuntimeError("HierarchyLoss: the level heads did not see this batch (call the model first)")
        level1, level2 = self.heads.aux
        target = target.reshape(-1).long()
        reduction = kwargs.get("reduction", self.reduction)
        if w2: loss = loss + w2 * F.cross_entropy(level2.float(), self.heads.level2_of[target], reduction=reduction)
        if w1: loss = loss + w1 * F.cross_entropy(level1.float(), self.heads.level1_of[target], reduction=reduction)
        return loss

    def activation(self, x): return self.base.activation(x) if hasattr(self.base, "activation") else x

    def decodes(self, x): return self.base.decodes(x) if hasattr(self.base, "decodes") else x.argmax(dim=-1)

    def __repr__(self): return f"HierarchyLoss({self.base!r}, weights={list(self.weights)})"


class LevelAccuracy(Metric):
    "Validation top-1 at hierarchy level 1 or 2: the category prediction's parent against the true one's"

    def __init__(self, level_of, level: int):
        self.level_of, self.level = torch.as_tensor(np.asarray(level_of), dtype=torch.long), level

    def reset(self): self.correct, self.total = 0, 0

    def accumulate(self, learn):
        pred = learn.to_detach(learn.pred.argmax(dim=-1)).cpu().reshape(-1)
        targ = learn.to_detach(learn.y).cpu().reshape(-1).long()
        self.correct += int((self.level_of[pred] == self.level_of[targ]).sum())
        self.total += len(targ)

    @property
    def value(self): return self.correct / self.total if self.total else None

    @property
    def name(self): return f"accuracy_level{self.level}"
