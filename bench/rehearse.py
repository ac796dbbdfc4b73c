"""Full-size rehearsal: every step of the kit on a synthetic set with the competition's real counts.

    .venv/bin/python bench/rehearse.py                                  # scales 1/16 and 1/4
    .venv/bin/python bench/rehearse.py --scales 0.0625 0.25 1 --data-root /work/rehearse-data
    make rehearse SCALES="0.0625 0.25 1" DATA=/work/rehearse-data

Per scale it writes (or reuses, when a complete one of the same scale and seed is there) the data set
of `cdkit.data.synth_full` under DATA_ROOT/scale-S-seed-N, then runs each step in its own subprocess
through the library functions the kit's steps call, and measures per step: wall and CPU time (the
step's process and its workers), peak resident memory of the step's process (its own ru_maxrss) and
of the process tree (polled sum of RSS, which counts pages shared with workers once per process),
the largest unique memory (USS) of a loader worker, and the bytes the step left on disk.

Steps: index both files; split; image tables; training loaders with 0 and 4 workers (a few hundred
batches each, plus a forked walk over the loader's index list as a worker does over an epoch);
prediction of every test picture by a tiny stand-in model into a 1-view store; two more stores
derived by perturbing it (bench scaffolding); MD5 of every picture and the lookup; an ensemble of
the three stores; mean and belief aggregation; pseudo-label selection; the validated submission.

Writes OUT/results.json (raw figures, merged over runs: a scale run again replaces its rows) and
OUT/report.md (the table per scale, side by side, and the growth exponents between sizes: the
log-log slope of time and of memory above the step's import baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = ROOT.parent / "shared" / "data" / "cdiscount" / "category_names.csv"
STEPS = ("synth", "index", "split", "image_table", "loaders_0w", "loaders_4w", "predict", "predict_standin",
         "derive_stores", "md5", "ensemble", "aggregate", "pseudo", "submit")
DESCRIPTION = {
    "synth": "write the data set (cdkit.data.synth_full)",
    "index": "build_index of train.bson and test.bson (+ Parquet)",
    "split": "make_split + save_split",
    "image_table": "image tables: train (label, fold) and test",
    "loaders_0w": "make_dataloaders, 0 workers, batches pulled",
    "loaders_4w": "make_dataloaders, 4 workers, batches pulled",
    "predict": "predict_to_store, every test picture, 1 view",
    "predict_standin": "(--standin-store) random top-k store of every test picture, no model",
    "derive_stores": "2 perturbed copies of the store (bench only)",
    "md5": "hash_pictures of train and test + label table + lookup",
    "ensemble": "ensemble.combine of 3 stores + save_store",
    "aggregate": "prediction_rows + mean_aggregate + belief_aggregate",
    "pseudo": "product_confidence + select_pseudo + pseudo_images",
    "submit": "make_submission + write_submission (.csv.gz)",
}
N_CLASSES = 5270
LOADER_BATCHES, LOADER_BS = 300, 64
PREDICT_SIZE, PREDICT_BS = 48, 256


# ------------------------------------------------------------------------------ inside a step process

def _rss_mb(pid=None):
    import psutil
    return psutil.Process(pid).memory_info().rss / 2**20


def _peak_self_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prepared(data, work):
    "What the steps read: cdkit.data.prepare.Prepared over the indices and split the earlier rehearsal steps wrote"
    from cdkit.data.bsonfile import load_index
    from cdkit.data.catalog import Catalog
    from cdkit.data.prepare import Prepared
    from cdkit.data.split import load_split
    return Prepared(data, work, load_index(work / "train_index.parquet"), load_index(work / "test_index.parquet"),
                    load_split(work / "split.parquet"), Catalog.from_csv(data / "category_names.csv"))


def step_synth(data, work, scale, seed):
    from cdkit.data.synth_full import write_full_dataset
    csv = REAL_CSV if REAL_CSV.exists() else None
    res = write_full_dataset(data, scale=scale, seed=seed, category_csv=csv, progress=False)
    return dict(bytes=sum(res["bytes"].values()), seconds=res["seconds"], taxonomy="real" if csv else "generated")


def step_index(data, work, scale, seed):
    from cdkit.data.bsonfile import build_index
    out = {}
    for name in ("train", "test"):
        t = time.perf_counter()
        idx = build_index(data / f"{name}.bson", out=work / f"{name}_index.parquet")
        mb = (data / f"{name}.bson").stat().st_size / 2**20
        out[name] = dict(products=len(idx), pictures=int(idx["n_imgs"].sum()), mb=round(mb),
                         mb_per_s=round(mb / (time.perf_counter() - t), 1))
    return out


def step_split(data, work, scale, seed):
    from cdkit.data.bsonfile import load_index
    from cdkit.data.split import make_split, save_split
    split = make_split(load_index(work / "train_index.parquet"), valid_frac=0.02, seed=0)
    save_split(split, work / "split.parquet")
    return dict(valid_products=int((split["fold"] == 0).sum()))


def step_image_table(data, work, scale, seed):
    prep = _prepared(data, work)
    train, test = prep.train_images(), prep.test_images()
    return dict(train_rows=len(train), test_rows=len(test),
                table_mb=round((train.memory_usage(deep=True).sum() + test.memory_usage(deep=True).sum()) / 2**20, 1))


def _worker_monitor(stop, out, interval=0.25):
    "Poll this process's children (loader workers): the largest USS and RSS seen, and the main RSS"
    import psutil
    me = psutil.Process()
    while not stop.is_set():
        out["main_rss"] = max(out.get("main_rss", 0), me.memory_info().rss / 2**20)
        for ch in me.children(recursive=True):
            try:
                m = ch.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out["worker_uss"] = max(out.get("worker_uss", 0), m.uss / 2**20)
            out["worker_rss"] = max(out.get("worker_rss", 0), m.rss / 2**20)
            out["workers_seen"] = max(out.get("workers_seen", 0), len(me.children()))
        stop.wait(interval)


def _epoch_walk_uss(dl):
    """USS of a forked process that walks the loader's index list as a fastai worker's `sample()` does
    over a whole epoch (enumerate every index): the copy-on-read cost a worker pays by the epoch's end"""
    import psutil
    idxs = getattr(dl, "_DataLoader__idxs", None)
    if idxs is None: return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: walk, report, exit without cleanup
        os.close(r)
        before = psutil.Process().memory_full_info().uss
        n = sum(1 for i, b in enumerate(idxs) if i // dl.bs % 4 == 0)
        after = psutil.Process().memory_full_info().uss
        os.write(w, json.dumps(dict(before=before / 2**20, after=after / 2**20, n=n)).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096): data += chunk
    os.waitpid(pid, 0)
    res = json.loads(data)
    return dict(list_len=len(idxs), list_type=type(idxs).__name__, uss_before_mb=round(res["before"], 1),
                uss_after_walk_mb=round(res["after"], 1))


def _loaders(data, work, workers):
    import torch
    from cdkit.data.loaders import make_dataloaders
    torch.set_num_threads(1)
    prep = _prepared(data, work)
    images = prep.train_images()
    t0 = time.perf_counter()
    dls = make_dataloaders(images, prep.train_bson, prep.catalog.n_classes, size=64, item_size=160, bs=LOADER_BS,
                           num_workers=workers, device="cpu")
    t_make = time.perf_counter() - t0
    del images
    stats, stop = {}, threading.Event()
    mon = threading.Thread(target=_worker_monitor, args=(stop, stats), daemon=True)
    mon.start()
    t0 = time.perf_counter()
    it = iter(dls.train)
    first = None
    n = 0
    for xb, yb in it:
        n += 1
        if first is None: first = time.perf_counter() - t0
        if n >= LOADER_BATCHES: break
    t_pull = time.perf_counter() - t0
    stop.set(); mon.join()
    walk = _epoch_walk_uss(dls.train)
    del it
    return dict(batches=n, bs=LOADER_BS, make_s=round(t_make, 2), first_batch_s=round(first, 2),
                pictures_per_s=round(n * LOADER_BS / t_pull, 1), epoch_walk=walk,
                **{k: round(v, 1) for k, v in stats.items()})


def step_loaders_0w(data, work, scale, seed): return _loaders(data, work, 0)
def step_loaders_4w(data, work, scale, seed): return _loaders(data, work, 4)


def stand_in_model(n_classes=N_CLASSES, seed=0):
    "A tiny model: mean colour of 4x4 cells -> linear to every class, peaked enough to rank classes"
    import torch
    from torch import nn
    torch.manual_seed(seed)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, n_classes))
    with torch.no_grad(): model[2].weight.mul_(30)
    return model


