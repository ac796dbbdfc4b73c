from typing import Optional

import pytest

from cdkit.base.params import Params, ParamsError, load_params, parse_overrides, save_params, take_params


class P(Params):
    arch: str = "resnet18"   # backbone
    lr: float = 1e-3         # peak learning rate
    epochs: int = 2          # passes over the data
    resume: bool = False     # continue from the last checkpoint
    pretrained_file: Optional[str] = None  # local weights


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("lr: 0.01\nepochs: 3\n")
    p = load_params(P, [f], {"arch": "resnet50"})
    assert (p.arch, p.lr, p.epochs, p.resume) == ("resnet50", 0.01, 3, False)
    assert parse_overrides(["lr=0.1", "pretrained_file=w.pth"]) == {"lr": 0.1, "pretrained_file": "w.pth"}


def test_unknown_key_named_with_suggestion(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("epoch: 3\n")
    with pytest.raises(ParamsError, match=r"p.yaml.*'epoch' \(did you mean 'epochs'\?\)"):
        load_params(P, [f])


def test_wrong_type_named(tmp_path):
    f = tmp_path / "p.yaml"
    for text, name in (("epochs: 2.5\n", "epochs"), ("resume: 'yes'\n", "resume"), ("lr: true\n", "lr")):
        f.write_text(text)
        with pytest.raises(ParamsError, match=f"'{name}'"):
            load_params(P, [f])
    assert load_params(P, overrides=dict(epochs=4, lr=1)).lr == 1.0  # an int is a valid float


def test_take_params_catches_injected_typos():
    ns = {"arch": "resnet18", "lr": 1e-3, "epochs": 2, "resume": False, "pretrained_file": None,
          "In": [], "_i1": "", "take_params": take_params, "np": pytest}
    assert take_params(P, ns).epochs == 2
    ns["learning_rate"] = 0.1  # what papermill -p learning_rate 0.1 would inject
    with pytest.raises(ParamsError, match="learning_rate"):
        take_params(P, ns)


def test_save_params(tmp_path):
    import yaml
    save_params(P(lr=0.5), tmp_path / "params.yaml")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["lr"] == 0.5


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("3e2", 300.0), ("-2E+1", -20.0), ("1.5e-2", 0.015)])
def test_exponent_without_a_dot_is_a_number(text, value, tmp_path):
    "lr=1e-3 is what people type; YAML 1.1 (PyYAML) alone would read it as a string and the float field refuse it"
    from cdkit.base.params import load_params, parse_overrides, read_params_file
    from cdkit.steps.train import TrainParams
    assert parse_overrides([f"lr={text}"]) == {"lr": value}
    (tmp_path / "p.yaml").write_text(f"lr: {text}\n")
    assert read_params_file(tmp_path / "p.yaml") == {"lr": value}
    assert load_params(TrainParams, overrides=["lr=1e-3"]).lr == 0.001
