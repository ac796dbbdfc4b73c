import numpy as np
import pandas as pd
import pytest
import torch

from cdkit.infer.ensemble import combine, fit_weights
from cdkit.infer.store import align_stores
from cdkit.infer.md5 import Md5Votes, apply_md5, hash_pictures, md5_label_table, md5_lookup
from cdkit.infer.store import (PredStore, StoreError, StoreWriter, bytes_per_view, load_store, merge_stores,
                         nominal_bytes_per_view, save_store, shard_rows, topk)

C, V = 64, 2


def peaked(rng, n, views=V, n_classes=C, peak=3.0):
    logits = rng.normal(size=(n, views, n_classes))
    logits[np.arange(n), :, rng.integers(0, n_classes, n)] += peak
    p = np.exp(logits)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def write(path, probs, pid, img, k, prob_dtype="uint8", batch=7, **kw):
    with StoreWriter(path, C, k, probs.shape[1], prob_dtype, meta=dict(model="m"), **kw) as w:
        for a in range(0, len(probs), batch): w.add(pid[a:a + batch], img[a:a + batch], probs[a:a + batch])
    return load_store(path)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n = 50
    return peaked(rng, n), np.repeat(np.arange(25) + 100, 2), np.tile([0, 1], 25).astype(np.int8)


@pytest.mark.parametrize("prob_dtype", ["uint8", "float16", "float32"])
def test_round_trip(tmp_path, data, prob_dtype):
    p, pid, img = data
    s = write(tmp_path / "s", p, pid, img, k=5, prob_dtype=prob_dtype, chunk_rows=16)
    assert len(list((tmp_path / "s").glob("chunk_*.npz"))) > 1 and s.meta == dict(model="m")
    np.testing.assert_array_equal(s.product_id, pid); np.testing.assert_array_equal(s.img_idx, img)
    np.testing.assert_array_equal(s.cls, np.argsort(-p, -1)[..., :5])
    want = -np.sort(-p, -1)[..., :5]
    tol = dict(uint8=np.sqrt(want) / 255 + 1 / 260100, float16=want * 2**-11, float32=want * 1e-7)[prob_dtype]
    assert np.all(np.abs(s.prob - want) <= tol + 1e-7)
    np.testing.assert_allclose(s.rest, 1 - want.sum(-1), atol=1e-3, rtol=2**-10)
    assert s.dense().shape == (50, C)
    np.testing.assert_allclose(s.dense(view=1).sum(1), 1, atol=0.02)
    assert [x.name for x in tmp_path.iterdir()] == ["s"]  # no temporary left over


def test_exact_mode_and_torch_input(tmp_path, data):
    p, pid, img = data
    s = write(tmp_path / "s", torch.from_numpy(p), pid, img, k=C, prob_dtype="float32")
    np.testing.assert_allclose(s.dense(view=0), p[:, 0], rtol=1e-6)
    np.testing.assert_allclose(s.dense(), p.mean(1), rtol=1e-6)
    assert np.all(s.rest < 1e-5)


def test_bytes_per_view(tmp_path):
    rng = np.random.default_rng(1)
    n, C_big = 2000, 5270
    assert nominal_bytes_per_view(20, "uint8", 1) == 62 + 9
    with StoreWriter(tmp_path / "s", C_big, 20, 1) as w:
        for a in range(0, n, 500):
            p = rng.dirichlet(np.full(C_big, 0.05), 500)[:, None]
            w.add(np.arange(a, a + 500), np.zeros(500), p)
    assert bytes_per_view(tmp_path / "s") < 100


def test_unclosed_store_does_not_load(tmp_path, data):
    p, pid, img = data
    w = StoreWriter(tmp_path / "s", C, 5, V, chunk_rows=8)
    w.add(pid, img, p)  # chunks written, close() never called (a crash)
    with pytest.raises(StoreError, match="close\\(\\) never ran"): load_store(tmp_path / "s")
    with pytest.raises(StoreError, match="close\\(\\) never ran"): load_store(w.tmp)
    write(tmp_path / "t", p, pid, img, 5)
    with pytest.raises(StoreError, match="exists"): StoreWriter(tmp_path / "t", C, 5)
    with pytest.raises(RuntimeError):  # an exception inside `with` leaves nothing behind
        with StoreWriter(tmp_path / "u", C, 5, V) as w2:
            w2.add(pid, img, p); raise RuntimeError
    assert not (tmp_path / "u").exists() and not w2.tmp.exists()


