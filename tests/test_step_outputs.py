"""What steps hand each other is consistent, current and usable: the files of one step carry one
generation (a mixed pair is refused by every reader), a stale or damaged store is rebuilt by step 06
and named by every other reader, a submission covers its test set, a full disk is DiskFullError."""
import errno
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cdkit.features import FeatureStoreError, FeatureWriter, features_current, load_features, verify_features
from cdkit.io import DiskFullError
from cdkit.params import make_params
from cdkit.runs import (MixedGenerationError, RunLayout, check_generation, new_generation, read_products,
                        write_products)
from cdkit.store import StoreError, StoreWriter, load_store, verify_store
from cdkit.submission import CoverageError, check_coverage

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def prep(tiny_data, tmp_path_factory):
    from cdkit.prepare import create_prepared
    return create_prepared(tiny_data, tmp_path_factory.mktemp("work"), valid_frac=0.2, log=lambda *a: None)


def write_member(path, images, n_classes, generation, seed=0, rebuild="step 06 (`cdkit predict`)", split=None):
    "A member store over `images` with random (seeded) probabilities"
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(n_classes), len(images)).astype(np.float32)
    meta = dict(generation=generation, rebuild=rebuild, **({"stamp": {"split": split}} if split else {}))
    with StoreWriter(path, n_classes, min(5, n_classes), 1, "float32", meta,
                     chunk_rows=max(len(images) // 3, 1), overwrite=True) as w:
        w.add(images["product_id"].to_numpy(), images["img_idx"].to_numpy(), p)
    return path


def members(prep, run_dir, names=("a", "b"), gens=None):
    layout = RunLayout.of(run_dir)
    for i, m in enumerate(names):
        for split in ("valid", "test"):
            g = (gens or {}).get((m, split), f"gen-{m}")
            write_member(layout.store(m, split), prep.images(split)[0], prep.catalog.n_classes, g, seed=i, split=split)
    return layout


def base(prep, run_dir, **kw):
    return dict(data_dir=str(prep.data_dir), work_dir=str(prep.work_dir), run_dir=str(run_dir), **kw)


def run_07(prep, run_dir, models=("a", "b")):
    from cdkit.steps import ensemble
    return ensemble.run(make_params(ensemble.EnsembleParams, base(prep, run_dir, models=list(models))), prep,
                        save=False, **QUIET)


def run_08(prep, run_dir, models=("a", "b"), **kw):
    from cdkit.steps import aggregate
    P = make_params(aggregate.AggregateParams, base(prep, run_dir, models=list(models), rerank=False, md5=False,
                                                    md5_products=False, n_grid=0, **kw))
    return aggregate.run(P, prep, save=False, **QUIET)


def run_10(prep, run_dir, **kw):
    from cdkit.steps import submit
    return submit.run(make_params(submit.SubmitParams, base(prep, run_dir, **kw)), prep, **QUIET)


# 1. the files of one step are committed together

def test_a_kill_between_the_products_files_is_refused_by_step_10(prep, tmp_path, monkeypatch):
    "Step 08 killed after writing the new validation products: step 10 refuses the pair, naming both and step 08"
    from cdkit.steps import aggregate
    layout = members(prep, tmp_path / "run")
    run_07(prep, tmp_path / "run")
    run_08(prep, tmp_path / "run")
    assert run_10(prep, tmp_path / "run").stage == "base"  # one generation: accepted
    real = aggregate.save_products

    def killed_at_test(pp, prep_, path, *a, **kw):
        if "_test" in Path(path).name:
            raise KeyboardInterrupt("killed between the two files")
        return real(pp, prep_, path, *a, **kw)
    monkeypatch.setattr(aggregate, "save_products", killed_at_test)
    with pytest.raises(KeyboardInterrupt):
        run_08(prep, tmp_path / "run", method="belief")
    with pytest.raises(MixedGenerationError) as e:
        run_10(prep, tmp_path / "run")
    msg = str(e.value)
    assert str(layout.products("base", "valid")) in msg and str(layout.products("base", "test")) in msg
    assert "step 08 (`cdkit aggregate`)" in msg and len(msg.splitlines()) == 1


def test_mixed_member_stores_are_refused_by_steps_07_and_08(prep, tmp_path):
    "A member's test store from another run of step 06 (or 06b), an ensemble's from another run of step 07"
    layout = members(prep, tmp_path / "run", names=("a", "b-fusion"), gens={("b-fusion", "test"): "another-run"})
    with pytest.raises(MixedGenerationError, match=r"b-fusion_valid.store \(generation gen-b-fusion\) and .*"
                                                   r"b-fusion_test.store \(generation another-run\) .*step 06b"):
        run_07(prep, tmp_path / "run", ("a", "b-fusion"))
    with pytest.raises(MixedGenerationError, match=r"step 06b"):
        run_08(prep, tmp_path / "run", ("a", "b-fusion"), rows="all")
    members(prep, tmp_path / "run", names=("b-fusion",))
    run_07(prep, tmp_path / "run", ("a", "b-fusion"))
    valid, test = (load_store(layout.ensemble_store("base", s)) for s in ("valid", "test"))
    assert valid.meta["generation"] == test.meta["generation"]
    # step 07 runs again, killed between its two stores: the valid store is new, the test store old
    shutil.copytree(layout.ensemble_store("base", "test"), tmp_path / "old_test")
    run_07(prep, tmp_path / "run", ("a", "b-fusion"))
    shutil.rmtree(layout.ensemble_store("base", "test"))
    shutil.copytree(tmp_path / "old_test", layout.ensemble_store("base", "test"))
    with pytest.raises(MixedGenerationError, match=r"ensemble-base_valid.store .*ensemble-base_test.store .*step 07"):
        run_08(prep, tmp_path / "run", ("a", "b-fusion"))


@SETTINGS
@given(gens=st.lists(st.sampled_from(["g1", "g2", None]), min_size=2, max_size=5),
       kinds=st.lists(st.sampled_from(["store", "parquet"]), min_size=5, max_size=5))
def test_check_generation_refuses_exactly_the_mixed_sets(tmp_path_factory, gens, kinds):
    "Generated sets of stores and Parquet files with generated generations: refused iff they differ"
    tmp = tmp_path_factory.mktemp("gens")
    paths = []
    for i, (g, kind) in enumerate(zip(gens, kinds)):
        if kind == "store":
            p = tmp / f"m{i}.store"
            meta = {} if g is None else {"generation": g}
            with StoreWriter(p, 4, 2, meta=meta) as w:
                w.add([1], [0], np.full((1, 4), 0.25, np.float32))
        else:
            p = tmp / f"p{i}.parquet"
            df = pd.DataFrame({"product_id": [1]})
            if g is None:
                df.to_parquet(p)
            else:
                write_products(df, p, g)
        paths.append(p)
    if len(set(gens)) == 1:
        assert check_generation(paths, "step X") == gens[0]
    else:
        with pytest.raises(MixedGenerationError) as e:
            check_generation(paths, "step X (`cdkit x`)")
        j = next(i for i, g in enumerate(gens) if g != gens[0])
        assert str(paths[0]) in str(e.value) and str(paths[j]) in str(e.value) and "cdkit x" in str(e.value)


def test_read_products_reads_one_generation(tmp_path):
    layout = RunLayout.of(tmp_path)
    g = new_generation()
    for s in ("valid", "test"):
        write_products(pd.DataFrame({"product_id": [1, 2], "pred_class": [0, 1]}), layout.products("pseudo", s), g)
    assert set(read_products(layout, "pseudo")) == {"valid", "test"}
    write_products(pd.DataFrame({"product_id": [3]}), layout.products("pseudo", "test"), new_generation())
    with pytest.raises(MixedGenerationError, match=r"pseudo_valid.parquet .*pseudo_test.parquet .*step 09"):
        read_products(layout, "pseudo")


@pytest.mark.parametrize("kind", ["member", "ensemble", "products"])
@pytest.mark.parametrize("src", ["valid", "test"])
def test_a_file_copied_onto_the_other_split_is_refused(prep, tmp_path, kind, src):
    "Same generation, wrong split: a store or products file copied over its pair is named by its reader"
    from cdkit.runs import check_ensemble, check_stores
    run = tmp_path / "run"
    layout = members(prep, run)
    dst = "test" if src == "valid" else "valid"
    if kind == "member":
        path = {s: layout.store("a", s) for s in ("valid", "test")}
        check = lambda: check_stores(layout, "a")  # noqa: E731
    elif kind == "ensemble":
        run_07(prep, run)
        path = {s: layout.ensemble_store("base", s) for s in ("valid", "test")}
        check = lambda: check_ensemble(layout, "base")  # noqa: E731
    else:
        run_07(prep, run)
        run_08(prep, run)
        path = {s: layout.products("base", s) for s in ("valid", "test")}
        check = lambda: read_products(layout, "base")  # noqa: E731
    check()
    if path[dst].is_dir():
        shutil.rmtree(path[dst])
        shutil.copytree(path[src], path[dst])
    else:
        shutil.copy(path[src], path[dst])
    with pytest.raises(MixedGenerationError, match=rf"{path[dst].name} holds the {src} split's pictures, not the {dst}"):
        check()


# 2. nothing stale or damaged is reused

@pytest.fixture(scope="module")
def model_run(prep, tmp_path_factory):
    "A run folder with one tiny untrained model, predicted once by step 06"
    import torch
    from cdkit.models import ModelCard, create_model, save_trained
    run = tmp_path_factory.mktemp("run06")
    torch.manual_seed(0)
    n = prep.catalog.n_classes
    save_trained(create_model("resnet10t", n), run / "models" / "m",
                 ModelCard(arch="resnet10t", n_classes=n, size=32, item_size=160, mean=(0.5,) * 3, std=(0.25,) * 3))
    return run


def run_06(prep, run_dir, logs=None):
    from cdkit.steps import predict
    P = make_params(predict.PredictParams, base(prep, run_dir, models=["m"], n_tta=0, num_workers=0, bs=64,
                                               device="cpu", features=True))
    return predict.run(P, prep, log=(logs.append if logs is not None else lambda *a: None), save=False)


def test_step06_rebuilds_after_a_card_change_or_damage(prep, model_run):
    layout = RunLayout.of(model_run)
    first = run_06(prep, model_run)
    assert sorted(first.written) == [("m", "test"), ("m", "valid")]
    assert run_06(prep, model_run).written == []  # current: reused
    # the model card changes (normalization), model.pth does not: every store is predicted again
    card = layout.model_dir("m") / "model.json"
    c = json.loads(card.read_text())
    c["mean"] = [0.4, 0.4, 0.4]
    card.write_text(json.dumps(c))
    assert sorted(run_06(prep, model_run).written) == [("m", "test"), ("m", "valid")]
    # a byte flipped in one chunk of the valid store: only that store is rebuilt, and the log says why
    chunk = sorted(layout.store("m", "valid").glob("chunk_*.npz"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    logs = []
    assert run_06(prep, model_run, logs).written == [("m", "valid")]
    assert any("rebuilding" in line and chunk.name in line and "checksum" in line for line in logs)
    # a truncated feature file: the features are rebuilt (with the store of that pass)
    feats = layout.features("m", "test") / "features.npy"
    feats.write_bytes(feats.read_bytes()[:-7])
    logs = []
    assert run_06(prep, model_run, logs).written == [("m", "test")]
    assert any("rebuilding" in line and "features.npy" in line for line in logs)
    # the stores of one model and setting are one generation, whichever were reused
    assert load_store(layout.store("m", "valid")).meta["generation"] == load_store(layout.store("m", "test")).meta["generation"]


def test_stamp_covers_model_content_and_data(prep, tmp_path, model_run):
    "Same size and mtime, other weights; another split's pictures: another stamp"
    import os
    from cdkit.steps.predict import PredictParams, _stamp
    P = make_params(PredictParams, base(prep, model_run, models=["m"]))
    d = RunLayout.of(model_run).model_dir("m")
    copy = tmp_path / "m"
    shutil.copytree(d, copy)
    before = _stamp(P, copy, "valid", prep)
    w = copy / "model.pth"
    st_ = w.stat()
    data = bytearray(w.read_bytes())
    data[-20] ^= 0x01
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    after = _stamp(P, copy, "valid", prep)
    assert before["model_sha256"] != after["model_sha256"] and w.stat().st_size == st_.st_size
    assert _stamp(P, copy, "test", prep)["data"] != after["data"]


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "x.store"
    rng = np.random.default_rng(0)
    with StoreWriter(path, 12, 4, 2, "uint8", dict(rebuild="step 06 (`cdkit predict`)"), chunk_rows=40) as w:
        w.add(np.arange(100) + 1, np.zeros(100, np.int8), rng.dirichlet(np.ones(12), (100, 2)).astype(np.float32))
    return path


@SETTINGS
@given(data=st.data())
def test_any_damage_to_a_store_is_named_with_its_rebuild(clean_store, tmp_path_factory, data):
    "A byte flipped at a generated offset, or a truncation to a generated length, of a chunk or the manifest"
    from cdkit.steps.predict import store_is_current
    path = tmp_path_factory.mktemp("dmg") / "x.store"
    shutil.copytree(clean_store, path)
    target = path / data.draw(st.sampled_from(sorted(p.name for p in path.iterdir())))
    raw = bytearray(target.read_bytes())
    if data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    target.write_bytes(bytes(raw))
    try:
        got = load_store(path)
    except StoreError as e:
        assert str(path) in str(e)
        if target.name != "manifest.json":  # the manifest names the step that rebuilds the store
            assert target.name in str(e) and "`cdkit predict`" in str(e)
        with pytest.raises(StoreError):
            verify_store(path)
        assert not store_is_current(path, None)
        return
    # only a flip that leaves the manifest's content as it was (white space turned into white space)
    assert target.name == "manifest.json"
    want = load_store(clean_store)
    assert np.array_equal(got.cls, want.cls) and np.array_equal(got.prob, want.prob) and got.meta == want.meta


@pytest.fixture(scope="module")
def clean_features(tmp_path_factory):
    path = tmp_path_factory.mktemp("feat") / "x.features"
    w = FeatureWriter(path, 50, 6, meta=dict(stamp={"a": 1}, rebuild="step 06 (`cdkit predict`)"))
    for a in range(0, 50, 20):
        b = min(a + 20, 50)
        w.add(np.arange(a, b) + 1, np.zeros(b - a), np.random.default_rng(a).normal(size=(b - a, 6)))
    return w.close()


@SETTINGS
@given(data=st.data())
def test_any_damage_to_a_feature_store_is_named_with_its_rebuild(clean_features, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fdmg") / "x.features"
    shutil.copytree(clean_features, path)
    target = path / data.draw(st.sampled_from(["features.npy", "pictures.parquet"]))
    raw = bytearray(target.read_bytes())
    if data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    target.write_bytes(bytes(raw))
    for read in (verify_features, load_features):
        with pytest.raises(FeatureStoreError, match=rf"{target.name} .*checksum.*`cdkit predict`"):
            read(path)
    assert features_current(clean_features, {"a": 1}) and not features_current(path, {"a": 1})


def test_features_round_trip(clean_features):
    f = load_features(clean_features)
    assert f.x.shape == (50, 6) and np.array_equal(f.product_id, np.arange(50) + 1)
    want = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float16)
    assert np.array_equal(np.asarray(f.x[:20]), want)


# 4. a submission is for this test set

@SETTINGS
@given(n=st.integers(1, 3000), missing=st.integers(0, 3000), extra=st.integers(0, 50),
       max_missing=st.sampled_from([0.0, 0.001, 0.01, 0.1]))
def test_coverage_is_refused_beyond_the_stated_share(n, missing, extra, max_missing):
    missing = min(missing, n)
    expected = np.arange(n) + 10
    pred = np.concatenate([expected[missing:], 10**9 + np.arange(extra)])
    if missing / n > max_missing:
        with pytest.raises(CoverageError, match=rf"products.parquet has no prediction for {missing:,} of the {n:,}"):
            check_coverage(pred, expected, "products.parquet", max_missing)
    else:
        assert check_coverage(pred, expected, "products.parquet", max_missing) == missing


@pytest.mark.parametrize("covered", [0, 5])
def test_step10_refuses_products_of_another_test_set(prep, tmp_path, covered):
    "Products for other ids (same catalog), or 45 of 50 missing: refused, naming the file, the stage, a few ids"
    layout = RunLayout.of(tmp_path / "run")
    g = new_generation()
    valid = prep.train_index[prep.valid_mask(prep.train_index)]["product_id"].to_numpy()
    test = prep.test_index["product_id"].to_numpy()
    ids = np.concatenate([test[:covered], 10**9 + np.arange(len(test) - covered)])
    for split, pid in (("valid", valid), ("test", ids)):
        write_products(pd.DataFrame({"product_id": pid, "pred_class": 0,
                                     "category_id": int(prep.catalog.category_ids[0]), "score": 1.0}),
                       layout.products("base", split), g)
    with pytest.raises(CoverageError, match=rf"base_test.parquet \(stage 'base'\) has no prediction for "
                                            rf"{len(test) - covered:,} of the {len(test):,} products"):
        run_10(prep, tmp_path / "run")
    assert not layout.submission.exists()
    # a stated share lets the few products through
    r = run_10(prep, tmp_path / "run", max_missing=1.0)
    assert r.n_filled == len(test) - covered


# 5. a full disk is an error, not a signal

def test_features_on_a_disk_that_cannot_reserve_them(tmp_path, monkeypatch):
    "posix_fallocate says ENOSPC: DiskFullError naming the store before any row is written, nothing left behind"
    import cdkit.features as features

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(features.os, "posix_fallocate", full)
    out = tmp_path / "preds" / "m_test.features"
    with pytest.raises(DiskFullError, match=r"m_test.features"):
        FeatureWriter(out, 10**6, 512)
    assert not out.exists() and list(out.parent.iterdir()) == []


WRITE_UNTIL_FULL = textwrap.dedent("""
    import os, resource, sys
    import numpy as np
    from pathlib import Path
    import cdkit.features as features
    from cdkit.features import FeatureWriter
    from cdkit.io import DiskFullError
    from cdkit.store import StoreWriter
    out = Path(sys.argv[1])
    os.posix_fallocate = lambda *a: None  # a file system that cannot reserve: the writes themselves hit the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # past it a write fails (EFBIG), as on a full disk
    try:
        w = FeatureWriter(out / "m_test.features", 10_000, 64)
        for a in range(0, 10_000, 500):
            w.add(np.arange(a, a + 500), np.zeros(500), np.ones((500, 64), np.float32))
        w.close()
        print("NO ERROR")
    except DiskFullError as e:
        print("FEATURES", e)
    try:
        w = StoreWriter(out / "m_test.store", 100, 100, 1, "float32", chunk_rows=1000)
        w.add(np.arange(1000), np.zeros(1000), np.full((1000, 100), 0.01, np.float32))
        w.close()
        print("NO ERROR")
    except DiskFullError as e:
        print("STORE", e)
""")


def test_writers_on_a_full_file_system_raise_disk_full(tmp_path):
    "Writes past the file size limit fail as on a full disk: each writer names its path, the process lives on"
    out = tmp_path / "preds"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", WRITE_UNTIL_FULL, str(out)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(line.startswith("FEATURES") and "m_test.features" in line for line in lines), r.stdout
    assert any(line.startswith("STORE") and "m_test.store" in line for line in lines), r.stdout
    assert sorted(p.name for p in out.iterdir()) == []  # no partial output under a final name, no temp left
