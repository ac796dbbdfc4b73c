"""Results of a run gathered across notebooks, and the report that `make demo` writes.

Each notebook records its headline numbers with `record(run_dir, section, name, value)` into
run_dir/results.json (atomic read-modify-write), and saves its plots with `save_figure`; the report
is rebuilt from those files, so it always shows what the run measured.

Each row also carries when it was recorded and which step recorded it (results["_meta"], beside the
values, whose layout stays as it was). A step depends on every step before it in `registry.STEPS`
(except step 01, which produces nothing, and the training steps 03-05, which are independent of each
other); the report marks a row **stale** when a step it depends on recorded something after it, e.g.
the pseudo-label row after `cdkit demo --only 06,07,08` (09 did not run again)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from cdkit.base.io import atomic_write
from cdkit.base.paths import resolve
from cdkit.runs import RunLayout
from cdkit.infer.selection import HELD_OUT

# The study's table: each row is a step of the method, as product accuracy on the test truth.
STUDY_ROWS = [
    ("baseline", "single model, one view, mean of picture probabilities"),
    ("+TTA", "single model, test-time augmentation"),
    ("ensemble (+TTA)", "all models, TTA, mean"),
    ("ensemble + belief aggregation", "belief-based product aggregation instead of the mean"),
    ("+MD5 lookup", "after the chosen aggregation, pictures and product sets identical to train take their labels"),
    ("+pseudo-labels", "steps 06-08 again with the model fine-tuned on pseudo-labeled test products"),
]

# rows whose step records no VALID_IS: one model predicting validation pictures, nothing fitted or chosen there
STUDY_VALID = {"baseline": HELD_OUT, "+TTA": HELD_OUT}


def results_path(run_dir):
    return RunLayout.of(run_dir).results


def load_results(run_dir) -> dict:
    p = results_path(run_dir)
    from cdkit.base.errors import FileFormatError, read_json
    results = read_json(p) if p.exists() else {}
    if not isinstance(results, dict):
        raise FileFormatError(f"{p}: not the kit's results (a JSON object of step: results); restore it or rerun the steps")
    return results


def _clean(v):
    "JSON-safe: NaN (no truth to compare with) becomes null, numpy scalars plain numbers"
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


# the section where steps 06b, 07 and 08 put the levers side by side, on the same products
LEVERS = "levers: mean vs belief vs fusion vs re-ranker (same products; sd over seeds)"
META = "_meta"  # results[META][section][name] = {"time": unix seconds, "step": module of cdkit.steps}
# what a row's validation figure is (cdkit.infer.selection: out of fold, in-sample, held out): only figures of the
# same kind compare, and only out-of-fold or held-out ones estimate what test will show
VALID_IS = "validation figure"
TRAINING_CURVES = "03_history"  # figures/03_history_<model>.png, saved by steps.train.record


def record(run_dir, section, name, value, *, step):
    """Store one result (a number, string or small dict) under results[section][name], with the time and
    the step that recorded it (`step`: a module of cdkit.steps, as registry.STEPS names it) in results['_meta']"""
    from cdkit.train.distributed import rank, world_size
    from cdkit.base.io import folder_lock
    value = _clean(value)
    if world_size() > 1 and rank() != 0:
        return value  # data-parallel training: rank 0 records for every process (it holds the run folder)
    if step not in step_groups()[0]:
        raise ValueError(f"record: step {step!r} is not a module of registry.STEPS ({', '.join(step_groups()[0])})")
    with folder_lock(resolve(run_dir), "run folder"):  # read-modify-write: one writer at a time
        results = load_results(run_dir)
        results.setdefault(section, {})[name] = value
        results.setdefault(META, {}).setdefault(section, {})[name] = {"time": time.time(), "step": step}
        atomic_write(results_path(run_dir), lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, default=float)))
    return value


def recorder(step):
    """record() for one step: `rec = recorder('ensemble'); rec(run_dir, section, name, value)`. A step's
    `record(run_dir, R, step=...)` takes the step it records for: step 09 records 07's and 08's rows of its
    stage as its own (they are stale when 06-08 run again, not when 09 does)"""
    def rec(run_dir, section, name, value):
        return record(run_dir, section, name, value, step=step)
    return rec


def save_figure(fig, run_dir, name, dpi=90, max_bytes=300_000):
    """Save a matplotlib figure as run_dir/figures/<name>.png (for the report); returns the figure (shown in
    notebooks). A figure of pictures can make a large PNG: the resolution drops until it fits `max_bytes`."""
    import io
    path = RunLayout.of(run_dir).figure(name)
    while True:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, bbox_inches="tight", format="png")
        if buf.tell() <= max_bytes or dpi <= 30: break
        dpi = max(30, int(dpi * 0.75))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    return fig


TIME_WORDS = ("time", "second", "minute", "(s)", "(min)")
# counts that pandas hands over as floats (a row of a mixed DataFrame): printed as integers even when 0 or 1
COUNT_WORDS = ("chosen", "count", "products", "pictures", "images", "epochs", "seeds", "views", "members",
               "changed", "generic", "categories", "rows")


def _fmt(v, digits=4, key=""):
    """A value for the report: durations with one decimal, counts as integers (a float with no fraction
    above 1, or named like a count), other floats with `digits`, None as n/a"""
    if v is None:
        return "n/a"
    k = str(key).lower()
    if isinstance(v, float) and any(w in k for w in TIME_WORDS):
        return f"{v:.1f}"
    if isinstance(v, float) and v.is_integer() and (abs(v) > 1 or any(w in k for w in COUNT_WORDS)):
        return str(int(v))
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def difference_noise(acc_a, acc_b, n_a, n_b=None, correct_a=None, correct_b=None, z=2.0) -> dict:
    """Is row b's accuracy different from row a's beyond the noise of the products they were measured on?

    Each accuracy's binomial standard error is sqrt(p (1 - p) / n). Where both rows' per-product
    correctness is given (aligned: the same products in the same order), the difference is paired, as
    McNemar's test pairs it: only the discordant products count, b01 (a right, b wrong) and b10 (a wrong,
    b right); the difference is (b10 - b01) / n with standard error sqrt(b01 + b10) / n. Otherwise the
    unpaired bound sqrt(se_a^2 + se_b^2) (larger: it ignores that both rows score the same products).
    The difference is within noise unless |diff| > z standard errors. Returns diff, se, se_a, se_b,
    paired, within_noise and a short note for the report."""
    import math
    n_b = n_a if n_b is None else n_b
    se_a = math.sqrt(acc_a * (1 - acc_a) / n_a) if n_a else float("nan")
    se_b = math.sqrt(acc_b * (1 - acc_b) / n_b) if n_b else float("nan")
    paired = correct_a is not None and correct_b is not None
    if paired:
        import numpy as np
        ca, cb = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
        if ca.shape != cb.shape or not len(ca):
            raise ValueError(f"paired rows need the same products: {ca.shape} vs {cb.shape}")
        n = len(ca)
        b01, b10 = int((ca & ~cb).sum()), int((~ca & cb).sum())
        diff, se = (b10 - b01) / n, math.sqrt(b01 + b10) / n
    else:
        diff, se = acc_b - acc_a, math.sqrt(se_a ** 2 + se_b ** 2)
    within = not abs(diff) > z * se  # no discordant product at all: se 0, diff 0, within noise
    how = "paired" if paired else "unpaired bound: not both rows have per-product results"
    note = f"{diff:+.4f} +- {se:.4f} ({'within noise' if within else f'beyond {z:g} se'}; {how})"
    return dict(diff=diff, se=se, se_a=se_a, se_b=se_b, paired=paired, within_noise=within, note=note)


def _table(rows: dict, marks: dict = None) -> str:
    "Markdown table of {row name: {column: value}}; `marks`: {row name: note} appended to the row's name"
    marks = marks or {}
    cols = list(dict.fromkeys(c for v in rows.values() for c in v))
    out = ["| | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    out += [f"| {k}{marks.get(k, '')} | " + " | ".join(_fmt(v.get(c, ""), key=c) for c in cols) + " |"
            for k, v in rows.items()]
    return "\n".join(out)


# The differences the report weighs against their noise: each step of the study against the row it builds on
STUDY_PAIRS = [("+TTA", "baseline"), ("ensemble (+TTA)", "+TTA"), ("ensemble + belief aggregation", "ensemble (+TTA)"),
               ("+MD5 lookup", "ensemble + belief aggregation"), ("+pseudo-labels", "+MD5 lookup")]
PRODUCT_FILES = {"+MD5 lookup": "base", "+pseudo-labels": "pseudo"}  # rows with a per-product file (run_dir/products)


def _truth(run_dir, split):
    "The true class per product of `split` for the data the run's step 08 read, or None (real test set, data gone)"
    try:
        from cdkit.base.params import read_params_file
        from cdkit.data.prepare import load_prepared
        from cdkit.runs import RunLayout
        p = read_params_file(RunLayout.of(run_dir).step_params("aggregate"))
        return load_prepared(p["data_dir"], p["work_dir"]).truth(split)
    except Exception:  # the noise of a row is a comment on it: without the truth, the unpaired bound
        return None


def study_noise(run_dir, study) -> dict:
    """{(row, split): standard error} and {(row, other, split): difference_noise(...)} for the study's rows:
    every row is measured on all products of its split (their number: the products files'); rows with a
    products file are paired when the truth is at hand"""
    import pandas as pd
    from cdkit.runs import RunLayout
    layout, se, diffs, truth = RunLayout.of(run_dir), {}, {}, {}
    for split in ("test", "valid"):
        path = layout.products("base", split)
        if not path.exists():
            continue
        n = len(pd.read_parquet(path, columns=["product_id"]))
        correct = {}
        for row, stage in PRODUCT_FILES.items():
            f = layout.products(stage, split)
            if row in study and f.exists():
                if split not in truth:
                    truth[split] = _truth(run_dir, split)
                if truth[split] is not None:
                    df = pd.read_parquet(f).sort_values("product_id")
                    correct[row] = (df["pred_class"].to_numpy() ==
                                    truth[split].reindex(df["product_id"].to_numpy()).to_numpy())
        accs = {k: v.get(split) for k, v in study.items() if isinstance(v, dict) and isinstance(v.get(split), (int, float))}
        for row, a in accs.items():
            se[(row, split)] = difference_noise(a, a, n)["se_a"]
        for row, other in STUDY_PAIRS:
            if row in accs and other in accs:
                both = row in correct and other in correct and len(correct[row]) == len(correct[other])
                diffs[(row, other, split)] = difference_noise(accs[other], accs[row], n,
                                                              correct_a=correct[other] if both else None,
                                                              correct_b=correct[row] if both else None)
    return se, diffs


def step_groups():
    """{cdkit.steps module: its position} in registry.STEPS order, and the modules each depends on: every
    earlier one but `explore` (produces nothing); the three training notebooks share the module `train`"""
    from cdkit.steps.registry import STEPS
    order = list(dict.fromkeys(s.module for s in STEPS))
    deps = {m: [d for d in order[:i] if d != "explore"] for i, m in enumerate(order)}
    return order, deps


def stale_rows(results: dict) -> dict:
    """{(section, name): why} for the rows recorded before a step they depend on last recorded something.
    A row without a time (recorded by an older kit) is stale as soon as any step it depends on has one."""
    meta = results.get(META, {})
    _, deps = step_groups()
    last = {}  # step -> the last time it recorded anything
    for sec in meta.values():
        for m in sec.values():
            if m.get("step"): last[m["step"]] = max(last.get(m["step"], 0.0), m.get("time") or 0.0)
    out = {}
    for section, values in results.items():
        if section == META: continue
        for name in values:
            m = meta.get(section, {}).get(name, {})
            t, step = m.get("time") or 0.0, m.get("step")
            if step is None and not m: step = "?"
            later = [d for d in (deps.get(step, []) if step != "?" else list(last)) if last.get(d, 0.0) > t]
            if later:
                out[(section, name)] = f"stale: {', '.join(later)} ran after it"
    return out


def _mark(stale, section, name):
    why = stale.get((section, name))
    return f" (**{why}**)" if why else ""


def write_report(run_dir) -> Path:
    "run_dir/report.md: the study's table with this run's numbers, the training section, the other results, plots"
    run_dir = resolve(run_dir)
    res = load_results(run_dir)
    stale = stale_rows(res)
    study = res.get("study", {})
    lines = [f"# cdkit report: {run_dir.name}", ""]
    if stale:
        lines += [f"**{len(stale)} row(s) are stale** (marked below): a step they depend on ran after them. Rerun the "
                  "steps after it (e.g. `cdkit demo --only 06,06b,07,08,09,10 overwrite=true`: overwrite retrains the models "
                  "of the steps named, here 06b's heads and 09's fine-tune, and no other) to bring them up to date.", ""]
    lines += ["Product accuracy on the test set (synthetic data: its true labels; on the real data only "
              "the Kaggle leaderboard knows them).", "",
              "| step | what | test accuracy | validation accuracy | validation figure |",
              "| --- | --- | --- | --- | --- |"]
    se, diffs = study_noise(run_dir, study)

    def acc(key, split, v):
        return _fmt(v) + (f" +- {se[(key, split)]:.4f}" if (key, split) in se else "")

    for key, what in STUDY_ROWS:
        v = study.get(key, {})
        if isinstance(v, dict):
            t, va, kind = v.get("test", "n/a"), v.get("valid", "n/a"), v.get(VALID_IS, STUDY_VALID.get(key, "n/a"))
            notes = ", ".join(f"{k}: {_fmt(x, key=k)}" for k, x in v.items() if k not in ("test", "valid", VALID_IS))
        else:
            t, va, kind, notes = v, "n/a", "n/a", ""
        lines.append(f"| {key}{_mark(stale, 'study', key)} | {what}{f' ({notes})' if notes else ''} | "
                     f"{acc(key, 'test', t)} | {acc(key, 'valid', va)} | {kind} |")
    if diffs:
        lines += ["", "Accuracies +- their binomial standard error (on all products of the split). Each step against "
                  "the row it builds on: a difference within 2 standard errors of the paired difference (McNemar's "
                  "discordant products) is within noise; rows without per-product files get the unpaired bound.", ""]
        lines += [f"- {row} vs {other}, {'validation' if split == 'valid' else split}: {d['note']}"
                  for (row, other, split), d in diffs.items()]
    figs = sorted(RunLayout.of(run_dir).figures.glob("*.png")) if RunLayout.of(run_dir).figures.exists() else []
    steps_of = {sec: {m.get("step") for m in rows.values()} for sec, rows in res.get(META, {}).items()}
    shown = set()
    for section, values in res.items():
        if section in ("study", META):
            continue
        lines += ["", f"## {section}", ""]
        is_time = section.startswith("time")
        if values and all(isinstance(v, dict) and v and not any(isinstance(x, dict) for x in v.values())
                          for v in values.values()):
            lines += [_table(values, {n: _mark(stale, section, n) for n in values}), ""]  # one row per name
        else:
            for name, v in values.items():
                m = _mark(stale, section, name)
                if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                    lines += [f"{name}{m}:", "", _table(v), ""]  # a table: rows of dicts
                elif isinstance(v, dict):
                    lines.append(f"- {name}{m}: " + ", ".join(f"{k} {_fmt(x, key=k if not is_time else 'seconds')}"
                                                             for k, x in v.items()))
                else:
                    lines.append(f"- {name}{m}: {_fmt(v, key=name if not is_time else 'seconds')}")
        if is_time:
            lines.append(f"- total: {sum(v for v in values.values() if isinstance(v, (int, float))):.0f}")
        if "train" in steps_of.get(section, ()):  # the training curves beside the training table
            for f in figs:
                if f.stem.startswith(TRAINING_CURVES):
                    lines += ["", f"![{f.stem}](figures/{f.name})"]
                    shown.add(f)
    rest = [f for f in figs if f not in shown]
    if rest:
        lines += ["", "## Plots", ""]
        lines += [f"### {f.stem}\n\n![{f.stem}](figures/{f.name})\n" for f in rest]
    out = RunLayout.of(run_dir).report
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return out
