
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdkit.pseudo import pseudolabel as ps
from cdkit.base.params import ParamsError, load_params, notebook_parameters
from cdkit.base.paths import NOTEBOOKS, PARAMS


# ---- alpha(t) ----

@pytest.mark.parametrize("t,want", [(0.0, 0.0), (0.99, 0.0), (1.0, 0.0), (1.5, 0.05), (2.0, 0.1), (3.5, 0.3 * 2.5 / 3),
                                    (3.999, 0.3 * 2.999 / 3), (4.0, 0.3), (4.001, 0.3), (100.0, 0.3)])
def test_alpha_schedule_lee(t, want):
    # T1=1, T2=4, a_f=0.3: 0 up to T1, a_f*(t-T1)/(T2-T1) between, a_f from T2 on
    assert ps.alpha_schedule(t, 1.0, 4.0, 0.3) == pytest.approx(want, abs=1e-12)


def test_alpha_schedule_arrays_iterations_and_step():
    t = np.arange(0, 1001, 50)
    a = ps.alpha_schedule(t, 200, 600, 3.0)
    assert a.shape == t.shape and (np.diff(a) >= 0).all()
    assert np.allclose(a, 3.0 * np.clip((t - 200) / 400, 0, 1))
    assert ps.alpha_schedule(1.99, 2, 2, 0.3) == 0 and ps.alpha_schedule(2, 2, 2, 0.3) == 0.3  # T1 == T2: a step
    with pytest.raises(ValueError):
        ps.alpha_schedule(1, 3, 2, 0.3)


def alpha_by_definition(t, T1, T2, a_f, form, a_min):
    "alpha(t) transcribed case by case from each form's definition (docs/STUDY.md)"
    if form == "poster":  # as printed: 0 | (t-T1)/(T2-T1) on [T1, T2] | a_f after T2
        if t < T1: return 0.0
        if t <= T2: return (t - T1) / (T2 - T1)
        return a_f
    if form == "lee":  # Lee 2013, eq. 16
        if t < T1: return 0.0
        if t < T2: return a_f * (t - T1) / (T2 - T1)
        return a_f
    # the authors' StepAlpha: alpha_min up to T1 (0.5), then epoch * alpha_f / 2 (T2 = 2) up to T2, then alpha_f
    if t <= T1: return a_min
    if t < T2: return a_f * t / T2
    return a_f


@settings(max_examples=40, deadline=None)
@given(form=st.sampled_from(["poster", "lee", "authors"]), T1=st.floats(0, 5), width=st.floats(0.01, 5),
       a_f=st.floats(0, 10), a_min=st.floats(0, 10), t=st.floats(0, 12))
def test_alpha_forms_follow_their_definitions(form, T1, width, a_f, a_min, t):
    T2 = T1 + width
    assert ps.alpha_schedule(t, T1, T2, a_f, form, a_min) == pytest.approx(
        alpha_by_definition(t, T1, T2, a_f, form, a_min), rel=1e-12, abs=1e-12)


def test_alpha_forms_differ_where_published():
    # the poster's ramp reaches 1 at T2 whatever a_f; Lee's reaches a_f; the authors' starts at alpha_min
    assert ps.alpha_schedule(1.0, 0.0, 1.0, 0.3, "poster") == 1.0 and ps.alpha_schedule(1.01, 0.0, 1.0, 0.3, "poster") == 0.3
    assert ps.alpha_schedule(1.0, 0.0, 1.0, 0.3, "lee") == 0.3 and ps.alpha_schedule(0.5, 0.0, 1.0, 0.3, "lee") == 0.15
    # StepAlpha(alpha_f=2, alpha_min=0.5) at the epochs of the authors' fine-tune
    authors = [ps.alpha_schedule(e, 0.5, 2.0, 2.0, "authors", 0.5) for e in (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)]
    assert authors == pytest.approx([0.5, 0.5, 0.75, 1.0, 1.5, 2.0, 2.0])
    with pytest.raises(ValueError, match="form"):
        ps.alpha_schedule(1.0, 0.0, 1.0, 0.3, "study")


# ---- the loss ----

