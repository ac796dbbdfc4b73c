"Second-level re-ranker: candidates and features, out-of-fold discipline, no leak, a learned signal, errors"
import numpy as np
import pandas as pd
import pytest

from cdkit.base.metrics import product_accuracy
from cdkit.infer.aggregate import ProductPredictions
from cdkit.infer.rerank import _params, _to_predictions, candidate_table, fit_oof, product_folds, train_model
from cdkit.infer.store import PredStore


def pp(pid, cls, score):
    "ProductPredictions from plain lists (n_preds 1)"
    cls, score = np.asarray(cls, np.int64), np.asarray(score, np.float64)
    return ProductPredictions(np.asarray(pid, np.int64), np.ones(len(pid), np.int64), cls[:, 0].copy(), cls, score)


def random_members(n, n_classes=1000, k=5, seed=0, names=("a", "b", "c")):
    "Members with random classes and scores: nothing in them says which candidate is true"
    rng = np.random.default_rng(seed)
    pid = np.arange(n) * 3 + 5
    out = {}
    for name in names:
        cls = np.stack([rng.permutation(n_classes)[:k] for _ in range(n)])
        score = -np.sort(-rng.dirichlet(np.ones(k + 1), n)[:, :k], 1)
        out[name] = pp(pid, cls, score)
    return out


def signal_members(n, seed=0, n_classes=200):
    """Member a: right 60% of the time. Member b: the truth is its top-1 when its top score is above 0.5
    (about 40% of products) and its second otherwise: b's top-2 holds the truth in a learnable pattern"""
    rng = np.random.default_rng(seed)
    pid = np.arange(n) + 100
    true = rng.integers(0, n_classes, n)
    def wrong(size): return (true[:, None] + rng.integers(1, n_classes, (n, size))) % n_classes
    a = wrong(5)
    hit = rng.random(n) < 0.6
    a[hit, 0] = true[hit]
    a_score = -np.sort(-rng.dirichlet(np.ones(6), n)[:, :5], 1)
    b = wrong(5)
    high = rng.random(n) < 0.4
    b[high, 0], b[~high, 1] = true[high], true[~high]
    b_top = np.where(high, rng.uniform(0.55, 0.9, n), rng.uniform(0.2, 0.45, n))
    b_score = np.c_[b_top, np.linspace(0.15, 0.05, 4)[None, :] * (1 - b_top[:, None])]
    b_score[:, 1:] = -np.sort(-b_score[:, 1:], 1)
    return dict(a=pp(pid, a, a_score), b=pp(pid, b, b_score)), true


def test_candidates_are_the_union_aligned_by_product_id():
    a = pp([10, 20, 30], [[1, 2], [3, 4], [5, 6]], [[0.6, 0.3], [0.5, 0.4], [0.9, 0.1]])
    # b lists the products in another order and misses product 20
    b = pp([30, 10], [[6, 7], [2, 8]], [[0.7, 0.2], [0.8, 0.1]])
    t = candidate_table(dict(a=a, b=b), k=2)
    df = t.frame().set_index(["product_id", "cls"])
    assert t.product_id.tolist() == [10, 20, 30]
    assert {p: sorted(g.index.get_level_values("cls")) for p, g in df.groupby(level=0)} == {10: [1, 2, 8], 20: [3, 4], 30: [5, 6, 7]}
    assert df.loc[(10, 2), "a:score"] == pytest.approx(0.3) and df.loc[(10, 2), "a:rank"] == 1
    assert df.loc[(10, 2), "b:score"] == pytest.approx(0.8) and df.loc[(10, 2), "b:rank"] == 0
    assert df.loc[(10, 2), "n_first"] == 1 and df.loc[(10, 2), "n_in"] == 2
    assert df.loc[(10, 2), "mean_score"] == pytest.approx(0.55)
    assert df.loc[(10, 1), "b:score"] == 0 and df.loc[(10, 1), "b:rank"] == 2  # absent: score 0, rank k
    assert (df.loc[20, "b:rank"] == 2).all() and (df.loc[20, "b:margin"] == 0).all()  # b misses product 20
    assert df.loc[(30, 6), "a:rel"] == pytest.approx(0.1 / 0.9) and df.loc[(30, 6), "b:top1"] == 1
    assert df.loc[(30, 7), "a:margin"] == pytest.approx(0.8)
    # the same table whatever the members' row order
    shuffled = {name: ProductPredictions(*(x[::-1] for x in (m.product_id, m.n_preds, m.pred_class, m.cls, m.score)))
                for name, m in dict(a=a, b=b).items()}
    t2 = candidate_table(shuffled, k=2)
    assert np.array_equal(t2.cls, t.cls) and np.array_equal(t2.X, t.X)


