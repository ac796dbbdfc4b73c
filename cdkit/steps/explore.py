"""Step 01: what the data looks like. Tables are pure functions of the index; plots return figures.

`run(ExploreParams) -> ExploreResult` indexes both files in memory (step 02 writes the indices) and
computes every table the notebook shows."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from cdkit.steps.entry import step_entry
from cdkit.data.bsonfile import NO_LABEL, BsonReader, build_index, image_table, picture_md5
from cdkit.data.catalog import Catalog
from cdkit.data.synth import ensure_data
from cdkit.base.params import DataParams


class ExploreParams(DataParams):
    "Parameters of notebooks/01_explore_data.ipynb"
    synth_preset: Literal["", "tiny", "demo", "bench"] = "demo"  # generate this synthetic preset when data_dir has no train.bson and its name says synth, demo, tiny or bench ('': never)
    n_grid_products: int = Field(12, ge=0, le=64)         # products shown in the sample grid
    max_hash_pictures: int = Field(200000, ge=1, le=10**9)          # pictures hashed for the duplicate count (sampled beyond this)
    seed: int = Field(0, ge=0, le=2**32 - 1)               # sampling seed


@dataclass
class ExploreResult:
    "What step 01 found; the notebook shows these tables and plots"
    data_dir: Path
    catalog: Catalog
    train_index: pd.DataFrame
    test_index: pd.DataFrame | None
    index_summary: str                    # what indexing found (products, pictures, speed), per file
    pictures_per_product: pd.DataFrame
    top_categories: pd.DataFrame
    hierarchy: pd.DataFrame
    picture_stats: pd.DataFrame           # a sample of train pictures: size, bytes, MD5
    duplicates: pd.DataFrame

    @property
    def reader(self):
        return BsonReader(self.data_dir / "train.bson")


@step_entry("explore")
def run(P: ExploreParams, log=print) -> ExploreResult:
    "Index train and test in memory, then the tables of step 01"
    data = ensure_data(P.data_dir, P.synth_preset, P.seed, log)
    from cdkit.base.io import check_complete
    check_complete(data)
    catalog = Catalog.from_csv(data / "category_names.csv")
    train, stats = build_index(data / "train.bson", return_stats=True)
    summary = [stats.summary()]
    test = None
    if (data / "test.bson").exists():
        test, test_stats = build_index(data / "test.bson", return_stats=True)
        summary.append(test_stats.summary())
    pics = picture_stats(BsonReader(data / "train.bson"), train, max_pictures=P.max_hash_pictures, seed=P.seed)
    return ExploreResult(data, catalog, train, test, "\n".join(summary), pictures_per_product(train),
                         category_frequencies(train, catalog).head(10), hierarchy_sizes(catalog, train), pics,
                         duplicate_summary(pics))


def pictures_per_product(index) -> pd.DataFrame:
    "Share of products with 0, 1, 2, ... pictures"
    counts = index["n_imgs"].value_counts().sort_index()
    return pd.DataFrame({"products": counts, "share": (counts / counts.sum()).round(4)}).rename_axis("pictures")


def category_frequencies(index, catalog=None) -> pd.DataFrame:
    "Products per category, most frequent first, with names when a catalog is given"
    cats = index.loc[index["category_id"] != NO_LABEL, "category_id"]
    freq = cats.value_counts().rename("products").to_frame()
    freq["share"] = (freq["products"] / freq["products"].sum()).round(5)
    if catalog is not None:
        cls = catalog.to_class(freq.index.to_numpy())
        freq["level1"] = [catalog.name(c, 1) for c in cls]
        freq["name"] = [catalog.name(c, 3) for c in cls]
    return freq


def hierarchy_sizes(catalog, index=None) -> pd.DataFrame:
    "Number of categories at each level of the catalog (and present in the data, given an index)"
    rows = {"catalog": [catalog.n_level(l) for l in (1, 2, 3)]}
    if index is not None:
        cls = catalog.to_class(np.unique(index.loc[index["category_id"] != NO_LABEL, "category_id"]))
        rows["in data"] = [len(np.unique(catalog.level_of(cls, l))) for l in (1, 2, 3)]
    return pd.DataFrame(rows, index=["level 1", "level 2", "level 3"])


def picture_stats(reader, index, max_pictures=200000, seed=0) -> pd.DataFrame:
    """Byte size and MD5 of pictures (all of them, or a seeded sample of products beyond
    `max_pictures`): columns product_id, img_idx, bytes, md5"""
    table = image_table(index)
    if len(table) > max_pictures:
        table = table.sample(max_pictures, random_state=seed).sort_values(["offset", "img_idx"])
    from cdkit.base.progress import bar
    rows = []
    groups = table.groupby(["offset", "length"], sort=False)
    for (off, n), grp in bar(groups, total=groups.ngroups, desc="md5 of the sampled pictures", unit="product",
                             progress=None if len(table) >= 50_000 else False):
        pics = reader.pictures(off, n)
        for r in grp.itertuples():
            b = pics[r.img_idx]
            rows.append((r.product_id, r.img_idx, len(b), picture_md5(b).hex()))
    return pd.DataFrame(rows, columns=["product_id", "img_idx", "bytes", "md5"])


def duplicate_summary(stats) -> pd.DataFrame:
    "How many pictures are byte-identical to another one"
    counts = stats["md5"].map(stats["md5"].value_counts())
    return pd.DataFrame({"value": [len(stats), stats["md5"].nunique(), int((counts > 1).sum()),
                                   round(1 - stats["md5"].nunique() / max(len(stats), 1), 4)]},
                        index=["pictures", "unique (MD5)", "pictures with a twin", "duplicate share"])


def plot_overview(index, catalog):
    "Pictures per product, and category frequencies on a log scale (the long tail)"
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
    ppp = pictures_per_product(index)
    ax[0].bar(ppp.index.astype(str), ppp["share"])
    ax[0].set(title="pictures per product", xlabel="pictures", ylabel="share of products")
    freq = category_frequencies(index)
    ax[1].plot(np.arange(1, len(freq) + 1), freq["products"].to_numpy())
    ax[1].set(title="category frequencies (long tail)", xlabel="category rank", ylabel="products",
              yscale="log", xscale="log")
    fig.tight_layout()
    return fig


def plot_product_grid(reader, index, catalog, n=12, seed=0, ncols=4):
    "A grid of sample products: their pictures side by side, titled with the category names"
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(seed)
    rows = index.iloc[np.sort(rng.choice(len(index), size=min(n, len(index)), replace=False))]
    nrows = int(np.ceil(len(rows) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 3.6, nrows * 2.3), squeeze=False)
    for ax, r in zip(axes.flat, rows.itertuples()):
        grey = np.full((180, 180, 3), 128, np.uint8)  # a picture that does not decode shows grey
        pics = [p if p is not None else grey for p in reader.images(r.offset, r.length)]
        strip = np.concatenate(pics, axis=1) if pics else np.full((180, 180, 3), 255, np.uint8)
        ax.imshow(strip)
        if r.category_id != NO_LABEL:
            c = catalog.to_class([r.category_id])[0]
            title = f"{catalog.name(c, 1)[:26]}\n{catalog.name(c, 3)[:30]}"
        else:
            title = "(test: no label)"
        ax.set_title(f"product {r.product_id}\n{title}", fontsize=7)  # three short lines: never wider than the axis
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("sample products: level-1 / level-3 category", fontsize=10)
    fig.tight_layout()
    return fig


def plot_picture_sizes(stats):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(stats["bytes"] / 1024, bins=50)
    ax.set(title="picture sizes", xlabel="KiB", ylabel="pictures")
    fig.tight_layout()
    return fig


def what_this_shows(R: ExploreResult) -> str:
    "A few sentences read off this step's own tables"
    n_prod, n_pics = len(R.train_index), int(R.train_index["n_imgs"].sum())
    share1 = float((R.train_index["n_imgs"] == 1).mean())
    counts = R.train_index["category_id"].value_counts()
    top10 = float(counts.head(max(1, len(counts) // 10)).sum() / counts.sum())
    dup = float(R.picture_stats["md5"].duplicated(keep=False).mean()) if "md5" in R.picture_stats else float("nan")
    return (f"{n_prod:,} train products carry {n_pics:,} pictures ({n_pics / max(n_prod, 1):.2f} per product; "
            f"{share1:.0%} have one picture), so products, not pictures, are what gets scored. The 10% most "
            f"frequent of {counts.size:,} categories hold {top10:.0%} of the products: a long tail. "
            f"{dup:.1%} of the sampled pictures have a byte-identical twin, which step 08's MD5 lookup uses.")
