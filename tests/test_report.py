"""The report: durations with one decimal, a training table with its curves, rows marked stale when a
step they depend on ran after them (e.g. `cdkit demo --only 06,07,08` leaves the pseudo-label row behind)."""
import json

import numpy as np

import pytest

from cdkit.steps import report


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


def test_the_training_curves_go_beside_the_section_the_training_step_recorded(tmp_path, clock):
    "grouped by the step that recorded a section (registry.STEPS), whatever the section is called"
    report.record(tmp_path, "backbones", "resnet", {"epochs": 1}, step="train")
    report.record(tmp_path, "06 per model", "product accuracy", {"resnet": {"test": 0.5}}, step="predict")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "03_history_resnet.png").write_bytes(b"png")
    text = report.write_report(tmp_path).read_text()
    assert "![03_history_resnet](figures/03_history_resnet.png)" in text.split("## backbones")[1].split("## ")[0]
    assert "## Plots" not in text


def test_every_row_names_its_step_explicitly(tmp_path):
    with pytest.raises(TypeError, match="step"):
        report.record(tmp_path, "study", "baseline", 0.5)
    with pytest.raises(ValueError, match="not a module of registry.STEPS"):
        report.record(tmp_path, "study", "baseline", 0.5, step="notebook")
    rec = report.recorder("ensemble")
    rec(tmp_path, "07 ensemble (base)", "weights", {"resnet": 1.0})
    assert report.load_results(tmp_path)["_meta"]["07 ensemble (base)"]["weights"]["step"] == "ensemble"


def test_difference_noise_known_answers():
    "Accuracies 0.5 and 0.6 on 100 products: within noise unpaired, beyond it when the 10 gains are the only discordant pairs"
    d = report.difference_noise(0.5, 0.6, 100)
    assert d["se_a"] == pytest.approx(0.05) and d["se_b"] == pytest.approx(0.6 ** 0.5 * 0.4 ** 0.5 / 10)
    assert d["se"] == pytest.approx((0.0025 + 0.0024) ** 0.5) and d["diff"] == pytest.approx(0.1)
    assert d["within_noise"] and not d["paired"] and "unpaired bound" in d["note"]
    a = np.arange(100) < 50
    b = np.arange(100) < 60  # b is right wherever a is, and on 10 more: b01 = 0, b10 = 10
    d = report.difference_noise(0.5, 0.6, 100, correct_a=a, correct_b=b)
    assert d["paired"] and d["diff"] == pytest.approx(0.1) and d["se"] == pytest.approx(10 ** 0.5 / 100)
    assert not d["within_noise"] and "beyond 2 se; paired" in d["note"]
    swapped = (np.arange(100) >= 5) & (np.arange(100) < 55)  # 50 right too: 5 lost, 5 gained
    d = report.difference_noise(0.5, 0.5, 100, correct_a=a, correct_b=swapped)
    assert d["diff"] == 0 and d["se"] == pytest.approx(10 ** 0.5 / 100) and d["within_noise"]
    d = report.difference_noise(0.5, 0.75, 100, correct_a=a, correct_b=np.arange(100) < 75)  # 25 gained: 0.25 > 2 * 0.05
    assert d["se"] == pytest.approx(0.05) and not d["within_noise"]
    d = report.difference_noise(0.5, 0.59, 100, correct_a=a, correct_b=np.arange(100) >= 41)  # 41 lost, 50 gained
    assert d["diff"] == pytest.approx(0.09) and d["se"] == pytest.approx(91 ** 0.5 / 100) and d["within_noise"]
    with pytest.raises(ValueError, match="same products"):
        report.difference_noise(0.5, 0.5, 100, correct_a=a, correct_b=a[:50])