def step_predict(data, work, scale, seed):
    import torch
    from cdkit.infer.predict import StoreSpec, Views, predict_to_store
    torch.set_num_threads(1)
    prep = _prepared(data, work)
    test = prep.test_images()
    t0 = time.perf_counter()
    path = predict_to_store(stand_in_model(), test, prep.test_bson, work / "stores" / "m0.store",
                            Views(1, size=PREDICT_SIZE, item_size=PREDICT_SIZE),
                            StoreSpec(k=20, n_classes=N_CLASSES, overwrite=True), bs=PREDICT_BS, num_workers=2,
                            device="cpu", log_every=0)
    dt = time.perf_counter() - t0
    return dict(pictures=len(test), pictures_per_s=round(len(test) / dt, 1), store=str(path))


def step_predict_standin(data, work, scale, seed):
    "The store predict_to_store would write, filled with random peaked top-k rows (no model, no decoding)"
    import numpy as np
    from cdkit.infer.store import StoreWriter
    test = _prepared(data, work).test_images()
    pid, img = test["product_id"].to_numpy(), test["img_idx"].to_numpy()
    rng, k = np.random.default_rng(seed), 20
    with StoreWriter(work / "stores" / "m0.store", N_CLASSES, k, 1, "uint8", dict(standin=True), overwrite=True) as w:
        for a in range(0, len(pid), 1 << 16):
            n = min(1 << 16, len(pid) - a)
            cls = np.stack([rng.choice(N_CLASSES, k, replace=False) for _ in range(64)])[rng.integers(0, 64, n)]
            cls = (cls + rng.integers(0, N_CLASSES, (n, 1))) % N_CLASSES
            g = rng.gamma(0.3, size=(n, k + 1)).astype(np.float32)
            g[:, 0] += 1.0
            g /= g.sum(1, keepdims=True)
            prob = -np.sort(-g[:, :k], 1)
            w.add_topk(pid[a:a + n], img[a:a + n], cls[:, None], prob[:, None], (1 - prob.sum(1))[:, None])
    return dict(pictures=len(pid))


