"""Where the MD5 lookup goes: among the prediction rows (before aggregation, the kit's first version)
or after aggregation (step 08 now), measured with mean and belief aggregation side by side.

Simulated products of 3-4 pictures whose model predictions are weak (the true class is one of several
similar candidates), with one picture byte-identical to a train picture of the true class, so the
lookup knows the answer for every product. Before aggregation the train labels are one more row
(one-hot); belief aggregation then often excludes it as an outlier of the other rows.

    python bench/md5_compose.py [--products 3000] [--classes 500] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cdkit.infer.aggregate import ProductPredictions, belief_aggregate, mean_aggregate
from cdkit.infer.md5 import Md5Match, Md5Votes, apply_md5


def simulate(n_products, n_classes, k, seed):
    "rows of (product_id, cls, prob, rest), the true class per product, the MD5 match per row"
    rng = np.random.default_rng(seed)
    n_pics = rng.integers(3, 5, n_products)
    pid = np.repeat(np.arange(n_products), n_pics)
    true = rng.integers(0, n_classes, n_products)
    n = len(pid)
    logits = rng.normal(0, 1, (n, n_classes))
    # weak models: the true class gets a modest boost, a product-specific decoy a similar one
    decoy = (true + 1 + rng.integers(0, n_classes - 1, n_products)) % n_classes
    logits[np.arange(n), true[pid]] += rng.normal(2.0, 1.0, n)
    logits[np.arange(n), decoy[pid]] += rng.normal(2.2, 1.0, n)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, 1)[:, :k]
    cls, prob = order, np.take_along_axis(p, order, 1).astype(np.float32)
    rest = (1 - prob.sum(1)).clip(0).astype(np.float32)
    first = np.r_[0, np.cumsum(n_pics)[:-1]]  # the first picture of each product is the duplicate
    found = np.zeros(n, bool)
    found[first] = True
    mcls = np.full((n, 1), -1, np.int64)
    mcls[first, 0] = true
    mprob = np.zeros((n, 1), np.float32)
    mprob[first, 0] = 1
    return (pid, cls, prob, rest), true, Md5Match(found, mcls, mprob, found.astype(np.int64)), first


def md5_in_rows(cls, prob, rest, match: Md5Match):
    """The kit's first placement: each matched picture's prediction row overridden by its train labels, before
    aggregation. Each row is its own 'product', so that `apply_md5` (product level) applies per row; as the first
    version did, the train label's zero-weight companions are the row's other classes, lower class first."""
    n, k = cls.shape
    rows, ones = np.arange(n), np.ones(n, np.int64)
    # one column more than the row has: no class of the union is cut before the companions are ordered
    own = ProductPredictions(rows, ones, cls[:, 0], np.c_[cls, np.full(n, -1)], np.c_[prob, np.full(n, -np.inf)])
    found = np.flatnonzero(match.found)
    votes = ProductPredictions(found, ones[found], match.cls[found, 0], match.cls[found], match.prob[found])
    out, _ = apply_md5(own, Md5Votes(votes=votes), alpha=1.0)
    tail = np.sort(np.where(out.cls[found, 1:] >= 0, out.cls[found, 1:], np.iinfo(np.int64).max), axis=1)[:, :k - 1]
    cls2, prob2, rest2 = cls.copy(), prob.astype(np.float32), rest.astype(np.float32)
    cls2[found] = np.c_[out.cls[found, 0], tail]
    prob2[found] = np.c_[out.score[found, :1], np.zeros((len(found), k - 1))]
    rest2[found] = np.clip(1 - prob2[found].sum(1), 0, None)
    return cls2, prob2, rest2


def after_aggregation(pp, pid, match: Md5Match, first):
    "Step 08's placement: each product's aggregated prediction overridden by its matched picture's train labels"
    votes = ProductPredictions(pid[first], np.ones(len(first), np.int64), match.cls[first, 0], match.cls[first], match.prob[first])
    return apply_md5(pp, Md5Votes(votes=votes), alpha=1.0)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    (pid, cls, prob, rest), true, match, first = simulate(a.products, a.classes, a.k, a.seed)
    agg = {"mean": lambda c, q, r: mean_aggregate(pid, c, q, r, a.classes),
           "belief": lambda c, q, r: belief_aggregate(pid, c, q, r, a.classes)}
    print(f"{a.products} products, {len(pid)} pictures, {a.classes} classes, one picture per product matched in train")
    print(f"{'aggregation':<12}{'no MD5':>10}{'MD5 before (rows)':>20}{'MD5 after':>12}{'ratio after/before':>20}"
          f"{'ms before':>11}{'ms after':>10}")
    for name, fn in agg.items():
        plain = fn(cls, prob, rest)
        t0 = time.perf_counter()
        before = fn(*md5_in_rows(cls, prob, rest, match))
        t1 = time.perf_counter()
        after = after_aggregation(fn(cls, prob, rest), pid, match, first)
        t2 = time.perf_counter()
        accs = [float((pp.pred_class == true).mean()) for pp in (plain, before, after)]
        print(f"{name:<12}{accs[0]:>10.3f}{accs[1]:>20.3f}{accs[2]:>12.3f}{accs[2] / max(accs[1], 1e-9):>20.2f}"
              f"{(t1 - t0) * 1e3:>11.0f}{(t2 - t1) * 1e3:>10.0f}")


if __name__ == "__main__":
    main()
