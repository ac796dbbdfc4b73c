import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdkit.base.metrics import accuracy_by_level, accuracy_by_n_pictures, product_accuracy
from cdkit.infer.aggregate import belief_aggregate, logmean_aggregate, mean_aggregate, prediction_rows
from cdkit.infer.store import PredStore, spread, topk


def random_rows(rng, n_products, n_classes, k, max_preds, peak=3.0, discrete=False):
    "Prediction rows of n_products products with 1..max_preds rows each, in shuffled order"
    n = rng.integers(1, max_preds + 1, n_products)
    pid = np.repeat(rng.permutation(10 * n_products)[:n_products] + 1000, n)
    true = np.repeat(rng.integers(0, n_classes, n_products), n)
    logits = rng.normal(size=(len(pid), n_classes))
    logits[np.arange(len(pid)), true] += peak
    if discrete: logits = np.round(logits)  # repeated values: exact ties and sd = 0
    p = np.exp(logits); p /= p.sum(1, keepdims=True)
    if discrete: p = np.round(p, 2)  # many equal probabilities across rows
    order = rng.permutation(len(pid))
    cls, prob, rest = topk(p[order], k)
    return pid[order], cls, prob, rest, p[order]


def ref_values(rows, cls, prob, rest, n_classes, c):
    k = (cls[rows] >= 0).sum(1)
    out = []
    for r, kk in zip(rows, k):
        hit = np.flatnonzero(cls[r] == c)
        out.append(float(prob[r, hit[0]]) if len(hit) else float(spread(rest[r], n_classes, kk)))
    return np.array(out)


def ref_belief(pid, cls, prob, rest, n_classes, m=None, z=1.96, rule="gaussian", score="sum",
               min_preds=3, ddof=1, atol=0.01):
    "Slow, obvious per-product implementation of Algorithm 1 with the documented decisions"
    m = cls.shape[1] if m is None else m
    result = {}
    for p in np.unique(pid):
        rows = np.flatnonzero(pid == p)
        n = len(rows)
        cands = sorted({int(c) for r in rows for c in cls[r, :m] if c >= 0})
        best = None
        for c in cands:
            v = ref_values(rows, cls, prob, rest, n_classes, c)
            excluded = np.zeros(n, bool)
            if n >= min_preds:
                for j in range(n):
                    others = np.delete(v, j)
                    mu, sd = others.mean(), others.std(ddof=ddof)
                    if rule == "gaussian": excluded[j] = abs(v[j] - mu) > max(z * sd, atol) + 1e-12
                    else: excluded[j] = (v[j] < 0.5 * mu - 1e-12 or v[j] > 2 * mu + 1e-12) and abs(v[j] - mu) > atol + 1e-12
            inc = v[~excluded]
            s = sum(inc) if score == "sum" else (sum(inc) / len(inc) if len(inc) else 0.0)
            if best is None or s > best[1]: best = (c, s, excluded, rows)
        result[p] = best
    return result


@pytest.mark.parametrize("rule", ["gaussian", "ratio"])
@pytest.mark.parametrize("score", ["sum", "mean"])
@pytest.mark.parametrize("discrete", [False, True])
def test_belief_matches_reference(rule, score, discrete):
    rng = np.random.default_rng(hash((rule, score, discrete)) % 2**32)
    C, k = 30, 6
    pid, cls, prob, rest, _ = random_rows(rng, 150, C, k, 8, peak=2.0, discrete=discrete)
    for atol, m in ((0.01, None), (0.0, 3), (0.15, None)):  # atol=0.15: most candidates skip the test
        got = belief_aggregate(pid, cls, prob, rest, C, m=m, rule=rule, score=score, atol=atol, max_entries=200)
        ref = ref_belief(pid, cls, prob, rest, C, m=m, rule=rule, score=score, atol=atol)
        assert list(got.product_id) == sorted(ref)
        want_cls = np.array([ref[p][0] for p in got.product_id])
        want_score = np.array([ref[p][1] for p in got.product_id])
        np.testing.assert_array_equal(got.pred_class, want_cls)
        np.testing.assert_allclose(got.score[:, 0], want_score, rtol=1e-9, atol=1e-12)
        for p, (_, _, excl, rows) in ref.items(): np.testing.assert_array_equal(got.excluded[rows], excl)
        assert got.excluded.any() or atol > 0.1


