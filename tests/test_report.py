"""The report: durations with one decimal, a training table with its curves, rows marked stale when a
step they depend on ran after them (e.g. `cdkit demo --only 06,07,08` leaves the pseudo-label row behind)."""
import json

import pytest

from cdkit import report


@pytest.fixture
def clock(monkeypatch):
    "report.record's clock, advanced by hand"
    now = [1000.0]
    monkeypatch.setattr(report.time, "time", lambda: now[0])
    return now


def test_rows_carry_time_and_step(tmp_path, clock):
    report.record(tmp_path, "06 per model", "product accuracy", {"resnet": {"test": 0.5}}, step="predict")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["06 per model"]["product accuracy"] == {"resnet": {"test": 0.5}}  # the values' layout is unchanged
    assert res["_meta"]["06 per model"]["product accuracy"] == {"time": 1000.0, "step": "predict"}


def test_a_row_older_than_a_step_it_depends_on_is_marked_stale(tmp_path, clock):
    for i, (step, section, name) in enumerate([
            ("train", "03-05 training", "resnet"), ("predict", "study", "baseline"),
            ("pseudo", "study", "+pseudo-labels"), ("pseudo", "time per notebook (s)", "09_pseudo_label_finetune"),
            ("submit", "10 submission", "stage submitted")]):
        clock[0] = 1000.0 + i
        report.record(tmp_path, section, name, {"minutes": 1.25, "epochs": 2} if step == "train" else
                      ({"test": 0.7, "valid": 0.6} if section == "study" else 12.5), step=step)
    assert report.stale_rows(report.load_results(tmp_path)) == {}
    clock[0] = 2000.0  # `cdkit demo --only 06,07,08`: step 06 again, 09 and 10 not
    report.record(tmp_path, "study", "baseline", {"test": 0.71, "valid": 0.61}, step="predict")
    stale = report.stale_rows(report.load_results(tmp_path))
    assert set(stale) == {("study", "+pseudo-labels"), ("time per notebook (s)", "09_pseudo_label_finetune"),
                          ("10 submission", "stage submitted")}
    assert "predict ran after it" in stale[("study", "+pseudo-labels")]
    text = report.write_report(tmp_path).read_text()
    assert "**3 row(s) are stale**" in text
    assert "| +pseudo-labels (**stale: predict ran after it**) |" in text
    assert "| baseline |" in text  # fresh rows are not marked
    assert "- 09_pseudo_label_finetune (**stale: predict ran after it**): 12.5" in text


def test_explore_and_sibling_training_steps_make_nothing_stale(tmp_path, clock):
    report.record(tmp_path, "03-05 training", "resnet", {"epochs": 1}, step="train")
    clock[0] += 1
    report.record(tmp_path, "03-05 training", "xception", {"epochs": 1}, step="train")  # 05 after 03
    report.record(tmp_path, "time per notebook (s)", "01_explore_data", 3.0, step="explore")
    assert report.stale_rows(report.load_results(tmp_path)) == {}


def test_durations_print_with_one_decimal_and_training_is_a_table(tmp_path, clock):
    report.record(tmp_path, "time per notebook (s)", "01_explore_data", 46.5, step="explore")
    report.record(tmp_path, "03-05 training", "resnet", {"arch": "resnet18", "epochs": 3, "minutes": 1.63,
                                                         "product_accuracy": 0.71234}, step="train")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "03_history_resnet.png").write_bytes(b"png")
    text = report.write_report(tmp_path).read_text()
    assert "- 01_explore_data: 46.5\n" in text and "46.5000" not in text
    assert "| | arch | epochs | minutes | product_accuracy |" in text
    assert "| resnet | resnet18 | 3 | 1.6 | 0.7123 |" in text
    training = text.split("## 03-05 training")[1].split("## ")[0]
    assert "![03_history_resnet](figures/03_history_resnet.png)" in training  # the curves beside the table
