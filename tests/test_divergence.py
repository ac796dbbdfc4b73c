"""A diverging run is not a model: training stops at the first non-finite loss (or weights) with an error
naming where, and nothing final is saved; half-given or zero normalization is refused before any work."""
import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import quick

from cdkit.__main__ import main
from cdkit.train.callbacks import DivergedError, FiniteLoss
from cdkit.base.errors import CdkitError
from cdkit.base.params import ParamsError
from cdkit.steps import train as step


class PoisonLoss(Callback):
    "Make the training loss NaN at one batch (0-based epoch, batch), as a diverging step does"
    order = 0  # before FiniteLoss reads it

    def __init__(self, epoch, batch): self.at = (epoch, batch)

    def after_loss(self):
        if self.training and (self.epoch, self.iter) == self.at:
            self.learn.loss_grad = self.loss_grad * float("nan")
            self.learn.loss = self.learn.loss_grad.clone()


def test_a_nan_loss_stops_training_naming_epoch_batch_and_loss_and_saves_nothing_final(tiny_data, tmp_path):
    S = step.setup(quick(tiny_data, tmp_path, name="nan", epochs=2))
    n = len(S.dls.train)
    assert n >= 2
    S.learn.add_cb(PoisonLoss(1, 1))  # the second batch of the second epoch
    with pytest.raises(DivergedError, match=rf"loss nan at epoch 2 of 2, batch 2 of {n}"):
        step.fit(S)
    d = tmp_path / "run" / "models" / "nan"
    assert not (d / "model.pth").exists() and not (d / "model.json").exists()
    ckpt = torch.load(d / "checkpoints" / "last.pth", weights_only=True)  # the last good epoch, kept to look at
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if torch.is_floating_point(v))
    assert isinstance(DivergedError("x"), CdkitError)


def test_a_diverging_learning_rate_stops_before_a_model_is_saved(tiny_data, tmp_path):
    # SGD at lr=10 blows the weights and BatchNorm statistics up within the first epoch (the old loop
    # finished with a NaN validation loss, exit 0, and saved model.pth)
    with pytest.raises(DivergedError, match=r"epoch 1 of 2"):
        step.train(quick(tiny_data, tmp_path, name="lr", epochs=2, optimizer="sgd", lr=10.0))
    d = tmp_path / "run" / "models" / "lr"
    assert not (d / "model.pth").exists() and not (d / "model.json").exists()
    assert not (d / "checkpoints" / "last.pth").exists()  # no good epoch: nothing to keep


def test_the_check_syncs_once_per_window_not_per_batch():
    "Losses stay on the device until `every` batches (or the end of the pass) are checked together"
    cb = FiniteLoss(every=4)
    cb.pending = []
    calls = []
    orig = cb.check
    cb.check = lambda: (calls.append(len(cb.pending)), orig())
    for i in range(10):
        cb.pending.append((0, i, torch.tensor(1.0)))
        cb.after_batch()
    assert calls == [4, 4]  # two checks for ten batches; the last two wait for after_train
    cb.n_epoch, cb.n_iter = 1, 12
    cb.pending.append((0, 10, torch.tensor(float("inf"))))
    with pytest.raises(DivergedError, match=r"loss inf at epoch 1 of 1, batch 11 of 12"):
        orig()


def test_a_fusion_head_with_nan_features_stops_and_saves_no_head(tmp_path):
    from cdkit.infer.fusion import FitSpec, HeadSpec, ProductSet, product_groups, train_head
    n, d = 200, 8
    x = np.full((n, d), np.inf, np.float16)  # features that overflowed
    g = product_groups(np.arange(n), np.zeros(n, np.int64))
    y = np.arange(n) % 3
    spec = HeadSpec(d, 3, hidden=8)
    with pytest.raises(DivergedError, match=r"epoch 1 of 2"):
        train_head(spec, FitSpec(epochs=2, bs=32), ProductSet(x, g, y), ProductSet(x, g, y), tmp_path, "h", device="cpu")
    assert not (tmp_path / "h.pth").exists() and not (tmp_path / "checkpoints" / "h.pth").exists()


@pytest.mark.parametrize("kv", [["mean=[0.5,0.5,0.5]"], ["std=[0.2,0.2,0.2]"], ["mean=[0.5,0.5,0.5]", "std=[0,0,0]"],
                                ["mean=[0.5,0.5,0.5]", "std=[0.2,-0.1,0.2]"]])
def test_half_given_or_zero_normalization_is_refused_before_any_work(tmp_path, capsys, kv):
    assert main(["train", f"run_dir={tmp_path / 'run'}", *kv]) == 2
    err = capsys.readouterr().err
    assert "mean=" in err and "std=" in err  # both parameters named
    assert not (tmp_path / "run").exists()


@settings(max_examples=30, deadline=None)
@given(mean=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
       std=st.lists(st.one_of(st.floats(-2, 0), st.floats(0.01, 2)), min_size=3, max_size=3))
def test_normalization_is_accepted_exactly_when_every_std_is_positive(mean, std):
    from cdkit.data.loaders import NormalizationError, batch_tfms
    ok = all(s > 0 for s in std)
    try:
        step.TrainParams(mean=mean, std=std)
        accepted = True
    except (ParamsError, ValueError):
        accepted = False
    assert accepted == ok
    if ok: batch_tfms(32, mean, std)
    else:
        with pytest.raises(NormalizationError):
            batch_tfms(32, mean, std)


def test_given_normalization_is_used_not_ignored(tiny_data, tmp_path):
    S = step.setup(quick(tiny_data, tmp_path, name="norm", epochs=1, mean=[0.25, 0.5, 0.75], std=[0.5, 0.25, 0.125]))
    try:
        from fastai.vision.all import Normalize
        norm = [t for t in S.dls.after_batch.fs if isinstance(t, Normalize)][0]
        assert torch.allclose(norm.std.flatten().cpu(), torch.tensor([0.5, 0.25, 0.125]))
    finally:
        S.close()
