"""Pseudo-labels (Lee, 2013), the library part: the loss weight alpha(t), the choice of confident
test products, batches that mix labeled and pseudo-labeled pictures at a fixed ratio, the loss and
the callback that ramps alpha. `cdkit.pseudo.finetune` puts them together for step 09.

    L = 1/n sum_i CE(y_i, l_i) + alpha(t) * 1/n' sum_i CE(y'_i, l'_i)

the first mean over the labeled pictures of a step, the second over its pseudo-labeled pictures,
with alpha(t) one of three published forms (`alpha_schedule`, `ALPHA_FORMS`): the poster's, Lee's,
or the one the study's authors ran. docs/STUDY.md gives each with its source.

Batches: every training step is ONE batch of `bs` labeled pictures (train.bson) followed by
`round(pseudo_per_labeled * bs)` pseudo-labeled ones (test.bson), so the ratio holds exactly at every
step and BatchNorm sees both domains together. Items are (x, y, part), part 0 = labeled, 1 = pseudo.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastcore.basics import store_attr

from cdkit.data.loaders import (IMAGENET_MEAN, IMAGENET_STD, PictureDataLoaders, PictureDataset, PictureDL, _device, aug_params,
                   batch_tfms, picture_dl)

LABELED, PSEUDO = 0, 1  # the `part` of an item; also which BSON file it comes from (train, test)


# ---------------------------------------------------------------------------------------------
# the loss weight

ALPHA_FORMS = ("poster", "lee", "authors")


def alpha_schedule(t, T1, T2, a_f, form="lee", a_min=0.5):
    """Weight of the pseudo-label loss at time t, for scalars or arrays; t, T1, T2 share a unit
    ((fractional) epochs or iterations, `alpha_unit`). Three forms, as published:

    poster:  0 for t < T1;  (t - T1) / (T2 - T1) for T1 <= t <= T2;  a_f for t > T2.
             The study's poster (and its authors' README) as printed: the ramp reaches 1 at T2, then
             the weight jumps to a_f.
    lee:     0 for t < T1;  a_f * (t - T1) / (T2 - T1) for T1 <= t < T2;  a_f for t >= T2.
             Lee (2013), eq. 16: the ramp is scaled by a_f and meets it at T2.
    authors: a_min for t <= T1;  a_f * t / T2 for T1 < t < T2;  a_f for t >= T2.
             What the authors' `trainer_pseudo.py` ran: `StepAlpha(alpha_f=2, alpha_min=0.5)` per epoch of
             the pseudo-labeled set, whose breakpoints 0.5 and 2.0 are T1 and T2 here (`epoch * alpha_f / 2`
             is a_f * t / T2 with T2 = 2). No zero phase: pseudo-labels count from the first step.

    T1 == T2 (poster, lee): a step to a_f at T1."""
    if form not in ALPHA_FORMS: raise ValueError(f"form must be one of {ALPHA_FORMS}, got {form!r}")
    if not 0 <= T1 <= T2: raise ValueError(f"need 0 <= T1 <= T2, got T1={T1}, T2={T2}")
    t = np.asarray(t, dtype=np.float64)
    if form == "authors":
        if T2 <= 0: raise ValueError(f"the authors' form needs T2 > 0, got T2={T2}")
        out = np.where(t <= T1, float(a_min), np.where(t < T2, a_f * t / T2, float(a_f)))
    elif T2 == T1:
        out = np.where(t >= T1, float(a_f), 0.0)
    elif form == "lee":
        out = a_f * np.clip((t - T1) / (T2 - T1), 0.0, 1.0)
    else:
        out = np.where(t > T2, float(a_f), np.clip((t - T1) / (T2 - T1), 0.0, 1.0))
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------------
# selection (pure: tables in, tables out)

def product_confidence(pp) -> pd.DataFrame:
    """Per product: product_id, pred_class, prob (winning score), margin (winner - runner-up), n_preds.

    `pp` is a `cdkit.infer.aggregate.ProductPredictions` with k_out >= 2. With `mean_aggregate` the scores
    are mean probabilities, which is what the thresholds are meant for."""
    score = np.asarray(pp.score, np.float64)
    top = score[:, 0]
    second = score[:, 1] if score.shape[1] > 1 else np.zeros_like(top)
    second = np.where(np.isfinite(second), second, 0.0)  # a product with a single candidate
    return pd.DataFrame(dict(product_id=np.asarray(pp.product_id, np.int64), pred_class=np.asarray(pp.pred_class, np.int64),
                             prob=top, margin=top - second, n_preds=np.asarray(pp.n_preds)))


def select_pseudo(conf: pd.DataFrame, threshold=0.0, margin=0.0, fraction=1.0, cap_per_category=0,
                  rank_by="prob") -> pd.DataFrame:
    """The products that get a pseudo-label, most confident first.

    conf: product_id, pred_class, prob, margin (see `product_confidence`). In order:
    1. prob >= threshold and margin >= `margin`;
    2. at most floor(fraction * len(conf)) products, the most confident by `rank_by`;
    3. at most `cap_per_category` per predicted class (0: no cap), the most confident.
    Ties go to the lower product id, so the choice is deterministic.
    Returns the chosen rows of `conf` with `label` = pred_class and `rank` (0 = most confident)."""
    if rank_by not in ("prob", "margin"): raise ValueError(f"rank_by must be prob or margin, got {rank_by!r}")
    order = np.lexsort((conf["product_id"].to_numpy(), -conf[rank_by].to_numpy()))
    c = conf.iloc[order].reset_index(drop=True)
    keep = (c["prob"].to_numpy() >= threshold) & (c["margin"].to_numpy() >= margin)
    c = c[keep]
    if fraction < 1:
        c = c.iloc[:int(math.floor(fraction * len(conf)))]
    if cap_per_category:
        c = c[c.groupby("pred_class").cumcount().to_numpy() < cap_per_category]
    out = c.reset_index(drop=True)
    out["label"] = out["pred_class"].astype(np.int64)
    out["rank"] = np.arange(len(out))
    return out


def pseudo_images(chosen: pd.DataFrame, test_images: pd.DataFrame) -> pd.DataFrame:
    """Image table of test.bson restricted to the chosen products, every picture carrying its
    product's pseudo-label (`label`) and confidence (prob, margin); usable by `cdkit.data.loaders`"""
    keep = ["product_id", "label", "prob", "margin"]
    out = test_images.drop(columns=[c for c in ("label", "prob", "margin") if c in test_images]) \
        .merge(chosen[keep], on="product_id", how="inner", validate="many_to_one")
    return out.reset_index(drop=True)


