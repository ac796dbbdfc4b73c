"""Product-level validation split, computed once and reused by every model.

Stratified by category: each category's products are shuffled with the seed and a `valid_frac`
share of them (rounded, at least one where the category has two or more products) goes to
validation. With `fusion_frac` a further share of each category (taken the same way, after the
validation products, keeping at least one training product) forms the fusion split: train products
that no backbone trains on, where the product-level fusion head (step 06b) learns from the
backbones' features without their overfit. A product lies wholly on one side, so no picture leaks
across. The settings a split was made with are saved beside it (`split.json`), so that step 02 can
refuse to reuse a split made with other settings."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cdkit.base.io import atomic_write

TRAIN = -1
VALID_FOLD = 0  # the hold-out fold: validation products of every step
FUSION_FOLD = -2  # train products held out from the backbones for the fusion head (fusion_frac > 0)


def make_split(index, valid_frac=0.1, seed=0, n_folds=None, fusion_frac=0.0):
    """DataFrame product_id, fold (int8). With n_folds=None, fold 0 is validation, FUSION_FOLD (-2) the
    fusion split (`fusion_frac` of each category) and TRAIN (-1) the rest; with n_folds=K every
    product gets a fold 0..K-1, stratified by category."""
    if n_folds is None and not 0 < valid_frac < 1:
        raise ValueError(f"valid_frac must lie in (0, 1), got {valid_frac}")
    if not 0 <= fusion_frac < 1 or valid_frac + fusion_frac >= 1:
        raise ValueError(f"fusion_frac={fusion_frac} must lie in [0, 1) with valid_frac + fusion_frac < 1 "
                         f"(valid_frac={valid_frac})")
    if n_folds is not None and fusion_frac:
        raise ValueError(f"n_folds={n_folds} contradicts fusion_frac={fusion_frac}: K folds use every product for "
                         "validation in turn, so none is left aside for the fusion head; use the hold-out split")
    if n_folds is not None and (int(n_folds) != n_folds or n_folds < 2):
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds}")
    cats = index["category_id"].to_numpy()
    rng = np.random.default_rng(seed)
    # rank of each product inside its category after a seeded shuffle, vectorized
    order = np.lexsort((rng.random(len(cats)), cats))
    sorted_cats = cats[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cats)) + 1]
    sizes = np.diff(np.r_[starts, len(cats)])
    rank = np.arange(len(cats)) - np.repeat(starts, sizes)
    size_of = np.repeat(sizes, sizes)
    fold = np.empty(len(cats), dtype=np.int8)
    if n_folds is None:
        n_valid = np.where(size_of >= 2, np.maximum(1, np.rint(size_of * valid_frac)), 0)
        # fusion: the next ranks, at least one product where the category can spare it and keep one to train on
        n_fusion = np.where(size_of - n_valid >= 2, np.maximum(1, np.rint(size_of * fusion_frac)), 0) \
            if fusion_frac else np.zeros_like(n_valid)
        n_fusion = np.minimum(n_fusion, np.maximum(size_of - n_valid - 1, 0))
        fold[order] = np.where(rank < n_valid, VALID_FOLD, np.where(rank < n_valid + n_fusion, FUSION_FOLD, TRAIN))
    else:
        # rotate the start per category so that small categories do not all fill fold 0
        offset = np.repeat(rng.integers(0, n_folds, len(sizes)), sizes)
        fold[order] = (rank + offset) % n_folds
    return pd.DataFrame({"product_id": index["product_id"].to_numpy(), "fold": fold})


def valid_mask(split, fold=VALID_FOLD):
    return split["fold"].to_numpy() == fold


def save_split(split, path, settings=None):
    "split.parquet, and the settings it was made with in split.json beside it"
    import json
    from pathlib import Path
    if settings is not None:
        atomic_write(Path(path).with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))
    return atomic_write(path, lambda tmp: split.to_parquet(tmp, index=False))


def load_split(path):
    from cdkit.base.errors import read_parquet
    return read_parquet(path)


def split_settings(path) -> dict | None:
    "The settings a saved split was made with (None: a split saved before they were recorded)"
    from pathlib import Path
    p = Path(path).with_suffix(".json")
    from cdkit.base.errors import read_json
    return read_json(p) if p.exists() else None


def attach_split(table, split):
    "The fold of each row of a product index or image table, by product_id"
    fold = pd.Series(split["fold"].to_numpy(), index=split["product_id"].to_numpy())
    out = fold.reindex(table["product_id"].to_numpy())
    if out.isna().any():
        missing = table["product_id"].to_numpy()[out.isna().to_numpy()]
        raise KeyError(f"{len(missing)} products have no fold in the split (e.g. {missing[:5].tolist()}); "
                       "was the split made from another index?")
    return out.to_numpy().astype(np.int8)
