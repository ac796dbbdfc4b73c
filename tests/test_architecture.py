"""The package's layers, read from the source: every import of every module (module level and inside
functions) is an arrow; no arrow points up a layer and no arrows form a circle.

    steps (each step, the pipeline runner, the report)     cdkit/steps/, cdkit/__main__.py
    runs  (RunLayout: where a run folder keeps its files)   cdkit/runs.py
    pseudo, submit                                          cdkit/pseudo/, cdkit/submit/
    infer (predictor, stores, levers)                       cdkit/infer/
    train (models, callbacks, hierarchy, launch)            cdkit/train/
    data  (BSON, catalog, split, prepare, loaders, synth)   cdkit/data/
    base  (errors, io, paths, params, progress, metrics)    cdkit/base/
"""
import ast
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1] / "cdkit"
LAYERS = {"base": 0, "data": 1, "train": 2, "infer": 3, "pseudo": 4, "submit": 4, "runs": 5, "steps": 6,
          "__main__": 7}
STEP_MODULES = ("explore", "prepare", "train", "predict", "fuse", "ensemble", "aggregate", "pseudo", "submit")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, known: set) -> set:
    "the cdkit modules `path` imports anywhere in its body (a package's __init__ counts as the package)"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (the layers are read from absolute names)"
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in known:
                out.add(n)
    return out


def graph() -> dict:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def layer(mod: str):
    parts = mod.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def circles(g: dict) -> list:
    "strongly connected components of more than one module (Tarjan)"
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(g):
        if v not in index: visit(v)
    return out


def test_every_module_sits_in_a_layer():
    unplaced = [m for m in modules() if m != "cdkit" and layer(m) is None]
    assert not unplaced, f"modules outside the layers of this test's docstring: {unplaced}"


def test_no_import_points_up_a_layer():
    up = [f"{a} -> {b}" for a, bs in graph().items() for b in bs
          if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(up))


def test_the_import_graph_has_no_circle():
    g = graph()
    found = circles(g)
    assert not found, f"import circles: {found}"


def test_the_checks_see_a_circle_and_an_upward_import():
    g = {"cdkit.infer.a": {"cdkit.infer.b"}, "cdkit.infer.b": {"cdkit.infer.a", "cdkit.steps.x"}, "cdkit.steps.x": set()}
    assert circles(g) == [["cdkit.infer.a", "cdkit.infer.b"]]
    assert layer("cdkit.steps.x") > layer("cdkit.infer.b")


def test_the_library_knows_no_steps_or_run_folders():
    lib = [f"{a} -> {b}" for a, bs in graph().items() for b in bs
           if layer(a) is not None and layer(a) <= LAYERS["submit"] and b.split(".")[1] in ("steps", "runs")]
    assert not lib, lib


def orchestration_lines(path) -> int:
    """Lines holding code in a step module, leaving out its Params classes (`*Params`), docstrings, comments
    and blank lines: what the step itself does, which should be orchestration (read params, call the
    library, record rows, plot)"""
    import io
    import tokenize
    src = Path(path).read_text()
    left_out = set()
    for node in ast.walk(ast.parse(src, str(path))):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Params"):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            left_out.update(range(first, node.end_lineno + 1))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                left_out.update(range(doc.lineno, doc.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - left_out)


def test_the_line_count_leaves_out_params_docstrings_and_comments(tmp_path):
    p = tmp_path / "m.py"
    p.write_text('"""doc\nstring"""\nimport os  # why\n\n\nclass XParams:\n    a: int = 1\n    b: int = 2\n\n\n'
                 'def f(x):\n    "doc"\n    # a comment\n    return (x +\n            1)\n')
    assert orchestration_lines(p) == 4  # import, def, and the two lines of the return


@pytest.mark.parametrize("step", STEP_MODULES)
def test_a_step_module_only_orchestrates(step):
    "a step reads its parameters, calls the library, records rows and plots; library logic lives below it"
    n = orchestration_lines(ROOT / "steps" / f"{step}.py")
    assert n <= 200, f"cdkit/steps/{step}.py holds {n} lines of code outside its Params classes and docstrings; move library logic down"
