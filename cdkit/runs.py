"""The layout of a run folder: where each step writes and the next one reads.

A step never builds another step's path itself; it asks the `RunLayout` of its `run_dir`:

    run_dir/
      params/<step>.yaml                  effective parameters of each step that ran (later steps reuse them)
      models/<name>/                      a trained model (step 03-05) or a fine-tuned one (step 09):
          model.pth, model.json           weights and the model card (cdkit.models.save_trained)
          params.yaml, metrics.csv, checkpoints/last.pth
      preds/<member>_<split>.store        step 06: TTA predictions of a model (split: valid, test)
      preds/<member>_test.shard03of08.store   one machine's shard of it (merged into the store above)
      preds/<model>_<split>.features/     step 06: pooled features of each picture (split: fusion, valid, test)
      models/<model>-fusion/              step 06b: the fusion heads over <model>'s features (fusion.json, seed*.pth)
      preds/ensemble-<stage>_<split>.store    step 07: the ensemble of a stage's members
      products/<stage>_<split>.parquet    step 08: product predictions (product_id, pred_class, category_id, score)
      submission.csv.gz                   step 10
      results.json, figures/, report.md   what each step measured, and the report built from it

A stage is one pass of steps 06-08: `base` (the trained models) and `pseudo` (step 09 repeats them
with the fine-tuned model in its base model's place)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from typing import Annotated

from pydantic import AfterValidator

from .paths import resolve

SPLITS = ("valid", "test")
FEATURE_SPLITS = ("fusion", "valid", "test")  # feature stores: the fusion split trains the fusion head
STAGES = ("base", "pseudo")
# Used with fullmatch (`$` would accept a final newline). At most MAX_NAME characters (plus a fusion member's
# "-fusion"): a name becomes file names with suffixes (<name>_test.shard03of08.store), 255 bytes at most.
MAX_NAME = 100
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}(-fusion)?" % (MAX_NAME - 1))


def check_name(name: str, what="model name") -> str:
    "A name that can be a file name and is not one the layout reserves"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.startswith("ensemble") or ".shard" in name:
        from .errors import shorten
        raise ValueError(f"{what} {shorten(name, 60)} must be 1-{MAX_NAME} letters, digits, '_', '.', '-' (not "
                         "starting with 'ensemble', no '.shard')")
    return name


def check_names(names: list) -> list:
    "Model names of an ensemble: each a valid name, none twice"
    for n in names:
        check_name(n, "model")
    if len(set(names)) != len(names):
        raise ValueError(f"models={names} names a model twice")
    return names


# a Params field holding model names (models in run_dir/models/)
ModelNames = Annotated[list[str], AfterValidator(check_names)]


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_stage(stage):
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


@dataclass(frozen=True)
class RunLayout:
    "Paths of one run folder (nothing is created until a step writes)"
    root: Path

    @classmethod
    def of(cls, run_dir) -> "RunLayout":
        return cls(resolve(run_dir))

    # models
    def model_dir(self, name) -> Path:
        return self.root / "models" / check_name(name)

    def model_names(self) -> list:
        d = self.root / "models"
        return sorted(p.name for p in d.iterdir() if (p / "model.json").exists()) if d.exists() else []

    # step 06
    def store(self, member, split, shard=None, num_shards=1) -> Path:
        _check_split(split)
        name = f"{check_name(member)}_{split}"
        if num_shards > 1:
            return self.root / "preds" / f"{name}.shard{shard:02d}of{num_shards:02d}.store"
        return self.root / "preds" / f"{name}.store"

    def features(self, model, split, shard=None, num_shards=1) -> Path:
        if split not in FEATURE_SPLITS:
            raise ValueError(f"split must be one of {FEATURE_SPLITS}, got {split!r}")
        name = f"{check_name(model)}_{split}"
        if num_shards > 1:
            return self.root / "preds" / f"{name}.shard{shard:02d}of{num_shards:02d}.features"
        return self.root / "preds" / f"{name}.features"

    # step 06b
    @staticmethod
    def fusion_member(model) -> str:
        "The ensemble member that the fusion head over `model`'s features predicts as"
        return check_name(f"{model}-fusion")

    # step 07
    def ensemble_store(self, stage, split) -> Path:
        _check_stage(stage), _check_split(split)
        return self.root / "preds" / f"ensemble-{stage}_{split}.store"

    # step 08
    def products(self, stage, split) -> Path:
        _check_stage(stage), _check_split(split)
        return self.root / "products" / f"{stage}_{split}.parquet"

    # bookkeeping
    def step_params(self, step) -> Path:
        return self.root / "params" / f"{step}.yaml"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv.gz"
