"""What step 02 accepts, the later steps can use: generated data sets (ids, picture counts, empty
files, links, copies) that break what the competition guarantees are refused by name (DataSetError),
and those that keep it are prepared."""
import os
import shutil

import bson
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cdkit.data.bsonfile import MAX_PICTURES, BsonFormatError, build_index, image_table
from cdkit.base.errors import CdkitError
from cdkit.data.prepare import DataSetError, create_prepared

CATS = [1000000001, 1000000002, 1000000003]
PIC = b"\xff\xd8\xff\xe0not decoded by step 02\xff\xd9"
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_set(folder, train_ids, test_ids, n_pics=None, cats=None, catalog=CATS):
    "A data folder: train.bson (labelled), test.bson (no labels), category_names.csv"
    folder.mkdir(parents=True, exist_ok=True)
    n_pics = n_pics or {}
    cats = cats if cats is not None else [catalog[i % len(catalog)] for i in range(len(train_ids))]
    docs = [{"_id": int(i), "category_id": int(c), "imgs": [{"picture": PIC}] * n_pics.get(int(i), 1)}
            for i, c in zip(train_ids, cats)]
    (folder / "train.bson").write_bytes(b"".join(bson.encode(d) for d in docs))
    if test_ids is not None:
        tdocs = [{"_id": int(i), "imgs": [{"picture": PIC}] * n_pics.get(int(i), 1)} for i in test_ids]
        (folder / "test.bson").write_bytes(b"".join(bson.encode(d) for d in tdocs))
    pd.DataFrame({"category_id": catalog, "category_level1": "a", "category_level2": "b",
                  "category_level3": [f"c{i}" for i in range(len(catalog))]}).to_csv(folder / "category_names.csv",
                                                                                 index=False)
    return folder


def prepare(folder, tmp_path, **kw):
    return create_prepared(folder, tmp_path / "work", log=lambda *a: None, **kw)


def good_ids(n, start=0):
    return list(range(start, start + n))


def test_a_sound_set_is_prepared(tmp_path):
    prep = prepare(write_set(tmp_path / "d", good_ids(30), good_ids(10, 1000)), tmp_path, valid_frac=0.2)
    assert len(prep.train_index) == 30 and len(prep.test_index) == 10 and prep.valid_mask(prep.train_index).any()


@pytest.mark.parametrize("which", ["train", "test"])
def test_empty_file_is_refused(tmp_path, which):
    d = write_set(tmp_path / "d", [] if which == "train" else good_ids(30), [] if which == "test" else good_ids(5, 100))
    with pytest.raises(DataSetError, match=rf"{which}.bson holds no product"):
        prepare(d, tmp_path)


def test_missing_test_file_is_refused(tmp_path):
    d = write_set(tmp_path / "d", good_ids(30), None)
    with pytest.raises(DataSetError, match=r"test.bson not found"):
        prepare(d, tmp_path)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "copy"])
def test_test_that_is_train_again_is_refused(tmp_path, how):
    d = write_set(tmp_path / "d", good_ids(30), None)
    {"symlink": lambda: os.symlink(d / "train.bson", d / "test.bson"),
     "hardlink": lambda: os.link(d / "train.bson", d / "test.bson"),
     "copy": lambda: shutil.copy(d / "train.bson", d / "test.bson")}[how]()
    with pytest.raises(DataSetError, match=r"test.bson (is the same file as|and .*train.bson share 30 of)"):
        prepare(d, tmp_path)


