"""fastai DataLoaders over the image table: one item per picture, decoded in the worker processes.

An item is a row position in the image table (plain tuples as fastai items would be split element
by element). Per item, in the DataLoader's workers: one `pread` of the product document, the
picture's JPEG decoded by libjpeg-turbo (simplejpeg, the fastest of simplejpeg / torchvision / PIL
measured in bench/loader.py), a cheap crop of `item_size` (random for training: the shift
augmentation; centred for validation), returned as a uint8 `TensorImage` (3, item_size, item_size)
and a `TensorCategory` label. Per batch, on the DataLoaders' device (the GPU when there is one):
`IntToFloatTensor`, fastai's flip / rotate / zoom (`aug_transforms`, which also resizes to `size`,
for validation too) and `Normalize`.

A picture that cannot be used never stops a run, whatever is wrong with it (bytes that decode as
nothing, a header claiming a huge size, a `picture` that is no binary or is missing from its
document): it is counted (`dls.bad_pictures()`, summed over worker processes through a shared
counter), logged with its product id and picture index (the first few, then at every power of ten),
and replaced. Training replaces it by another picture of the same product (same label) when the
product has one, else by the next decodable row's picture together with that row's label;
validation and prediction replace it by a blank grey picture and keep the row's own label, so that
no other product's picture is scored or predicted as this product's.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.augment import AffineCoordTfm, aug_transforms

from cdkit.base.device import pick_device
from cdkit.data.bsonfile import BsonReader, ImageDecodeError, decode_rgb
from cdkit.data.split import FUSION_FOLD
from cdkit.base.errors import CdkitError, shorten

log = logging.getLogger(__name__)

PICTURE_SIZE = 180  # every competition picture is 180x180
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLANK_VALUE = 128   # grey of the picture that stands in for an undecodable one at prediction time
_MAX_SUBSTITUTES = 64  # rows tried after a bad picture before giving up (the file must be broken)
_LOG_FIRST = 10        # bad pictures logged one by one per process; after that, at powers of ten


@dataclass
class AugParams:
    "Training augmentation (and the family the TTA views are drawn from); shift comes from the item crop"
    flip: bool = True           # random horizontal flip (p = 0.5)
    max_rotate: float = 10.0    # degrees, uniform in [-max_rotate, max_rotate]
    max_zoom: float = 1.1       # zoom in by a factor uniform in [1, max_zoom], centre drawn at random
    max_lighting: float = 0.0   # brightness/contrast change; 0 = off (the pictures are packshots)
    p_affine: float = 0.75      # probability that a training picture is rotated/zoomed
    p_lighting: float = 0.75    # probability of the lighting change when max_lighting > 0
    pad_mode: str = "reflection"  # what rotation uncovers: reflection, border or zeros


def aug_params(aug=None) -> AugParams:
    "AugParams from None (defaults), a dict (unknown keys: error) or an AugParams"
    if aug is None: return AugParams()
    if isinstance(aug, AugParams): return aug
    known = {f.name for f in fields(AugParams)}
    unknown = sorted(set(aug) - known)
    if unknown: raise ValueError(f"unknown augmentation parameter(s) {unknown}; known: {sorted(known)}")
    return AugParams(**aug)


def crop_offset(full, item_size, rng=None):
    "Top (or left) offset of an `item_size` crop of a `full`-pixel side: random with `rng`, else centred"
    if item_size > full: raise ValueError(f"item_size={item_size} exceeds the picture's {full} pixels")
    margin = full - item_size
    return rng.randint(0, margin) if rng is not None and margin else margin // 2


class PictureDataset:
    """Item pipeline: row position -> (uint8 (s, s, 3) array[, label][, row]), batched by `collate_pictures`

    `crop`: "random" (training: random `item_size` crop), "center" (validation, prediction view 0),
    "full" (the whole picture, for the TTA predictor that crops on the device). With `with_row`, the
    row position is appended to each item, so a consumer can map a batch back to the table whatever
    the worker order. `on_bad`: what replaces a bad picture: "next" (training only, i.e. crop="random"
    and split_idx=0, and its default there: another picture of the same product, else the next
    decodable row's picture and label) or "blank" (the grey picture with the row's own label; the
    default and the only choice for validation and prediction)."""

    def __init__(self, images: pd.DataFrame, bson_path, item_size=PICTURE_SIZE, crop="center",
                 with_labels=True, with_row=False, on_bad=None, split_idx=1):
        if crop not in ("random", "center", "full"): raise ValueError(f"crop must be random, center or full, got {crop!r}")
        if with_labels and "label" not in images: raise ValueError("images has no `label` column (Prepared.train_images() adds it)")
        self.reader = BsonReader(bson_path)
        self.item_size = PICTURE_SIZE if crop == "full" else int(item_size)
        crop_offset(PICTURE_SIZE, self.item_size)  # fail now on an impossible size
        self.crop, self.with_labels, self.with_row, self.split_idx = crop, with_labels, with_row, split_idx
        training = crop == "random" and split_idx == 0
        self.on_bad = on_bad or ("next" if training and with_labels else "blank")
        if self.on_bad not in ("next", "blank"): raise ValueError(f"on_bad must be next or blank, got {self.on_bad!r}")
        if self.on_bad == "next" and not training:
            raise ValueError("on_bad='next' puts another picture in a bad one's place: training only (crop='random', "
                             "split_idx=0); validation and prediction use 'blank'")
        # plain arrays, not the DataFrame: cheap to index per item and shared copy-on-write after fork
        self.product_id = images["product_id"].to_numpy(np.int64)
        self.img_idx = images["img_idx"].to_numpy(np.int8)
        self.offset = images["offset"].to_numpy(np.int64)
        self.length = images["length"].to_numpy(np.int32)
        self.label = images["label"].to_numpy(np.int32) if with_labels else None
        self._bad = mp.Value("q", 0)  # shared with worker processes (inherited at their start)
        self._logged = 0
        self.loss_func = CrossEntropyLossFlat()  # what fastai's Learner takes when given none

    def __len__(self): return len(self.product_id)

    # ---- what fastai's show_batch, show_results, tta, predict and interpretation expect of a dataset ----
    def decode(self, sample, full=True):
        "fastai's decode of one (image[, label]) sample: labels become `Category` of the category id (`vocab`)"
        from fastai.data.transforms import Category
        vocab = getattr(self, "vocab", None)
        out = [sample[0]]
        for y in sample[1:]:
            y = int(y)
            out.append(Category(str(vocab[y] if vocab is not None and 0 <= y < len(vocab) else y)))
        return tuple(out)

    @contextlib.contextmanager
    def set_split_idx(self, i):
        "Apply the transforms of split `i` inside the block (fastai's `tta` asks for the training augmentation: 0)"
        old = self.split_idx
        self.split_idx = i
        try: yield self
        finally: self.split_idx = old

    @property
    def items(self) -> pd.DataFrame:
        "The image-table rows of this dataset (fastai's interpretation re-reads top losses through `test_dl(items)`)"
        d = dict(product_id=self.product_id, img_idx=self.img_idx, offset=self.offset, length=self.length)
        if self.label is not None: d["label"] = self.label
        return pd.DataFrame(d)

    @property
    def bad_pictures(self) -> int:
        "Pictures that did not decode so far, over all processes"
        return int(self._bad.value)

    def jpeg(self, i):
        return self.reader.picture(self.offset[i], self.length[i], self.img_idx[i])

    def decode_row(self, i):
        """(H, W, 3) uint8 of row i, PICTURE_SIZE square; ImageDecodeError if it cannot be used (BadPictureError
        when its structure in the file is unsound, see `BsonReader.slots`)"""
        a = decode_rgb(self.jpeg(i))  # header checked first; simplejpeg, else PIL for PNG / CMYK / grayscale
        if a.shape[:2] != (PICTURE_SIZE, PICTURE_SIZE):  # not in the competition data; keep batches square
            from PIL import Image
            a = np.asarray(Image.fromarray(a).resize((PICTURE_SIZE, PICTURE_SIZE), Image.BILINEAR))
        return a

    def _note_bad(self, i, err, instead):
        with self._bad.get_lock():
            self._bad.value += 1
            n = self._bad.value
        self._logged += 1
        if self._logged <= _LOG_FIRST or str(n).rstrip("0") == "1":  # then at 10, 100, 1000, ... overall
            log.warning("picture %d of product %d (row %d of %s) cannot be used (%s); replaced by %s. "
                        "%d bad picture(s) so far", self.img_idx[i], self.product_id[i], i, self.reader.path,
                        err, instead, n)

    def _substitutes(self, i):
        "Rows that may stand in for row i in training: the same product's other pictures first, then the next rows"
        pid, n = self.product_id[i], len(self)
        j = i - 1
        while j >= 0 and self.product_id[j] == pid: yield j; j -= 1
        j = i + 1
        while j < n and self.product_id[j] == pid: yield j; j += 1
        for k in range(1, _MAX_SUBSTITUTES):
            j = (i + k) % n
            if self.product_id[j] != pid: yield j

    def picture(self, i):
        "(row actually used, (H, W, 3) uint8 array) of row i, counted and replaced when it cannot be used"
        try:
            return i, self.decode_row(i)
        except ImageDecodeError as e:
            err = e
        if self.on_bad == "next":
            for j in self._substitutes(i):
                try:
                    a = self.decode_row(j)
                except ImageDecodeError:
                    continue  # counted when its own row is read
                same = self.product_id[j] == self.product_id[i]
                self._note_bad(i, err, f"picture {self.img_idx[j]} of the same product" if same else
                               f"row {j} (product {self.product_id[j]}) with its label")
                return j, a
            self._note_bad(i, err, "nothing")
            raise ImageDecodeError(f"{self.reader.path}: {_MAX_SUBSTITUTES} consecutive pictures from row {i} "
                                   "cannot be used; is this a competition BSON file?")
        self._note_bad(i, err, "a blank grey picture")
        return i, np.full((PICTURE_SIZE, PICTURE_SIZE, 3), BLANK_VALUE, np.uint8)

    def __getitem__(self, i):
        "(picture (s, s, 3) uint8 view[, label][, row]); `collate_pictures` makes the batch tensors"
        i = int(i)
        j, a = self.picture(i)
        s = self.item_size
        if s != PICTURE_SIZE:
            # `random`: seeded per worker by fastai; split 0 (training, or `tta`'s augmented passes) shifts the crop
            rng = random if self.crop == "random" or (self.crop == "center" and self.split_idx == 0) else None
            top, left = crop_offset(PICTURE_SIZE, s, rng), crop_offset(PICTURE_SIZE, s, rng)
            a = a[top:top + s, left:left + s]
        item = (a, int(self.label[j])) if self.with_labels else (a,)
        return item + (i,) if self.with_row else item

    def subset(self, rows):
        "The same dataset over row positions `rows` (e.g. a shard), sharing no counter"
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in ("product_id", "img_idx", "offset", "length", "label"):
            if getattr(self, name) is not None: setattr(new, name, getattr(self, name)[rows])
        new._bad, new._logged = mp.Value("q", 0), 0
        new.reader = BsonReader(self.reader.path)
        return new

    def new_empty(self):
        "Zero rows, for `Learner.export`"
        return self.subset(slice(0, 0))

    def __getstate__(self):
        d = self.__dict__.copy()
        from multiprocessing import context
        if context.get_spawning_popen() is None:  # plain pickling (export): a shared counter can't travel
            d["_bad"] = int(self._bad.value)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        if isinstance(self._bad, int): self._bad = mp.Value("q", self._bad)


class NormalizationError(CdkitError, ValueError):
    "A mean/std that would not normalize: missing half, a zero or negative std, a non-finite value"


def check_normalization(mean, std):
    "NormalizationError naming mean and std unless both are 3 finite numbers and each std > 0"
    import math
    ok = (mean is not None and std is not None and len(mean) == 3 and len(std) == 3
          and all(math.isfinite(float(m)) for m in mean) and all(math.isfinite(float(s)) and s > 0 for s in std))
    if not ok:
        raise NormalizationError(f"normalization mean={shorten(mean)} std={shorten(std)}: both are needed, three "
                                 "finite values each, every std > 0 (the inputs are divided by it)")


def batch_tfms(size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, aug=None, item_size=None):
    """Batch transforms: uint8 -> float, flip/rotate/zoom (training only) with the resize to `size`
    (training and validation), Normalize. Run wherever the batch is (the GPU when the device is CUDA)."""
    check_normalization(mean, std)
    a = aug_params(aug)
    tfms = list(aug_transforms(size=size, do_flip=a.flip, max_rotate=a.max_rotate, min_zoom=1.0, max_zoom=a.max_zoom,
                               max_lighting=a.max_lighting, max_warp=0.0, p_affine=a.p_affine,
                               p_lighting=a.p_lighting, pad_mode=a.pad_mode))
    if size is not None and size != item_size and not any(isinstance(t, AffineCoordTfm) for t in tfms):
        tfms.append(AffineCoordTfm(size=size, pad_mode=a.pad_mode, align_corners=True))  # the resize alone
    return [IntToFloatTensor(), *tfms, Normalize.from_stats(mean, std, cuda=False)]


def category_map(vocab):
    "fastai's CategoryMap of the category ids in class order (what `dls.vocab` is for fastai's interpretation)"
    from fastai.data.transforms import CategoryMap
    return vocab if isinstance(vocab, CategoryMap) else CategoryMap([int(v) for v in vocab], sort=False)


def _device(device):
    return pick_device(device)


def collate_pictures(items, with_labels=True):
    """Items of a PictureDataset -> (TensorImage (b, 3, s, s) uint8[, TensorCategory (b,)][, rows (b,)]).

    Pictures are stacked as they were decoded, (b, s, s, 3), in one contiguous copy (into shared
    memory inside a worker, so the batch crosses to the main process without another copy); the
    batch is that buffer seen as (b, 3, s, s), i.e. channels-last memory, which the batch transforms
    and convolutions take as it is. fastai's collate of per-item (3, s, s) tensors was 3x slower."""
    pics = [it[0] for it in items]
    shape = (len(pics),) + pics[0].shape
    if torch.utils.data.get_worker_info() is not None:
        out = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(np.prod(shape)))).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    np.stack(pics, out=out.numpy())
    res = (TensorImage(out.permute(0, 3, 1, 2)),)
    for k in range(1, len(items[0])):
        t = torch.tensor([it[k] for it in items], dtype=torch.int64)
        res += (TensorCategory(t) if k == 1 and with_labels else t,)
    return res


