"""The pipeline's steps, one module each: <Step>Params, run(P) -> <Step>Result, its plots, and the
rows it records in the run's results (`record`). Notebooks, the command line and the pipeline call
these; the library below them (cdkit.base, data, train, infer, pseudo, submit) knows nothing of steps.

    01 explore    02 prepare    03-05 train    06 predict    06b fuse    07 ensemble
    08 aggregate  09 pseudo     10 submit

Beside them: `registry` (the table of steps), `entry` (guard, lock and claim of the run folder that
every step's run goes through), `pipeline` (the notebooks in order, with papermill), `report`.
"""