def test_loss_is_labeled_ce_plus_alpha_pseudo_ce():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(7, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    part = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    loss = ps.PseudoLabelLoss(alpha=0.3)
    lab, pse = part == 0, part == 1
    want = torch.nn.functional.cross_entropy(pred[lab], y[lab]) + 0.3 * torch.nn.functional.cross_entropy(pred[pse], y[pse])
    got = loss(pred, y, part)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # the gradients too: pseudo items are scaled by alpha / n', labeled by 1 / n
    (g1,) = torch.autograd.grad(got, pred)
    (g2,) = torch.autograd.grad(want, pred)
    assert torch.allclose(g1, g2, atol=1e-7)
    # validation: (pred, y) is plain cross entropy; no pseudo items: the labeled part alone
    assert loss(pred, y).item() == pytest.approx(torch.nn.functional.cross_entropy(pred, y).item(), rel=1e-6)
    zero = torch.zeros(7, dtype=torch.long)
    assert loss(pred, y, zero).item() == pytest.approx(torch.nn.functional.cross_entropy(pred, y).item(), rel=1e-6)
    per_item = loss(pred, y, part, reduction="none")
    ce = torch.nn.functional.cross_entropy(pred, y, reduction="none")
    assert torch.allclose(per_item, torch.where(pse, 0.3 * ce, ce))


# ---- selection ----

def _conf():
    # 8 products, classes 0/1/2; prob and margin chosen so threshold, margin, fraction and cap bite differently
    return pd.DataFrame(dict(product_id=np.arange(10, 18, dtype=np.int64), pred_class=[0, 0, 0, 1, 1, 2, 2, 0],
                             prob=[0.95, 0.90, 0.40, 0.99, 0.60, 0.70, 0.70, 0.85],
                             margin=[0.9, 0.2, 0.1, 0.98, 0.3, 0.5, 0.5, 0.8], n_preds=1))


def test_select_threshold_margin_fraction_cap():
    c = _conf()
    s = ps.select_pseudo(c, threshold=0.65)
    assert set(s["product_id"]) == {10, 11, 13, 15, 16, 17}
    assert (s["prob"] >= 0.65).all() and (s["label"] == s["pred_class"]).all()
    assert list(s["prob"]) == sorted(s["prob"], reverse=True)  # most confident first
    assert list(s.loc[s["prob"] == 0.70, "product_id"]) == [15, 16]  # ties: lower id first
    s = ps.select_pseudo(c, threshold=0.65, margin=0.4)
    assert set(s["product_id"]) == {10, 13, 15, 16, 17}
    s = ps.select_pseudo(c, threshold=0.65, cap_per_category=1)  # the most confident of each class
    assert set(s["product_id"]) == {10, 13, 15}
    assert s.groupby("pred_class").size().max() == 1
    s = ps.select_pseudo(c, fraction=0.25)  # 2 of the 8 products, the most confident
    assert set(s["product_id"]) == {13, 10}
    s = ps.select_pseudo(c, fraction=0.5, rank_by="margin")  # top 4 of 8 by margin
    assert list(s["product_id"]) == [13, 10, 17, 15]
    s = ps.select_pseudo(c, fraction=0.5, rank_by="margin", cap_per_category=1)  # fraction first, then the cap
    assert list(s["product_id"]) == [13, 10, 15]


def test_pseudo_images_and_report():
    c = _conf()
    s = ps.select_pseudo(c, threshold=0.65)
    images = pd.DataFrame(dict(product_id=np.repeat(c["product_id"].to_numpy(), 2), img_idx=np.tile([0, 1], 8),
                               offset=np.repeat(np.arange(8) * 100, 2), length=50, category_id=-1))
    pi = ps.pseudo_images(s, images)
    assert len(pi) == 2 * len(s)
    assert (pi.groupby("product_id")["label"].nunique() == 1).all()
    lab = dict(zip(s["product_id"], s["label"]))
    assert all(lab[p] == l for p, l in zip(pi["product_id"], pi["label"]))
    assert {"offset", "length", "img_idx", "label", "prob", "margin"} <= set(pi.columns)
    truth = pd.Series([0, 1, 0, 1, 1, 2, 0, 0], index=c["product_id"].to_numpy())  # 11 and 16 are wrong
    table, summary = ps.selection_report(s, c, truth, n_pictures=pi)
    assert summary["chosen"].iloc[0] == 6 and summary["precision"].iloc[0] == pytest.approx(4 / 6)
    assert table.loc[0, "chosen"] == 3 and table.loc[0, "precision"] == pytest.approx(2 / 3)
    assert table.loc[2, "precision"] == pytest.approx(0.5) and table.loc[0, "pictures"] == 6
    assert table["true_products"].sum() == 8


# ---- batches ----

def test_mix_plan_ratio_and_passes():
    plan = ps.MixPlan(n_labeled_items=100, n_pseudo_items=50, bs=4, pseudo_per_labeled=3, epoch_size="pseudo", seed=0)
    assert plan.per_step == (4, 12) and plan.steps == 50 // 12 and plan.batch_size == 16
    seen_lab = []
    for _ in range(3):
        idx = np.array(plan.epoch_idxs()).reshape(plan.steps, 16)
        assert (idx[:, :4] < 100).all() and (idx[:, 4:] >= 100).all()
        assert len(np.unique(idx[:, 4:])) == plan.steps * 12  # no pseudo picture twice in an epoch
        seen_lab.append(idx[:, :4].ravel())
    lab = np.concatenate(seen_lab)
    assert len(np.unique(lab)) == len(lab)  # the labeled stream goes on across epochs, no repeats within a pass
    plan = ps.MixPlan(100, 50, bs=10, pseudo_per_labeled=0.5, epoch_size="labeled")
    assert plan.per_step == (10, 5) and plan.steps == 10
    assert ps.MixPlan(100, 0, bs=10).per_step == (10, 0)  # nothing selected: plain fine-tuning


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory):
    "A random-init model saved as training saves it (model.pth + its card): no training needed"
    from cdkit.train.models import ModelCard, create_model, save_trained
    from cdkit.data.prepare import create_prepared
    work = tmp_path_factory.mktemp("work")
    prep = create_prepared(tiny_data, work, log=lambda *_: None)
    run = tmp_path_factory.mktemp("runs") / "base"
    torch.manual_seed(0)
    model = create_model("resnet10t", prep.catalog.n_classes)
    save_trained(model, run, ModelCard(arch="resnet10t", n_classes=prep.catalog.n_classes, size=32, item_size=160,
                                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), epochs_done=1))
    return prep, run


