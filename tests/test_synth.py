"Synthetic data set: competition format, reproducibility, and that each knob does what it says"

import csv
import hashlib
import io
import json
from collections import defaultdict

import bson
import pytest
from PIL import Image

from cdkit import synth

# small and quick: a few dozen products is enough to see every knob act
SMALL = dict(n_train_products=60, n_test_products=30, min_train_per_category=2)


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
                                  n_train_products=600, zipf_exponent=1.2)
    counts = defaultdict(int)
    for d in read_docs(tmp_path / "train.bson"):
        counts[d["category_id"]] += 1
    assert len(counts) == summary["categories"]
    assert min(counts.values()) >= 3
    assert max(counts.values()) > 5 * min(counts.values())


def test_pool_mode_samples_pre_drawn_pictures(tmp_path):
    summary = synth.write_dataset(tmp_path, preset="tiny", seed=0, picture_pool_per_category=2,
                                  noise_picture_rate=0.0, duplicate_rate=0.0)
    pics = {im["picture"] for d in read_docs(tmp_path / "train.bson") for im in d["imgs"]}
    assert len(pics) <= 2 * summary["categories"]


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
