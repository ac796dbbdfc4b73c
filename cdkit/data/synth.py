"""Synthetic data set in exactly the competition's format, for demos, tests and benchmarks.

`write_dataset(out_dir, preset="demo", seed=0, **overrides)` writes train.bson, test.bson,
category_names.csv and sample_submission.csv as Cdiscount published them, plus test_truth.csv (the
true test labels, which the real data does not have) and synth.json (every knob and count).

Pictures are 180x180 JPEGs of a product-like object on a light background. Each category level
changes something a CNN can learn: level1 the object's outline (circle, bottle, star, ...), level2
its colour (siblings sit a few hue degrees apart, so they can be confused), level3 a pattern or mark
on it (stripes, dots, a band, a letter, ...). The hard parts of the real data are knobs: a long tail
of category frequencies, generic pictures (logo, size chart, ...) inside products of any category,
label noise, test pictures that are byte copies of train pictures, and a train/test lighting shift.

Product-level knobs give each way of combining a product's 1-4 pictures something to do:
- `main_first`: picture 0 is the main photo, never a generic picture nor a partial view. Generic
  pictures then go to later pictures only, each with probability noise_picture_rate * E[pictures
  that could be generic without main_first] / E[later pictures] (at most 1), so that their expected
  total stays what noise_picture_rate gives without it. Off: generic pictures anywhere, as before,
  and the main photo is the first picture that is not generic.
- `partial_view_rate`: share of the rendered pictures after the main photo that are close-ups: the
  object's surface (colour and pattern) fills most of the frame, its outline mostly outside it, so
  the picture tells level2 and level3 but hardly level1.
- `split_info_rate`: share of multi-picture products (with a rendered picture after the main photo)
  whose information is split: the main photo shows outline and colour with no pattern, one later
  picture is a close-up of the pattern, any other rendered picture is plain too. Only the two
  together name the leaf category.
- `hierarchical_tail`: rare leaves under common parents. Each level2 parent gets a frequency from a
  mild Zipf (`parent_zipf_exponent`) that its leaves share by a steep one (`leaf_zipf_exponent`);
  off, one Zipf over all categories (`zipf_exponent`).
Test pictures that copy a train picture copy one of the same kind (full view, close-up, plain).

Every random choice comes from `seed` through one independent stream per concern, so the same seed
gives byte-identical files, and changing one knob (say `label_noise_rate`) leaves the draws of the
others as they were.
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import bson
import numpy as np
from PIL import Image, ImageDraw

from cdkit.base.io import atomic_open, mark_complete, mark_incomplete, sweep_temps, writing_dataset


@dataclass
class SynthConfig:
    "Knobs of the synthetic data set; the defaults are the `demo` preset"
    # catalog: n_level1 * n_level2_per_level1 * n_level3_per_level2 categories
    n_level1: int = 4                   # object outline families; at most len(SHAPES)
    n_level2_per_level1: int = 3        # colours per family; siblings are `sibling_hue_step` apart
    n_level3_per_level2: int = 4        # patterns per colour; at most len(PATTERNS)
    # products
    n_train_products: int = 3600        # documents in train.bson
    n_test_products: int = 900          # documents in test.bson (ids interleave with train's)
    zipf_exponent: float = 1.0          # category frequency ~ 1/rank**s: few common, many rare
    hierarchical_tail: bool = True      # rare leaves under common parents: the two Zipfs below
    #                                     replace zipf_exponent (False: one Zipf, as before)
    parent_zipf_exponent: float = 0.5   # level2 parents' frequencies: a mild tail
    leaf_zipf_exponent: float = 1.5     # how a parent's leaves share it: steep (4 leaves: 60/21/12/7%)
    min_train_per_category: int = 3     # every category gets this many train products first
    imgs_per_product_probs: tuple = (0.57, 0.22, 0.10, 0.11)  # P(1..4 pictures); mean 1.75 as real
    # pictures
    image_size: int = 180               # the competition's pictures are all 180x180
    jpeg_quality: int = 88              # close to the real files' quantisation tables
    sibling_hue_step: float = 24.0      # hue degrees between level2 siblings: small = confusable
    hue_jitter: float = 7.0             # per-picture hue noise (degrees), overlaps with the step
    scale_range: tuple = (0.45, 0.85)   # object size as a fraction of the picture
    max_rotation: float = 30.0          # packshots are roughly upright; rotation up to +-this
    occluder_rate: float = 0.2          # share of pictures with a blob hiding part of the object
    grain: float = 3.0                  # background pixel noise (std); keeps JPEG sizes realistic
    # what makes it hard
    n_noise_pictures: int = 6           # generic pictures (logo, size chart, empty packshot, ...)
    noise_picture_rate: float = 0.1     # share of pictures replaced by a generic one
    noise_only_multi: bool = True       # True: only in products with >=2 pictures, one stays real
    main_first: bool = True             # picture 0 is the main photo: generic pictures and partial
    #                                     views go to later pictures (rate scaled, same expected total)
    partial_view_rate: float = 0.3      # share of later rendered pictures that are close-ups: colour
    #                                     and pattern fill the frame, the outline (level1) mostly not
    split_info_rate: float = 0.25       # share of multi-picture products whose main photo is plain
    #                                     (no pattern) and one later close-up shows the pattern
    label_noise_rate: float = 0.05      # share of train products labelled with a random category
    duplicate_rate: float = 0.05        # share of test pictures that are byte copies of a train one
    shift: float = 0.25                 # test lighting/tint change (0 = none); for pseudo-labels
    # speed
    picture_pool_per_category: int = 0  # 0: draw every picture; >0: draw this many per category
    #                                     (and per train/test) once and sample them (bench: GBs fast)


# Overrides of SynthConfig, holding only what differs from its defaults.
PRESETS = {
    # 12 categories, seconds: tests and smoke runs
    "tiny": dict(n_level1=3, n_level2_per_level1=2, n_level3_per_level2=2,
                 n_train_products=150, n_test_products=50),
    # 48 categories, ~6,300 train pictures: a CPU demo in under a minute
    "demo": dict(),
    # 200 categories, ~175k train pictures (~1.2 GB) sampled from 3,000 train + 3,000 test pictures
    "bench": dict(n_level1=10, n_level2_per_level1=5, n_level3_per_level2=4,
                  n_train_products=100_000, n_test_products=20_000, picture_pool_per_category=15),
}

SHAPES = ("circle", "box", "triangle", "bottle", "ring", "star", "hexagon", "cross", "crescent",
          "arrow", "tshirt", "heart", "mug")
PATTERNS = ("plain", "stripes", "pinstripes", "dots", "band", "letter", "checker", "grid", "spot",
            "zigzag", "halves")
NOISE_KINDS = ("logo", "size_chart", "empty_packshot", "no_image", "barcode", "banner")

# Letters as polylines in the unit square: no font files, so the pixels do not depend on the system.
GLYPHS = {
    "A": [[(0, 1), (0.5, 0), (1, 1)], [(0.22, 0.6), (0.78, 0.6)]],
    "E": [[(1, 0), (0, 0), (0, 1), (1, 1)], [(0, 0.5), (0.75, 0.5)]],
    "F": [[(1, 0), (0, 0), (0, 1)], [(0, 0.5), (0.75, 0.5)]],
    "H": [[(0, 0), (0, 1)], [(1, 0), (1, 1)], [(0, 0.5), (1, 0.5)]],
    "K": [[(0, 0), (0, 1)], [(1, 0), (0, 0.55), (1, 1)]],
    "L": [[(0, 0), (0, 1), (1, 1)]],
    "M": [[(0, 1), (0, 0), (0.5, 0.6), (1, 0), (1, 1)]],
    "N": [[(0, 1), (0, 0), (1, 1), (1, 0)]],
    "T": [[(0, 0), (1, 0)], [(0.5, 0), (0.5, 1)]],
    "V": [[(0, 0), (0.5, 1), (1, 0)]],
    "X": [[(0, 0), (1, 1)], [(1, 0), (0, 1)]],
    "Z": [[(0, 0), (1, 0), (0, 1), (1, 1)]],
}
LETTERS = tuple(GLYPHS)

LEVEL1_NAMES = ("ANIMALERIE", "AUTO - MOTO", "BAGAGERIE", "BIJOUX - LUNETTES - MONTRES",
                "BRICOLAGE - OUTILLAGE", "DECO - LINGE - LUMINAIRE", "ELECTROMENAGER", "EPICERIE",
                "INFORMATIQUE", "JARDIN - PISCINE", "JEUX - JOUETS", "MAISON", "PUERICULTURE",
                "SPORT", "TELEPHONIE - GPS")
LEVEL2_NAMES = ("ACCESSOIRE", "ARTICLE DE FETE", "CONNECTIQUE", "DECORATION", "ECLAIRAGE",
                "ENTRETIEN", "EQUIPEMENT", "JEU DE SOCIETE", "MOBILIER", "OUTIL A MAIN",
                "PROTECTION", "RANGEMENT", "TEXTILE", "USTENSILE", "VETEMENT")
LEVEL3_QUALIFIERS = ("A LED", "ADULTE", "CONNECTE", "DE LUXE", "DE VOYAGE", "ELECTRIQUE",
                     "EN BOIS", "EN METAL", "ENFANT", "MURAL", "PLIABLE", "SANS FIL")

# One random stream per concern: changing one knob leaves the other draws unchanged.
_STREAMS = {"catalog": 1, "ids": 2, "train": 3, "test": 4, "label_noise": 5, "noise_pictures": 6,
            "duplicates": 7, "pixels_train": 8, "pixels_test": 9, "pool": 10, "tail": 11,
            "partial_views": 12, "split_info": 13, "pool_views": 14}

_RENDER, _NOISE, _DUPLICATE = 0, 1, 2
_FILES = ("category_names.csv", "train.bson", "test.bson", "sample_submission.csv",
          "test_truth.csv", "synth.json")


def make_config(preset="demo", **overrides) -> SynthConfig:
    "The preset's knobs with `overrides` applied; unknown presets or knobs fail naming them"
    if preset not in PRESETS:
        raise ValueError(f"unknown synth preset {preset!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(SynthConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown synth knob(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    cfg = SynthConfig(**{**PRESETS[preset], **overrides})
    _check(cfg)
    return cfg


def _check(cfg: SynthConfig):
    "Fail before any work on values that cannot make a data set"
    limits = {"n_level1": min(len(SHAPES), len(LEVEL1_NAMES)),
              "n_level2_per_level1": len(LEVEL2_NAMES),
              "n_level3_per_level2": min(len(PATTERNS), len(LEVEL3_QUALIFIERS))}
    for name, top in limits.items():
        if not 1 <= getattr(cfg, name) <= top:
            raise ValueError(f"{name}={getattr(cfg, name)} must be in 1..{top}")
    for name in ("label_noise_rate", "duplicate_rate", "noise_picture_rate", "occluder_rate",
                 "partial_view_rate", "split_info_rate"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be in [0, 1]")
    for name in ("zipf_exponent", "parent_zipf_exponent", "leaf_zipf_exponent"):
        if not getattr(cfg, name) >= 0.0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0")
    for name in ("main_first", "hierarchical_tail", "noise_only_multi"):
        if not isinstance(getattr(cfg, name), (bool, np.bool_)):
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be True or False")
    n_cat = cfg.n_level1 * cfg.n_level2_per_level1 * cfg.n_level3_per_level2
    if cfg.n_train_products < n_cat * cfg.min_train_per_category:
        raise ValueError(f"n_train_products={cfg.n_train_products} is below {n_cat} categories x "
                         f"min_train_per_category={cfg.min_train_per_category}")
    probs = np.asarray(cfg.imgs_per_product_probs, dtype=float)
    if len(probs) != 4 or (probs < 0).any() or abs(probs.sum() - 1) > 1e-6:
        raise ValueError(f"imgs_per_product_probs={cfg.imgs_per_product_probs} must be 4 "
                         "probabilities (1..4 pictures) summing to 1")
    if cfg.n_noise_pictures < 1 and cfg.noise_picture_rate > 0:
        raise ValueError("noise_picture_rate > 0 needs n_noise_pictures >= 1")
    lo, hi = cfg.scale_range
    if not 0.05 <= lo <= hi <= 1.2:
        raise ValueError(f"scale_range={cfg.scale_range} must satisfy 0.05 <= lo <= hi <= 1.2")
    if cfg.n_train_products + cfg.n_test_products >= 2**30:
        raise ValueError("too many products for int32 _ids")


def _rng(seed, stream):
    return np.random.default_rng([seed, _STREAMS[stream]])


# ---------------------------------------------------------------------------------------- catalog

@dataclass
class _Look:
    "What a category's pictures show"
    shape: str
    hsv: tuple           # dominant colour (hue in degrees, saturation, value)
    pattern: str
    pattern_rgb: tuple
    letter: str


def _catalog(cfg, seed):
    "Category ids, names and looks, in (level1, level2, level3) nesting order"
    rng = _rng(seed, "catalog")
    n1, n2, n3 = cfg.n_level1, cfg.n_level2_per_level1, cfg.n_level3_per_level2
    n_cat = n1 * n2 * n3
    # 10-digit ids like the real ones (1000000000..1000099999), in no particular order
    ids = 1_000_000_000 + rng.choice(100_000, size=n_cat, replace=False)
    shapes = rng.choice(len(SHAPES), size=n1, replace=False)
    names1 = rng.choice(len(LEVEL1_NAMES), size=n1, replace=False)
    rows, looks = [], []
    for i1 in range(n1):
        base_hue = rng.uniform(0, 360)
        names2 = rng.choice(len(LEVEL2_NAMES), size=n2, replace=False)
        for i2 in range(n2):
            hsv = ((base_hue + (i2 - (n2 - 1) / 2) * cfg.sibling_hue_step) % 360,
                   rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.85))
            # one pattern colour per level2, so level3 siblings differ by the pattern alone
            pattern_rgb = ((245, 245, 240), (35, 35, 40), _hsv_rgb((hsv[0] + 180) % 360, 0.7, 0.9))[
                rng.integers(3)]
            patterns = rng.choice(len(PATTERNS), size=n3, replace=False)
            quals = rng.choice(len(LEVEL3_QUALIFIERS), size=n3, replace=False)
            for i3 in range(n3):
                name2 = LEVEL2_NAMES[names2[i2]]
                rows.append((int(ids[len(rows)]), LEVEL1_NAMES[names1[i1]], name2,
                             f"{name2} {LEVEL3_QUALIFIERS[quals[i3]]}"))
                looks.append(_Look(SHAPES[shapes[i1]], hsv, PATTERNS[patterns[i3]], pattern_rgb,
                                   LETTERS[rng.integers(len(LETTERS))]))
    if cfg.hierarchical_tail:
        freq = _hierarchical_freq(cfg, seed)
    else:  # long tail: a random category gets rank 1, another rank 2, ...
        freq = (rng.permutation(n_cat) + 1.0) ** -cfg.zipf_exponent
    return np.array([r[0] for r in rows], dtype=np.int64), rows, looks, freq / freq.sum()


def _hierarchical_freq(cfg, seed):
    "Category frequencies: a mild Zipf over level2 parents, each shared by its leaves by a steep one"
    rng = _rng(seed, "tail")
    n_parents, n3 = cfg.n_level1 * cfg.n_level2_per_level1, cfg.n_level3_per_level2
    parent = (rng.permutation(n_parents) + 1.0) ** -cfg.parent_zipf_exponent
    leaf = np.stack([rng.permutation(n3) + 1.0 for _ in range(n_parents)]) ** -cfg.leaf_zipf_exponent
    leaf /= leaf.sum(axis=1, keepdims=True)
    # categories are in nesting order: parent k holds categories k * n3 .. k * n3 + n3 - 1
    return ((parent / parent.sum())[:, None] * leaf).ravel()


# ------------------------------------------------------------------------------------------- plan

@dataclass
class _Split:
    "Products of train or test and what each of their pictures will be"
    ids: np.ndarray        # product _ids, ascending
    true_cat: np.ndarray   # category index the pictures show
    label: np.ndarray      # category index written to the file (differs under label noise)
    n_imgs: np.ndarray
    kind: np.ndarray       # per picture: _RENDER, _NOISE or _DUPLICATE
    ref: np.ndarray        # per picture: pixel seed / pool slot, noise index, or train picture index
    partial: np.ndarray    # per picture: a close-up (partial view)
    plain: np.ndarray      # per picture: drawn without its pattern (split-information products)
    split_info: np.ndarray  # per product: main photo plain, the pattern on one later close-up

    @property
    def starts(self):
        return np.concatenate([[0], np.cumsum(self.n_imgs)])

    def style(self, pic):
        "What a rendered picture shows: 0 full view, 1 close-up, 2 plain, 3 plain close-up"
        return int(self.partial[pic]) + 2 * int(self.plain[pic])


def _plan(cfg, seed, freq):
    "Draw ids, categories, picture counts and each picture's role for train and test"
    n_cat = len(freq)
    n_train, n_test = cfg.n_train_products, cfg.n_test_products
    rng = _rng(seed, "ids")
    # ids ascending with gaps, train and test interleaved as in the real data
    ids = np.sort(rng.choice(3 * (n_train + n_test), size=n_train + n_test, replace=False))
    is_test = np.zeros(len(ids), bool)
    is_test[rng.choice(len(ids), size=n_test, replace=False)] = True

    splits = {}
    for name, split_ids in (("train", ids[~is_test]), ("test", ids[is_test])):
        rng = _rng(seed, name)
        n = len(split_ids)
        if name == "train":
            n_min = n_cat * cfg.min_train_per_category
            cats = np.concatenate([np.repeat(np.arange(n_cat), cfg.min_train_per_category),
                                   rng.choice(n_cat, size=n - n_min, p=freq)])
            cats = rng.permutation(cats)
        else:
            cats = rng.choice(n_cat, size=n, p=freq)
        n_imgs = rng.choice(4, size=n, p=cfg.imgs_per_product_probs) + 1
        n_pics = int(n_imgs.sum())
        pool = cfg.picture_pool_per_category
        ref = rng.integers(pool, size=n_pics) if pool else rng.integers(2**62, size=n_pics)
        splits[name] = _Split(split_ids.astype(np.int64), cats, cats.copy(), n_imgs,
                              np.full(n_pics, _RENDER, np.int8), ref.astype(np.int64),
                              np.zeros(n_pics, bool), np.zeros(n_pics, bool), np.zeros(n, bool))

    train, test = splits["train"], splits["test"]
    rng = _rng(seed, "label_noise")
    noisy = rng.random(len(train.ids)) < cfg.label_noise_rate
    # a different category, never the true one
    offset = rng.integers(1, n_cat, size=len(train.ids)) if n_cat > 1 else np.zeros(len(train.ids), int)
    train.label = np.where(noisy, (train.true_cat + offset) % n_cat, train.true_cat)

    rng = _rng(seed, "noise_pictures")
    for split in (train, test):
        _place_noise(cfg, rng, split)

    partial_rng, split_rng = _rng(seed, "partial_views"), _rng(seed, "split_info")
    for split in (train, test):
        _place_views(cfg, partial_rng, split_rng, split)

    rng = _rng(seed, "duplicates")
    _place_duplicates(cfg, rng, train, test, n_cat)
    return train, test


def _later_noise_rate(cfg) -> float:
    """Under main_first, the chance that a picture after the main photo is generic: noise_picture_rate
    scaled so that the expected number of generic pictures stays what it is without main_first"""
    k, p = np.arange(1, 5), np.asarray(cfg.imgs_per_product_probs, dtype=float)
    could_be = (k * p)[1:].sum() if cfg.noise_only_multi else (k * p).sum()
    later = ((k - 1) * p).sum()
    return float(min(1.0, cfg.noise_picture_rate * could_be / later)) if later > 0 else 0.0


def _place_noise(cfg, rng, split):
    "Replace pictures by generic ones: never the main photo, or anywhere but one (noise_only_multi)"
    prod = np.repeat(np.arange(len(split.n_imgs)), split.n_imgs)
    u = rng.random(len(prod))
    which = rng.integers(max(cfg.n_noise_pictures, 1), size=len(prod))
    if cfg.main_first:
        hit = (u < _later_noise_rate(cfg)) & (np.arange(len(prod)) > split.starts[prod])
    else:
        hit = u < cfg.noise_picture_rate
    if cfg.noise_only_multi and not cfg.main_first:
        hit &= split.n_imgs[prod] >= 2
        # a product whose pictures all got hit keeps its first one real
        all_hit = np.add.reduceat(hit.astype(int), split.starts[:-1]) == split.n_imgs
        hit[split.starts[:-1][all_hit]] = False
    split.kind[hit] = _NOISE
    split.ref[hit] = which[hit]


def _place_views(cfg, partial_rng, split_rng, split):
    """Mark the close-ups among the rendered pictures after each product's main photo, and the
    products whose main photo is plain while one later close-up carries the pattern"""
    starts, n_pics = split.starts, len(split.kind)
    prod = np.repeat(np.arange(len(split.n_imgs)), split.n_imgs)
    pic = np.arange(n_pics)
    rendered = split.kind == _RENDER
    # the main photo: picture 0 under main_first, else the first that is not generic (none: n_pics)
    main = np.minimum.reduceat(np.where(rendered, pic, n_pics), starts[:-1])
    later = rendered & (pic > main[prod])
    split.partial = (partial_rng.random(n_pics) < cfg.partial_view_rate) & later
    n_later = np.add.reduceat(later.astype(np.int64), starts[:-1])
    chosen = (split_rng.random(len(n_later)) < cfg.split_info_rate) & (n_later >= 1)
    pick = split_rng.random(len(n_later))
    split.split_info = chosen
    split.plain = rendered & chosen[prod]
    for row in np.flatnonzero(chosen):
        close_up = starts[row] + np.flatnonzero(later[starts[row]:starts[row + 1]])[
            int(pick[row] * n_later[row])]
        split.partial[close_up], split.plain[close_up] = True, False


def _place_duplicates(cfg, rng, train, test, n_cat):
    "Make some test pictures byte copies of a correctly labelled train picture of their category"
    train_prod = np.repeat(np.arange(len(train.ids)), train.n_imgs)
    ok = (train.kind == _RENDER) & (train.true_cat == train.label)[train_prod]
    # a copy shows what the picture it stands in for would show: full view, close-up or plain
    by_cat = [[[] for _ in range(4)] for _ in range(n_cat)]
    for pic in np.flatnonzero(ok):
        by_cat[train.true_cat[train_prod[pic]]][train.style(pic)].append(pic)
    test_prod = np.repeat(np.arange(len(test.ids)), test.n_imgs)
    hit = (rng.random(len(test_prod)) < cfg.duplicate_rate) & (test.kind == _RENDER)
    pick = rng.random(len(test_prod))
    for pic in np.flatnonzero(hit):
        sources = by_cat[test.true_cat[test_prod[pic]]][test.style(pic)]
        if sources:
            test.kind[pic] = _DUPLICATE
            test.ref[pic] = sources[int(pick[pic] * len(sources))]


# --------------------------------------------------------------------------------------- pictures

def _hsv_rgb(h, s, v):
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def _pts(pts, w, h, x0=0.0, y0=0.0):
    return [(x0 + u * (w - 1), y0 + v * (h - 1)) for u, v in pts]


def _regular(n, r_out, r_in=None, turn=-90.0):
    "Vertices of a regular polygon (or a star when r_in is given) centred in the unit square"
    pts = []
    step = 360 / n
    for k in range(n):
        a = math.radians(turn + k * step)
        pts.append((0.5 + r_out * math.cos(a), 0.5 + r_out * math.sin(a)))
        if r_in is not None:
            a = math.radians(turn + (k + 0.5) * step)
            pts.append((0.5 + r_in * math.cos(a), 0.5 + r_in * math.sin(a)))
    return pts


_STAR, _HEXAGON = _regular(5, 0.49, 0.21), _regular(6, 0.49, turn=0)


def _draw_shape(draw, shape, w, h):
    "Draw the outline family's silhouette (255) on a w x h mask"
    box = lambda u0, v0, u1, v1: [u0 * (w - 1), v0 * (h - 1), u1 * (w - 1), v1 * (h - 1)]
    if shape == "circle":
        draw.ellipse(box(0.02, 0.02, 0.98, 0.98), fill=255)
    elif shape == "box":
        draw.rounded_rectangle(box(0.08, 0.15, 0.92, 0.85), radius=0.07 * w, fill=255)
    elif shape == "triangle":
        draw.polygon(_pts([(0.5, 0.03), (0.97, 0.95), (0.03, 0.95)], w, h), fill=255)
    elif shape == "bottle":
        draw.rounded_rectangle(box(0.24, 0.36, 0.76, 0.98), radius=0.08 * w, fill=255)
        draw.polygon(_pts([(0.24, 0.42), (0.42, 0.24), (0.58, 0.24), (0.76, 0.42)], w, h), fill=255)
        draw.rectangle(box(0.42, 0.08, 0.58, 0.3), fill=255)
        draw.rectangle(box(0.39, 0.02, 0.61, 0.1), fill=255)
    elif shape == "ring":
        draw.ellipse(box(0.02, 0.02, 0.98, 0.98), fill=255)
        draw.ellipse(box(0.3, 0.3, 0.7, 0.7), fill=0)
    elif shape == "star":
        draw.polygon(_pts(_STAR, w, h), fill=255)
    elif shape == "hexagon":
        draw.polygon(_pts(_HEXAGON, w, h), fill=255)
    elif shape == "cross":
        draw.rectangle(box(0.34, 0.03, 0.66, 0.97), fill=255)
        draw.rectangle(box(0.03, 0.34, 0.97, 0.66), fill=255)
    elif shape == "crescent":
        draw.ellipse(box(0.02, 0.02, 0.98, 0.98), fill=255)
        draw.ellipse(box(0.3, -0.05, 1.15, 0.85), fill=0)
    elif shape == "arrow":
        draw.polygon(_pts([(0.03, 0.36), (0.55, 0.36), (0.55, 0.1), (0.97, 0.5), (0.55, 0.9),
                           (0.55, 0.64), (0.03, 0.64)], w, h), fill=255)
    elif shape == "tshirt":
        draw.polygon(_pts([(0.3, 0.05), (0.42, 0.1), (0.58, 0.1), (0.7, 0.05), (0.98, 0.25),
                           (0.86, 0.42), (0.76, 0.36), (0.76, 0.97), (0.24, 0.97), (0.24, 0.36),
                           (0.14, 0.42), (0.02, 0.25)], w, h), fill=255)
    elif shape == "heart":
        draw.ellipse(box(0.03, 0.08, 0.53, 0.55), fill=255)
        draw.ellipse(box(0.47, 0.08, 0.97, 0.55), fill=255)
        draw.polygon(_pts([(0.06, 0.42), (0.94, 0.42), (0.5, 0.96)], w, h), fill=255)
    elif shape == "mug":
        draw.ellipse(box(0.55, 0.25, 0.98, 0.75), fill=255)
        draw.ellipse(box(0.66, 0.36, 0.87, 0.64), fill=0)
        draw.rounded_rectangle(box(0.05, 0.1, 0.72, 0.95), radius=0.06 * w, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_glyphs(draw, text, x0, y0, size, width, colour):
    "Write `text` with the polyline letters, each `size` pixels high"
    for k, ch in enumerate(text):
        gx = x0 + k * size * 0.85
        for line in GLYPHS[ch]:
            draw.line(_pts(line, size * 0.65, size, gx, y0), fill=colour, width=width, joint="curve")


def _draw_pattern(draw, look, rng, w, h, colour):
    "Draw the level3 pattern over the whole w x h fill; the shape mask clips it afterwards"
    side = min(w, h)
    p = max(6, int(side * rng.uniform(0.16, 0.22)))  # pattern period
    off = int(rng.integers(p))
    pat = look.pattern
    if pat == "stripes":
        for y in range(off - p, h, p):
            draw.rectangle([0, y, w, y + p // 2], fill=colour)
    elif pat == "pinstripes":
        q = max(4, p // 2)
        for x in range(off % q - q, w, q):
            draw.line([(x, 0), (x, h)], fill=colour, width=max(1, q // 4))
    elif pat == "dots":
        r = max(2, p // 4)
        for y in range(off - p, h + p, p):
            for x in range(off - p, w + p, p):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif pat == "band":
        y = h * rng.uniform(0.4, 0.5)
        draw.rectangle([0, y, w, y + 0.2 * h], fill=colour)
    elif pat == "letter":
        size = side * rng.uniform(0.38, 0.48)
        _draw_glyphs(draw, look.letter, w / 2 - size * 0.33, h / 2 - size / 2, size,
                     max(2, int(size * 0.16)), colour)
    elif pat == "checker":
        for j, y in enumerate(range(off - p, h, p)):
            for i, x in enumerate(range(off - p, w, p)):
                if (i + j) % 2:
                    draw.rectangle([x, y, x + p - 1, y + p - 1], fill=colour)
    elif pat == "grid":
        for v in range(off - p, max(w, h), p):
            draw.line([(v, 0), (v, h)], fill=colour, width=2)
            draw.line([(0, v), (w, v)], fill=colour, width=2)
    elif pat == "spot":
        r = side * rng.uniform(0.17, 0.22)
        draw.ellipse([w / 2 - r, h * 0.55 - r, w / 2 + r, h * 0.55 + r], fill=colour)
    elif pat == "zigzag":
        y = h * rng.uniform(0.35, 0.55)
        zig = [(x, y + (p * 0.6 if k % 2 else 0)) for k, x in enumerate(range(-p, w + p, p // 2 + 1))]
        draw.line(zig, fill=colour, width=max(2, p // 3))
    elif pat == "halves":
        draw.rectangle([0, 0, w * rng.uniform(0.45, 0.55), h], fill=colour)
    elif pat != "plain":
        raise ValueError(f"unknown pattern {pat!r}")


_GRIDS = {}


def _grid(size):
    "Pixel coordinates in [-1, 1], cached per picture size"
    if size not in _GRIDS:
        c = np.linspace(-1, 1, size, dtype=np.float32)
        _GRIDS[size] = (c[None, :], c[:, None])
    return _GRIDS[size]


_SHADOW_LUT = [v * 3 // 10 for v in range(256)]


def _background(cfg, rng, shift):
    "A light, slightly tinted background with a lighting gradient and grain"
    s = cfg.image_size
    base = 255 - rng.uniform(4, 28) + rng.uniform(-5, 5, size=3)
    xs, ys = _grid(s)
    a = rng.uniform(0, 2 * math.pi)
    light = (math.cos(a) * xs + math.sin(a) * ys) * rng.uniform(0, 12 + 25 * shift)
    noise = rng.standard_normal((s, s), dtype=np.float32) * cfg.grain
    arr = base.astype(np.float32)[None, None, :] + (light + noise)[:, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shift_luts(shift):
    "Per-channel lookup tables of the test lighting: warmer, a little darker, less contrast"
    gain = (1 + 0.06 * shift, 1 - 0.02 * shift, 1 - 0.16 * shift)
    lut = []
    for g in gain:
        lut += [min(255, max(0, int((v - 128) * (1 - 0.15 * shift) * g + 128 * g - 10 * shift)))
                for v in range(256)]
    return lut


def render_picture(look, cfg, rng, shift=0.0, partial=False, plain=False) -> Image.Image:
    """One picture of a product that looks like `look`, drawn from `rng`: a packshot of the whole
    object, or with `partial` a close-up of its surface; `plain` leaves the pattern out"""
    s = cfg.image_size
    img = _background(cfg, rng, shift)
    h, sat, val = look.hsv
    colour = _hsv_rgb(h + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter),
                      sat + rng.uniform(-0.06, 0.06), val + rng.uniform(-0.08, 0.08))
    pc = tuple(int(min(255, max(0, c + rng.integers(-12, 13)))) for c in look.pattern_rgb)
    if plain:
        pc = colour  # the pattern's draws still happen, so plain and patterned differ only there
    if partial:
        x, y, ow, oh = _paste_close_up(img, look, cfg, rng, colour, pc)
    else:
        x, y, ow, oh = _paste_packshot(img, look, cfg, rng, colour, pc)
    if rng.random() < cfg.occluder_rate:
        _draw_occluder(ImageDraw.Draw(img), rng, x + ow / 2, y + oh / 2, s)
    if shift:
        img = img.point(_shift_luts(shift))
    return img


def _paste_packshot(img, look, cfg, rng, colour, pc):
    "The whole object, mostly inside the frame; returns its box (x, y, w, h)"
    s = cfg.image_size
    size = s * rng.uniform(*cfg.scale_range)
    ow, oh = int(size), int(size * rng.uniform(0.85, 1.15))
    fill = Image.new("RGB", (ow, oh), colour)
    _draw_pattern(ImageDraw.Draw(fill), look, rng, ow, oh, pc)
    mask = Image.new("L", (ow, oh), 0)
    _draw_shape(ImageDraw.Draw(mask), look.shape, ow, oh)
    obj = fill.convert("RGBA")
    obj.putalpha(mask)
    if cfg.max_rotation:
        obj = obj.rotate(rng.uniform(-cfg.max_rotation, cfg.max_rotation),
                         resample=Image.BILINEAR, expand=True)
    ow, oh = obj.size
    # mostly inside the frame, sometimes a little cropped
    x = int(rng.uniform(min(0, s - ow) - 0.08 * ow, max(0, s - ow) + 0.08 * ow))
    y = int(rng.uniform(min(0, s - oh) - 0.08 * oh, max(0, s - oh) + 0.08 * oh))
    alpha = obj.getchannel("A")
    d = int(rng.integers(2, 6))
    img.paste((90, 90, 95), (x + d, y + d), alpha.point(_SHADOW_LUT))
    img.paste(obj, (x, y), alpha)
    return x, y, ow, oh


CLOSE_UP_ZOOM = (2.0, 3.5)  # a close-up's object side as a multiple of the frame's
_COVER_STEP = 6             # pixels per cell of the coarse grid where a close-up's frame is placed


def _paste_close_up(img, look, cfg, rng, colour, pc):
    """A close-up: the frame sits where the magnified silhouette covers nearly all of it, so the
    surface fills the picture and the outline is mostly outside; the pattern is drawn at the frame's
    scale, so that localised patterns (a band, a letter, a spot) stay in view. Returns the frame box"""
    s = cfg.image_size
    size = s * rng.uniform(*CLOSE_UP_ZOOM)
    aspect = rng.uniform(0.85, 1.15)
    angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation) if cfg.max_rotation else 0.0
    k, f = _COVER_STEP, s // _COVER_STEP
    for _ in range(3):  # thin shapes (ring, crescent) get closer until the surface fills the frame
        mask = Image.new("L", (int(size), int(size * aspect)), 0)
        _draw_shape(ImageDraw.Draw(mask), look.shape, *mask.size)
        # share of a frame-sized window that the turned silhouette covers, on a coarse grid (cheap:
        # the full-size silhouette is never turned, only the frame's pixels are looked up in it)
        cells = mask.reduce(k).rotate(angle, resample=Image.BILINEAR, expand=True)
        acc = np.pad(np.asarray(cells, dtype=np.float64).cumsum(0).cumsum(1) / 255, ((1, 0), (1, 0)))
        cover = (acc[f:, f:] - acc[:-f, f:] - acc[f:, :-f] + acc[:-f, :-f]) / (f * f)
        if cover.max() >= 0.85:
            break
        size *= 1.5
    ys, xs = np.nonzero(cover >= 0.9 * cover.max())
    j = int(rng.integers(len(ys)))
    # the frame's top-left corner relative to the turned silhouette's centre, in full-size pixels
    dx = xs[j] * k + int(rng.integers(k)) - cells.width * k / 2
    dy = ys[j] * k + int(rng.integers(k)) - cells.height * k / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # frame pixel -> unturned silhouette pixel, as Image.rotate maps them
    alpha = mask.transform((s, s), Image.AFFINE, (cos, -sin, cos * dx - sin * dy + mask.width / 2,
                                                  sin, cos, sin * dx + cos * dy + mask.height / 2),
                           resample=Image.BILINEAR)
    fill = Image.new("RGB", (s, s), colour)
    _draw_pattern(ImageDraw.Draw(fill), look, rng, s, s, pc)
    d = int(rng.integers(2, 6))
    img.paste((90, 90, 95), (d, d), alpha.point(_SHADOW_LUT))
    img.paste(fill, (0, 0), alpha)
    return 0, 0, s, s


def _draw_occluder(draw, rng, cx, cy, s):
    "A hand, a price tag or another object in front of the product"
    r = s * rng.uniform(0.12, 0.22)
    cx += rng.uniform(-0.3, 0.3) * s
    cy += rng.uniform(-0.3, 0.3) * s
    colour = ((224, 182, 150), (200, 200, 205), (250, 235, 80),
              _hsv_rgb(rng.uniform(0, 360), 0.6, 0.7))[rng.integers(4)]
    if rng.random() < 0.5:
        draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=colour)
    else:
        # a tag: a 2r x r rectangle turned by a random angle
        a = rng.uniform(0, math.pi)
        ca, sa = math.cos(a) * r, math.sin(a) * r
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        draw.polygon([(cx + i * ca - j * sa * 0.5, cy + i * sa + j * ca * 0.5) for i, j in corners],
                     fill=colour)


def render_noise_picture(kind, cfg, rng) -> Image.Image:
    "A generic picture that says nothing about the category (logo, size chart, ...)"
    s = cfg.image_size
    img = Image.new("RGB", (s, s), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    ink = _hsv_rgb(rng.uniform(0, 360), rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8))
    word = "".join(LETTERS[i] for i in rng.integers(len(LETTERS), size=int(rng.integers(3, 6))))
    if kind == "logo":
        draw.rounded_rectangle([s * 0.1, s * 0.3, s * 0.9, s * 0.7], radius=s * 0.08, fill=ink)
        _draw_glyphs(draw, word, s * 0.18, s * 0.4, s * 0.2, 4, (255, 255, 255))
    elif kind == "size_chart":
        rows, cols = int(rng.integers(5, 8)), int(rng.integers(3, 6))
        rh, cw = s * 0.84 / rows, s * 0.9 / cols
        draw.rectangle([s * 0.05, s * 0.08, s * 0.95, s * 0.08 + rh], fill=(200, 200, 200))
        for k in range(rows + 1):
            y = s * 0.08 + k * rh
            draw.line([(s * 0.05, y), (s * 0.95, y)], fill=(60, 60, 60), width=1)
        for k in range(cols + 1):
            x = s * 0.05 + k * cw
            draw.line([(x, s * 0.08), (x, s * 0.92)], fill=(60, 60, 60), width=1)
        for r in range(rows):
            for c in range(cols):
                x, y = s * 0.08 + c * cw, s * 0.08 + (r + 0.4) * rh
                draw.line([(x, y), (x + cw * rng.uniform(0.3, 0.7), y)], fill=(30, 30, 30), width=2)
    elif kind == "empty_packshot":
        img.paste((248, 248, 246), [0, 0, s, s])
        draw.ellipse([s * 0.2, s * 0.78, s * 0.8, s * 0.88], fill=(225, 225, 225))
    elif kind == "no_image":
        img.paste((235, 235, 235), [0, 0, s, s])
        box = [s * 0.25, s * 0.2, s * 0.75, s * 0.6]
        draw.rectangle(box, outline=(150, 150, 150), width=3)
        draw.line([(box[0], box[1]), (box[2], box[3])], fill=(150, 150, 150), width=3)
        draw.line([(box[0], box[3]), (box[2], box[1])], fill=(150, 150, 150), width=3)
        _draw_glyphs(draw, word, s * 0.22, s * 0.7, s * 0.12, 2, (120, 120, 120))
    elif kind == "barcode":
        x = s * 0.12
        while x < s * 0.88:
            bw = float(rng.choice([1.5, 3, 4.5]))
            draw.rectangle([x, s * 0.25, x + bw, s * 0.7], fill=(0, 0, 0))
            x += bw + float(rng.choice([1.5, 3, 4.5]))
        _draw_glyphs(draw, word, s * 0.2, s * 0.75, s * 0.1, 2, (0, 0, 0))
    elif kind == "banner":
        draw.polygon([(0, s * 0.55), (s, s * 0.2), (s, s * 0.45), (0, s * 0.8)], fill=ink)
        _draw_glyphs(draw, word, s * 0.15, s * 0.05, s * 0.18, 4, ink)
    else:
        raise ValueError(f"unknown noise picture kind {kind!r}")
    return img


def _jpeg(img, quality) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- writing

class _Pictures:
    "JPEG bytes of each planned picture, drawn on demand or taken from a pre-drawn pool"

    def __init__(self, cfg, seed, looks):
        self.cfg, self.seed, self.looks = cfg, seed, looks
        rng = _rng(seed, "noise_pictures")
        self.noise = [_jpeg(render_noise_picture(NOISE_KINDS[k % len(NOISE_KINDS)], cfg, rng),
                            cfg.jpeg_quality) for k in range(cfg.n_noise_pictures)]
        self.pool = None
        if cfg.picture_pool_per_category:
            # pool[domain][category][slot]; test pictures get the lighting shift
            rng = _rng(seed, "pool")
            self.pool = {dom: [[self._draw(look, rng, dom) for _ in range(cfg.picture_pool_per_category)]
                               for look in looks] for dom in ("train", "test")}
        self.view_pool = {}  # (domain, style, category) -> close-ups or plain pictures, drawn when asked
        self.train_kept = {}  # train picture index -> bytes, for the test duplicates

    def _draw(self, look, rng, domain, style=0):
        shift = self.cfg.shift if domain == "test" else 0.0
        img = render_picture(look, self.cfg, rng, shift, partial=bool(style & 1), plain=bool(style & 2))
        return _jpeg(img, self.cfg.jpeg_quality)

    def get(self, domain, split, pic, cat):
        kind, ref, style = split.kind[pic], int(split.ref[pic]), split.style(pic)
        if kind == _NOISE:
            return self.noise[ref]
        if kind == _DUPLICATE:
            return self.train_kept[ref]
        if self.pool is not None and style == 0:
            return self.pool[domain][cat][ref]
        if self.pool is not None:
            key = (domain, style, cat)
            if key not in self.view_pool:  # one stream per key: the same bytes whatever the order
                rng = np.random.default_rng([self.seed, _STREAMS["pool_views"], int(domain == "test"), style, cat])
                self.view_pool[key] = [self._draw(self.looks[cat], rng, domain, style)
                                       for _ in range(self.cfg.picture_pool_per_category)]
            return self.view_pool[key][ref]
        rng = np.random.default_rng([ref, _STREAMS[f"pixels_{domain}"]])
        return self._draw(self.looks[cat], rng, domain, style)


def _write_bson(path, domain, split, cat_ids, pictures, keep=frozenset()):
    "Stream one document per product; returns the number of pictures written"
    starts = split.starts
    with atomic_open(path, "wb") as f:
        for row, pid in enumerate(split.ids):
            cat = int(split.true_cat[row])
            imgs = []
            for pic in range(starts[row], starts[row + 1]):
                jpeg = pictures.get(domain, split, pic, cat)
                if pic in keep:
                    pictures.train_kept[pic] = jpeg
                imgs.append({"picture": jpeg})
            doc = {"_id": int(pid), "imgs": imgs}
            if domain == "train":
                doc["category_id"] = int(cat_ids[split.label[row]])
            f.write(bson.encode(doc))
    return int(starts[-1])


def _write_csv(path, header, rows):
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_dataset(out_dir, preset="demo", seed=0, **overrides) -> dict:
    """Write a synthetic competition data set into `out_dir`; returns a summary

    Until the last file is written the folder holds the marker of `cdkit.base.io.mark_incomplete`, so a
    run killed midway leaves a folder that `cdkit.base.io.check_complete` refuses.

    The summary has products, images, categories, bytes and seconds per file; synth.json holds the
    effective knobs and counts (no timings, so that the same seed gives identical files)."""
    cfg = make_config(preset, **overrides)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")
    seed = int(seed)
    # only a new or empty folder, or one the kit wrote (io.writing_dataset): never another data set
    with writing_dataset(out_dir, f"cdkit synth --preset {preset} --seed {seed}"):
        return _write_dataset(Path(out_dir), cfg, preset, seed)


def _write_dataset(out, cfg, preset, seed):
    # the marker goes in before the first byte and comes out after the last: a writer killed in
    # between leaves a folder that io.check_complete refuses
    mark_incomplete(out, f"synth --preset {preset} --seed {seed}")
    sweep_temps(out)
    seconds = {}
    t0 = time.perf_counter()
    cat_ids, cat_rows, looks, freq = _catalog(cfg, seed)
    train, test = _plan(cfg, seed, freq)
    seconds["plan"] = time.perf_counter() - t0
    t = time.perf_counter()
    pictures = _Pictures(cfg, seed, looks)
    seconds["noise pictures and pool"] = time.perf_counter() - t

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        seconds[name] = time.perf_counter() - t
        return result

    # sorted by names, as the real file is
    timed("category_names.csv", _write_csv, out / "category_names.csv",
          ("category_id", "category_level1", "category_level2", "category_level3"),
          sorted(cat_rows, key=lambda r: (r[1], r[2], r[3])))
    keep = frozenset(int(r) for r in test.ref[test.kind == _DUPLICATE])
    n_train_imgs = timed("train.bson", _write_bson, out / "train.bson", "train", train, cat_ids,
                         pictures, keep)
    n_test_imgs = timed("test.bson", _write_bson, out / "test.bson", "test", test, cat_ids, pictures)
    top = int(cat_ids[np.bincount(train.label, minlength=len(cat_ids)).argmax()])
    timed("sample_submission.csv", _write_csv, out / "sample_submission.csv", ("_id", "category_id"),
          ((int(i), top) for i in test.ids))
    timed("test_truth.csv", _write_csv, out / "test_truth.csv", ("_id", "category_id"),
          ((int(i), int(cat_ids[c])) for i, c in zip(test.ids, test.true_cat)))

    counts = {
        "categories": len(cat_ids),
        "train_products": len(train.ids), "test_products": len(test.ids),
        "train_images": n_train_imgs, "test_images": n_test_imgs,
        "train_label_noise_products": int((train.label != train.true_cat).sum()),
        "train_noise_pictures": int((train.kind == _NOISE).sum()),
        "test_noise_pictures": int((test.kind == _NOISE).sum()),
        "train_partial_views": int(train.partial.sum()),
        "test_partial_views": int(test.partial.sum()),
        "train_split_info_products": int(train.split_info.sum()),
        "test_split_info_products": int(test.split_info.sum()),
        "train_plain_pictures": int(train.plain.sum()),
        "test_plain_pictures": int(test.plain.sum()),
        "test_duplicate_pictures": int((test.kind == _DUPLICATE).sum()),
        "train_categories_present": int(len(np.unique(train.label))),
        "test_categories_present": int(len(np.unique(test.true_cat))),
        "most_frequent_train_category": top,
    }
    meta = {"preset": preset, "seed": seed, "config": asdict(cfg), "counts": counts,
            # under main_first: the chance that a picture after the main photo is generic
            "later_picture_noise_rate": round(_later_noise_rate(cfg), 6) if cfg.main_first else None,
            "noise_picture_md5": [hashlib.md5(b).hexdigest() for b in pictures.noise]}
    timed("synth.json", _write_json, out / "synth.json", meta)
    mark_complete(out)
    seconds["total"] = time.perf_counter() - t0
    return {"out_dir": str(out), "preset": preset, "seed": seed,
            "products": {"train": len(train.ids), "test": len(test.ids)},
            "images": {"train": n_train_imgs, "test": n_test_imgs},
            "categories": len(cat_ids), "counts": counts,
            "bytes": {name: (out / name).stat().st_size for name in _FILES},
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _write_json(path, obj):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


SYNTH_WORDS = ("synth", "demo", "tiny", "bench")  # a folder whose name holds one of these may receive synthetic data


def ensure_data(data_dir, synth_preset="demo", seed=0, log=print):
    """Generate the synthetic preset in `data_dir` when it holds no train.bson, only into an empty or new
    folder whose name says it is synthetic (synth, demo, tiny, bench): a folder meant for the real download
    is never filled with made-up data"""
    from cdkit.base.paths import resolve
    d = resolve(data_dir)
    if (d / "train.bson").exists():
        return d
    if not synth_preset:
        raise FileNotFoundError(f"{d / 'train.bson'} not found (download the competition files there)")
    if not any(w in d.name.lower() for w in SYNTH_WORDS):
        raise FileNotFoundError(
            f"{d / 'train.bson'} not found. Download the competition files there (README, 'The real data'); "
            f"synthetic data is written only into a folder whose name says so ({', '.join(SYNTH_WORDS)}), "
            "e.g. data_dir='data/demo'")
    if d.exists() and any(p.name != ".cdkit-incomplete" for p in d.iterdir()):
        raise FileNotFoundError(f"{d} holds other files but no train.bson; the synthetic '{synth_preset}' preset is "
                                "written only into an empty or new folder")
    log(f"{d} has no train.bson: writing the synthetic '{synth_preset}' preset (seed {seed})")
    write_dataset(d, preset=synth_preset, seed=seed)
    return d
