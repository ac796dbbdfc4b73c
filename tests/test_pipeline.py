"""The whole method on the tiny preset, as `make demo` runs it: every notebook headless with
papermill, each leaving its outputs, ending in a submission that validates."""
import json

import pandas as pd
import pytest

from cdkit.pipeline import NotebookFailed, run_pipeline
from cdkit.submission import validate_submission

# small and fast: one epoch of a small backbone in each training notebook (each notebook's own
# backbone is run by tests/test_train.py), two TTA views
TINY = dict(epochs=1, n_tta=1, max_train_images=400, num_workers=0, bs=16, arch="resnet10t", size=32)


@pytest.fixture(scope="module")
def pipeline_run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    work = tmp_path_factory.mktemp("work")
    timings = run_pipeline("tiny", overrides=dict(TINY, data_dir=str(tiny_data), work_dir=str(work)),
                           runs_dir=runs, log=lambda *a: None)
    return runs / "tiny", timings, tiny_data


def test_every_notebook_ran_and_left_its_outputs(pipeline_run):
    run, timings, _ = pipeline_run
    assert len(timings) == 10
    for nb in timings:
        assert (run / f"{nb}.ipynb").exists()
    for model in ("resnet", "inception", "xception", "pseudo"):
        assert (run / model / "model.pth").exists() and (run / model / "model.json").exists()
    for model in ("resnet", "inception", "xception"):
        assert (run / model / "metrics.csv").exists() and list((run / model / "checkpoints").iterdir())
        for which in ("valid", "test"):
            assert (run / "preds" / f"{model}_{which}.store" / "manifest.json").exists()
    for f in ("products_valid.parquet", "products_test.parquet", "products_test_pseudo.parquet"):
        assert len(pd.read_parquet(run / f)) > 0


def test_submission_validates(pipeline_run):
    run, _, data = pipeline_run
    cats = pd.read_csv(data / "category_names.csv")["category_id"]
    sub = validate_submission(run / "submission.csv.gz", data / "sample_submission.csv", cats)
    assert len(sub) == len(pd.read_csv(data / "sample_submission.csv"))


def test_report_holds_the_study_table(pipeline_run):
    run, _, _ = pipeline_run
    results = json.loads((run / "results.json").read_text())
    study = results["study"]
    for row in ("baseline", "+TTA", "ensemble (+TTA)", "ensemble + belief aggregation", "+MD5 lookup", "+pseudo-labels"):
        assert 0 <= study[row]["test"] <= 1, row
    report = (run / "report.md").read_text()
    assert "| baseline |" in report and "figures/" in report


def test_a_failing_notebook_is_named_with_its_cell_and_copy(tiny_data, tmp_path):
    with pytest.raises(NotebookFailed, match=r"07_ensemble.ipynb failed in cell \d+ .*open the executed copy .*07_ensemble.ipynb"):
        run_pipeline("broken", only=["07"], overrides=dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "w")),
                     runs_dir=tmp_path, log=lambda *a: None)
