"""Learned product-level fusion: a small network over the features of a product's 1-4 pictures.

The 2nd place of the competition extracted per-picture features from each trained backbone and
trained a fuse net over a product's pictures (dropout, a squeeze-excitation style gate, sum or max
over the pictures, an MLP to the 5,270 classes); a base Xception at about 0.72 per picture became
about 0.78 per product. Here:

- `product_groups` turns a feature store (`cdkit.infer.features`) into products: the rows of each
  product's pictures in img_idx order, padded to `max_pictures` with -1;
- `FusionNet` maps (x (B, P, d), mask (B, P)) to class logits. Every per-picture operation is row
  by row, and padded rows are replaced before anything mixes pictures (0 for sum/mean, -inf for
  max), so a product's output never depends on what its padding holds. `order="aware"` adds a
  learned position embedding and the main photo's (the first picture's) own vector beside the pooled
  one; `order="invariant"` gives the same output for any order of the pictures;
- `train_head` fits one with fastai (one-cycle, Adam, label smoothing, the kit's per-epoch
  checkpoint and log, so an interrupted run resumes); `fit_heads` one per variant and seed;
- `FusionCard`: what step 06b trained and chose (fusion.json), read back validated;
- `fusion_to_store` streams products a block at a time through one or more heads (their softmax
  averaged) into a prediction store with one row per picture, each carrying its product's
  distribution: the fusion head then enters the ensemble (step 07) and the aggregation (step 08)
  like any other member. Memory: the block and the heads; features stay memory-mapped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cdkit.base.device import pick_device

MAX_PICTURES = 4  # the competition's products have 1 to 4 pictures


@dataclass
class Groups:
    "The pictures of each product in a feature store"
    product_id: np.ndarray                # (P,) ascending
    rows: np.ndarray                      # (P, max_pictures) feature rows in img_idx order, -1 pads
    n_pictures: np.ndarray                # (P,) pictures used (at most max_pictures)
    picture_rows: np.ndarray              # (P+1,) offsets into `order`: every picture of each product
    order: np.ndarray                     # feature rows sorted by (product_id, img_idx)

    def __len__(self): return len(self.product_id)

    def select(self, product_ids) -> "Groups":
        "The groups of `product_ids` (each must be present), in that order"
        pos = np.searchsorted(self.product_id, product_ids)
        ok = (pos < len(self.product_id)) & (self.product_id[np.minimum(pos, len(self.product_id) - 1)] == product_ids)
        if not ok.all():
            raise KeyError(f"{int((~ok).sum())} products have no features (e.g. {np.asarray(product_ids)[~ok][:5].tolist()})")
        starts, ends = self.picture_rows[pos], self.picture_rows[pos + 1]
        counts = ends - starts
        order = self.order[np.repeat(starts, counts) + _ranges(counts)]
        return Groups(np.asarray(product_ids), self.rows[pos], self.n_pictures[pos],
                      np.r_[0, np.cumsum(counts)], order)


def _ranges(counts):
    "0..c-1 for each count, concatenated"
    counts = np.asarray(counts, np.int64)
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def product_groups(product_id, img_idx, max_pictures=MAX_PICTURES) -> Groups:
    "Group picture rows by product: the first `max_pictures` pictures (by img_idx) of each"
    product_id, img_idx = np.asarray(product_id, np.int64), np.asarray(img_idx, np.int64)
    order = np.lexsort((img_idx, product_id))
    pid = product_id[order]
    first = np.flatnonzero(np.r_[True, pid[1:] != pid[:-1]]) if len(pid) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[first, len(pid)])
    rank = _ranges(counts)
    rows = np.full((len(first), max_pictures), -1, np.int64)
    keep = rank < max_pictures
    rows[np.repeat(np.arange(len(first)), counts)[keep], rank[keep]] = order[keep]
    return Groups(pid[first], rows, np.minimum(counts, max_pictures), np.r_[first, len(pid)].astype(np.int64), order)


def gather(x, rows):
    "Features (B, P, d) float32 of `rows` (B, P) from the (memory-mapped) matrix x; zeros where -1, and the mask"
    rows = np.asarray(rows)
    mask = rows >= 0
    flat = rows[mask]
    out = np.zeros(rows.shape + (x.shape[1],), np.float32)
    if len(flat):
        srt = np.argsort(flat, kind="stable")  # sorted reads: sequential on a memory-mapped file
        # the fp16 rows straight into their slots: no float32 temporaries of a block's size (their varying
        # sizes fragmented glibc's heap block after block: bench/fusion.py)
        out.reshape(-1, x.shape[1])[np.flatnonzero(mask.ravel())[srt]] = x[flat[srt]]
    return torch.from_numpy(out), torch.from_numpy(mask)


class FusionNet(nn.Module):
    """Logits over classes from a product's picture features x (B, P, d) and mask (B, P).

    Per picture: dropout, a squeeze-excitation gate over the feature channels (`gate`), a projection
    to `hidden`; then sum, mean or max over the real pictures (`pool`); `order="aware"` adds a learned
    position embedding before pooling and concatenates the main photo's vector after; an MLP to the
    classes. Padded pictures never reach the pooled vector."""

    def __init__(self, d, n_classes, hidden=512, dropout=0.3, order="aware", pool="max", gate=True,
                 max_pictures=MAX_PICTURES, reduction=8):
        super().__init__()
        if order not in ("aware", "invariant"): raise ValueError(f"order must be 'aware' or 'invariant', got {order!r}")
        if pool not in ("max", "sum", "mean"): raise ValueError(f"pool must be 'max', 'sum' or 'mean', got {pool!r}")
        self.order, self.pool = order, pool
        self.drop = nn.Dropout(dropout)
        r = max(d // reduction, 8)
        self.gate = nn.Sequential(nn.Linear(d, r), nn.ReLU(), nn.Linear(r, d), nn.Sigmoid()) if gate else None
        self.proj = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.pos = nn.Parameter(torch.zeros(max_pictures, hidden)) if order == "aware" else None
        width = hidden * (2 if order == "aware" else 1)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU(),
                                  nn.Linear(hidden, n_classes))

    def forward(self, x, mask):
        mask = mask.bool()
        # the per-picture layers run on the real pictures only (1.75 of 4 slots on average), then
        # scatter back: padding is never computed on, whatever it holds
        xr = self.drop(x[mask].float())
        if self.gate is not None: xr = xr * self.gate(xr)
        hr = self.proj(xr)
        h = hr.new_zeros(mask.shape + hr.shape[-1:]).index_put((mask,), hr)
        if self.pos is not None: h = h + self.pos[:h.shape[1]]
        m = mask.unsqueeze(-1)
        if self.pool == "max":
            pooled = h.masked_fill(~m, float("-inf")).amax(1)
        else:
            pooled = h.masked_fill(~m, 0.0).sum(1)
            if self.pool == "mean": pooled = pooled / mask.sum(1, keepdim=True).clamp(min=1)
        if self.pos is not None:
            main = h.masked_fill(~m, 0.0)[:, 0]  # the first picture: the main photo
            pooled = torch.cat([pooled, main], 1)
        return self.head(pooled)


class ProductFeatures(torch.utils.data.Dataset):
    "Items (x (P, d), mask (P,), label) of the products of `groups` from a feature matrix; `batch` reads many at once"
    n_inp = 2

    def __init__(self, x, groups: Groups, labels):
        self.x, self.groups, self.labels = x, groups, np.asarray(labels, np.int64)

    def __len__(self): return len(self.groups)

    def __getitem__(self, i):
        xb, mb, yb = self.batch([i])
        return xb[0], mb[0], yb[0]

    def batch(self, idx):
        idx = np.asarray(idx, np.int64)
        xb, mb = gather(self.x, self.groups.rows[idx])
        return xb, mb, torch.from_numpy(self.labels[idx])


def _product_dl(ds, bs, shuffle=False, drop_last=False, seed=None, device=None):
    "A fastai DataLoader that reads whole batches of products (one sorted read of the features per batch)"
    from fastai.data.load import DataLoader

    class ProductDL(DataLoader):
        def create_batches(self, samps):
            idx = list(samps)
            for a in range(0, len(idx), self.bs):
                b = idx[a:a + self.bs]
                if self.drop_last and len(b) < self.bs: break
                yield self.dataset.batch(b)

    return ProductDL(ds, bs=bs, shuffle=shuffle, drop_last=drop_last, seed=seed, device=device)


@dataclass
class HeadSpec:
    "How a fusion head is built and trained (saved in the step's card)"
    d: int
    n_classes: int
    hidden: int = 512
    dropout: float = 0.3
    order: str = "aware"
    pool: str = "max"
    gate: bool = True
    max_pictures: int = MAX_PICTURES

    def build(self) -> FusionNet:
        return FusionNet(self.d, self.n_classes, self.hidden, self.dropout, self.order, self.pool, self.gate,
                         self.max_pictures)


@dataclass(frozen=True)
class FitSpec:
    "How a fusion head is fitted: one-cycle Adam over products"
    epochs: int = 20
    lr: float = 2e-3                      # one-cycle peak
    bs: int = 128                         # products per batch
    wd: float = 0.01
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class ProductSet:
    "The products a head learns or is validated on: the feature matrix, its product groups, one label per group"
    x: object                             # (pictures, d) features, memory-mapped
    groups: Groups
    y: np.ndarray                         # (products,) class of each group


def train_head(spec: HeadSpec, fit: FitSpec, train: ProductSet, valid: ProductSet, out_dir, name, seed=0,
               resume=False, device=None):
    """Train one fusion head with fastai; returns (model in eval mode, history DataFrame).

    out_dir/<name>.pth the weights, <name>_metrics.csv one line per epoch, checkpoints/<name>.pth the
    state after each epoch while the head trains (resume=True continues from it; removed when the head
    is finished: its weights are what a resume keeps). A non-finite loss stops it (DivergedError)
    before anything final is written."""
    from fastai.data.core import DataLoaders
    from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from cdkit.train.callbacks import Checkpoint, EpochLog, FiniteLoss, check_finite_weights, load_checkpoint, read_checkpoint
    from cdkit.base.io import makedirs, remove, save_torch
    from cdkit.train.files import ModelFiles
    out_dir = Path(out_dir)
    files = ModelFiles(out_dir)
    epochs, lr, bs, wd, label_smoothing = fit.epochs, fit.lr, fit.bs, fit.wd, fit.label_smoothing
    makedirs(out_dir)
    set_seed(seed)
    device = pick_device(device)
    train_ds, valid_ds = ProductFeatures(train.x, train.groups, train.y), ProductFeatures(valid.x, valid.groups, valid.y)
    dls = DataLoaders(_product_dl(train_ds, bs, shuffle=True, drop_last=len(train_ds) > bs, seed=seed),
                      _product_dl(valid_ds, bs * 2), device=device)
    ckpt = files.head_checkpoint(name)
    start, saved = 0, None
    if resume and ckpt.exists():
        saved = read_checkpoint(ckpt)  # a safe load: refused, never executed, if it is not plain tensors and values
        start = int(saved["epoch"])
    loss = LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing else CrossEntropyLossFlat()
    learn = Learner(dls, spec.build(), loss_func=loss, metrics=[accuracy], wd=wd, path=out_dir, model_dir=".",
                    cbs=[EpochLog(files.head_metrics(name), start), FiniteLoss(), Checkpoint(ckpt, start)])
    learn.model.to(device)
    if start:
        load_checkpoint(learn, ckpt, saved)
    if start < epochs:
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, lr, start_epoch=start)
    model = learn.model.eval()
    check_finite_weights(model, f"fusion head {out_dir / name}")
    state = model.state_dict()
    save_torch(state, files.head_weights(name))
    remove(ckpt)  # the head is finished: its weights are all a resume needs
    hist = pd.read_csv(files.head_metrics(name))
    return model, hist


def fit_heads(specs: dict, seeds, fit: FitSpec, train: ProductSet, valid: ProductSet, out_dir, resume=False,
              device=None):
    """One head per (variant, seed) of `specs` ({variant: HeadSpec}) and `seeds`, in out_dir as
    `<variant>_seed<s>`; with `resume` a finished head is loaded, not retrained.
    Returns ({(variant, seed): model in eval mode}, {(variant, seed): history of the heads trained now})"""
    from cdkit.train.files import ModelFiles
    files = ModelFiles(out_dir)
    heads, hist = {}, {}
    for variant, spec in specs.items():
        for seed in seeds:
            name = files.head_name(variant, seed)
            if resume and files.head_weights(name).exists():
                heads[(variant, seed)] = load_head(spec, files.head_weights(name), device or "cpu")
            else:
                heads[(variant, seed)], hist[(variant, seed)] = train_head(spec, fit, train, valid, out_dir, name, seed,
                                                                           resume, device)
    return heads, hist


@dataclass
class FusionCard:
    "What step 06b trained and chose over one backbone's features: the member's fusion.json"
    backbone: str
    member: str
    chosen: str                           # the variant whose heads predict test
    variants: list                        # the variants trained
    seeds: list
    spec: dict                            # {variant: HeadSpec fields}
    features: dict                        # {split: feature store the heads read}
    params: dict = field(default_factory=dict)  # the step's effective parameters

    def head_spec(self, variant) -> HeadSpec:
        return HeadSpec(**self.spec[variant])

    def write(self, path):
        "The card as JSON, atomically"
        import json
        from cdkit.base.io import atomic_write
        text = json.dumps(asdict(self), indent=1)
        return atomic_write(path, lambda tmp: open(tmp, "w").write(text))

    @classmethod
    def read(cls, path) -> "FusionCard":
        "The card in `path`; FileFormatError naming the file when it is not one"
        from cdkit.base.errors import FileFormatError, read_json
        raw = read_json(path)
        fields = cls.__dataclass_fields__
        required = [k for k in fields if k != "params"]
        missing = [k for k in required if k not in raw] if isinstance(raw, dict) else required
        try:
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            card = cls(**{k: raw[k] for k in fields if k in raw})
            kinds = dict(backbone=str, member=str, chosen=str, variants=list, seeds=list, spec=dict, features=dict,
                         params=dict)
            wrong = [k for k, t in kinds.items() if not isinstance(getattr(card, k), t)]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} of the wrong kind")
            if card.chosen not in card.variants or set(card.spec) != set(card.variants):
                raise ValueError(f"chosen={card.chosen!r} and spec's variants {sorted(card.spec)} must be among "
                                 f"variants={card.variants}")
            for v in card.variants:
                card.head_spec(v)
        except (TypeError, ValueError) as e:
            raise FileFormatError(f"{path}: not a fusion card ({' '.join(str(e).split())[:200]}); run step 06b "
                                  "(`cdkit fuse overwrite=true`) again") from None
        return card


def load_head(spec: HeadSpec, path, device="cpu") -> FusionNet:
    from cdkit.train.callbacks import safe_load
    model = spec.build()
    model.load_state_dict(safe_load(path))
    return model.to(device).eval()


@torch.inference_mode()
def head_probs(models, x, groups: Groups, lo, hi, device):
    "Softmax of each head (list of (b, n_classes)) for products lo:hi"
    xb, mb = gather(x, groups.rows[lo:hi])
    xb, mb = xb.to(device), mb.to(device)
    return [torch.softmax(m(xb, mb).float(), -1) for m in models]


def fusion_to_store(models, fs, store_path, k=20, prob_dtype="uint8", block=2048, meta=None, device=None,
                    truth=None, progress=None, groups=None):
    """Stream the products of feature store `fs` through `models` (softmax averaged) into a prediction
    store at `store_path`: one row per picture (every picture of the product, beyond max_pictures too)
    carrying its product's distribution. Returns (path, per-head product accuracy (list), blend
    accuracy) against `truth` (a Series product_id -> class; NaN where absent or None). `groups`:
    `product_groups(fs.product_id, fs.img_idx)` when the caller has it already."""
    from cdkit.base.progress import bar
    from cdkit.infer.store import StoreWriter, topk
    device = pick_device(device)
    models = [m.to(device).eval() for m in models]
    if groups is None:
        groups = product_groups(fs.product_id, fs.img_idx, models[0].pos.shape[0] if models[0].pos is not None
                                else MAX_PICTURES)
    n_classes = models[0].head[-1].out_features
    true = truth.reindex(groups.product_id).to_numpy() if truth is not None else None
    hits, hits_blend = np.zeros(len(models)), 0.0
    writer = StoreWriter(store_path, n_classes, min(k, n_classes), 1, prob_dtype, dict(meta or {}), overwrite=True)
    try:
        with bar(total=len(groups), desc=f"fusion {Path(store_path).name}", unit="product", progress=progress) as pb:
            for lo in range(0, len(groups), block):
                hi = min(lo + block, len(groups))
                probs = head_probs(models, fs.x, groups, lo, hi, device)
                blend = torch.stack(probs).mean(0)
                if true is not None:
                    t = true[lo:hi]
                    hits += [float((p.argmax(1).cpu().numpy() == t).sum()) for p in probs]
                    hits_blend += float((blend.argmax(1).cpu().numpy() == t).sum())
                a, b = groups.picture_rows[lo], groups.picture_rows[hi]
                rows = groups.order[a:b]
                per = np.diff(groups.picture_rows[lo:hi + 1])
                cls, val, rest = topk(blend[:, None, :], writer.k)  # once per product, then per picture
                writer.add_topk(fs.product_id[rows], fs.img_idx[rows], np.repeat(cls, per, 0), np.repeat(val, per, 0),
                                np.repeat(rest, per, 0))
                pb.update(hi - lo)
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    n = len(groups) if true is not None and len(groups) else float("nan")
    return path, list(hits / n), hits_blend / n