class PictureDL(TfmdDL):
    """TfmdDL whose items are bare arrays from a PictureDataset, batched by `collate_pictures`.

    Two one-shot hooks serve a mid-epoch resume (`cdkit.train.callbacks.Checkpoint(every=...)`): the next pass
    skips its first `skip_batches` batches without reading them, and sets the global RNG states to
    `resume_rng` just before its first item, where the interrupted pass stood after those batches."""
    skip_batches, resume_rng = 0, None

    def do_item(self, s): return self.create_item(s)  # no per-item transforms: skip the empty Pipeline
    def do_batch(self, b): return collate_pictures(b, self.dataset.with_labels)

    def get_idxs(self):
        """The epoch's order as a numpy array, shuffled with a seed drawn from the loader's rng. fastai's
        own is a Python list shuffled in Python: at 12 M training pictures that is 20 s before every epoch,
        2.4 GB in the main process, and hundreds of MB of copy-on-read pages in every worker that walks it
        (measured by bench/rehearse.py)."""
        n = self.n if self.n is not None else len(self.dataset)
        idxs = (np.random.default_rng(self.rng.getrandbits(64)).permutation(n) if self.shuffle
                else np.arange(n, dtype=np.int64))
        if self.skip_batches:
            idxs = idxs[self.skip_batches * self.bs:]
            self.skip_batches = 0
        return idxs

    def sample(self):
        "This worker's items, whole batches b with b % num_workers == offs, read from the array a batch at a time"
        idxs, bs, workers = self._DataLoader__idxs, self.bs or 1, max(self.num_workers, 1)
        for start in range(self.offs * bs, len(idxs), bs * workers):
            chunk = idxs[start:start + bs]
            yield from (chunk.tolist() if hasattr(chunk, "tolist") else chunk)

    def create_batches(self, samps):
        if self.resume_rng is not None:  # after torch's iterator drew its seed, before the first item
            from cdkit.base.rng import set_rng_state
            set_rng_state(self.resume_rng)
            self.resume_rng = None
        yield from super().create_batches(samps)


