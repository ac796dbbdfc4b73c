"The full-size synthetic preset at a tiny scale: competition format, exact proportional counts; the rehearsal driver"
import hashlib
import importlib.util
import json
from pathlib import Path

import bson
import numpy as np
import pandas as pd
import pytest
import simplejpeg

from cdkit.base.io import INCOMPLETE
from cdkit.data.synth_full import (FILES, TRAIN_PICTURE_COUNTS, picture_counts, scaled_counts, write_full_dataset)

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "cdiscount" / "category_names.csv"
SCALE = 1e-4


@pytest.fixture(scope="module")
def full_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, write_full_dataset(out, scale=SCALE, seed=0, progress=False)


def _docs(path):
    with open(path, "rb") as f: return list(bson.decode_file_iter(f))


def test_counts_are_the_real_ones_scaled():
    assert scaled_counts(1.0) == dict(train_products=7_069_896, train_pictures=12_371_293,
                                      test_products=1_768_182, test_pictures=3_095_080)
    assert picture_counts(7_069_896, 12_371_293).tolist() == list(TRAIN_PICTURE_COUNTS)
    for products, pictures in ((707, 1237), (1_768_182, 3_095_080), (442_0, 7_73_2)):
        c = picture_counts(products, pictures)
        assert c.sum() == products and c @ [1, 2, 3, 4] == pictures and c.min() >= 0
    with pytest.raises(ValueError): scaled_counts(0)


def test_format_and_exact_counts(full_small):
    out, res = full_small
    assert sorted(p.name for p in out.iterdir() if p.name != ".cdkit-data.json") == sorted(FILES)  # no incomplete marker left (the kit-data marker stays)
    want = scaled_counts(SCALE)
    assert (want["train_products"], want["test_products"]) == (707, 177)
    train, test = _docs(out / "train.bson"), _docs(out / "test.bson")
    assert len(train) == want["train_products"] and len(test) == want["test_products"]
    assert sum(len(d["imgs"]) for d in train) == want["train_pictures"] == 1237
    assert sum(len(d["imgs"]) for d in test) == want["test_pictures"] == 310
    # the competition's key order and types; test documents carry no category_id
    assert all(list(d) == ["_id", "imgs", "category_id"] for d in train)
    assert all(list(d) == ["_id", "imgs"] for d in test)
    assert all(list(i) == ["picture"] for d in train + test for i in d["imgs"])
    assert open(out / "train.bson", "rb").read(9)[4:9] == b"\x10_id\x00"  # _id is int32, as in the real file
    # picture counts per product: the train shares of 2 and 3 pictures, totals exact
    for docs, key in ((train, "train"), (test, "test")):
        n = np.bincount([len(d["imgs"]) for d in docs], minlength=5)[1:]
        assert n.tolist() == picture_counts(want[f"{key}_products"], want[f"{key}_pictures"]).tolist()
        assert n.tolist() == res["counts"][f"{key}_picture_counts"]
    # ids: unique over both files, ascending in each
    ids_train, ids_test = [d["_id"] for d in train], [d["_id"] for d in test]
    assert ids_train == sorted(ids_train) and ids_test == sorted(ids_test)
    assert not set(ids_train) & set(ids_test)
    # pictures: 180x180 JPEGs; some byte copies, as in the real data
    pics = [bytes(i["picture"]) for d in train for i in d["imgs"]]
    assert simplejpeg.decode_jpeg(pics[0]).shape == (180, 180, 3)
    assert 0.5 * len(pics) < len({hashlib.md5(p).digest() for p in pics}) < len(pics)
    assert 500 < np.mean([len(p) for p in pics]) < 1500  # about 0.9 KB: the full set stays near 14 GB


def test_csv_files_and_generated_taxonomy(full_small):
    out, res = full_small
    cats = pd.read_csv(out / "category_names.csv")
    assert list(cats.columns) == ["category_id", "category_level1", "category_level2", "category_level3"]
    assert len(cats) == 5270 and cats["category_level1"].nunique() == 49 and cats["category_level2"].nunique() == 483
    assert cats["category_id"].is_unique
    train_cats = {d["category_id"] for d in _docs(out / "train.bson")}
    assert train_cats <= set(cats["category_id"])
    test_ids = [d["_id"] for d in _docs(out / "test.bson")]
    sub, truth = pd.read_csv(out / "sample_submission.csv"), pd.read_csv(out / "test_truth.csv")
    assert list(sub.columns) == list(truth.columns) == ["_id", "category_id"]
    assert sub["_id"].tolist() == truth["_id"].tolist() == test_ids
    assert set(truth["category_id"]) <= set(cats["category_id"]) and sub["category_id"].nunique() == 1
    meta = json.loads((out / "synth.json").read_text())
    assert meta["preset"] == "full" and meta["scale"] == SCALE and meta["seed"] == 0


