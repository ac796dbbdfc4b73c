"""The whole method on the tiny preset, as `make demo` runs it: every notebook headless with papermill,
and every number of the report recomputed from the files of the step that claims it, so that a row
copied from another, a step whose output never reaches the submission, or one step undoing another
fails here."""
import json

import numpy as np
import pandas as pd
import pytest

from cdkit.steps.pipeline import STEPS, NotebookFailed, run_pipeline
from conftest import SEED
from cdkit.runs import RunLayout
from cdkit.submit.submission import validate_submission

# small and fast: two epochs of a small backbone in each training notebook (each notebook's own
# backbone is run by tests/test_train.py), two TTA views; pseudo-labels for every test product
# equal ensemble weights: fitted ones may give a tiny run's weak members none, and the tests check each member's effect.
# Large effects by construction: at lr 0.01 for two epochs the models learn (at 0.003 for one they predicted one
# class, so no step could change an argmax), and 30% of the products validate (tiny's 10% were 16 products)
TINY = dict(epochs=2, n_tta=1, max_train_images=400, num_workers=0, bs=16, arch="resnet10t", size=32,
            threshold=0.0, lr=0.01, fit_weights=False, valid_frac=0.3, seed=SEED)


@pytest.fixture(scope="module")
def pipeline_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    work = tmp_path_factory.mktemp("work")
    timings = run_pipeline(run, overrides=dict(TINY, data_dir=str(tiny_data), work_dir=str(work)), log=lambda *a: None)
    from cdkit.data.prepare import load_prepared
    return run, timings, load_prepared(tiny_data, work)


def test_every_notebook_ran_and_left_its_outputs(pipeline_run):
    run, timings, _ = pipeline_run
    layout = RunLayout(run)
    assert list(timings) == [s.notebook for s in STEPS]  # every step's notebook, in the registry's order
    for nb in timings:
        assert (run / "notebooks" / f"{nb}.ipynb").exists()
    assert layout.model_names() == ["inception", "pseudo", "resnet", "xception"]
    for model in ("resnet", "inception", "xception", "pseudo", "resnet-fusion", "inception-fusion", "xception-fusion"):
        for split in ("valid", "test"):
            assert (layout.store(model, split) / "manifest.json").exists()
    for stage in ("base", "pseudo"):
        for split in ("valid", "test"):
            assert len(pd.read_parquet(layout.products(stage, split))) > 0


def _acc(prep, df, split):
    return prep.accuracy(df["product_id"], df["pred_class"], split)


def _moved(a, b):
    "Largest change of a stored probability between two stores of the same pictures (views averaged)"
    assert np.array_equal(a.product_id, b.product_id) and np.array_equal(a.img_idx, b.img_idx)
    return float(np.abs(a.dense() - b.dense()).max())


# A step's effect, asserted on the probabilities it stores: some picture's probability moved by more than
# this (on TINY the steps move them by 0.15 to 1; the stores quantize to 1/255), whatever the machine
MOVED = 0.05


