"""Step 10: the validated submission from the best product predictions, optionally sent to Kaggle.

`source="auto"` takes, of the stages whose products exist (`base` from step 08, `pseudo` from step
09), the one more accurate on the validation products: never chosen by the test set. The better of
several validation figures is above what the chosen stage does on new products, so beside it the
result gives the figure of that choice made inside folds (`cdkit.infer.selection.choose_per_fold`: each fold
of validation products scored by the stage better on the other folds), which is out of fold."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from cdkit.base.errors import read_parquet
from cdkit.base.metrics import product_accuracy
from cdkit.steps.entry import step_entry
from cdkit.base.params import RunParams
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.runs import STAGES, RunLayout, read_products


class SubmitParams(RunParams):
    "Parameters of notebooks/10_submit.ipynb and `cdkit submit`"
    source: Literal["auto", "base", "pseudo"] = "auto"  # products to submit: auto (better on validation), base (step 08) or pseudo (step 09)
    submit: bool = False                  # True: submit to Kaggle (credentials as the kaggle package finds them)
    message: str = Field("cdkit", min_length=1, max_length=500)  # the submission's description on Kaggle
    max_missing: float = Field(0.001, ge=0, le=1)  # share of the test products that may lack a prediction (filled with the most frequent category); more is refused


@dataclass
class SubmitResult:
    path: Path                            # run_dir/submission.csv.gz, validated
    stage: str                            # the products submitted
    valid_accuracy: dict                  # {stage: validation product accuracy} of the candidates
    rows: int
    n_filled: int                         # products without a prediction, given the most frequent category
    test_accuracy: Optional[float]        # against the synthetic test truth (None on the real data)
    submission: pd.DataFrame
    chosen_out_of_fold: float = float("nan")  # source="auto" with 2 stages: validation accuracy of the choice made per fold


def choose_stage(P: SubmitParams, prep: Prepared):
    "(stage, {stage: validation accuracy}) of the products to submit"
    layout = RunLayout.of(P.run_dir)
    present = [s for s in STAGES if layout.products(s, "test").exists() and layout.products(s, "valid").exists()]
    acc = {}
    for s in present:
        v = read_products(layout, s)["valid"]  # refuses valid and test products of different runs
        acc[s] = prep.accuracy(v["product_id"], v["pred_class"], "valid")
    if P.source != "auto":
        if P.source not in present:
            raise FileNotFoundError(f"source={P.source!r}: {layout.products(P.source, 'test')} not found "
                                    f"(step {'08' if P.source == 'base' else '09'} writes it)")
        return P.source, acc
    if not present:
        raise FileNotFoundError(f"no product predictions in {layout.root / 'products'}: run step 08 (and optionally 09) first")
    # a later stage must do better on validation to be submitted
    best = present[0]
    for s in present[1:]:
        if acc[s] > acc[best]:
            best = s
    return best, acc


def choice_out_of_fold(P: SubmitParams, prep: Prepared, stages) -> float:
    """Validation accuracy of choosing among `stages` inside folds of validation products (each fold takes the
    stage better on the other folds; ties to the earlier stage, as `choose_stage`); NaN with fewer than 2"""
    from cdkit.infer.selection import choose_per_fold, validation_folds
    if len(stages) < 2:
        return float("nan")
    layout = RunLayout.of(P.run_dir)
    truth = prep.truth("valid")
    correct = {}
    for s in stages:
        v = read_parquet(layout.products(s, "valid")).set_index("product_id")["pred_class"]
        correct[s] = (v.reindex(truth.index).to_numpy() == truth.to_numpy()).astype(float)
    # a product a stage did not predict counts as wrong for it (NaN never equals a class)
    return choose_per_fold(pd.DataFrame(correct, index=truth.index), validation_folds(truth.index))[3]


@step_entry("submit")
def run(P: SubmitParams, prep: Prepared = None, log=print) -> SubmitResult:
    """Write run_dir/submission.csv.gz from the chosen products, in sample_submission order, validated
    first; products without a prediction get the most frequent train category"""
    from cdkit.submit.submission import check_coverage, fill_missing, kaggle_submit, make_submission, write_submission
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    layout = RunLayout.of(P.run_dir)
    stage, acc = choose_stage(P, prep)
    products = read_products(layout, stage)["test"]
    sample = prep.data_dir / "sample_submission.csv"
    sample_ids = pd.read_csv(sample, usecols=["_id"])["_id"].to_numpy()
    # products for this test set: a test product without pictures cannot be predicted and is not counted
    idx = prep.test_index
    blank = idx["product_id"].to_numpy()[idx["n_imgs"].to_numpy() == 0] if idx is not None else []
    check_coverage(products["product_id"].to_numpy(), np.setdiff1d(sample_ids, blank),
                   f"{layout.products(stage, 'test')} (stage {stage!r})", P.max_missing)
    fallback = int(prep.train_index["category_id"].mode().iloc[0])
    pred, n_filled = fill_missing(products.set_index("product_id")["category_id"], sample_ids, fallback)
    if n_filled:
        log(f"{n_filled} products had no prediction and get the most frequent category {fallback}")
    sub = make_submission(pred.index.to_numpy(), pred.to_numpy(), sample)
    path = write_submission(sub, layout.submission, sample, prep.catalog.category_ids)
    truth = prep.test_truth()
    test_acc = None
    if truth is not None:
        t = truth.set_index("_id")["category_id"].reindex(sub["_id"].to_numpy()).to_numpy()
        test_acc = product_accuracy(sub["category_id"].to_numpy(), t)
    log(f"{path}: {len(sub):,} products from stage {stage!r} (validation accuracy {acc.get(stage, float('nan')):.4f})")
    kaggle_submit(path, P.message, dry_run=not P.submit, sample_submission_path=sample,
                  known_category_ids=prep.catalog.category_ids)
    honest = choice_out_of_fold(P, prep, list(acc)) if P.source == "auto" else float("nan")
    return SubmitResult(path, stage, acc, len(sub), n_filled, test_acc, sub, honest)


def record(run_dir, R: SubmitResult, step="submit"):
    from cdkit.steps.report import VALID_IS, recorder
    rec = recorder(step)
    from cdkit.infer.selection import IN_SAMPLE, OUT_OF_FOLD
    rec(run_dir, "10 submission", "stage submitted", R.stage)
    rec(run_dir, "10 submission", "validation accuracy per stage", R.valid_accuracy)
    if R.chosen_out_of_fold == R.chosen_out_of_fold:  # the submitted figure is the best of several: both kinds
        rec(run_dir, "10 submission", "validation accuracy of the submitted stage",
            {"valid": R.valid_accuracy[R.stage], VALID_IS: IN_SAMPLE})
        rec(run_dir, "10 submission", "validation accuracy of the stage choice made per fold",
            {"valid": R.chosen_out_of_fold, VALID_IS: OUT_OF_FOLD})
    rec(run_dir, "10 submission", "test accuracy (synthetic truth)", R.test_accuracy)
    rec(run_dir, "10 submission", "file", str(R.path))


def what_this_shows(R: SubmitResult) -> str:
    acc = ", ".join(f"{s} {a:.4f}" for s, a in R.valid_accuracy.items())
    t = f" Against the synthetic test truth it scores {R.test_accuracy:.4f}." if R.test_accuracy is not None else ""
    if R.chosen_out_of_fold == R.chosen_out_of_fold:
        t = (f" The best of the stages' figures is chosen on validation; the same choice made per fold of validation "
             f"products scores {R.chosen_out_of_fold:.4f} (out of fold).") + t
    return (f"validation accuracy per stage: {acc}; the submission takes stage {R.stage!r}.{t} The file validated "
            "(ids in sample_submission order, known categories) before it was written.")
