"Synthetic data set: competition format, reproducibility, and that each knob does what it says"

import csv
import hashlib
import io
import json
from collections import defaultdict

import bson
import numpy as np
import pytest
from PIL import Image

from cdkit.data import synth

# small and quick: a few dozen products is enough to see every knob act
SMALL = dict(n_train_products=60, n_test_products=30, min_train_per_category=2)
# the product-level knobs off: the data set as it was before they existed
LEVERS_OFF = dict(main_first=False, partial_view_rate=0.0, split_info_rate=0.0, hierarchical_tail=False)


def read_docs(path):
    with open(path, "rb") as f:
        return list(bson.decode_file_iter(f))


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def file_bytes(folder):
    return {name: (folder / name).read_bytes() for name in synth._FILES}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    summary = synth.write_dataset(out, preset="tiny", seed=0)
    return out, summary


def test_files_and_document_layout(tiny):
    out, summary = tiny
    for name in synth._FILES:
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "temp files left behind"
    train, test = read_docs(out / "train.bson"), read_docs(out / "test.bson")
    assert [list(d) for d in train] == [["_id", "imgs", "category_id"]] * len(train)
    assert [list(d) for d in test] == [["_id", "imgs"]] * len(test)
    assert (len(train), len(test)) == (150, 50)
    assert summary["products"] == {"train": 150, "test": 50}
    ids = [d["_id"] for d in train + test]
    assert len(set(ids)) == len(ids)
    assert [d["_id"] for d in train] == sorted(d["_id"] for d in train)
    # train and test ids interleave, as in the real data
    assert min(d["_id"] for d in test) < max(d["_id"] for d in train)
    for d in train + test:
        assert 1 <= len(d["imgs"]) <= 4
        assert all(list(im) == ["picture"] for im in d["imgs"])
    assert sum(len(d["imgs"]) for d in train) == summary["images"]["train"]


def test_pictures_are_180px_rgb_jpeg(tiny):
    out, _ = tiny
    for d in read_docs(out / "train.bson")[:40] + read_docs(out / "test.bson")[:20]:
        for im in d["imgs"]:
            assert isinstance(im["picture"], bytes) and im["picture"][:2] == b"\xff\xd8"
            img = Image.open(io.BytesIO(im["picture"]))
            assert (img.format, img.size, img.mode) == ("JPEG", (180, 180), "RGB")


def test_bytes_match_real_layout(tiny):
    "_id and category_id are int32, pictures binary subtype 0, as in train_example.bson"
    out, _ = tiny
    raw = (out / "train.bson").read_bytes()
    size = int.from_bytes(raw[:4], "little")
    assert raw[4:9] == b"\x10_id\x00" and raw[13:19] == b"\x04imgs\x00"
    assert b"\x05picture\x00" in raw[:size]
    assert raw[size - 18:size - 5] == b"\x10category_id\x00"


def test_csvs_agree_with_bson(tiny):
    out, _ = tiny
    header, rows = read_csv(out / "category_names.csv")
    assert header == ["category_id", "category_level1", "category_level2", "category_level3"]
    cat_ids = {int(r[0]) for r in rows}
    assert len(cat_ids) == len(rows) == 12
    assert all(1_000_000_000 <= c < 10_000_000_000 for c in cat_ids)
    assert all(name == name.upper() for r in rows for name in r[1:])
    assert len({tuple(r[1:]) for r in rows}) == 12

    train, test = read_docs(out / "train.bson"), read_docs(out / "test.bson")
    assert {d["category_id"] for d in train} <= cat_ids
    test_ids = [d["_id"] for d in test]

    header, sub = read_csv(out / "sample_submission.csv")
    assert header == ["_id", "category_id"]
    assert [int(r[0]) for r in sub] == sorted(test_ids)
    assert len({r[1] for r in sub}) == 1 and int(sub[0][1]) in cat_ids

    header, truth = read_csv(out / "test_truth.csv")
    assert header == ["_id", "category_id"]
    assert [int(r[0]) for r in truth] == sorted(test_ids)
    assert {int(r[1]) for r in truth} <= cat_ids

    meta = json.loads((out / "synth.json").read_text())
    assert meta["preset"] == "tiny" and meta["seed"] == 0
    assert meta["config"]["n_train_products"] == 150
    assert meta["counts"]["train_images"] == sum(len(d["imgs"]) for d in train)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny):
    out, _ = tiny
    again = synth.write_dataset(tmp_path / "again", preset="tiny", seed=0)
    assert file_bytes(out) == file_bytes(tmp_path / "again")
    assert again["bytes"]["train.bson"] == (out / "train.bson").stat().st_size
    synth.write_dataset(tmp_path / "other", preset="tiny", seed=1)
    other = file_bytes(tmp_path / "other")
    for name in ("train.bson", "test.bson", "category_names.csv", "test_truth.csv"):
        assert other[name] != file_bytes(out)[name], name


