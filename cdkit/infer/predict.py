"""Streaming TTA prediction: a model over an image table, batch by batch, into a prediction store.

fastai's `learn.tta` gathers every prediction in memory: 3.1 M test pictures x 5,270 classes do not
fit. `predict_to_store` instead writes each batch's top-k probabilities to a `cdkit.infer.store` store and
keeps nothing else. Per picture it computes `n_views` softmax distributions:

- view 0, the original: the centre crop of `item_size` resized to `size`, through exactly the
  validation transforms of `cdkit.data.loaders` (so with `exact=True` it equals `learn.get_preds` on
  `dls.test_dl(images)`);
- views 1.., augmented: a random crop of `item_size` (shift), flip, rotation and zoom drawn from the
  training augmentation's ranges (`AugParams`; always applied, `p_affine` does not thin them out),
  done as one affine resampling of the whole 180x180 picture on the device. Each picture's draws
  come from a hash of (seed, view, product_id, img_idx): the same picture gets the same views
  whatever the batch size, shard or worker count, so sharded runs merge into the unsharded result.

`Views`, `StoreSpec` and `Shard` say how pictures are seen, what the store keeps and which rows are predicted.
Shards (`shard` of `num_shards`) are contiguous row ranges of the table (`cdkit.infer.store.shard_rows`);
write one store per shard and join them with `cdkit.infer.store.merge_stores`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.data.core import Pipeline

from cdkit.data.loaders import (IMAGENET_MEAN, IMAGENET_STD, PICTURE_SIZE, PictureDataset, aug_params, batch_tfms, crop_offset,
                   picture_dl)
from cdkit.base.device import pick_device
from cdkit.infer.store import StoreWriter, shard_rows

log = logging.getLogger(__name__)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_N_DRAWS = 7  # flip, angle, zoom, zoom centre x, y, crop top, left


def _splitmix64(z):
    "Bijective 64-bit mixer (splitmix64 finalizer), vectorized over uint64 arrays"
    with np.errstate(over="ignore"):
        z = (z + _GOLDEN) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def view_uniforms(seed, view, product_id, img_idx, n=_N_DRAWS):
    "(len, n) uniforms in [0, 1), a pure function of (seed, view, product_id, img_idx, column)"
    pic = np.asarray(product_id).astype(np.int64).astype(np.uint64) * np.uint64(256) + \
        (np.asarray(img_idx).astype(np.uint64) & np.uint64(0xFF))
    base = _splitmix64(_splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ np.uint64(view))
    key = _splitmix64(pic ^ base)
    cols = [_splitmix64(key ^ _splitmix64(np.uint64(j + 1))) for j in range(n)]
    return (np.stack(cols, 1) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def view_params(seed, view, product_id, img_idx, aug=None, item_size=PICTURE_SIZE, full=PICTURE_SIZE):
    "Per-picture draws of an augmented view: dict of (len,) arrays flip, angle (degrees), zoom, cx, cy, top, left"
    a = aug_params(aug)
    u = view_uniforms(seed, view, product_id, img_idx)
    margin = full - item_size
    return dict(flip=(u[:, 0] < 0.5) & a.flip, angle=(2 * u[:, 1] - 1) * a.max_rotate,
                zoom=1 + u[:, 2] * (max(a.max_zoom, 1.0) - 1), cx=u[:, 3], cy=u[:, 4],
                top=np.floor(u[:, 5] * (margin + 1)).astype(np.int64), left=np.floor(u[:, 6] * (margin + 1)).astype(np.int64))


def view_theta(params, item_size=PICTURE_SIZE, full=PICTURE_SIZE):
    """(b, 2, 3) float32 affine matrices for F.affine_grid (align_corners=True): output coordinates
    -> the full picture's, composing flip, rotation, zoom around a random centre, and the crop."""
    p = {k: np.asarray(v) for k, v in params.items()}
    n = len(p["angle"])
    half = (item_size - 1) / (full - 1)  # the crop's half extent in the full picture's coordinates
    cx0 = -1 + (2 * p["left"] + item_size - 1) / (full - 1)  # crop centre
    cy0 = -1 + (2 * p["top"] + item_size - 1) / (full - 1)
    t = np.deg2rad(p["angle"])
    cos, sin, z = np.cos(t), np.sin(t), p["zoom"]
    fx = np.where(p["flip"], -1.0, 1.0)
    a = np.empty((n, 2, 3))
    a[:, 0, 0], a[:, 0, 1] = half * cos * fx / z, -half * sin / z
    a[:, 1, 0], a[:, 1, 1] = half * sin * fx / z, half * cos / z
    a[:, 0, 2] = cx0 + half * (1 - 1 / z) * (2 * p["cx"] - 1)
    a[:, 1, 2] = cy0 + half * (1 - 1 / z) * (2 * p["cy"] - 1)
    return torch.from_numpy(a.astype(np.float32))