@pytest.mark.skipif(not REAL_CSV.exists(), reason="the real category_names.csv is not here")
def test_real_taxonomy(tmp_path):
    write_full_dataset(tmp_path, scale=SCALE, seed=1, category_csv=REAL_CSV, progress=False)
    cats = pd.read_csv(tmp_path / "category_names.csv")
    real = pd.read_csv(REAL_CSV)
    assert len(cats) == 5270 and cats.equals(real)
    assert {d["category_id"] for d in _docs(tmp_path / "train.bson")} <= set(real["category_id"])


def test_same_seed_same_bytes(tmp_path, full_small):
    out, _ = full_small
    write_full_dataset(tmp_path, scale=SCALE, seed=0, progress=False)
    for name in ("train.bson", "test.bson", "test_truth.csv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def _rehearse():
    spec = importlib.util.spec_from_file_location("rehearse", ROOT / "bench" / "rehearse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rehearsal_steps_and_report(tmp_path, full_small):
    "The cheap steps run in their own processes on the small set, reuse it, and the report has the table"
    out, _ = full_small
    R = _rehearse()
    data = tmp_path / "data" / f"scale-{SCALE:g}-seed-0"
    data.parent.mkdir()
    data.symlink_to(out, target_is_directory=True)
    assert R.dataset_ready(data, SCALE, 0) and not R.dataset_ready(data, 0.5, 0)
    (out / INCOMPLETE).write_text("x")
    assert not R.dataset_ready(data, SCALE, 0)
    (out / INCOMPLETE).unlink()
    R.main(["--scales", str(SCALE), "--data-root", str(data.parent), "--out", str(tmp_path / "out"),
            "--only", "index", "split", "image_table", "md5"])
    recs = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["step"] for r in recs] == ["index", "split", "image_table", "md5"]
    assert recs[0]["info"]["train"]["pictures"] == 1237 and recs[3]["info"]["pictures"] == 1237 + 310
    assert all(r["wall_s"] > 0 and r["peak_rss_mb"] > 0 for r in recs)
    # a second scale (faked) gives the side-by-side table and the growth exponents
    recs += [dict(r, scale=2 * SCALE, cpu_s=r["cpu_s"] * 2, work_mb=r["work_mb"] * 4) for r in recs]
    R.report(recs, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## Side by side" in text and "## Growth exponents" in text
    assert R.slope(1, 10, 4, 40) == pytest.approx(1.0) and R.slope(1, 10, 2, 40) == pytest.approx(2.0)


def _random_store(n_pics_per_product, views, k, seed, shuffle, n_classes=30):
    from cdkit.infer.store import PredStore
    r = np.random.default_rng(seed)
    pid = np.repeat(np.arange(len(n_pics_per_product)) * 3 + 5, n_pics_per_product)
    img = np.concatenate([np.arange(n) for n in n_pics_per_product])
    n = len(pid)
    cls = np.stack([np.stack([r.choice(n_classes, k, replace=False) for _ in range(views)]) for _ in range(n)])
    p = r.dirichlet(np.ones(k + 1) * 0.3, (n, views)).astype(np.float32)
    prob = -np.sort(-p[..., :k], -1)
    o = r.permutation(n) if shuffle else np.arange(n)
    return PredStore(pid[o], img[o], cls[o].astype(np.uint16), prob[o], (1 - prob.sum(-1))[o], n_classes)


@pytest.mark.parametrize("method", ["belief", "mean"])
@pytest.mark.parametrize("last_k", [8, 6])  # the same k everywhere (compact classes), or padding
def test_aggregate_stores_streams_to_the_same_result(method, last_k):
    "Per-product blocks over stores (the 24.8 M-row case) give what aggregating all rows at once gives"
    from cdkit.infer.aggregate import aggregate_stores, belief_aggregate, mean_aggregate, prediction_rows
    npp = np.random.default_rng(0).integers(1, 5, 400)
    stores = [_random_store(npp, 2, 8, 1, False), _random_store(npp, 2, 8, 2, True),
              _random_store(npp, 3, last_k, 3, True)]
    r = prediction_rows(stores)
    a = {"belief": belief_aggregate, "mean": mean_aggregate}[method](r.product_id, r.cls, r.prob, r.rest, r.n_classes)
    b = aggregate_stores(stores, method, max_rows=97)  # many blocks, cut at product boundaries
    for name in ("product_id", "n_preds", "pred_class", "cls"): assert np.array_equal(getattr(a, name), getattr(b, name))
    assert np.allclose(a.score, b.score)
    if method == "belief": assert b.excluded.any() and np.array_equal(a.excluded, b.excluded)
