"""Step 02: index both BSON files, fix the validation split and the class map, once for every model.

Raw data (the Kaggle download or `cdkit synth` output) is read-only; everything derived goes to a
separate work folder:

    work_dir/train_index.parquet   product index of train.bson
    work_dir/test_index.parquet    product index of test.bson
    work_dir/split.parquet         product_id, fold (0 = validation, -1 = train)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .bsonfile import NO_LABEL, BsonReader, build_index, image_table, load_index
from .catalog import Catalog
from .paths import resolve
from .split import attach_split, load_split, make_split, save_split


@dataclass
class PrepareParams:
    "Parameters of notebooks/02_prepare_data.ipynb"
    data_dir: str = "data/demo"           # train.bson, test.bson, category_names.csv
    work_dir: str = "data/demo_prepared"  # where indices and the split go (raw data stays read-only)
    valid_frac: float = 0.1               # share of products held out (demo: 10%; the study held out about 2%)
    seed: int = 0                         # split seed: fixed once, reused by every model
    n_folds: Optional[int] = None         # K folds instead of one hold-out (None: hold-out)
    force: bool = False                   # rebuild indices and split even when they exist


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

    def reader(self, which="train"):
        return BsonReader(self.train_bson if which == "train" else self.test_bson)

    def test_truth(self):
        "True test labels of a synthetic data set (test_truth.csv), or None for the real data"
        p = self.data_dir / "test_truth.csv"
        return pd.read_csv(p) if p.exists() else None


def prepare_data(data_dir, work_dir, valid_frac=0.02, seed=0, n_folds=None, force=False, log=print):
    """Build (or reuse) the indices and the split of the data set in `data_dir`.

    An existing split is never recomputed unless `force`: every model must see the same validation
    products."""
    data_dir, work_dir = resolve(data_dir), resolve(work_dir)
    if not (data_dir / "train.bson").exists():
        raise FileNotFoundError(f"{data_dir / 'train.bson'} not found: generate the demo data with "
                                f"`python -m cdkit synth {data_dir}` or download the competition files there")
    work_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.from_csv(data_dir / "category_names.csv")
    indices = {}
    for name in ("train", "test"):
        bson_path, idx_path = data_dir / f"{name}.bson", work_dir / f"{name}_index.parquet"
        if not bson_path.exists():
            indices[name] = None
            continue
        if idx_path.exists() and not force and idx_path.stat().st_mtime >= bson_path.stat().st_mtime:
            indices[name] = load_index(idx_path)
            log(f"reusing {idx_path} ({len(indices[name]):,} products)")
        else:
            indices[name], stats = build_index(bson_path, out=idx_path, return_stats=True)
            log(stats.summary())
    train = indices["train"]
    labelled = train["category_id"].to_numpy() != NO_LABEL
    if not labelled.all():
        raise ValueError(f"{data_dir / 'train.bson'}: {int((~labelled).sum())} products have no category_id")
    catalog.to_class(train["category_id"].to_numpy())  # every category must be in the catalog
    split_path = work_dir / "split.parquet"
    if split_path.exists() and not force:
        split = load_split(split_path)
        if len(split) != len(train) or not np.array_equal(split["product_id"].to_numpy(), train["product_id"].to_numpy()):
            raise ValueError(f"{split_path} was made for another train index; delete it or pass force=True")
        log(f"reusing {split_path}")
    else:
        split = make_split(train, valid_frac=valid_frac, seed=seed, n_folds=n_folds)
        save_split(split, split_path)
    return Prepared(data_dir, work_dir, train, indices["test"], split, catalog)


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
                     "validation products": int((prep.split["fold"] == 0).sum()) if name == "train" else 0})
    return pd.DataFrame(rows).set_index("file")