def study_problems(run, prep) -> list:
    """What is wrong with the study of a run folder, empty when nothing is: each row of the report's table
    recomputed, on validation and on test, from the files of the step that claims it (stores, products),
    against results.json and report.md; and each step's effect on the probabilities it stores (TTA: several
    views that differ; the ensemble: not its first member; MD5: products it matched; pseudo-labels: a model
    and an ensemble that moved), never on an argmax that may or may not flip on another machine"""
    from cdkit.infer.aggregate import belief_aggregate, prediction_rows
    from cdkit.base.params import load_params
    from cdkit.steps.report import _fmt
    from cdkit.steps.aggregate import AggregateParams, belief_kwargs
    from cdkit.steps.predict import store_accuracy
    from cdkit.infer.store import load_store
    layout = RunLayout(run)
    study = json.loads(layout.results.read_text())["study"]
    report = layout.results.with_name("report.md").read_text()
    A = load_params(AggregateParams, [layout.step_params("aggregate")])
    problems = []
    for split in ("valid", "test"):
        resnet = load_store(layout.store("resnet", split))
        ens = load_store(layout.ensemble_store("base", split))
        r = prediction_rows([ens])
        belief = belief_aggregate(r.product_id, r.cls, r.prob, r.rest, r.n_classes, **belief_kwargs(A))
        recomputed = {
            "baseline": store_accuracy(resnet, prep, split, views=[0]),
            "+TTA": store_accuracy(resnet, prep, split),
            "ensemble (+TTA)": store_accuracy(ens, prep, split),
            "ensemble + belief aggregation": prep.accuracy(belief.product_id, belief.pred_class, split),
            "+MD5 lookup": _acc(prep, pd.read_parquet(layout.products("base", split)), split),
            "+pseudo-labels": _acc(prep, pd.read_parquet(layout.products("pseudo", split)), split)}
        for row, value in recomputed.items():
            said = study.get(row, {}).get(split)
            if said is None or said != pytest.approx(value, abs=1e-9):
                problems.append(f"{row} {split}: results.json says {said}, its step's files give {value}")
            line = [x for x in report.splitlines() if x.startswith(f"| {row} ")]
            cells = line[0].split(" | ")[2:4] if line else []  # | step | what | test | validation | validation figure |
            if [c.strip(" |").split(" +- ")[0] for c in cells] != [_fmt(study.get(row, {}).get(s)) for s in ("test", "valid")]:
                problems.append(f"{row}: report.md shows {line} for results.json's {study.get(row)}")
        # the effects, on stored probabilities
        views = study.get("+TTA", {}).get("views", 0)
        if not (resnet.n_views == views > 1):
            problems.append(f"TTA {split}: {resnet.n_views} view(s) stored, the report says {views}; TTA needs more than one")
        elif min(float(np.abs(resnet.dense(view=v) - resnet.dense(view=0)).max()) for v in range(1, resnet.n_views)) <= MOVED:
            problems.append(f"TTA {split}: a view's distributions equal the original view's")
        if _moved(ens, resnet) <= MOVED:
            problems.append(f"ensemble {split}: its distributions are its first member's")
        pseudo = load_store(layout.store("pseudo", split))
        if _moved(pseudo, resnet) <= MOVED:
            problems.append(f"pseudo-labels {split}: the fine-tuned model's stores equal its base model's")
        if _moved(load_store(layout.ensemble_store("pseudo", split)), ens) <= MOVED:
            problems.append(f"pseudo-labels {split}: stage pseudo's ensemble equals stage base's")
    # MD5: the lookup found test products whose pictures are train copies (the synthetic data plants them),
    # and the products file marks as many changed products as the step says; whether any label changed is
    # up to the model (a product it already got right keeps its label), so that count may be 0
    said = json.loads(layout.results.read_text())["08 aggregation (base)"]["MD5 test"]
    changed = int(pd.read_parquet(layout.products("base", "test"))["md5"].sum())
    if not said["products"] > 0 or said["changed"] != changed:
        problems.append(f"+MD5 lookup: the step says {said}, the products file marks {changed} changed")
    return problems


def test_each_study_row_comes_from_its_own_step(pipeline_run):
    run, _, prep = pipeline_run
    assert study_problems(run, prep) == []


def _mutated(run, tmp_path, mutate):
    "A copy of the run folder's study files with `mutate(study, layout)` applied"
    import shutil
    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    for d in ("preds", "params", "products"):
        shutil.copytree(run / d, copy / d)
    for f in ("results.json", "report.md"):
        shutil.copy(run / f, copy / f)
    layout = RunLayout(copy)
    results = json.loads(layout.results.read_text())
    mutate(results["study"], layout)
    layout.results.write_text(json.dumps(results))
    return copy


