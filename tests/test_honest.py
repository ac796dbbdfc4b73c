"""Validation figures that hold no in-sample fit or choice: planted signals that only the products'
own labels explain, measured the old way (fitted or chosen on all of validation) and the kit's way
(inside folds), against what test shows"""
import numpy as np
import pandas as pd
import pytest

from cdkit.infer.ensemble import combine, combine_out_of_fold, fit_weights
from cdkit.infer.selection import IN_SAMPLE, OUT_OF_FOLD, choose_per_fold, validation_folds
from cdkit.infer.store import PredStore, save_store

C = 10  # classes of the library-level constructions


def store(pid, cls, p, n_classes=C, img_idx=None):
    "One view, top-1 only: class `cls` at probability `p` per row, the rest spread over the other classes"
    n = len(pid)
    prob = np.asarray(p, np.float32).reshape(n, 1, 1)
    return PredStore(np.asarray(pid, np.int64), np.zeros(n, np.int8) if img_idx is None else np.asarray(img_idx, np.int8),
                     np.asarray(cls).reshape(n, 1, 1).astype(np.uint16), prob, (1 - prob[:, :, 0]).astype(np.float32),
                     n_classes)


def top1(s, y):
    return float((s.cls[:, 0, 0] == y).mean())


def planted_members(pid, true, fold_of, test_pid, test_true, rng, n_classes=C):
    """An honest member, right on every other product of validation and test at probability 0.3, and one
    memorizer per fold of validation products: the truth at 0.95 on its fold's products, a class at the
    uniform probability elsewhere and on every test product (what a member fitted on those products does).
    Weights fitted on all validation trust the memorizers (each explains its fold); weights fitted without a
    fold see its memorizer explain nothing."""
    def honest(ids, y):
        right = np.arange(len(ids)) % 2 == 0
        return store(ids, np.where(right, y, (y + 1 + rng.integers(0, n_classes - 1, len(y))) % n_classes),
                     np.full(len(ids), 0.3), n_classes)
    valid, test = [honest(pid, true)], [honest(test_pid, test_true)]
    for f in np.unique(fold_of):
        c, p = rng.integers(0, n_classes, len(pid)), np.full(len(pid), 1 / n_classes)
        c[fold_of == f], p[fold_of == f] = true[fold_of == f], 0.95
        valid.append(store(pid, c, p, n_classes))
        test.append(store(test_pid, rng.integers(0, n_classes, len(test_pid)), np.full(len(test_pid), 1 / n_classes),
                          n_classes))
    return valid, test


def test_out_of_fold_weights_keep_the_validation_figure_honest():
    "The planted memorizers: in-sample weights make validation perfect and test chance; out of fold it is chance on both"
    rng = np.random.default_rng(0)
    n = 100
    pid, test_pid = np.arange(n) + 1000, np.arange(n) + 5000
    true, test_true = rng.integers(0, C, n), rng.integers(0, C, n)
    folds = validation_folds(pid)
    valid, test = planted_members(pid, true, folds.reindex(pid).to_numpy(), test_pid, test_true, rng)
    w = fit_weights(valid, true)  # the old way: all of validation, then applied to validation and test
    naive, on_test = top1(combine(valid, w), true), top1(combine(test, w), test_true)
    oof, per_fold = combine_out_of_fold(valid, true, folds)
    honest = top1(oof, true)
    # chance is 0.1: the planted effect is 0.9 wide, noise on 100 products about 0.03
    assert naive >= 0.95 and on_test <= 0.3, (naive, on_test)
    assert abs(honest - on_test) <= 0.15, (honest, on_test)
    # each fold's weights were fitted without it: its own memorizer got nothing
    for f, wf in per_fold.items():
        assert wf[1 + f] == 0 and wf.sum() == pytest.approx(1)
    assert oof.meta["ensemble"]["out_of_fold"] and len(oof) == n


def test_a_choice_inside_folds_scores_what_the_chosen_option_does_on_new_products():
    """Exact construction (no noise): options 'honest' (right on half of every fold) and one memorizer per fold
    (right on its fold and on 8 of the 20 products of each other fold, 0.4 on new products). On all of
    validation a memorizer wins with 0.52; chosen per fold, each fold is scored by another fold's memorizer: 0.4"""
    n_folds, per = 5, 20
    pid = np.arange(n_folds * per) + 7
    folds = validation_folds(pid, n_folds)
    fold = folds.reindex(pid).to_numpy()
    pos = np.zeros(len(pid), np.int64)  # position of each product within its fold
    for f in range(n_folds):
        pos[fold == f] = np.arange(per)
    correct = {"honest": (pos % 2 == 0).astype(float)}
    for f in range(n_folds):
        correct[f"memorizer {f}"] = np.where(fold == f, 1.0, (pos < 8).astype(float))
    chosen, per_fold, pick, honest, in_sample = choose_per_fold(pd.DataFrame(correct, index=pid), folds)
    on_test = 0.4  # a memorizer on new products: right on 40% by construction
    assert chosen == "memorizer 0" and in_sample == pytest.approx(0.52)
    assert all(per_fold[f] != f"memorizer {f}" for f in range(n_folds))
    assert honest == pytest.approx(on_test) and in_sample - on_test >= 0.1
    assert set(pick.index) == set(pid)


