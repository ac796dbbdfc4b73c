"""cdkit.data.loaders on a small competition-format file whose pictures encode their own label.

Every picture is one flat colour: red = 20 + 40 * label, green = 30 + 60 * img_idx, so a batch can be
checked against the image table pixel by pixel. One product holds a truncated JPEG."""
import io
import logging

import bson
import numpy as np
import pytest
import torch
from fastai.torch_core import TensorCategory, TensorImage

from cdkit.data.bsonfile import build_index, image_table
from cdkit.data.loaders import (IMAGENET_MEAN, IMAGENET_STD, PictureDataset, aug_params, make_dataloaders, make_test_dl,
                        picture_dl)

N_LABELS = 4
CORRUPT = (107, 1)  # (product_id, img_idx) whose JPEG is cut in half; a training product
NO_AUG = dict(flip=False, max_rotate=0.0, max_zoom=1.0)


def colour(label, img_idx):
    return 20 + 40 * label, 30 + 60 * img_idx, 200


def flat_jpeg(rgb, size=180):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(int(c) for c in rgb)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_bson(path, n_products=30, corrupt=CORRUPT):
    "Products 100.. with 1-3 flat pictures each; category_id = 1000 + label"
    with open(path, "wb") as f:
        for pid in range(100, 100 + n_products):
            label = pid % N_LABELS
            pics = [flat_jpeg(colour(label, k)) for k in range(1 + pid % 3)]
            if pid == corrupt[0]: pics[corrupt[1]] = pics[corrupt[1]][: len(pics[corrupt[1]]) // 2]
            f.write(bson.encode({"_id": pid, "imgs": [{"picture": p} for p in pics], "category_id": 1000 + label}))
    return path


def labelled_table(bson_path):
    "Image table with label and fold (every fifth product, by id, is validation; CORRUPT stays in training)"
    t = image_table(build_index(bson_path))
    t["label"] = t["category_id"].to_numpy() - 1000
    t["fold"] = np.where(t["product_id"].to_numpy() % 5 == 0, 0, -1).astype(np.int8)
    return t


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = write_bson(tmp_path_factory.mktemp("data") / "train.bson")
    return path, labelled_table(path)


def decoded_labels(x):
    "Labels read back from the red channel of uint8 (b, 3, h, w) pictures"
    return ((x[:, 0].float().mean((1, 2)) - 20) / 40).round().long()


def test_batch_shapes_types_and_normalization(small):
    path, t = small
    dls = make_dataloaders(t, path, N_LABELS, size=64, item_size=96, bs=8, device="cpu", aug=NO_AUG)
    x, y = dls.one_batch()
    assert type(x) is TensorImage and x.dtype == torch.float32 and x.shape == (8, 3, 64, 64)
    assert type(y) is TensorCategory and y.dtype == torch.int64 and y.shape == (8,)
    assert dls.c == N_LABELS and len(dls.vocab) == N_LABELS
    # without augmentation a flat picture stays flat: x == (rgb / 255 - mean) / std, with rgb its colour
    rgb = torch.tensor([colour(int(l), 0) for l in y], dtype=torch.float32) / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    centre = x[:, :, 32, 32]
    red_expected = (rgb[:, 0] - mean[0]) / std[0]
    assert torch.allclose(centre[:, 0], red_expected, atol=0.05)
    assert (centre[:, 2] - (200 / 255 - mean[2]) / std[2]).abs().max() < 0.05


def test_augmented_batch_keeps_size_and_type(small):
    path, t = small
    dls = make_dataloaders(t, path, N_LABELS, size=48, item_size=160, bs=6, device="cpu",
                           aug=dict(max_rotate=30.0, max_zoom=1.3, p_affine=1.0, max_lighting=0.2))
    x, y = dls.one_batch()
    assert type(x) is TensorImage and x.shape == (6, 3, 48, 48) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    xv, _ = dls.valid.one_batch()
    assert xv.shape == (6, 3, 48, 48)


def test_labels_match_pictures_and_validation_is_fold_0(small):
    path, t = small
    dls = make_dataloaders(t, path, N_LABELS, size=96, item_size=96, bs=5, device="cpu", aug=NO_AUG)
    valid_products = set(t.loc[t["fold"] == 0, "product_id"])
    assert set(dls.valid.dataset.product_id) == valid_products
    assert not valid_products & set(dls.train.dataset.product_id)
    assert len(dls.train.dataset) + len(dls.valid.dataset) == len(t)
    # raw uint8 batches (no batch transforms): every picture's colour is its label's
    for dl, drop in ((dls.train, True), (dls.valid, False)):
        raw = picture_dl(dl.dataset, bs=5, shuffle=True, drop_last=drop, device="cpu", seed=1)
        seen = 0
        for x, y in raw:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 96, 96)
            assert torch.equal(decoded_labels(x), y.as_subclass(torch.Tensor))
            seen += len(y)
        assert seen == (len(dl.dataset) // 5 * 5 if drop else len(dl.dataset))
    # the validation loader keeps table order
    ys = torch.cat([y for _, y in dls.valid])
    assert ys.tolist() == t.loc[t["fold"] == 0, "label"].tolist()


def test_same_seed_same_order(small):
    path, t = small
    orders = []
    for seed in (3, 3, 4):
        dls = make_dataloaders(t, path, N_LABELS, size=32, item_size=32, bs=4, device="cpu", aug=NO_AUG, seed=seed)
        orders.append(torch.cat([y for _, y in dls.train]).tolist())
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_corrupt_picture_is_counted_logged_and_substituted(small, caplog):
    path, t = small
    ds = PictureDataset(t, path, 180, crop="random", split_idx=0)
    row = int(np.flatnonzero((t["product_id"] == CORRUPT[0]) & (t["img_idx"] == CORRUPT[1]))[0])
    with caplog.at_level(logging.WARNING, logger="cdkit.data.loaders"):
        x, y = ds[row]
    assert ds.bad_pictures == 1
    assert f"picture {CORRUPT[1]} of product {CORRUPT[0]}" in caplog.text
    # training: replaced by another picture of the same product (its label, the colour of picture 0 or 2)
    label = t["label"].iloc[row]
    assert y == label and x[90, 90, 0] == pytest.approx(colour(label, 0)[0], abs=3)
    assert x[90, 90, 1] != pytest.approx(colour(label, CORRUPT[1])[1], abs=10)
    for kw in (dict(with_labels=False), dict()):  # prediction and validation: grey, the row's own label
        blank = PictureDataset(t, path, 180, crop="center", **kw)
        item = blank[row]
        assert blank.bad_pictures == 1 and (item[0] == 128).all()
        assert item[1:] == ((label,) if kw == {} else ())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_with_corrupt_picture_and_workers(small, num_workers):
    path, t = small
    n_train = int((t["fold"] != 0).sum())
    bs = 4 if n_train % 4 == 0 else 1  # a full epoch, no dropped last batch: the corrupt row is read
    dls = make_dataloaders(t, path, N_LABELS, size=32, item_size=64, bs=bs, num_workers=num_workers, device="cpu")
    n = 0
    for x, y in dls.train:
        assert x.shape == (bs, 3, 32, 32) and torch.isfinite(x).all()
        n += len(y)
    assert n == n_train
    for _ in dls.valid: pass
    assert dls.bad_pictures() == 1  # counted in the worker processes, read in the main one


def test_all_rows_seen_with_two_workers(small):
    path, t = small
    ds = PictureDataset(t, path, 64, crop="random", with_row=True, split_idx=0)
    dl = picture_dl(ds, bs=7, num_workers=2, shuffle=True, device="cpu", seed=0)
    rows = torch.cat([r for _, _, r in dl])
    assert sorted(rows.tolist()) == list(range(len(t)))
    assert ds.bad_pictures == 1


def test_test_dl_is_deterministic_without_labels(small):
    path, t = small
    dl = make_test_dl(t.drop(columns=["label", "fold"]), path, size=64, item_size=96, bs=7, device="cpu",
                      with_row=True)
    a = [(x.clone(), r.clone()) for x, r in dl]
    b = [(x.clone(), r.clone()) for x, r in dl]
    assert torch.cat([r for _, r in a]).tolist() == list(range(len(t)))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    assert a[0][0].shape == (7, 3, 64, 64)


def test_dls_test_dl_and_learner_fit(small):
    from fastai.learner import Learner
    path, t = small
    dls = make_dataloaders(t, path, N_LABELS, size=32, item_size=64, bs=8, device="cpu")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, N_LABELS))
    learn = Learner(dls, model)  # loss function taken from the dataset
    learn.fit(1, 1e-2)
    preds, targs = learn.get_preds(dl=dls.test_dl(t, with_labels=True))
    assert preds.shape == (len(t), N_LABELS) and torch.equal(targs.as_subclass(torch.Tensor), torch.tensor(t["label"].values))
    assert torch.allclose(preds.sum(1), torch.ones(len(t)), atol=1e-5)
    learn.export(path.parent / "learner.pkl")  # the shared bad-picture counter must not block pickling


