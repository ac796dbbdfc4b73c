"""The pipeline's steps, one module each: <Step>Params, run(P) -> <Step>Result, its plots, and the
rows it records in the run's results (`record`). Notebooks, the command line and the pipeline call
these; the library below them (cdkit.data.bsonfile, data, models, store, ensemble, aggregate, md5,
pseudolabel, submission, ...) knows nothing of steps, params or run folders.

    01 explore    02 prepare    03-05 train    06 predict    07 ensemble
    08 aggregate  09 pseudo     10 submit
"""