def test_duplicates_copy_train_pictures_of_the_same_category(tmp_path):
    out = tmp_path / "dup"
    synth.write_dataset(out, preset="tiny", seed=3, duplicate_rate=0.5, noise_picture_rate=0.0, **SMALL)
    train_pics = defaultdict(set)
    for d in read_docs(out / "train.bson"):
        for im in d["imgs"]:
            train_pics[im["picture"]].add(d["category_id"])
    _, truth = read_csv(out / "test_truth.csv")
    truth = {int(i): int(c) for i, c in truth}
    copies = [(im["picture"], truth[d["_id"]]) for d in read_docs(out / "test.bson") for im in d["imgs"]
              if im["picture"] in train_pics]
    n_test_pics = json.loads((out / "synth.json").read_text())["counts"]["test_images"]
    assert 0.3 * n_test_pics < len(copies) < 0.7 * n_test_pics
    assert all(cat in train_pics[pic] for pic, cat in copies)

    synth.write_dataset(tmp_path / "none", preset="tiny", seed=3, duplicate_rate=0.0,
                        noise_picture_rate=0.0, **SMALL)
    train_md5 = {hashlib.md5(im["picture"]).digest()
                 for d in read_docs(tmp_path / "none" / "train.bson") for im in d["imgs"]}
    assert not any(hashlib.md5(im["picture"]).digest() in train_md5
                   for d in read_docs(tmp_path / "none" / "test.bson") for im in d["imgs"])


def test_noise_pictures_repeat_across_categories(tmp_path):
    out = tmp_path / "noise"
    synth.write_dataset(out, preset="tiny", seed=0, noise_picture_rate=0.4, duplicate_rate=0.0, **SMALL)
    cats_of = defaultdict(set)
    train = read_docs(out / "train.bson")
    for d in train:
        for im in d["imgs"]:
            cats_of[hashlib.md5(im["picture"]).hexdigest()].add(d["category_id"])
    generic = json.loads((out / "synth.json").read_text())["noise_picture_md5"]
    assert len(generic) == 6
    assert max(len(cats_of[m]) for m in generic) >= 3
    # every other picture is unique, and each product keeps at least one real picture
    assert all(len(c) == 1 for m, c in cats_of.items() if m not in generic)
    for d in train:
        assert any(hashlib.md5(im["picture"]).hexdigest() not in generic for im in d["imgs"])

    synth.write_dataset(tmp_path / "clean", preset="tiny", seed=0, noise_picture_rate=0.0, **SMALL)
    md5s = [hashlib.md5(im["picture"]).digest()
            for d in read_docs(tmp_path / "clean" / "train.bson") for im in d["imgs"]]
    assert len(set(md5s)) == len(md5s)