def truth_classes(truth: pd.DataFrame, catalog) -> pd.Series:
    "test_truth.csv (_id, category_id) -> Series class index by product_id"
    return pd.Series(catalog.to_class(truth["category_id"].to_numpy()), index=truth["_id"].to_numpy(np.int64))


def selection_report(chosen: pd.DataFrame, conf: pd.DataFrame, truth: pd.Series | None = None,
                     catalog=None, n_pictures: pd.DataFrame | None = None):
    """(per-class table, one-row summary) of a selection.

    Per class: products predicted, chosen, pictures chosen (with `n_pictures`: the chosen products'
    image table), and with `truth` (class by product_id): precision of the chosen, and true products
    of the class in the test set (to see which classes the selection misses)."""
    pred = conf.groupby("pred_class").size().rename("predicted")
    got = chosen.groupby("pred_class").size().rename("chosen")
    t = pd.concat([pred, got], axis=1).fillna(0).astype(np.int64)
    t.index.name = "class"
    if n_pictures is not None:
        t["pictures"] = n_pictures.groupby("label").size().reindex(t.index).fillna(0).astype(np.int64)
    summary = dict(products=len(conf), chosen=len(chosen), share=len(chosen) / max(len(conf), 1),
                   mean_prob_chosen=float(chosen["prob"].mean()) if len(chosen) else float("nan"))
    if n_pictures is not None: summary["pictures"] = len(n_pictures)
    if truth is not None:
        true_c = truth.reindex(chosen["product_id"].to_numpy()).to_numpy()
        ok = pd.Series(true_c == chosen["label"].to_numpy(), index=chosen["pred_class"].to_numpy())
        t["precision"] = ok.groupby(level=0).mean().reindex(t.index)
        true_all = truth.reindex(conf["product_id"].to_numpy()).to_numpy()
        t = t.join(pd.Series(true_all).value_counts().rename("true_products"), how="outer").fillna(
            {"predicted": 0, "chosen": 0, "true_products": 0})
        for c in ("predicted", "chosen", "true_products") + (("pictures",) if n_pictures is not None else ()):
            t[c] = t[c].fillna(0).astype(np.int64)
        summary["precision"] = float(ok.mean()) if len(ok) else float("nan")
        summary["accuracy_all"] = float((true_all == conf["pred_class"].to_numpy()).mean())
        rest = ~conf["product_id"].isin(chosen["product_id"]).to_numpy()
        summary["accuracy_not_chosen"] = float((true_all[rest] == conf["pred_class"].to_numpy()[rest]).mean()) \
            if rest.any() else float("nan")
    if catalog is not None:
        t.insert(0, "category_id", catalog.to_category(t.index.to_numpy()))
        t.insert(1, "name", [catalog.name(c) for c in t.index])
    t.index.name = "class"
    return t, pd.DataFrame([summary])