def test_model_sees_the_asked_ratio(base_run):
    from fastai.callback.core import Callback
    from cdkit.train.models import load_trained
    prep, run = base_run
    base = load_trained(run)
    images = prep.train_images()
    labeled, valid = images[images["fold"] != 0], images[images["fold"] == 0]
    test = prep.test_images()
    conf = pd.DataFrame(dict(product_id=prep.test_index["product_id"], pred_class=0, prob=1.0, margin=1.0))
    pseudo = ps.pseudo_images(ps.select_pseudo(conf), test)

    class CountParts(Callback):
        def before_fit(self): self.seen = []
        def after_pred(self):
            if self.training: self.seen.append(((self.yb[1] == 0).sum().item(), (self.yb[1] == 1).sum().item(), len(self.xb[0])))

    dls = ps.mixed_dataloaders(labeled, pseudo, prep.train_bson, prep.test_bson, valid, prep.catalog.n_classes, bs=4,
                               pseudo_per_labeled=3, size=32, item_size=160, device="cpu")
    learn = ps.finetune_learner(base.model, dls)
    counter = CountParts()
    hist = ps.finetune(learn, epochs=1, lr=1e-4, T1=0.0, T2=0.5, alpha_final=0.3, cbs=[counter])
    assert len(counter.seen) == dls.plan.steps == len(pseudo) // 12
    assert set(counter.seen) == {(4, 12, 16)}
    assert (hist["n_labeled"] == 4).all() and (hist["n_pseudo"] == 12).all()
    # alpha as applied: the schedule at each step's fractional epoch
    assert np.allclose(hist["alpha"], ps.alpha_schedule(hist["epoch"].to_numpy(), 0.0, 0.5, 0.3))
    assert hist["alpha"].iloc[0] == 0 and hist["alpha"].iloc[-1] == pytest.approx(0.3)


# ---- parameters ----

