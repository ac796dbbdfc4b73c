"""The files of a model folder (run_dir/models/<name>/), named in one place.

A trained model (steps 03-05, 09) keeps its weights, its card, its effective parameters, its per-epoch
log and its resume checkpoint; a fusion member's folder (step 06b) keeps its card and one set of files
per head (`<variant>_seed<s>`). `cdkit.runs.RunLayout.model(name)` gives the `ModelFiles` of a run's
model; code that holds a model folder already (saving, loading, training) wraps it. No heavy import."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFiles:
    "Paths of one model folder (nothing is created here)"
    dir: Path

    def __post_init__(self):
        object.__setattr__(self, "dir", Path(self.dir))

    @property
    def weights(self) -> Path:
        return self.dir / "model.pth"

    @property
    def card(self) -> Path:
        return self.dir / "model.json"

    @property
    def params(self) -> Path:
        return self.dir / "params.yaml"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.csv"

    @property
    def checkpoint(self) -> Path:
        "The state after the last finished epoch while the model trains (removed when it is finished)"
        return self.dir / "checkpoints" / "last.pth"

    # what the optional loggers and the learning-rate finder of steps 03-05 leave
    @property
    def lr_find(self) -> Path:
        return self.dir / "lr_find.png"

    @property
    def history(self) -> Path:
        return self.dir / "history.csv"

    @property
    def tensorboard(self) -> Path:
        return self.dir / "tensorboard"

    # step 09's fine-tuned model: the pseudo-label weights per round and the products chosen
    @property
    def pseudo_alpha(self) -> Path:
        return self.dir / "alpha.csv"

    @property
    def pseudo_selection(self) -> Path:
        return self.dir / "selection.parquet"

    @staticmethod
    def trained_names() -> tuple:
        "The names a training run leaves in its folder: one of them there means the name is taken"
        f = ModelFiles(Path("."))
        return tuple(p.name for p in (f.card, f.weights, f.metrics, f.checkpoint.parent, f.lr_find, f.history,
                                      f.tensorboard))

    # a fusion member's folder (step 06b)
    @property
    def fusion_card(self) -> Path:
        return self.dir / "fusion.json"

    @staticmethod
    def head_name(variant, seed) -> str:
        return f"{variant}_seed{seed}"

    def head_weights(self, head) -> Path:
        return self.dir / f"{head}.pth"

    def head_metrics(self, head) -> Path:
        return self.dir / f"{head}_metrics.csv"

    def head_checkpoint(self, head) -> Path:
        return self.dir / "checkpoints" / f"{head}.pth"
