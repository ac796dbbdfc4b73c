"""Training: models and their cards, fastai callbacks, the category hierarchy, distributed launch."""