def test_the_study_check_catches_a_wrong_copied_or_idle_row(pipeline_run, tmp_path):
    "The check above fails for a validation figure off by 0.05, one copied from the row above, and a TTA that did nothing"
    from cdkit.infer.store import load_store, save_store
    run, _, prep = pipeline_run

    def off(study, layout):
        study["+TTA"]["valid"] += 0.05
    assert any(p.startswith("+TTA valid: results.json says") for p in study_problems(_mutated(run, tmp_path, off), prep))

    names = [r for r in ("baseline", "+TTA", "ensemble (+TTA)", "ensemble + belief aggregation", "+MD5 lookup",
                         "+pseudo-labels")]
    study = json.loads(RunLayout(run).results.read_text())["study"]
    pairs = [(a, b) for a, b in zip(names, names[1:]) if study[a]["valid"] != study[b]["valid"]]
    assert pairs  # the tiny run's rows differ on validation (TINY trains enough for that)
    above, row = pairs[0]

    def copied(study, layout):
        study[row]["valid"] = study[above]["valid"]
    assert any(p.startswith(f"{row} valid: results.json says") for p in study_problems(_mutated(run, tmp_path, copied), prep))

    def idle_tta(study, layout):  # one view stored, +TTA reported as the baseline
        for split in ("valid", "test"):
            s = load_store(layout.store("resnet", split))
            s.cls, s.prob, s.rest = s.cls[:, :1], s.prob[:, :1], s.rest[:, :1]
            save_store(s, layout.store("resnet", split), overwrite=True)
        study["+TTA"] = {**study["baseline"], "views": 1}
    problems = study_problems(_mutated(run, tmp_path, idle_tta), prep)
    assert "TTA valid: 1 view(s) stored, the report says 1; TTA needs more than one" in problems


