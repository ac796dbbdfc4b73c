"""Kaggle submission files: build in sample_submission order, validate, write atomically, submit.

The competition expects ``_id,category_id`` with one row per test product; we require the exact
order of sample_submission.csv so that a file that validates here is the file Kaggle scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

COMPETITION = "cdiscount-image-classification-challenge"
COLUMNS = ["_id", "category_id"]


class SubmissionError(Exception):
    "A submission that Kaggle would reject or score wrongly; the message names the problem"


def _ids(sample_submission):
    if isinstance(sample_submission, pd.DataFrame): return sample_submission["_id"].to_numpy(np.int64)
    return pd.read_csv(sample_submission, usecols=["_id"])["_id"].to_numpy(np.int64)


def _examples(values, n=5): return ", ".join(str(v) for v in list(values)[:n])


def make_submission(product_ids, category_ids, sample_submission_path):
    "DataFrame _id,category_id in sample_submission order; error naming products without a prediction"
    pred = pd.Series(np.asarray(category_ids, np.int64), index=pd.Index(np.asarray(product_ids, np.int64)))
    if pred.index.has_duplicates:
        raise SubmissionError(f"product ids predicted twice: {_examples(pred.index[pred.index.duplicated()].unique())}")
    ids = _ids(sample_submission_path)
    missing = ~np.isin(ids, pred.index.to_numpy())
    if missing.any():
        raise SubmissionError(f"{missing.sum()} products of the sample submission have no prediction, "
                              f"e.g. {_examples(ids[missing])} (use fill_missing)")
    return pd.DataFrame({"_id": ids, "category_id": pred.loc[ids].to_numpy()})


def fill_missing(pred, sample_ids, fallback_category):
    """Add a `fallback_category` prediction (e.g. the most frequent train category) for every id of
    `sample_ids` missing from `pred` (a Series category_id indexed by product id, or a DataFrame
    _id,category_id). Returns (filled Series, number filled)."""
    if isinstance(pred, pd.DataFrame): pred = pred.set_index("_id")["category_id"]
    sample_ids = np.asarray(sample_ids, np.int64)
    missing = sample_ids[~np.isin(sample_ids, pred.index.to_numpy())]
    if not len(missing): return pred, 0
    extra = pd.Series(np.full(len(missing), int(fallback_category), np.int64), index=pd.Index(missing))
    return pd.concat([pred.astype(np.int64), extra]), len(missing)


def validate_submission(df_or_path, sample_submission_path, known_category_ids):
    "Raise SubmissionError naming the first problem found; returns the DataFrame when valid"
    if isinstance(df_or_path, pd.DataFrame): df = df_or_path
    else:
        try: df = pd.read_csv(df_or_path, dtype=str, keep_default_na=False)
        except Exception as e: raise SubmissionError(f"cannot read {df_or_path}: {e}") from e
    if list(df.columns) != COLUMNS: raise SubmissionError(f"header must be {','.join(COLUMNS)}, got {','.join(map(str, df.columns))}")
    for col in COLUMNS:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() | (num != np.floor(num))
        if bad.any(): raise SubmissionError(f"{bad.sum()} non-integer {col} values, e.g. {_examples(df[col][bad])}")
    got = pd.to_numeric(df["_id"]).to_numpy(np.int64)
    cat = pd.to_numeric(df["category_id"]).to_numpy(np.int64)
    want = _ids(sample_submission_path)
    u, c = np.unique(got, return_counts=True)
    if (c > 1).any(): raise SubmissionError(f"{(c > 1).sum()} duplicate _id values, e.g. {_examples(u[c > 1])}")
    missing = np.setdiff1d(want, got)
    if len(missing): raise SubmissionError(f"{len(missing)} _id values of the sample submission are missing, e.g. {_examples(missing)}")
    extra = np.setdiff1d(got, want)
    if len(extra): raise SubmissionError(f"{len(extra)} _id values are not in the sample submission, e.g. {_examples(extra)}")
    if not np.array_equal(got, want):
        first = int(np.flatnonzero(got != want)[0])
        raise SubmissionError(f"rows are not in sample submission order (first difference at row {first}: "
                              f"_id {got[first]} instead of {want[first]}); build it with make_submission")
    unknown = np.setdiff1d(cat, np.asarray(known_category_ids, np.int64))
    if len(unknown): raise SubmissionError(f"{len(unknown)} unknown category_id values, e.g. {_examples(unknown)}")
    return df


def write_submission(df, path, sample_submission_path, known_category_ids):
    "Validate, then write `path` (.csv.gz) atomically; nothing is written when validation fails"
    from .io import atomic_write
    validate_submission(df, sample_submission_path, known_category_ids)
    gz = "gzip" if str(path).endswith(".gz") else None
    # the compression is named, not inferred: the temporary file's name does not end in .gz
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, compression=gz))


def kaggle_submit(path, message, api=None, dry_run=False, competition=COMPETITION, *, sample_submission_path,
                  known_category_ids):
    """Validate the file at `path`, then submit it with the Kaggle API (unless dry_run).

    `api` defaults to `kaggle.api`, imported here only: importing kaggle authenticates (from
    KAGGLE_API_TOKEN, ~/.kaggle/access_token or kaggle.json) and prints a banner. Credentials are
    never read, printed or logged by this function. Returns the API's response (None on dry_run)."""
    path = Path(path)
    if not path.exists(): raise SubmissionError(f"no submission file at {path}")
    validate_submission(path, sample_submission_path, known_category_ids)
    if dry_run: return None
    if api is None:
        import kaggle
        api = kaggle.api
    return api.competition_submit(str(path), message, competition)


def main(argv=None):
    "`python -m cdkit submit FILE -m MESSAGE --data-dir DIR [--dry-run]`: validate, then submit to Kaggle"
    import argparse
    p = argparse.ArgumentParser(prog="python -m cdkit submit", description=main.__doc__)
    p.add_argument("file", help="submission .csv.gz")
    p.add_argument("-m", "--message", required=True, help="the submission's description on Kaggle")
    p.add_argument("--data-dir", required=True, help="folder with sample_submission.csv and category_names.csv")
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.add_argument("--competition", default=COMPETITION)
    a = p.parse_args(argv)
    from cdkit.catalog import Catalog
    data = Path(a.data_dir)
    known = Catalog.from_csv(data / "category_names.csv").category_ids
    try:
        res = kaggle_submit(a.file, a.message, dry_run=a.dry_run, competition=a.competition,
                            sample_submission_path=data / "sample_submission.csv", known_category_ids=known)
    except SubmissionError as e:
        print(f"refused: {e}")
        return 1
    print(f"{a.file} is valid" + ("" if a.dry_run else f"; submitted to {a.competition}: {res}"))
    return 0