def step_derive_stores(data, work, scale, seed):
    "Two more stores: the first's top-k probabilities times log-normal noise, renormalized and re-sorted"
    import numpy as np
    from cdkit.infer.store import StoreWriter, load_store
    s = load_store(work / "stores" / "m0.store")
    for m in (1, 2):
        rng = np.random.default_rng(m)
        with StoreWriter(work / "stores" / f"m{m}.store", s.n_classes, s.k, 1, "uint8", dict(derived_from="m0"),
                         overwrite=True) as w:
            for a in range(0, len(s), 65536):
                p = s.prob[a:a + 65536] * rng.lognormal(0, 0.5, s.prob[a:a + 65536].shape).astype(np.float32)
                rest = s.rest[a:a + 65536]
                p *= ((1 - rest) / np.maximum(p.sum(-1), 1e-12))[..., None]
                o = np.argsort(-p, -1)
                w.add_topk(s.product_id[a:a + 65536], s.img_idx[a:a + 65536],
                           np.take_along_axis(s.cls[a:a + 65536], o, -1), np.take_along_axis(p, o, -1), rest)
    return dict(rows=len(s))


def step_md5(data, work, scale, seed):
    import numpy as np
    from cdkit.infer.md5 import hash_pictures, md5_label_table, md5_lookup
    prep = _prepared(data, work)
    train, test = prep.train_images(), prep.test_images()
    t = time.perf_counter()
    h_train = hash_pictures(prep.reader("train"), train)
    h_test = hash_pictures(prep.reader("test"), test)
    t_hash = time.perf_counter() - t
    t = time.perf_counter()
    table = md5_label_table(h_train, train["label"].to_numpy(), prep.catalog.n_classes)
    match = md5_lookup(h_test, table, k=5)
    t_lookup = time.perf_counter() - t
    np.save(work / "test_md5_found.npy", match.found)
    return dict(pictures=len(train) + len(test), hash_s=round(t_hash, 1), table_lookup_s=round(t_lookup, 1),
                unique_train=len(table), test_found=int(match.found.sum()))


def step_ensemble(data, work, scale, seed):
    from cdkit.infer.ensemble import combine
    from cdkit.infer.store import load_store, save_store
    stores = [load_store(work / "stores" / f"m{m}.store") for m in range(3)]
    t = time.perf_counter()
    ens = combine(stores, weights=[0.5, 0.3, 0.2])
    t_combine = time.perf_counter() - t
    del stores
    save_store(ens, work / "stores" / "ensemble.store", prob_dtype="uint8", overwrite=True)
    return dict(rows=len(ens), combine_s=round(t_combine, 1))


