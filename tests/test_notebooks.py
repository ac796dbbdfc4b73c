"""Notebooks and params files agree: parameters cells hold the dataclass defaults, papermill parses
them, every params file validates against its notebook, and the pipeline refuses unknown keys."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from cdkit.params import ParamsError, load_params, notebook_parameters
from cdkit.pipeline import DEMO_STEPS, NOTEBOOK_PARAMS, notebook_for_params, params_class, step_parameters
from cdkit.paths import NOTEBOOKS, PARAMS

NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
PARAMS_FILES = sorted(PARAMS.glob("*.yaml"))


def test_every_notebook_is_known_and_in_the_demo():
    names = [p.stem for p in NOTEBOOK_FILES]
    assert names == sorted(NOTEBOOK_PARAMS) == [s[0] for s in DEMO_STEPS]


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_parameters_cell_holds_the_defaults(nb):
    cls = params_class(nb)
    defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    assert notebook_parameters(nb) == defaults


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(nb):
    "papermill's own parser must see every parameter (else it warns 'Unable to parse line')"
    import papermill
    assert set(papermill.inspect_notebook(str(nb))) == set(notebook_parameters(nb))


@pytest.mark.parametrize("nb", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebooks_carry_no_outputs(nb):
    import nbformat
    cells = nbformat.read(nb, as_version=4).cells
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c.cell_type == "code")


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: p.name)
def test_params_file_validates_against_its_notebook(path):
    nb = NOTEBOOKS / f"{notebook_for_params(path)}.ipynb"
    values = step_parameters(nb, path)
    assert values == (yaml.safe_load(path.read_text()) or {})
    load_params(params_class(nb), path)  # types


def test_unknown_key_in_a_params_file_is_refused(tmp_path):
    bad = tmp_path / "resnet_bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ParamsError, match="learning_rate"):
        step_parameters(NOTEBOOKS / "03_train_resnet.ipynb", bad)
    bad.write_text("epochs: two\n")
    with pytest.raises(ParamsError, match="epochs"):
        load_params(params_class("03_train_resnet"), bad)
