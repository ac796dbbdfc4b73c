"""Accuracy, computed one way for every step, bench and test: of products, by number of pictures, by
level of the category hierarchy."""
from __future__ import annotations

import numpy as np
import pandas as pd


def product_accuracy(pred_class, true_class):
    "Fraction of products whose predicted class is the true one"
    pred_class, true_class = np.asarray(pred_class), np.asarray(true_class)
    if pred_class.shape != true_class.shape: raise ValueError(f"shapes differ: {pred_class.shape} vs {true_class.shape}")
    return float((pred_class == true_class).mean()) if len(pred_class) else float("nan")


def accuracy_by_n_pictures(pred_class, true_class, n_pictures):
    "Accuracy per number of pictures per product: DataFrame n_pictures, products, share, accuracy"
    df = pd.DataFrame(dict(n_pictures=np.asarray(n_pictures), ok=np.asarray(pred_class) == np.asarray(true_class)))
    out = df.groupby("n_pictures")["ok"].agg(products="size", accuracy="mean").reset_index()
    out.insert(2, "share", out["products"] / len(df))
    return out


def accuracy_by_level(pred_class, true_class, level1, level2):
    "Accuracy at the category, level-2 and level-1 hierarchy levels (level arrays map class -> index)"
    pred_class, true_class = np.asarray(pred_class), np.asarray(true_class)
    level1, level2 = np.asarray(level1), np.asarray(level2)
    rows = [("category", product_accuracy(pred_class, true_class)),
            ("level2", product_accuracy(level2[pred_class], level2[true_class])),
            ("level1", product_accuracy(level1[pred_class], level1[true_class]))]
    return pd.DataFrame(rows, columns=["level", "accuracy"])