def test_belief_sd_zero_and_small_products():
    C = 10
    # product 1: one prediction; product 2: two disagreeing predictions; product 3: three with two equal
    cls = np.array([[0, 1], [0, 1], [1, 0], [2, 3], [2, 3], [2, 3]])
    prob = np.array([[.6, .4], [.9, .1], [.9, .1], [.5, .5], [.5, .5], [.2, .2]])
    pid = np.array([1, 2, 2, 3, 3, 3])
    r = belief_aggregate(pid, cls, prob, np.zeros(6), C, atol=0.0)
    assert not r.excluded[:3].any()  # fewer than 3 predictions: nothing excluded, plain sum
    np.testing.assert_allclose(r.score[1, :2], [1.0, 1.0])
    assert r.pred_class[1] == 0  # tie: lower class
    # sd of the two others is 0 -> the differing third is excluded (atol=0); with atol it is kept
    assert r.pred_class[2] == 2 and r.excluded[3:].tolist() == [False, False, True]
    np.testing.assert_allclose(r.score[2, 0], 1.0)
    r = belief_aggregate(pid, cls, prob, np.zeros(6), C, atol=0.5)
    assert not r.excluded.any()
    with pytest.raises(ValueError, match="min_preds"): belief_aggregate(pid, cls, prob, None, C, min_preds=2)


def test_belief_outvotes_noise_picture_where_mean_fails():
    C = 8
    # three consistent pictures say A=0 (0.3, B=1 second with 0.2), one noise picture says B with 0.99
    cls = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2], [1, 0, 2]])
    prob = np.array([[.3, .2, .1], [.3, .2, .1], [.3, .2, .1], [.99, .005, .0]])
    rest = 1 - prob.sum(1)
    pid = np.zeros(4, int)
    assert mean_aggregate(pid, cls, prob, rest, C).pred_class[0] == 1
    r = belief_aggregate(pid, cls, prob, rest, C)
    assert r.pred_class[0] == 0
    assert r.excluded.tolist() == [False, False, False, True]


def dense_mean(pid, dense):
    u, inv = np.unique(pid, return_inverse=True)
    s = np.zeros((len(u), dense.shape[1])); np.add.at(s, inv, dense)
    return s / np.bincount(inv)[:, None]


def test_mean_topk_agrees_with_exact():
    rng = np.random.default_rng(1)
    C = 300
    pid, cls, prob, rest, p = random_rows(rng, 2000, C, 20, 4, peak=4.0)
    dm = dense_mean(pid, p)
    approx = mean_aggregate(pid, cls, prob, rest, C)
    assert (approx.pred_class == dm.argmax(1)).mean() > 0.97
    ecls, eprob, erest = topk(p, C)
    exact = mean_aggregate(pid, ecls, eprob, erest, C, k_out=5)
    np.testing.assert_array_equal(exact.pred_class, dm.argmax(1))
    np.testing.assert_allclose(exact.score, -np.sort(-dm, 1)[:, :5], rtol=1e-5)
    # the top-k mean equals the dense mean of the rest-spread reconstruction
    st = PredStore(pid, np.zeros(len(pid), np.int8), cls[:, None].astype(np.uint16), prob[:, None], rest[:, None], C)
    np.testing.assert_allclose(approx.score[:, 0], dense_mean(pid, st.dense()).max(1), rtol=1e-5)


def test_logmean_against_dense():
    rng = np.random.default_rng(2)
    C = 50
    pid, _, _, _, p = random_rows(rng, 300, C, C, 4)
    cls, prob, rest = topk(p, C)
    r = logmean_aggregate(pid, cls, prob, rest, C, eps=1e-6)
    want = dense_mean(pid, np.log(np.maximum(p, 1e-6)))
    np.testing.assert_array_equal(r.pred_class, want.argmax(1))
    np.testing.assert_allclose(r.score[:, 0], want.max(1), rtol=1e-5)