def test_the_study_table_carries_standard_errors_and_says_what_is_within_noise(tmp_path, clock):
    "Rows on 400 products: se = sqrt(p (1 - p) / 400); without the truth every difference gets the unpaired bound, said so"
    import pandas as pd
    (tmp_path / "products").mkdir()
    for stage in ("base", "pseudo"):
        for split in ("valid", "test"):
            pd.DataFrame({"product_id": np.arange(400), "pred_class": np.zeros(400, int)}).to_parquet(
                tmp_path / "products" / f"{stage}_{split}.parquet")
    report.record(tmp_path, "study", "baseline", {"test": 0.5, "valid": 0.5}, step="predict")
    report.record(tmp_path, "study", "+TTA", {"test": 0.52, "valid": 0.9, "views": 2}, step="predict")
    text = report.write_report(tmp_path).read_text()
    assert "| baseline | single model, one view, mean of picture probabilities | 0.5000 +- 0.0250 | 0.5000 +- 0.0250 |" in text
    assert "| 0.5200 +- 0.0250 | 0.9000 +- 0.0150 |" in text
    assert "(views: 2)" in text
    assert "- +TTA vs baseline, test: +0.0200 +- 0.0353 (within noise; unpaired bound: not both rows have per-product results)" in text
    assert "- +TTA vs baseline, validation: +0.4000 +- 0.0292 (beyond 2 se; unpaired bound" in text


def test_counts_print_as_integers_and_rates_keep_their_decimals(tmp_path, clock):
    "pandas hands a row of counts and rates over as floats: 434.0 chosen products are 434, not 434.0000"
    assert report._fmt(434.0, key="chosen") == "434" and report._fmt(0.0, key="chosen") == "0"
    assert report._fmt(1.0, key="accuracy") == "1.0000" and report._fmt(0.25) == "0.2500" and report._fmt(12.0) == "12"
    report.record(tmp_path, "09 pseudo-labels", "selection", {"chosen": 434.0, "of": 600.0, "precision": 0.8125,
                                                               "share": 1.0}, step="pseudo")
    text = report.write_report(tmp_path).read_text()
    assert "| selection | 434 | 600 | 0.8125 | 1.0000 |" in text


def test_a_fusion_record_warns_nothing(tmp_path):
    "Step 06b's record reads its table of (model, variant, seed) rows, unsorted as fuse_model builds it, without PerformanceWarning"
    import warnings
    import pandas as pd
    from cdkit.steps.fuse import FuseResult, record
    rows = {(m, v, s): {"valid": 0.5, "test": 0.6} for m in ("resnet", "inception") for v in ("aware", "invariant")
            for s in ("0", "1", "blend")}
    t = pd.DataFrame.from_dict(rows, orient="index")
    t.index = pd.MultiIndex.from_tuples(t.index, names=["model", "variant", "seed"])
    R = FuseResult(t, {"resnet": "aware", "inception": "invariant"}, {},
                   pd.DataFrame({"valid": [0.4, 0.4], "test": [0.5, 0.5]}, index=["resnet", "inception"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        record(tmp_path, R)
    res = report.load_results(tmp_path)["06b fusion"]
    row = res["inception: fusion member (invariant, 2 seeds averaged)"]
    assert (row["valid"], row["test"]) == (0.5, 0.6)


def test_a_training_record_writes_the_report(tmp_path):
    "A notebook run alone (papermill, JupyterLab) leaves report.md beside results.json, as `cdkit demo` does"
    import pandas as pd
    from cdkit.steps.train import TrainParams, TrainResult, record
    R = TrainResult(model_dir=tmp_path / "models" / "resnet", params=TrainParams(run_dir=str(tmp_path)),
                    history=pd.DataFrame(), epochs_done=2, seconds=90.0)
    record(tmp_path, R)
    assert "| resnet |" in (tmp_path / "report.md").read_text()


def test_figures_over_seeds_are_mean_and_sd_per_row_and_split():
    "bench/demo_seeds.py's table, on constructed runs with known answers"
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import demo_seeds
    studies = {0: {"baseline": {"valid": 0.5, "test": 0.4}, "+TTA": {"valid": 0.6}},
               1: {"baseline": {"valid": 0.7, "test": 0.4}, "+TTA": {"valid": None}}}
    rows = {(r, s): (m, sd, n) for r, s, m, sd, n in demo_seeds.seed_table(studies)}
    assert rows[("baseline", "valid")] == pytest.approx((0.6, 0.02 ** 0.5, 2))
    assert rows[("baseline", "test")] == (0.4, 0.0, 2) and rows[("+TTA", "valid")] == (0.6, 0.0, 1)
    assert ("+TTA", "test") not in rows
    text = demo_seeds.render(studies)
    assert "| baseline | 0.6000 +- 0.1414 | 0.4000 +- 0.0000 |" in text
    assert "| +TTA | 0.6000 +- 0.0000 (1 seeds) | n/a |" in text and "cores, torch" in text
