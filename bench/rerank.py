"""Benchmark the second-level re-ranker (cdkit.infer.rerank): time and peak memory, and binary vs lambdarank.

    nice -n 10 .venv/bin/python bench/rerank.py                      # 10k, 100k, 1M products x 3 members x k=5
    nice -n 10 .venv/bin/python bench/rerank.py --pictures           # + the picture-store features (k=20 store)
    nice -n 10 .venv/bin/python bench/rerank.py --sizes 10000 100000
    nice -n 10 .venv/bin/python bench/rerank.py --compare            # objective: binary vs lambdarank, demo-like data

Timing: members are random ProductPredictions (k_out=5) that agree on the top class 70% of the time;
a re-ranker is fitted out of fold on 2,000 such products (5 folds, cdkit.infer.rerank.ROUNDS rounds), then
each size runs in a fresh process: the streamed `Reranker.predict_members` (block by block, what a
test set needs), then `candidate_table` over all products and `Reranker.predict` of that table (up to
--full-max products). Random members rarely agree, so a product has ~13 candidates here against ~9 on
demo-like data: a pessimistic row count. Peak memory is the growth of the process's peak RSS over
the RSS after the inputs were made. Times are extrapolated linearly to the 1,768,182 test products.

--compare: demo-like data (48 classes in sibling groups of 4, 1-4 pictures per product in the demo's
proportions, 10% generic pictures, two picture models of different strength, their weighted ensemble);
members mean, belief (of the ensemble's pictures) and the two per-model means; 400 validation and 900
test products; OOF accuracy on validation and fold-mean accuracy on test, per seed and objective.
"""
import argparse
import resource
import subprocess
import sys
import time

import numpy as np

from cdkit.infer.aggregate import ProductPredictions, belief_aggregate, mean_aggregate
from cdkit.infer.rerank import candidate_table, fit_oof
from cdkit.infer.store import PredStore, topk

TEST_PRODUCTS = 1_768_182
N_CLASSES, K = 5270, 5


def random_members(n, seed, names=("mean", "belief", "fusion"), n_classes=N_CLASSES, k=K):
    "Random ProductPredictions over n products, a shared 'true' class on top 70% of the time; and the true classes"
    rng = np.random.default_rng(seed)
    pid = np.arange(n, dtype=np.int64) * 7 + 1000
    true = rng.integers(0, n_classes, n)
    out = {}
    for name in names:
        cls = (true[:, None] + rng.integers(1, n_classes, (n, k))) % n_classes
        hit = rng.random(n) < 0.7
        cls[hit, 0] = true[hit]
        miss = ~hit & (rng.random(n) < 0.5)  # the truth second
        cls[miss, 1] = true[miss]
        score = -np.sort(-rng.dirichlet(np.full(k + 1, 0.5), n)[:, :k], 1)
        out[name] = ProductPredictions(pid, rng.integers(1, 5, n), cls[:, 0].copy(), cls, score)
    return out, true


def random_store(pid, seed, n_classes=N_CLASSES, k=20):
    "1-4 pictures per product (the test set's 1.75 on average), random top-k rows"
    rng = np.random.default_rng(seed)
    n_pics = rng.choice(4, len(pid), p=[0.62, 0.16, 0.08, 0.14]) + 1
    ppid = np.repeat(pid, n_pics)
    img = (np.arange(len(ppid)) - np.repeat(np.cumsum(n_pics) - n_pics, n_pics)).astype(np.int8)
    cls = rng.integers(0, n_classes, (len(ppid), 1, k)).astype(np.uint16)
    prob = -np.sort(-rng.random((len(ppid), 1, k)).astype(np.float32) / k, -1)
    return PredStore(ppid, img, cls, prob, 1 - prob.sum(-1), n_classes)


def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fitted_reranker(pictures):
    """The re-ranker every size uses, fitted out of fold on 2,000 random products; seeded, so each child
    process refits the same one (nothing is unpickled between processes)"""
    members, true = random_members(2000, 0)
    store = random_store(members["mean"].product_id, 3) if pictures else None
    table = candidate_table(members, pictures=store, k=K)
    return fit_oof(table, true, seed=0), true


def one_size(n, pictures, full_max):
    """Run in a child process: time and peak-RSS growth of the streamed predict_members, then of
    candidate_table over all products, then of predict on that table (sizes <= full_max only)"""
    rr, _ = fitted_reranker(pictures)
    members, _ = random_members(n, 1)
    store = random_store(members["mean"].product_id, 2) if pictures else None
    base = rss_gb()
    t = time.perf_counter()
    rr.predict_members(members, pictures=store)
    t_stream, m_stream = time.perf_counter() - t, rss_gb() - base
    t = time.perf_counter()
    table = candidate_table(members, pictures=store, k=K)
    t_table, m_table = time.perf_counter() - t, rss_gb() - base
    t_pred = m_pred = float("nan")
    if n <= full_max:
        t = time.perf_counter()
        rr.predict(table)
        t_pred, m_pred = time.perf_counter() - t, rss_gb() - base
    print(f"RESULT {n} {len(table)} {t_stream:.3f} {m_stream:.3f} {t_table:.3f} {m_table:.3f} {t_pred:.3f} {m_pred:.3f}")


