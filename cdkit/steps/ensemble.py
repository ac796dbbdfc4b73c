"""Step 07: ensemble the models' stores (all their TTA views) into one distribution per picture.

Member weights are fitted on the validation pictures (log-loss) and applied to validation and test;
the result is `RunLayout.ensemble_store(stage, split)`. Stage `base` ensembles the trained models;
step 09 runs this step again as stage `pseudo`, with the fine-tuned model in its base model's place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..entry import step_entry
from ..params import RunParams
from ..prepare import Prepared, load_prepared
from ..runs import SPLITS, ModelNames, RunLayout
from .predict import DEMO_MEMBERS, store_accuracy


class EnsembleParams(RunParams):
    "Parameters of notebooks/07_ensemble.ipynb and `cdkit ensemble`"
    models: ModelNames = Field(default_factory=lambda: list(DEMO_MEMBERS), min_length=1)  # members: stores of step 06 (models) and 06b (<model>-fusion)
    stage: Literal["base", "pseudo"] = "base"  # base: steps 06-08 on the trained models; pseudo: step 09's pass
    method: Literal["mean", "geometric", "power"] = "mean"  # how member distributions combine
    p: float = Field(0.5, gt=0, le=4)     # exponent of the power mean (0.5: blend of square roots)
    fit_weights: bool = True              # fit member weights on validation (log-loss); False: equal
    k_out: int = Field(20, ge=1)          # classes kept per picture in the ensemble store


@dataclass
class EnsembleResult:
    stage: str
    weights: pd.Series                    # per member
    table: pd.DataFrame                   # index members + 'ensemble' (+ 'ensemble without fusion'); columns valid, test: product accuracy (mean aggregation)
    stores: dict                          # {split: Path} of the ensemble stores

    @property
    def accuracy(self) -> pd.Series:
        return self.table.loc["ensemble"]


@step_entry("ensemble", saves_params=True)
def run(P: EnsembleParams, prep: Prepared = None, log=print, save=True) -> EnsembleResult:
    "Ensemble the members' stores; `save`: record P as the run folder's step-07 settings (step 09 replays them)"
    from ..ensemble import combine
    from ..store import load_store, save_store
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    layout = RunLayout.of(P.run_dir)
    members = {split: [load_store(layout.store(m, split)) for m in P.models] for split in SPLITS}
    valid = members["valid"]
    w = _weights(P, valid, prep)
    table, stores = {}, {}
    for split in SPLITS:
        ens = combine(members[split], weights=w, method=P.method, p=P.p,
                      k_out=min(P.k_out, max(s.k for s in members[split])))
        ens.meta = dict(ens.meta or {}, members=list(P.models), weights=w.tolist(), method=P.method, stage=P.stage)
        stores[split] = save_store(ens, layout.ensemble_store(P.stage, split), overwrite=True)
        for m, s in zip(P.models, members[split]):
            table.setdefault(m, {})[split] = store_accuracy(s, prep, split)
        table.setdefault("ensemble", {})[split] = store_accuracy(load_store(stores[split]), prep, split)
        log(f"ensemble ({P.stage}, {split}): {stores[split]}")
    # what the fusion members add: the ensemble of the other members alone (weights fitted again), measured only
    plain = [i for i, m in enumerate(P.models) if not m.endswith("-fusion")]
    if 0 < len(plain) < len(P.models):
        wp = _weights(P, [valid[i] for i in plain], prep)
        for split in SPLITS:
            ens = combine([members[split][i] for i in plain], weights=wp, method=P.method, p=P.p,
                          k_out=min(P.k_out, max(members[split][i].k for i in plain)))
            table.setdefault("ensemble without fusion", {})[split] = store_accuracy(ens, prep, split)
    return EnsembleResult(P.stage, pd.Series(w, index=P.models, name="weight"), pd.DataFrame(table).T, stores)


def _weights(P: EnsembleParams, valid, prep: Prepared) -> np.ndarray:
    "Member weights: fitted on the validation pictures (log-loss), or equal"
    from ..ensemble import fit_weights
    if P.fit_weights and len(valid) > 1:
        labels = prep.truth("valid").reindex(valid[0].product_id).to_numpy()
        return np.asarray(fit_weights(valid, labels, method=P.method, p=P.p), float)
    return np.full(len(valid), 1 / len(valid))


def record(run_dir, R: EnsembleResult):
    from ..report import LEVERS, record as rec
    if R.stage == "base":
        rec(run_dir, "study", "ensemble (+TTA)", {"test": R.accuracy.get("test"), "valid": R.accuracy.get("valid"),
                                                  "members": len(R.weights)})
    rec(run_dir, f"07 ensemble ({R.stage})", "weights", R.weights.round(4).to_dict())
    if R.stage == "base" and "ensemble without fusion" in R.table.index:
        for row, name in (("ensemble without fusion", "ensemble of the backbones (mean aggregation)"),
                          ("ensemble", "ensemble with the fusion members (mean aggregation)")):
            rec(run_dir, LEVERS, name, {**R.table.loc[row].round(4).to_dict(), "seeds": 1})
    rec(run_dir, f"07 ensemble ({R.stage})", "product accuracy", R.table.round(4).to_dict(orient="index"))


def plot(R: EnsembleResult):
    import matplotlib.pyplot as plt
    ax = R.table.plot.barh(figsize=(7, 3), title=f"members against the ensemble ({R.stage}): product accuracy")
    ax.set(xlabel="product accuracy", xlim=(max(0, float(R.table.min().min()) - 0.1), 1))
    ax.figure.tight_layout()
    plt.close(ax.figure)
    return ax.figure


def what_this_shows(R: EnsembleResult) -> str:
    t = R.table
    best = t.drop(index=[i for i in ("ensemble", "ensemble without fusion") if i in t.index])["valid"].idxmax()
    d = t.loc["ensemble", "valid"] - t.loc[best, "valid"]
    w = ", ".join(f"{m} {x:.2f}" for m, x in R.weights.items())
    out = (f"weights fitted on validation: {w}. The ensemble is {d:+.3f} against its best member ({best}) on "
           "validation; " + ("it helps." if d > 0 else "it does not help here: a member much weaker than the "
                             "others adds noise (the fitted weights show how much each was trusted)."))
    if "ensemble without fusion" in t.index:
        f = t.loc["ensemble", "valid"] - t.loc["ensemble without fusion", "valid"]
        out += (f" The fusion members move the ensemble {f:+.3f} on validation"
                + (" (they help)." if f > 0 else " (they do not help here)."))
    return out