class ArrayPictures(PictureDataset):
    """Pictures given in memory (JPEG bytes, file paths, PIL images or (H, W, 3) uint8 arrays), for
    `learn.predict(x)` and `dls.test_dl([x, ...])`; resized to the competition's 180x180 like any picture"""

    def __init__(self, pictures, vocab=None):
        self.pictures = list(pictures)
        n = len(self.pictures)
        self.product_id, self.img_idx = np.full(n, -1, np.int64), np.zeros(n, np.int8)
        self.offset, self.length, self.label = np.zeros(n, np.int64), np.zeros(n, np.int32), None
        self.item_size, self.crop, self.with_labels, self.with_row = PICTURE_SIZE, "center", False, False
        self.split_idx, self.on_bad, self.vocab = 1, "blank", vocab
        self.reader = None
        self._bad, self._logged = mp.Value("q", 0), 0
        self.loss_func = CrossEntropyLossFlat()

    def decode_row(self, i):
        from pathlib import Path
        o = self.pictures[i]
        if isinstance(o, (str, Path)): o = Path(o).read_bytes()
        if isinstance(o, (bytes, bytearray, memoryview)): a = decode_rgb(bytes(o))
        elif hasattr(o, "convert"): a = np.asarray(o.convert("RGB"))  # a PIL image
        else:
            a = np.asarray(o)
            if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3: a = a.transpose(1, 2, 0)  # (3, H, W) tensor
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"picture {i}: expected JPEG bytes, a path, a PIL image or an (H, W, 3) uint8 array, "
                                 f"got {type(o).__name__} {getattr(a, 'dtype', '')} {getattr(a, 'shape', '')}")
        if a.shape[:2] != (PICTURE_SIZE, PICTURE_SIZE):
            from PIL import Image
            a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((PICTURE_SIZE, PICTURE_SIZE), Image.BILINEAR))
        return np.ascontiguousarray(a)

    def subset(self, rows):
        new = ArrayPictures([self.pictures[i] for i in np.arange(len(self))[rows]], self.vocab)
        return new


