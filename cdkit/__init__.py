"""cdkit: a kit for the Cdiscount Image Classification Challenge.

Modules, one concern each: bsonfile (the BSON format), catalog (categories), split, synth (synthetic
competition-format data), prepare (indices + split), data (fastai loaders), models, callbacks, train,
predict (streaming TTA), store (compact predictions), ensemble, aggregate (product-level, belief
based), md5, pseudo (pseudo-labels), submission. Importing cdkit itself imports none of the heavy ones.
"""
__version__ = "0.1.0"