def test_bad_inputs_fail_loudly(small):
    path, t = small
    with pytest.raises(ValueError, match="unknown augmentation"):
        aug_params(dict(max_rotation=5))
    with pytest.raises(ValueError, match="exceeds"):
        PictureDataset(t, path, 200)
    with pytest.raises(ValueError, match="labels must lie"):
        make_dataloaders(t, path, 2, device="cpu")
    with pytest.raises(ValueError, match="fold"):
        make_dataloaders(t.drop(columns="fold"), path, N_LABELS, device="cpu")


def test_epoch_order_is_an_array_and_workers_read_whole_batches(small):
    "No Python list of every index (copied into every worker at 12 M pictures): an array, read a batch at a time"
    path, t = small
    ds = PictureDataset(t, path, 64, crop="random", with_row=True, split_idx=0)
    dl = picture_dl(ds, bs=7, num_workers=0, shuffle=True, device="cpu", seed=0)
    idxs = dl.get_idxs()
    assert isinstance(idxs, np.ndarray) and sorted(idxs.tolist()) == list(range(len(t)))
    dl._DataLoader__idxs = idxs
    parts = []
    for w in range(3):  # what each of 3 worker processes would read
        dl.offs, dl.num_workers = w, 3
        parts.append(list(dl.sample()))
    batches = [idxs[i:i + 7].tolist() for i in range(0, len(idxs), 7)]
    for w, got in enumerate(parts):
        assert got == [x for b in batches[w::3] for x in b]
    assert sorted(x for p in parts for x in p) == list(range(len(t)))
