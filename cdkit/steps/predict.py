"""Step 06: streaming TTA prediction of every model into prediction stores.

For each model of `models` (run_dir/models/<name>/) and each split (the validation pictures, the
test pictures) the predictor (`cdkit.infer.predict.predict_to_store`, the kit's only inference path: step
09 predicts its fine-tuned model through this step too) writes `RunLayout.store(name, split)`. A
store is reused only when it was predicted by the same model file with the same settings. With
`num_shards > 1` each machine predicts its shard into its own store; the shard that finds every
shard present merges them into the model's store.

With `features=True` the same forward pass also stores each picture's pooled features (the original
view; `RunLayout.features`), and the fusion split's pictures (step 02's fusion_frac) get a
features-only pass: step 06b trains the fusion head on them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from typing import Union

from pydantic import Field, model_validator

from cdkit.steps.entry import step_entry
from cdkit.base.device import pick_device
from cdkit.base.params import ParamsError, RunParams
from cdkit.data.prepare import Prepared, load_prepared
from cdkit.runs import FEATURE_SPLITS, SPLITS, ModelFiles, ModelNames, RunLayout, fusion_member

DEMO_MODELS = ["resnet", "inception", "xception"]
DEMO_MEMBERS = DEMO_MODELS + [fusion_member(m) for m in DEMO_MODELS]  # with the fusion heads of step 06b


class PredictParams(RunParams):
    "Parameters of notebooks/06_predict_tta.ipynb and `cdkit predict`"
    models: ModelNames = Field(default_factory=lambda: list(DEMO_MODELS), min_length=1)  # models in run_dir/models/ (the first is the baseline)
    n_tta: int = Field(1, ge=0, le=63)    # augmented views besides the original (0: no TTA; 1: the study's "TTA (1-2)", the demo's; the kit's full recipe: 4)
    k: int = Field(20, ge=1, le=10000)    # classes kept per picture and view (62 bytes at uint8)
    prob_dtype: str = Field("uint8", pattern="^(uint8|float16|float32)$")  # uint8 (sqrt-quantized), float16 or float32
    bs: int = Field(128, ge=1, le=65536)  # pictures per forward pass
    num_workers: int = Field(2, ge=0, le=256)  # decoding processes
    seed: int = Field(0, ge=0, le=2**32 - 1)  # TTA draws (the same picture always gets the same views)
    shard: int = Field(0, ge=0, le=4095)  # this machine's shard of the pictures ...
    num_shards: int = Field(1, ge=1, le=4096)  # ... out of this many (the last shard to finish merges them)
    device: str = ""                      # cpu, cuda, cuda:1, ...; "": the GPU when there is one
    features: Union[bool, list[str]] = True  # store pooled features (fp16) for step 06b's fusion heads: true (every model), false, or the models to fuse (8 KB a test picture each for ResNet-101)
    combine_levels: float = Field(0.0, ge=0, le=10)  # models trained with hierarchy_weights: category log-probability + this x its parents' (0: the category head alone)

    @model_validator(mode="after")
    def _consistent(self):
        if self.shard >= self.num_shards:
            raise ValueError(f"shard={self.shard} must be below num_shards={self.num_shards}")
        if isinstance(self.features, list) and set(self.features) - set(self.models):
            raise ValueError(f"features={self.features} names models that models={self.models} does not predict")
        return self

    def wants_features(self, model) -> bool:
        return self.features is True or (isinstance(self.features, list) and model in self.features)


@dataclass(frozen=True)
class ViewAccuracy:
    "Product accuracy (mean aggregation) of one model's store of one split"
    one_view: float                       # the original view alone (the study's baseline)
    all_views: float                      # every view (+TTA)
    views: int                            # views the store holds


@dataclass
class PredictResult:
    "The stores of step 06 and each model's product accuracy with one view and with every view"
    stores: dict                          # {(model, split): Path}; shards not yet merged are absent
    accuracy: dict                        # {(model, split): ViewAccuracy} of those stores
    models: list                          # in P.models' order: the first is the baseline
    complete: bool = True                 # False: this shard is done, others are still missing
    written: list = field(default_factory=list)  # stores predicted by this call (the others were current)

    def baseline(self, split) -> ViewAccuracy:
        "The first model on `split`: one view (the study's baseline) and all views (+TTA)"
        return self.accuracy[(self.models[0], split)]

    @property
    def table(self) -> pd.DataFrame:
        "For display: index model; columns '<split> 1 view', '<split> all views', views"
        rows = []
        for m in self.models:
            row = {"model": m}
            for split in SPLITS:
                if (m, split) in self.accuracy:
                    a = self.accuracy[(m, split)]
                    row.update({f"{split} 1 view": a.one_view, f"{split} all views": a.all_views, "views": a.views})
            rows.append(row)
        return pd.DataFrame(rows).set_index("model")


def store_accuracy(store, prep: Prepared, split, views=None) -> float:
    """Product accuracy of one store's rows (the listed views, or all) with mean aggregation, a block of
    products at a time (3.1 M test pictures x 5 views would be 15 M rows at once)"""
    from cdkit.infer.aggregate import aggregate_stores
    pp = aggregate_stores([store], "mean", views=views)
    return prep.accuracy(pp.product_id, pp.pred_class, split)


# (path, inode, size, mtime_ns, ctime_ns) -> sha256: a file is hashed once per process while unchanged; the
# ctime is in the key because a write that keeps the size and sets the mtime back still moves it
_DIGESTS: dict = {}


def file_digest(path) -> str:
    "sha256 of a file's content, cached by its inode, size, mtime and ctime"
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        from cdkit.base.io import file_sha256
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def data_identity(prep: Prepared, split) -> dict:
    """What the pictures of a split are: the BSON file's fingerprint and the sha256 of the split's
    (product_id, img_idx) list (another split, another data set or an edited file changes it)"""
    import hashlib
    import numpy as np
    cache = prep.__dict__.setdefault("_data_identity", {})  # the image table of 12 M pictures: once per split
    if split in cache:
        return cache[split]
    images, bson_path = prep.images(split)
    index = prep.test_index if split == "test" else prep.train_index
    source = (index.attrs.get("source_fingerprint") or {}).get("sha256") if index is not None else None
    h = hashlib.sha256(np.ascontiguousarray(images["product_id"].to_numpy(np.int64)).tobytes())
    h.update(np.ascontiguousarray(images["img_idx"].to_numpy(np.int64)).tobytes())
    cache[split] = dict(bson=source, pictures=h.hexdigest(), n=len(images))
    return cache[split]


# the stamp's fields that say which pictures a store holds; the rest (model, card, settings) is what
# makes the stores of one model one generation
_PICTURE_FIELDS = ("split", "data", "shard", "num_shards")


def _stamp(P: PredictParams, model_dir: Path, split, prep: Prepared = None):
    """What a store must have been predicted with to be reused: the content of model.pth and model.json
    (input size, normalization, classes), the prediction settings, the split and its pictures"""
    w = ModelFiles(model_dir).weights
    stamp = dict(model=str(w), model_sha256=file_digest(w), card_sha256=file_digest(ModelFiles(model_dir).card),
                 split=split, n_views=1 + P.n_tta, k=P.k, prob_dtype=P.prob_dtype, seed=P.seed, shard=P.shard,
                 num_shards=P.num_shards, combine_levels=_combine(P, model_dir))
    if prep is not None:
        stamp["data"] = data_identity(prep, split)
    return stamp


def generation_of_stamp(stamp: dict) -> str:
    """The generation of a model's stores: the same model, card and settings on every split give the same
    id, so a valid store reused beside a test store predicted again still make one pair"""
    import hashlib
    import json
    model = {k: v for k, v in stamp.items() if k not in _PICTURE_FIELDS}
    return hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _store_meta(stamp: dict) -> dict:
    from cdkit.runs import GENERATION
    return {"stamp": stamp, GENERATION: generation_of_stamp(stamp), "rebuild": "step 06 (`cdkit predict`)"}


def _combine(P: PredictParams, model_dir: Path) -> float:
    "combine_levels for this model: P's value where the model has level heads, else 0"
    from cdkit.train.models import read_card
    return P.combine_levels if P.combine_levels and read_card(model_dir).has_level_heads else 0.0


def check_combine(P: PredictParams, layout: RunLayout):
    "combine_levels > 0 needs at least one model trained with hierarchy_weights"
    from cdkit.train.models import read_card
    if P.combine_levels and not any(read_card(layout.model_dir(m)).has_level_heads for m in P.models):
        raise ParamsError(f"combine_levels={P.combine_levels} contradicts models={P.models}: none was trained with "
                          "hierarchy_weights (no level heads to combine); train with hierarchy_weights or set combine_levels=0")


def store_is_current(path, stamp, log=None) -> bool:
    """A complete store exists, its meta matches `stamp` (a retrained model, another card or other settings
    invalidate it) and every chunk matches its checksum; `log` says why a store that exists is rebuilt"""
    from cdkit.base.io import output_current
    from cdkit.infer.store import StoreError, read_manifest, verify_store
    return output_current(path, stamp, read_manifest, verify_store, (StoreError, OSError, ValueError), "predicted", log)


def _device(name):
    return pick_device(name)


def _feature_stamp(stamp: dict) -> dict:
    "What a feature store must have been written with to be reused: the store's stamp but views, k and the like"
    return {k: v for k, v in stamp.items() if k not in ("n_views", "k", "prob_dtype", "seed", "combine_levels")} | {"features": True}


def predict_model(P: PredictParams, prep: Prepared, name, log=print) -> dict:
    """Predict one model's stores (this shard), skipping current ones; merge shards when all are there.
    With P.features also its feature stores (the fusion split's in a features-only pass).
    Returns {split: (path or None, written)}"""
    from cdkit.infer.features import features_current, merge_features
    from cdkit.train.models import load_trained
    from cdkit.infer.predict import Shard, StoreSpec, Views, predict_to_store
    from cdkit.infer.store import merge_stores
    layout = RunLayout.of(P.run_dir)
    model_dir = layout.model_dir(name)
    trained, out = None, {}
    feats = P.wants_features(name)
    splits = [s for s in FEATURE_SPLITS if s != "fusion" or (feats and prep.n_fusion)]
    for split in splits:
        stamp = _stamp(P, model_dir, split, prep)
        fstamp = _feature_stamp(stamp)
        path = layout.store(name, split, P.shard, P.num_shards) if split in SPLITS else None
        fpath = layout.features(name, split, P.shard, P.num_shards) if feats else None
        written = False
        if (path and not store_is_current(path, stamp, log)) or (fpath and not features_current(fpath, fstamp, log)):
            trained = trained or load_trained(model_dir, device=_device(P.device), combine_levels=_combine(P, model_dir))
            images, bson_path = prep.images(split)
            views = Views(1 + P.n_tta, P.seed, trained.size, trained.item_size, trained.mean, trained.std)
            keep = StoreSpec(min(P.k, trained.n_classes), P.prob_dtype, trained.n_classes, _store_meta(stamp), overwrite=True)
            predict_to_store(trained.model, images, bson_path, path, views, keep, Shard(P.shard, P.num_shards),
                             features_path=fpath, features_meta=_store_meta(fstamp), bs=P.bs,
                             num_workers=P.num_workers, device=_device(P.device))
            log(f"{name}: wrote {' and '.join(str(p) for p in (path, fpath) if p)}")
            written = True
        if fpath and P.num_shards > 1:
            shards = [layout.features(name, split, i, P.num_shards) for i in range(P.num_shards)]
            final = layout.features(name, split)
            merged = {**fstamp, "shard": 0, "num_shards": 1}
            if all(features_current(s, {**fstamp, "shard": i}) for i, s in enumerate(shards)) and (
                    written or not features_current(final, merged, log)):
                merge_features(shards, final, meta=_store_meta(merged), overwrite=True)
                log(f"{name}: merged {P.num_shards} feature shards into {final}")
        if path is None:
            continue
        if P.num_shards > 1:
            shards = [layout.store(name, split, i, P.num_shards) for i in range(P.num_shards)]
            final = layout.store(name, split)
            if all(store_is_current(s, {**stamp, "shard": i}) for i, s in enumerate(shards)):
                merged_stamp = {**stamp, "shard": 0, "num_shards": 1}
                if written or not store_is_current(final, merged_stamp, log):
                    merge_stores(shards, final, overwrite=True, meta=_store_meta(merged_stamp))
                    log(f"{name}: merged {P.num_shards} shards into {final}")
                path = final
            else:
                path = None
        out[split] = (path, written)
    return out


@step_entry("predict", saves_params=True)
def run(P: PredictParams, prep: Prepared = None, log=print, save=True) -> PredictResult:
    """Predict every model of P.models on validation and test; the accuracy table of the complete stores.
    `save`: record P as this run folder's step-06 settings (step 09 replays them)"""
    from cdkit.infer.store import load_store
    check_combine(P, RunLayout.of(P.run_dir))
    prep = prep or load_prepared(P.data_dir, P.work_dir)
    stores, written, accuracy = {}, [], {}
    for name in P.models:
        for split, (path, w) in predict_model(P, prep, name, log).items():
            if w:
                written.append((name, split))
            if path is None:
                continue
            stores[(name, split)] = path
            s = load_store(path)
            accuracy[(name, split)] = ViewAccuracy(store_accuracy(s, prep, split, views=[0]),
                                                   store_accuracy(s, prep, split), s.n_views)
    complete = len(stores) == len(P.models) * len(SPLITS)
    return PredictResult(stores, accuracy, list(P.models), complete, written)


def record(run_dir, R: PredictResult, stage="base", step="predict"):
    "The study's rows computed from the first model's own stores: one view (baseline) and all views (+TTA)"
    from cdkit.steps.report import recorder
    rec = recorder(step)
    if not R.complete:
        return
    test, valid, model = R.baseline("test"), R.baseline("valid"), R.models[0]
    rec(run_dir, "study", "baseline", {"test": test.one_view, "valid": valid.one_view, "model": model, "stage": stage})
    rec(run_dir, "study", "+TTA", {"test": test.all_views, "valid": valid.all_views, "model": model,
                                   "views": test.views, "stage": stage})
    rec(run_dir, "06 per model", "product accuracy", R.table.round(4).to_dict(orient="index"))


def plot(R: PredictResult):
    "Test (else validation) product accuracy per model, one view against all views"
    import matplotlib.pyplot as plt
    split = "test" if R.table.filter(like="test").notna().all().all() else "valid"
    t = R.table[[f"{split} 1 view", f"{split} all views"]]
    ax = t.plot.bar(rot=0, figsize=(7, 3.5), title=f"{split} product accuracy per model: one view vs TTA")
    ax.set(ylabel="product accuracy", ylim=(max(0, float(t.min().min()) - 0.1), 1))
    ax.figure.tight_layout()
    plt.close(ax.figure)
    return ax.figure


def what_this_shows(R: PredictResult) -> str:
    if not R.complete:
        return "this shard is done; the merged stores (and their accuracies) appear when every shard has run."
    split = "test" if all((m, "test") in R.accuracy for m in R.models) else "valid"
    gain = {m: R.accuracy[(m, split)].all_views - R.accuracy[(m, split)].one_view for m in R.models}
    parts = ", ".join(f"{m}: {g:+.3f}" for m, g in gain.items())
    return (f"TTA with {R.baseline(split).views} views against the original view alone, {split} product "
            f"accuracy: {parts}. The study measured +0.020 for ResNet-101 with 2 views; a model that gains "
            "nothing here sees little variance between views (small demo models often do).")
