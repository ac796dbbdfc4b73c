"""cdkit: a kit for the Cdiscount Image Classification Challenge.

Layers, each importing only the ones below it:
- steps (`cdkit.steps.<step>`: Params, run(P) -> Result, plots, record), the pipeline (notebooks with
  papermill), the report, the command line (`cdkit.__main__`);
- `cdkit.runs.RunLayout`: where a run folder keeps models, stores, products;
- the library, one concern each: bsonfile (the BSON format), catalog, split, synth and synth_full
  (competition-format data), prepare (indices + split), data (fastai loaders), models (+ model card),
  callbacks, distributed, predict (the one inference path), store, ensemble, aggregate, md5,
  pseudolabel, submission, instrument, progress;
- base: io (atomic writes, locks, temp sweep), params, paths.
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