def test_label_noise_relabels_the_asked_fraction(tmp_path):
    "Streams are independent per knob, so the only difference between the two runs is the labels"
    kw = dict(preset="tiny", seed=5, n_train_products=400, n_test_products=20)
    synth.write_dataset(tmp_path / "clean", label_noise_rate=0.0, **kw)
    summary = synth.write_dataset(tmp_path / "noisy", label_noise_rate=0.3, **kw)
    clean = read_docs(tmp_path / "clean" / "train.bson")
    noisy = read_docs(tmp_path / "noisy" / "train.bson")
    assert [d["imgs"] for d in clean] == [d["imgs"] for d in noisy]
    changed = sum(a["category_id"] != b["category_id"] for a, b in zip(clean, noisy))
    assert changed == summary["counts"]["train_label_noise_products"]
    assert 0.22 < changed / len(clean) < 0.38


def test_shift_changes_only_test_pictures(tmp_path):
    kw = dict(preset="tiny", seed=2, duplicate_rate=0.0, **SMALL)
    synth.write_dataset(tmp_path / "a", shift=0.0, **kw)
    synth.write_dataset(tmp_path / "b", shift=0.8, **kw)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a["train.bson"] == b["train.bson"]
    assert a["test.bson"] != b["test.bson"]


def test_every_category_has_train_products_and_frequencies_are_long_tailed(tmp_path):
    summary = synth.write_dataset(tmp_path, preset="tiny", seed=0, label_noise_rate=0.0,
                                  n_train_products=600, zipf_exponent=1.2, hierarchical_tail=False)
    counts = defaultdict(int)
    for d in read_docs(tmp_path / "train.bson"):
        counts[d["category_id"]] += 1
    assert len(counts) == summary["categories"]
    assert min(counts.values()) >= 3
    assert max(counts.values()) > 5 * min(counts.values())


def test_pool_mode_samples_pre_drawn_pictures(tmp_path):
    kw = dict(preset="tiny", seed=0, picture_pool_per_category=2, noise_picture_rate=0.0,
              duplicate_rate=0.0)
    summary = synth.write_dataset(tmp_path / "off", partial_view_rate=0.0, split_info_rate=0.0, **kw)
    pics = {im["picture"] for d in read_docs(tmp_path / "off" / "train.bson") for im in d["imgs"]}
    assert len(pics) <= 2 * summary["categories"]
    # close-ups and plain pictures come from pools of their own: 2 per category and kind
    summary = synth.write_dataset(tmp_path / "on", label_noise_rate=0.0, **kw)
    assert summary["counts"]["train_partial_views"] and summary["counts"]["train_plain_pictures"]
    by_cat = defaultdict(set)
    for d in read_docs(tmp_path / "on" / "train.bson"):
        for im in d["imgs"]:
            by_cat[d["category_id"]].add(im["picture"])
    assert len(set().union(*by_cat.values())) > 2 * summary["categories"]
    assert max(len(p) for p in by_cat.values()) <= 2 * 4


def test_unknown_knob_or_preset_fails_naming_it(tmp_path):
    with pytest.raises(ValueError, match="n_train_product\\b"):
        synth.write_dataset(tmp_path, preset="tiny", n_train_product=10)
    with pytest.raises(ValueError, match="huge"):
        synth.write_dataset(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="n_level1"):
        synth.make_config("tiny", n_level1=99)
    assert not any(tmp_path.iterdir()), "nothing written before the knobs are checked"


def test_presets_are_valid_overrides():
    for name, overrides in synth.PRESETS.items():
        cfg = synth.make_config(name)
        assert all(getattr(cfg, k) == v for k, v in overrides.items())


# --- product-level knobs: each lever of a product's pictures has something to show ----------------

def plan(preset="tiny", seed=0, **overrides):
    "The knobs, the categories' looks and frequencies, and the train and test plans, without pixels"
    cfg = synth.make_config(preset, **overrides)
    _, _, looks, freq = synth._catalog(cfg, seed)
    return cfg, looks, freq, synth._plan(cfg, seed, freq)


