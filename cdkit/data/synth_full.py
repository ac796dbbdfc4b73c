"""A synthetic data set at the competition's real size, for rehearsing every step before the download.

`write_full_dataset(out_dir, scale=1.0, seed=0, category_csv=None)` writes the same files as
`cdkit.data.synth.write_dataset` (train.bson, test.bson, category_names.csv, sample_submission.csv,
test_truth.csv, synth.json) with the real counts times `scale`:

    train  7,069,896 products  12,371,293 pictures   (1: 4,369,441  2: 1,128,588  3: 542,792  4: 1,029,075)
    test   1,768,182 products   3,095,080 pictures   (the train shares of 2 and 3 pictures, 1 and 4 solved
                                                      so that both totals are exact, as bench/aggregate.py)

over 5,270 categories: the real taxonomy (49 level-1, 483 level-2 names) from `category_csv`, or a
generated one of the same shape. Category frequencies follow a Zipf-Mandelbrot tail fitted to the
real train set's extremes (79,640 products in the largest category, 12 in the smallest, 7,069,896
in all): frequency ~ (rank + 113.1) ** -2.2835; which category gets which rank is drawn.

Pictures are the real 180x180 (so the loaders take the competition's path, no resizing), but plain
and blurred so that they weigh about 0.8 KB instead of 4.7 KB: the full set is about 14 GB instead
of 72 GB. They are drawn once per category (`POOL` per category) and made distinct by a JPEG comment
segment carrying a picture tag, which decoders skip: MD5 sees distinct pictures, except the byte
copies the real data also has (about 37% of train pictures repeat another train picture of their
category; `TEST_DUPLICATE_RATE` of test pictures copy a train picture of their category).

Writing streams one document at a time (memory stays at the plan's arrays, about 60 bytes a picture)
with a tqdm bar; the folder carries `cdkit.base.io`'s incomplete marker until the last file is in place.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import bson
import numpy as np
import pandas as pd

from cdkit.base.io import atomic_open, mark_complete, mark_incomplete, writing_dataset

TRAIN_PRODUCTS, TRAIN_PICTURES = 7_069_896, 12_371_293
TEST_PRODUCTS, TEST_PICTURES = 1_768_182, 3_095_080
TRAIN_PICTURE_COUNTS = (4_369_441, 1_128_588, 542_792, 1_029_075)  # train products with 1, 2, 3, 4 pictures
N_CATEGORIES, N_LEVEL1, N_LEVEL2 = 5270, 49, 483
ZIPF_OFFSET, ZIPF_EXPONENT = 113.1, 2.2835  # fitted: largest category 79,640 products, smallest 12
TRAIN_DUPLICATE_RATE = 1 - 7_770_000 / TRAIN_PICTURES  # about 7.77 M of the 12.37 M train pictures are unique
TEST_DUPLICATE_RATE = 0.1   # assumed: share of test pictures that are byte copies of a train picture
POOL = 2                    # pre-encoded pictures per category
JPEG_QUALITY = 30
FILES = ("category_names.csv", "train.bson", "test.bson", "sample_submission.csv", "test_truth.csv", "synth.json")
_COM = b"\xff\xd8\xff\xfe\x00\x0a"  # SOI, then a comment segment of 2 + 8 bytes: the picture tag


def picture_counts(products, pictures, shares=TRAIN_PICTURE_COUNTS):
    """Products with 1..4 pictures: 2 and 3 in `shares`' proportions, 1 and 4 solved so that both
    totals are exact -> int64 (4,)"""
    share = np.asarray(shares, np.float64) / np.sum(shares)
    n2, n3 = (int(x) for x in np.round(share[1:3] * products))
    n3 -= (pictures - products - n2 - 2 * n3) % 3  # each product moved from 3 to 1 picture adds 2 to the rest
    n4 = (pictures - products - n2 - 2 * n3) // 3
    counts = np.array([products - n2 - n3 - n4, n2, n3, n4], np.int64)
    if counts.min() < 0 or counts @ [1, 2, 3, 4] != pictures:
        raise ValueError(f"no split of {products} products into 1-4 pictures gives {pictures} pictures")
    return counts


def scaled_counts(scale):
    "Products and pictures of train and test at `scale` (the real counts times scale, rounded)"
    if not 0 < scale <= 1: raise ValueError(f"scale must be in (0, 1], got {scale}")
    return {name: int(round(n * scale)) for name, n in (
        ("train_products", TRAIN_PRODUCTS), ("train_pictures", TRAIN_PICTURES),
        ("test_products", TEST_PRODUCTS), ("test_pictures", TEST_PICTURES))}


def category_frequencies(n=N_CATEGORIES):
    "Share of products of the category of each rank 1..n (the fitted Zipf-Mandelbrot tail)"
    f = (np.arange(1, n + 1) + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    return f / f.sum()


def _catalog(category_csv, rng):
    "category_names.csv rows: the real file's, or a generated taxonomy of the same shape"
    if category_csv is not None:
        return pd.read_csv(category_csv, dtype={"category_id": np.int64}, keep_default_na=False)
    ids = 1_000_000_000 + np.sort(rng.choice(30_000, N_CATEGORIES, replace=False))
    l2_of_l1 = np.sort(np.r_[np.arange(N_LEVEL1), rng.integers(0, N_LEVEL1, N_LEVEL2 - N_LEVEL1)])
    l2 = np.sort(np.r_[np.arange(N_LEVEL2), rng.integers(0, N_LEVEL2, N_CATEGORIES - N_LEVEL2)])
    return pd.DataFrame({"category_id": ids,
                         "category_level1": [f"UNIVERS {i:02d}" for i in l2_of_l1[l2]],
                         "category_level2": [f"RAYON {i:03d}" for i in l2],
                         "category_level3": [f"CATEGORIE {i:04d}" for i in range(N_CATEGORIES)]})


class _Pool:
    "POOL plain, smooth 180x180 JPEGs of a category (about 0.8 KB each), drawn when first asked for"
    def __init__(self, level1, seed):
        self.level1, self.seed, self.cache = level1, seed, {}

    def __getitem__(self, c):
        if c not in self.cache: self.cache[c] = self._draw(c)
        return self.cache[c]

    def _draw(self, c):
        from PIL import Image, ImageDraw
        rng = np.random.default_rng([self.seed, 1, c])  # per category: the same bytes whatever the order
        base = np.random.default_rng([self.seed, 2, int(self.level1[c])]).integers(40, 255, 3)  # colour family
        row = []
        for _ in range(POOL):
            img = Image.new("RGB", (45, 45), tuple(int(x) for x in rng.integers(170, 256, 3)))
            x0, y0 = rng.uniform(3, 20, 2)
            x1, y1 = rng.uniform(25, 42, 2)
            ImageDraw.Draw(img).ellipse([x0, y0, x1, y1],
                                        fill=tuple(int(x) for x in (base + rng.integers(-40, 40, 3)).clip(0, 255)))
            buf = io.BytesIO()  # drawn small and enlarged: smooth edges, small files
            img.resize((180, 180), Image.BICUBIC).save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
            row.append(buf.getvalue()[2:])  # without SOI: written after the tag's comment segment
        return row


class _Plan:
    "One split's products (ids ascending, category index, picture counts) and each picture's identity"
    def __init__(self, ids, cat, n_imgs, rng):
        self.ids, self.cat, self.n_imgs = ids, cat, n_imgs
        self.starts = np.r_[0, np.cumsum(n_imgs)]
        self.pic_cat = np.repeat(cat, n_imgs).astype(np.int32)
        n = int(self.starts[-1])
        self.slot = rng.integers(0, POOL, n).astype(np.int8)
        self.tag = np.arange(n, dtype=np.int64)


def _copy_within_category(plan, rate, rng):
    "A `rate` share of pictures become byte copies of the previous original picture of their category"
    order = np.argsort(plan.pic_cat, kind="stable")
    sc = plan.pic_cat[order]
    first = np.r_[True, sc[1:] != sc[:-1]]
    dup = (rng.random(len(order)) < rate) & ~first
    src = np.maximum.accumulate(np.where(dup, 0, np.arange(len(order))))  # last original at or before
    plan.slot[order] = plan.slot[order[src]]
    plan.tag[order] = plan.tag[order[src]]
    return int(dup.sum())


def _copy_from_train(test, train, rate, rng):
    "A `rate` share of test pictures become byte copies of a random train picture of their category"
    order = np.argsort(train.pic_cat, kind="stable")
    lo = np.searchsorted(train.pic_cat[order], test.pic_cat, "left")
    hi = np.searchsorted(train.pic_cat[order], test.pic_cat, "right")
    dup = (rng.random(len(test.pic_cat)) < rate) & (hi > lo)
    src = order[lo[dup] + (rng.random(int(dup.sum())) * (hi - lo)[dup]).astype(np.int64)]
    test.slot[dup], test.tag[dup] = train.slot[src], train.tag[src]
    return int(dup.sum())


def _write_bson(path, plan, pool, category_ids=None, desc="", progress=True):
    "Stream the documents {_id, imgs: [{picture}], category_id} (no category_id for test); returns bytes"
    from tqdm.auto import tqdm
    encode, starts, tag, pic_cat, written = bson.encode, plan.starts, plan.tag, plan.pic_cat, 0
    step = 50_000
    with atomic_open(path, "wb") as f, tqdm(total=len(plan.ids), desc=desc, unit=" products", unit_scale=True,
                                             disable=not progress, mininterval=2) as bar:
        for a in range(0, len(plan.ids), step):
            b = min(a + step, len(plan.ids))
            p0, p1 = int(starts[a]), int(starts[b])
            tags = [t.to_bytes(8, "little") for t in tag[p0:p1].tolist()]
            bodies = [pool[c][s] for c, s in zip(pic_cat[p0:p1].tolist(), plan.slot[p0:p1].tolist())]
            pics = [_COM + t + body for t, body in zip(tags, bodies)]
            ids = plan.ids[a:b].tolist()
            st = (starts[a:b + 1] - p0).tolist()
            labels = category_ids[plan.cat[a:b]].tolist() if category_ids is not None else None
            chunk = []
            for j in range(b - a):
                doc = {"_id": ids[j], "imgs": [{"picture": p} for p in pics[st[j]:st[j + 1]]]}
                if labels is not None: doc["category_id"] = labels[j]
                chunk.append(encode(doc))
            data = b"".join(chunk)
            f.write(data)
            written += len(data)
            bar.update(b - a)
    return written


def _write_csv(path, header, columns):
    "A two-column csv from int arrays, written in blocks (fast at millions of rows)"
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(header) + "\n")
        a, b = columns
        for s in range(0, len(a), 500_000):
            f.write("".join(f"{x},{y}\n" for x, y in zip(a[s:s + 500_000].tolist(), b[s:s + 500_000].tolist())))


def write_full_dataset(out_dir, scale=1.0, seed=0, category_csv=None, progress=True) -> dict:
    """Write the full-size synthetic set (the real counts times `scale`) into `out_dir`; returns a summary.

    category_csv: the real category_names.csv (its 5,270 categories and hierarchy are used and copied),
    or None for a generated taxonomy of the same shape. The summary (also in synth.json) holds counts,
    bytes per file and seconds per phase."""
    if not isinstance(seed, (int, np.integer)) or seed < 0: raise ValueError(f"seed={seed!r} must be a non-negative int")
    want = scaled_counts(scale)
    # only a new or empty folder, or one the kit wrote (io.writing_dataset): never another data set
    with writing_dataset(out_dir, f"write_full_dataset(scale={scale}, seed={seed})"):
        return _write_full(Path(out_dir), want, scale, seed, category_csv, progress)


def _write_full(out, want, scale, seed, category_csv, progress):
    mark_incomplete(out, f"write_full_dataset(scale={scale}, seed={seed})")
    t0 = time.perf_counter()
    seconds = {}
    rng = np.random.default_rng([seed, 0])
    catalog = _catalog(category_csv, rng)
    if len(catalog) < 1: raise ValueError(f"{category_csv}: no categories")
    cat_ids = catalog["category_id"].to_numpy(np.int64)
    level1 = pd.factorize(catalog["category_level1"])[0]
    freq = category_frequencies(len(catalog))[rng.permutation(len(catalog))]  # which category gets which rank

    n_train, n_test = want["train_products"], want["test_products"]
    gaps = rng.integers(1, 5, n_train + n_test)                     # ids ascending with gaps, as the real ones
    ids = np.cumsum(gaps).astype(np.int64) - 1
    is_test = np.zeros(len(ids), bool)
    is_test[rng.choice(len(ids), n_test, replace=False)] = True
    plans = {}
    for name, sel, pictures in (("train", ~is_test, want["train_pictures"]), ("test", is_test, want["test_pictures"])):
        r = np.random.default_rng([seed, 3 if name == "train" else 4])
        counts = picture_counts(int(sel.sum()), pictures)
        n_imgs = r.permutation(np.repeat(np.arange(1, 5, dtype=np.uint8), counts))
        cat = r.choice(len(catalog), int(sel.sum()), p=freq).astype(np.int32)
        plans[name] = _Plan(ids[sel], cat, n_imgs, r)
    train, test = plans["train"], plans["test"]
    test.tag += len(train.tag)  # test originals are distinct from every train picture
    n_train_copies = _copy_within_category(train, TRAIN_DUPLICATE_RATE, np.random.default_rng([seed, 5]))
    n_test_copies = _copy_from_train(test, train, TEST_DUPLICATE_RATE, np.random.default_rng([seed, 6]))
    seconds["plan"] = time.perf_counter() - t0

    pool = _Pool(level1, seed)
    with atomic_open(out / "category_names.csv", "w", newline="", encoding="utf-8") as f:
        catalog.to_csv(f, index=False, lineterminator="\n")
    t = time.perf_counter()
    _write_bson(out / "train.bson", train, pool, cat_ids, "train.bson", progress)
    seconds["train.bson"] = time.perf_counter() - t
    t = time.perf_counter()
    _write_bson(out / "test.bson", test, pool, None, "test.bson", progress)
    seconds["test.bson"] = time.perf_counter() - t
    t = time.perf_counter()
    top = int(cat_ids[np.bincount(train.cat, minlength=len(cat_ids)).argmax()])
    _write_csv(out / "sample_submission.csv", ("_id", "category_id"), (test.ids, np.full(len(test.ids), top)))
    _write_csv(out / "test_truth.csv", ("_id", "category_id"), (test.ids, cat_ids[test.cat]))
    seconds["csv"] = time.perf_counter() - t

    counts = {**want, "categories": len(catalog),
              "train_picture_counts": np.bincount(train.n_imgs, minlength=5)[1:].tolist(),
              "test_picture_counts": np.bincount(test.n_imgs, minlength=5)[1:].tolist(),
              "train_categories_present": int(len(np.unique(train.cat))),
              "train_duplicate_pictures": n_train_copies, "test_duplicates_of_train": n_test_copies,
              "most_frequent_train_category": top}
    meta = {"preset": "full", "scale": float(scale), "seed": int(seed),
            "category_csv": None if category_csv is None else str(category_csv), "counts": counts}
    with atomic_open(out / "synth.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    seconds["total"] = time.perf_counter() - t0
    mark_complete(out)
    return {**meta, "out_dir": str(out), "bytes": {name: (out / name).stat().st_size for name in FILES},
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def main(argv=None):
    "python -m cdkit.data.synth_full OUT_DIR [--scale S] [--seed N] [--category-csv PATH]"
    import argparse
    p = argparse.ArgumentParser(prog="python -m cdkit.data.synth_full", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--scale", type=float, default=1.0, help="times the real product counts (1/16: 0.0625)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--category-csv", default=None, help="the real category_names.csv (default: a generated taxonomy)")
    a = p.parse_args(argv)
    res = write_full_dataset(a.out_dir, a.scale, a.seed, a.category_csv)
    print(json.dumps({k: res[k] for k in ("counts", "bytes", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
