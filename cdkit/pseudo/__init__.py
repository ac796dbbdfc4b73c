"""Pseudo-labels: confidence, selection, alpha(t), mixed batches, the fine-tune loop."""