class PictureDataLoaders(DataLoaders):
    "fastai DataLoaders over pictures, with the bad-picture count and a test loader"
    def new_empty(self):
        "Empty copy for `Learner.export`, keeping classes and the loaders' sizes and statistics"
        res = super().new_empty()
        for name in ("c", "vocab", "cfg"):
            if name in self.__dict__: setattr(res, name, self.__dict__[name])
        return res

    def bad_pictures(self):
        "Pictures that did not decode so far, summed over loaders and worker processes"
        return sum(dl.dataset.bad_pictures for dl in self.loaders if hasattr(dl.dataset, "bad_pictures"))

    def test_dl(self, images, bson_path=None, with_labels=False, bs=None, num_workers=None, rm_type_tfms=None,
                process=None, **kwargs):
        """Deterministic loader with this one's sizes and statistics: over an image table (see `make_test_dl`),
        or over a list of pictures (JPEG bytes, paths, PIL images, arrays), as fastai's `learn.predict` asks.
        `rm_type_tfms` and `process` (fastai's) change nothing here: there are no per-item transforms."""
        c = self.cfg
        workers = self.train.fake_l.num_workers if num_workers is None else num_workers
        if not isinstance(images, pd.DataFrame):
            ds = ArrayPictures(images if isinstance(images, (list, tuple)) else [images], vocab=getattr(self, "vocab", None))
            return picture_dl(ds, bs or self.valid.bs, workers,
                              after_batch=batch_tfms(c["size"], c["mean"], c["std"], c["aug"], c["item_size"]),
                              device=self.device)
        with_labels = with_labels and "label" in images
        return make_test_dl(images, bson_path or c["bson_path"], size=c["size"], item_size=c["item_size"],
                            mean=c["mean"], std=c["std"], aug=c["aug"], bs=bs or self.valid.bs, num_workers=workers,
                            device=self.device, with_labels=with_labels, vocab=getattr(self, "vocab", None), **kwargs)