def test_pseudo_step_changes_the_final_predictions(pipeline_run):
    "The fine-tune moved the weights and the probabilities stored (asserted on them, not on an argmax that may not flip)"
    import torch
    from cdkit.infer.store import load_store
    run, _, prep = pipeline_run
    layout = RunLayout(run)
    a = torch.load(layout.model_dir("resnet") / "model.pth", weights_only=True)
    b = torch.load(layout.model_dir("pseudo") / "model.pth", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the fine-tune moved the weights
    ens = json.loads((layout.ensemble_store("pseudo", "test") / "manifest.json").read_text())["meta"]
    # the fine-tuned model in its base model's place; the base model's fusion member left out (its heads read
    # the un-fine-tuned model's features)
    assert ens["members"] == ["pseudo", "inception", "xception", "inception-fusion", "xception-fusion"]
    for split in ("valid", "test"):
        assert _moved(load_store(layout.store("pseudo", split)), load_store(layout.store("resnet", split))) > MOVED
        assert _moved(load_store(layout.ensemble_store("pseudo", split)), load_store(layout.ensemble_store("base", split))) > MOVED
    base = pd.read_parquet(layout.products("base", "test")).set_index("product_id")["pred_class"]
    pseudo = pd.read_parquet(layout.products("pseudo", "test")).set_index("product_id")["pred_class"]
    changed = int((base.reindex(pseudo.index) != pseudo).sum())  # may be 0 on a tiny run: the count is checked, not its size
    results = json.loads(layout.results.read_text())
    assert results["study"]["+pseudo-labels"]["test products changed"] == changed


def test_fusion_members_enter_the_ensemble_with_their_products(pipeline_run):
    "Step 06b's members: one distribution per product on every picture, weighed into the ensemble that step 08 reads"
    from cdkit.infer.ensemble import combine
    from cdkit.steps.predict import store_accuracy
    from cdkit.infer.store import load_store
    run, _, prep = pipeline_run
    layout = RunLayout(run)
    results = json.loads(layout.results.read_text())
    meta = json.loads((layout.ensemble_store("base", "test") / "manifest.json").read_text())["meta"]
    assert [m for m in meta["members"] if m.endswith("-fusion")] == ["resnet-fusion", "inception-fusion", "xception-fusion"]
    for model in ("resnet", "inception", "xception"):
        for split in ("valid", "test"):
            fused, own = load_store(layout.store(f"{model}-fusion", split)), load_store(layout.store(model, split))
            assert sorted(zip(fused.product_id, fused.img_idx)) == sorted(zip(own.product_id, own.img_idx))
            first = pd.DataFrame({"p": fused.product_id, "c": fused.cls[:, 0, 0]}).groupby("p")["c"].nunique()
            assert (first == 1).all()  # every picture of a product carries the product's distribution
        card = json.loads((layout.model_dir(f"{model}-fusion") / "fusion.json").read_text())
        assert card["chosen"] in ("aware", "invariant") and len(card["seeds"]) >= 1
        row = results["06b fusion"][f"{model}: fusion member ({card['chosen']}, {len(card['seeds'])} seeds averaged)"]
        assert row["test"] == pytest.approx(store_accuracy(load_store(layout.store(f"{model}-fusion", "test")), prep,
                                                           "test"), abs=1e-4)
    # the ensemble step 08 aggregates is not the ensemble of the backbones alone: the fusion members are in it
    w = np.asarray(meta["weights"])
    plain = [i for i, m in enumerate(meta["members"]) if not m.endswith("-fusion")]
    assert w[[i for i in range(len(w)) if i not in plain]].sum() > 0
    alone = combine([load_store(layout.store(meta["members"][i], "test")) for i in plain], weights=w[plain] / w[plain].sum(),
                    method=meta["method"])
    saved = load_store(layout.ensemble_store("base", "test"))
    assert np.array_equal(alone.product_id, saved.product_id) and np.array_equal(alone.img_idx, saved.img_idx)
    assert not np.allclose(alone.dense(), saved.dense(), atol=1e-3)  # the fusion members moved the distributions


def test_reranked_products_are_what_step_08_writes_when_chosen(pipeline_run, tmp_path):
    import shutil
    from cdkit.base.params import load_params
    from cdkit.steps import aggregate as step
    run, _, prep = pipeline_run
    copy = tmp_path / "run"  # the module's run folder stays as the pipeline left it
    for d in ("preds", "params"):
        shutil.copytree(run / d, copy / d)
    P = load_params(step.AggregateParams, [RunLayout(run).step_params("aggregate")],
                    {"method": "rerank", "md5": False, "md5_products": False, "run_dir": str(copy)})
    R = step.run(P, prep, log=lambda *a: None, save=False)
    assert R.chosen == "rerank" and list(R.rerank_seeds.index) == P.rerank_seeds
    final = pd.read_parquet(RunLayout(copy).products("base", "test"))
    assert np.array_equal(final["pred_class"].to_numpy(), R.predictions[("test", "rerank")].pred_class)


def test_submission_is_the_stage_better_on_validation(pipeline_run):
    run, _, prep = pipeline_run
    layout = RunLayout(run)
    sub = validate_submission(layout.submission, prep.data_dir / "sample_submission.csv", prep.catalog.category_ids)
    assert len(sub) == len(pd.read_csv(prep.data_dir / "sample_submission.csv"))
    valid = {s: _acc(prep, pd.read_parquet(layout.products(s, "valid")), "valid") for s in ("base", "pseudo")}
    stage = "pseudo" if valid["pseudo"] > valid["base"] else "base"
    products = pd.read_parquet(layout.products(stage, "test")).set_index("product_id")["category_id"]
    got = sub.set_index("_id")["category_id"]
    assert (got.reindex(products.index).to_numpy() == products.to_numpy()).all()
    results = json.loads(layout.results.read_text())["10 submission"]
    assert results["stage submitted"] == stage


def test_md5_labels_survive_belief_aggregation(pipeline_run, tmp_path):
    "Step 08 with belief forced: every test product with a picture copied from train takes its train label"
    import shutil
    from cdkit.base.params import load_params
    from cdkit.steps import aggregate as step
    run, _, prep = pipeline_run
    copy = tmp_path / "run"  # step 08 writes its products: the module's run folder stays as the pipeline left it
    for d in ("preds", "params"):
        shutil.copytree(run / d, copy / d)
    layout = RunLayout(copy)
    P = load_params(step.AggregateParams, [layout.step_params("aggregate")], {"method": "belief", "run_dir": str(copy)})
    R = step.run(P, prep, log=lambda *a: None, save=False)
    assert R.chosen == "belief" and R.md5["test"].pictures > 0
    train_h, train_img = step.picture_hashes(prep, "train")
    test_h, test_img = step.picture_hashes(prep, "test")
    labels_of = {}  # digest -> the labels of the train pictures with those bytes
    for h, y in zip(train_h, train_img["label"].to_numpy()):
        labels_of.setdefault(h.tobytes(), []).append(int(y))
    final = pd.read_parquet(layout.products("base", "test")).set_index("product_id")["pred_class"]
    belief = R.predictions[("test", "belief")]
    before = pd.Series(belief.pred_class, index=belief.product_id)
    checked = generic = 0
    for pid, g in test_img.assign(key=[h.tobytes() for h in test_h]).groupby("product_id"):
        matched = [labels_of[k] for k in g["key"] if k in labels_of]
        labels = set().union(*matched)
        if len(labels) == 1:  # every matched picture of the product, and every train copy of it, agrees
            assert final[pid] == labels.pop(), pid
            checked += 1
        elif (matched and len(matched) < len(g)  # a picture unknown to train: no product-set match either
              and all(max(np.bincount(m)) / len(m) < P.md5_min_share for m in matched)):
            assert final[pid] == before[pid], pid  # generic pictures only: the lookup says nothing
            generic += 1
    assert checked > 0


def test_contradictions_are_refused_naming_both(pipeline_run):
    from cdkit.base.params import ParamsError, make_params
    from cdkit.steps import pseudo as step09
    from cdkit.steps.train import TrainParams
    run, _, prep = pipeline_run
    with pytest.raises(ParamsError, match=r"one_cycle=True contradicts batch_growth_epochs"):
        make_params(TrainParams, dict(batch_growth_epochs=[1]))
    with pytest.raises(ParamsError, match="valid_frac"):  # only step 02 makes the split
        make_params(TrainParams, dict(valid_frac=0.02))
    P = make_params(step09.PseudoParams, dict(run_dir=str(run), data_dir=str(prep.data_dir), work_dir=str(prep.work_dir),
                                              threshold=0.95, name="pseudo2"))
    with pytest.raises(ParamsError, match=r"threshold=0.95 cannot be reached: .*label_smoothing=0.1"):
        step09.run(P, prep, log=lambda *a: None)
    assert not RunLayout(run).model_dir("pseudo2").joinpath("params.yaml").exists()
    again = make_params(step09.PseudoParams, dict(run_dir=str(run), data_dir=str(prep.data_dir), work_dir=str(prep.work_dir),
                                                  threshold=0.0))
    with pytest.raises(ParamsError, match=r"already holds a run .*overwrite=True"):  # a finished fine-tune is not redone silently
        step09.run(again, prep, log=lambda *a: None)


def test_later_steps_need_step_02(tiny_data, tmp_path):
    from cdkit.data.prepare import SplitMissingError, load_prepared
    with pytest.raises(SplitMissingError, match="run step 02 first"):
        load_prepared(tiny_data, tmp_path / "empty")


def test_a_failing_notebook_is_named_with_its_cell_and_copy(tiny_data, tmp_path):
    with pytest.raises(NotebookFailed, match=r"07_ensemble.ipynb failed in cell \d+ .*open the executed copy .*07_ensemble.ipynb"):
        run_pipeline(tmp_path / "broken", only=["07"], overrides=dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "w")),
                     log=lambda *a: None)


