"""Notebooks and params files agree: parameters cells hold the Params defaults, papermill parses
them, every params file validates against its notebook, and unknown keys are refused."""
from pathlib import Path

import pytest

from cdkit.base.params import ParamsError, defaults, load_params, notebook_parameters
from cdkit.base.paths import NOTEBOOKS, PARAMS
from cdkit.steps.pipeline import STEPS, notebook_for_params, params_class, step_parameters

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


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebooks_carry_no_outputs_and_no_definitions(nb):
    import nbformat
    cells = nbformat.read(nb, as_version=4).cells
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c.cell_type == "code")
    for c in cells:
        if c.cell_type == "code":
            assert not any(line.lstrip().startswith(("def ", "class ")) for line in c.source.splitlines()), c.source


def test_notebooks_are_generated_from_the_params_classes():
    "tools/make_notebooks.py writes exactly what is committed"
    import importlib.util
    import nbformat
    spec = importlib.util.spec_from_file_location("mk", Path(__file__).resolve().parents[1] / "tools" / "make_notebooks.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    for s in STEPS:
        assert mk.build(s) == nbformat.read(s.path, as_version=4), s.notebook


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
