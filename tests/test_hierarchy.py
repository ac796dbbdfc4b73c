"""Category hierarchy heads: the weighted loss against its manual sum (value and gradients), no effect
with weights (1, 0, 0), the level maps through save/reload, combining levels at prediction, and a
short training run with hierarchy_weights."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat

from cdkit.train.hierarchy import HierarchyLoss, LevelHeads, add_level_heads, combine_levels, level_heads
from cdkit.train.models import ModelCard, create_model, load_trained, save_trained
from cdkit.base.params import ParamsError, make_params
from cdkit.steps.train import TrainParams, train
from conftest import quick

# 6 categories under 3 level-2 and 2 level-1 parents
LEVEL1 = torch.tensor([0, 0, 0, 1, 1, 1])
LEVEL2 = torch.tensor([0, 0, 1, 2, 2, 2])


def _heads(nf=8, n=6, seed=0):
    torch.manual_seed(seed)
    return LevelHeads(torch.nn.Linear(nf, n), LEVEL1, LEVEL2)


def _batch(nf=8, bs=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bs, nf, generator=g), torch.randint(0, 6, (bs,), generator=g)


def _grads(heads):
    return {k: (None if p.grad is None else p.grad.clone()) for k, p in heads.named_parameters()}


def test_loss_is_the_weighted_sum_of_the_three_cross_entropies():
    x, y = _batch()
    base = LabelSmoothingCrossEntropyFlat(eps=0.1)
    heads = _heads()
    loss = HierarchyLoss(base, heads, (0.8, 0.1, 0.1))(heads(x), y)
    loss.backward()
    got = _grads(heads)

    manual_heads = _heads()  # same seed: same weights
    logits = manual_heads(x)
    l1, l2 = manual_heads.aux
    manual = 0.8 * base(logits, y) + 0.1 * F.cross_entropy(l2, LEVEL2[y]) + 0.1 * F.cross_entropy(l1, LEVEL1[y])
    manual.backward()
    assert torch.allclose(loss, manual, atol=1e-6)
    for k, g in _grads(manual_heads).items():
        assert torch.allclose(got[k], g, atol=1e-6), k
    assert got["level1.weight"].abs().sum() > 0 and got["level2.weight"].abs().sum() > 0


def test_category_weight_alone_is_the_base_loss_and_leaves_the_level_heads_alone():
    x, y = _batch()
    base = CrossEntropyLossFlat()
    heads = _heads()
    logits = heads(x)
    loss = HierarchyLoss(base, heads, (1, 0, 0))(logits, y)
    assert torch.equal(loss, base(logits, y))
    loss.backward()
    for name in ("level1", "level2"):
        grad = getattr(heads, name).weight.grad
        assert grad is None or not grad.any(), name
    assert heads.category.weight.grad.abs().sum() > 0
    # unreduced (fastai's get_preds with_loss): one loss per item
    lossf = HierarchyLoss(base, heads, (0.8, 0.1, 0.1))
    lossf.reduction = "none"
    assert lossf(heads(x), y).shape == (len(y),) and base.reduction == "none"


def test_loss_keeps_the_base_loss_activation_and_decodes():
    base = LabelSmoothingCrossEntropyFlat(eps=0.1)
    lossf = HierarchyLoss(base, _heads())
    x = torch.randn(3, 6)
    assert torch.equal(lossf.activation(x), base.activation(x))
    assert torch.equal(lossf.decodes(x), base.decodes(x))
    with pytest.raises(ValueError, match="three values"):
        HierarchyLoss(base, _heads(), (0, 0.5, 0.5))


def test_combine_levels_reweighs_categories_by_their_parents():
    # category 0 leads on its own logits, but its parents are unlikely; category 3's are likely
    cat = torch.tensor([[2.0, 0.0, 0.0, 1.5, 0.0, 0.0]])
    l1 = torch.tensor([[-2.0, 2.0]])          # level-1 parent 1 (of categories 3-5) likely
    l2 = torch.tensor([[-2.0, -2.0, 2.0]])    # level-2 parent 2 (of categories 3-5) likely
    out = combine_levels(cat, l1, l2, LEVEL1, LEVEL2, weight=0.5)
    expected = (F.log_softmax(cat, -1) + 0.5 * (F.log_softmax(l1, -1)[:, LEVEL1] + F.log_softmax(l2, -1)[:, LEVEL2]))
    assert torch.allclose(out, expected)
    assert cat.argmax().item() == 0 and out.argmax().item() == 3
    p = torch.softmax(out, -1)  # p3 * (p1 * p2) ** w, renormalized
    raw = torch.softmax(cat, -1) * (torch.softmax(l1, -1)[:, LEVEL1] * torch.softmax(l2, -1)[:, LEVEL2]) ** 0.5
    assert torch.allclose(p, raw / raw.sum(), atol=1e-6)
    # weight 0 inside the heads: the category logits themselves
    heads = _heads()
    x, _ = _batch()
    assert torch.equal(heads(x), heads.category(x))
    heads.combine = 0.5
    assert torch.allclose(heads(x), combine_levels(heads.category(x), *heads.aux, LEVEL1, LEVEL2, 0.5))


def test_level_maps_survive_save_and_reload(tmp_path):
    torch.manual_seed(0)
    plain = create_model("resnet10t", 6).eval()
    model = create_model("resnet10t", 6, levels=(LEVEL1, LEVEL2, 2, 3)).eval()
    assert level_heads(plain) is None and level_heads(model).n_level2 == 3
    with pytest.raises(ValueError, match="already"):
        add_level_heads(model, LEVEL1, LEVEL2)
    card = ModelCard(arch="resnet10t", n_classes=6, size=32, item_size=160, mean=(0.5,) * 3, std=(0.25,) * 3,
                     hierarchy_weights=[0.8, 0.1, 0.1], n_level1=2, n_level2=3)
    save_trained(model, tmp_path / "m", card)
    x = torch.randn(2, 3, 32, 32)
    back = load_trained(tmp_path / "m")
    heads = level_heads(back.model)
    assert torch.equal(heads.level1_of, LEVEL1) and torch.equal(heads.level2_of, LEVEL2)
    assert back.card.hierarchy_weights == [0.8, 0.1, 0.1] and back.combine_levels == 0.0
    with torch.no_grad():
        out = back.model(x)
        assert out.shape == (2, 6) and torch.equal(out, model(x))  # combine 0: the category logits
        combined = load_trained(tmp_path / "m", combine_levels=0.5).model(x)
        expected = combine_levels(out, *heads.aux, LEVEL1, LEVEL2, 0.5)
    assert torch.allclose(combined, expected, atol=1e-5)
    # a model without heads, and an old model.json without the new fields
    save_trained(plain, tmp_path / "plain", ModelCard(arch="resnet10t", n_classes=6, size=32, item_size=160,
                                                      mean=(0.5,) * 3, std=(0.25,) * 3))
    import json
    meta = json.loads((tmp_path / "plain" / "model.json").read_text())
    for k in ("hierarchy_weights", "n_level1", "n_level2"): del meta[k]
    (tmp_path / "plain" / "model.json").write_text(json.dumps(meta))
    assert level_heads(load_trained(tmp_path / "plain").model) is None
    with pytest.raises(ValueError, match=r"combine_levels=0.5.*plain.*no level heads"):
        load_trained(tmp_path / "plain", combine_levels=0.5)


def test_training_with_hierarchy_weights(tiny_data, tmp_path):
    res = train(quick(tiny_data, tmp_path, name="levels", hierarchy_weights=[0.8, 0.1, 0.1], stop_after=1, epochs=2))
    h = pd.read_csv(res.model_dir / "metrics.csv")
    assert {"accuracy_level2", "accuracy_level1"} <= set(h.columns)
    last = h.iloc[-1]
    assert 0 <= last["accuracy"] <= last["accuracy_level2"] <= 1 and last["accuracy"] <= last["accuracy_level1"] <= 1
    assert isinstance(res.learn.loss_func, HierarchyLoss)
    heads = level_heads(res.learn.model)
    in_opt = {id(p) for p, *_ in res.learn.opt.all_params()}
    assert {id(heads.level1.weight), id(heads.level2.weight)} <= in_opt  # the optimizer trains the level heads
    assert heads.level1.weight.grad is not None
    cat = res.prep.catalog
    trained = load_trained(res.model_dir)
    assert (trained.card.n_level1, trained.card.n_level2) == (cat.n_level(1), cat.n_level(2))
    assert torch.equal(level_heads(trained.model).level1_of, torch.as_tensor(cat.level1))
    probs, _ = res.learn.get_preds(dl=res.learn.dls.valid)  # fastai's own calls see the categories
    assert probs.shape == (len(res.valid_images), cat.n_classes)
    # another hierarchy_weights would change the model: resume refused before anything is written
    saved = (res.model_dir / "params.yaml").read_text()
    with pytest.raises(ParamsError, match=r"hierarchy_weights: \[0.8, 0.1, 0.1\] -> None"):
        train(quick(tiny_data, tmp_path, name="levels", epochs=2, resume=True))
    assert (res.model_dir / "params.yaml").read_text() == saved
    assert train(quick(tiny_data, tmp_path, name="levels", hierarchy_weights=[0.8, 0.1, 0.1], epochs=2,
                       resume=True)).epochs_done == 2


@pytest.mark.parametrize("weights", [[0.8, 0.2], [0.0, 0.5, 0.5], [0.8, -0.1, 0.3]])
def test_invalid_hierarchy_weights_are_refused_before_any_work(weights, tmp_path):
    with pytest.raises(ParamsError, match="hierarchy_weights"):
        make_params(TrainParams, dict(hierarchy_weights=weights, run_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_combine_levels_without_level_heads_is_refused_naming_both(tmp_path):
    "Step 06: combine_levels > 0 when no model of the run has level heads contradicts the models"
    import json
    from cdkit.base.params import ParamsError
    from cdkit.steps.predict import PredictParams, check_combine
    from cdkit.runs import RunLayout
    layout = RunLayout(tmp_path)
    for m in ("a", "b"):
        layout.model_dir(m).mkdir(parents=True)
        (layout.model_dir(m) / "model.json").write_text(json.dumps(dict(
            arch="resnet10t", n_classes=4, size=32, item_size=160, mean=[0.5] * 3, std=[0.2] * 3)))
    P = PredictParams(run_dir=str(tmp_path), models=["a", "b"], combine_levels=1.0)
    with pytest.raises(ParamsError, match=r"combine_levels=1.0 contradicts models=\['a', 'b'\]"):
        check_combine(P, layout)
    check_combine(P.replace(combine_levels=0.0), layout)  # off: nothing to check