class ViewMaker:
    "Turns a batch of full uint8 pictures (b, 3, 180, 180) into normalized model inputs, view by view"
    def __init__(self, size, item_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, aug=None, seed=0, device="cpu"):
        self.size, self.item_size, self.aug, self.seed = int(size), int(item_size), aug_params(aug), seed
        self.device = torch.device(device)
        self.original = Pipeline(batch_tfms(size, mean, std, self.aug, item_size), split_idx=1)  # validation path
        for t in self.original.fs:
            if hasattr(t, "mean") and torch.is_tensor(t.mean): t.mean, t.std = t.mean.to(self.device), t.std.to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def __call__(self, x, view, product_id, img_idx):
        from fastai.torch_core import TensorImage
        if view == 0:
            o, s = crop_offset(PICTURE_SIZE, self.item_size), self.item_size
            return self.original(TensorImage(x[:, :, o:o + s, o:o + s])).as_subclass(torch.Tensor)
        theta = view_theta(view_params(self.seed, view, product_id, img_idx, self.aug, self.item_size),
                           self.item_size).to(x.device)
        xf = x.as_subclass(torch.Tensor).float().div_(255)
        d = self.item_size / self.size / 2  # > 1: shrink first (area), as fastai does, but per picture
        if d > 1: xf = F.interpolate(xf, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
        grid = F.affine_grid(theta, [len(xf), 3, self.size, self.size], align_corners=True)
        out = F.grid_sample(xf, grid, mode="bilinear", padding_mode=self.aug.pad_mode, align_corners=True)
        return (out - self.mean) / self.std


def _model_of(learn_or_model):
    return learn_or_model.model if hasattr(learn_or_model, "dls") and hasattr(learn_or_model, "model") else learn_or_model


def _dls_cfg(learn_or_model):
    return getattr(getattr(learn_or_model, "dls", None), "cfg", None) or {}


def feature_layer(model):
    """The module whose input is the model's pooled features: the last layer of the fastai head
    (Sequential(body, head)), e.g. its final Linear or the hierarchy heads that replace it"""
    from torch import nn
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Sequential):
        return model[-1][-1]
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no final layer to take features from")
    return linear[-1]


class FeatureTap:
    "Keeps the input of `feature_layer(model)` of the forward passes made while `on`"
    def __init__(self, model):
        self.on, self.x = False, None
        self.handle = feature_layer(model).register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.on: self.x = args[0].detach()

    def remove(self): self.handle.remove()


@dataclass(frozen=True)
class Views:
    """How each picture is shown to the model: `n_views` views (1 = the original only; 1 + n = n seeded
    augmented views besides it), at the model's input. None: the Learner's loaders' value (size is
    required for a bare module; item_size defaults to size, mean/std to ImageNet's, aug to the defaults)"""
    n_views: int = 1
    seed: int = 0                         # the augmented views' draws (a picture always gets the same views)
    size: Optional[int] = None            # the model's input side
    item_size: Optional[int] = None       # the crop of the 180x180 picture, resized to `size`
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    aug: object = None                    # AugParams (or a dict of them): the augmented views' ranges


@dataclass(frozen=True)
class StoreSpec:
    "What the store keeps per picture and view (see cdkit.infer.store), and what its manifest records"
    k: int = 20                           # classes kept
    prob_dtype: str = "uint8"             # uint8 (sqrt-quantized), float16 or float32
    n_classes: Optional[int] = None       # None: the model's output width, from one forward pass
    meta: Optional[dict] = None           # merged into the store's meta
    overwrite: bool = False               # replace a store already at the path


@dataclass(frozen=True)
class Shard:
    "This machine's part of the pictures: rows `shard_rows(len(images), shard, num_shards)`"
    shard: int = 0
    num_shards: int = 1


