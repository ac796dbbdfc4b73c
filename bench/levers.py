"""The levers (fusion, ensemble, belief, re-ranker, MD5), measured over seeds on the same validation and test products.

    python bench/levers.py [--seeds 0 1 2] [--recipes kit hierarchy study] [--data data/demo] [--out runs/levers]

For every seed and recipe, one backbone (the demo's ResNet stand-in) is trained and the kit's steps run
in-process exactly as the notebooks call them: 06 (TTA stores and features), 06b (fusion heads), 07
(ensemble of the backbone and its fusion member), 08 (mean, belief, re-ranker, MD5). Recipes:

- kit: the kit's recipe (Adam, one-cycle, label smoothing 0.1, 5 views);
- hierarchy: the same with auxiliary level heads, loss weights 0.8 / 0.1 / 0.1 (rwightman's);
- study: the study's published settings as params/study_resnet101.yaml and study_predict.yaml set them
  (SGD with momentum 0.1, weight decay 1e-4, lr 0.01 stepped to 0.005 and 0.0005, no label smoothing, one
  view: docs/STUDY.md gives each value's source); aggregation is the kit's for every recipe, so that
  each lever is measured on the same steps.

Every figure comes from its own step's outputs in runs/levers/<recipe>-seed<s>/ (each a run folder
with its own report.md). The table gives mean and standard deviation over seeds, validation and test;
`runs/levers/report.md` holds it with the per-seed figures. A lever that does not help shows as such.
The seed changes the backbone's initialisation, the data order, augmentation, the fusion heads and
the re-ranker's folds; the data, the split and therefore the products are the same for every run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {
    "kit": dict(train={}, predict=dict(n_tta=4)),
    "hierarchy": dict(train=dict(hierarchy_weights=[0.8, 0.1, 0.1]), predict=dict(n_tta=4)),
    # params/study_resnet101.yaml and study_predict.yaml as written (docs/STUDY.md gives each value's source),
    # the lr steps moved inside this bench's epochs (study_recipe)
    "study": None,
}


def study_recipe(epochs):
    "The study's training and prediction settings, read from its params files; lr steps at epochs 1 and 2 of 3"
    from cdkit.base.params import read_params_file
    t = read_params_file(ROOT / "params" / "study_resnet101.yaml")
    p = read_params_file(ROOT / "params" / "study_predict.yaml")
    train = {k: t[k] for k in ("optimizer", "momentum", "wd", "one_cycle", "lr", "lr_step_factors", "label_smoothing")}
    train["lr_steps"] = [s for s in (1, 2) if s < epochs][:len(train["lr_step_factors"])]
    train["lr_step_factors"] = train["lr_step_factors"][:len(train["lr_steps"])]
    return dict(train=train, predict=dict(n_tta=p["n_tta"]))
ROWS = [  # (row, where it comes from)
    ("baseline (1 view)", "06"), ("baseline, levels combined (1 view)", "06"), ("+TTA", "06"), ("fusion head, one seed", "06b"), ("fusion member", "06b"),
    ("ensemble with fusion (mean)", "07"), ("mean aggregation", "08"), ("belief aggregation", "08"),
    ("re-ranker (out of fold)", "08"), ("final (+MD5)", "08"), ("level 1 of final", "08"), ("level 2 of final", "08"),
]
# what each row's validation figure is (cdkit.infer.selection): only out-of-fold and held-out ones estimate test
IN_SAMPLE_ROWS = {"fusion head, one seed"}  # the chosen variant's heads: the variant was chosen on these products
HELD_OUT_ROWS = {"baseline (1 view)", "baseline, levels combined (1 view)", "+TTA"}


def valid_kind(row):
    from cdkit.infer.selection import HELD_OUT, IN_SAMPLE, OUT_OF_FOLD
    return IN_SAMPLE if row in IN_SAMPLE_ROWS else HELD_OUT if row in HELD_OUT_ROWS else OUT_OF_FOLD


def one_run(recipe, seed, data, work, out, epochs, max_train_images, log):
    "Train, predict, fuse, ensemble, aggregate one (recipe, seed) into its own run folder; returns {row: {valid, test}}"
    from cdkit.steps.report import write_report
    from cdkit.steps import aggregate, ensemble, fuse, predict, train
    from cdkit.data.prepare import load_prepared
    run = out / f"{recipe}-seed{seed}"
    common = dict(data_dir=str(data), work_dir=str(work), run_dir=str(run))
    prep = load_prepared(data, work)
    r = RECIPES[recipe] or study_recipe(epochs)
    T = train.TrainParams(**common, name="resnet", seed=seed, epochs=epochs, max_train_images=max_train_images,
                          overwrite=True, **r["train"])
    train.record(run, train.run(T))
    Pp = predict.PredictParams(**common, models=["resnet"], seed=seed, **r["predict"])
    Rp = predict.run(Pp, prep, log)
    predict.record(run, Rp)
    Rf = fuse.run(fuse.FuseParams(**common, models=["resnet"], seeds=[seed], overwrite=True), prep, log)
    fuse.record(run, Rf)
    Re = ensemble.run(ensemble.EnsembleParams(**common, models=["resnet", "resnet-fusion"]), prep, log)
    ensemble.record(run, Re)
    Ra = aggregate.run(aggregate.AggregateParams(**common, models=["resnet", "resnet-fusion"], rerank_seeds=[seed]),
                       prep, log)
    aggregate.record(run, Ra)
    write_report(run)
    b = Rp.table.loc["resnet"]
    v = Rf.chosen["resnet"]
    lv = Ra.by_level[Ra.by_level["method"] == "final"].set_index(["split", "level"])["accuracy"]
    rows = {
        "baseline (1 view)": (b["valid 1 view"], b["test 1 view"]),
        "+TTA": (b["valid all views"], b["test all views"]),
        "fusion head, one seed": tuple(Rf.table.loc[("resnet", v, str(seed))]),
        # the member's validation store as step 07 reads it: each fold's products from the variant chosen on the others
        "fusion member": (Rf.member_valid["resnet"], Rf.table.loc[("resnet", v, "blend"), "test"]),
        "ensemble with fusion (mean)": tuple(Re.table.loc["ensemble"]),
        "mean aggregation": (Ra.valid.mean, Ra.test.mean),
        "belief aggregation": (Ra.valid.belief, Ra.test.belief),
        "re-ranker (out of fold)": (Ra.valid.rerank, Ra.test.rerank),
        "final (+MD5)": (Ra.valid.final, Ra.test.final),
        "level 1 of final": (lv.get(("valid", "level1")), lv.get(("test", "level1"))),
        "level 2 of final": (lv.get(("valid", "level2")), lv.get(("test", "level2"))),
    }
    if recipe == "hierarchy":  # the level heads' other use: reweigh each category by its parents at prediction
        rows["baseline, levels combined (1 view)"] = _combined(run, prep)
    return {k: {"valid": float(a), "test": float(t)} for k, (a, t) in rows.items()}, {"fusion variant": v,
                                                                                    "chosen in 08": Ra.chosen}


def _combined(run, prep, weight=1.0):
    "(valid, test) accuracy of the original view with combine_levels=weight, predicted beside the run's stores"
    from cdkit.train.models import load_trained
    from cdkit.infer.predict import StoreSpec, Views, predict_to_store
    from cdkit.steps.predict import store_accuracy
    from cdkit.infer.store import load_store
    tr = load_trained(run / "models" / "resnet", combine_levels=weight)
    out = []
    for split in ("valid", "test"):
        images, bson = prep.images(split)
        path = run / "levels_combined" / f"{split}.store"
        predict_to_store(tr.model, images, bson, path, Views(size=tr.size, item_size=tr.item_size, mean=tr.mean, std=tr.std),
                         StoreSpec(n_classes=tr.n_classes, overwrite=True), device="cpu", progress=False)
        out.append(store_accuracy(load_store(path), prep, split))
    return tuple(out)


def summarise(results) -> pd.DataFrame:
    "rows x (recipe: valid mean, valid sd, test mean, test sd)"
    recs = []
    for (recipe, seed), rows in results.items():
        for row, v in rows.items():
            recs.append(dict(recipe=recipe, seed=seed, row=row, **v))
    df = pd.DataFrame(recs)
    g = df.groupby(["row", "recipe"])[["valid", "test"]]
    out = pd.concat({"mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0), "n": g.count()["valid"].to_frame("seeds")}, axis=1)
    out.columns = [f"{b} {a}" if a != "n" else "seeds" for a, b in out.columns]  # "valid mean", ...
    order = [r for r, _ in ROWS]
    return out.reset_index().assign(o=lambda d: d["row"].map(order.index)).sort_values(["o", "recipe"]).drop(
        columns="o").set_index(["row", "recipe"])


def markdown(summary: pd.DataFrame, extra) -> str:
    lines = ["# Levers over seeds (bench/levers.py)", "",
             "Product accuracy, mean +- sd over seeds; the same validation and test products in every run.", "",
             "| lever | recipe | validation | validation figure | test | seeds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (row, recipe), r in summary.iterrows():
        lines.append(f"| {row} | {recipe} | {r['valid mean']:.4f} +- {r['valid sd']:.4f} | {valid_kind(row)} | "
                     f"{r['test mean']:.4f} +- {r['test sd']:.4f} | {int(r['seeds'])} |")
    lines += ["", "Per run: " + "; ".join(f"{k}: {v}" for k, v in extra.items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--data", default="data/demo", help="a data set (the demo's synthetic one is made if missing)")
    ap.add_argument("--work", default=None, help="its prepared folder (default: <data>_prepared)")
    ap.add_argument("--out", default="runs/levers")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-train-images", type=int, default=3000)
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in <out>/results.json")
    a = ap.parse_args(argv)
    from cdkit.base.io import atomic_write
    from cdkit.base.paths import resolve
    from cdkit.steps import prepare
    from cdkit.data.synth import ensure_data
    data, out = resolve(a.data), resolve(a.out)
    work = resolve(a.work or f"{a.data}_prepared")
    ensure_data(data, "demo", 0, print)
    prepare.run(prepare.PrepareParams(data_dir=str(data), work_dir=str(work)), log=print)
    results, extra, t0 = {}, {}, time.time()
    done = json.loads((out / "results.json").read_text()) if a.resume and (out / "results.json").exists() else {}
    for seed in a.seeds:
        for recipe in a.recipes:
            if f"{recipe}-seed{seed}" in done:  # --resume: a run of an interrupted bench is not repeated
                results[(recipe, seed)], extra[f"{recipe}-seed{seed}"] = done[f"{recipe}-seed{seed}"], "reused"
                continue
            t = time.time()
            results[(recipe, seed)], extra[f"{recipe}-seed{seed}"] = one_run(
                recipe, seed, data, work, out, a.epochs, a.max_train_images, lambda *x: None)
            print(f"{recipe} seed {seed}: {time.time() - t:.0f} s; final test "
                  f"{results[(recipe, seed)]['final (+MD5)']['test']:.4f}", flush=True)
            summary = summarise(results)  # written after every run: a long bench killed midway keeps what it did
            atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(
                {f"{r}-seed{s}": v for (r, s), v in results.items()}, indent=1)))
            atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(markdown(summary, extra)))
    pd.set_option("display.width", 200)
    print(summarise(results).round(4).to_string())
    print(f"\n{len(results)} runs in {(time.time() - t0) / 60:.1f} min; {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