def test_a_dead_kernel_names_the_notebook_and_its_copy(tmp_path):
    import nbformat
    from cdkit.steps.pipeline import run_notebook
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_code_cell("import os\nos._exit(9)  # as the OOM killer would")]
    path = tmp_path / "dies.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(NotebookFailed, match=r"dies.ipynb stopped: DeadKernelError.*open the executed copy .*out.ipynb"):
        run_notebook(path, tmp_path / "out.ipynb", {})


def test_a_run_folder_in_use_is_refused_and_orphans_are_swept(tmp_path):
    import subprocess
    import sys
    from cdkit.base.io import FolderBusyError
    run = tmp_path / "run"
    orphan = run / "products" / ".cdkit-tmp-999999-deadbeef-base_test.parquet"  # a write killed with its process
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cdkit.base.io import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=f"run folder .* is in use by PID {holder.pid}"):
            run_pipeline(run, only=["01"], log=lambda *a: None)
        assert orphan.exists()  # nothing touched while another process holds the folder
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(NotebookFailed):  # now it runs (and 01 fails on the empty data folder)
        run_pipeline(run, only=["01"], overrides=dict(data_dir=str(tmp_path / "nodata"), synth_preset=""),
                     log=lambda *a: None)
    assert not orphan.exists()


def test_kernels_start_without_the_tcp_warning(tmp_path, capfd):
    """The pipeline's kernels talk over Unix sockets, and a plain `papermill` run of an environment set up by
    `make setup` filters the message: no 'running over TCP without encryption' line at every notebook"""
    import os
    import subprocess
    import sys
    import nbformat
    from cdkit.steps.pipeline import KERNEL_TCP_WARNING, install_kernel_config, run_notebook
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_code_cell("print(6 * 7)")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    run_notebook(tmp_path / "nb.ipynb", tmp_path / "out.ipynb", {})
    out, err = capfd.readouterr()  # the kernel writes its log to the stderr it inherits
    assert KERNEL_TCP_WARNING not in out + err
    assert "42" in (tmp_path / "out.ipynb").read_text()
    # the environment's kernel config (make setup writes it under sys.prefix; here a profile of its own)
    conf = install_kernel_config(tmp_path / "ipython" / "profile_default")
    assert install_kernel_config(conf.parent).read_text() == conf.read_text()  # idempotent
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    papermill = [sys.executable, "-m", "papermill", str(tmp_path / "nb.ipynb"), str(tmp_path / "plain.ipynb")]
    p = subprocess.run(papermill, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert KERNEL_TCP_WARNING not in p.stdout + p.stderr


def test_a_demo_seed_reaches_every_step_that_trains_or_draws_but_not_the_split():
    "`cdkit demo seed=2`: the seed of 03-05, 06, 09; 06b's and 08's seed lists shifted to 6..8; step 02's split unchanged"
    from cdkit.steps.pipeline import STEPS, step_parameters
    got = {s.notebook: step_parameters(s.path, (), {"seed": 2}) for s in STEPS}
    for nb in ("03_train_resnet", "04_train_inception", "05_train_xception", "06_predict_tta", "09_pseudo_label_finetune"):
        assert got[nb]["seed"] == 2, nb
    assert got["06b_fusion_head"]["seeds"] == [6, 7, 8] and got["08_belief_aggregation"]["rerank_seeds"] == [6, 7, 8]
    assert "seed" not in got["02_prepare_data"]  # the split is made once for every model of the data
    assert step_parameters(STEPS[6].path, (), {"seed": 2, "seeds": [5]})["seeds"] == [5]  # given lists stay
    assert step_parameters(STEPS[6].path, (), {"seed": 0})["seeds"] == [0, 1, 2]
def test_rerunning_part_of_a_finished_run(pipeline_run):
    """Last here: it reruns steps of the module's run. After a whole run, `--only 06,07,08` runs exactly
    those ("06" is not 06b, whose fusion heads stay untouched), and the report's advice for the stale rows
    that leaves is a command that works (overwrite=true retrains the models of the steps it names only) and
    leaves no stale row"""
    import re
    import shlex
    from cdkit.steps.pipeline import main as pipeline_main
    run, _, prep = pipeline_run
    over = [f"{k}={v}" for k, v in dict(TINY, data_dir=prep.data_dir, work_dir=prep.work_dir).items()]
    heads = sorted((run / "models" / "resnet-fusion").rglob("*"))
    stamp = [p.stat().st_mtime_ns for p in heads]
    assert pipeline_main(["--run-dir", str(run), "--only", "06,07,08", *over]) == 0
    nbs = json.loads((run / "results.json").read_text())["time per notebook (s)"]
    assert [p.stat().st_mtime_ns for p in sorted((run / "models" / "resnet-fusion").rglob("*"))] == stamp
    assert "06b_fusion_head" in nbs  # from the whole run, not rerun (its heads above are the same files)
    report = (run / "report.md").read_text()
    advice = re.search(r"row\(s\) are stale.*?`cdkit demo ([^`]*)`", report, flags=re.S)
    assert advice, report[:500]
    assert pipeline_main(["--run-dir", str(run), *shlex.split(advice.group(1)), *over]) == 0
    assert "are stale" not in (run / "report.md").read_text()
