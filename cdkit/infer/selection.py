"""Choices made on validation, made inside folds so that the validation figure they lead to stays honest.

A choice (a variant, a method, a stage) or a fit (ensemble weights) made on all validation products
and then measured on the same products gives an in-sample figure: the best of several noisy figures is
above what the chosen option does on new products. Here the validation products are dealt into folds
(`validation_folds`, a function of the product ids alone, so every step deals the same folds); each
fold's products are scored by what was chosen on the other folds (`choose_per_fold`). The resulting
validation figure is out of fold; what is applied to test is the choice made on all validation.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

N_FOLDS = 5   # folds of the validation products for every nested choice (steps 06b, 07, 08, 10)
SEED = 0      # one fold assignment shared by those steps

# what a validation figure is, for the report's rows
OUT_OF_FOLD = "out of fold"
IN_SAMPLE = "in-sample: chosen on this validation"
HELD_OUT = "held out: nothing fitted or chosen on it"
TEST = "test"


def validation_folds(product_id, n_folds=N_FOLDS, seed=SEED) -> pd.Series:
    """Fold (0..n_folds-1) of each distinct product id, as a Series indexed by product id: a seeded
    permutation of the sorted ids dealt round-robin, so the same products get the same folds in every step"""
    from cdkit.infer.rerank import product_folds
    ids = np.unique(np.asarray(product_id, np.int64))
    n = min(n_folds, len(ids))
    if n < 2:
        raise ValueError(f"{len(ids)} validation product(s): a choice inside folds needs at least 2")
    return pd.Series(product_folds(len(ids), n, seed), index=ids, name="fold")


def choose_per_fold(correct: pd.DataFrame, folds: pd.Series):
    """Options compared on validation, inside folds.

    correct: one row per validation product (index product_id), one column per option (in order of
    preference: ties go to the earlier), 1 where the option is right on the product, 0 where not.
    Returns (chosen, per_fold, pick, honest, in_sample): the option best on all products (applied to
    test); {fold: option best on the other folds}; the option each product is scored with (its fold's);
    the out-of-fold accuracy those picks make; and the accuracy of `chosen` on all products (in-sample)."""
    if correct.index.has_duplicates:
        raise ValueError("correct: a product appears more than once")
    fold = folds.reindex(correct.index)
    if fold.isna().any():
        raise ValueError(f"{int(fold.isna().sum())} product(s) have no fold, e.g. {fold.index[fold.isna()][:3].tolist()}")
    fold = fold.to_numpy(np.int64)
    values = correct.to_numpy(np.float64)
    options = list(correct.columns)

    def best(rows):
        means = values[rows].mean(0) if rows.any() else np.zeros(len(options))
        return options[int(np.flatnonzero(means == means.max())[0])]  # exact ties: the earlier option

    chosen = best(np.ones(len(fold), bool))
    per_fold = {int(f): best(fold != f) for f in np.unique(fold)}
    pick = pd.Series([per_fold[f] for f in fold], index=correct.index, name="option")
    col = np.array([options.index(o) for o in pick])
    honest = float(values[np.arange(len(col)), col].mean()) if len(col) else float("nan")
    in_sample = float(values[:, options.index(chosen)].mean()) if len(col) else float("nan")
    return chosen, per_fold, pick, honest, in_sample