def _save_pp(pp, path):
    import numpy as np
    np.savez(path, product_id=pp.product_id, n_preds=pp.n_preds, pred_class=pp.pred_class, cls=pp.cls, score=pp.score)


def _load_pp(path):
    import numpy as np
    from cdkit.infer.aggregate import ProductPredictions
    with np.load(path) as z: return ProductPredictions(**{k: z[k] for k in z.files})


def step_aggregate(data, work, scale, seed):
    from cdkit.infer.aggregate import belief_aggregate, mean_aggregate, prediction_rows
    from cdkit.infer.store import load_store
    rows = prediction_rows([load_store(work / "stores" / "ensemble.store")])
    t = time.perf_counter()
    mean = mean_aggregate(rows.product_id, rows.cls, rows.prob, rows.rest, rows.n_classes, k_out=5)
    t_mean = time.perf_counter() - t
    t = time.perf_counter()
    belief = belief_aggregate(rows.product_id, rows.cls, rows.prob, rows.rest, rows.n_classes)
    t_belief = time.perf_counter() - t
    _save_pp(mean, work / "products_mean.npz")
    return dict(rows=len(rows.product_id), products=len(mean.product_id), mean_s=round(t_mean, 1),
                belief_s=round(t_belief, 1), same_winner=round(float((mean.pred_class == belief.pred_class).mean()), 4))


def step_pseudo(data, work, scale, seed):
    from cdkit.pseudo.pseudolabel import product_confidence, pseudo_images, select_pseudo
    prep = _prepared(data, work)
    conf = product_confidence(_load_pp(work / "products_mean.npz"))
    chosen = select_pseudo(conf, threshold=0.5, fraction=0.5)
    imgs = pseudo_images(chosen, prep.test_images())
    return dict(products=len(conf), chosen=len(chosen), pictures=len(imgs))


def step_submit(data, work, scale, seed):
    from cdkit.data.catalog import Catalog
    from cdkit.submit.submission import make_submission, write_submission
    cat = Catalog.from_csv(data / "category_names.csv")
    pp = _load_pp(work / "products_mean.npz")
    df = make_submission(pp.product_id, cat.to_category(pp.pred_class), data / "sample_submission.csv")
    path = write_submission(df, work / "submission.csv.gz", data / "sample_submission.csv", cat.category_ids)
    return dict(rows=len(df), path=str(path))


def run_step(name, data, work, scale, seed):
    "Run one step in this process; prints one RESULT line with the step's own figures"
    import gc
    gc.collect()
    rss0 = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    info = globals()[f"step_{name}"](Path(data), Path(work), scale, seed)
    res = dict(info=info, rss_start_mb=round(rss0, 1), peak_self_mb=round(_peak_self_mb(), 1),
               peak_children_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
               inner_wall_s=round(time.perf_counter() - t0, 2), inner_cpu_s=round(time.process_time() - c0, 2))
    print("RESULT " + json.dumps(res, default=str), flush=True)


# ------------------------------------------------------------------------------------- the driver

def _tree_rss_mb(proc):
    "(RSS, anonymous RSS) summed over the process and its descendants, MB; anonymous excludes mapped files"
    import psutil
    total = anon = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
            with open(f"/proc/{p.pid}/status") as f:
                anon += next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError, StopIteration): pass
    return total / 2**20, anon / 2**20


def _dir_bytes(path):
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def measure(name, data, work, scale, seed, log):
    "Run step `name` in a subprocess; wall, CPU (with its workers), peak RSS (own, tree), disk left"
    import psutil
    disk0 = _dir_bytes(data if name == "synth" else work)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--data", str(data), "--work", str(work),
           "--scale", repr(scale), "--seed", str(seed)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    ps, peak_tree, peak_anon, lines = psutil.Process(proc.pid), 0.0, 0.0, []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            rss, anon = _tree_rss_mb(ps)
            peak_tree, peak_anon = max(peak_tree, rss), max(peak_anon, anon)
        except psutil.NoSuchProcess: pass
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    res = next((json.loads(l[7:]) for l in lines if l.startswith("RESULT ")), None)
    if proc.returncode or res is None:
        log("".join(lines[-40:]))
        raise RuntimeError(f"step {name} failed (exit {proc.returncode}) at scale {scale}")
    rec = dict(scale=scale, step=name, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
               peak_rss_mb=res["peak_self_mb"], peak_tree_mb=round(max(peak_tree, res["peak_self_mb"]), 1),
               peak_anon_mb=round(peak_anon, 1),
               worker_uss_mb=res["info"].get("worker_uss") if isinstance(res["info"], dict) else None,
               work_mb=round(max(res["peak_self_mb"] - res["rss_start_mb"], 1.0), 1), rss_start_mb=res["rss_start_mb"],
               disk_mb=round((_dir_bytes(data if name == "synth" else work) - disk0) / 2**20, 1), info=res["info"])
    return rec


