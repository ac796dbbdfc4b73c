"""Nothing untrusted is executed: no code of the kit unpickles a file it did not write for the user to
name, and a crafted checkpoint in a run folder is refused, never run."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import quick

from cdkit.__main__ import main
from cdkit.train.callbacks import UnsafeCheckpointError, safe_load
from cdkit.base.errors import CdkitError

ROOT = Path(__file__).resolve().parents[1]
# (file, call) pairs allowed, with the reason. fastai's `load_learner(path)` unpickles: allowed only
# where the user names the file (e.g. a test or a notebook loading the kit's own export.pkl); no code
# under cdkit/, bench/ or tools/ does so today, and a new one must be listed here with its reason.
ALLOWED: dict = {}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _name(node):
    "dotted name of a call's function: torch.load, pickle.loads, np.load, ..."
    if isinstance(node, ast.Attribute): return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name): return node.id
    return "?"


def _kw(call, key):
    return next((k.value for k in call.keywords if k.arg == key), None)


def _safe_yaml_classes(tree):
    "classes of the module deriving from a safe yaml loader (e.g. params._UniqueKeyLoader)"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_name(b).split(".")[-1] in SAFE_YAML_LOADERS | out for b in node.bases):
            out.add(node.name)
    return out


def unsafe_loads(source: str, filename="<src>"):
    "[(line, call)] of the loads in `source` that may unpickle (run code from) a file"
    tree = ast.parse(source, filename)
    safe_yaml = SAFE_YAML_LOADERS | _safe_yaml_classes(tree)
    pickle_aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                      if a.name in ("pickle", "cPickle", "dill", "joblib", "cloudpickle")}
    fastai_ll = any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("fastai")
                    and {"load_learner", "*"} & {a.name for a in n.names} for n in ast.walk(tree))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names]
            if "dill" in names or mod == "dill" or (mod in ("pickle", "joblib") and {"load", "loads"} & set(names)):
                found.append((node.lineno, f"import {mod or ''} {names}"))
            continue
        if not isinstance(node, ast.Call): continue
        name = _name(node.func)
        last = name.split(".")[-1]
        head = name.split(".")[0]
        wo = _kw(node, "weights_only")
        if last == "load" and head == "torch" and not (isinstance(wo, ast.Constant) and wo.value is True):
            found.append((node.lineno, name))
        elif last in ("load", "loads", "Unpickler") and head in pickle_aliases | {"pickle", "dill", "joblib"}:
            found.append((node.lineno, name))
        elif last == "load" and head in ("np", "numpy"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append((node.lineno, name))
        elif last == "read_pickle":
            found.append((node.lineno, name))
        elif last == "load" and head == "yaml":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _name(loader).split(".")[-1] not in safe_yaml:
                found.append((node.lineno, name))
        elif last in ("unsafe_load", "full_load") and head == "yaml":
            found.append((node.lineno, name))
        elif last == "load_learner" and (name == "load_learner" and fastai_ll or head in ("fastai", "learner")):
            found.append((node.lineno, name))  # fastai's (unpickles); the kit's own cdkit.steps.train.load_learner is safe
    return found


def test_no_code_of_the_kit_loads_a_file_unsafely():
    bad = []
    files = [p for d in ("cdkit", "bench", "tools") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    for path in files:
        rel = str(path.relative_to(ROOT))
        for line, call in unsafe_loads(path.read_text(), rel):
            if (rel, call) not in ALLOWED: bad.append(f"{rel}:{line}: {call}")
    assert not bad, "unsafe loads (use torch.load(..., weights_only=True) / cdkit.train.callbacks.safe_load):\n" + "\n".join(bad)


@pytest.mark.parametrize("src,n", [
    ("import torch\ntorch.load(p)", 1),
    ("import torch\ntorch.load(p, weights_only=False)", 1),
    ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)", 0),
    ("import pickle\npickle.load(open(p, 'rb'))", 1),
    ("import pickle as pk\npk.loads(b)", 1),
    ("from pickle import load\n", 1),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", 1),
    ("import numpy as np\nnp.load(p)", 0),
    ("import pandas as pd\npd.read_pickle(p)", 1),
    ("import yaml\nyaml.load(t)", 1),
    ("import yaml\nyaml.load(t, Loader=yaml.FullLoader)", 1),
    ("import yaml\nyaml.load(t, Loader=yaml.SafeLoader)", 0),
    ("import yaml\nclass L(yaml.SafeLoader): pass\nyaml.load(t, Loader=L)", 0),
    ("import yaml\nyaml.safe_load(t)", 0),
    ("import joblib\njoblib.load(p)", 1),
    ("import dill\n", 1),
    ("from fastai.learner import load_learner\nload_learner(p)", 1),
    ("from fastai.vision.all import *\nload_learner(p)", 1),
    ("from cdkit.steps.train import load_learner\nload_learner(run_dir, name)", 0),
])
def test_the_scan_finds_each_kind_of_unsafe_load(src, n):
    assert len(unsafe_loads(src)) == n, unsafe_loads(src)


class Payload:
    "Unpickling this creates `marker`: what a crafted checkpoint could do instead (run any code)"

    def __init__(self, marker): self.marker = str(marker)

    def __reduce__(self): return (open, (self.marker, "w"))


def craft(path, marker):
    "A checkpoint-looking file whose unpickling creates `marker`"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "model": {}, "x": Payload(marker)}, path)


def test_the_payload_is_live(tmp_path):
    # the crafted file does run code when unpickled unsafely: the refusals below are real
    craft(tmp_path / "c.pth", tmp_path / "ran")
    torch.load(tmp_path / "c.pth", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_safe_load_refuses_a_crafted_file_naming_it(tmp_path):
    craft(tmp_path / "c.pth", tmp_path / "ran")
    with pytest.raises(UnsafeCheckpointError, match=r"c\.pth: refused") as e:
        safe_load(tmp_path / "c.pth")
    assert isinstance(e.value, CdkitError) and "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()
    (tmp_path / "t.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnsafeCheckpointError, match=r"t\.pth: unreadable"):
        safe_load(tmp_path / "t.pth")


def test_a_crafted_last_pth_is_refused_on_resume(tiny_data, tmp_path, capsys):
    from cdkit.steps.train import train
    train(quick(tiny_data, tmp_path, name="cut", epochs=2, stop_after=1))  # a started run, as received
    ckpt = tmp_path / "run" / "models" / "cut" / "checkpoints" / "last.pth"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # the kit's own checkpoints load safely
    marker = tmp_path / "ran"
    craft(ckpt, marker)
    P = quick(tiny_data, tmp_path, name="cut", epochs=2, resume=True)
    args = ["train"] + [f"{k}={v}" for k, v in P.model_dump().items() if k in (
        "data_dir", "work_dir", "run_dir", "name", "arch", "size", "bs", "epochs", "max_train_images", "num_workers",
        "lr", "resume")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{ckpt}: refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    from cdkit.train.models import read_card
    assert read_card(ckpt.parent.parent).epochs_done == 1  # nothing trained on


def test_a_crafted_fusion_checkpoint_or_head_is_refused_on_resume(tmp_path):
    "What `cdkit fuse resume=true` does per head: continue from checkpoints/<head>.pth, or load a finished <head>.pth"
    from cdkit.infer.fusion import FitSpec, HeadSpec, ProductSet, load_head, product_groups, train_head
    n, d = 64, 8
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float16)
    g = product_groups(np.arange(n), np.zeros(n, np.int64))
    y = np.arange(n) % 3
    spec = HeadSpec(d, 3, hidden=8)
    marker = tmp_path / "ran"
    craft(tmp_path / "checkpoints" / "h.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"h\.pth: refused"):
        train_head(spec, FitSpec(epochs=2, bs=16), ProductSet(x, g, y), ProductSet(x, g, y), tmp_path, "h", resume=True,
                   device="cpu")
    assert not marker.exists() and not (tmp_path / "h.pth").exists()
    craft(tmp_path / "done.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"done\.pth: refused"):
        load_head(spec, tmp_path / "done.pth")
    assert not marker.exists()
