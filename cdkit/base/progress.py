"""Progress bars for the steps that can take minutes (prediction, indexing, hashing): tqdm.auto, a
widget in notebooks (ipywidgets), a bar on a terminal, nothing when the output is neither (a log
file, a pipe), where the steps' own log lines say how far they are. CDKIT_PROGRESS=1 forces bars on,
CDKIT_PROGRESS=0 off."""
from __future__ import annotations

import os
import sys


def in_notebook() -> bool:
    "Running in a Jupyter kernel (JupyterLab, papermill)"
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def enabled(progress=None) -> bool:
    "Whether to draw a bar: `progress` when given (True/False), else CDKIT_PROGRESS, else a notebook or a terminal"
    if progress is not None: return bool(progress)
    env = os.environ.get("CDKIT_PROGRESS")
    if env in ("0", "1"): return env == "1"
    return in_notebook() or bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable=None, total=None, desc=None, unit="it", progress=None, **kw):
    "A tqdm.auto bar over `iterable` (or to update by hand), disabled as `enabled(progress)` says"
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(progress), mininterval=1.0,
                dynamic_ncols=True, **kw)
