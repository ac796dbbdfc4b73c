"""Long work is never silent: bars for prediction, indexing and MD5 hashing; the pipeline's line a minute
naming the running cell; and the pipeline refuses, before anything runs, to retrain a finished model."""
import json

import numpy as np
import pytest

from cdkit.base.params import ParamsError


def test_indexing_and_hashing_draw_bars(tiny_data, capsys):
    from cdkit.data.bsonfile import BsonReader, build_index, image_table
    from cdkit.infer.md5 import hash_pictures
    index = build_index(tiny_data / "train.bson", progress=True)
    hashes = hash_pictures(BsonReader(tiny_data / "train.bson"), image_table(index), progress=True)
    err = capsys.readouterr().err
    assert "indexing train.bson: 100%" in err and "md5" in err and f"{len(hashes)}/{len(hashes)}" in err
    build_index(tiny_data / "train.bson")  # small file, not a terminal: no bar
    assert "indexing" not in capsys.readouterr().err


def test_prediction_draws_a_bar(tiny_data, tmp_path, capsys):
    import torch
    from cdkit.data.bsonfile import build_index, image_table
    from cdkit.infer.predict import StoreSpec, Views, predict_to_store
    images = image_table(build_index(tiny_data / "test.bson")).head(40)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))
    predict_to_store(model, images, tiny_data / "test.bson", tmp_path / "q.store", Views(size=32, item_size=160),
                     StoreSpec(k=3), bs=16, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "predict q.store: 100%" in err and "40/40" in err


def test_heartbeat_names_the_running_cell(tmp_path):
    from cdkit.steps.pipeline import Heartbeat, running_cell
    nb = tmp_path / "03.ipynb"
    cells = [{"cell_type": "code", "source": "P = 1", "metadata": {"papermill": {"status": "completed"}}},
             {"cell_type": "markdown", "source": "## Train", "metadata": {}},
             {"cell_type": "code", "source": "result = step.fit(S)\nresult", "metadata": {"papermill": {"status": "running"}}},
             {"cell_type": "code", "source": "x", "metadata": {"papermill": {"status": "pending"}}}]
    nb.write_text(json.dumps({"cells": cells}))
    assert running_cell(nb) == (2, 3, "result = step.fit(S)")
    assert running_cell(tmp_path / "absent.ipynb") is None
    lines = []
    import time
    with Heartbeat("[3/10] 03_train_resnet", nb, every=0.05, log=lines.append):
        time.sleep(0.3)
    assert lines and lines[0].startswith("[3/10] 03_train_resnet running for 0 min, cell 2/3: result = step.fit(S)")


def test_pipeline_refuses_to_retrain_a_finished_model_before_running_anything(tiny_data, tmp_path):
    from cdkit.steps.pipeline import run_pipeline
    model = tmp_path / "run" / "models" / "resnet"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    over = dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "work"))
    with pytest.raises(ParamsError, match=r"03_train_resnet: .*models/resnet already holds a run \(model.json\); pass "
                                          r"overwrite=true"):
        run_pipeline(tmp_path / "run", overrides=over, log=lambda *a: None, heartbeat=0)
    assert not (tmp_path / "run" / "notebooks").exists()  # nothing ran, not even step 01
    assert not (tmp_path / "work").exists()


def test_figures_of_pictures_stay_small(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cdkit.steps.report import save_figure
    fig, axes = plt.subplots(4, 4, figsize=(14, 14))
    rng = np.random.default_rng(0)
    for ax in axes.flat: ax.imshow(rng.integers(0, 255, (180, 540, 3), dtype=np.uint8))
    save_figure(fig, tmp_path, "grid", dpi=90)
    assert (tmp_path / "figures" / "grid.png").stat().st_size <= 300_000
    plt.close(fig)
