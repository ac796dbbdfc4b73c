"""Notebooks and params files agree: parameters cells hold the Params defaults, papermill parses
them, every params file validates against its notebook, and unknown keys are refused. The notebooks are
their users' (edited and saved in JupyterLab): what must agree with the code is checked, and every failure
names the fix, `make notebooks` (tools/fix_notebooks.py)."""
import json
import shutil
import uuid
from pathlib import Path

import pytest

from cdkit.base.params import ParamsError, defaults, load_params, notebook_parameters
from cdkit.base.paths import NOTEBOOKS, PARAMS
from cdkit.steps.pipeline import STEPS, notebook_for_params, params_class, step_parameters

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))  # 06b: a step inserted after 06
PARAMS_FILES = sorted(p for p in PARAMS.glob("*.yaml") if p.stem != "cdiscount")


def test_every_notebook_is_a_step():
    assert [p.stem for p in NOTEBOOK_FILES] == [s.notebook for s in STEPS]


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_parameters_cell_holds_the_defaults(nb):
    assert notebook_parameters(nb) == defaults(params_class(nb))


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(nb):
    "papermill's own parser must see every parameter (else it warns 'Unable to parse line')"
    import papermill
    assert set(papermill.inspect_notebook(str(nb))) == set(notebook_parameters(nb))


def _fixer():
    "tools/fix_notebooks.py, the command behind `make notebooks`"
    import importlib.util
    spec = importlib.util.spec_from_file_location("fix_notebooks", ROOT / "tools" / "fix_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fixer = _fixer()


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_is_in_the_shape_the_kit_needs(nb):
    """Its parameters cell is the one generated from its Params class; no outputs, execution counts or
    transient metadata; code cells call cdkit (no def/class). Each failure names the fix, `make notebooks`"""
    found = fixer.problems(nb)
    assert not found, "\n".join(found)


def test_fixing_the_committed_notebooks_changes_nothing(tmp_path):
    for nb in NOTEBOOK_FILES:
        shutil.copy(nb, tmp_path / nb.name)
    assert fixer.main(["--notebooks", str(tmp_path)]) == 0
    for nb in NOTEBOOK_FILES:
        assert (tmp_path / nb.name).read_text() == nb.read_text(), nb.name


def save_as_jupyterlab_does(path):
    """Run and save the notebook the way JupyterLab does: outputs and execution counts, notebook metadata
    (kernelspec, language_info, widgets), cell metadata (execution times, collapsed), random cell ids; plus a
    user's edits: a changed markdown cell and an extra code cell calling cdkit"""
    nb = json.loads(path.read_text())
    for i, c in enumerate(nb["cells"]):
        c["id"] = uuid.uuid4().hex[:8] + "-random"
        if c["cell_type"] == "code":
            c["execution_count"] = i + 1
            c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["some output\n"]},
                            {"output_type": "execute_result", "execution_count": i + 1, "metadata": {},
                             "data": {"text/plain": ["42"]}}]
            c["metadata"]["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00.000Z"}
            c["metadata"]["collapsed"] = False
    nb["metadata"]["kernelspec"] = {"display_name": "cdkit (.venv)", "language": "python", "name": "cdkit"}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.12.3", "mimetype": "text/x-python",
                                       "codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    md = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    md["source"] = md["source"] + ["\n", "\n", "My own note: this run used the new camera pictures."]
    nb["cells"].append({"cell_type": "code", "execution_count": 99, "id": "added-by-user", "metadata": {},
                        "outputs": [], "source": ["from cdkit.runs import RunLayout\n", "RunLayout.of(P.run_dir)"]})
    path.write_text(json.dumps(nb, indent=1))