def timing(sizes, pictures, full_max):
    rr, true = fitted_reranker(pictures)
    print(f"re-ranker: {len(rr.models)} folds x {rr.rounds} rounds, {len(rr.names)} features, objective {rr.objective}; "
          f"OOF accuracy on the 2,000 fitting products {np.mean(rr.oof_predictions().pred_class == true):.3f}")
    print("peak memory: growth of the process's peak RSS (GB) over the inputs; each step's includes the steps before")
    print(f"{'products':>10} {'rows':>11} {'streamed s':>10} {'GB':>5} {'table s':>8} {'GB':>5} {'predict s':>9} {'GB':>5}")
    res = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--full-max", str(full_max)] + \
            (["--pictures"] if pictures else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT"))
        res.append((int(r[0]), int(r[1]), *map(float, r[2:])))
        print("{:>10,} {:>11,} {:>10.2f} {:>5.2f} {:>8.2f} {:>5.2f} {:>9.2f} {:>5.2f}".format(*res[-1]))
    n_, rows, ts, ms, tt, mt, tp, mp = res[-1]
    f = TEST_PRODUCTS / n_
    print(f"{TEST_PRODUCTS:>10,} {int(rows * f):>11,} {ts * f:>10.1f} {'':>5} {tt * f:>8.1f} {mt * f:>5.2f} {tp * f:>9.1f}"
          "   (time and the table's memory extrapolated linearly from the largest size; the streamed memory is one block's)")


# ---- objective comparison on demo-like data ----

def demo_like(n_products, seed, n_classes=48, k=20):
    "Members (mean, belief, m0, m1) and truths of demo-like products; see the module docstring"
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_classes + 1)
    true = rng.choice(n_classes, n_products, p=weights / weights.sum())
    n_pics = rng.choice(4, n_products, p=[0.57, 0.22, 0.10, 0.11]) + 1
    pid = np.arange(n_products, dtype=np.int64) * 3 + 17
    ppid, ptrue = np.repeat(pid, n_pics), np.repeat(true, n_pics)
    img = (np.arange(len(ppid)) - np.repeat(np.cumsum(n_pics) - n_pics, n_pics)).astype(np.int8)
    noise = (rng.random(len(ppid)) < 0.1) & (img > 0)  # a generic picture, never the only one
    generic = rng.integers(0, n_classes, 6)[rng.integers(0, 6, len(ppid))]
    sibling = (ptrue // 4) * 4 + rng.integers(0, 4, len(ppid))
    probs = []
    for strength in (2.2, 1.6):  # model 0 stronger than model 1
        logit = rng.normal(0, 1, (len(ppid), n_classes))
        r = np.arange(len(ppid))
        logit[r, np.where(noise, generic, ptrue)] += strength + rng.normal(0, 0.8, len(ppid))
        logit[r, np.where(noise, generic, sibling)] += 1.2  # a confusable sibling
        e = np.exp(logit * 1.5)
        probs.append(e / e.sum(1, keepdims=True))
    ens = 0.7 * probs[0] + 0.3 * probs[1]

    def store(p):
        c, v, rest = topk(p, k)
        return PredStore(ppid, img, c[:, None].astype(np.uint16), v[:, None], rest[:, None], n_classes)

    stores = [store(p) for p in (ens, *probs)]

    def agg(fn, s, **kw):
        return fn(s.product_id, s.cls[:, 0].astype(np.int64), s.prob[:, 0], s.rest[:, 0], n_classes, k_out=5, **kw)

    members = dict(mean=agg(mean_aggregate, stores[0]), belief=agg(belief_aggregate, stores[0]),
                   m0=agg(mean_aggregate, stores[1]), m1=agg(mean_aggregate, stores[2]))
    return members, true, stores[0]


def compare(seeds, n_valid=400, n_test=900):
    from cdkit.base.metrics import product_accuracy
    print(f"{'seed':>4} {'best member':>18} {'binary oof':>10} {'test':>6} {'lambdarank oof':>14} {'test':>6}")
    rows = []
    for seed in seeds:
        members, true, ens = demo_like(n_valid + n_test, seed)
        valid = np.zeros(n_valid + n_test, bool)
        valid[np.random.default_rng(seed + 100).permutation(n_valid + n_test)[:n_valid]] = True
        split = {name: {} for name in ("valid", "test")}
        for name, pp in members.items():
            for s, sel in (("valid", valid), ("test", ~valid)):
                split[s][name] = ProductPredictions(pp.product_id[sel], pp.n_preds[sel], pp.pred_class[sel], pp.cls[sel], pp.score[sel])
        t_valid, t_test = true[valid], true[~valid]
        tv, tt = candidate_table(split["valid"], pictures=ens), candidate_table(split["test"], pictures=ens)
        acc = {name: product_accuracy(pp.pred_class, t_test) for name, pp in split["test"].items()}
        best = max(acc, key=acc.get)
        r = [seed, best, acc[best]]
        for obj in ("binary", "lambdarank"):
            rr = fit_oof(tv, t_valid, seed=seed, objective=obj)
            r += [product_accuracy(rr.oof_predictions().pred_class, t_valid), product_accuracy(rr.predict(tt).pred_class, t_test)]
        rows.append(r)
        print(f"{seed:>4} {r[1]:>12} {r[2]:.3f} {r[3]:>10.3f} {r[4]:>6.3f} {r[5]:>14.3f} {r[6]:>6.3f}")
    m = np.array([r[2:] for r in rows]).mean(0)
    print(f"mean {'':>12} {m[0]:.3f} {m[1]:>10.3f} {m[2]:>6.3f} {m[3]:>14.3f} {m[4]:>6.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--pictures", action="store_true", help="add a picture store (k=20) and its features")
    ap.add_argument("--compare", action="store_true", help="binary vs lambdarank on demo-like data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--full-max", type=int, default=100_000, help="predict on the whole table up to this size (the streamed variant runs at every size)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one: one_size(a.one, a.pictures, a.full_max)
    elif a.compare: compare(a.seeds)
    else: timing(a.sizes, a.pictures, a.full_max)
