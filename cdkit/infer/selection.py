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


def choose_store(stores: dict, truth: pd.Series):
    """Prediction stores of the same validation pictures (options in order of preference, e.g. a fusion
    head's variants) compared product by product (mean aggregation) inside folds: (the option better on all
    validation products, the option each product is scored with or None when there is one option)"""
    from cdkit.infer.aggregate import aggregate_stores
    options = list(stores)
    if len(options) == 1:
        return options[0], None
    ids = np.unique(stores[options[0]].product_id)
    correct = {}
    for o in options:
        pp = aggregate_stores([stores[o]], "mean")
        got = pd.Series(pp.pred_class, index=pp.product_id).reindex(ids).to_numpy()
        correct[o] = (got == truth.reindex(ids).to_numpy()).astype(float)
    chosen, _, pick, _, _ = choose_per_fold(pd.DataFrame(correct, index=ids), validation_folds(truth.index))
    return chosen, pick


def pick_rows(stores: dict, pick: pd.Series):
    "One store whose rows of each product come from stores[pick[product]] (the stores hold the same pictures)"
    from cdkit.infer.store import align_stores, take_rows
    names = list(stores)
    perms = align_stores([stores[v] for v in names])
    base = take_rows(stores[names[0]], perms[0])
    out_of = pick.reindex(base.product_id).to_numpy()
    for v, perm in zip(names[1:], perms[1:]):
        sel = out_of == v
        other = stores[v]
        base.cls[sel], base.prob[sel], base.rest[sel] = other.cls[perm[sel]], other.prob[perm[sel]], other.rest[perm[sel]]
    return base


def install_choice(candidates: dict, final, chosen, picked=None, prob_dtype="uint8"):
    """Make `final` the store of the `chosen` candidate ({option: temporary store path}), or, given `picked`
    (a store of per-fold picks, see `pick_rows`), that store; the other candidates are removed"""
    from cdkit.base.io import remove, replace_dir, tmp_path
    from cdkit.infer.store import save_store
    if picked is not None:
        tmp = tmp_path(final)
        save_store(picked, tmp, prob_dtype, overwrite=True)
        replace_dir(tmp, final)
    for option, tmp in candidates.items():
        if option == chosen and picked is None:
            replace_dir(tmp, final)
        else:
            remove(tmp)
    return final
