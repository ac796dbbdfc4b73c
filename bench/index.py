"""Index build speed and memory: cdkit's build_index next to the common decode_file_iter loop.

    python bench/index.py                  # writes the `bench` synthetic preset to data/bench once
    python bench/index.py --bson train.bson

Both read the same file after a warm-up pass (so both are timed from the page cache, not the disk).
Memory: the index's own bytes per product and the build's allocations (tracemalloc): what it keeps
per product, extrapolated linearly to the real train.bson (7,069,896 products), plus the peak
scratch space of one batch (constant once the file has more products than a batch)."""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc
from pathlib import Path

import bson

from cdkit.data.bsonfile import build_index
from cdkit.base.paths import DATA

REAL_PRODUCTS = 7_069_896


def common_loop(path):
    "The loop most public kernels use to list products"
    rows = []
    with open(path, "rb") as f:
        for d in bson.decode_file_iter(f):
            rows.append((d["_id"], d.get("category_id"), len(d["imgs"])))
    return rows


def timed(fn, *a, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*a)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bson", help="a competition-format BSON file (default: the bench preset)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    path = Path(a.bson) if a.bson else DATA / "bench" / "train.bson"
    if not path.exists():
        from cdkit.data.synth import write_dataset
        print(f"writing the bench preset to {path.parent} ...", flush=True)
        write_dataset(path.parent, preset="bench", seed=0)
    size = os.path.getsize(path)
    with open(path, "rb") as f:  # warm the page cache for both contenders
        while f.read(64 << 20):
            pass
    t_ours, index = timed(build_index, path, repeat=a.repeat)
    t_loop, rows = timed(common_loop, path, repeat=a.repeat)
    n = len(index)
    assert len(rows) == n and [r[0] for r in rows[:100]] == index["product_id"][:100].tolist()
    print(f"file: {path} ({size / 1e6:,.0f} MB, {n:,} products, {int(index['n_imgs'].sum()):,} pictures)")
    print(f"{'':24}{'seconds':>10}{'MB/s':>10}{'products/s':>14}")
    for name, t in (("decode_file_iter loop", t_loop), ("cdkit build_index", t_ours)):
        print(f"{name:24}{t:10.2f}{size / 1e6 / t:10.0f}{n / t:14,.0f}")
    print(f"speed-up: {t_loop / t_ours:.2f}x (target >= 2x)")

    per_product = index.memory_usage(index=False, deep=True).sum() / n
    tracemalloc.start()
    index = build_index(path)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # what stays grows with the products (columns + spare capacity of the growing arrays); the rest
    # of the peak is the per-batch scratch space, bounded by build_index's batch size
    est = kept / n * REAL_PRODUCTS + (peak - kept)
    print(f"index: {per_product:.1f} bytes/product -> {per_product * REAL_PRODUCTS / 1e6:,.0f} MB for "
          f"{REAL_PRODUCTS:,} products")
    print(f"build (tracemalloc): {kept / n:.1f} bytes/product kept + {(peak - kept) / 1e6:.1f} MB batch scratch; "
          f"extrapolated peak for {REAL_PRODUCTS:,} products: {est / 1e6:,.0f} MB (target <= 200 MB)")

if __name__ == "__main__":
    sys.exit(main())
