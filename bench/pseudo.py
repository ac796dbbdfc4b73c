"""Does pseudo-label fine-tuning help? Product accuracy on the synthetic test set before and after,
with the train/test shift off and on, over several seeds (CPU-sized: small model, small input).

Per (seed, shift): a base model is trained with cdkit.train, then fine-tuned twice from it with the
same batches, steps and learning rate:
    control   alpha_final = 0: pseudo-labeled test pictures are in every batch (BatchNorm sees them)
              but their loss weighs nothing, so any gain here is extra training + BN statistics;
    pseudo    alpha_final = 0.3 (the authors'): the pseudo-label loss counts.
The difference pseudo - control is the effect of the pseudo-label loss itself.

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

    from cdkit.pseudo import PseudoParams, run_pseudo
    from cdkit.synth import write_dataset
    from cdkit.train import TrainParams, train
    out = Path(a.out)
    rows = []
    for seed in a.seeds:
        for shift in a.shifts:
            data = out / f"s{seed}_shift{shift}"
            if not (data / "synth.json").exists():
                write_dataset(data, preset=a.preset, seed=seed, shift=shift)
            work, runs, base = Path(f"{data}_prep"), out / "runs", f"base_s{seed}_shift{shift}"
            t = time.time()
            if not (runs / base / "model.json").exists():
                train(TrainParams(run_name=base, runs_dir=str(runs), data_dir=str(data), work_dir=str(work), arch=a.arch,
                                  item_size=176, size=a.size, bs=64, max_train_images=a.max_train_images, acc_steps=1, epochs=a.base_epochs, lr=2e-3,
                                  num_workers=a.num_workers, mixed_precision="none", channels_last=False, seed=seed))
            base_s = time.time() - t
            row = dict(seed=seed, shift=shift, base_s=round(base_s))
            for arm, alpha in (("control", 0.0), ("pseudo", 0.3)):
                P = PseudoParams(run_name=f"{arm}_s{seed}_shift{shift}", from_run=str(runs / base), data_dir=str(data),
                                 work_dir=str(work), runs_dir=str(runs), threshold=a.threshold, alpha_final=alpha,
                                 epochs=a.epochs, lr=a.lr, bs=32, num_workers=a.num_workers, seed=seed, device="cpu")
                res = run_pseudo(P, log_fn=lambda *_: None)
                m = res.metrics.set_index(["stage", "split"])["accuracy"]
                s = res.reports[0][1].iloc[0]
                row.update({"valid_before": m[("before", "valid")], "test_before": m[("before", "test")],
                            f"valid_{arm}": m[("after", "valid")], f"test_{arm}": m[("after", "test")],
                            "chosen": int(s["chosen"]), "precision": s["precision"], f"{arm}_s": round(res.seconds)})
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