def test_prediction_rows_and_accuracy():
    rng = np.random.default_rng(3)
    C = 20
    _, _, _, _, p = random_rows(rng, 10, C, 5, 1)
    n = len(p)
    pv = np.stack([p, p], 1)
    cls, prob, rest = topk(pv, 5)
    s = PredStore(np.arange(n), np.zeros(n, np.int8), cls.astype(np.uint16), prob, rest, C)
    rows = prediction_rows([s, s], views=[1])
    assert len(rows.cls) == 2 * n and rows.model.tolist() == [0] * n + [1] * n
    r = mean_aggregate(rows.product_id, rows.cls, rows.prob, rows.rest, C)
    np.testing.assert_array_equal(r.pred_class, p.argmax(1))
    assert product_accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    df = accuracy_by_n_pictures([1, 2, 3, 4], [1, 2, 0, 0], [1, 1, 2, 2])
    assert df.to_dict("list") == dict(n_pictures=[1, 2], products=[2, 2], share=[.5, .5], accuracy=[1.0, 0.0])
    lv = accuracy_by_level([0, 1], [1, 1], level1=np.array([0, 0]), level2=np.array([0, 1]))
    assert lv.set_index("level")["accuracy"].to_dict() == dict(category=0.5, level2=0.5, level1=1.0)


# ---- MD5 after aggregation ----

def _pp(pred_cls, scores):
    from cdkit.infer.aggregate import ProductPredictions
    cls = np.asarray(pred_cls, np.int64)
    sc = np.asarray(scores, np.float64)
    return ProductPredictions(np.arange(len(cls)), np.full(len(cls), 3), cls[:, 0].copy(), cls, sc)


def test_blend_products_overrides_listed_products_only():
    from cdkit.infer.aggregate import blend_products
    pp = _pp([[1, 2, 3], [4, 5, -1], [7, 8, 9]], [[0.5, 0.3, 0.1], [0.6, 0.2, -np.inf], [0.9, 0.05, 0.01]])
    # product 0: the train label is a class outside its candidates; product 1: its runner-up
    new, changed = blend_products(pp, [0, 1], [[42, -1], [5, -1]], [[1.0, 0], [1.0, 0]], alpha=1.0)
    assert new.pred_class.tolist() == [42, 5, 7] and changed.tolist() == [True, True, False]
    assert new.cls[2].tolist() == [7, 8, 9] and np.array_equal(new.score[2], pp.score[2])
    assert new.cls[0, 0] == 42 and new.cls[0, 1] == 1  # its own candidates follow, in their order
    # alpha 0: the given distribution has no say, the ranking stays
    same, changed = blend_products(pp, [0, 1], [[42, -1], [5, -1]], [[1.0, 0], [1.0, 0]], alpha=0.0)
    assert same.pred_class.tolist() == [1, 4, 7] and not changed.any()
    # a blend: 0.5 * train label + 0.5 * normalized own scores
    half, _ = blend_products(pp, [1], [[5, -1]], [[1.0, 0]], alpha=0.5)
    assert half.pred_class[1] == 5 and half.score[1, 0] == pytest.approx(0.5 + 0.5 * 0.2 / 0.8)