def test_validation_folds_depend_on_the_product_ids_alone():
    ids = np.array([50, 3, 17, 9, 41, 23, 8, 11, 30, 2])
    a = validation_folds(ids)
    b = validation_folds(ids[::-1])
    assert a.equals(b) and sorted(np.bincount(a.to_numpy())) == [2] * 5
    with pytest.raises(ValueError, match="at least 2"):
        validation_folds([4])


# ---- the steps: 07 writes an out-of-fold validation store, 08 reads it and chooses inside folds ----

@pytest.fixture(scope="module")
def planted_run(tiny_data, tmp_path_factory):
    "Half of the tiny data set's train products as validation, and the planted members' stores on its pictures"
    from cdkit.data.prepare import create_prepared
    from cdkit.runs import RunLayout
    work = tmp_path_factory.mktemp("work")
    prep = create_prepared(tiny_data, work, valid_frac=0.5, log=lambda *a: None)
    run = tmp_path_factory.mktemp("runs") / "planted"
    layout = RunLayout.of(run)
    truth = {s: prep.truth(s) for s in ("valid", "test")}
    n_classes = prep.catalog.n_classes
    folds = validation_folds(truth["valid"].index)
    rng = np.random.default_rng(1)
    pids = {s: truth[s].index.to_numpy(np.int64) for s in truth}
    valid, test = planted_members(pids["valid"], truth["valid"].to_numpy(), folds.reindex(pids["valid"]).to_numpy(),
                                  pids["test"], truth["test"].to_numpy(), rng, n_classes)
    names = ["honest"] + [f"memorizer{f}" for f in range(len(valid) - 1)]
    for split, members in (("valid", valid), ("test", test)):
        images, _ = prep.images(split)
        for name, s in zip(names, members):
            # every picture of a product carries its product's prediction
            row = pd.Series(np.arange(len(s)), index=s.product_id).reindex(images["product_id"]).to_numpy()
            save_store(store(images["product_id"].to_numpy(), s.cls[row, 0, 0], s.prob[row, 0, 0], n_classes,
                             images["img_idx"].to_numpy()), layout.store(name, split))
    common = dict(data_dir=str(tiny_data), work_dir=str(work), run_dir=str(run), models=names)
    return prep, layout, common


def test_steps_07_and_08_report_the_planted_members_honestly(planted_run):
    from cdkit.infer.aggregate import aggregate_stores
    from cdkit.steps import aggregate as step08
    from cdkit.steps import ensemble as step07
    from cdkit.infer.store import load_store
    prep, layout, common = planted_run
    quiet = lambda *a: None  # noqa: E731
    R7 = step07.run(step07.EnsembleParams(**common), prep, quiet, save=False)
    valid, test = R7.table.loc["ensemble", "valid"], R7.table.loc["ensemble", "test"]
    # the old figure: the weights fitted on all of validation, applied to validation
    members = [load_store(layout.store(m, "valid")) for m in common["models"]]
    naive_store = combine(members, weights=R7.weights.to_numpy())
    naive = prep.accuracy(*_products(aggregate_stores([naive_store], "mean")), "valid")
    assert naive >= 0.9 and R7.in_sample == pytest.approx(naive) and test <= 0.35, (naive, test)
    assert abs(valid - test) <= 0.2, (valid, test)
    saved = load_store(layout.ensemble_store("base", "valid"))
    assert saved.meta["ensemble"]["out_of_fold"]  # what step 08 reads
    # step 08 aggregates that store and chooses inside folds: its figures stay near test too
    P8 = step08.AggregateParams(**common, md5=False, md5_products=False, rerank=False)
    R8 = step08.run(P8, prep, quiet, save=False)
    for row in ("mean", "belief", "final"):
        assert abs(R8.accuracy.loc[row, "valid"] - R8.accuracy.loc[row, "test"]) <= 0.2, R8.accuracy
    assert R8.chosen_per_fold is not None and set(R8.chosen_per_fold.values()) <= {"mean", "belief"}