def test_shard_rows():
    n = 103
    ranges = [shard_rows(n, i, 4) for i in range(4)]
    assert ranges[0].start == 0 and ranges[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    for bad, msg in (((n, 4, 4), "shard must be in 0..3"), ((n, 0, 0), "num_shards"), ((-1, 0, 1), "n must"),
                     ((n, 1.0, 2), "integer")):
        with pytest.raises(ValueError, match=msg): shard_rows(*bad)


def test_merge_shards_equals_unsharded(tmp_path, data):
    p, pid, img = data
    full = write(tmp_path / "full", p, pid, img, k=5)
    parts = []
    for i in range(3):
        r = shard_rows(len(p), i, 3)
        write(tmp_path / f"shard{i}", p[r.start:r.stop], pid[r.start:r.stop], img[r.start:r.stop], k=5)
        parts.append(tmp_path / f"shard{i}")
    merged = load_store(merge_stores(parts, tmp_path / "merged"))
    for key in ("product_id", "img_idx", "cls", "prob", "rest"):
        np.testing.assert_array_equal(getattr(merged, key), getattr(full, key))
    with pytest.raises(StoreError, match="product_id 100 img_idx 0"): merge_stores([parts[0], tmp_path / "full"], tmp_path / "m2")
    write(tmp_path / "k6", p[:4], pid[:4] + 1000, img[:4], k=6)
    with pytest.raises(StoreError, match="k 6 != 5"): merge_stores([parts[0], tmp_path / "k6"], tmp_path / "m3")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def exact_store(p, pid, img):
    cls, prob, rest = topk(p, p.shape[-1])
    return PredStore(pid, img, cls.astype(np.uint16), prob, rest, p.shape[-1])


def test_ensemble_identical_and_against_dense(tmp_path, data):
    p, pid, img = data
    s = write(tmp_path / "s", p[:, :1], pid, img, k=8, prob_dtype="float32")  # uint8 would tie classes
    e = combine([s, s], k_out=8)
    np.testing.assert_array_equal(e.cls, s.cls)
    np.testing.assert_allclose(e.prob, s.prob, rtol=1e-6)
    np.testing.assert_allclose(e.rest, s.rest, atol=1e-6)
    s2 = write(tmp_path / "s2", p, pid, img, k=8)  # two views: the ensemble of views is their mean
    d = s2.dense(); d /= d.sum(1, keepdims=True)  # quantized rows sum to 1 +- 0.01; ensembles normalize
    np.testing.assert_allclose(combine([s2, s2]).prob[:, 0], -np.sort(-d, 1)[:, :8], atol=1e-6)
    # exact mode: geometric and power means against dense numpy; stores in different row orders
    rng = np.random.default_rng(5)
    q = peaked(rng, len(p), views=1)
    a, perm = exact_store(p, pid, img), rng.permutation(len(p))
    b = exact_store(q[perm], pid[perm], img[perm])
    P = np.concatenate([p, q], 1)
    w = np.array([0.5 / V] * V + [0.5])
    g = np.exp(np.log(np.maximum(P, 1e-7)).transpose(0, 2, 1) @ w); g /= g.sum(1, keepdims=True)
    np.testing.assert_allclose(combine([a, b], method="geometric").dense(), g, rtol=1e-4, atol=1e-7)
    pm = ((P ** 0.5).transpose(0, 2, 1) @ w) ** 2; pm /= pm.sum(1, keepdims=True)
    np.testing.assert_allclose(combine([a, b], method="power", p=0.5).dense(), pm, rtol=1e-4, atol=1e-7)
    # top-k members: a missing class takes that member's rest spread
    sa, sb = PredStore(*_topk_fields(p, pid, img, 10)), PredStore(*_topk_fields(q[perm], pid[perm], img[perm], 10))
    dense = np.concatenate([sa.dense(0)[:, None], sa.dense(1)[:, None], sb.dense()[np.argsort(perm)][:, None]], 1)
    am = dense.transpose(0, 2, 1) @ w
    e = combine([sa, sb], k_out=10)
    np.testing.assert_allclose(e.prob[:, 0], -np.sort(-am, 1)[:, :10], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(e.cls[:, 0, 0], am.argmax(1))
    assert align_stores([sa, sb])[1].tolist() == np.argsort(perm).tolist()
    with pytest.raises(ValueError, match="same pictures"): combine([sa, PredStore(*_topk_fields(q[:-1], pid[:-1], img[:-1], 10))])
    # saved and reloaded
    e2 = load_store(save_store(e, tmp_path / "ens", prob_dtype="float32"))
    np.testing.assert_allclose(e2.prob, e.prob)


def _topk_fields(p, pid, img, k):
    cls, prob, rest = topk(p, k)
    return pid, img, cls.astype(np.uint16), prob, rest, p.shape[-1]


def test_fit_weights_prefers_the_informative_model(data):
    p, pid, img = data
    rng = np.random.default_rng(7)
    labels = p.mean(1).argmax(1)
    good = PredStore(*_topk_fields(p, pid, img, 10))
    noise = PredStore(*_topk_fields(peaked(rng, len(p)), pid, img, 10))
    w = fit_weights([good, noise], labels)
    assert w.sum() == pytest.approx(1) and w[0] > 0.8
    w = fit_weights([good, noise], labels, metric="accuracy", method="geometric", per="member")
    assert len(w) == 2 * V and w[:V].sum() > 0.5


class FakeReader:
    "A BsonReader stand-in: a product's pictures by document offset"
    path = "fake.bson"
    def __init__(self, blobs): self.blobs = blobs
    def pictures(self, offset, length): return [b for (o, _), b in sorted(self.blobs.items()) if o == offset]


def test_md5_lookup_and_blend():
    blobs = {(0, 0): b"cat", (0, 1): b"dog", (9, 0): b"cat", (20, 0): b"cow", (30, 0): b"new", (40, 0): b"dog"}
    train = pd.DataFrame(dict(offset=[0, 0, 9, 20], length=5, img_idx=[0, 1, 0, 0]))
    test = pd.DataFrame(dict(offset=[40, 30, 9], length=5, img_idx=[0, 0, 0]))
    h_train, h_test = hash_pictures(FakeReader(blobs), train), hash_pictures(FakeReader(blobs), test)
    assert h_train.shape == (4, 16) and (h_train[0] == h_train[2]).all() and (h_train[0] != h_train[1]).any()
    table = md5_label_table(h_train, [3, 1, 3, 2], n_classes=8)
    assert len(table) == 3
    m = md5_lookup(h_test, table)
    assert m.found.tolist() == [True, False, True] and m.n_train.tolist() == [1, 0, 2]
    assert m.cls[:, 0].tolist() == [1, -1, 3] and m.prob[:, 0].tolist() == [1, 0, 1]
    table = md5_label_table(h_train, [3, 1, 5, 2], n_classes=8)  # one digest, two labels
    m = md5_lookup(h_test, table)
    assert sorted(m.cls[2].tolist()) == [3, 5] and m.prob[2].tolist() == [0.5, 0.5]
    # after aggregation (`apply_md5`): each test picture here its own product, its match the product's vote
    from cdkit.infer.aggregate import ProductPredictions
    cls, score = np.array([[0, 1, 2]] * 3), np.array([[.5, .2, .1]] * 3)
    pp = ProductPredictions(np.arange(3), np.ones(3, np.int64), cls[:, 0].copy(), cls, score)
    found = np.flatnonzero(m.found)
    votes = Md5Votes(votes=ProductPredictions(found, np.ones(len(found), np.int64), m.cls[found, 0], m.cls[found], m.prob[found]))
    out, summary = apply_md5(pp, votes)
    assert out.cls[0].tolist() == [1, 0, 2] and out.score[0, 0] == 1 and out.score[0, 1] == 0  # override
    np.testing.assert_array_equal(out.cls[1], cls[1]); np.testing.assert_array_equal(out.score[1], score[1])  # miss: unchanged
    assert set(out.cls[2, :2].tolist()) == {3, 5} and summary.changed == 2
    half, _ = apply_md5(pp, votes, alpha=0.5)  # half the train labels, half the product's own scores (normalized)
    assert half.cls[0].tolist() == [1, 0, 2]
    np.testing.assert_allclose(half.score[0], [0.5 + 0.5 * 0.2 / 0.8, 0.5 * 0.5 / 0.8, 0.5 * 0.1 / 0.8])
