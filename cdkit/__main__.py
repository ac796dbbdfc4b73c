"""Command line: `python -m cdkit <command> ...` (also installed as `cdkit`)."""
from __future__ import annotations

import argparse
import sys


def _synth(a):
    from .synth import write_dataset
    summary = write_dataset(a.out_dir, preset=a.preset, seed=a.seed)
    print(f"wrote {a.out_dir}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))


def _index(a):
    from pathlib import Path
    from .bsonfile import build_index
    out = a.out or str(Path(a.bson).with_suffix("")) + "_index.parquet"
    _, stats = build_index(a.bson, out=out, return_stats=True)
    print(stats.summary())
    print(f"index written to {out}")


def _prepare(a):
    from .prepare import prepare_data, summary_table
    prep = prepare_data(a.data_dir, a.work_dir, valid_frac=a.valid_frac, seed=a.seed, force=a.force)
    print(summary_table(prep).to_string())


# commands implemented by a module's own main(argv), which parses its own arguments
PASSTHROUGH = {
    "train": ("train", "train one model: --params FILE [key=value ...]"),
    "predict": ("predict", "streaming TTA prediction into a prediction store"),
    "pseudo": ("pseudo", "pseudo-label fine-tuning"),
    "submit": ("submission", "validate and submit a submission file to Kaggle"),
    "demo": ("pipeline", "run every notebook on the synthetic demo data (make demo)"),
    "pipeline": ("pipeline", "run the notebooks of the pipeline with papermill"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        module, _ = PASSTHROUGH[argv[0]]
        import importlib
        mod = importlib.import_module(f"cdkit.{module}")
        fn = getattr(mod, f"{argv[0]}_main", None) or mod.main
        return fn(argv[1:])
    p = argparse.ArgumentParser(prog="python -m cdkit", description=__doc__,
                                epilog="more: " + "; ".join(f"{k}: {h}" for k, (_, h) in PASSTHROUGH.items()))
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic data set in the competition's format")
    s.add_argument("out_dir")
    s.add_argument("--preset", default="demo", choices=["tiny", "demo", "bench"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_synth)
    s = sub.add_parser("index", help="index a competition BSON file (Parquet) and print its summary")
    s.add_argument("bson")
    s.add_argument("--out", help="Parquet path (default: next to the BSON file, <name>_index.parquet)")
    s.set_defaults(fn=_index)
    s = sub.add_parser("prepare", help="index train/test, make the validation split (step 02)")
    s.add_argument("data_dir")
    s.add_argument("work_dir")
    s.add_argument("--valid-frac", type=float, default=0.02)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=_prepare)
    for name, (_, h) in PASSTHROUGH.items():
        sub.add_parser(name, help=h)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