def test_picture_and_md5_features():
    a = pp([1, 2], [[3, 4], [5, 6]], [[0.6, 0.3], [0.7, 0.2]])
    # product 1: pictures 0 and 1 (listed out of order), product 2: one picture; k=2 stores, 10 classes
    store = PredStore(np.array([1, 2, 1]), np.array([1, 0, 0], np.int8), np.array([[[4, 3]], [[5, 9]], [[3, 7]]], np.uint16),
                      np.array([[[0.5, 0.3]], [[0.8, 0.1]], [[0.6, 0.2]]], np.float32), np.array([[0.2], [0.1], [0.2]], np.float32), 10)
    md5 = pd.DataFrame(dict(product_id=[2], cls=[8], share=[0.75]))
    df = candidate_table(dict(a=a), pictures=store, md5=md5, k=2).frame().set_index(["product_id", "cls"])
    assert df.loc[(1, 3), "pic_first"] == pytest.approx(0.6) and df.loc[(1, 3), "pic_later_max"] == pytest.approx(0.3)
    assert df.loc[(1, 3), "pic_top1"] == 1 and df.loc[(1, 4), "pic_top1"] == 1
    assert df.loc[(1, 4), "pic_first"] == pytest.approx(0.2 / 8)  # outside picture 0's top-k: its rest spread
    assert df.loc[(1, 3), "n_pictures"] == 2 and df.loc[(2, 5), "n_pictures"] == 1
    assert np.isnan(df.loc[(2, 5), "pic_later_max"])  # one picture: no later ones
    assert (2, 8) in df.index and df.loc[(2, 8), "md5_is"] == 1 and df.loc[(2, 8), "md5_share"] == 0.75  # the MD5 class joins
    assert df.loc[(2, 5), "md5_is"] == 0 and df.loc[(1, 3), "md5_share"] == 0


def test_out_of_fold_discipline():
    members, true = signal_members(300)
    table = candidate_table(members)
    rr = fit_oof(table, true, n_folds=5, seed=1, rounds=50)
    assert len(rr.models) == len(rr.train_ids) == len(rr.scored_ids) == 5
    for tr, sc in zip(rr.train_ids, rr.scored_ids):
        assert not np.intersect1d(tr, sc).size
        assert np.array_equal(np.union1d(tr, sc), table.product_id)
    scored = np.concatenate(rr.scored_ids)
    assert len(scored) == len(table.product_id) and np.array_equal(np.sort(scored), table.product_id)  # each once
    # each row's OOF score is the one from the model that did not train on its product
    for model, sc in zip(rr.models, rr.scored_ids):
        sub = table.take(np.searchsorted(table.product_id, sc))
        rows = np.isin(table.product_id[table.row_product], sc)
        assert np.allclose(rr.oof_raw[rows], model.predict(sub.X, raw_score=True, num_threads=1))
    oof = rr.oof_predictions()
    assert np.array_equal(oof.product_id, table.product_id) and np.isfinite(rr.oof_raw).all()


