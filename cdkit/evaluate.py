"""Steps 06-08 and 10 as functions: predict every model, ensemble, aggregate to products, submit.

The notebooks call these; each step reads what the previous one wrote under the pipeline's run
folder and records its headline numbers in run_dir/results.json (cdkit.report):

    run_dir/preds/<model>_{valid,test}.store   06: per model, top-k x (1 + n_tta) views
    run_dir/preds/ensemble_{valid,test}.store  07: one view, the weighted ensemble
    run_dir/products_{valid,test}.parquet      08: product_id, pred_class, category_id, score
    run_dir/products_test_pseudo.parquet       09: the same with the pseudo-label fine-tuned model
    run_dir/submission.csv.gz                  10: validated
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .aggregate import (accuracy_by_level, accuracy_by_n_pictures, belief_aggregate, mean_aggregate,
                        prediction_rows, product_accuracy)
from .paths import resolve
from .prepare import Prepared, prepare_data
from .store import load_store


# ---- parameters of the notebooks (the parameters cells repeat these defaults) ----

@dataclass
class PredictParams:
    "Parameters of notebooks/06_predict_tta.ipynb"
    run_dir: str = "runs/demo"            # the pipeline's run folder: stores go to run_dir/preds/
    models: list = field(default_factory=lambda: ["demo/resnet", "demo/inception", "demo/xception"])  # training runs (runs/<name>)
    runs_dir: str = "runs"                # where the training runs are
    data_dir: str = "data/demo"           # train.bson, test.bson
    work_dir: str = "data/demo_prepared"  # indices and split (step 02)
    n_tta: int = 4                        # augmented views besides the original (0: no TTA)
    k: int = 20                           # classes kept per picture and view (62 bytes at uint8)
    prob_dtype: str = "uint8"             # uint8 (sqrt-quantized), float16 or float32
    bs: int = 128                         # pictures per forward pass
    num_workers: int = 2                  # decoding processes
    seed: int = 0                         # TTA draws (the same picture always gets the same views)
    shard: int = 0                        # this machine's shard of the test pictures ...
    num_shards: int = 1                   # ... out of this many (merge with cdkit.store.merge_stores)


@dataclass
class EnsembleParams:
    "Parameters of notebooks/07_ensemble.ipynb"
    run_dir: str = "runs/demo"            # stores of step 06 are in run_dir/preds/
    models: list = field(default_factory=lambda: ["demo/resnet", "demo/inception", "demo/xception"])  # members
    data_dir: str = "data/demo"
    work_dir: str = "data/demo_prepared"
    method: str = "mean"                  # mean, geometric or power
    p: float = 0.5                        # exponent of the power mean (0.5: blend of square roots)
    fit_weights: bool = True              # fit member weights on validation (log-loss); False: equal
    k_out: int = 20                       # classes kept per picture in the ensemble store


@dataclass
class AggregateParams:
    "Parameters of notebooks/08_belief_aggregation.ipynb"
    run_dir: str = "runs/demo"
    models: list = field(default_factory=lambda: ["demo/resnet", "demo/inception", "demo/xception"])  # members, for rows "all"
    data_dir: str = "data/demo"
    work_dir: str = "data/demo_prepared"
    rows: str = "pictures"                # pictures: one prediction per picture, the weighted ensemble of 07; all: every picture x model x view (the study's wording)
    m: int = 5                            # candidates: union of each prediction's top-m classes
    z: float = 1.96                       # 95% Gaussian interval
    rule: str = "gaussian"                # gaussian (the study) or ratio (the authors' code: 0.5x / 2x)
    score: str = "sum"                    # sum of included probabilities (the study) or their mean
    min_preds: int = 3                    # below this many predictions nothing is excluded
    md5: bool = True                      # test pictures identical to train pictures take their labels
    md5_alpha: float = 1.0                # weight of the train labels in that blend (1: override)
    n_grid: int = 8                       # products shown where belief aggregation excluded a picture


@dataclass
class SubmitParams:
    "Parameters of notebooks/10_submit.ipynb"
    run_dir: str = "runs/demo"
    data_dir: str = "data/demo"           # sample_submission.csv, category_names.csv
    work_dir: str = "data/demo_prepared"
    source: str = "auto"                  # products to submit: auto (better on validation of 08's and 09's), belief or pseudo
    submit: bool = False                  # True: submit to Kaggle (credentials as the kaggle package finds them)
    message: str = "cdkit"                # the submission's description on Kaggle


# ---- shared pieces ----

def model_key(model):
    "File-name-safe key of a training run name ('demo/resnet' -> 'resnet')"
    return Path(model).name


def store_path(run_dir, name, which):
    return resolve(run_dir) / "preds" / f"{name}_{which}.store"


def truth(prep: Prepared, which) -> Optional[pd.Series]:
    """True class per product_id: validation products from train.bson and the split; test products
    from test_truth.csv (synthetic data only, else None)"""
    if which == "valid":
        idx = prep.train_index
        valid = prep.split["fold"].to_numpy() == 0
        return pd.Series(prep.catalog.to_class(idx["category_id"].to_numpy()[valid]),
                         index=idx["product_id"].to_numpy()[valid])
    t = prep.test_truth()
    if t is None:
        return None
    return pd.Series(prep.catalog.to_class(t["category_id"].to_numpy()), index=t["_id"].to_numpy())


def images_for(prep: Prepared, which):
    "(image table, bson path) of the validation pictures or of the test pictures"
    if which == "valid":
        t = prep.train_images()
        return t[t["fold"] == 0].reset_index(drop=True), prep.train_bson
    return prep.test_images(), prep.test_bson


def accuracy_of(pp, true: Optional[pd.Series]):
    "Product accuracy of ProductPredictions against a truth Series (NaN without truth)"
    if true is None:
        return float("nan")
    return float(product_accuracy(pp.pred_class, true.reindex(pp.product_id).to_numpy()))


def aggregate_stores(stores, views=None, method="mean", **kw):
    "ProductPredictions of the rows of `stores` (models) x `views` with mean or belief aggregation"
    r = prediction_rows(stores, views)
    fn = {"mean": mean_aggregate, "belief": belief_aggregate}[method]
    return fn(r.product_id, r.cls, r.prob, r.rest, r.n_classes, **kw), r


# ---- 06: streaming TTA prediction of every model ----

def predict_models(P: PredictParams, prep: Prepared = None, log=print) -> pd.DataFrame:
    """Predict the validation and test pictures with every model of P.models into stores (skipping a
    store that exists), then a table of product accuracies: one view vs all views, mean aggregation"""
    from .predict import predict_to_store
    from .train import load_trained
    prep = prep or prepare_data(P.data_dir, P.work_dir)
    rows = []
    for model in P.models:
        trained = None
        weights = resolve(P.runs_dir) / model / "model.pth"
        stamp = dict(model=str(weights), model_mtime=weights.stat().st_mtime if weights.exists() else None)
        for which in ("valid", "test"):
            path = store_path(P.run_dir, model_key(model), which)
            if not _store_is_current(path, stamp):
                trained = trained or load_trained(resolve(P.runs_dir) / model)
                images, bson_path = images_for(prep, which)
                shard = dict(shard=P.shard, num_shards=P.num_shards) if which == "test" else {}
                predict_to_store(trained.model, images, bson_path, path, n_views=1 + P.n_tta, k=min(P.k, trained.n_classes),
                                 size=trained.size, item_size=trained.item_size, mean=trained.mean, std=trained.std,
                                 n_classes=trained.n_classes, prob_dtype=P.prob_dtype, bs=P.bs,
                                 num_workers=P.num_workers, seed=P.seed, meta=dict(stamp, which=which),
                                 overwrite=True, **shard)
                log(f"{model}: wrote {path}")
        rows.append(model_table_row(P.run_dir, model, prep))
    return pd.DataFrame(rows).set_index("model")


def _store_is_current(path, stamp):
    "A store exists and was predicted by the same model file (a retrained model invalidates it)"
    from .store import StoreError, read_manifest
    try:
        meta = read_manifest(path).get("meta", {})
    except (StoreError, OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in stamp.items())


def model_table_row(run_dir, model, prep):
    "Product accuracy of one model: original view only, and with TTA, on validation and test"
    row = {"model": model}
    for which in ("valid", "test"):
        store = load_store(store_path(run_dir, model_key(model), which))
        true = truth(prep, which)
        row[f"{which} 1 view"] = accuracy_of(aggregate_stores([store], views=[0])[0], true)
        row[f"{which} {store.n_views} views"] = accuracy_of(aggregate_stores([store])[0], true)
    return row


# ---- 07: ensemble ----

def picture_labels(store, prep):
    "True class of each validation picture of a store, in the store's row order"
    return truth(prep, "valid").reindex(store.product_id).to_numpy()


def ensemble_stores(P: EnsembleParams, prep: Prepared = None):
    """Combine the models' stores (all their views) on validation and test, weights fitted on the
    validation pictures; writes run_dir/preds/ensemble_{valid,test}.store. Returns (weights, table)."""
    from .ensemble import combine, fit_weights
    from .store import save_store
    prep = prep or prepare_data(P.data_dir, P.work_dir)
    valid = [load_store(store_path(P.run_dir, model_key(m), "valid")) for m in P.models]
    test = [load_store(store_path(P.run_dir, model_key(m), "test")) for m in P.models]
    if P.fit_weights and len(valid) > 1:
        w = fit_weights(valid, picture_labels(valid[0], prep), method=P.method, p=P.p)
    else:
        w = np.full(len(valid), 1 / len(valid))
    table = []
    for which, stores in (("valid", valid), ("test", test)):
        ens = combine(stores, weights=w, method=P.method, p=P.p, k_out=min(P.k_out, max(s.k for s in stores)))
        save_store(ens, store_path(P.run_dir, "ensemble", which), overwrite=True)
        true = truth(prep, which)
        for m, s in zip(P.models, stores):
            table.append({"which": which, "members": m, "accuracy": accuracy_of(aggregate_stores([s])[0], true)})
        table.append({"which": which, "members": f"ensemble ({P.method})",
                      "accuracy": accuracy_of(aggregate_stores([ens])[0], true)})
    t = pd.DataFrame(table).pivot(index="members", columns="which", values="accuracy")
    return pd.Series(np.asarray(w, float), index=P.models, name="weight"), t


# ---- 08: product aggregation ----

def rows_for(P: AggregateParams, which):
    "The prediction stores whose rows are aggregated: every model's (rows='all') or the ensemble's"
    if P.rows == "all":
        return [load_store(store_path(P.run_dir, model_key(m), which)) for m in P.models]
    if P.rows == "pictures":
        return [load_store(store_path(P.run_dir, "ensemble", which))]
    raise ValueError(f"rows must be 'all' or 'pictures', got {P.rows!r}")


def belief_kwargs(P: AggregateParams):
    return dict(m=P.m, z=P.z, rule=P.rule, score=P.score, min_preds=P.min_preds)


def picture_hashes(prep: Prepared, which):
    "MD5 digests (n, 16) of every picture of train or test, hashed once and cached in work_dir"
    from .bsonfile import BsonReader
    from .io import atomic_write
    from .md5 import hash_pictures
    images = prep.train_images() if which == "train" else prep.test_images()
    cache = prep.work_dir / f"{which}_md5.npy"
    if cache.exists():
        hashes = np.load(cache)
        if hashes.shape[0] == len(images):
            return hashes, images
    hashes = hash_pictures(BsonReader(prep.train_bson if which == "train" else prep.test_bson), images)
    atomic_write(cache, lambda tmp: np.save(open(tmp, "wb"), hashes))
    return hashes, images


def md5_matches(prep: Prepared, log=print):
    "For every test picture, the label distribution of the byte-identical train pictures (if any)"
    from .md5 import md5_label_table, md5_lookup
    train_hashes, train_images = picture_hashes(prep, "train")
    test_hashes, test_images = picture_hashes(prep, "test")
    table = md5_label_table(train_hashes, train_images["label"].to_numpy(), prep.catalog.n_classes)
    match = md5_lookup(test_hashes, table)
    log(f"MD5: {int(match.found.sum())} of {len(match.found)} test pictures are byte-identical to train pictures")
    return match, test_images


def apply_md5_rows(rows, match, test_images, n_classes, alpha=1.0):
    "Blend every prediction row of a test picture found in train with that picture's train labels"
    from .md5 import Md5Match, apply_md5
    key = test_images["product_id"].to_numpy(np.int64) * 256 + test_images["img_idx"].to_numpy(np.int64)
    rkey = rows.product_id.astype(np.int64) * 256 + rows.img_idx.astype(np.int64)
    order = np.argsort(key)
    pos = order[np.searchsorted(key, rkey, sorter=order)]
    m = Md5Match(match.found[pos], match.cls[pos], match.prob[pos], match.n_train[pos])
    cls, prob, rest = apply_md5(rows.cls, rows.prob, rows.rest, m, n_classes, alpha=alpha)
    return cls, prob, rest, int(m.found.sum())


def aggregate_products(P: AggregateParams, prep: Prepared = None, log=print, suffix=""):
    """Mean and belief aggregation on validation and test; the method that is better on validation
    is kept, and on test its rows get the MD5 lookup. Writes run_dir/products_{valid,test}<suffix>.parquet.
    Returns a dict: accuracy {(which, method): acc}, by_pictures and by_level tables, per split the
    ProductPredictions by method and the prediction rows, and `chosen`."""
    prep = prep or prepare_data(P.data_dir, P.work_dir)
    out = {"accuracy": {}, "by_pictures": [], "by_level": []}
    n_pics = {"valid": prep.train_index, "test": prep.test_index}
    for which in ("valid", "test"):
        mean_pp, rows = aggregate_stores(rows_for(P, which), method="mean")
        out[which] = {"mean": mean_pp, "belief": _belief(rows, rows.cls, rows.prob, rows.rest, P)}
        out[f"{which}_rows"] = rows
    chosen = "belief" if _acc(out, prep, "valid", "belief") > _acc(out, prep, "valid", "mean") else "mean"
    out["chosen"] = chosen
    if P.md5:
        rows = out["test_rows"]
        match, test_images = md5_matches(prep, log)
        cls, prob, rest, _ = apply_md5_rows(rows, match, test_images, rows.n_classes, P.md5_alpha)
        out["test"][f"{chosen} + MD5"] = (_belief(rows, cls, prob, rest, P) if chosen == "belief" else
                                          mean_aggregate(rows.product_id, cls, prob, rest, rows.n_classes))
    for which in ("valid", "test"):
        true = truth(prep, which)
        npic = pd.Series(n_pics[which]["n_imgs"].to_numpy(), index=n_pics[which]["product_id"].to_numpy())
        for name, pp in out[which].items():
            out["accuracy"][(which, name)] = accuracy_of(pp, true)
            if true is None:
                continue
            t = true.reindex(pp.product_id).to_numpy()
            out["by_pictures"].append(accuracy_by_n_pictures(pp.pred_class, t, npic.reindex(pp.product_id).to_numpy())
                                      .assign(which=which, method=name))
            out["by_level"].append(accuracy_by_level(pp.pred_class, t, prep.catalog.level1, prep.catalog.level2)
                                   .assign(which=which, method=name))
        final = f"{chosen} + MD5" if which == "test" and P.md5 else chosen
        save_products(out[which][final], prep, resolve(P.run_dir) / f"products_{which}{suffix}.parquet")
    return out


def _belief(rows, cls, prob, rest, P):
    return belief_aggregate(rows.product_id, cls, prob, rest, rows.n_classes, **belief_kwargs(P))


def _acc(out, prep, which, name):
    return accuracy_of(out[which][name], truth(prep, which))


def save_products(pp, prep, path):
    "product_id, pred_class, category_id, score as Parquet (atomically)"
    from .io import atomic_write
    df = pp.to_frame()
    df["category_id"] = prep.catalog.to_category(np.maximum(df["pred_class"].to_numpy(), 0))
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    return path


def excluded_products(rows, pp, n=8, seed=0):
    "Product ids where belief aggregation excluded at least one prediction row for the winning class"
    ex = pd.Series(pp.excluded, index=rows.product_id)
    ids = np.unique(ex[ex].index.to_numpy())
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=min(n, len(ids)), replace=False)) if len(ids) else ids


def plot_excluded(rows, pp, prep, which="test", n=8, seed=0):
    """Grid of products in which belief aggregation excluded a picture: each picture titled with its
    prediction's top class; excluded pictures (for the winning class) framed in red"""
    import matplotlib.pyplot as plt
    from .bsonfile import BsonReader, decode_rgb
    ids = excluded_products(rows, pp, n, seed)
    if not len(ids):
        return None
    index = prep.test_index if which == "test" else prep.train_index
    reader = BsonReader(prep.test_bson if which == "test" else prep.train_bson)
    by_id = index.set_index("product_id")
    winner = pd.Series(pp.pred_class, index=pp.product_id)
    fig, axes = plt.subplots(len(ids), 4, figsize=(10, 2.6 * len(ids)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, pid in enumerate(ids):
        row = by_id.loc[pid]
        pics = reader.pictures(int(row["offset"]), int(row["length"]))
        sel = rows.product_id == pid
        for j, b in enumerate(pics[:4]):
            ax = axes[r, j]
            ax.imshow(decode_rgb(b))
            here = sel & (rows.img_idx == j)
            excl = pp.excluded[here].mean() if here.any() else 0
            top = np.bincount(rows.cls[here, 0].clip(0)).argmax() if here.any() else -1
            ax.set_title(f"{pid}/{j}: {prep.catalog.name(top)[:20] if top >= 0 else '?'}\n"
                         f"excluded in {excl:.0%} of its predictions", fontsize=7,
                         color="red" if excl > 0.5 else "black")
            if excl > 0.5:
                ax.axis("on"); ax.set_xticks([]); ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_edgecolor("red"); s.set_linewidth(3)
        axes[r, 0].text(-10, 90, f"-> {prep.catalog.name(winner[pid])[:24]}", ha="right", fontsize=8, rotation=90,
                        va="center")
    fig.tight_layout()
    return fig


def plot_by_pictures(by_pictures: pd.DataFrame, which="test"):
    "Product accuracy by number of pictures per product, one bar group per method"
    import matplotlib.pyplot as plt
    t = by_pictures[by_pictures["which"] == which]
    piv = t.pivot_table(index=t.columns[0], columns="method", values="accuracy")
    ax = piv.plot.bar(figsize=(7, 3.5), rot=0)
    ax.set(xlabel="pictures per product", ylabel="product accuracy", title=f"{which}: accuracy by pictures per product",
           ylim=(max(0, float(np.nanmin(piv.to_numpy())) - 0.1), 1))
    ax.figure.tight_layout()
    return ax.figure


# ---- 09: the fine-tuned model back in the pipeline ----

def rescore_with(run_dir, models, old, new, data_dir, work_dir, runs_dir="runs", agg: AggregateParams = None,
                 log=print):
    """Put the model run `new` (e.g. pseudo-label fine-tuned) in the place of `old` among the ensemble
    `models`: predict it as step 06 predicted `old` (same views, k, seed), then aggregate as step 08
    does, writing run_dir/products_{valid,test}_pseudo.parquet. Returns step 08's output dict."""
    prep = prepare_data(data_dir, work_dir, log=lambda *a: None)
    ref = load_store(store_path(run_dir, model_key(old), "test"))
    predict_models(PredictParams(run_dir=run_dir, models=[new], runs_dir=runs_dir, data_dir=data_dir,
                                 work_dir=work_dir, n_tta=ref.n_views - 1, k=ref.k, prob_dtype=ref.prob_dtype,
                                 seed=int(ref.meta.get("seed", 0)), num_workers=0), prep, log)
    members = [new if m == old else m for m in models]
    if new not in members:
        raise ValueError(f"{old} is not among the models {models}")
    agg = agg or AggregateParams()
    agg = AggregateParams(**{**agg.__dict__, "run_dir": run_dir, "models": members, "data_dir": data_dir,
                             "work_dir": work_dir})
    return aggregate_products(agg, prep, log, suffix="_pseudo")


# ---- 10: submission ----

def final_products(P: SubmitParams, prep: Prepared = None) -> Path:
    """The products file to submit. source=auto: of step 08's and step 09's predictions, the one
    more accurate on the validation products (never chosen by the test set)"""
    run_dir = resolve(P.run_dir)
    candidates = {"belief": run_dir / "products_test.parquet", "pseudo": run_dir / "products_test_pseudo.parquet"}
    if P.source != "auto":
        if P.source not in candidates:
            raise ValueError(f"source must be auto, belief or pseudo, got {P.source!r}")
        return candidates[P.source]
    present = {k: p for k, p in candidates.items() if p.exists()}
    if not present:
        raise FileNotFoundError(f"no product predictions in {run_dir}: run 08 (and optionally 09) first")
    prep = prep or prepare_data(P.data_dir, P.work_dir, log=lambda *a: None)
    true = truth(prep, "valid")

    def valid_accuracy(test_path):
        v = pd.read_parquet(Path(str(test_path).replace("products_test", "products_valid")))
        return float((v["pred_class"].to_numpy() == true.reindex(v["product_id"]).to_numpy()).mean())
    return max(present.values(), key=valid_accuracy)


def build_submission(P: SubmitParams, prep: Prepared = None, log=print):
    """Write run_dir/submission.csv.gz from the final product predictions, in sample_submission
    order, validated first; products without a prediction (every picture failed to decode, or no
    pictures) get the most frequent train category. Returns (path, DataFrame, number filled)."""
    from .submission import fill_missing, make_submission, write_submission
    prep = prep or prepare_data(P.data_dir, P.work_dir)
    products = pd.read_parquet(final_products(P, prep))
    sample = prep.data_dir / "sample_submission.csv"
    sample_ids = pd.read_csv(sample, usecols=["_id"])["_id"].to_numpy()
    fallback = int(prep.train_index["category_id"].mode().iloc[0])
    pred, n_filled = fill_missing(products.set_index("product_id")["category_id"], sample_ids, fallback)
    if n_filled:
        log(f"{n_filled} products had no prediction and get the most frequent category {fallback}")
    sub = make_submission(pred.index.to_numpy(), pred.to_numpy(), sample)
    path = write_submission(sub, resolve(P.run_dir) / "submission.csv.gz", sample, prep.catalog.category_ids)
    return path, sub, n_filled
