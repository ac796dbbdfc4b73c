"""Results of a run gathered across notebooks, and the report that `make demo` writes.

Each notebook records its headline numbers with `record(run_dir, section, name, value)` into
run_dir/results.json (atomic read-modify-write), and saves its plots with `save_figure`; the report
is rebuilt from those files, so it always shows what the run measured."""
from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_write
from .paths import resolve

# The study's table: each row is a step of the method, as product accuracy on the test truth.
STUDY_ROWS = [
    ("baseline", "single model, one view, mean of picture probabilities"),
    ("+TTA", "single model, test-time augmentation"),
    ("ensemble (+TTA)", "all models, TTA, mean"),
    ("ensemble + belief aggregation", "belief-based product aggregation instead of the mean"),
    ("+MD5 lookup", "after the chosen aggregation, pictures and product sets identical to train take their labels"),
    ("+pseudo-labels", "steps 06-08 again with the model fine-tuned on pseudo-labeled test products"),
]


def results_path(run_dir):
    return resolve(run_dir) / "results.json"


def load_results(run_dir) -> dict:
    p = results_path(run_dir)
    return json.loads(p.read_text()) if p.exists() else {}


def _clean(v):
    "JSON-safe: NaN (no truth to compare with) becomes null, numpy scalars plain numbers"
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def record(run_dir, section, name, value):
    "Store one result (a number, string or small dict) under results[section][name]"
    value = _clean(value)
    results = load_results(run_dir)
    results.setdefault(section, {})[name] = value
    atomic_write(results_path(run_dir), lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, default=float)))
    return value


def save_figure(fig, run_dir, name, dpi=90):
    "Save a matplotlib figure as run_dir/figures/<name>.png (for the report); returns the figure (shown in notebooks)"
    path = resolve(run_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    return fig


def _fmt(v, digits=4):
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(rows: dict) -> str:
    "Markdown table of {row name: {column: value}}"
    cols = list(dict.fromkeys(c for v in rows.values() for c in v))
    out = ["| | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    out += [f"| {k} | " + " | ".join(_fmt(v.get(c, "")) for c in cols) + " |" for k, v in rows.items()]
    return "\n".join(out)


def write_report(run_dir) -> Path:
    "run_dir/report.md: the study's table with this run's numbers, the other results, plots"
    run_dir = resolve(run_dir)
    res = load_results(run_dir)
    study = res.get("study", {})
    lines = [f"# cdkit report: {run_dir.name}", "",
             "Product accuracy on the test set (synthetic data: its true labels; on the real data only "
             "the Kaggle leaderboard knows them).", "",
             "| step | what | test accuracy | validation accuracy |", "| --- | --- | --- | --- |"]
    for key, what in STUDY_ROWS:
        v = study.get(key, {})
        if isinstance(v, dict):
            t, va = v.get("test", "n/a"), v.get("valid", "n/a")
            notes = ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items() if k not in ("test", "valid"))
        else:
            t, va, notes = v, "n/a", ""
        lines.append(f"| {key} | {what}{f' ({notes})' if notes else ''} | {_fmt(t)} | {_fmt(va)} |")
    for section, values in res.items():
        if section == "study":
            continue
        lines += ["", f"## {section}", ""]
        for name, v in values.items():
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                lines += [f"{name}:", "", _table(v), ""]  # a table: rows of dicts
            else:
                d = 1 if section.startswith("time") else 4
                lines.append(f"- {name}: {_fmt(v, d) if not isinstance(v, dict) else ', '.join(f'{k} {_fmt(x, d)}' for k, x in v.items())}")
        if section.startswith("time"):
            lines.append(f"- total: {sum(v for v in values.values() if isinstance(v, (int, float))):.0f}")
    figs = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []
    if figs:
        lines += ["", "## Plots", ""]
        lines += [f"### {f.stem}\n\n![{f.stem}](figures/{f.name})\n" for f in figs]
    out = run_dir / "report.md"
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return out