def dataset_ready(data, scale, seed):
    "True when `data` holds a complete full-size synthetic set of this scale and seed"
    from cdkit.base.io import IncompleteFolderError, check_complete
    meta = Path(data) / "synth.json"
    if not meta.exists(): return False
    try: check_complete(data)
    except IncompleteFolderError: return False
    m = json.loads(meta.read_text())
    return m.get("preset") == "full" and math.isclose(m.get("scale", -1), scale) and m.get("seed") == seed


def _fmt(x, unit=""):
    if x is None: return "-"
    if isinstance(x, float) and x >= 100: return f"{x:,.0f}{unit}"
    return f"{x:,.1f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def slope(x0, y0, x1, y1):
    "log-log slope between (x0, y0) and (x1, y1); None when a value is too small to say"
    if min(y0, y1) <= 0 or x0 == x1: return None
    return math.log(y1 / y0) / math.log(x1 / x0)


def report(records, out):
    "report.md: per step and scale wall / CPU / peak RSS / tree / worker USS / disk; then growth exponents"
    scales = sorted({r["scale"] for r in records})
    by = {(r["scale"], r["step"]): r for r in records}
    steps = [s for s in STEPS if any((sc, s) in by for sc in scales)]
    L = ["# Full-size rehearsal", "",
         "Synthetic data of `cdkit.data.synth_full` at the competition's real counts times the scale (1 = 7,069,896 train",
         "products / 12,371,293 pictures, 1,768,182 test products / 3,095,080 pictures, 5,270 categories). Each step ran",
         "in its own process (`bench/rehearse.py`). wall/CPU in s (CPU includes loader workers); RSS = the step",
         "process's peak resident memory; tree = polled peak of the RSS sum over the process and its workers (shared",
         "pages counted once per process); anon = polled peak of the anonymous RSS sum (without mapped file pages, which",
         "the kernel drops under pressure: build_index maps the whole BSON file); USS = the largest unique memory of",
         "one loader worker; disk = MB left by the step. For the loader steps the polled sums also count the forked",
         "process that walks the index list (a simulated worker at the end of an epoch), and count pages shared by the",
         "forked workers once per worker: their real footprint is the main process + each worker's USS (step details).",
         ""]
    for sc in scales:
        recs = [by[(sc, s)] for s in steps if (sc, s) in by]
        L += [f"## scale {sc:g}", "", "| step | what | wall s | CPU s | RSS MB | tree MB | anon MB | worker USS MB | disk MB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in recs:
            L.append(f"| {r['step']} | {DESCRIPTION[r['step']]} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | "
                     f"{_fmt(r['peak_rss_mb'])} | {_fmt(r['peak_tree_mb'])} | {_fmt(r.get('peak_anon_mb'))} | "
                     f"{_fmt(r['worker_uss_mb'])} | {_fmt(r['disk_mb'])} |")
        L.append("")
    if len(scales) >= 2:
        L += ["## Side by side", "", "| step | " + " | ".join(f"wall s @{s:g}" for s in scales) + " | "
              + " | ".join(f"RSS MB @{s:g}" for s in scales) + " |",
              "| --- |" + " ---: |" * (2 * len(scales))]
        for s in steps:
            L.append(f"| {s} | " + " | ".join(_fmt(by[(sc, s)]["wall_s"]) if (sc, s) in by else "-" for sc in scales)
                     + " | " + " | ".join(_fmt(by[(sc, s)]["peak_rss_mb"]) if (sc, s) in by else "-" for sc in scales) + " |")
        L += ["", "## Growth exponents", "",
              "log-log slope between consecutive scales (1 = linear). Memory: the step's peak RSS above its RSS at",
              "the start of the step (imports, before any work), so that the import baseline does not hide growth.", "",
              "| step | " + " | ".join(f"CPU {a:g}->{b:g}" for a, b in zip(scales, scales[1:])) + " | "
              + " | ".join(f"memory {a:g}->{b:g}" for a, b in zip(scales, scales[1:])) + " |",
              "| --- |" + " ---: |" * (2 * (len(scales) - 1))]
        for s in steps:
            cpu, mem = [], []
            for a, b in zip(scales, scales[1:]):
                ra, rb = by.get((a, s)), by.get((b, s))
                cpu.append(slope(a, ra["cpu_s"], b, rb["cpu_s"]) if ra and rb and ra["cpu_s"] >= 0.5 else None)
                mem.append(slope(a, ra["work_mb"], b, rb["work_mb"]) if ra and rb and ra["work_mb"] >= 20 else None)
            L.append(f"| {s} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cpu + mem) + " |")
        L.append("")
    if scales and scales[-1] < 1 and len(scales) >= 2:
        a, b = scales[-2], scales[-1]
        L += [f"## Extrapolated to full size (from {a:g} and {b:g}, with each step's exponent, at least 1)", "",
              "| step | CPU s | peak RSS MB |", "| --- | ---: | ---: |"]
        for s in steps:
            ra, rb = by.get((a, s)), by.get((b, s))
            if not (ra and rb): continue
            e_cpu = max(slope(a, ra["cpu_s"], b, rb["cpu_s"]) or 1.0, 1.0)
            e_mem = max(slope(a, ra["work_mb"], b, rb["work_mb"]) or 1.0, 1.0) if ra["work_mb"] >= 20 else 1.0
            cpu = rb["cpu_s"] * (1 / b) ** e_cpu
            mem = rb["rss_start_mb"] + rb["work_mb"] * (1 / b) ** e_mem if "rss_start_mb" in rb else None
            L.append(f"| {s} | {_fmt(cpu)} | {_fmt(mem)} |")
        L.append("")
    L += ["## Step details (last scale)", ""]
    for s in steps:
        r = by.get((scales[-1], s))
        if r: L.append(f"- {s}: `{json.dumps(r['info'], default=str)}`")
    Path(out).write_text("\n".join(L) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", nargs="+", type=float, default=[0.0625, 0.25], help="times the real counts")
    p.add_argument("--data-root", default=str(ROOT / "data" / "rehearse"), help="where the data sets go (reused)")
    p.add_argument("--out", default=str(ROOT / "runs" / "rehearse"), help="results.json, report.md, work folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="run these steps only (their inputs must exist)")
    p.add_argument("--standin-store", action="store_true",
                   help="write the test store with random predictions instead of predicting (the model is the "
                        "long pole on a CPU: about 0.6 ms a picture); every later step is unchanged")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from results.json")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step:
        return run_step(a.step, a.data, a.work, a.scale, a.seed)
    from cdkit.base.io import atomic_write
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    records = json.loads(res_path.read_text()) if res_path.exists() else []
    log = lambda s: print(s, flush=True)
    if a.report_only: return report(records, out / "report.md")
    for scale in a.scales:
        data = Path(a.data_root) / f"scale-{scale:g}-seed-{a.seed}"
        work = out / "work" / f"scale-{scale:g}"
        work.mkdir(parents=True, exist_ok=True)
        skip = "predict" if a.standin_store else "predict_standin"
        steps = [s for s in STEPS if (a.only is None or s in a.only) and s != skip]
        if dataset_ready(data, scale, a.seed):
            log(f"scale {scale:g}: reusing the complete data set in {data}")
            steps = [s for s in steps if s != "synth"]
        elif "synth" not in steps:
            raise SystemExit(f"{data} has no complete data set of scale {scale:g}; run without --only")
        log(f"scale {scale:g}: {data} -> {work}")
        log(f"{'step':<14}{'wall s':>9}{'CPU s':>9}{'RSS MB':>9}{'tree MB':>9}{'anon MB':>9}{'wUSS MB':>9}{'disk MB':>9}")
        for name in steps:
            rec = measure(name, data, work, scale, a.seed, log)
            log(f"{name:<14}{rec['wall_s']:>9.1f}{rec['cpu_s']:>9.1f}{rec['peak_rss_mb']:>9.0f}{rec['peak_tree_mb']:>9.0f}"
                f"{rec['peak_anon_mb']:>9.0f}"
                f"{(rec['worker_uss_mb'] or 0):>9.0f}{rec['disk_mb']:>9.0f}")
            records = json.loads(res_path.read_text()) if res_path.exists() else []  # another driver may write too
            records = [r for r in records if not (r["scale"] == scale and r["step"] == name)] + [rec]
            atomic_write(res_path, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1, default=str)))
            report(records, out / "report.md")
    report(json.loads(res_path.read_text()) if res_path.exists() else records, out / "report.md")
    log(f"wrote {out / 'report.md'} and {res_path}")


if __name__ == "__main__":
    sys.exit(main())