def test_a_notebook_saved_by_jupyterlab_passes_after_the_fix(tmp_path):
    nb = tmp_path / "03_train_resnet.ipynb"
    shutil.copy(NOTEBOOKS / nb.name, nb)
    save_as_jupyterlab_does(nb)
    found = fixer.problems(nb)
    assert found and all("make notebooks" in p for p in found), found
    assert fixer.main(["--notebooks", str(tmp_path)]) == 0
    assert fixer.problems(nb) == []
    fixed = json.loads(nb.read_text())
    md = next(c for c in fixed["cells"] if c["cell_type"] == "markdown")
    assert "My own note: this run used the new camera pictures." in "".join(md["source"])  # prose kept
    assert "".join(fixed["cells"][-1]["source"]) == "from cdkit.runs import RunLayout\nRunLayout.of(P.run_dir)"
    assert len(fixed["cells"]) == len(json.loads((NOTEBOOKS / nb.name).read_text())["cells"]) + 1
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in fixed["cells"] if c["cell_type"] == "code")
    assert "widgets" not in fixed["metadata"] and fixed["metadata"]["kernelspec"]["name"] == "python3"
    assert notebook_parameters(nb) == defaults(params_class(nb))
    assert fixer.main(["--notebooks", str(tmp_path), "--check"]) == 0


def test_a_parameters_cell_that_drifted_fails_naming_the_fix_and_the_fix_repairs_it(tmp_path):
    nb = tmp_path / "07_ensemble.ipynb"
    shutil.copy(NOTEBOOKS / nb.name, nb)
    data = json.loads(nb.read_text())
    cell = next(c for c in data["cells"] if "parameters" in c["metadata"].get("tags", []))
    first = cell["source"][0]
    cell["source"][0] = first.split("=")[0] + "= 'an old default'  # a comment that drifted\n"
    nb.write_text(json.dumps(data, indent=1))
    found = fixer.problems(nb)
    assert len(found) == 1 and "parameters" in found[0] and "make notebooks" in found[0], found
    assert fixer.main(["--notebooks", str(tmp_path), "--check"]) == 1
    fixer.main(["--notebooks", str(tmp_path)])
    assert fixer.problems(nb) == []
    assert nb.read_text() == (NOTEBOOKS / nb.name).read_text()


def test_what_the_fix_cannot_do_is_named(tmp_path):
    "A definition in a code cell belongs in the package: reported, not silently removed"
    import nbformat
    path = tmp_path / "10_submit.ipynb"
    nb = nbformat.read(NOTEBOOKS / path.name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("def helper(x):\n    return x"))
    nbformat.write(nb, path)
    assert fixer.main(["--notebooks", str(tmp_path)]) == 1
    assert "def helper" in nbformat.read(path, as_version=4).cells[-1].source
    found = fixer.problems(path)
    assert len(found) == 1 and "'def helper(x):'" in found[0] and "cannot fix" in found[0], found


def test_a_new_step_gets_a_notebook_to_start_from(tmp_path):
    nb = fixer.new_notebook(STEPS[-1])
    path = tmp_path / f"{STEPS[-1].notebook}.ipynb"
    import nbformat
    nbformat.write(nb, path)
    assert fixer.problems(path) == []


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_params_file_validates_against_its_notebook(path):
    nb = NOTEBOOKS / f"{notebook_for_params(path)}.ipynb"
    shared = [PARAMS / "cdiscount.yaml"] if "run_dir" in notebook_parameters(nb) else []
    step_parameters(nb, [*shared, path])
    load_params(params_class(nb), [*shared, path])


def test_unknown_key_duplicate_key_and_garbage_are_refused(tmp_path):
    bad = tmp_path / "resnet_bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ParamsError, match="learning_rate"):
        step_parameters(NOTEBOOKS / "03_train_resnet.ipynb", bad)
    bad.write_text("epochs: two\n")
    with pytest.raises(ParamsError, match="epochs"):
        load_params(params_class("03_train_resnet"), [bad])
    bad.write_text("epochs: 2\nlr: 0.1\nepochs: 3\n")
    with pytest.raises(ParamsError, match=r"duplicate key 'epochs' \(first on line 1, again on line 3\)"):
        load_params(params_class("03_train_resnet"), [bad])
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(ParamsError, match="not a text file"):
        load_params(params_class("03_train_resnet"), [bad])
    bad.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(params_class("03_train_resnet"), [bad])


def test_layered_files_later_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("epochs: 5\nlr: 0.1\n")
    b.write_text("lr: 0.2\n")
    P = load_params(params_class("03_train_resnet"), [a, b], ["bs=8"])
    assert (P.epochs, P.lr, P.bs) == (5, 0.2, 8)
