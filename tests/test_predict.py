"""cdkit.infer.predict: the streaming TTA predictor against fastai's get_preds, under seeds and shards."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdkit.data.bsonfile import build_index, image_table
from cdkit.data.loaders import make_dataloaders
from cdkit.infer.predict import Shard, StoreSpec, ViewMaker, Views, predict_to_store, view_params, view_theta
from cdkit.infer.store import load_store, merge_stores

SIZE, ITEM = 32, 48


def tiny_cnn(n_classes):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(64, n_classes))


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    "A Learner with cdkit loaders on the tiny synthetic train set, and the test pictures to predict"
    from fastai.learner import Learner
    from cdkit.data.prepare import create_prepared
    prep = create_prepared(tiny_data, tmp_path_factory.mktemp("work"), log=lambda *a: None)
    n = prep.catalog.n_classes
    dls = make_dataloaders(prep.train_images(), prep.train_bson, n, size=SIZE, item_size=ITEM, bs=16, device="cpu")
    learn = Learner(dls, tiny_cnn(n))
    test = image_table(build_index(prep.test_bson))
    return learn, test, prep.test_bson, tmp_path_factory.mktemp("stores")


def test_exact_original_view_equals_get_preds(setup):
    learn, test, bson_path, out = setup
    path = predict_to_store(learn, test, bson_path, out / "exact", Views(1), exact=True, bs=16, device="cpu")
    st = load_store(path)
    assert np.array_equal(st.product_id, test["product_id"]) and np.array_equal(st.img_idx, test["img_idx"])
    preds, _ = learn.get_preds(dl=learn.dls.test_dl(test, bson_path=bson_path, bs=16))
    assert st.dense(view=0).shape == tuple(preds.shape)
    np.testing.assert_allclose(st.dense(view=0), preds.numpy(), atol=1e-5)
    assert st.meta["bad_pictures"] == 0 and st.meta["size"] == SIZE and st.meta["item_size"] == ITEM


def test_tta_views_are_seeded_and_differ_from_the_original(setup):
    learn, test, bson_path, out = setup
    run = lambda name, seed: load_store(predict_to_store(learn, test, bson_path, out / name, Views(3, seed=seed),
                                                         exact=True, bs=16, device="cpu"))
    a, b, c = run("tta_a", 0), run("tta_b", 0), run("tta_c", 1)
    assert a.n_views == 3
    for v in range(3):
        np.testing.assert_array_equal(a.dense(view=v), b.dense(view=v))  # same seed: same views
    np.testing.assert_allclose(a.dense(view=0), c.dense(view=0), atol=1e-6)  # the original ignores the seed
    for v in (1, 2):
        assert np.abs(a.dense(view=v) - a.dense(view=0)).max() > 1e-3
        assert np.abs(a.dense(view=v) - c.dense(view=v)).max() > 1e-3
    assert np.abs(a.dense(view=1) - a.dense(view=2)).max() > 1e-3


def test_shards_merged_equal_the_unsharded_run(setup):
    learn, test, bson_path, out = setup
    kw = dict(views=Views(2, seed=5), store=StoreSpec(k=6, prob_dtype="float32"), device="cpu")
    whole = load_store(predict_to_store(learn, test, bson_path, out / "whole", bs=16, **kw))
    shards = [predict_to_store(learn, test, bson_path, out / f"part{i}", part=Shard(i, 3), bs=7, **kw)
              for i in range(3)]  # other batch boundaries too: views must not depend on them
    merged = load_store(merge_stores(shards, out / "merged"))
    np.testing.assert_array_equal(merged.product_id, whole.product_id)
    np.testing.assert_array_equal(merged.img_idx, whole.img_idx)
    for v in range(2):
        np.testing.assert_allclose(merged.dense(view=v), whole.dense(view=v), atol=1e-6)


def test_theta_crops_and_flips_exactly():
    x = torch.arange(2 * 3 * 180 * 180, dtype=torch.float32).view(2, 3, 180, 180) % 251
    p = dict(flip=np.array([False, True]), angle=np.zeros(2), zoom=np.ones(2), cx=np.full(2, .5), cy=np.full(2, .5),
             top=np.array([10, 0]), left=np.array([20, 5]))
    theta = view_theta(p, item_size=160)
    y = F.grid_sample(x, F.affine_grid(theta, [2, 3, 160, 160], align_corners=True), align_corners=True)
    torch.testing.assert_close(y[0], x[0, :, 10:170, 20:180], atol=0.02, rtol=0)  # float32 grid rounding on 0..250 steps
    torch.testing.assert_close(y[1], x[1, :, 0:160, 5:165].flip(-1), atol=0.02, rtol=0)  # float32 grid rounding on 0..250 steps


def test_view_params_depend_on_the_picture_not_the_batch():
    pid, img = np.array([5, 5, 9, 12]), np.array([0, 1, 0, 3])
    whole = view_params(0, 1, pid, img, item_size=160)
    part = view_params(0, 1, pid[2:], img[2:], item_size=160)
    for key in whole:
        np.testing.assert_array_equal(whole[key][2:], part[key])
    other = view_params(0, 2, pid, img, item_size=160)
    assert not np.array_equal(whole["angle"], other["angle"])
    assert (whole["top"] >= 0).all() and (whole["top"] <= 20).all()
    assert (np.abs(whole["angle"]) <= 10).all() and ((whole["zoom"] >= 1) & (whole["zoom"] <= 1.1)).all()


def test_view_maker_shapes():
    vm = ViewMaker(SIZE, ITEM, seed=0)
    from fastai.torch_core import TensorImage
    x = TensorImage(torch.randint(0, 255, (4, 3, 180, 180), dtype=torch.uint8))
    for v in range(3):
        y = vm(x, v, np.arange(4), np.zeros(4))
        assert y.shape == (4, 3, SIZE, SIZE) and y.dtype == torch.float32 and type(y) is torch.Tensor


def test_corrupt_picture_is_predicted_and_counted(tmp_path):
    from test_data import labelled_table, write_bson
    (tmp_path / "raw").mkdir()  # the raw data folder: stores go elsewhere
    path = write_bson(tmp_path / "raw" / "train.bson")
    t = labelled_table(path)
    st = load_store(predict_to_store(tiny_cnn(4), t, path, tmp_path / "store", Views(2, size=SIZE, item_size=ITEM),
                                     StoreSpec(k=4), bs=8, device="cpu"))
    assert len(st) == len(t) and st.meta["bad_pictures"] == 1 and st.n_classes == 4


def test_step06_shards_are_stored_apart_and_merged_by_the_last(tiny_data, tmp_path):
    "Two machines' shards go to their own stores, the last merges them: the same as predicting unsharded"
    from cdkit.train.models import ModelCard, create_model, save_trained
    from cdkit.base.params import make_params
    from cdkit.data.prepare import create_prepared
    from cdkit.runs import RunLayout
    from cdkit.steps import predict as step
    prep = create_prepared(tiny_data, tmp_path / "work", log=lambda *a: None)
    torch.manual_seed(0)
    n = prep.catalog.n_classes
    save_trained(create_model("resnet10t", n), tmp_path / "run" / "models" / "m",
                 ModelCard(arch="resnet10t", n_classes=n, size=32, item_size=160, mean=(0.5,) * 3, std=(0.25,) * 3))
    base = dict(run_dir=str(tmp_path / "run"), data_dir=str(tiny_data), work_dir=str(tmp_path / "work"), models=["m"],
                n_tta=1, num_workers=0, bs=32, device="cpu")
    layout = RunLayout(tmp_path / "run")
    r0 = step.run(make_params(step.PredictParams, dict(base, shard=0, num_shards=2)), prep, log=lambda *a: None, save=False)
    assert not r0.complete and not layout.store("m", "test").exists()
    assert layout.store("m", "test", 0, 2).exists() and not layout.store("m", "test", 1, 2).exists()
    r1 = step.run(make_params(step.PredictParams, dict(base, shard=1, num_shards=2)), prep, log=lambda *a: None, save=False)
    assert r1.complete and layout.store("m", "test", 1, 2).exists()
    merged = {s: load_store(layout.store("m", s)) for s in ("valid", "test")}
    # again: every store is current, nothing is predicted
    again = step.run(make_params(step.PredictParams, dict(base, shard=1, num_shards=2)), prep, log=lambda *a: None, save=False)
    assert again.written == []
    import shutil
    shutil.copytree(tmp_path / "run" / "models", tmp_path / "run1" / "models")
    whole = step.run(make_params(step.PredictParams, dict(base, run_dir=str(tmp_path / "run1"))), prep, log=lambda *a: None,
                     save=False)
    for s in ("valid", "test"):
        w = load_store(whole.stores[("m", s)])
        order_m, order_w = np.argsort(merged[s].keys()), np.argsort(w.keys())
        assert np.array_equal(merged[s].keys()[order_m], w.keys()[order_w])
        assert np.array_equal(merged[s].cls[order_m], w.cls[order_w])


def test_step06_result_is_named_fields_and_its_table_is_built_from_them():
    "The accuracies are ViewAccuracy fields per (model, split); the display table keeps its columns"
    from cdkit.steps.predict import PredictResult, ViewAccuracy
    acc = {("a", "valid"): ViewAccuracy(0.5, 0.6, 2), ("a", "test"): ViewAccuracy(0.4, 0.45, 2),
           ("b", "valid"): ViewAccuracy(0.3, 0.35, 2)}
    R = PredictResult({}, acc, ["a", "b"], complete=False)
    assert R.baseline("test") == ViewAccuracy(0.4, 0.45, 2)
    t = R.table
    assert list(t.index) == ["a", "b"]
    assert list(t.columns) == ["valid 1 view", "valid all views", "views", "test 1 view", "test all views"]
    assert t.loc["a", "test all views"] == 0.45 and np.isnan(t.loc["b", "test 1 view"])
