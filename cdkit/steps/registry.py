"""The steps of the pipeline, in order: each notebook with its step module, its Params class, its
command (`cdkit <command>`) and the params files meant for it. The pipeline runner, the command line,
the report and the tests read this one table."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from cdkit.base.params import ParamsError
from cdkit.base.paths import NOTEBOOKS


@dataclass(frozen=True)
class Step:
    notebook: str                         # notebooks/<notebook>.ipynb
    module: str                           # cdkit.steps.<module>
    params: str                           # its Params class
    command: str                          # `cdkit <command>`
    prefixes: tuple = ()                  # params/<prefix>*.yaml files are for this notebook

    def params_class(self):
        return getattr(importlib.import_module(f"cdkit.steps.{self.module}"), self.params)

    @property
    def path(self) -> Path:
        return NOTEBOOKS / f"{self.notebook}.ipynb"


STEPS = [
    Step("01_explore_data", "explore", "ExploreParams", "explore"),
    Step("02_prepare_data", "prepare", "PrepareParams", "prepare", ("prepare",)),
    Step("03_train_resnet", "train", "TrainParams", "train", ("resnet", "seresnet", "study_resnet", "study_seresnet")),
    Step("04_train_inception", "train", "InceptionTrainParams", "train-inception", ("inception", "study_inception")),
    Step("05_train_xception", "train", "XceptionTrainParams", "train-xception", ("xception", "study_xception")),
    Step("06_predict_tta", "predict", "PredictParams", "predict", ("predict", "study_predict")),
    Step("06b_fusion_head", "fuse", "FuseParams", "fuse", ("fuse",)),
    Step("07_ensemble", "ensemble", "EnsembleParams", "ensemble", ("ensemble", "study_ensemble")),
    Step("08_belief_aggregation", "aggregate", "AggregateParams", "aggregate", ("aggregate", "study_aggregate")),
    Step("09_pseudo_label_finetune", "pseudo", "PseudoParams", "pseudo", ("pseudo", "study_pseudo")),
    Step("10_submit", "submit", "SubmitParams", "submit", ("submit",)),
]


def step_of(notebook) -> Step:
    stem = Path(notebook).stem
    for s in STEPS:
        if s.notebook == stem or s.notebook.split('_')[0] == stem:
            return s
    raise KeyError(f"no step for notebook {notebook!r}")


def params_class(notebook):
    "The Params class of a notebook (by name, e.g. '03_train_resnet')"
    return step_of(notebook).params_class()


def notebook_for_params(path):
    "The notebook a params file is for, from its file name (params/resnet101_full.yaml -> 03_train_resnet)"
    stem = Path(path).stem
    best = None
    for s in STEPS:
        for prefix in s.prefixes:
            if stem.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, s.notebook)
    if best is None:
        raise ParamsError(f"{path}: no notebook takes params files named like this "
                          f"(prefixes: {sorted(p for s in STEPS for p in s.prefixes)})")
    return best[1]
