"""cdkit: a kit for the Cdiscount Image Classification Challenge.

The packages are the pipeline's stages, in layers; a module imports only from its own layer or the layers
below it (tests/test_architecture.py reads the imports from the source and refuses an arrow up or a circle):

    cdkit/__main__.py   the command line (`cdkit <step>`, `cdkit demo`)
    cdkit/steps/        one module per step: <Step>Params, run(P) -> <Step>Result, plots, record();
                        registry (the table of steps), entry (what every step's run goes through),
                        pipeline (runs the notebooks with papermill), report (results.json -> report.md)
    cdkit/runs.py       RunLayout: where a run folder keeps models, stores, products, the report
    cdkit/pseudo/       pseudo-labels: selection, alpha(t), mixed batches, the fine-tune loop
    cdkit/submit/       the submission file
    cdkit/infer/        the streaming predictor, prediction and feature stores, the fusion head, ensembling,
                        top-k kernels, product aggregation (mean, belief), the re-ranker, MD5 lookup
    cdkit/train/        models and their cards, callbacks, the category hierarchy, distributed launch
    cdkit/data/         the BSON format, the catalog, the split, prepared indices, loaders, synthetic data
    cdkit/base/         errors, io (atomic writes, locks, the raw-data guard), paths, params, progress,
                        metrics, rng

Importing cdkit itself imports none of the heavy ones.
"""
__version__ = "0.1.0"

import warnings as _warnings

# Warnings that the notebooks would show on every run although neither the kit nor its user can act on
# them; each is about a dependency's own code, and filtered by its exact text only:
# - fastai (2.8) decorates a few layers with torch.jit.script, which torch 2.10+ deprecates at import;
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
_warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
# - fastai.tabular (imported by fastai.interpret) sets a pandas option that pandas 3 deprecates;
_warnings.filterwarnings("ignore", message=r"The 'mode\.chained_assignment' option is deprecated")
# - fastai's Learner.load names numpy.core, which numpy 2 renamed.
_warnings.filterwarnings("ignore", message=r"numpy\.core is deprecated", category=DeprecationWarning)
# tqdm's "IProgress not found" (TqdmWarning) is fixed at the source: ipywidgets is in requirements.txt.
