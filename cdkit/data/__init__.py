"""The data: the BSON format, the category catalog, the split, prepared indices, fastai loaders, synthetic data sets."""