def test_params_checked_and_files_consistent():
    from cdkit.base.params import defaults, make_params
    from cdkit.steps.pseudo import PseudoParams
    with pytest.raises(ParamsError, match="alpha_unit"):
        make_params(PseudoParams, dict(alpha_unit="epochs"))
    with pytest.raises(ParamsError, match="T1"):
        make_params(PseudoParams, dict(T1=2.0, T2=1.0))
    with pytest.raises(ParamsError, match="alpha_finale"):
        load_params(PseudoParams, overrides=dict(alpha_finale=0.3))
    nb = NOTEBOOKS / "09_pseudo_label_finetune.ipynb"
    nbp = notebook_parameters(nb)  # tests/test_notebooks.py checks the cell holds every default
    assert nbp == {k: v for k, v in defaults(PseudoParams).items() if k in nbp}
    for f in PARAMS.glob("pseudo*.yaml"):
        load_params(PseudoParams, [f])


def test_finetune_takes_the_training_steps_optimizer_and_schedule():
    "The same names, bounds and checks as TrainParams (one definition), and the same refusals"
    from cdkit.base.params import make_params
    from cdkit.steps.pseudo import PseudoParams
    from cdkit.steps.train import SCHEDULE_FIELDS, TrainParams
    for name in SCHEDULE_FIELDS:
        f, g = PseudoParams.model_fields[name], TrainParams.model_fields[name]
        assert (f.annotation, f.metadata) == (g.annotation, g.metadata), name
    for bad, match in ((dict(momentum=1.0), "momentum"), (dict(optimizer="rmsprop"), "optimizer"),
                       (dict(lr_steps=[1], lr_step_factors=[0.5]), "one_cycle=True contradicts lr_steps"),
                       (dict(one_cycle=False, epochs=4, lr_steps=[1, 3], lr_step_factors=[0.5]), "differ in length"),
                       (dict(one_cycle=False, epochs=2, lr_steps=[2], lr_step_factors=[0.5]), "1..epochs-1")):
        for cls in (TrainParams, PseudoParams):
            with pytest.raises(ParamsError, match=match):
                make_params(cls, bad)


def test_finetune_runs_sgd_on_stepped_lr_with_the_authors_alpha(base_run):
    "step 09's fine-tune with the authors' optimizer and schedule: SGD momentum 0.1, lr stepped per epoch, StepAlpha"
    from cdkit.train.models import load_trained
    from cdkit.base.params import make_params
    from cdkit.steps.pseudo import PseudoParams
    from cdkit.train.learner import opt_func
    prep, run = base_run
    P = make_params(PseudoParams, dict(optimizer="sgd", momentum=0.1, wd=1e-4, one_cycle=False, lr=0.01, epochs=3,
                                       lr_steps=[1, 2], lr_step_factors=[0.5, 0.05], alpha_form="authors",
                                       alpha_final=2.0, alpha_min=0.5, T1=0.5, T2=2.0))
    base = load_trained(run)
    images = prep.train_images()
    labeled, valid = images[images["fold"] != 0], images[images["fold"] == 0]
    conf = pd.DataFrame(dict(product_id=prep.test_index["product_id"], pred_class=0, prob=1.0, margin=1.0))
    pseudo = ps.pseudo_images(ps.select_pseudo(conf), prep.test_images())
    dls = ps.mixed_dataloaders(labeled, pseudo, prep.train_bson, prep.test_bson, valid, prep.catalog.n_classes, bs=4,
                               pseudo_per_labeled=3, size=32, item_size=160, device="cpu")
    learn = ps.finetune_learner(base.model, dls, wd=P.wd, opt_func=opt_func(P.optimizer, P.momentum))
    hist = ps.finetune(learn, P.epochs, P.lr, P.pct_start, P.T1, P.T2, P.alpha_final, P.alpha_unit,
                       alpha_form=P.alpha_form, alpha_min=P.alpha_min, one_cycle=P.one_cycle, lr_steps=P.lr_steps,
                       lr_step_factors=P.lr_step_factors)
    epoch = np.floor(hist["epoch"].to_numpy() + 1e-9)
    assert set(epoch) == {0, 1, 2}
    assert hist["lr"].to_numpy() == pytest.approx(np.select([epoch == 0, epoch == 1], [0.01, 0.005], 0.0005))
    assert hist["alpha"].to_numpy() == pytest.approx(ps.alpha_schedule(hist["epoch"].to_numpy(), 0.5, 2.0, 2.0, "authors", 0.5))
    assert hist["alpha"].iloc[0] == 0.5 and hist["alpha"].iloc[-1] == 2.0
    h = learn.opt.hypers[-1]
    assert type(learn.opt).__name__ == "Optimizer" and (h["mom"], h["wd"]) == (0.1, 1e-4)  # fastai's SGD, L2
