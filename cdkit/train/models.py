"""Backbones by name: timm models behind fastai's `vision_learner`, with the study's input sizes.

One factory in front of timm's registry. Study names (`resnet101`, `seresnet50`, `inception_v3`,
`inception_v4`, `xception`) carry the input sizes of the study; any other timm name works with the
model's own defaults; an unknown name fails, listing the close matches. `xception` is timm's
`legacy_xception`: Chollet's original Xception as ported from Cadene's `pretrainedmodels`, the one
Kaggle solutions of 2017 fine-tuned (timm's `xception41/65/71` are the deeper DeepLab variants).

There is no internet on a training machine: pretrained weights come from a local file
(`pretrained_file`, a timm/torch state dict of the ImageNet model), passed to timm as
`pretrained_cfg_overlay=dict(file=...)`; the ImageNet classifier is dropped by timm because the class
count differs. Inputs are normalized exactly once, by the data pipeline's `Normalize` with the
backbone's mean/std (see `ensure_normalized`): fastai adds its own only when `pretrained=True`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from cdkit.base.errors import CdkitError
from cdkit.train.files import ModelFiles

ITEM_SIZE = 180  # pictures are stored at 180x180


@dataclass(frozen=True)
class Backbone:
    "A backbone of the study: timm name and training input size (crop of the 180x180 picture)"
    timm_name: str
    size: int


# The study's table. SE-ResNet-50 and ResNet-101 train on 160x160 random crops of the 180x180
# pictures; Inception and Xception take the full 180x180.
STUDY = {
    "resnet101": Backbone("resnet101", 160),
    "seresnet50": Backbone("seresnet50", 160),
    "inception_v3": Backbone("inception_v3", 180),
    "inception_v4": Backbone("inception_v4", 180),
    "xception": Backbone("legacy_xception", 180),
}


class UnknownArchError(CdkitError, ValueError):
    "A backbone name that is neither a study name nor a timm model; the message lists close matches"


def resolve_arch(name: str) -> Backbone:
    "The study's entry for `name`, or a timm model at its full picture size; unknown names raise"
    import timm
    if name in STUDY:
        return STUDY[name]
    if timm.is_model(name):
        return Backbone(name, ITEM_SIZE)
    known = list(STUDY) + timm.list_models()
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.5)
    raise UnknownArchError(f"unknown backbone '{name}': not a study name ({', '.join(STUDY)}) nor a timm "
                           f"model; close matches: {', '.join(close) or 'none'}")


def norm_stats(arch: str, mean=None, std=None):
    """The input normalization: `mean` and `std` where given, else the (mean, std) the backbone was
    pretrained with (ImageNet or Inception style, from timm's config; ImageNet's when timm has none)"""
    if mean is not None and std is not None: return mean, std
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(resolve_arch(arch).timm_name)
    if cfg is None:
        from cdkit.data.loaders import IMAGENET_MEAN, IMAGENET_STD
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


def _timm_kwargs(pretrained_file):
    if pretrained_file is None:
        return dict(pretrained=False)
    from cdkit.base.paths import resolve
    path = resolve(pretrained_file)
    if not path.exists():
        raise FileNotFoundError(f"pretrained_file {path} not found (there is no download on a training machine)")
    # `source=''` keeps timm on the file even for configs that name the HF hub as their source
    return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), source=""))


def _head_args(head_hidden, head_dropout):
    # head_hidden=0: pool (avg+max), BN, dropout, one Linear to the classes; fastai's default adds a
    # 512-wide hidden layer, a bottleneck for 5,270 classes
    return dict(lin_ftrs=[head_hidden] if head_hidden else [], ps=head_dropout)


def create_model(arch: str, n_classes: int, pretrained_file=None, head_hidden=0, head_dropout=0.25,
                 levels=None) -> nn.Module:
    """The bare model `make_learner` trains (timm body + fastai head), e.g. to reload a state dict.

    `levels`: (level1_of, level2_of, n_level1, n_level2) adds the hierarchy heads (`cdkit.train.hierarchy`)"""
    from fastai.vision.learner import create_timm_model
    model, _ = create_timm_model(resolve_arch(arch).timm_name, n_classes, **_timm_kwargs(pretrained_file),
                                 **_head_args(head_hidden, head_dropout))
    if levels is not None:
        from cdkit.train.hierarchy import add_level_heads
        add_level_heads(model, *levels)
    return model


def ensure_normalized(dls, mean, std):
    """Make the batch pipeline normalize exactly once, with (mean, std).

    The data pipeline normally adds its `Normalize`; a loader without one gets it here. Two, or one
    with other statistics than the backbone expects, is an error rather than a silent mismatch."""
    from fastai.vision.all import Normalize
    norms = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    if not norms:
        dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")
        return
    if len(norms) > 1:
        raise ValueError(f"the data pipeline normalizes {len(norms)} times; expected once")
    got_mean = norms[0].mean.flatten().cpu()
    got_std = norms[0].std.flatten().cpu()
    scale = 255.0 if got_mean.max() > 1.5 else 1.0  # stats given for 0-255 or for 0-1 inputs
    if not (torch.allclose(got_mean / scale, torch.tensor(mean, dtype=got_mean.dtype), atol=1e-3)
            and torch.allclose(got_std / scale, torch.tensor(std, dtype=got_std.dtype), atol=1e-3)):
        raise ValueError(f"the data pipeline normalizes with mean={got_mean.tolist()} std={got_std.tolist()}, "
                         f"the backbone expects mean={list(mean)} std={list(std)}")


def _kit_learner_class():
    from fastai.learner import Learner

    class KitLearner(Learner):
        "fastai's Learner whose `export` writes atomically and gives the learner back whole even when it fails"

        def export(self, fname="export.pkl", pickle_module=None, pickle_protocol=2):
            """fastai's export (the learner without data or optimizer state, for `fastai.learner.load_learner`)
            into the model folder through a temp file: a failed export leaves no broken file and the
            learner keeps its loaders and optimizer"""
            import warnings
            from pathlib import Path
            import cloudpickle
            from fastai.torch_core import rank_distrib
            from cdkit.base.io import atomic_write
            if rank_distrib(): return  # one writer in distributed training
            self._end_cleanup()
            old_dls, state = self.dls, (self.opt.state_dict() if self.opt is not None else None)
            try:
                self.dls, self.opt = self.dls.new_empty(), None
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's note that the model is not checked
                    atomic_write(Path(self.path) / fname, lambda tmp: torch.save(
                        self, tmp, pickle_module=pickle_module or cloudpickle, pickle_protocol=pickle_protocol))
            finally:
                self.dls = old_dls
                self.create_opt()
                if state is not None: self.opt.load_state_dict(state)

    KitLearner.__module__, KitLearner.__qualname__ = __name__, "KitLearner"
    return KitLearner


def __getattr__(name):  # the class is made on first use: importing cdkit.train.models does not import fastai
    if name == "KitLearner":
        globals()["KitLearner"] = cls = _kit_learner_class()
        return cls
    raise AttributeError(name)


def make_learner(dls, arch: str, n_classes: int, pretrained_file=None, mean=None, std=None,
                 head_hidden=0, head_dropout=0.25, levels=None, **learner_kw):
    """A fastai Learner over `dls` with the backbone `arch`, every layer trainable.

    `levels`: (level1_of, level2_of, n_level1, n_level2) adds the hierarchy heads (`cdkit.train.hierarchy`)
    before the optimizer sees the parameters. `learner_kw` go to `vision_learner` (loss_func, metrics,
    cbs, path, wd, ...)."""
    from fastai.vision.learner import vision_learner
    backbone = resolve_arch(arch)
    mean, std = norm_stats(arch, mean, std)
    ensure_normalized(dls, mean, std)
    learn = vision_learner(dls, backbone.timm_name, normalize=False, n_out=n_classes,
                           **_timm_kwargs(pretrained_file), **_head_args(head_hidden, head_dropout), **learner_kw)
    if levels is not None:
        from cdkit.train.hierarchy import add_level_heads
        add_level_heads(learn.model, *levels)
        learn.opt = None  # vision_learner made one over the old head: unfreeze makes it anew
    learn.unfreeze()  # 12M pictures: the whole network is fine-tuned from the first step
    from cdkit.train import models
    learn.__class__ = models.KitLearner  # export() atomic and safe to fail
    return learn


# ---- a trained model on disk: weights + the card that says how to rebuild and feed it ----

@dataclass
class ModelCard:
    "What `load_trained` needs to rebuild a model and what its inputs must look like (model.json)"
    arch: str
    n_classes: int
    size: int                             # model input side
    item_size: int                        # centre crop of the 180x180 picture before resizing to `size`
    mean: tuple
    std: tuple
    head_hidden: int = 0
    head_dropout: float = 0.25
    label_smoothing: float = 0.0          # caps the model's top probability at 1 - eps + eps / n_classes
    epochs_done: int = 0
    base_model: str = ""                  # a fine-tuned model: the model it started from
    hierarchy_weights: Optional[list] = None  # loss weights (category, level 2, level 1); None: no level heads
    n_level1: int = 0                     # outputs of the level heads (0: none), to rebuild them
    n_level2: int = 0

    @property
    def has_level_heads(self) -> bool: return self.n_level1 > 0 and self.n_level2 > 0

    @property
    def max_prob(self) -> float:
        "The highest probability this model can give a class (label smoothing keeps it below 1)"
        return 1.0 - self.label_smoothing + self.label_smoothing / self.n_classes


@dataclass
class Trained:
    "A trained model ready for inference, with its card"
    model: nn.Module                      # eval mode, ends with logits over classes
    card: ModelCard
    model_dir: object
    combine_levels: float = 0.0           # weight of the level heads in the outputs (0: category logits alone)

    def __getattr__(self, name):  # trained.size, trained.mean, ... read the card
        if name in ModelCard.__dataclass_fields__ or name == "max_prob":
            return getattr(self.card, name)
        raise AttributeError(name)


def save_trained(model: nn.Module, model_dir, card: ModelCard):
    "model.pth (state dict, DDP unwrapped) and model.json (the card), each written atomically"
    import json
    from dataclasses import asdict
    from pathlib import Path
    from cdkit.base.io import atomic_write, save_torch
    model_dir = Path(model_dir)
    state = getattr(model, "module", model).state_dict()
    save_torch(state, ModelFiles(model_dir).weights)
    card_json = json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(card).items()}, indent=1)
    atomic_write(ModelFiles(model_dir).card, lambda tmp: Path(tmp).write_text(card_json))
    return model_dir


def read_card(model_dir) -> ModelCard:
    path = ModelFiles(model_dir).card
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the model first (step 03-05 writes model.json beside "
                                "model.pth)")
    from cdkit.base.errors import FileFormatError, read_json
    meta = read_json(path)
    known = set(ModelCard.__dataclass_fields__)
    try:
        card = ModelCard(**{k: v for k, v in meta.items() if k in known})
        card.mean, card.std = tuple(card.mean), tuple(card.std)
    except (AttributeError, TypeError, ValueError) as e:  # JSON, but not a model card (fields missing or of the wrong kind)
        raise FileFormatError(f"{path}: not a model card ({' '.join(str(e).split())[:200]}); retrain the model or "
                              "restore the file") from None
    return card


def load_trained(model_dir, device="cpu", combine_levels=0.0) -> Trained:
    """The model saved by `save_trained` in `model_dir`, in eval mode on `device`.

    `combine_levels` > 0 (a model trained with hierarchy_weights): its outputs reweigh each category by
    its level-1 and level-2 parents' probabilities to that power (`cdkit.train.hierarchy.combine_levels`)."""
    from pathlib import Path
    card = read_card(model_dir)
    if combine_levels < 0:
        raise ValueError(f"combine_levels={combine_levels}: must be >= 0")
    if combine_levels > 0 and not card.has_level_heads:
        raise ValueError(f"combine_levels={combine_levels}: the model in {model_dir} has no level heads (trained "
                         "without hierarchy_weights); use combine_levels=0 for it")
    if combine_levels > 0 and card.hierarchy_weights and min(card.hierarchy_weights[1:]) == 0:
        raise ValueError(f"combine_levels={combine_levels}: the model in {model_dir} was trained with "
                         f"hierarchy_weights={card.hierarchy_weights}, a level head without loss is untrained; "
                         "use combine_levels=0 for it")
    levels = None
    if card.has_level_heads:  # placeholders: the state dict holds the maps
        zeros = torch.zeros(card.n_classes, dtype=torch.long)
        levels = (zeros, zeros, card.n_level1, card.n_level2)
    model = create_model(card.arch, card.n_classes, head_hidden=card.head_hidden, head_dropout=card.head_dropout,
                         levels=levels)
    state = torch.load(ModelFiles(model_dir).weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if combine_levels > 0:
        from cdkit.train.hierarchy import level_heads
        level_heads(model).combine = float(combine_levels)
    model.to(device).eval()
    return Trained(model, card, Path(model_dir), float(combine_levels))
