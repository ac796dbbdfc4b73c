"""train(): params, exact resume, export/reload, data-parallel on 2 CPU processes, the notebooks."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from hypothesis import given, settings
from hypothesis import strategies as st

from cdkit.base.params import ParamsError, load_params, notebook_parameters
from cdkit.__main__ import main
from cdkit.train.models import load_trained
from cdkit.base.params import defaults
from cdkit.steps import train as step
from cdkit.steps.train import InceptionTrainParams, TrainParams, XceptionTrainParams, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PARAMS = ["resnet101_full", "seresnet50_full", "inception_v3_full", "inception_v4_full", "xception_full"]
NOTEBOOKS = {"03_train_resnet.ipynb": "resnet18", "04_train_inception.ipynb": "inception_v3",
             "05_train_xception.ipynb": "xception"}


def quick(tiny_data, tmp_path, **kw):
    "Seconds-long runs: resnet18 at 32 px on part of the tiny preset, one process, no worker processes"
    from cdkit.data.prepare import create_prepared
    create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)  # step 02
    base = dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "prep"), run_dir=str(tmp_path / "run"),
                arch="resnet18", size=32, bs=16, acc_steps=2, epochs=2, max_train_images=64, num_workers=0, lr=0.01)
    return TrainParams(**{**base, **kw})


def test_params_files_load_and_name_real_backbones():
    from cdkit.train.models import resolve_arch
    for name in TRAIN_PARAMS:
        f = ROOT / "params" / f"{name}.yaml"
        P = load_params(TrainParams, [ROOT / "params" / "cdiscount.yaml", f])
        resolve_arch(P.arch)


def test_unknown_or_mistyped_key_fails_before_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert main(["train", "--params", str(bad), f"run_dir={tmp_path}"]) == 2
    assert main(["train", "bs=big", f"run_dir={tmp_path}"]) == 2
    assert main(["train", f"run_dir={tmp_path / 'run'}", "arch=resnet1O1"]) == 1  # "unknown backbone ... close matches"
    assert not any(tmp_path.rglob("params.yaml"))  # nothing written


@pytest.mark.parametrize("name,cls", list(zip(NOTEBOOKS, [TrainParams, InceptionTrainParams, XceptionTrainParams])))
def test_notebook_parameters_are_the_defaults(name, cls):
    got = notebook_parameters(ROOT / "notebooks" / name)
    assert got == defaults(cls)
    assert got["arch"] == NOTEBOOKS[name]


def test_resume_is_exact(tiny_data, tmp_path):
    # interrupted after epoch 1, resumed: same weights and log as one uninterrupted run
    full = train(quick(tiny_data, tmp_path, name="full"))
    train(quick(tiny_data, tmp_path, name="cut", stop_after=1))
    cut_dir = tmp_path / "run" / "models" / "cut"
    assert len(pd.read_csv(cut_dir / "metrics.csv")) == 1
    saved = (cut_dir / "params.yaml").read_text()
    with pytest.raises(ParamsError, match=r"lr: 0.01 -> 0.02"):  # resuming with another lr would change the model
        train(quick(tiny_data, tmp_path, name="cut", resume=True, lr=0.02))
    with pytest.raises(ParamsError, match=r"arch: 'resnet18' -> 'resnet10t'"):
        train(quick(tiny_data, tmp_path, name="cut", resume=True, arch="resnet10t"))
    assert (cut_dir / "params.yaml").read_text() == saved  # refused before anything was written
    resumed = train(quick(tiny_data, tmp_path, name="cut", resume=True))
    assert resumed.epochs_done == 2
    a = torch.load(full.model_dir / "model.pth")
    b = torch.load(resumed.model_dir / "model.pth")
    for k in a:  # CPU, single process, no worker processes: bit-exact in practice; allow float noise
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    h_full, h_res = pd.read_csv(full.model_dir / "metrics.csv"), pd.read_csv(cut_dir / "metrics.csv")
    assert h_res["epoch"].tolist() == [0, 1]
    cols = ["train_loss", "valid_loss", "accuracy", "product_accuracy", "batch", "lr"]
    pd.testing.assert_frame_equal(h_full[cols], h_res[cols], atol=1e-5)
    # the export reloads for inference and predicts what the learner predicts
    trained = load_trained(full.model_dir)
    x = torch.randn(2, 3, 32, 32)
    full.learn.model.eval()
    with torch.no_grad():
        assert torch.allclose(trained.model(x), full.learn.model(x), atol=1e-5)
    assert (trained.arch, trained.size) == ("resnet18", 32)


def test_distributed_two_cpu_processes(tiny_data, tmp_path):
    # the `accelerate launch` path, on 2 CPU processes over gloo (cdkit.train.distributed)
    launcher = Path(sys.executable).parent / "accelerate"
    args = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cdkit", "train",
            f"data_dir={tiny_data}", f"work_dir={tmp_path / 'prep'}", f"run_dir={tmp_path / 'run'}",
            "name=ddp", "arch=resnet18", "size=32", "bs=8", "acc_steps=1", "epochs=1", "num_workers=0",
            "max_train_images=64"]
    from cdkit.data.prepare import create_prepared
    create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    for k in range(2):  # each process trains a DDP-wrapped model on half the batches (of 8 of ~64 pictures)
        assert f"rank {k}/2: DistributedDataParallel over gloo" in out, out[-3000:]
    h = pd.read_csv(tmp_path / "run" / "models" / "ddp" / "metrics.csv")
    assert len(h) == 1
    assert h["batch"].iloc[0] == 16  # 8 per process x 2 processes
    assert 0 <= h["product_accuracy"].iloc[0] <= 1
    assert (tmp_path / "run" / "models" / "ddp" / "model.pth").exists()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(name, tiny_data, tmp_path):
    import papermill as pm
    from cdkit.data.prepare import create_prepared
    create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)
    out = tmp_path / name
    pm.execute_notebook(str(ROOT / "notebooks" / name), str(out), kernel_name="python3", progress_bar=False,
                        cwd=str(ROOT / "notebooks"),
                        parameters=dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "prep"),
                                        run_dir=str(tmp_path / "run"), name="nb",
                                        size=75 if name.startswith("04") else 32, bs=16, acc_steps=1, epochs=1,
                                        max_train_images=64, num_workers=0,
                                        lr_find=name.startswith("03"), lr_find_iters=8))
    model = tmp_path / "run" / "models" / "nb"
    assert load_trained(model).arch == NOTEBOOKS[name]  # each notebook trains its own backbone
    assert (model / "lr_find.png").exists() == name.startswith("03")
    import nbformat
    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    first = {key: next(i for i, c in enumerate(cells) if key in c.source)
             for key in ("show_batch", "find_lr", "step.fit(S)", "show_results")}
    assert first["show_batch"] < first["find_lr"] < first["step.fit(S)"] < first["show_results"]  # a batch and lr_find before fit
    for key in ("show_batch", "show_results"):  # fastai's own plots of the kit's loaders
        assert any("image/png" in o.get("data", {}) for o in cells[first[key]].outputs), key
    warned = [o.get("text", "") for c in cells for o in c.outputs if o.get("name") == "stderr" and "Warning" in o.get("text", "")]
    assert not warned, warned  # fixed at the source or filtered with the reason (cdkit/__init__.py)


def test_learner_used_after_training_leaves_the_run_files_alone(tiny_data, tmp_path):
    "Notebooks call get_preds on the returned learner; metrics.csv and the checkpoint must not change"
    res = train(quick(tiny_data, tmp_path, name="after"))
    metrics = res.model_dir / "metrics.csv"
    before = metrics.read_text()
    ckpt = res.model_dir / "checkpoints" / "last.pth"
    assert not ckpt.exists()  # a finished model keeps model.pth; its checkpoint only served a resume
    res.learn.get_preds(dl=res.learn.dls.valid)
    assert metrics.read_text() == before and len(pd.read_csv(metrics)) == 2
    assert not ckpt.exists()


def test_a_model_folder_in_use_is_refused_naming_the_pid(tiny_data, tmp_path):
    "Another process trains into the folder: a second `cdkit train` stops at once; after kill -9 the folder is free"
    from cdkit.base.io import folder_lock
    from cdkit.data.prepare import create_prepared
    create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)
    folder = tmp_path / "run" / "models" / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cdkit.base.io import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)",
                               str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "cdkit", "train", f"data_dir={tiny_data}", f"work_dir={tmp_path / 'prep'}",
                            f"run_dir={tmp_path / 'run'}", "name=busy", "epochs=1", "num_workers=0"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 1, r.stderr[-2000:]
        assert f"model folder {folder} is in use by PID {holder.pid}" in r.stderr and "Traceback" not in r.stderr
        assert not (folder / "params.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(folder):  # the lock died with its process
        pass


def test_study_params_reproduce_the_study():
    "params/study_*.yaml: SGD with momentum 0.1, weight decay 1e-4, lr 0.01 -> 0.005 -> 0.0005 at epochs 1 and 3, no smoothing, 1 view (docs/STUDY.md)"
    from cdkit.base.params import load_params
    from cdkit.steps.pipeline import notebook_for_params, params_class
    shared = ROOT / "params" / "cdiscount.yaml"
    trained = {}
    for name in ("resnet101", "seresnet50", "inception_v3", "xception"):
        f = ROOT / "params" / f"study_{name}.yaml"
        P = load_params(params_class(notebook_for_params(f)), [shared, f])
        assert (P.optimizer, P.momentum, P.wd, P.label_smoothing, P.one_cycle, P.lr) == ("sgd", 0.1, 1e-4, 0.0, False, 0.01)
        if name == "seresnet50":  # the study grows its batch instead of decaying the lr
            assert P.lr_steps == [] and P.batch_growth_epochs == [1, 3]
        else:
            assert P.lr_steps == [1, 3] and [P.lr * f for f in P.lr_step_factors] == pytest.approx([0.005, 0.0005])
        trained[P.name] = P
    load = lambda step: load_params(params_class(notebook_for_params(ROOT / "params" / f"study_{step}.yaml")),
                                    [shared, ROOT / "params" / f"study_{step}.yaml"])
    predict, ensemble, aggregate, pseudo = load("predict"), load("ensemble"), load("aggregate"), load("pseudo")
    # the ensemble row: ResNet-101 + Inception + Xception, one view each (SE-ResNet-50 is the baseline only)
    assert predict.n_tta == 0 and set(predict.models) == set(trained) - {"study_seresnet50"} == set(ensemble.models) == set(aggregate.models)
    assert (aggregate.rows, aggregate.method, aggregate.md5) == ("all", "belief", False)  # every picture x model x view
    assert not aggregate.rerank and not predict.features  # neither the re-ranker nor fusion heads are the study's
    for s in (load("predict"), load("ensemble"), load("aggregate")):
        assert not any(m.endswith("-fusion") for m in s.models)
    # the kit's recipe: fusion members in the ensemble and the re-ranker's candidates, 5 views
    kit = {step: load_params(params_class(notebook_for_params(ROOT / "params" / f"{step}_full.yaml")),
                             [shared, ROOT / "params" / f"{step}_full.yaml"]) for step in ("predict", "fuse", "ensemble")}
    assert kit["predict"].n_tta == 4 and kit["predict"].features
    assert set(kit["ensemble"].models) == set(kit["predict"].models) | {f"{m}-fusion" for m in kit["fuse"].models}
    assert not ensemble.fit_weights
    assert (pseudo.base, pseudo.labels_from, pseudo.alpha_form, pseudo.alpha_final) == ("study_resnet101", "model", "authors", 2.0)


def test_stepped_sgd_schedule(tiny_data, tmp_path):
    P = quick(tiny_data, tmp_path, name="sgd", optimizer="sgd", one_cycle=False, epochs=3, lr=0.01, lr_steps=[1, 2],
              lr_step_factors=[0.5, 0.1], acc_steps=1)
    res = train(P)
    assert res.history["lr"].tolist() == pytest.approx([0.01, 0.005, 0.001])
    assert type(res.learn.opt).__name__ == "Optimizer" and res.learn.opt.hypers[-1]["mom"] == 0.9
    from cdkit.base.params import make_params
    with pytest.raises(ParamsError, match="one_cycle=True contradicts lr_steps"):
        make_params(TrainParams, dict(lr_steps=[1], lr_step_factors=[0.5]))
    with pytest.raises(ParamsError, match="differ in length"):
        make_params(TrainParams, dict(one_cycle=False, lr_steps=[1, 2], lr_step_factors=[0.5]))


# ---- resume compares what paths mean; a finished model; nothing written before the checks ----

def _spellings(root, tail, draw):
    "A generated spelling of root/tail: absolute or from the root, ./ and x/.. inserted, through a symlink"
    parts = []
    for i, seg in enumerate(tail):
        extra = draw(st.sampled_from(["", ".", "x/.."])) if i else ""
        if extra: parts.append(extra)
        parts.append("alias" if i == 0 and seg == "runs" and draw(st.booleans()) else seg)
    prefix = draw(st.sampled_from(["abs", "rel", "dot"]))
    rel = "/".join(parts) + ("/" if draw(st.booleans()) else "")
    return {"abs": f"{root}/{rel}", "rel": rel, "dot": f"./{rel}"}[prefix]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_changed_params_compares_paths_by_what_they_name(data):
    import tempfile

    import cdkit.base.paths
    from cdkit.base.params import changed_params
    with tempfile.TemporaryDirectory() as t, pytest.MonkeyPatch.context() as mp:
        root = Path(t).resolve()
        for d in ("runs/demo/x", "runs/other", "data/demo/x"):
            (root / d).mkdir(parents=True)
        (root / "alias").symlink_to(root / "runs")
        (root / "runs" / "x").mkdir()
        mp.setattr(cdkit.base.paths, "ROOT", root)
        a, b = (_spellings(root, ["runs", "demo"], data.draw) for _ in range(2))
        saved = {"run_dir": a, "data_dir": "data/demo", "lr": 0.01}
        now = TrainParams(run_dir=b, data_dir=f"{root}/data/./demo", lr=0.01)
        assert changed_params(saved, now, ["run_dir", "data_dir", "lr"]) == {}, (a, b)
        other = TrainParams(run_dir=_spellings(root, ["runs", "other"], data.draw), data_dir="data/demo", lr=0.02)
        assert set(changed_params(saved, other, ["run_dir", "data_dir", "lr"])) == {"run_dir", "lr"}


def test_a_finished_model_resumes_under_another_spelling_and_refuses_more_epochs(tiny_data, tmp_path, capsys):
    done = train(quick(tiny_data, tmp_path, name="fin"))
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    (tmp_path / "x").mkdir()
    before = (done.model_dir / "model.pth").read_bytes()
    again = train(quick(tiny_data, tmp_path, name="fin", resume=True, run_dir=f"{tmp_path}/alias/../alias/"))
    assert again.epochs_done == 2 and (done.model_dir / "model.pth").read_bytes() == before  # nothing left to train
    P = quick(tiny_data, tmp_path, name="fin", resume=True, epochs=4, run_dir=f"{tmp_path}/x/../run")
    args = ["train"] + [f"{k}={v}" for k, v in P.model_dump().items() if k in (
        "data_dir", "work_dir", "run_dir", "name", "arch", "size", "bs", "acc_steps", "epochs", "max_train_images",
        "num_workers", "lr", "resume")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is a finished model of 2 epochs" in err and "other parameters" not in err, err


def test_a_refused_run_writes_nothing(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", f"data_dir={tmp_path / 'missing'}", f"work_dir={tmp_path / 'prep'}", f"run_dir={run}",
                 "name=x"]) == 1
    assert not (run / "models" / "x").exists()  # no folder, no .lock
    assert main(["train", f"run_dir={run}", "name=x", "std=[0.2,0.2,0.2]"]) == 2
    assert not (run / "models" / "x").exists()


# ---- export and reopening a finished model ----

class Interrupt(Callback):
    "Ctrl-C in the notebook, in the middle of an epoch"
    def after_batch(self):
        if self.training and self.iter == 1: raise KeyboardInterrupt


def test_export_after_an_interrupted_fit_reloads_and_keeps_the_loaders(tiny_data, tmp_path):
    from fastai.learner import load_learner as fastai_load_learner
    S = step.setup(quick(tiny_data, tmp_path, name="exp"))
    learn = S.learn
    learn.add_cb(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        step.fit(S)  # the epoch log had its file open when the fit stopped
    learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, Interrupt)))
    learn.export()
    path = S.model_dir / "export.pkl"
    # fastai's load_learner unpickles: allowed here, the file is the kit's own and the test names it
    loaded = fastai_load_learner(path)
    xb = learn.dls.valid.one_batch()[0].cpu()  # the loaders still work after export
    learn.model.eval(), loaded.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(xb), learn.model.cpu()(xb), atol=1e-6)
    assert len(learn.dls.train.dataset) > 0


def test_a_failed_export_leaves_no_file_and_the_learner_whole(tiny_data, tmp_path):
    res = train(quick(tiny_data, tmp_path, name="bad", epochs=1))
    learn = res.learn

    class HoldsAFile(Callback):
        def __init__(self, f): self.f = f  # an open handle cannot be pickled

    with open(tmp_path / "w.txt", "w") as f:
        learn.add_cb(HoldsAFile(f))
        with pytest.raises(Exception, match="pickle"):
            learn.export()
    assert not (res.model_dir / "export.pkl").exists()
    assert not [p for p in res.model_dir.iterdir() if "tmp" in p.name]
    assert len(learn.dls.train.dataset) > 0 and learn.opt is not None
    learn.dls.valid.one_batch()


def test_load_learner_reopens_a_model_and_predicts_what_step_06_predicts(tiny_data, tmp_path):
    from cdkit.infer.predict import Views, predict_to_store
    from cdkit.data.prepare import load_prepared
    from cdkit.infer.store import load_store
    res = train(quick(tiny_data, tmp_path, name="re", epochs=1))
    learn = step.load_learner(tmp_path / "run", "re")
    assert learn.dls.valid.one_batch()[0].shape[-1] == 32
    prep = load_prepared(tiny_data, tmp_path / "prep")
    images, bson = prep.images("valid")
    images = images.iloc[:6]
    a = load_store(predict_to_store(learn, images, bson, tmp_path / "a.store", exact=True, device="cpu"))
    t = load_trained(res.model_dir)  # what step 06 does
    b = load_store(predict_to_store(t.model, images, bson, tmp_path / "b.store", Views(size=t.size, item_size=t.item_size,
                                    mean=t.mean, std=t.std), exact=True, device="cpu"))
    assert np.allclose(a.prob, b.prob, atol=1e-6) and (a.product_id == b.product_id).all()
    # fastai's predict on one picture's JPEG gives step 06's probabilities for it
    ds = learn.dls.valid.dataset
    _, _, probs = learn.predict(ds.jpeg(0))
    all_images, _ = prep.images("valid")
    row = all_images[(all_images.product_id == int(ds.product_id[0])) & (all_images.img_idx == int(ds.img_idx[0]))]
    one = load_store(predict_to_store(t.model, row, bson, tmp_path / "c.store", Views(size=t.size, item_size=t.item_size,
                                      mean=t.mean, std=t.std), exact=True, device="cpu"))
    assert len(one) == 1
    assert np.allclose(probs.numpy()[one.cls[0, 0]], one.prob[0, 0], atol=1e-5)
