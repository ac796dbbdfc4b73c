"""The layout of a run folder: where each step writes and the next one reads.

A step never builds another step's path itself; it asks the `RunLayout` of its `run_dir`:

    run_dir/
      params/<step>.yaml                  effective parameters of each step that ran (later steps reuse them)
      models/<name>/                      a trained model (step 03-05) or a fine-tuned one (step 09):
          model.pth, model.json           weights and the model card (cdkit.train.models.save_trained)
          params.yaml, metrics.csv, checkpoints/last.pth   (`RunLayout.model(name)`: cdkit.train.files.ModelFiles)
      preds/<member>_<split>.store        step 06: TTA predictions of a model (split: valid, test)
      preds/<member>_test.shard03of08.store   one machine's shard of it (merged into the store above)
      preds/<model>_<split>.features/     step 06: pooled features of each picture (split: fusion, valid, test)
      models/<model>-fusion/              step 06b: the fusion heads over <model>'s features (fusion.json,
                                          <variant>_seed<s>.pth; `fusion_member`, `is_fusion`, `base_of`)
      preds/ensemble-<stage>_<split>.store    step 07: the ensemble of a stage's members
      products/<stage>_<split>.parquet    step 08: product predictions (product_id, pred_class, category_id, score)
      submission.csv.gz                   step 10
      results.json, figures/, report.md   what each step measured, and the report built from it
      notebooks/<notebook>.ipynb          the executed notebooks of `cdkit demo`

A stage is one pass of steps 06-08: `base` (the trained models) and `pseudo` (step 09 repeats them
with the fine-tuned model in its base model's place)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from typing import Annotated

from pydantic import AfterValidator

from cdkit.base.errors import CdkitError
from cdkit.base.paths import resolve
from cdkit.train.files import ModelFiles

SPLITS = ("valid", "test")
FEATURE_SPLITS = ("fusion", "valid", "test")  # feature stores: the fusion split trains the fusion head
STAGES = ("base", "pseudo")
# Used with fullmatch (`$` would accept a final newline). At most MAX_NAME characters (plus a fusion member's
# "-fusion"): a name becomes file names with suffixes (<name>_test.shard03of08.store), 255 bytes at most.
MAX_NAME = 100
FUSION_SUFFIX = "-fusion"  # step 06b's member over a model's features: <model>-fusion
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}(%s)?" % (MAX_NAME - 1, re.escape(FUSION_SUFFIX)))


def check_name(name: str, what="model name") -> str:
    "A name that can be a file name and is not one the layout reserves"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.startswith("ensemble") or ".shard" in name:
        from cdkit.base.errors import shorten
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


def fusion_member(model) -> str:
    "The ensemble member that the fusion head over `model`'s features predicts as (step 06b)"
    return check_name(f"{model}{FUSION_SUFFIX}")


def is_fusion(member) -> bool:
    "Whether an ensemble member is a fusion head's (step 06b) rather than a trained model's"
    return member.endswith(FUSION_SUFFIX)


def base_of(member) -> str:
    "The model whose features a fusion member fuses; a trained model's member is the model itself"
    return member[:-len(FUSION_SUFFIX)] if is_fusion(member) else member


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

    def model(self, name) -> ModelFiles:
        "The files of a model's folder: weights, card, params, metrics, checkpoint (a fusion member's: its card, heads)"
        return ModelFiles(self.model_dir(name))

    def model_names(self) -> list:
        d = self.root / "models"
        return sorted(p.name for p in d.iterdir() if ModelFiles(p).card.exists()) if d.exists() else []

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
    fusion_member = staticmethod(fusion_member)

    def fusion_card(self, model) -> Path:
        "What step 06b trained and chose over `model`'s features (cdkit.infer.fusion.FusionCard)"
        return self.model(fusion_member(model)).fusion_card

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

    def figure(self, name) -> Path:
        return self.figures / f"{name}.png"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv.gz"

    def notebook(self, name) -> Path:
        "The executed copy of a step's notebook (`cdkit demo`)"
        return self.root / "notebooks" / f"{name}.ipynb"

    @staticmethod
    def top_names() -> frozenset:
        "What the kit writes at the top of a run folder"
        r = RunLayout(Path("."))
        paths = (r.step_params("x").parent, r.model_dir("x").parent, r.store("x", "test").parent,
                 r.products("base", "test").parent, r.figures, r.notebook("x").parent, r.results, r.report,
                 r.submission)
        return frozenset(p.name for p in paths)


# Generations. The files one run of a step writes together (a model's valid and test stores, an
# ensemble's, a stage's products) carry one generation id in their metadata: a store's manifest
# `meta`, a Parquet file's schema metadata. A kill between two writes, or two runs on one folder,
# leaves files of different generations side by side; `check_generation` is the one place that tells,
# and every reader of such a pair goes through it (the pair readers below, or `check_generation`).
GENERATION = "generation"                     # the key in a store's meta
PARQUET_GENERATION = b"cdkit.generation"      # the key in a Parquet file's schema metadata
PARQUET_SPLIT = b"cdkit.split"                # and the split the file holds (a store's meta: "split")


class MixedGenerationError(CdkitError, ValueError):
    "Files that one run of a step writes together come from different runs (a kill between them, two runs)"


def new_generation() -> str:
    "A fresh generation id for the files one run of a step is about to write"
    import uuid
    return uuid.uuid4().hex[:16]


def _meta_tags(meta):
    "(generation, split) a store's or feature store's meta records (None where it records none)"
    meta = meta if isinstance(meta, dict) else {}
    stamp = meta.get("stamp") if isinstance(meta.get("stamp"), dict) else {}
    return meta.get(GENERATION), meta.get("split", stamp.get("split"))


def _parquet(read, path):
    "read(path) of a Parquet file; a truncated or damaged one is a FileFormatError naming it"
    from cdkit.base.errors import FileFormatError
    try:
        return read(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its ArrowIOError an OSError
        raise FileFormatError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]}); it was "
                              "truncated or damaged: rerun the step that writes it") from None


def _table_tags(table):
    "(generation, split) in a Parquet table's (or schema's) metadata"
    schema = getattr(table, "schema", table)
    md = schema.metadata or {}
    return tuple(md[k].decode() if md.get(k) else None for k in (PARQUET_GENERATION, PARQUET_SPLIT))


def _tags_of(path):
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        return _table_tags(_parquet(pq.read_schema, path))
    if path.suffix == ".features":
        from cdkit.infer.features import read_manifest as read_features_manifest
        return _meta_tags(read_features_manifest(path).get("meta"))
    from cdkit.infer.store import read_manifest
    return _meta_tags(read_manifest(path).get("meta"))


def generation_of(path):
    "The generation id a store, feature store or Parquet file was written with (None: written without one)"
    return _tags_of(path)[0]


def _path_split(path):
    "The split a layout file name says it holds (`<name>_<split>.store`, `<stage>_<split>.parquet`), or None"
    m = _SPLIT_NAME.search(Path(path).name)
    return m.group(1) if m else None


_SPLIT_NAME = re.compile(r"_(valid|test|fusion)(?:\.shard\d+of\d+)?\.(?:store|features|parquet)$")


def check_generation(paths, rewrites: str):
    """The generation shared by `paths` (None: all written before generation ids); MixedGenerationError
    naming two files that differ, or a file that holds another split than its name says, and `rewrites`,
    the step (and command) that writes them again"""
    paths = [Path(p) for p in paths]
    return _same([(p, *_tags_of(p)) for p in paths], rewrites)


def same_generation(loaded, rewrites: str):
    "`check_generation` for stores already loaded (a PredStore or FeatureStore: `.path`, `.meta`)"
    return _same([(s.path, *_meta_tags(s.meta)) for s in loaded], rewrites)


def _same(items, rewrites):
    for p, _, split in items:  # a file copied or moved onto another split's name
        named = _path_split(p) if p is not None else None
        if split and named and split != named:
            raise MixedGenerationError(f"{p} holds the {split} split's pictures, not the {named} split's its name "
                                       f"says (a file copied or moved onto another's name): run {rewrites} again "
                                       "to rewrite it")
    (p0, g0, _), rest = items[0], items[1:]
    for p, g, _ in rest:
        if g != g0:
            raise MixedGenerationError(
                f"{p0} (generation {g0 or 'none'}) and {p} (generation {g or 'none'}) were not "
                f"written by one run of {rewrites}: run it again to rewrite both")
    return g0


def rewrites_store(member) -> str:
    "The step that writes a member's stores"
    if is_fusion(member):
        return "step 06b (`cdkit fuse overwrite=true`)"
    return "step 06 (`cdkit predict`)"


def rewrites_ensemble(stage) -> str:
    return "step 07 (`cdkit ensemble`)" if stage == "base" else "step 09 (`cdkit pseudo`)"


def rewrites_products(stage) -> str:
    return "step 08 (`cdkit aggregate`)" if stage == "base" else "step 09 (`cdkit pseudo`)"


def write_products(df, path, generation, split=None):
    """A stage's products as Parquet, atomically, with their generation and split (default: the one its
    name says) in the schema metadata"""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from cdkit.base.io import atomic_write
    split = split or _path_split(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    tags = {PARQUET_GENERATION: generation.encode(), **({PARQUET_SPLIT: split.encode()} if split else {})}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **tags})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def save_products(pp, catalog, path, md5_changed=None, generation=None):
    """Product predictions (`cdkit.infer.aggregate.ProductPredictions`) as `write_products` writes them:
    product_id, n_preds, pred_class, score, category_id (from `catalog`) (+ md5: the lookup changed it),
    with the generation that the stage's valid and test products share"""
    import numpy as np
    df = pp.to_frame()
    df["category_id"] = catalog.to_category(np.maximum(df["pred_class"].to_numpy(), 0))
    if md5_changed is not None:
        df["md5"] = md5_changed
    return write_products(df, path, generation or new_generation())


def check_stores(layout: RunLayout, member) -> str:
    "A member's valid and test stores come from one run of the step that writes them; their generation"
    return check_generation([layout.store(member, s) for s in SPLITS], rewrites_store(member))


def check_ensemble(layout: RunLayout, stage) -> str:
    "A stage's valid and test ensemble stores come from one run of step 07; their generation"
    return check_generation([layout.ensemble_store(stage, s) for s in SPLITS], rewrites_ensemble(stage))


def read_products(layout: RunLayout, stage) -> dict:
    "{split: DataFrame} of a stage's products, refused when valid and test come from different runs"
    import pyarrow.parquet as pq
    paths = {s: layout.products(stage, s) for s in SPLITS}
    for p in paths.values():
        if not p.exists():
            raise FileNotFoundError(f"{p} not found ({rewrites_products(stage)} writes it)")
    # the generation is read from the very tables returned: a file replaced in between cannot slip through
    tables = {s: _parquet(pq.read_table, p) for s, p in paths.items()}
    _same([(paths[s], *_table_tags(t)) for s, t in tables.items()], rewrites_products(stage))
    return {s: t.to_pandas() for s, t in tables.items()}
