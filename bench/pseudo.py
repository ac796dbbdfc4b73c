"""Does pseudo-label fine-tuning help? Product accuracy on the synthetic test set before and after,
with the train/test shift off and on, over several seeds (CPU-sized: small model, small input).

Per (seed, shift) the pipeline's own steps run: 02 (split), 03 (a base model), 06 (its stores, no
TTA), 07 and 08 (one member, mean aggregation, no MD5: the pseudo-label effect alone), then step 09
twice from the same base, with the same labels, batches, steps and learning rate:
    control   alpha_final = 0: pseudo-labeled test pictures are in every batch (BatchNorm sees them)
              but their loss weighs nothing, so any gain here is extra training + BN statistics;
    pseudo    alpha_final = 0.3 (the authors'): the pseudo-label loss counts.
Each arm's figure is step 09's stage `pseudo` product accuracy; pseudo - control is the effect of the
pseudo-label loss itself.

    .venv/bin/python bench/pseudo.py --seeds 0 1 2 --shifts 0 0.5 --out /tmp/pbench
    (a shared 2-core CPU: --seeds 0 --base-epochs 3 --max-train-images 3000 --epochs 2, ~15 min per shift)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--preset", default="demo")
    p.add_argument("--out", default="/tmp/pbench", help="data sets and runs go here")
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--base-epochs", type=int, default=6)
    p.add_argument("--max-train-images", type=int, default=None, help="base model: train on this many pictures (whole products)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (one pass over the pseudo pictures each)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=0)
    a = p.parse_args(argv)

    from cdkit.base.params import make_params
    from cdkit.steps import aggregate, ensemble, predict, prepare, pseudo, train
    from cdkit.data.synth import write_dataset
    out = Path(a.out)
    rows = []
    quiet = dict(log=lambda *_: None)
    for seed in a.seeds:
        for shift in a.shifts:
            data = out / f"s{seed}_shift{shift}"
            if not (data / "synth.json").exists():
                write_dataset(data, preset=a.preset, seed=seed, shift=shift)
            folders = dict(data_dir=str(data), work_dir=f"{data}_prep", run_dir=str(out / f"run_s{seed}_shift{shift}"))
            prepare.run(make_params(prepare.PrepareParams, dict(data_dir=folders["data_dir"], work_dir=folders["work_dir"])), **quiet)
            t = time.time()
            if "base" not in train.RunLayout.of(folders["run_dir"]).model_names():
                train.run(make_params(train.TrainParams, dict(folders, name="base", arch=a.arch, item_size=176, size=a.size,
                                                              bs=64, max_train_images=a.max_train_images, epochs=a.base_epochs,
                                                              lr=2e-3, num_workers=a.num_workers, mixed_precision="none",
                                                              channels_last=False, seed=seed)))
            row = dict(seed=seed, shift=shift, base_s=round(time.time() - t))
            one = dict(folders, models=["base"])
            before = predict.run(make_params(predict.PredictParams, dict(one, n_tta=0, num_workers=a.num_workers)), **quiet)
            ensemble.run(make_params(ensemble.EnsembleParams, one), **quiet)
            agg = aggregate.run(make_params(aggregate.AggregateParams, dict(one, method="mean", md5=False, md5_products=False)), **quiet)
            row.update(valid_before=before.table.loc["base", "valid 1 view"], test_before=before.table.loc["base", "test 1 view"],
                       valid_base_products=agg.accuracy.loc["final", "valid"])
            for arm, alpha in (("control", 0.0), ("pseudo", 0.3)):
                P = make_params(pseudo.PseudoParams, dict(folders, name=f"{arm}", base="base", threshold=a.threshold,
                                                          alpha_final=alpha, epochs=a.epochs, lr=a.lr, bs=32,
                                                          num_workers=a.num_workers, seed=seed, device="cpu"))
                res = pseudo.run(P, **quiet)
                s = res.selection_summary.iloc[0]
                row.update({f"valid_{arm}": res.aggregate.accuracy.loc["final", "valid"],
                            f"test_{arm}": res.aggregate.accuracy.loc["final", "test"],
                            "chosen": int(s["chosen"]), "precision": s.get("precision"), f"{arm}_s": round(res.seconds)})
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    df["pseudo_minus_before"] = df["test_pseudo"] - df["test_before"]
    df["pseudo_minus_control"] = df["test_pseudo"] - df["test_control"]
    df.to_csv(out / "pseudo_bench.csv", index=False)
    cols = ["seed", "shift", "chosen", "precision", "valid_before", "valid_control", "valid_pseudo",
            "test_before", "test_control", "test_pseudo", "pseudo_minus_before", "pseudo_minus_control"]
    print(df[cols].round(4).to_markdown(index=False) if _has_tabulate() else df[cols].round(4).to_string(index=False))
    print(df.groupby("shift")[cols[4:]].mean().round(4).to_string())


def _has_tabulate():
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
