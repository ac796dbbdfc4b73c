"""The demo's figures over seeds: `make demo` (cdkit.steps.pipeline.run_pipeline on data/demo) once per seed, each
run in its own folder runs/demo-seed<N>, then every row of the report's study table as mean +- sd over the
seeds, on validation and on test, with the machine it ran on.

    python bench/demo_seeds.py --seeds 0 1 2                 # about 15 min a seed on 2 CPU cores
    python bench/demo_seeds.py --seeds 0 1 --table           # the table of runs already made
    python bench/demo_seeds.py --seeds 0 1 --run-root /tmp/s synth_preset=tiny data_dir=/tmp/s/tiny \\
        work_dir=/tmp/s/work epochs=1 n_tta=1 arch=resnet10t size=32 max_train_images=400   # a quick check

`seed=N` is what `cdkit demo seed=N` passes: every training notebook's seed (03-05, the fine-tune of 09),
the TTA draws of 06, the seed lists of 06b's fusion heads and 08's re-rankers (shifted to 3N..3N+2); not
step 02's split, made once for the data, so every seed scores the same validation and test products.
key=value arguments go to every notebook that declares the key, as `cdkit demo` takes them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    "CPU model (from /proc/cpuinfo), cores, torch version"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        version = torch.__version__
    except ImportError:
        version = "absent"
    return f"{cpu}, {os.cpu_count()} cores, torch {version}"


def seed_table(studies: dict) -> list:
    """[(row, split, mean, sd, n)] over {seed: results['study']} for each row of the report's study table
    (sd with n - 1; 0 for one seed); rows or splits no seed recorded are left out"""
    from cdkit.steps.report import STUDY_ROWS
    out = []
    for row, _ in STUDY_ROWS:
        for split in ("valid", "test"):
            xs = [s[row][split] for s in studies.values()
                  if isinstance(s.get(row), dict) and isinstance(s[row].get(split), (int, float))]
            if xs:
                out.append((row, split, statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)))
    return out


def render(studies: dict) -> str:
    seeds = ", ".join(str(s) for s in studies)
    lines = [f"Demo over seeds {seeds} ({len(studies)} runs); machine: {machine()}", "",
             "| step | validation accuracy (mean +- sd) | test accuracy (mean +- sd) |", "| --- | --- | --- |"]
    rows = {}
    for row, split, mean, sd, n in seed_table(studies):
        rows.setdefault(row, {})[split] = f"{mean:.4f} +- {sd:.4f}" + (f" ({n} seeds)" if n != len(studies) else "")
    lines += [f"| {row} | {v.get('valid', 'n/a')} | {v.get('test', 'n/a')} |" for row, v in rows.items()]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--run-root", default="runs", help="folder of the run folders demo-seed<N>")
    ap.add_argument("--table", action="store_true", help="only the table, from run folders already made")
    ap.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    ap.add_argument("overrides", nargs="*", help="key=value for every notebook that declares key (as `cdkit demo`)")
    a = ap.parse_args(argv)
    from cdkit.base.params import parse_overrides
    from cdkit.base.paths import resolve
    overrides = parse_overrides(a.overrides)
    if "seed" in overrides:
        ap.error("seed=... is set per run by --seeds")
    runs = {s: resolve(a.run_root) / f"demo-seed{s}" for s in a.seeds}
    for s, run in runs.items():
        args = {**overrides, "seed": s, "overwrite": True}
        if a.dry_run:
            print(f"seed {s}: run_pipeline({run}, overrides={args})")
        elif not a.table:
            from cdkit.steps.pipeline import run_pipeline
            print(f"== seed {s} -> {run}", flush=True)
            run_pipeline(run, overrides=args)
    if a.dry_run:
        return 0
    studies = {}
    for s, run in runs.items():
        path = run / "results.json"
        if not path.exists():
            print(f"seed {s}: no {path} (run it without --table first)", file=sys.stderr)
            return 1
        studies[s] = json.loads(path.read_text()).get("study", {})
    text = render(studies)
    print(text)
    from cdkit.base.io import atomic_write
    out = atomic_write(resolve(a.run_root) / "demo-seeds.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    print(f"\n-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