def predict_to_store(learn_or_model, images: pd.DataFrame, bson_path, store_path, views: Views = Views(),
                     store: StoreSpec = StoreSpec(), part: Shard = Shard(), features_path=None, features_meta=None,
                     bs=128, num_workers=0, device=None, exact=False, progress=None, log_every=60.0):
    """Softmax probabilities of `views.n_views` views of every picture of `images` (its shard), streamed to a store.

    learn_or_model: a fastai Learner (the `views` left at None take its `cdkit.data.loaders` loaders'
      values) or a torch module taking normalized (b, 3, size, size) input
    images: image table (product_id, img_idx, offset, length); rows map to the store by
      product_id / img_idx
    views, store, part: how pictures are seen (`Views`), what the store keeps (`StoreSpec`), which rows (`Shard`)
    exact: float32 compute (no autocast) and the full distribution in float32 (k = n_classes):
      for tests and small data; otherwise bf16 autocast on CUDA
    progress: a bar per picture (None: in notebooks and on terminals, see `cdkit.base.progress`); the log
      line every `log_every` seconds says the same where no bar is drawn
    features_path: also write the pooled features of the original view (`cdkit.infer.features`), taken in
      the same forward pass; store_path None: the features only
    Returns the store's path (the features' when store_path is None). Undecodable pictures are predicted as blank grey pictures; their
    count is in the store's meta (`bad_pictures`)."""
    n_views, seed, k, prob_dtype, n_classes = views.n_views, views.seed, store.k, store.prob_dtype, store.n_classes
    shard, num_shards, meta = part.shard, part.num_shards, store.meta
    cfg = _dls_cfg(learn_or_model)
    size = views.size or cfg.get("size")
    if size is None: raise ValueError("size is required when the model comes without cdkit DataLoaders")
    item_size = views.item_size or cfg.get("item_size") or size
    mean, std = views.mean or cfg.get("mean") or IMAGENET_MEAN, views.std or cfg.get("std") or IMAGENET_STD
    aug = aug_params(views.aug if views.aug is not None else cfg.get("aug"))
    if n_views < 1: raise ValueError(f"n_views must be >= 1, got {n_views}")
    device = pick_device(device)
    model = _model_of(learn_or_model).to(device).eval()
    if n_classes is None:
        with torch.inference_mode():
            n_classes = int(model(torch.zeros(1, 3, size, size, device=device)).shape[-1])
    if exact: k, prob_dtype = n_classes, "float32"
    rows = shard_rows(len(images), shard, num_shards)
    ds = PictureDataset(images.iloc[rows.start:rows.stop], bson_path, crop="full", with_labels=False, with_row=True,
                        on_bad="blank")
    dl = picture_dl(ds, bs=bs, num_workers=num_workers, device=device)
    make_view = ViewMaker(size, item_size, mean, std, aug, seed, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and not exact
                else contextlib.nullcontext())
    info = dict(size=size, item_size=item_size, n_views=n_views, seed=seed, aug=asdict(aug), mean=list(mean),
                std=list(std), shard=shard, num_shards=num_shards, rows=[rows.start, rows.stop],
                bson_path=str(bson_path), exact=exact, **(meta or {}))
    writer = StoreWriter(store_path, n_classes, k, n_views, prob_dtype, info, overwrite=store.overwrite) if store_path else None
    tap, fwriter = (FeatureTap(model), None) if features_path else (None, None)
    t0 = last = time.perf_counter()
    done = 0
    from cdkit.base.progress import bar
    name = getattr(store_path or features_path, "name", store_path or features_path)
    pbar = bar(total=len(ds), desc=f"predict {name}", unit="picture", progress=progress)
    try:
        with torch.inference_mode(), autocast, pbar:
            for x, r in dl:
                r = r.cpu().numpy()
                pid, img = ds.product_id[r], ds.img_idx[r]
                probs = []
                for v in range(n_views if writer else 1):
                    if tap: tap.on = v == 0
                    probs.append(torch.softmax(model(make_view(x, v, pid, img)).float(), -1))
                if writer: writer.add(pid, img, torch.stack(probs, 1))
                if tap:
                    if fwriter is None:
                        from cdkit.infer.features import FeatureWriter
                        fwriter = FeatureWriter(features_path, len(ds), tap.x.shape[1], overwrite=True,
                                                meta=dict(info, **(features_meta or {})))
                    fwriter.add(pid, img, tap.x)
                done += len(r)
                pbar.update(len(r))
                if log_every and time.perf_counter() - last > log_every:
                    last = time.perf_counter()
                    log.info("%s: %d/%d pictures, %.0f pictures/s", name, done, len(ds), done / (last - t0))
        if ds.bad_pictures: log.warning("%s: %d picture(s) did not decode and were predicted blank", name, ds.bad_pictures)
        if tap:
            if fwriter is None:  # no picture in this shard: an empty store still says so
                from cdkit.infer.features import FeatureWriter
                d = int(feature_layer(model).in_features) if hasattr(feature_layer(model), "in_features") else 0
                fwriter = FeatureWriter(features_path, 0, d, overwrite=True, meta=dict(info, **(features_meta or {})))
            fwriter.meta.update(bad_pictures=ds.bad_pictures, pictures=done)
            out = fwriter.close()
            fwriter = None
        if writer:
            writer.meta.update(bad_pictures=ds.bad_pictures, pictures=done, seconds=round(time.perf_counter() - t0, 1))
            out = writer.close()
        return out
    except BaseException:
        if writer: writer.abort()
        if fwriter is not None: fwriter.abort()
        raise
    finally:
        if tap: tap.remove()