# ---------------------------------------------------------------------------------------------
# batches: labeled and pseudo-labeled pictures from two files, mixed at a fixed ratio per step

class MixedPictures:
    """Labeled (train.bson) and pseudo-labeled (test.bson) pictures as one dataset.

    Positions 0..n_labeled-1 are the labeled dataset's rows, the rest the pseudo dataset's; an item is
    (x, y, part) with part 0 (labeled) or 1 (pseudo), the file it came from."""
    n_inp = 1  # x alone is the input; (y, part) go to the loss
    with_labels = True

    def __init__(self, labeled, pseudo):
        self.parts = (labeled, pseudo)
        self.n_labeled = len(labeled)

    def __len__(self): return self.n_labeled + len(self.parts[PSEUDO])

    def __getitem__(self, i):
        i = int(i)
        part = LABELED if i < self.n_labeled else PSEUDO
        x, y = self.parts[part][i - part * self.n_labeled]
        return x, y, part

    @property
    def bad_pictures(self): return sum(p.bad_pictures for p in self.parts)


class _Stream:
    "Endless shuffled passes over range(n): `take(k)` continues where the last call stopped"

    def __init__(self, n, rng):
        self.n, self.rng, self.perm, self.pos = n, rng, np.empty(0, np.int64), 0

    def take(self, k):
        out = []
        while k > 0:
            if self.pos == len(self.perm):
                self.perm, self.pos = self.rng.permutation(self.n), 0
            got = self.perm[self.pos:self.pos + k]
            out.append(got)
            self.pos += len(got)
            k -= len(got)
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def restart(self):
        "Start a fresh pass at the next `take` (the rest of the current one is dropped, as drop_last does)"
        self.pos = len(self.perm)


