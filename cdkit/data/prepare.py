"""The prepared data set: indices of both BSON files, the validation split and the class map.

Step 02 (`cdkit.steps.prepare`) creates them once (`create_prepared`); every later step loads them
(`load_prepared`), which refuses to run without a split and names step 02. Raw data (the Kaggle
download or `cdkit synth` output) is read-only; everything derived goes to a separate work folder:

    work_dir/train_index.parquet   product index of train.bson
    work_dir/test_index.parquet    product index of test.bson
    work_dir/split.parquet         product_id, fold (0 = validation, -1 = train, -2 = fusion split)
    work_dir/split.json            the settings the split was made with (valid_frac, fusion_frac, seed, n_folds)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from cdkit.base.errors import CdkitError
from cdkit.data.bsonfile import NO_LABEL, BsonReader, build_index, image_table, load_index
from cdkit.data.catalog import Catalog
from cdkit.base.io import makedirs
from cdkit.base.params import changed_params
from cdkit.base.paths import resolve
from cdkit.base.metrics import product_accuracy
from cdkit.data.split import FUSION_FOLD, VALID_FOLD, attach_split, load_split, make_split, save_split, split_settings


@dataclass
class Prepared:
    "The derived data every later step reads: indices, split and catalog of one data set"
    data_dir: Path
    work_dir: Path
    train_index: pd.DataFrame
    test_index: pd.DataFrame | None
    split: pd.DataFrame
    catalog: Catalog

    @property
    def train_bson(self):
        return self.data_dir / "train.bson"

    @property
    def test_bson(self):
        return self.data_dir / "test.bson"

    def train_images(self):
        """Image table of train.bson with `label` (class index) and `fold` columns; products without
        pictures have no rows"""
        t = image_table(self.train_index)
        t["label"] = self.catalog.to_class(t["category_id"].to_numpy())
        t["fold"] = attach_split(t, self.split)
        return t

    def test_images(self):
        return image_table(self.test_index)

    def valid_mask(self, table) -> np.ndarray:
        "Rows of a product index or image table of train.bson that are validation products"
        return attach_split(table, self.split) == VALID_FOLD

    def fusion_mask(self, table) -> np.ndarray:
        "Rows of train.bson's tables that are fusion-split products (kept from the backbones for the fusion head)"
        return attach_split(table, self.split) == FUSION_FOLD

    def train_mask(self, table) -> np.ndarray:
        "Rows of train.bson's tables that the backbones train on: neither validation nor fusion products"
        fold = attach_split(table, self.split)
        return (fold != VALID_FOLD) & (fold != FUSION_FOLD)

    @property
    def n_fusion(self) -> int:
        "Products in the fusion split (0: step 02 ran without fusion_frac)"
        return int((self.split["fold"].to_numpy() == FUSION_FOLD).sum())

    def images(self, split):
        """(image table, bson path) of the validation pictures ('valid'), the fusion split's ('fusion',
        train products no backbone trained on) or the test pictures ('test')"""
        if split in ("valid", "fusion"):
            t = self.train_images()
            fold = VALID_FOLD if split == "valid" else FUSION_FOLD
            return t[t["fold"] == fold].reset_index(drop=True), self.train_bson
        if split == "test":
            return self.test_images(), self.test_bson
        raise ValueError(f"split must be 'valid', 'fusion' or 'test', got {split!r}")

    def truth(self, split) -> Optional[pd.Series]:
        """True class per product_id: validation products from train.bson and the split; test products
        from test_truth.csv (synthetic data only, else None)"""
        if split in ("valid", "fusion"):
            idx = self.train_index
            sel = self.split["fold"].to_numpy() == (VALID_FOLD if split == "valid" else FUSION_FOLD)
            return pd.Series(self.catalog.to_class(idx["category_id"].to_numpy()[sel]),
                             index=idx["product_id"].to_numpy()[sel])
        t = self.test_truth()
        if t is None:
            return None
        return pd.Series(self.catalog.to_class(t["category_id"].to_numpy()), index=t["_id"].to_numpy(np.int64))

    def accuracy(self, product_id, pred_class, split) -> float:
        "Product accuracy of predictions against the split's truth (NaN where the truth is unknown)"
        true = self.truth(split)
        if true is None:
            return float("nan")
        return product_accuracy(np.asarray(pred_class), true.reindex(np.asarray(product_id)).to_numpy())

    def reader(self, which="train"):
        return BsonReader(self.train_bson if which == "train" else self.test_bson)

    def test_truth(self):
        "True test labels of a synthetic data set (test_truth.csv), or None for the real data"
        p = self.data_dir / "test_truth.csv"
        return pd.read_csv(p) if p.exists() else None


class DataSetError(CdkitError, ValueError):
    "The data set breaks what the competition guarantees and later steps rely on; the message names file, product, count"


def _ids_of(values, n=5) -> str:
    return ", ".join(str(int(v)) for v in np.asarray(values)[:n])


def check_data(data_dir, indices, catalog=None):
    """What step 02 accepts, the later steps can use: products in train.bson and test.bson (test a file of
    its own, not train again), ids non-negative (the competition's start at 0), test ids disjoint from train ids, at most `MAX_PICTURES`
    pictures a product (img_idx is int8), every train product labelled with a category of
    category_names.csv. DataSetError naming the file, the products and how many otherwise."""
    from cdkit.data.bsonfile import MAX_PICTURES
    train_path, test_path = data_dir / "train.bson", data_dir / "test.bson"
    if indices.get("test") is None:
        raise DataSetError(f"{test_path} not found: the data set needs the test products (the competition's "
                           "test.bson, or `python -m cdkit synth` output) to predict and submit")
    import os
    if os.path.samefile(train_path, test_path):
        raise DataSetError(f"{test_path} is the same file as {train_path} (a link): the test set must be its own file")
    for name, path in (("train", train_path), ("test", test_path)):
        idx = indices[name]
        if not len(idx):
            raise DataSetError(f"{path} holds no product: {name}.bson must hold the competition's {name} products")
        pid = idx["product_id"].to_numpy()
        bad = pid < 0  # the competition's train ids start at 0
        if bad.any():
            raise DataSetError(f"{path}: {int(bad.sum()):,} product _id(s) are negative, e.g. {_ids_of(pid[bad])}")
        n = idx["n_imgs"].to_numpy()
        many = n > MAX_PICTURES
        if many.any():
            raise DataSetError(f"{path}: {int(many.sum()):,} product(s) have more than {MAX_PICTURES} pictures (the "
                               f"competition's have 1 to 4), e.g. _id {int(pid[many][0])} with {int(n[many][0])}")
    train, test = indices["train"], indices["test"]
    both = np.intersect1d(train["product_id"].to_numpy(), test["product_id"].to_numpy())
    if len(both):
        raise DataSetError(f"{test_path} and {train_path} share {len(both):,} of the test set's {len(test):,} product "
                           f"_id(s), e.g. {_ids_of(both)}: test must hold other products than train (a copy of train?)")
    labelled = train["category_id"].to_numpy() != NO_LABEL
    if not labelled.all():
        raise DataSetError(f"{train_path}: {int((~labelled).sum()):,} product(s) have no category_id, e.g. _id "
                           f"{_ids_of(train['product_id'].to_numpy()[~labelled])}")
    if catalog is not None:
        known = np.isin(train["category_id"].to_numpy(), catalog.category_ids)
        if not known.all():
            cats = np.unique(train["category_id"].to_numpy()[~known])
            raise DataSetError(f"{train_path}: {int((~known).sum()):,} product(s) carry {len(cats):,} category_id(s) "
                               f"missing from {data_dir / 'category_names.csv'}, e.g. {_ids_of(cats)} (product _id "
                               f"{_ids_of(train['product_id'].to_numpy()[~known], 3)})")


def check_split(split, split_path, fusion_frac=0.0):
    "Every part of the split that later steps need holds products: validation, training, fusion (when asked for)"
    fold = split["fold"].to_numpy()
    parts = [("validation", fold == VALID_FOLD, "valid_frac, or more products per category")]
    if (fold > VALID_FOLD).any():  # K folds: each fold validates in turn, every product trains elsewhere
        parts = []
    else:
        parts.append(("training", (fold != VALID_FOLD) & (fold != FUSION_FOLD), "valid_frac + fusion_frac"))
        if fusion_frac:
            parts.append(("fusion", fold == FUSION_FOLD, "fusion_frac, or categories with 3 or more products"))
    for what, sel, lever in parts:
        if not sel.any():
            raise DataSetError(f"{split_path}: the {what} split holds no product ({len(fold):,} products in all): "
                               f"change {lever}; a category with one product always trains")


class SplitMissingError(CdkitError, FileNotFoundError):
    "The work folder has no split: step 02 has not run on this data"


def _indices(data_dir, work_dir, force, log):
    "Build or reuse the index of each BSON file; an index is reused only if it matches its source"
    from cdkit.data.bsonfile import index_matches
    indices = {}
    for name in ("train", "test"):
        bson_path, idx_path = data_dir / f"{name}.bson", work_dir / f"{name}_index.parquet"
        if not bson_path.exists():
            indices[name] = None
            continue
        ok, why = index_matches(idx_path, bson_path) if idx_path.exists() and not force else (False, "")
        if ok:
            indices[name] = load_index(idx_path)
            log(f"reusing {idx_path} ({len(indices[name]):,} products)")
        else:
            if why:
                log(f"rebuilding {idx_path}: {why}")
            indices[name], stats = build_index(bson_path, out=idx_path, return_stats=True)
            log(stats.summary())
    return indices


def _check_data_dir(data_dir):
    from cdkit.base.io import check_complete
    if not (data_dir / "train.bson").exists():
        from cdkit.data.synth import SYNTH_WORDS
        if any(w in data_dir.name.lower() for w in SYNTH_WORDS):  # a folder meant for synthetic data
            raise FileNotFoundError(f"{data_dir / 'train.bson'} not found: generate the synthetic data with "
                                    f"`cdkit synth {data_dir}` (or run step 01)")
        # never advise made-up data for a folder meant for the download
        raise FileNotFoundError(f"{data_dir / 'train.bson'} not found: download the competition files there "
                                "(README, 'The real data'; in a Kaggle notebook, attach the competition's data); "
                                "for a synthetic run instead, give data_dir=data/demo (make demo writes it)")
    check_complete(data_dir)


def _prepared(data_dir, work_dir, split, indices):
    train = indices["train"]
    if train is None or not len(train):
        raise DataError(f"{data_dir / 'train.bson'} holds no products: an empty or damaged file; download it again")
    catalog = Catalog.from_csv(data_dir / "category_names.csv")
    check_data(data_dir, indices, catalog)
    if len(split) != len(train) or not np.array_equal(split["product_id"].to_numpy(), train["product_id"].to_numpy()):
        raise DataError(f"{work_dir / 'split.parquet'} was made for another train index: run step 02 again "
                         "with force=True (every model must then be retrained on the new split)")
    return Prepared(data_dir, work_dir, train, indices["test"], split, catalog)


def create_prepared(data_dir, work_dir, valid_frac=0.1, seed=0, n_folds=None, force=False, log=print,
                    fusion_frac=0.0) -> Prepared:
    """Step 02: build (or reuse) the indices and make the split of the data set in `data_dir`.

    An existing split is never recomputed unless `force`: every model must see the same validation
    products. One made with other settings (valid_frac, fusion_frac, seed, n_folds) is refused, naming
    them: reusing it silently would ignore the new ones."""
    data_dir, work_dir = resolve(data_dir), resolve(work_dir)
    _check_data_dir(data_dir)
    makedirs(work_dir)
    indices = _indices(data_dir, work_dir, force, log)
    split_path = work_dir / "split.parquet"
    settings = dict(valid_frac=valid_frac, fusion_frac=fusion_frac, seed=seed, n_folds=n_folds)
    if split_path.exists() and not force:
        split = load_split(split_path)
        _check_settings(split_path, split, settings)
        check_split(split, split_path, fusion_frac)
        log(f"reusing {split_path}")
    else:
        check_data(data_dir, indices)  # before a split is made of a data set that later steps cannot use
        split = make_split(indices["train"], valid_frac=valid_frac, seed=seed, n_folds=n_folds, fusion_frac=fusion_frac)
        check_split(split, split_path, fusion_frac)
        save_split(split, split_path, settings)
    return _prepared(data_dir, work_dir, split, indices)


class DataError(CdkitError, ValueError):
    "The data set or the split does not hold what step 02 needs: the message names the file"


class SplitSettingsError(CdkitError, ValueError):
    "step 02 asks for a split other than the one in the work folder"


def _check_settings(split_path, split, settings):
    saved = split_settings(split_path)
    if saved is None:  # a split saved before its settings were: only what the folds show can be checked
        has_fusion = bool((split["fold"].to_numpy() == FUSION_FOLD).any())
        saved = {"fusion_frac": "> 0" if has_fusion else 0.0}
        if bool(settings["fusion_frac"]) == has_fusion:
            return
    diff = changed_params(saved, settings, [k for k in settings if k in saved])
    if diff:
        what = ", ".join(f"{k}={a} (now {k}={b})" for k, (a, b) in diff.items())
        raise SplitSettingsError(f"{split_path} was made with {what}: pass force=True to make the split again "
                                 "(every model must then be retrained on it), or step 02's old settings")


def load_prepared(data_dir, work_dir, log=None) -> Prepared:
    """What step 02 made, for every later step: indices (rebuilt if their BSON file changed) and the
    split, which only step 02 creates"""
    data_dir, work_dir = resolve(data_dir), resolve(work_dir)
    _check_data_dir(data_dir)
    split_path = work_dir / "split.parquet"
    if not split_path.exists():
        raise SplitMissingError(f"{split_path} not found: run step 02 first (notebooks/02_prepare_data.ipynb or "
                                f"`python -m cdkit prepare data_dir={data_dir} work_dir={work_dir}`); only step 02 "
                                "makes the validation split, so that every model shares it")
    indices = _indices(data_dir, work_dir, False, log or (lambda *a: None))
    return _prepared(data_dir, work_dir, load_split(split_path), indices)


def summary_table(prep: Prepared) -> pd.DataFrame:
    "One row per file: products, images, categories, validation share"
    rows = []
    for name, idx in (("train", prep.train_index), ("test", prep.test_index)):
        if idx is None:
            continue
        rows.append({"file": name, "products": len(idx), "images": int(idx["n_imgs"].sum()),
                     "imgs/product": round(float(idx["n_imgs"].mean()), 3),
                     "no pictures": int((idx["n_imgs"] == 0).sum()),
                     "categories": int(idx.loc[idx["category_id"] != NO_LABEL, "category_id"].nunique()),
                     "validation products": int((prep.split["fold"] == VALID_FOLD).sum()) if name == "train" else 0,
                     "fusion products": int((prep.split["fold"] == FUSION_FOLD).sum()) if name == "train" else 0})
    return pd.DataFrame(rows).set_index("file")
