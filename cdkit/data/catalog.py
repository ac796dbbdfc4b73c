"""The catalog of categories: category_names.csv mapped to class indices and the 3-level hierarchy."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cdkit.base.errors import CdkitError

COLUMNS = ["category_id", "category_level1", "category_level2", "category_level3"]


class UnknownCategoryError(CdkitError, KeyError):
    "A category_id that the catalog (category_names.csv) does not hold"

    def __str__(self):
        return str(self.args[0])


class CatalogError(CdkitError, ValueError):
    "category_names.csv cannot be read as the catalog: the message names the file"


class Catalog:
    """category_id <-> class index (stable: classes are the category ids sorted ascending),
    with level-1 and level-2 indices and names for each class."""

    def __init__(self, table: pd.DataFrame, source="category_names.csv"):
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise CatalogError(f"{source}: missing columns {missing} (expected {COLUMNS})")
        dup = table["category_id"].duplicated()
        if dup.any():
            raise CatalogError(f"{source}: category_id {table['category_id'][dup].iloc[0]} listed twice")
        self.source = source
        self.table = table[COLUMNS].sort_values("category_id", kind="stable").reset_index(drop=True)
        self.category_ids = self.table["category_id"].to_numpy(np.int64)
        self.level1_names = np.array(sorted(self.table["category_level1"].unique()), dtype=object)
        # level-2 names are identities of their own (483 in the real catalog; a few sit under two
        # level-1 names, so they are not made unique per level 1)
        l2 = self.table["category_level2"]
        self.level2_names = np.array(sorted(l2.unique()), dtype=object)
        self.level1 = np.searchsorted(self.level1_names, self.table["category_level1"].to_numpy(object))
        self.level2 = np.searchsorted(self.level2_names, l2.to_numpy(object))

    @classmethod
    def from_csv(cls, path):
        try:
            table = pd.read_csv(path, dtype={"category_id": np.int64})
        except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
            raise CatalogError(f"{path}: not a readable category_names.csv ({' '.join(str(e).split())[:200]})") from None
        return cls(table, source=str(path))

    @property
    def n_classes(self):
        return len(self.category_ids)

    def __len__(self):
        return self.n_classes

    def to_class(self, category_ids):
        "Class indices of category ids; an id absent from the catalog is an error that names it"
        ids = np.asarray(category_ids, dtype=np.int64)
        pos = np.searchsorted(self.category_ids, ids).clip(max=self.n_classes - 1)
        bad = self.category_ids[pos] != ids
        if bad.any():
            unknown = np.unique(ids[bad])
            raise UnknownCategoryError(
                f"{len(unknown)} category_id(s) in the data are missing from {self.source}: "
                f"{unknown[:10].tolist()}{' ...' if len(unknown) > 10 else ''}")
        return pos.astype(np.int64)

    def to_category(self, classes):
        return self.category_ids[np.asarray(classes, dtype=np.int64)]

    def name(self, cls, level=3):
        "Readable name of a class: its level-3 name, or level 1/2"
        row = self.table.iloc[int(cls)]
        return row[f"category_level{level}"]

    def n_level(self, level):
        return {1: len(self.level1_names), 2: len(self.level2_names), 3: self.n_classes}[level]

    def level_of(self, classes, level):
        "Index at hierarchy level 1, 2 or 3 of each class"
        classes = np.asarray(classes, dtype=np.int64)
        return {1: self.level1, 2: self.level2, 3: np.arange(self.n_classes)}[level][classes]

    def __repr__(self):
        return (f"Catalog({self.n_classes} categories, {len(self.level2_names)} level-2, "
                f"{len(self.level1_names)} level-1, from {self.source})")
