import numpy as np
import pandas as pd
import pytest

from cdkit.data.catalog import Catalog, UnknownCategoryError
from cdkit.data.split import TRAIN, attach_split, load_split, make_split, save_split


def small_catalog():
    t = pd.DataFrame({"category_id": [30, 10, 20, 40],
                      "category_level1": ["B", "A", "A", "B"],
                      "category_level2": ["b1", "a1", "a2", "b1"],
                      "category_level3": ["x", "y", "z", "w"]})
    return Catalog(t)


def test_class_map_is_sorted_and_stable():
    c = small_catalog()
    assert c.category_ids.tolist() == [10, 20, 30, 40]
    assert c.to_class([40, 10]).tolist() == [3, 0]
    assert c.to_category([1, 2]).tolist() == [20, 30]
    assert c.level1.tolist() == [0, 0, 1, 1] and c.level2.tolist() == [0, 1, 2, 2]
    assert c.name(0) == "y" and c.name(3, level=1) == "B"


def test_unknown_category_is_named():
    with pytest.raises(UnknownCategoryError, match="99"):
        small_catalog().to_class([10, 99])


def test_real_catalog(real_dir):
    c = Catalog.from_csv(real_dir / "category_names.csv")
    assert (c.n_level(3), c.n_level(2), c.n_level(1)) == (5270, 483, 49)


def fake_index(n=5000, n_cats=50, seed=0):
    rng = np.random.default_rng(seed)
    cats = rng.zipf(1.5, n) % n_cats
    return pd.DataFrame({"product_id": rng.permutation(n * 3)[:n], "category_id": cats})


def test_split_is_stratified_deterministic_and_product_level(tmp_path):
    index = fake_index()
    s = make_split(index, valid_frac=0.1, seed=3)
    assert s.equals(make_split(index, valid_frac=0.1, seed=3))
    assert not s.equals(make_split(index, valid_frac=0.1, seed=4))
    valid = s["fold"] == 0
    assert set(s["fold"].unique()) == {0, TRAIN}
    assert abs(valid.mean() - 0.1) < 0.02
    # every category with >= 2 products has validation and train products
    counts = index.groupby("category_id").size()
    vc = index[valid.to_numpy()].groupby("category_id").size()
    for cat, n in counts.items():
        if n >= 2:
            assert 1 <= vc.get(cat, 0) < n
    save_split(s, tmp_path / "split.parquet")
    assert load_split(tmp_path / "split.parquet").equals(s)


def test_no_product_on_both_sides():
    index = fake_index(500)
    s = make_split(index, valid_frac=0.2)
    images = index.loc[index.index.repeat(3)].reset_index(drop=True)  # 3 pictures a product
    fold = attach_split(images, s)
    per_product = pd.Series(fold).groupby(images["product_id"].to_numpy()).nunique()
    assert (per_product == 1).all()


def test_k_folds():
    index = fake_index(2000)
    s = make_split(index, n_folds=5, seed=1)
    sizes = s["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.min() > 300


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid_frac"):
        make_split(fake_index(10), valid_frac=1.5)
    with pytest.raises(ValueError, match="n_folds"):
        make_split(fake_index(10), n_folds=1)