def test_no_leak_from_in_sample_signal():
    "Random truths among random candidates: in-sample the model memorizes, out of fold it stays at the base rate"
    n = 400
    members = random_members(n)
    table = candidate_table(members)
    rng = np.random.default_rng(3)
    counts = np.diff(table.offsets)
    true = table.cls[table.offsets[:-1] + rng.integers(0, counts)]  # a random candidate of each product
    base = float(np.mean(1 / counts))
    rr = fit_oof(table, true, seed=0)
    oof = product_accuracy(rr.oof_predictions().pred_class, true)
    label = (table.cls == true[table.row_product]).astype(np.float32)
    insample = train_model(table.X, label, counts, _params("binary", 0, None))
    ins_acc = product_accuracy(_to_predictions(table, insample.predict(table.X, raw_score=True), 1).pred_class, true)
    assert ins_acc > base + 0.3, (ins_acc, base)
    assert abs(oof - base) < 0.05, (oof, base)


def test_learns_a_real_signal():
    members, true = signal_members(400, seed=2)
    best = max(product_accuracy(m.pred_class, true) for m in members.values())
    rr = fit_oof(candidate_table(members), true, seed=0)
    oof = rr.oof_predictions()
    acc = product_accuracy(oof.pred_class, true)
    assert 0.5 < best < 0.7 and acc > best + 0.15, (acc, best)
    # softmax scores: best first, summing to 1 over the kept candidates (there are at most k_out = 10 here)
    s = rr.oof_predictions(k_out=10).score
    assert np.allclose(np.where(np.isfinite(s), s, 0).sum(1), 1) and (np.diff(np.nan_to_num(s, neginf=-1), axis=1) <= 0).all()
    # on fresh products the fold mean generalizes too, and streaming by blocks gives the same
    test_members, test_true = signal_members(300, seed=5)
    pred = rr.predict(candidate_table(test_members))
    assert product_accuracy(pred.pred_class, test_true) > best + 0.15
    streamed = rr.predict_members(test_members, block=70)
    assert np.array_equal(streamed.cls, pred.cls) and np.allclose(streamed.score, pred.score)


def test_same_seed_same_models():
    members, true = signal_members(200, seed=4)
    table = candidate_table(members)
    r1, r2 = fit_oof(table, true, seed=7, rounds=50), fit_oof(table, true, seed=7, rounds=50)
    assert all(np.array_equal(a, b) for a, b in zip(r1.train_ids, r2.train_ids))
    assert np.array_equal(r1.oof_raw, r2.oof_raw)
    r3 = fit_oof(table, true, seed=8, rounds=50)
    assert not np.array_equal(r1.train_ids[0], r3.train_ids[0])
    assert np.bincount(product_folds(203, 5, 0)).tolist() == [41, 41, 41, 40, 40]


def test_errors_name_the_problem():
    members, true = signal_members(50)
    with pytest.raises(ValueError, match="member 'a' holds class"):
        candidate_table(members, n_classes=10)
    odd = members["b"]
    odd.n_classes = 300
    with pytest.raises(ValueError, match="member 'b' has n_classes=300"):
        candidate_table(members, n_classes=200)
    del odd.n_classes
    table = candidate_table(members)
    with pytest.raises(ValueError, match="truth is missing for 1 product"):
        fit_oof(table, pd.Series(true[1:], index=table.product_id[1:]))
    with pytest.raises(ValueError, match="fewer than n_folds=5"):
        fit_oof(table.take(np.arange(3)), true[:3])
    rr = fit_oof(table, true, rounds=5)
    with pytest.raises(ValueError, match="features"):
        rr.predict(candidate_table(dict(a=members["a"])))
    with pytest.raises(ValueError, match="n_pictures must be a pd.Series"):
        candidate_table(members, n_pictures=np.ones(50))
    t = candidate_table(members, n_pictures=pd.Series(np.arange(50), index=members["a"].product_id[::-1]))
    assert t.frame().groupby("product_id")["n_pictures"].first().tolist() == list(range(49, -1, -1))