def test_md5_after_belief_aggregation_keeps_the_train_label():
    "Among the rows, belief aggregation excludes the one-hot MD5 row as an outlier; after it, the label holds"
    import importlib.util
    from pathlib import Path
    from cdkit.infer.aggregate import belief_aggregate
    spec = importlib.util.spec_from_file_location("mc", Path(__file__).resolve().parents[1] / "bench" / "md5_compose.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    (pid, cls, prob, rest), true, match, first = mc.simulate(600, 200, 20, seed=1)
    before = belief_aggregate(pid, *mc.md5_in_rows(cls, prob, rest, match), 200)
    after = mc.after_aggregation(belief_aggregate(pid, cls, prob, rest, 200), pid, match, first)
    assert (after.pred_class == true).all()
    assert (before.pred_class == true).mean() < 0.9  # the old placement loses many of them


def test_apply_md5_blends_votes_then_product_sets():
    "Picture votes first, whole product-set matches last (they decide); the summary counts what changed"
    from cdkit.infer.md5 import Md5Summary, Md5Votes, apply_md5
    pp = _pp([[1, 2, 3], [4, 5, -1], [7, 8, 9]], [[0.5, 0.3, 0.1], [0.6, 0.2, -np.inf], [0.9, 0.05, 0.01]])
    votes = _pp([[2, -1], [6, 4]], [[1.0, -np.inf], [0.75, 0.25]])
    lookup = Md5Votes(votes=votes, sets=(np.array([1]), np.array([[9]]), np.array([[1.0]])), summary=Md5Summary(pictures=3))
    out, summary = apply_md5(pp, lookup)
    assert out.pred_class.tolist() == [2, 9, 7] and summary.changed == 2 and summary.pictures == 3
    assert lookup.summary.changed == 0  # the lookup's own summary is left as it was
    same, s0 = apply_md5(pp, Md5Votes())
    assert same.pred_class.tolist() == [1, 4, 7] and s0.changed == 0
    half, _ = apply_md5(pp, Md5Votes(votes=votes), alpha=0.5)
    assert half.pred_class.tolist() == [2, 4, 7]  # product 1: 0.5 * 0.25 + 0.5 * 0.6 / 0.8 for class 4 beats 0.375 for 6


def test_product_keys_ignore_picture_order():
    from cdkit.infer.md5 import product_keys
    rng = np.random.default_rng(0)
    h = rng.integers(0, 256, (5, 16), dtype=np.uint8)
    pid = np.array([7, 7, 3, 3, 3])
    a_pid, a_key = product_keys(h, pid)
    b_pid, b_key = product_keys(h[[1, 0, 4, 2, 3]], pid[[1, 0, 4, 2, 3]])
    assert a_pid.tolist() == [3, 7] and np.array_equal(a_key, b_key)
    c_pid, c_key = product_keys(h[[0, 1, 2, 3, 1]], pid)  # another set of pictures: another key
    assert not np.array_equal(c_key[0], a_key[0]) and np.array_equal(c_key[1], a_key[1])


# ---- the three named belief settings, each against a transcription of its definition ----

def poster_by_definition(V):
    """The poster's Algorithm 1 on one product, V: (n predictions, C) probabilities as Fractions. Candidates:
    each prediction's top-1 class; a prediction is excluded for a candidate when its probability lies outside
    mu +- 1.96 sd (sample sd) of the product's other predictions (from 3 predictions on); the score sums the
    rest. Returns ({class: score}, margin to the nearest exclusion boundary)"""
    import math
    from fractions import Fraction
    n, z2 = len(V), Fraction(196, 100) ** 2
    scores, margin = {}, float("inf")
    for c in sorted({max(range(len(v)), key=lambda j: (v[j], -j)) for v in V}):
        total = Fraction(0)
        for j in range(n):
            p, others = V[j][c], [V[i][c] for i in range(n) if i != j]
            out = False
            if n >= 3:
                mu = sum(others) / len(others)
                var = sum((o - mu) ** 2 for o in others) / (len(others) - 1)
                out = (p - mu) ** 2 > z2 * var  # |p - mu| > 1.96 sd
                if p != mu: margin = min(margin, abs(abs(float(p - mu)) - 1.96 * math.sqrt(float(var))))
            if not out: total += p
        scores[c] = total
    return scores, margin


def authors_by_definition(V):
    """test_ensemble_final.py's ensemble_predict on one product, from its definition: candidates are the
    predictions' top-1 classes; a prediction is excluded when below half or above twice the mean of the
    other predictions; the score is the mean of the kept ones, or the plain mean of all when none is kept"""
    n = len(V)
    scores, margin = {}, float("inf")
    for c in sorted({max(range(len(v)), key=lambda j: (v[j], -j)) for v in V}):
        kept = []
        for j in range(n):
            p = V[j][c]
            if n == 1:
                kept.append(p)
                continue
            mu = sum(V[i][c] for i in range(n) if i != j) / (n - 1)
            margin = min(margin, abs(float(p - mu / 2)), abs(float(p - 2 * mu)))
            if not (p < mu / 2 or p > 2 * mu): kept.append(p)
        scores[c] = sum(kept) / len(kept) if kept else sum(V[i][c] for i in range(n)) / n
    return scores, margin


# rows nearly alike and exactly alike: the others' sd is 0 or tiny, where atol and the sd's definition decide
NEAR = [[100, 1, 2, 3, 4, 5], [101, 1, 2, 3, 4, 5], [97, 1, 2, 3, 4, 5], [3, 100, 2, 1, 4, 5], [60, 1, 2, 3, 4, 70]]
products = st.lists(  # products of 1..6 predictions over 6 classes, each row of distinct weights (one top-1 class)
    st.lists(st.permutations([1, 2, 3, 5, 8, 13]).map(list) | st.lists(st.integers(1, 40), min_size=6, max_size=6,
                                                                         unique=True) | st.sampled_from(NEAR),
             min_size=1, max_size=6),
    min_size=1, max_size=8)


@pytest.mark.parametrize("belief,definition", [("poster", poster_by_definition), ("authors", authors_by_definition)])
@settings(max_examples=40, deadline=None)
@given(weights=products)
@example(weights=[[NEAR[0], NEAR[0], NEAR[1]], [NEAR[0], NEAR[2], NEAR[1], NEAR[0]], [NEAR[3], NEAR[4]]])
def test_belief_settings_follow_their_definitions(belief, definition, weights):
    "step 08's `belief` choice -> belief_aggregate's winner and score equal the definition's (exact arithmetic)"
    from fractions import Fraction
    from hypothesis import assume
    from cdkit.base.params import make_params
    from cdkit.steps.aggregate import AggregateParams, belief_kwargs
    C = 6
    pid, rows, want = [], [], {}
    for p, prod in enumerate(weights):
        V = [[Fraction(w, sum(ws)) for w in ws] for ws in prod]
        scores, margin = definition(V)
        assume(margin > 1e-5)  # no prediction within rounding (float32 stores) of an exclusion boundary
        ranked = sorted(scores.values(), reverse=True)
        assume(len(ranked) == 1 or float(ranked[0] - ranked[1]) > 1e-5)  # a clear winner
        best = max(scores, key=lambda c: scores[c])
        want[p] = (best, float(scores[best]))
        pid += [p] * len(prod)
        rows += [[w / sum(ws) for w in ws] for ws in prod]
    cls, prob, rest = topk(np.array(rows), C)
    kw = belief_kwargs(make_params(AggregateParams, dict(belief=belief)))
    got = belief_aggregate(np.array(pid), cls, prob, rest, C, **kw)
    assert got.pred_class.tolist() == [want[p][0] for p in got.product_id]
    np.testing.assert_allclose(got.score[:, 0], [want[p][1] for p in got.product_id], rtol=1e-6)  # float32 probabilities


def test_belief_authors_scores_an_all_excluded_candidate_by_the_plain_mean():
    # two predictions: 0.9 and 0.3 for class 0, each outside [half, twice] the other: both excluded
    cls = np.array([[0, 1], [1, 0]])
    prob = np.array([[0.9, 0.1], [0.7, 0.3]])
    pid = np.zeros(2, int)
    r = belief_aggregate(pid, cls, prob, np.zeros(2), 4, m=1, rule="ratio", score="mean", min_preds=2, atol=0.0,
                         all_excluded="mean")
    # class 0: both excluded -> (0.9 + 0.3) / 2 = 0.6; class 1: 0.1 vs 0.7 excluded both -> 0.4
    assert r.pred_class[0] == 0 and r.score[0, 0] == pytest.approx(0.6)
    r = belief_aggregate(pid, cls, prob, np.zeros(2), 4, m=1, rule="ratio", score="mean", min_preds=2, atol=0.0)
    assert r.score[0, 0] == 0  # the kit's "zero": nothing was kept


def test_belief_choice_params():
    from cdkit.infer.aggregate import BELIEF_SETTINGS
    from cdkit.base.params import ParamsError, make_params
    from cdkit.steps.aggregate import AggregateParams, belief_kwargs
    for name, want in BELIEF_SETTINGS.items():
        assert belief_kwargs(make_params(AggregateParams, dict(belief=name))) == want
    assert belief_kwargs(make_params(AggregateParams, {})) == BELIEF_SETTINGS["kit"]  # the default is unchanged
    with pytest.raises(ParamsError, match="belief='authors' sets m=1"):
        make_params(AggregateParams, dict(belief="authors", m=7))
    # a notebook's parameters cell repeats every default: those are not a contradiction
    every_default = {k: f.get_default(call_default_factory=True) for k, f in AggregateParams.model_fields.items()}
    assert belief_kwargs(make_params(AggregateParams, {**every_default, "belief": "authors"})) == BELIEF_SETTINGS["authors"]
    # min_preds is checked with the parameters, not when the step has run for minutes
    with pytest.raises(ParamsError, match="min_preds=2"):
        make_params(AggregateParams, dict(min_preds=2))
    assert make_params(AggregateParams, dict(min_preds=2, ddof=0)).min_preds == 2
    assert make_params(AggregateParams, dict(min_preds=2, rule="ratio")).min_preds == 2
    P = make_params(AggregateParams, dict(belief="poster"))
    assert P.replace(stage="pseudo").belief == "poster"  # a saved file reloads (step 09 replays step 08)