def picture_dl(dataset, bs=64, num_workers=0, shuffle=False, drop_last=False, after_batch=None, device=None, seed=None):
    "A PictureDL over a PictureDataset; `seed` fixes the shuffle order"
    device = _device(device)
    dl = PictureDL(dataset, bs=bs, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                   after_batch=after_batch or [], device=device, pin_memory=device.type == "cuda")
    if seed is not None: dl.rng = random.Random(seed)
    return dl


def make_dataloaders(images: pd.DataFrame, bson_path, n_classes, valid_mask=None, size=160, item_size=160, bs=64,
                     num_workers=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, aug=None, seed=0, device=None,
                     valid_bs=None, vocab=None, train_mask=None):
    """Training and validation DataLoaders over the pictures of an image table.

    images: table with product_id, img_idx, offset, length, label (and fold, see Prepared.train_images)
    valid_mask: boolean rows of the validation set; default fold == 0 (the saved product split)
    train_mask: boolean rows to train on; default: the rows outside valid_mask that are not fusion-split
    products (fold -2, `Prepared.train_mask`'s rule): the fusion head learns on those, so a backbone
    trained on them would hand it features of pictures it has already fitted
    size: model input side (the batch affine resizes to it); item_size: side of the per-item crop
    aug: AugParams or dict of its fields; seed: shuffle order (augmentations draw from the global
    RNGs, which fastai seeds per worker from torch's; call fastai's set_seed for full repeatability)
    device: where batch transforms run and batches land (default: the GPU when there is one)
    vocab: the category id of each class index (default: the indices); labels show as these
    Returns PictureDataLoaders: `c`/`vocab` set for `vision_learner`, `bad_pictures()`, `test_dl()`."""
    if valid_mask is None:
        if "fold" not in images: raise ValueError("images has no `fold` column: pass valid_mask or use Prepared.train_images()")
        valid_mask = images["fold"].to_numpy() == 0
    valid_mask = np.asarray(valid_mask, bool)
    if len(valid_mask) != len(images): raise ValueError(f"valid_mask has {len(valid_mask)} rows, images {len(images)}")
    if train_mask is None:
        train_mask = ~valid_mask & ((images["fold"].to_numpy() != FUSION_FOLD) if "fold" in images else True)
    train_mask = np.asarray(train_mask, bool)
    if len(train_mask) != len(images): raise ValueError(f"train_mask has {len(train_mask)} rows, images {len(images)}")
    if (train_mask & valid_mask).any():
        raise ValueError(f"train_mask and valid_mask share {int((train_mask & valid_mask).sum())} rows")
    labels = images["label"].to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}")
    aug = aug_params(aug)
    device = _device(device)
    train_ds = PictureDataset(images[train_mask], bson_path, item_size, crop="random", split_idx=0)
    valid_ds = PictureDataset(images[valid_mask], bson_path, item_size, crop="center", split_idx=1)
    train = picture_dl(train_ds, bs, num_workers, shuffle=True, drop_last=len(train_ds) > bs,
                       after_batch=batch_tfms(size, mean, std, aug, item_size), device=device, seed=seed)
    valid = picture_dl(valid_ds, valid_bs or bs, num_workers, after_batch=batch_tfms(size, mean, std, aug, item_size),
                       device=device)
    dls = PictureDataLoaders(train, valid, device=device)
    dls.c = int(n_classes)
    dls.vocab = category_map(range(n_classes) if vocab is None else vocab)
    if len(dls.vocab) != n_classes: raise ValueError(f"vocab has {len(dls.vocab)} entries for {n_classes} classes")
    train_ds.vocab = valid_ds.vocab = dls.vocab  # what fastai's decode, show_batch and interpretation read
    dls.cfg = dict(bson_path=str(bson_path), size=size, item_size=item_size, mean=tuple(mean), std=tuple(std),
                   aug=asdict(aug), n_classes=int(n_classes))
    return dls


def make_test_dl(images: pd.DataFrame, bson_path, size=160, item_size=160, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 aug=None, bs=64, num_workers=0, device=None, with_labels=False, with_row=False, vocab=None):
    """Deterministic loader for prediction: table order, centre crop, the validation transforms.

    Items are (x,) or (x, y) with `with_labels`; `with_row` appends the row position. Bad pictures
    become blank grey pictures (counted in `dl.dataset.bad_pictures`)."""
    ds = PictureDataset(images, bson_path, item_size, crop="center", with_labels=with_labels, with_row=with_row,
                        on_bad="blank", split_idx=1)
    ds.vocab = vocab
    return picture_dl(ds, bs, num_workers, after_batch=batch_tfms(size, mean, std, aug, item_size), device=device)
