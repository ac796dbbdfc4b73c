"""Step 02: index both BSON files, fix the validation split and the class map, once for every model.

The only step that creates the split: every later step loads it (`cdkit.data.prepare.load_prepared`) and
stops with a message naming this step when it is missing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd
from pydantic import Field, model_validator

from cdkit.steps.entry import step_entry
from cdkit.base.params import DataParams
from cdkit.data.prepare import Prepared, create_prepared, summary_table


class PrepareParams(DataParams):
    "Parameters of notebooks/02_prepare_data.ipynb and `cdkit prepare`"
    valid_frac: float = Field(0.1, gt=0, lt=1)   # share of products held out (demo: 10%; the study held out about 2%)
    seed: int = Field(0, ge=0, le=2**32 - 1)      # split seed: fixed once, reused by every model
    fusion_frac: float = Field(0.15, ge=0, lt=1)  # share of products kept from the backbones for the fusion head (step 06b; 0: no fusion split)
    n_folds: Optional[int] = Field(None, ge=2, le=100)  # K folds instead of one hold-out (None: hold-out)
    force: bool = False                          # rebuild indices and split even when they exist (retrain every model after)

    @model_validator(mode="after")
    def _consistent(self):
        if self.valid_frac + self.fusion_frac >= 1:
            raise ValueError(f"valid_frac={self.valid_frac} + fusion_frac={self.fusion_frac} leave no product to train on")
        if self.n_folds is not None and self.fusion_frac:
            raise ValueError(f"n_folds={self.n_folds} contradicts fusion_frac={self.fusion_frac}: K folds validate on every "
                             "product in turn, none is left aside for the fusion head (use fusion_frac=0 or the hold-out)")
        return self


@dataclass
class PrepareResult:
    prep: Prepared
    summary: pd.DataFrame                 # one row per file: products, images, categories, validation products


@step_entry("prepare")
def run(P: PrepareParams, log=print) -> PrepareResult:
    prep = create_prepared(P.data_dir, P.work_dir, valid_frac=P.valid_frac, seed=P.seed, n_folds=P.n_folds,
                           force=P.force, log=log, fusion_frac=P.fusion_frac)
    return PrepareResult(prep, summary_table(prep))


def per_category(prep: Prepared) -> pd.DataFrame:
    "Train and validation products per category, most frequent first"
    idx = prep.train_index
    valid = prep.valid_mask(idx)
    t = pd.DataFrame({"category_id": idx["category_id"].to_numpy(), "valid": valid})
    out = t.groupby("category_id")["valid"].agg(train=lambda v: int((~v).sum()), valid=lambda v: int(v.sum()))
    return out.sort_values("train", ascending=False)


def plot_split(prep: Prepared, top=40):
    """Products per category on each side of the split: the `top` most frequent categories as bars,
    and the validation share of every category against its size (readable with 5,270 categories)"""
    import matplotlib.pyplot as plt
    t = per_category(prep)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.4))
    t.head(top)[["train", "valid"]].plot.bar(stacked=True, ax=a, logy=True, width=0.85)
    a.set(xticklabels=[], xlabel=f"the {min(top, len(t))} most frequent categories", ylabel="products",
          title="products per category (log scale)")
    size = t["train"] + t["valid"]
    b.scatter(size, t["valid"] / size, s=6, alpha=0.5)
    b.set(xscale="log", xlabel="products in the category", ylabel="validation share",
          title="validation share by category size")
    fig.tight_layout()
    return fig


def what_this_shows(R: PrepareResult) -> str:
    s = R.summary
    v, f = int(s.loc["train", "validation products"]), int(s.loc["train", "fusion products"])
    n = max(int(s.loc["train", "products"]), 1)
    return (f"{v:,} of {n:,} train products ({v / n:.1%}) are held out for validation, stratified by category; every "
            "later step validates on exactly these, and steps 08 and 10 choose between methods on them, never on the "
            "test set." + (f" {f:,} more ({f / n:.1%}) form the fusion split: no backbone trains on them, so the fusion "
                           "head of step 06b learns from features that are not overfit." if f else ""))
