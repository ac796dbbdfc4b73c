"""The study's recipe: docs/STUDY.md's table against params/study_*.yaml, and batch growth that follows the lr
schedule it replaces."""
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cdkit.train.callbacks import BatchGrowth, GradAccum, grown_batch
from cdkit.base.params import ParamsError, load_params, make_params

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs" / "STUDY.md"


def study_table():
    "Rows of docs/STUDY.md's settings table: dicts setting, files, key, value (parsed YAML or None), source"
    lines = STUDY.read_text().splitlines()
    start = lines.index("## The table")
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| setting |"))
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"): break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 5, f"docs/STUDY.md: a row needs 5 cells: {line}"
        setting, files, key, value, source = cells
        files = [] if files == "—" else [f.strip() for f in files.split(",")]
        parsed = yaml.safe_load(value.strip("`")) if value != "—" else None
        rows.append(dict(setting=setting, files=files, key=key, value=parsed, source=source))
    return rows


def effective(name):
    "The parameters params/study_<name>.yaml runs with, layered over params/cdiscount.yaml as the README says"
    from cdkit.steps.pipeline import notebook_for_params, params_class
    f = ROOT / "params" / f"study_{name}.yaml"
    return load_params(params_class(notebook_for_params(f)), [ROOT / "params" / "cdiscount.yaml", f])


def test_study_files_follow_the_table():
    rows = study_table()
    files = sorted(p.stem[len("study_"):] for p in (ROOT / "params").glob("study_*.yaml"))
    assert files, "no params/study_*.yaml"
    covered = {f: set() for f in files}
    for r in rows:
        assert r["source"], f"docs/STUDY.md: {r['setting']} has no source"
        for f in r["files"]:
            assert f in covered, f"docs/STUDY.md names params/study_{f}.yaml, which does not exist"
            got = getattr(effective(f), r["key"])
            assert got == r["value"], f"params/study_{f}.yaml: {r['key']} = {got!r}, docs/STUDY.md says {r['value']!r}"
            covered[f].add(r["key"])
    for f in files:  # every setting a study file makes has its row (its source)
        keys = set(yaml.safe_load((ROOT / "params" / f"study_{f}.yaml").read_text()))
        missing = keys - covered[f] - {"name"}  # a model's folder name is the kit's naming, not a setting
        assert not missing, f"params/study_{f}.yaml sets {sorted(missing)} without a row in docs/STUDY.md"
    # the kit's own choices say so; every other source cites the write-up or a file of the authors' code
    cited = re.compile(r"README|poster|(trainer|trainer_pseudo|StepLR|StepAlpha|test_ensemble_final)\.py")
    for r in rows:
        assert r["source"].startswith("kit's choice") or cited.search(r["source"]), r


def test_study_recipe_as_published():
    "The published numbers the former files got wrong: momentum, members, views, belief, fine-tune optimizer, alpha"
    for name in ("resnet101", "inception_v3", "xception", "seresnet50"):
        P = effective(name)
        assert (P.optimizer, P.momentum, P.wd, P.lr) == ("sgd", 0.1, 1e-4, 0.01)
    members = ["study_resnet101", "study_inception_v3", "study_xception"]
    assert effective("predict").models == members and effective("predict").n_tta == 0
    assert effective("ensemble").models == members == effective("aggregate").models
    A = effective("aggregate")
    assert (A.belief, A.m, A.rule, A.score, A.all_excluded, A.min_preds, A.atol) == ("authors", 1, "ratio", "mean", "mean", 2, 0.0)
    Q = effective("pseudo")
    assert (Q.optimizer, Q.momentum, Q.wd, Q.one_cycle, Q.lr, Q.lr_steps, Q.lr_step_factors) == \
        ("sgd", 0.1, 1e-4, False, 0.01, [1, 3], [0.5, 0.05])
    assert (Q.alpha_form, Q.alpha_final, Q.alpha_min, Q.T1, Q.T2, Q.pseudo_per_labeled) == ("authors", 2.0, 0.5, 0.5, 2.0, 3.0)


# ---- batch growth instead of lr decay ----

def test_study_growth_replaces_the_lr_steps():
    "SE-ResNet-50's effective batch grows by the inverse of each lr step the other models take: x2, then x10"
    S = effective("seresnet50")
    R = effective("resnet101")
    assert S.batch_growth_epochs == R.lr_steps
    for epoch in range(S.epochs):
        bs, acc = grown_batch(epoch, S.bs, S.acc_steps, S.batch_growth_epochs, S.batch_growth_factor, S.max_bs)
        lr_factor = next((f for e, f in zip(reversed(R.lr_steps), reversed(R.lr_step_factors)) if epoch >= e), 1.0)
        assert bs * acc == pytest.approx(S.bs * S.acc_steps / lr_factor) and bs <= S.max_bs
    assert [grown_batch(e, 160, 2, [1, 3], [2, 10], 160) for e in range(5)] == \
        [(160, 2), (160, 4), (160, 4), (160, 40), (160, 40)]


@settings(max_examples=40, deadline=None)
@given(factors=st.lists(st.integers(2, 12), min_size=1, max_size=3), bs=st.integers(1, 8), acc=st.integers(1, 4),
       data=st.data())
def test_grown_batch_multiplies_by_each_reached_factor(factors, bs, acc, data):
    epochs = sorted(data.draw(st.sets(st.integers(1, 9), min_size=len(factors), max_size=len(factors))))
    epoch = data.draw(st.integers(0, 10))
    want = bs * acc
    for e, f in zip(epochs, factors):  # the definition: the factor of every growth epoch reached so far
        if epoch >= e: want *= f
    b, a = grown_batch(epoch, bs, acc, epochs, factors)
    assert b * a == want and a == acc  # without max_bs the batch itself grows
    b, a = grown_batch(epoch, bs, acc, epochs, factors, max_bs=bs)
    assert (b, a) == (bs, want // bs)  # with it, accumulation grows
    assert grown_batch(epoch, bs, acc, epochs, factors[0]) == grown_batch(epoch, bs, acc, epochs, [factors[0]] * len(epochs))


def test_batch_growth_callback_with_a_factor_per_step():
    from test_callbacks import Trace, tiny_dls, tiny_learner
    dls = tiny_dls(n=48, bs=2)
    learn = tiny_learner(dls, [GradAccum(1), BatchGrowth(epochs=[1, 2], factor=[2, 3], max_bs=2), Trace()])
    learn.fit(3, lr=0.1)
    assert learn.batch_growth.history == [(0, 2, 1), (1, 2, 2), (2, 2, 6)]
    assert learn.trace.steps == {0: 24, 1: 12, 2: 4}  # effective batch 2, 4, 12 over 48 samples
    with pytest.raises(ValueError, match="growth factors"):
        BatchGrowth(epochs=[1, 2], factor=[2])


def test_growth_factor_params():
    from cdkit.steps.train import TrainParams
    P = make_params(TrainParams, dict(one_cycle=False, epochs=4, batch_growth_epochs=[1, 3], batch_growth_factor=[2, 10]))
    assert P.batch_growth_factor == [2, 10]
    with pytest.raises(ParamsError, match="one factor per epoch"):
        make_params(TrainParams, dict(one_cycle=False, epochs=4, batch_growth_epochs=[1, 3], batch_growth_factor=[2]))
    with pytest.raises(ParamsError, match="batch_growth_factor"):
        make_params(TrainParams, dict(one_cycle=False, epochs=4, batch_growth_epochs=[1], batch_growth_factor=[1]))
