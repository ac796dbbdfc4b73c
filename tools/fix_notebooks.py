"""`make notebooks`: put notebooks/*.ipynb back in the shape the kit needs, keeping what their users wrote.

The notebooks are the source of their own prose and cells: open, edit and save them in JupyterLab. What
must agree with the code is checked (`python tools/fix_notebooks.py --check`, tests/test_notebooks.py):
- the cell tagged `parameters` is the one generated from the step's Params class (defaults + the comment
  on each field's line), so notebooks, `cdkit <step>` and params files share one set of defaults;
- no outputs, execution counts or transient metadata are committed (what nbstripout strips);
- code cells only call cdkit: no `def` or `class`, and the notebook imports from cdkit.
The fix regenerates each parameters cell, strips outputs, execution counts, cells injected by papermill
and the metadata JupyterLab rewrites on save, and numbers the cell ids; prose and other cells stay as
written. A step of cdkit/steps/registry.py without a notebook gets a minimal one to start from."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdkit.base.params import defaults, field_comments  # noqa: E402
from cdkit.steps.registry import STEPS  # noqa: E402

FIX = "run `make notebooks` (python tools/fix_notebooks.py) to fix it"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
# cell metadata that JupyterLab, extensions or papermill write on save or run (nbstripout's list and papermill's)
TRANSIENT_CELL_KEYS = ("collapsed", "scrolled", "ExecuteTime", "execution", "heading_collapsed", "hidden", "papermill",
                       "jupyter", "trusted")


def parameters_source(cls) -> str:
    "The parameters cell of a Params class: one `name = default  # comment` line per field"
    comments = field_comments(cls)
    lines = []
    for k, v in defaults(cls).items():
        c = comments.get(k, "")
        lines.append(f"{k} = {v!r}" + (f"  # {c}" if c else ""))
    return "\n".join(lines)


def _tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


def new_notebook(step) -> nbformat.NotebookNode:
    "A notebook to start a new step from: its title, its parameters cell, the cell that runs it"
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters_source(step.params_class()))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {step.notebook.replace('_', ' ', 1)}\n\n**Inputs**: ...\n\n**Outputs**: ..."),
                params,
                nbformat.v4.new_code_cell(f"from cdkit.base.params import take_params\nfrom cdkit.steps import {step.module} as step\n\n"
                                          f"P = take_params(step.{step.params}, globals())\nR = step.run(P)\n"
                                          "step.record(P.run_dir, R)\nR")]
    return fix(nb, step)


def fix(nb: nbformat.NotebookNode, step) -> nbformat.NotebookNode:
    "The notebook with its parameters cell regenerated and everything transient stripped (in place; returned)"
    nb.cells = [c for c in nb.cells if "injected-parameters" not in _tags(c)]  # a papermill output saved over it
    source = parameters_source(step.params_class())
    tagged = [c for c in nb.cells if "parameters" in _tags(c)]
    if tagged:
        tagged[0].source = source
        tagged[0].cell_type = "code"
    else:  # after the title
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, cell)
    for c in nb.cells:
        for key in TRANSIENT_CELL_KEYS:
            c.metadata.pop(key, None)
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nb.metadata = nbformat.NotebookNode({"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)})
    nb.nbformat, nb.nbformat_minor = 4, 5
    prefix = step.notebook.split("_")[0]
    for i, c in enumerate(nb.cells):
        c["id"] = f"{prefix}-{i:02d}"
    return nb


def problems(path) -> list[str]:
    "What is wrong with one committed notebook, each a line naming the fix"
    path = Path(path)
    where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    step = next((s for s in STEPS if s.notebook == path.stem), None)
    if step is None:
        return [f"{where}: no step of cdkit/steps/registry.py has this notebook (a step's notebook is notebooks/<Step.notebook>.ipynb)"]
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 (any reader error: the file is not a notebook)
        return [f"{where}: not a readable notebook ({type(e).__name__}: {e})"]
    out = []
    tagged = [c for c in nb.cells if "parameters" in _tags(c)]
    if len(tagged) != 1 or tagged[0].source != parameters_source(step.params_class()):
        out.append(f"{where}: the cell tagged `parameters` is not the one generated from {step.module}.{step.params} "
                   f"(defaults and field comments); {FIX}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    if any(c.get("outputs") or c.get("execution_count") is not None for c in code):
        out.append(f"{where}: outputs or execution counts are committed; {FIX}")
    if any("injected-parameters" in _tags(c) for c in nb.cells):
        out.append(f"{where}: holds a cell injected by papermill (an executed copy saved over it); {FIX}")
    transient = sorted({k for c in nb.cells for k in TRANSIENT_CELL_KEYS if k in c.metadata})
    if transient or dict(nb.metadata) != {"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO}:
        out.append(f"{where}: transient metadata is committed ({', '.join(transient) or 'notebook metadata'}); {FIX}")
    for c in code:
        defs = [line for line in c.source.splitlines() if line.lstrip().startswith(("def ", "class "))]
        if defs:
            out.append(f"{where}: a code cell defines {defs[0].strip()!r}: a definition belongs in the cdkit package "
                       "(notebooks only call it); `make notebooks` cannot fix this")
    if not any("from cdkit" in c.source or "import cdkit" in c.source for c in code):
        out.append(f"{where}: no code cell imports from cdkit (a notebook calls the package's step); "
                   "`make notebooks` cannot fix this")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report what is wrong, write nothing (exit 1 if anything is)")
    ap.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="the folder of the notebooks")
    args = ap.parse_args(argv)
    found = []
    for s in STEPS:
        path = args.notebooks / f"{s.notebook}.ipynb"
        if args.check:
            found += problems(path) if path.exists() else [f"{path}: missing; {FIX}"]
            continue
        before = path.read_text() if path.exists() else None
        nb = fix(nbformat.read(path, as_version=4), s) if path.exists() else new_notebook(s)
        nbformat.write(nb, path)
        if path.read_text() != before:
            print("fixed" if before is not None else "created", path)
        found += [p for p in problems(path) if "cannot fix" in p]
    for p in found:
        print(p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