class MixPlan:
    """Order of a mixed epoch: per step `n_labeled` labeled positions then `n_pseudo` pseudo ones.

    `epoch_size` "pseudo": steps = n_pseudo_items // n_pseudo (at least 1), one pass over the pseudo
    pictures; "labeled": one pass over the labeled pictures (each epoch a fresh shuffle, the remainder
    short of a full step dropped). The other part is drawn on from an endless reshuffled stream that
    continues across epochs."""

    def __init__(self, n_labeled_items, n_pseudo_items, bs, pseudo_per_labeled=3.0, epoch_size="pseudo", seed=0):
        if epoch_size not in ("pseudo", "labeled"): raise ValueError(f"epoch_size must be pseudo or labeled, got {epoch_size!r}")
        self.n_items = (int(n_labeled_items), int(n_pseudo_items))
        n_ps = int(round(pseudo_per_labeled * bs)) if n_pseudo_items else 0
        self.per_step = (int(bs), n_ps)
        if n_labeled_items < 1: raise ValueError("no labeled pictures to fine-tune on")
        if n_ps == 0: epoch_size = "labeled"
        self.epoch_size = epoch_size
        self.steps = max(1, (n_pseudo_items // n_ps) if epoch_size == "pseudo" else (n_labeled_items // bs))
        rng = np.random.default_rng(seed)
        self.streams = (_Stream(self.n_items[LABELED], rng), _Stream(max(self.n_items[PSEUDO], 1), rng))

    @property
    def batch_size(self): return sum(self.per_step)

    def __len__(self): return self.steps * self.batch_size

    def epoch_idxs(self):
        self.streams[PSEUDO if self.epoch_size == "pseudo" else LABELED].restart()  # an epoch is one pass of it
        lab = self.streams[LABELED].take(self.steps * self.per_step[LABELED]).reshape(self.steps, -1)
        ps = self.streams[PSEUDO].take(self.steps * self.per_step[PSEUDO]).reshape(self.steps, -1) + self.n_items[LABELED]
        return np.concatenate([lab, ps], axis=1).ravel()


class MixedDL(PictureDL):
    "A TfmdDL whose epochs follow a `MixPlan`: every batch is one step's labeled + pseudo items"
    def __init__(self, dataset=None, plan=None, **kwargs):
        self.plan = plan
        super().__init__(dataset, **kwargs)

    def get_idxs(self):
        return self.plan.epoch_idxs() if self.plan is not None else super().get_idxs()


def mixed_dataloaders(labeled: pd.DataFrame, pseudo: pd.DataFrame, train_bson, test_bson, valid: pd.DataFrame,
                      n_classes, bs=32, pseudo_per_labeled=3.0, epoch_size="pseudo", size=160, item_size=160,
                      mean=None, std=None, aug=None, num_workers=0, seed=0, device=None, valid_bs=None):
    """fastai DataLoaders: train = labeled + pseudo-labeled pictures mixed per `MixPlan`, valid = the
    labeled validation pictures as (x, y).

    labeled, valid: image tables of train.bson with `label`; pseudo: `pseudo_images` of test.bson.
    Both parts get the training crop and augmentation."""
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    for name, t in (("labeled", labeled), ("pseudo", pseudo), ("valid", valid)):
        lab = t["label"].to_numpy()
        if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
            raise ValueError(f"{name} labels must lie in 0..{n_classes - 1}, found {lab.min()}..{lab.max()}")
    aug, device = aug_params(aug), _device(device)
    ds = MixedPictures(PictureDataset(labeled, train_bson, item_size, crop="random", split_idx=0),
                       PictureDataset(pseudo, test_bson, item_size, crop="random", split_idx=0))
    plan = MixPlan(len(labeled), len(pseudo), bs, pseudo_per_labeled, epoch_size, seed)
    train = MixedDL(ds, plan=plan, bs=plan.batch_size, n=len(plan), shuffle=False, drop_last=True,
                            num_workers=num_workers, after_batch=batch_tfms(size, mean, std, aug, item_size),
                            device=device, pin_memory=device.type == "cuda")
    valid_ds = PictureDataset(valid, train_bson, item_size, crop="center", split_idx=1)
    vdl = picture_dl(valid_ds, valid_bs or bs, num_workers, after_batch=batch_tfms(size, mean, std, aug, item_size),
                     device=device)
    dls = PictureDataLoaders(train, vdl, device=device)
    dls.c = int(n_classes)
    dls.vocab = list(range(n_classes))
    dls.cfg = dict(bson_path=str(train_bson), size=size, item_size=item_size, mean=tuple(mean), std=tuple(std),
                   aug=aug.__dict__.copy(), n_classes=int(n_classes))
    dls.plan = plan
    return dls


# ---------------------------------------------------------------------------------------------
# loss and schedule

def _plain(t): return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


class PseudoLabelLoss:
    """CE(labeled) + alpha * CE(pseudo), each the mean over its part of the batch (Lee 2013).

    Called with (pred, y, part) in training and (pred, y) in validation, where it is plain cross
    entropy. `alpha` is set from outside (`AlphaRamp`); `last` keeps the two part losses of the
    latest call. reduction="none" (fastai's get_preds(with_loss=True)) gives per-item losses,
    pseudo items weighted by alpha."""

    def __init__(self, alpha=0.0):
        self.alpha, self.last = float(alpha), None

    def __call__(self, pred, y, part=None, reduction="mean"):
        pred, y = _plain(pred), _plain(y).long().view(-1)
        ce = torch.nn.functional.cross_entropy(pred.float().view(len(y), -1), y, reduction="none")
        if part is None:
            return ce.mean() if reduction == "mean" else ce
        ps = (_plain(part).view(-1) == PSEUDO).float()
        if reduction == "none":
            return ce * (1 - ps + self.alpha * ps)
        lab = 1 - ps
        # masked means: no host sync, and an empty part contributes 0
        l_lab = (ce * lab).sum() / lab.sum().clamp(min=1)
        l_ps = (ce * ps).sum() / ps.sum().clamp(min=1)
        self.last = (l_lab.detach(), l_ps.detach())
        return l_lab + self.alpha * l_ps

    def activation(self, x): return torch.softmax(x, dim=-1)
    def decodes(self, x): return x.argmax(dim=-1)


class AlphaRamp(Callback):
    "Set the pseudo-label weight alpha(t) of a `PseudoLabelLoss` before each training batch; record it"
    order, run_valid = 0, False

    def __init__(self, T1=0.0, T2=1.0, alpha_final=0.3, unit="epoch", record_losses=True, form="lee", alpha_min=0.5):
        if unit not in ("epoch", "iter"): raise ValueError(f"unit must be epoch or iter, got {unit!r}")
        alpha_schedule(T1, T1, T2, alpha_final, form, alpha_min)  # bad forms and times fail here, not mid-fit
        store_attr()
        self.history = []

    def before_fit(self):
        if not isinstance(self.learn.loss_func, PseudoLabelLoss):
            raise TypeError("AlphaRamp needs learn.loss_func to be a PseudoLabelLoss")
        self.history = []

    def before_batch(self):
        self.t = self.epoch + self.iter / self.n_iter if self.unit == "epoch" else float(self.train_iter)
        self.alpha = alpha_schedule(self.t, self.T1, self.T2, self.alpha_final, self.form, self.alpha_min)
        self.learn.loss_func.alpha = self.alpha

    def after_loss(self):
        part = self.yb[1] if len(self.yb) > 1 else None
        n_ps = int((part == PSEUDO).sum()) if part is not None else 0
        row = dict(iter=self.train_iter, epoch=self.epoch + self.iter / self.n_iter, t=self.t, alpha=self.alpha,
                   n_labeled=len(self.yb[0]) - n_ps, n_pseudo=n_ps)
        last = self.learn.loss_func.last
        if self.record_losses and last is not None:
            row.update(loss_labeled=float(last[0]), loss_pseudo=float(last[1]))
        self.history.append(row)

    def frame(self): return pd.DataFrame(self.history)


# ---- fine-tuning ----

def finetune_learner(model, dls, wd=0.01, path=None, cbs=(), opt_func=None):
    """A fastai Learner over mixed loaders with `PseudoLabelLoss`, every layer trainable, mixed
    precision on a GPU; `opt_func`: the training step's optimizer (None: fastai's Adam)"""
    import fastai.callback.schedule  # noqa: F401  (gives Learner its fit_one_cycle)
    from fastai.learner import Learner
    from fastai.optimizer import Adam
    from cdkit.train.callbacks import precision_callbacks
    precision, _ = precision_callbacks("bf16", True, dls.device)
    return Learner(dls, model, loss_func=PseudoLabelLoss(), wd=wd, path=path or ".", cbs=[*precision, *cbs],
                   opt_func=opt_func or Adam)


def finetune(learn, epochs=2, lr=1e-3, pct_start=0.25, T1=0.0, T2=1.0, alpha_final=0.3, alpha_unit="epoch", cbs=(),
             alpha_form="lee", alpha_min=0.5, one_cycle=True, lr_steps=(), lr_step_factors=()):
    """Fine-tune `learn` (see `finetune_learner`) with alpha(t) applied by `AlphaRamp`, on the training
    step's schedule (`cdkit.train.callbacks.fit_schedule`): one-cycle, or flat / stepped lr with one_cycle off.
    Returns the per-step history (iter, epoch, t, alpha, n_labeled, n_pseudo, part losses, lr)."""
    from cdkit.train.callbacks import fit_schedule
    ramp = AlphaRamp(T1, T2, alpha_final, alpha_unit, form=alpha_form, alpha_min=alpha_min)
    lrs = _LrTrace()
    fit_schedule(learn, epochs, lr, one_cycle=one_cycle, pct_start=pct_start, lr_steps=lr_steps,
                 lr_step_factors=lr_step_factors, cbs=[ramp, lrs, *cbs])
    out = ramp.frame()
    if len(lrs.lrs) == len(out): out["lr"] = lrs.lrs
    return out


class _LrTrace(Callback):
    "The lr each training step ran at (after the schedule set it)"
    order, run_valid = 60, False

    def before_fit(self): self.lrs = []
    def after_batch(self):
        if self.training: self.lrs.append(float(self.opt.hypers[-1]["lr"]))
