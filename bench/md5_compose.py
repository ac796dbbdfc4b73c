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

from cdkit.infer.aggregate import belief_aggregate, blend_products, mean_aggregate
from cdkit.infer.md5 import Md5Match, apply_md5


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
        c2, q2, r2 = apply_md5(cls, prob, rest, match, a.classes, alpha=1.0)
        before = fn(c2, q2, r2)
        t1 = time.perf_counter()
        after, _ = blend_products(fn(cls, prob, rest), pid[first], match.cls[first], match.prob[first], alpha=1.0)
        t2 = time.perf_counter()
        accs = [float((pp.pred_class == true).mean()) for pp in (plain, before, after)]
        print(f"{name:<12}{accs[0]:>10.3f}{accs[1]:>20.3f}{accs[2]:>12.3f}{accs[2] / max(accs[1], 1e-9):>20.2f}"
              f"{(t1 - t0) * 1e3:>11.0f}{(t2 - t1) * 1e3:>10.0f}")


if __name__ == "__main__":
    main()