def plan_digest(freq, train, test):
    h = hashlib.sha256()
    for split in (train, test):
        for name in ("ids", "true_cat", "label", "n_imgs", "kind", "ref"):
            h.update(np.ascontiguousarray(getattr(split, name), dtype="<i8").tobytes())
    h.update(np.round(freq, 12).tobytes())
    return h.hexdigest()


def background_share(img):
    "Share of light, grey pixels: the backdrop"
    a = np.asarray(img).astype(int)
    return ((a.min(axis=2) > 190) & (a.max(axis=2) - a.min(axis=2) < 40)).mean()


def test_levers_off_give_the_data_set_as_it_was():
    "Digest of the tiny preset's plan (seed 0) taken before the product-level knobs existed"
    _, _, freq, (train, test) = plan(**LEVERS_OFF)
    assert plan_digest(freq, train, test) == \
        "1c46e7dcdacee83f691cd03f03b45b7cce5caf41fb9bbb36016b77e1d9d37a86"
    for split in (train, test):
        assert not split.partial.any() and not split.plain.any() and not split.split_info.any()


def test_generic_pictures_and_close_ups_never_come_first(tmp_path):
    summary = synth.write_dataset(tmp_path, preset="tiny", seed=0, noise_picture_rate=0.3)
    generic = set(json.loads((tmp_path / "synth.json").read_text())["noise_picture_md5"])
    for name in ("train.bson", "test.bson"):
        docs = read_docs(tmp_path / name)
        assert not any(hashlib.md5(d["imgs"][0]["picture"]).hexdigest() in generic for d in docs)
        assert any(hashlib.md5(im["picture"]).hexdigest() in generic for d in docs for im in d["imgs"])
    _, _, _, (train, test) = plan(noise_picture_rate=0.3)
    for split, domain in ((train, "train"), (test, "test")):
        first = split.starts[:-1]
        assert (split.kind[first] != synth._NOISE).all() and not split.partial[first].any()
        assert split.partial.sum() == summary["counts"][f"{domain}_partial_views"] > 0
    # without main_first generic pictures may lead, as before
    _, _, _, (train, _) = plan(noise_picture_rate=0.3, main_first=False)
    assert (train.kind[train.starts[:-1]] == synth._NOISE).any()


def test_main_first_keeps_the_share_of_generic_pictures():
    kw = dict(n_train_products=20_000, n_test_products=20, noise_picture_rate=0.1)
    for only_multi in (True, False):
        counts = [(plan(main_first=first, noise_only_multi=only_multi, **kw)[3][0].kind == synth._NOISE).sum()
                  for first in (True, False)]
        assert abs(counts[0] / counts[1] - 1) < 0.06, (only_multi, counts)


def test_close_ups_are_drawn_after_the_main_photo_at_the_asked_rate():
    cfg, _, _, (train, _) = plan(n_train_products=6000, noise_picture_rate=0.0, split_info_rate=0.0)
    later = np.ones(len(train.kind), bool)
    later[train.starts[:-1]] = False
    assert abs(train.partial[later].mean() - cfg.partial_view_rate) < 0.03
    assert not train.partial[~later].any()


def test_close_ups_fill_the_frame_with_the_surface():
    cfg = synth.make_config("tiny", occluder_rate=0.0)
    for shape in ("circle", "star", "ring", "bottle"):
        look = synth._Look(shape, (210, 0.8, 0.5), "stripes", (35, 35, 40), "A")
        whole, close = (np.mean([background_share(synth.render_picture(
            look, cfg, np.random.default_rng(i), partial=partial)) for i in range(12)])
            for partial in (False, True))
        assert whole > 0.5 and close < 0.15, (shape, whole, close)


