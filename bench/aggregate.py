"""Benchmark belief aggregation at test-set scale against a per-product Python loop.

    .venv/bin/python bench/aggregate.py                 # 1,768,182 products, 1 view
    .venv/bin/python bench/aggregate.py --views 2       # two TTA views per picture
    .venv/bin/python bench/aggregate.py --products 100000
    .venv/bin/python bench/aggregate.py --models 4 --views 2   # the study's wording: 24.8 M picture x model x view rows
    .venv/bin/python bench/aggregate.py --models 4 --views 2 --stores DIR   # the same through prediction stores

Pictures per product follow the train set's distribution (1: 4,369,441, 2: 1,128,588, 3: 542,792,
4: 1,029,075 products of 7,069,896), scaled to the test set and adjusted so that the totals are
exactly 1,768,182 products and 3,095,080 pictures (see `picture_counts`). Probabilities are random
and peaked (gamma(0.3) weights over 20 classes plus the rest); a product's pictures share their top
class 80% of the time. Prints vectorized time and memory, the loop's time on a subset, extrapolated
to all products, and the ratio.
"""
import argparse
import resource
import time
from pathlib import Path
import tracemalloc

import numpy as np

from cdkit.infer.aggregate import belief_aggregate
from cdkit.infer.store import spread

TEST_PRODUCTS, TEST_PICTURES = 1_768_182, 3_095_080
TRAIN_COUNTS = np.array([4_369_441, 1_128_588, 542_792, 1_029_075])  # products with 1, 2, 3, 4 pictures
N_CLASSES, K = 5270, 20


def picture_counts(products, pictures):
    "Products with 1..4 pictures in train proportions, n1 and n4 solved so both totals are exact"
    share = TRAIN_COUNTS / TRAIN_COUNTS.sum()
    n2, n3 = (np.round(share[1:3] * products)).astype(int)
    while (pictures - products - n2 - 2 * n3) % 3: n3 += 1
    n4 = (pictures - products - n2 - 2 * n3) // 3
    n1 = products - n2 - n3 - n4
    counts = np.array([n1, n2, n3, n4])
    assert counts.min() >= 0 and counts.sum() == products and counts @ [1, 2, 3, 4] == pictures
    return counts


def make_rows(counts, views, rng, chunk=1 << 20):
    """Random prediction rows in random order: product id, cls (rows, K) uint16, prob float32 sorted
    descending, rest; `views` rows per picture (models x TTA views). Generated in chunks of rows, so
    that 24.8 M rows need no more than the arrays themselves (3.3 GB)."""
    n_pics = np.repeat(np.arange(1, 5), counts)
    rng.shuffle(n_pics)
    true = rng.integers(0, N_CLASSES, len(n_pics))
    prod = np.repeat(np.arange(len(n_pics), dtype=np.int32), n_pics * views)
    rng.shuffle(prod)
    N = len(prod)
    pid = prod.astype(np.int64) * 10 + 1_000_000
    pool = np.stack([rng.permutation(N_CLASSES - 1)[:K - 1] + 1 for _ in range(256)])  # distinct nonzero offsets
    cls, prob, rest = np.empty((N, K), np.uint16), np.empty((N, K), np.float32), np.empty(N, np.float32)
    for a in range(0, N, chunk):
        n = min(chunk, N - a)
        t = true[prod[a:a + n]]
        top = np.where(rng.random(n) < 0.8, t, rng.integers(0, N_CLASSES, n))
        cls[a:a + n, 0] = top
        cls[a:a + n, 1:] = (top[:, None] + pool[rng.integers(0, 256, n)]) % N_CLASSES
        w = rng.gamma(0.3, size=(n, K + 1)).astype(np.float32)
        w[:, 0] += 1.0  # the top class is the clear favourite
        w /= w.sum(1, keepdims=True)
        prob[a:a + n] = -np.sort(-w[:, :K], 1)
        rest[a:a + n] = 1 - prob[a:a + n].sum(1)
    return pid, cls, prob, rest


def write_stores(counts, models, views, folder, rng, chunk=1 << 18):
    """`models` prediction stores (uint8, k=K) of `views` views over the test pictures, product by product;
    a picture's predictions share the product's true class 80% of the time, as in make_rows"""
    from cdkit.infer.store import StoreWriter
    n_pics = np.repeat(np.arange(1, 5), counts)
    rng.shuffle(n_pics)
    pid = np.repeat(np.arange(len(n_pics)) * 10 + 1_000_000, n_pics)
    starts = np.repeat(np.cumsum(n_pics) - n_pics, n_pics)
    img = (np.arange(len(pid)) - starts).astype(np.int8)
    true = np.repeat(rng.integers(0, N_CLASSES, len(n_pics)), n_pics)
    pool = np.stack([rng.permutation(N_CLASSES - 1)[:K - 1] + 1 for _ in range(256)])
    paths = []
    for m in range(models):
        path = Path(folder) / f"model{m}.store"
        with StoreWriter(path, N_CLASSES, K, views, "uint8", overwrite=True) as w:
            for a in range(0, len(pid), chunk):
                n = min(chunk, len(pid) - a)
                t = np.repeat(true[a:a + n], views)
                top = np.where(rng.random(n * views) < 0.8, t, rng.integers(0, N_CLASSES, n * views))
                cls = np.empty((n * views, K), np.uint16)
                cls[:, 0], cls[:, 1:] = top, (top[:, None] + pool[rng.integers(0, 256, n * views)]) % N_CLASSES
                g = rng.gamma(0.3, size=(n * views, K + 1)).astype(np.float32)
                g[:, 0] += 1.0
                g /= g.sum(1, keepdims=True)
                prob = -np.sort(-g[:, :K], 1)
                w.add_topk(pid[a:a + n], img[a:a + n], cls.reshape(n, views, K), prob.reshape(n, views, K),
                           (1 - prob.sum(1)).reshape(n, views))
        paths.append(path)
    return paths