@SETTINGS
@given(n_train=st.integers(6, 40), n_test=st.integers(1, 20), data=st.data())
def test_ids_negative_or_shared_are_refused_by_name(tmp_path_factory, n_train, n_test, data):
    "Generated ids (0 is a real train id): a negative id in either file, or a test id that is a train id, names the id"
    tmp = tmp_path_factory.mktemp("ids")
    train = good_ids(n_train, 1)
    test = good_ids(n_test, 10_000)
    fault = data.draw(st.sampled_from(["train_nonpositive", "test_nonpositive", "shared"]))
    bad_id = data.draw(st.integers(-2**40, -1))
    if fault == "train_nonpositive":
        train[data.draw(st.integers(0, n_train - 1))] = bad_id
        want = rf"train.bson: 1 product _id\(s\) are negative, e.g. {bad_id}"
    elif fault == "test_nonpositive":
        test[data.draw(st.integers(0, n_test - 1))] = bad_id
        want = rf"test.bson: 1 product _id\(s\) are negative, e.g. {bad_id}"
    else:
        shared = data.draw(st.lists(st.sampled_from(train), min_size=1, max_size=n_test, unique=True))
        test[:len(shared)] = shared
        want = rf"share {len(shared)} of the test set's {n_test} product _id\(s\), e.g. {min(shared)}"
    with pytest.raises(DataSetError, match=want):
        prepare(write_set(tmp / "d", train, test), tmp, valid_frac=0.2)


@SETTINGS
@given(n=st.integers(1, 255))
def test_picture_counts_up_to_what_img_idx_holds(tmp_path_factory, n):
    "1..MAX_PICTURES pictures a product are prepared and their positions fit img_idx; more are refused by product"
    tmp = tmp_path_factory.mktemp("pics")
    d = write_set(tmp / "d", good_ids(12), good_ids(3, 500), n_pics={5: n})
    if n <= MAX_PICTURES:
        prep = prepare(d, tmp, valid_frac=0.2)
        t = image_table(prep.train_index)
        pos = t.loc[t["product_id"] == 5, "img_idx"].to_numpy()
        assert np.array_equal(pos.astype(int), np.arange(n))  # no position wrapped round in int8
    else:
        with pytest.raises(DataSetError, match=rf"train.bson: 1 product\(s\) have more than {MAX_PICTURES} pictures.*_id 5 with {n}"):
            prepare(d, tmp, valid_frac=0.2)
        with pytest.raises(BsonFormatError, match=rf"product _id 5 has {n} pictures"):  # the image table refuses too
            image_table(build_index(d / "train.bson"))


def test_unknown_and_missing_categories_are_refused(tmp_path):
    d = write_set(tmp_path / "d", good_ids(12), good_ids(3, 500), cats=CATS * 3 + [777, 777, 888])
    with pytest.raises(DataSetError, match=r"3 product\(s\) carry 2 category_id\(s\) missing from .*category_names.csv, e.g. 777, 888"):
        prepare(d, tmp_path)


@SETTINGS
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6), fusion=st.booleans())
def test_splits_later_steps_need_are_not_empty(tmp_path_factory, sizes, fusion):
    """Generated categories of 1-4 products: step 02 refuses a split whose validation, training or
    (fusion_frac > 0) fusion part is empty, and every split it accepts has all three"""
    tmp = tmp_path_factory.mktemp("split")
    cats = [c for i, size in enumerate(sizes) for c in [CATS[0] + i] * size]
    catalog = [CATS[0] + i for i in range(len(sizes))]
    d = write_set(tmp / "d", good_ids(len(cats)), good_ids(2, 900), cats=cats, catalog=catalog)
    try:
        prep = prepare(d, tmp, valid_frac=0.2, fusion_frac=0.2 if fusion else 0.0)
    except DataSetError as e:
        assert "split holds no product" in str(e)
        return
    assert prep.valid_mask(prep.train_index).any() and prep.train_mask(prep.train_index).any()
    assert prep.n_fusion > 0 or not fusion


def test_a_split_without_validation_is_refused(tmp_path):
    "Every category has one product: nothing can be held out"
    d = write_set(tmp_path / "d", good_ids(3), good_ids(2, 900))
    with pytest.raises(DataSetError, match=r"the validation split holds no product \(3 products in all\)"):
        prepare(d, tmp_path)


def test_refusals_are_one_cdkit_error_class():
    assert issubclass(DataSetError, CdkitError) and issubclass(BsonFormatError, CdkitError)