def _products(pp):
    return pp.product_id, pp.pred_class


def test_report_labels_each_validation_figure(planted_run):
    from cdkit.steps.report import VALID_IS, load_results, write_report
    from cdkit.steps import aggregate as step08
    from cdkit.steps import ensemble as step07
    prep, layout, common = planted_run
    quiet = lambda *a: None  # noqa: E731
    step07.record(layout.root, step07.run(step07.EnsembleParams(**common), prep, quiet, save=False))
    step08.record(layout.root, step08.run(step08.AggregateParams(**common, md5=False, md5_products=False, rerank=False),
                                          prep, quiet, save=False))
    res = load_results(layout.root)
    assert res["study"]["ensemble (+TTA)"][VALID_IS] == OUT_OF_FOLD
    assert res["07 ensemble (base)"]["ensemble, weights fitted on all of validation"][VALID_IS] == IN_SAMPLE
    sec = res["08 aggregation (base)"]
    chosen = sec["chosen on validation"]
    assert sec[f"final, {chosen} chosen on all of validation"][VALID_IS] == IN_SAMPLE
    assert all(v[VALID_IS] == OUT_OF_FOLD for v in sec["product accuracy"].values())
    text = write_report(layout.root).read_text()
    assert "| validation figure |" in text and f"| {OUT_OF_FOLD} |" in text and IN_SAMPLE in text


# ---- stage pseudo's members ----

def test_stage_pseudo_leaves_out_the_base_models_fusion_member():
    from cdkit.steps.pseudo import pseudo_members
    models = ["resnet", "inception", "xception", "resnet-fusion", "inception-fusion", "xception-fusion"]
    got = pseudo_members(models, "resnet", "pseudo")
    assert got == ["pseudo", "inception", "xception", "inception-fusion", "xception-fusion"]
    assert pseudo_members(["resnet", "inception"], "resnet", "pseudo") == ["pseudo", "inception"]


# ---- the data loaders' default ----

def test_make_dataloaders_trains_on_neither_validation_nor_fusion_products(tiny_data, tmp_path):
    from cdkit.data.loaders import make_dataloaders
    from cdkit.data.prepare import create_prepared
    prep = create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, fusion_frac=0.2, log=lambda *a: None)
    images = prep.train_images()
    assert prep.fusion_mask(images).any()
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, size=32, item_size=32, bs=4, device="cpu")
    assert set(dls.train.dataset.product_id) == set(images["product_id"][prep.train_mask(images)])
    assert set(dls.valid.dataset.product_id) == set(images["product_id"][prep.valid_mask(images)])
    # told otherwise, it trains on what it is told
    every = ~prep.valid_mask(images)
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, size=32, item_size=32, bs=4, device="cpu",
                           train_mask=every)
    assert set(dls.train.dataset.product_id) == set(images["product_id"][every])
    with pytest.raises(ValueError, match="share"):
        make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, device="cpu",
                         train_mask=np.ones(len(images), bool))


# ---- step 06b: the fusion member's validation store made per fold ----

def test_fusion_variant_rows_come_from_the_variant_chosen_on_the_other_folds():
    "Two variants' blends over the same pictures (stored in different row orders): each product's rows from its pick"
    from cdkit.infer.selection import pick_rows
    pid = np.repeat(np.arange(6) + 40, 2)
    img = np.tile([0, 1], 6)
    aware = PredStore(pid, img.astype(np.int8), np.full((12, 1, 1), 1, np.uint16), np.full((12, 1, 1), 0.5, np.float32),
                      np.full((12, 1), 0.5, np.float32), C)
    order = np.arange(12)[::-1]  # the other variant lists the same pictures backwards
    invariant = PredStore(pid[order], img[order].astype(np.int8), np.full((12, 1, 1), 2, np.uint16),
                          np.full((12, 1, 1), 0.7, np.float32), np.full((12, 1), 0.3, np.float32), C)
    pick = pd.Series(["aware", "invariant", "aware", "invariant", "invariant", "aware"], index=np.arange(6) + 40)
    out = pick_rows({"aware": aware, "invariant": invariant}, pick)
    assert np.array_equal(out.product_id, pid) and np.array_equal(out.img_idx, img)
    want = np.where(pick.reindex(pid).to_numpy() == "aware", 1, 2)
    assert np.array_equal(out.cls[:, 0, 0], want)
    assert np.allclose(out.prob[:, 0, 0], np.where(want == 1, 0.5, 0.7))
    assert (aware.cls == 1).all()  # the variants' own stores are left as they were
