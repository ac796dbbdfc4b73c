"""The kit's learner takes fastai's usual calls (show_batch, lr_find, show_results, tta, predict,
interpretation), training is setup -> lr_find -> fit, a model folder is never silently reused, loggers
come by name, and a mid-epoch checkpoint resumes exactly."""
import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cdkit.base.params import ParamsError  # noqa: E402
from cdkit.steps import train as step  # noqa: E402
from conftest import quick  # noqa: E402


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    "setup -> show_batch -> lr_find -> fit, as notebook 03 runs them, with lr='find'"
    tmp = tmp_path_factory.mktemp("habits")
    S = step.setup(quick(tiny_data, tmp, lr="find", lr_find_iters=6, name="habits"))
    shown = S.dls.show_batch(max_n=4, show=False)  # an augmented training batch, decoded for display
    suggestion = step.find_lr(S)
    result = step.fit(S)
    return S, result, shown, suggestion


def test_setup_then_lr_find_then_fit_uses_the_suggestion(trained):
    S, result, shown, suggestion = trained
    x, y, samples = shown
    assert len(samples) == 4 and all(str(s[1]).isdigit() for s in samples)  # labels shown as category ids
    assert (S.model_dir / "lr_find.png").exists() and suggestion > 0
    assert result.params.lr == pytest.approx(suggestion) and result.lr_suggestion == suggestion
    import yaml
    assert yaml.safe_load((S.model_dir / "params.yaml").read_text())["lr"] == pytest.approx(suggestion)
    assert S.lock is None  # the model folder is released once fit returns


def test_show_batch_and_show_results(trained):
    import matplotlib.pyplot as plt
    _, result, _, _ = trained
    result.learn.dls.show_batch(max_n=4)
    result.learn.show_results(max_n=4)
    assert plt.get_fignums()
    plt.close("all")


def test_tta(trained):
    _, result, _, _ = trained
    preds, targs = result.learn.tta(n=2)
    assert preds.shape == (len(result.valid_images), result.prep.catalog.n_classes)
    assert torch.allclose(preds.sum(1), torch.ones(len(preds)), atol=1e-3)


def test_predict_one_picture(trained):
    _, result, _, _ = trained
    learn, prep = result.learn, result.prep
    row = result.valid_images.iloc[0]
    jpeg = learn.dls.valid.dataset.jpeg(0)
    for x in (jpeg, learn.dls.valid.dataset.decode_row(0)):  # JPEG bytes or an (H, W, 3) array
        category, idx, probs = learn.predict(x)
        assert int(str(category)) == int(prep.catalog.category_ids[int(idx)])
        assert probs.shape == (prep.catalog.n_classes,) and int(probs.argmax()) == int(idx)
    assert int(row["product_id"]) > 0


def test_classification_interpretation(trained):
    import matplotlib.pyplot as plt
    from fastai.interpret import ClassificationInterpretation
    _, result, _, _ = trained
    interp = ClassificationInterpretation.from_learner(result.learn)
    assert len(interp.vocab) == result.prep.catalog.n_classes
    assert isinstance(interp.most_confused(), list)
    interp.plot_top_losses(3)
    plt.close("all")


def test_summary_and_export_still_work(trained, tmp_path):
    _, result, _, _ = trained
    assert "Total params" in result.learn.summary()
    result.learn.export(tmp_path / "export.pkl")
    assert (tmp_path / "export.pkl").stat().st_size > 0


def test_a_model_folder_is_never_silently_reused(trained, tiny_data):
    S, result, _, _ = trained
    P = quick(tiny_data, S.model_dir.parents[2], name="habits", lr=0.01)
    before = (S.model_dir / "model.pth").read_bytes()
    with pytest.raises(ParamsError, match=r"already holds a run .*overwrite=True.*resume=True"):
        step.setup(P)
    assert (S.model_dir / "model.pth").read_bytes() == before  # untouched
    with pytest.raises(ParamsError, match="resume=True contradicts overwrite=True"):
        P.replace(resume=True, overwrite=True)


def test_overwrite_replaces_the_run(tiny_data, tmp_path):
    first = step.run(quick(tiny_data, tmp_path, name="again", epochs=1))
    (first.model_dir / "lr_find.png").write_bytes(b"stale")
    again = step.run(quick(tiny_data, tmp_path, name="again", epochs=1, overwrite=True, max_train_images=32))
    assert not (again.model_dir / "lr_find.png").exists()  # nothing of the old run outlives it
    assert len(pd.read_csv(again.model_dir / "metrics.csv")) == 1


def test_loggers_by_name(tiny_data, tmp_path):
    import importlib.util
    res = step.run(quick(tiny_data, tmp_path, name="logged", callbacks=["csv"]))
    assert len(pd.read_csv(res.model_dir / "history.csv")) == 1
    for name in ("tensorboard", "wandb"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ParamsError, match=f"'{name}' needs the package '{name}' \\(pip install {name}\\)"):
                step.setup(quick(tiny_data, tmp_path, name=f"with-{name}", callbacks=[name]))
    from cdkit.base.params import make_params
    with pytest.raises(ParamsError, match="callbacks"):
        make_params(step.TrainParams, dict(callbacks=["mlflow"]))


def test_mid_epoch_checkpoint_resumes_exactly(tiny_data, tmp_path):
    from fastai.callback.core import Callback, CancelFitException

    class StopAtStep(Callback):
        "An interruption after `n` optimizer steps (the notebook ends mid-epoch)"
        order = 90

        def __init__(self, n): self.n, self.seen = n, 0

        def after_batch(self):
            if not self.training: return
            self.seen += 1
            if self.seen == self.n: raise CancelFitException()

    kw = dict(epochs=2, max_train_images=160, checkpoint_every=3)  # about 9 batches an epoch
    full = step.run(quick(tiny_data, tmp_path, name="whole", **kw))
    S = step.setup(quick(tiny_data, tmp_path, name="cut", **kw))
    n = len(S.dls.train)
    S.learn.add_cb(StopAtStep(n + 5))  # ends inside epoch 2, after a mid-epoch checkpoint
    step.fit(S)
    saved = torch.load(tmp_path / "run" / "models" / "cut" / "checkpoints" / "last.pth", weights_only=False)
    assert saved["epoch"] == 1 and 0 < saved["mid_epoch"]["batches"] <= 5
    resumed = step.run(quick(tiny_data, tmp_path, name="cut", resume=True, **kw))
    a = torch.load(full.model_dir / "model.pth")
    b = torch.load(resumed.model_dir / "model.pth")
    for k in a:  # CPU, one process, no loader workers: the same batches, augmentations and dropout
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    cols = ["train_loss", "valid_loss", "accuracy", "product_accuracy", "lr"]
    pd.testing.assert_frame_equal(full.history[cols], resumed.history[cols], atol=1e-5)
