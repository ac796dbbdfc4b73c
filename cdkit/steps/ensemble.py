"""Step 07: ensemble the models' stores (all their TTA views) into one distribution per picture.

Member weights are fitted on the validation pictures (log-loss). Test takes the weights fitted on all
of validation; validation is scored out of fold (`cdkit.infer.ensemble.combine_out_of_fold`: each fold of
validation products with weights fitted on the other folds), so the validation store that step 08
aggregates, re-ranks and chooses on holds no in-sample fit. The result is
`RunLayout.ensemble_store(stage, split)`. Stage `base` ensembles the trained models;
step 09 runs this step again as stage `pseudo`, with the fine-tuned model in its base model's place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cdkit.steps.entry import step_entry
from cdkit.base.params import RunParams
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.runs import (SPLITS, ModelNames, RunLayout, is_fusion, new_generation, rewrites_ensemble, rewrites_store,
                    same_generation)
from cdkit.steps.predict import DEMO_MEMBERS, store_accuracy


class EnsembleParams(RunParams):
    "Parameters of notebooks/07_ensemble.ipynb and `cdkit ensemble`"
    models: ModelNames = Field(default_factory=lambda: list(DEMO_MEMBERS), min_length=1)  # members: stores of step 06 (models) and 06b (<model>-fusion)
    stage: Literal["base", "pseudo"] = "base"  # base: steps 06-08 on the trained models; pseudo: step 09's pass
    method: Literal["mean", "geometric", "power"] = "mean"  # how member distributions combine
    p: float = Field(0.5, gt=0, le=4)     # exponent of the power mean (0.5: blend of square roots)
    fit_weights: bool = True              # fit member weights on validation (log-loss); False: equal
    k_out: int = Field(20, ge=1, le=10000)  # classes kept per picture in the ensemble store


@dataclass
class EnsembleResult:
    stage: str
    weights: pd.Series                    # per member
    table: pd.DataFrame                   # index members + 'ensemble' (+ 'ensemble without fusion'); columns valid, test: product accuracy (mean aggregation); valid out of fold
    stores: dict                          # {split: Path} of the ensemble stores
    in_sample: float = float("nan")       # validation accuracy with the weights fitted on all of validation (what the old figure was)
    fold_weights: dict = None             # {fold: weights fitted without that fold's validation products}

    @property
    def accuracy(self) -> pd.Series:
        return self.table.loc["ensemble"]


@step_entry("ensemble", saves_params=True)
def run(P: EnsembleParams, prep: Prepared = None, log=print, save=True) -> EnsembleResult:
    "Ensemble the members' stores; `save`: record P as the run folder's step-07 settings (step 09 replays them)"
    from cdkit.infer.ensemble import combine
    from cdkit.infer.store import load_store, save_store
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    layout = RunLayout.of(P.run_dir)
    members = {split: [load_store(layout.store(m, split)) for m in P.models] for split in SPLITS}
    for i, m in enumerate(P.models):  # each member's valid and test stores from one run of the step that wrote them
        same_generation([members[s][i] for s in SPLITS], rewrites_store(m))
    generation = new_generation()
    valid = members["valid"]
    w = _weights(P, valid, prep)
    table, stores, fold_weights = {}, {}, None
    for split in SPLITS:
        k_out = min(P.k_out, max(s.k for s in members[split]))
        if split == "valid" and _fitted(P, valid):
            ens, fold_weights = _out_of_fold(P, valid, prep, k_out)
        else:
            ens = combine(members[split], weights=w, method=P.method, p=P.p, k_out=k_out)
        ens.meta = dict(ens.meta or {}, members=list(P.models), weights=w.tolist(), method=P.method, stage=P.stage,
                        generation=generation, split=split, rebuild=rewrites_ensemble(P.stage),
                        inputs={m: s.meta.get("generation") for m, s in zip(P.models, members[split])})
        stores[split] = save_store(ens, layout.ensemble_store(P.stage, split), overwrite=True)
        for m, s in zip(P.models, members[split]):
            table.setdefault(m, {})[split] = store_accuracy(s, prep, split)
        table.setdefault("ensemble", {})[split] = store_accuracy(load_store(stores[split]), prep, split)
        log(f"ensemble ({P.stage}, {split}): {stores[split]}")
    # what the fusion members add: the ensemble of the other members alone (weights fitted again), measured only
    plain = [i for i, m in enumerate(P.models) if not is_fusion(m)]
    if 0 < len(plain) < len(P.models):
        wp = _weights(P, [valid[i] for i in plain], prep)
        for split in SPLITS:
            k_out = min(P.k_out, max(members[split][i].k for i in plain))
            if split == "valid" and _fitted(P, plain):  # out of fold, as the ensemble's own figure
                ens, _ = _out_of_fold(P, [valid[i] for i in plain], prep, k_out)
            else:
                ens = combine([members[split][i] for i in plain], weights=wp, method=P.method, p=P.p, k_out=k_out)
            table.setdefault("ensemble without fusion", {})[split] = store_accuracy(ens, prep, split)
    # the figure the weights fitted on all of validation give on validation: in-sample, shown beside the honest one
    in_sample = (store_accuracy(combine(valid, weights=w, method=P.method, p=P.p), prep, "valid")
                 if _fitted(P, valid) else table["ensemble"]["valid"])
    return EnsembleResult(P.stage, pd.Series(w, index=P.models, name="weight"), pd.DataFrame(table).T, stores,
                          in_sample, fold_weights)


def _fitted(P: EnsembleParams, members) -> bool:
    "Whether the weights of these members are fitted on validation (else equal: nothing to keep out of fold)"
    return P.fit_weights and len(members) > 1


def _labels(valid, prep: Prepared) -> np.ndarray:
    return prep.truth("valid").reindex(valid[0].product_id).to_numpy()


def _weights(P: EnsembleParams, valid, prep: Prepared) -> np.ndarray:
    "Member weights: fitted on the validation pictures (log-loss), or equal"
    from cdkit.infer.ensemble import fit_weights
    if _fitted(P, valid):
        return np.asarray(fit_weights(valid, _labels(valid, prep), method=P.method, p=P.p), float)
    return np.full(len(valid), 1 / len(valid))


def _out_of_fold(P: EnsembleParams, valid, prep: Prepared, k_out):
    "The validation ensemble, each fold of products combined with weights fitted on the other folds"
    from cdkit.infer.ensemble import combine_out_of_fold
    from cdkit.infer.selection import validation_folds
    folds = validation_folds(prep.truth("valid").index)
    return combine_out_of_fold(valid, _labels(valid, prep), folds, method=P.method, p=P.p, k_out=k_out)


def record(run_dir, R: EnsembleResult, step="ensemble"):
    from cdkit.steps.report import LEVERS, VALID_IS, recorder
    rec = recorder(step)
    from cdkit.infer.selection import HELD_OUT, IN_SAMPLE, OUT_OF_FOLD
    ens = OUT_OF_FOLD if R.fold_weights else HELD_OUT  # equal weights: nothing was fitted on validation
    if R.stage == "base":
        rec(run_dir, "study", "ensemble (+TTA)", {"test": R.accuracy.get("test"), "valid": R.accuracy.get("valid"),
                                                  VALID_IS: ens, "members": len(R.weights)})
    rec(run_dir, f"07 ensemble ({R.stage})", "weights", R.weights.round(4).to_dict())
    if R.stage == "base" and "ensemble without fusion" in R.table.index:
        for row, name in (("ensemble without fusion", "ensemble of the backbones (mean aggregation)"),
                          ("ensemble", "ensemble with the fusion members (mean aggregation)")):
            rec(run_dir, LEVERS, name, {**R.table.loc[row].round(4).to_dict(), "seeds": 1, VALID_IS: ens})
    rec(run_dir, f"07 ensemble ({R.stage})", "product accuracy", {
        k: {**v, VALID_IS: ens if k.startswith("ensemble") else HELD_OUT}
        for k, v in R.table.round(4).to_dict(orient="index").items()})
    if R.fold_weights:
        rec(run_dir, f"07 ensemble ({R.stage})", "ensemble, weights fitted on all of validation",
            {"valid": round(float(R.in_sample), 4), VALID_IS: IN_SAMPLE})


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
    how = ("weights fitted on validation" if R.fold_weights else "equal weights")
    oof = " (out of fold: each fold's products weighted by the other folds' fit)" if R.fold_weights else ""
    out = (f"{how}: {w}. The ensemble is {d:+.3f} against its best member ({best}) on validation{oof}; "
           + ("it helps." if d > 0 else "it does not help here: a member much weaker than the "
              "others adds noise (the fitted weights show how much each was trusted)."))
    if "ensemble without fusion" in t.index:
        f = t.loc["ensemble", "valid"] - t.loc["ensemble without fusion", "valid"]
        out += (f" The fusion members move the ensemble {f:+.3f} on validation"
                + (" (they help)." if f > 0 else " (they do not help here)."))
    return out