def test_split_information_products_hide_the_pattern_on_the_main_photo():
    cfg, _, _, (train, test) = plan(n_train_products=2000, n_test_products=1000, split_info_rate=0.5)
    for split in (train, test):
        rows = np.flatnonzero(split.split_info)
        assert len(rows) > 0.3 * (split.n_imgs >= 2).sum()
        assert (split.n_imgs[rows] >= 2).all()
        for row in rows:
            pics = np.arange(split.starts[row], split.starts[row + 1])
            shown = pics[split.kind[pics] != synth._NOISE]
            # the main photo is plain; exactly one later close-up shows the pattern; the rest is plain
            assert split.plain[pics[0]] and not split.partial[pics[0]]
            patterned = shown[~split.plain[shown]]
            assert len(patterned) == 1 and patterned[0] != pics[0] and split.partial[patterned[0]]
        assert not split.plain[~np.repeat(split.split_info, split.n_imgs)].any()
    # a plain picture is the patterned one without its pattern: same outline, no pattern colour
    look = synth._Look("circle", (210, 0.8, 0.5), "stripes", (35, 35, 40), "A")
    patterned, plain = (np.asarray(synth.render_picture(look, cfg, np.random.default_rng(7), plain=p))
                        .astype(int) for p in (False, True))
    dark = lambda a: (np.abs(a - [35, 35, 40]).max(axis=2) < 30).mean()
    assert dark(patterned) > 0.03 and dark(plain) == 0
    assert abs(background_share(patterned) - background_share(plain)) < 0.01


def test_hierarchical_tail_has_rare_leaves_under_common_parents():
    cfg, _, freq, (train, _) = plan(n_level3_per_level2=4, n_train_products=20_000, label_noise_rate=0.0)
    counts = np.bincount(train.label, minlength=len(freq)).reshape(-1, cfg.n_level3_per_level2)
    leaf_spread = np.median(counts.max(axis=1) / counts.min(axis=1))
    parents = counts.sum(axis=1)
    assert leaf_spread > 5 and parents.max() / parents.min() < 3.5 < leaf_spread
    # the most common parent holds a leaf far rarer than an average leaf
    top = parents.argmax()
    assert parents[top] > 1.3 * parents.mean() and counts[top].min() < 0.6 * counts.mean()
    assert counts.min() >= cfg.min_train_per_category
    # one Zipf over all leaves: siblings no steeper than the parents
    cfg, _, freq, (train, _) = plan(n_level3_per_level2=4, n_train_products=20_000, label_noise_rate=0.0,
                                    hierarchical_tail=False)
    counts = np.bincount(train.label, minlength=len(freq)).reshape(-1, cfg.n_level3_per_level2)
    assert np.median(counts.max(axis=1) / counts.min(axis=1)) < leaf_spread


def test_each_product_knob_leaves_the_other_draws_alone():
    _, _, _, (base, _) = plan()
    _, _, _, (no_split, _) = plan(split_info_rate=0.0)
    _, _, _, (no_partial, _) = plan(partial_view_rate=0.0)
    _, _, _, (flat_tail, _) = plan(hierarchical_tail=False)
    for other in (no_split, no_partial):
        assert (other.kind == base.kind).all() and (other.ref == base.ref).all()
    assert (no_partial.split_info == base.split_info).all() and (no_partial.plain == base.plain).all()
    outside = ~np.repeat(base.split_info, base.n_imgs)
    assert (no_split.partial[outside] == base.partial[outside]).all()
    assert (flat_tail.n_imgs == base.n_imgs).all() and (flat_tail.ids == base.ids).all()


def test_same_seed_same_bytes_in_pool_mode(tmp_path):
    kw = dict(preset="tiny", seed=4, picture_pool_per_category=2, **SMALL)
    synth.write_dataset(tmp_path / "a", **kw)
    synth.write_dataset(tmp_path / "b", **kw)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


@pytest.mark.parametrize("knob, value", [
    ("partial_view_rate", 1.5), ("split_info_rate", -0.1), ("parent_zipf_exponent", -1.0),
    ("leaf_zipf_exponent", -0.5), ("main_first", "yes"), ("hierarchical_tail", None)])
def test_bad_product_knobs_are_refused_naming_them(knob, value):
    with pytest.raises(ValueError, match=knob):
        synth.make_config("tiny", **{knob: value})