def main_stores(args, counts):
    "Write the stores, then time loading them and belief aggregation a block of products at a time"
    from cdkit.infer.aggregate import aggregate_stores
    from cdkit.infer.store import load_store
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    paths = write_stores(counts, args.models, args.views, args.stores, rng)
    print(f"{args.models} stores of {args.views} views written to {args.stores} in {time.perf_counter() - t:.1f} s")
    t, c = time.perf_counter(), time.process_time()
    stores = [load_store(p) for p in paths]
    t_load, c_load = time.perf_counter() - t, time.process_time() - c
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    t, c = time.perf_counter(), time.process_time()
    res = aggregate_stores(stores, "belief", threads=args.threads)
    t_agg, c_agg = time.perf_counter() - t, time.process_time() - c
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"load_store x {len(stores)}: {t_load:.1f} s wall ({c_load:.1f} s CPU), peak RSS {rss_load:,.0f} MB")
    print(f"aggregate_stores (belief, {len(res.excluded):,} rows, {len(res.product_id):,} products): {t_agg:.1f} s wall "
          f"({c_agg:.1f} s CPU), process peak RSS {rss:,.0f} MB; {res.excluded.sum():,} rows excluded")


def loop_belief(pid, cls, prob, rest, m=5, z=1.96, min_preds=3, ddof=1, atol=0.01):
    "Straightforward per-product loop (numpy inside each product): predicted class per product"
    spr = spread(rest, N_CLASSES, K)
    order = np.argsort(pid, kind="stable")
    sp = pid[order]
    bounds = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1], True])
    out = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        n = len(rows)
        cands = np.unique(cls[rows, :m])
        X = np.repeat(spr[rows, None].astype(np.float64), len(cands), 1)
        for j, r in enumerate(rows):
            hit = np.isin(cls[r], cands)
            X[j, np.searchsorted(cands, cls[r][hit])] = prob[r][hit]
        incl = np.ones_like(X, bool)
        if n >= min_preds:
            for j in range(n):
                others = np.delete(X, j, 0)
                mu, sd = others.mean(0), others.std(0, ddof=ddof)
                incl[j] = ~(np.abs(X[j] - mu) > np.maximum(z * sd, atol) + 1e-12)
        score = (X * incl).sum(0)
        out[sp[a]] = cands[np.argmax(score)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=TEST_PRODUCTS, help="products (pictures scale with them)")
    ap.add_argument("--views", type=int, default=1, help="TTA views per picture and model")
    ap.add_argument("--models", type=int, default=1, help="models per picture (prediction rows = pictures x models x views)")
    ap.add_argument("--loop-products", type=int, default=20_000, help="subset timed with the per-product loop")
    ap.add_argument("--threads", type=int, default=None, help="threads for the vectorized run (default: cores, at most 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stores", default=None, help="write stores (models x views) here and aggregate them block by block")
    args = ap.parse_args()

    pictures = round(args.products * TEST_PICTURES / TEST_PRODUCTS)
    counts = picture_counts(args.products, pictures)
    per_pic = args.models * args.views
    print(f"products {args.products:,}  pictures {pictures:,}  models {args.models}  views {args.views}  k {K}  classes {N_CLASSES}")
    print("products with 1/2/3/4 pictures: " + " / ".join(f"{c:,}" for c in counts)
          + "  (" + " / ".join(f"{c / counts.sum():.4f}" for c in counts) + ")")
    if args.stores: return main_stores(args, counts)
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    pid, cls, prob, rest = make_rows(counts, per_pic, rng)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    input_mb = sum(a.nbytes for a in (pid, cls, prob, rest)) / 2**20
    print(f"prediction rows {len(pid):,}, input arrays {input_mb:,.0f} MB, generated in {time.perf_counter() - t:.1f} s")

    tracemalloc.start()
    t, c = time.perf_counter(), time.process_time()
    res = belief_aggregate(pid, cls, prob, rest, N_CLASSES, threads=args.threads)
    t_vec, c_vec = time.perf_counter() - t, time.process_time() - c
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"vectorized belief_aggregate: {t_vec:.2f} s wall ({c_vec:.2f} s CPU), peak allocated during the call {peak:,.0f} MB, "
          f"process peak RSS {rss:,.0f} MB (after making the inputs: {rss_inputs:,.0f} MB); "
          f"{res.excluded.sum():,} rows excluded for the winning class")

    sub_ids = rng.choice(res.product_id, min(args.loop_products, len(res.product_id)), replace=False)
    sel = np.flatnonzero(np.isin(pid, sub_ids))
    t, c = time.perf_counter(), time.process_time()
    ref = loop_belief(pid[sel], cls[sel], prob[sel], rest[sel])
    t_loop, c_loop = time.perf_counter() - t, time.process_time() - c
    mine = dict(zip(res.product_id, res.pred_class))
    agree = np.mean([mine[p] == c for p, c in ref.items()])
    scale = len(res.product_id) / len(ref)
    print(f"per-product loop: {t_loop:.2f} s wall ({c_loop:.2f} s CPU) for {len(ref):,} products -> "
          f"{t_loop * scale:,.0f} s wall ({c_loop * scale:,.0f} s CPU) extrapolated to {len(res.product_id):,}; "
          f"same predicted class on the subset: {agree:.4%}")
    print(f"speed-up: {t_loop * scale / t_vec:,.0f}x wall, {c_loop * scale / c_vec:,.0f}x CPU")


if __name__ == "__main__":
    main()
