"""The backbone factory: names, one training step per study backbone, local pretrained weights,
normalization exactly once."""
import pytest
import timm
import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import Normalize

from cdkit.train.models import STUDY, UnknownArchError, create_model, ensure_normalized, make_learner, resolve_arch


def test_unknown_arch_lists_close_matches():
    with pytest.raises(UnknownArchError, match="xception"):
        resolve_arch("xceptoin")
    assert resolve_arch("xception").timm_name == "legacy_xception"
    assert resolve_arch("resnet18").size == 180  # any timm name: the whole picture


def test_study_sizes():
    assert {k: b.size for k, b in STUDY.items()} == {"resnet101": 160, "seresnet50": 160, "inception_v3": 180,
                                                      "inception_v4": 180, "xception": 180}


# Small inputs keep this fast on CPU; Inception needs at least 75 px.
@pytest.mark.parametrize("arch,size", [("resnet101", 64), ("seresnet50", 64), ("inception_v3", 75),
                                       ("inception_v4", 75), ("xception", 64)])
def test_backbone_takes_a_training_step(arch, size):
    torch.manual_seed(0)
    model = create_model(arch, 7).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 5])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()][-1]
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, list(model.parameters())[-1])


def test_pretrained_weights_from_local_file(tmp_path):
    ref = timm.create_model("resnet18", pretrained=False)  # stands in for the ImageNet weights
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("resnet18", 7, pretrained_file=str(path))
    body = model[0].model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):  # ImageNet classifier dropped: 7 classes here
            assert torch.equal(body[k], v), k
    with pytest.raises(FileNotFoundError):
        create_model("resnet18", 7, pretrained_file=str(tmp_path / "missing.pth"))


def _dls(after_batch=()):
    items = [(torch.rand(3, 32, 32), torch.tensor(i % 3)) for i in range(8)]
    dls = DataLoaders(*(TfmdDL(items, bs=4, after_batch=list(after_batch)) for _ in range(2)), device="cpu")
    dls.c = 3
    return dls


def _norms(dls):
    return [t for t in dls.after_batch.fs if isinstance(t, Normalize)]


def test_normalized_exactly_once_without_pretrained_weights():
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    dls = _dls()  # no Normalize: the factory adds it although fastai would not (pretrained=False)
    make_learner(dls, "resnet18", 3, mean=mean, std=std, loss_func=torch.nn.CrossEntropyLoss())
    assert len(_norms(dls)) == 1
    dls = _dls([Normalize.from_stats(mean, std, cuda=False)])  # the data pipeline's: kept, not doubled
    make_learner(dls, "resnet18", 3, mean=mean, std=std, loss_func=torch.nn.CrossEntropyLoss())
    assert len(_norms(dls)) == 1
    with pytest.raises(ValueError, match="expects"):
        ensure_normalized(_dls([Normalize.from_stats(mean, std, cuda=False)]), (0.485, 0.456, 0.406),
                          (0.229, 0.224, 0.225))
