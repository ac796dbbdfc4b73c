"""Inference and its levers: the streaming predictor, prediction and feature stores, the fusion head,
ensembling, product aggregation (top-k kernels, belief), the re-ranker, MD5 lookup, out-of-fold choices."""
