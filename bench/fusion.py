"""Benchmark the fusion head (cdkit.infer.fusion, step 06b) toward the competition's size: time, peak memory, disk.

    nice -n 10 .venv/bin/python bench/fusion.py                       # 4k, 10k, 25k test products, d=2048
    nice -n 10 .venv/bin/python bench/fusion.py --d 4096              # fastai's concat pool (avg + max)
    nice -n 10 .venv/bin/python bench/fusion.py --sizes 10000 50000 --fusion-ratio 0.25 --keep --out /tmp/fb

Synthetic feature stores (`cdkit.infer.features.FeatureWriter`) per size: a test split of N products, a
fusion split of `fusion_ratio` x N products and a validation split of a quarter of that; 1-4 pictures
per product with the test set's P = 0.57, 0.22, 0.10, 0.11 (1.75 pictures a product); 5,270 classes
drawn Zipf-like (a few classes are frequent, as in Cdiscount); each picture's features are its class
prototype plus three times as much Gaussian noise, so a head learns something above chance.

Each size runs in fresh processes (so one size's peak never hides in the next's): one writes the
stores; then per method one trains a head (`train_head`, `epochs` epochs, on the CPU unless --device)
and streams the test split through it (`fusion_to_store`, `block` products at a time, k=20 uint8):

- fusion: `FusionNet` with step 06b's defaults (hidden 512, gate, order-aware, max pooling);
- baseline: the mean of a product's feature rows -> one Linear (the simplest product-level use of
  features), through the same loaders and writer, so fusion / baseline is the cost of the head itself.

Per phase: wall and CPU seconds, seconds spent reading features (`cdkit.infer.fusion.gather`, wrapped), peak
anonymous memory (RssAnon of /proc/self/status sampled every 10 ms: the process's own allocations,
what the 8 GB budget is about), peak RSS (VmHWM, reset per phase: it also counts the pages of the
memory-mapped features the phase touched, page cache the kernel reclaims under pressure) and, with
psutil, peak USS (sampled every second; private file pages of the memmap count there too). Time and
peak anonymous memory are fitted linearly in products and extrapolated to the full test set (1,768,182
products, 3,095,080 pictures) and to a fusion split of 2% of train (141,398 products); disk in bytes
per picture, scaled.

Glibc's dynamic mmap threshold lets the blocks' feature buffers (tens of MB, a different size each
block) fragment the heap: anonymous memory then climbs block after block, quickly at first, more
slowly later (at d=2048: +400 MB over the first 20 blocks, +100 MB over the next 29), so a line through
small sizes overstates the full set's peak. --malloc-mmap-threshold 131072 fixes the threshold: the
line then measures what really grows with the store.

On a machine shared with other jobs, CPU seconds are the steadier figure; wall
seconds include the waits for a core.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TEST_PRODUCTS, TEST_PICTURES = 1_768_182, 3_095_080
TRAIN_PRODUCTS = 7_069_896
FUSION_PRODUCTS = round(0.02 * TRAIN_PRODUCTS)  # step 02's fusion_frac = 0.02
PICTURES_P = (0.57, 0.22, 0.10, 0.11)  # products with 1, 2, 3, 4 pictures
N_CLASSES, K = 5270, 20
LIMIT_MB = 8e9 / 2**20  # 8 GB, read strictly: 7,629 MB of 2**20 bytes
NOISE = 3.0  # noise / signal per feature
SPLITS = dict(fusion=1, valid=2, test=3)  # product_id = 10 * i + code: the splits never share a product


# ---- synthetic feature stores ----

def split_sizes(n_test, fusion_ratio):
    "Products per split for a test split of n_test products"
    n_fusion = max(round(n_test * fusion_ratio), 200)
    return dict(fusion=n_fusion, valid=max(n_fusion // 4, 100), test=n_test)


def class_weights():
    "Zipf-like class frequencies: a few frequent classes, a long tail"
    w = 1.0 / (np.arange(N_CLASSES) + 20.0)
    return w / w.sum()


def write_split(path, split, n, d, protos, seed, chunk=4096):
    "A feature store of n products (pictures in product order, as the prediction path writes them); their classes"
    from cdkit.infer.features import FeatureWriter
    rng = np.random.default_rng([seed, SPLITS[split]])
    n_pics = rng.choice(4, n, p=PICTURES_P) + 1
    y = rng.choice(N_CLASSES, n, p=class_weights())
    pid = np.arange(n, dtype=np.int64) * 10 + SPLITS[split]
    scale = np.float32(1 / np.sqrt(1 + NOISE ** 2))
    w = FeatureWriter(path, int(n_pics.sum()), d, meta=dict(synthetic=True, split=split, seed=seed), overwrite=True)
    try:
        for a in range(0, n, chunk):
            p = n_pics[a:a + chunk]
            rows_y = np.repeat(y[a:a + chunk], p)
            img = np.arange(len(rows_y)) - np.repeat(np.cumsum(p) - p, p)
            x = protos[rows_y] + NOISE * rng.standard_normal((len(rows_y), d), dtype=np.float32)
            w.add(np.repeat(pid[a:a + chunk], p), img, x * scale)
        w.close()
    except BaseException:
        w.abort()
        raise
    np.save(Path(path).with_suffix(".labels.npy"), np.c_[pid, y])
    return int(n_pics.sum())


def labels(path):
    "product_id -> class of the store at `path` (a Series, as step 06b's `truth`)"
    import pandas as pd
    a = np.load(Path(path).with_suffix(".labels.npy"))
    return pd.Series(a[:, 1], index=a[:, 0])


def dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- measuring ----

def _status():
    "kB fields of /proc/self/status"
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"): out[k] = int(v.split()[0])
    return out


class Phase:
    "Wall and CPU time, and peak memory (MB) of this process over a `with` block; see the module docstring"

    def __init__(self, interval=0.01, uss_every=100): self.interval, self.uss_every = interval, uss_every

    def __enter__(self):
        try:  # reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        s = _status()
        self.anon0 = s["RssAnon"] / 1024
        self.anon = self.rss_file = self.uss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        try:
            import psutil
            proc = psutil.Process()
        except ImportError:
            proc = None
        i = 0
        while True:
            s = _status()
            self.anon, self.rss_file = max(self.anon, s["RssAnon"] / 1024), max(self.rss_file, s["RssFile"] / 1024)
            if proc is not None and i % self.uss_every == 0:
                self.uss = max(self.uss, proc.memory_full_info().uss / 2**20)
            i += 1
            if self._stop.wait(self.interval): return

    def __exit__(self, *_):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c
        self._stop.set()
        self._thread.join()
        s = _status()
        self.anon = max(self.anon, s["RssAnon"] / 1024)
        self.rss = s["VmHWM"] / 1024

    def result(self, **kw):
        return dict(wall=self.wall, cpu=self.cpu, anon_start=self.anon0, anon=self.anon, rss=self.rss,
                    rss_file=self.rss_file, uss=self.uss or float("nan"), hwm_reset=self.hwm_reset, **kw)


def time_reads(acc):
    "Wrap cdkit.infer.fusion.gather (every read of features: training batches and inference blocks) to add its seconds to acc[0]"
    from cdkit.infer import fusion
    orig = fusion.gather

    def gather(x, rows):
        t = time.perf_counter()
        out = orig(x, rows)
        acc[0] += time.perf_counter() - t
        return out

    fusion.gather = gather


# ---- the two methods ----

def mean_linear_spec(d):
    "A HeadSpec whose build() is the baseline: mean of a product's feature rows -> one Linear"
    import torch
    from torch import nn
    from cdkit.infer.fusion import HeadSpec

    class MeanLinear(nn.Module):
        "Logits from the mean of a product's real pictures' features"
        pos = None  # what fusion_to_store reads: no position embedding, MAX_PICTURES slots

        def __init__(self, d, n_classes):
            super().__init__()
            self.head = nn.Sequential(nn.Linear(d, n_classes))

        def forward(self, x, mask):
            m = mask.unsqueeze(-1).to(x.dtype)
            return self.head((x.float() * m).sum(1) / m.sum(1).clamp(min=1))

    class MeanLinearSpec(HeadSpec):
        def build(self): return MeanLinear(self.d, self.n_classes)

    torch.manual_seed(0)
    return MeanLinearSpec(d, N_CLASSES)


def run_method(a, method):
    "Child process: train one head on the fusion split and stream the test split through it; JSON results"
    import torch
    from cdkit.infer.features import load_features
    from cdkit.infer.fusion import FitSpec, HeadSpec, ProductSet, fusion_to_store, product_groups, train_head
    if a.threads: torch.set_num_threads(a.threads)
    reads = [0.0]
    time_reads(reads)
    folder = Path(a.out) / f"n{a.one}"
    spec = HeadSpec(a.d, N_CLASSES) if method == "fusion" else mean_linear_spec(a.d)
    res = dict(threads=torch.get_num_threads(), params=sum(p.numel() for p in spec.build().parameters()))
    with Phase() as ph:
        fs = {s: load_features(folder / f"{s}.features") for s in ("fusion", "valid")}
        g = {s: product_groups(f.product_id, f.img_idx) for s, f in fs.items()}
        y = {s: labels(folder / f"{s}.features").reindex(g[s].product_id).to_numpy() for s in fs}
        net, hist = train_head(spec, FitSpec(epochs=a.epochs, lr=a.lr, bs=a.bs), ProductSet(fs["fusion"].x, g["fusion"], y["fusion"]),
                               ProductSet(fs["valid"].x, g["valid"], y["valid"]), folder / method, method, device=a.device)
    res["train"] = ph.result(read=reads[0], acc=float(hist["accuracy"].iloc[-1]), products=len(g["fusion"]),
                             valid_products=len(g["valid"]), pictures=len(fs["fusion"]) + len(fs["valid"]))
    del fs, g, y
    reads[0] = 0.0
    out = folder / f"{method}_test.store"
    with Phase() as ph:
        ft = load_features(folder / "test.features")
        _, _, acc = fusion_to_store([net], ft, out, k=K, block=a.block, device=a.device,
                                    truth=labels(folder / "test.features"), progress=False)
    res["infer"] = ph.result(read=reads[0], acc=acc, products=len(np.unique(ft.product_id)), pictures=len(ft),
                             out_bytes=dir_bytes(out))
    Path(a.result).write_text(json.dumps(res))


def run_write(a):
    "Child process: write the three feature stores of one size; JSON results"
    folder = Path(a.out) / f"n{a.one}"
    sizes = split_sizes(a.one, a.fusion_ratio)
    res = {}
    with Phase() as ph:
        protos = np.random.default_rng(a.seed).standard_normal((N_CLASSES, a.d), dtype=np.float32)
        pics = {s: write_split(folder / f"{s}.features", s, n, a.d, protos, a.seed) for s, n in sizes.items()}
    res["write"] = ph.result(products=sum(sizes.values()), pictures=sum(pics.values()),
                             test_pictures=pics["test"], test_products=sizes["test"],
                             test_bytes=dir_bytes(folder / "test.features"))
    Path(a.result).write_text(json.dumps(res))


# ---- driver ----

def child(a, kind):
    "Run one kind (write, fusion, baseline) of one size in a fresh process; its JSON"
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--one", str(a.one), "--kind", kind, "--result", path, "--out", str(a.out),
           "--d", str(a.d), "--fusion-ratio", str(a.fusion_ratio), "--epochs", str(a.epochs), "--bs", str(a.bs),
           "--lr", str(a.lr), "--block", str(a.block), "--seed", str(a.seed), "--threads", str(a.threads or 0),
           "--device", a.device]
    env = dict(os.environ)
    if a.malloc_mmap_threshold: env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{kind} at {a.one:,} products failed:\n{p.stderr[-4000:]}")
    try:
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def fit(x, y):
    "Least-squares line y = a + b x (a constant when there is one point)"
    if len(x) < 2: return float(np.mean(y)), 0.0
    b, a0 = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a0), float(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4_000, 10_000, 25_000],
                    help="test products per size (at least one full block each, so that a block's memory is in the intercept)")
    ap.add_argument("--d", type=int, default=2048, help="feature width: 2048 ResNet-101's average pool, 4096 fastai's concat pool")
    ap.add_argument("--fusion-ratio", type=float, default=0.08, help="fusion products per test product (validation: a quarter of the fusion split)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per head (step 06b: 20)")
    ap.add_argument("--bs", type=int, default=128, help="products per training batch (step 06b's default)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--block", type=int, default=2048, help="products per inference block (step 06b's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0,
                    help="bytes: fix glibc's mmap threshold in the children (MALLOC_MMAP_THRESHOLD_); 0: glibc's dynamic one")
    ap.add_argument("--out", default=None, help="folder of the synthetic stores (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (else deleted at the end)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one and a.kind:
        if not a.threads: a.threads = None
        return run_write(a) if a.kind == "write" else run_method(a, a.kind)

    if min(a.sizes) < a.block:
        print(f"note: a size below one block ({a.block:,} products) fills it only partly: the memory line then "
              "mistakes the block's growth for the store's")
    made = a.out is None
    a.out = Path(a.out or tempfile.mkdtemp(prefix="fusion_bench_", dir="/tmp"))
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"d {a.d}  classes {N_CLASSES}  epochs {a.epochs}  bs {a.bs}  block {a.block}  k {K} (uint8)  device {a.device}  "
          f"fusion products {a.fusion_ratio} x test (+ a quarter for validation)  glibc mmap threshold "
          f"{a.malloc_mmap_threshold or 'dynamic'}  stores in {a.out}")
    rows, t0 = [], time.perf_counter()
    try:
        for n in sorted(a.sizes):
            a.one = n
            w = child(a, "write")["write"]
            rows.append(dict(size=n, phase="write", method="-", **w))
            for method in ("fusion", "baseline"):
                r = child(a, method)
                for phase in ("train", "infer"):
                    rows.append(dict(size=n, phase=phase, method=method, threads=r["threads"], params=r["params"],
                                     **r[phase]))
                print(f"  {n:,} test products: {method} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
            if not a.keep: shutil.rmtree(a.out / f"n{n}")
    finally:
        if not a.keep:
            for n in a.sizes: shutil.rmtree(a.out / f"n{n}", ignore_errors=True)
            if made: shutil.rmtree(a.out, ignore_errors=True)
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    report(rows, a)


def report(rows, a):
    import pandas as pd
    df = pd.DataFrame(rows)
    if not df["hwm_reset"].all():
        print("note: VmHWM could not be reset per phase; peak RSS is the process's since it started")
    t = df.assign(**{"test products": df["size"]})
    show = t[["test products", "phase", "method", "products", "pictures", "wall", "cpu", "read", "anon", "rss", "uss",
              "acc", "out_bytes"]].copy()
    show.columns = ["test products", "phase", "method", "products", "pictures", "wall s", "CPU s", "read s",
                    "peak anon MB", "peak RSS MB", "peak USS MB", "accuracy", "store MB"]
    show["store MB"] = show["store MB"] / 2**20
    print()
    print(show.to_string(index=False, na_rep="", formatters={
        "products": "{:,.0f}".format, "pictures": "{:,.0f}".format, "wall s": "{:.1f}".format, "CPU s": "{:.1f}".format,
        "read s": "{:.1f}".format, "peak anon MB": "{:,.0f}".format, "peak RSS MB": "{:,.0f}".format,
        "peak USS MB": "{:,.0f}".format, "accuracy": "{:.3f}".format, "store MB": "{:.1f}".format}))
    m = df[df.method != "-"]
    threads = int(m["threads"].iloc[0])
    print(f"\ntorch threads {threads}; heads: fusion {int(m[m.method == 'fusion'].params.iloc[0]):,} parameters, "
          f"baseline {int(m[m.method == 'baseline'].params.iloc[0]):,}; chance accuracy {1 / N_CLASSES:.4f}, "
          f"the most frequent class {class_weights().max():.4f}")

    # extrapolation: lines in products, per phase and method
    w = df[df.phase == "write"]
    feat_per_pic = (w["test_bytes"] / w["test_pictures"]).mean()
    inf = m[m.phase == "infer"]
    target = dict(train=FUSION_PRODUCTS, infer=TEST_PRODUCTS)
    what = dict(train=f"train one head, {a.epochs} epochs, fusion split of {FUSION_PRODUCTS:,} products "
                      f"(+ {FUSION_PRODUCTS // 4:,} validation)",
                infer=f"fusion_to_store, test split of {TEST_PRODUCTS:,} products / {TEST_PICTURES:,} pictures")
    print(f"\nExtrapolated linearly in products from {', '.join(f'{n:,}' for n in sorted(a.sizes))} test products "
          f"(block {a.block}, bs {a.bs}, d {a.d}, k {K} uint8, this CPU with {threads} torch threads):")
    ext = {}
    for phase in ("train", "infer"):
        print(f"  {what[phase]}")
        for method in ("fusion", "baseline"):
            r = m[(m.phase == phase) & (m.method == method)]
            x = r["products"].to_numpy()
            e = {}
            for col in ("wall", "cpu", "read", "anon"):
                a0, b = fit(x, r[col])
                e[col] = a0 + b * target[phase]
                e[col + "_slope"] = b
            ext[(phase, method)] = e
            ok = "within" if e["anon"] <= LIMIT_MB else "ABOVE"
            print(f"    {method:<8}  {e['wall'] / 60:8.1f} min wall  {e['cpu'] / 60:8.1f} min CPU  "
                  f"(reading features {e['read'] / 60:.1f} min)  peak anon {e['anon']:,.0f} MB "
                  f"({e['anon_slope'] * 1e6:,.1f} MB per million products over an intercept "
                  f"of {e['anon'] - e['anon_slope'] * target[phase]:,.0f} MB): {ok} 8 GB ({LIMIT_MB:,.0f} MB)")
        f, b = ext[(phase, "fusion")], ext[(phase, "baseline")]
        print(f"    fusion / baseline: {f['wall'] / b['wall']:.2f}x wall, {f['cpu'] / b['cpu']:.2f}x CPU, "
              f"{f['anon'] / b['anon']:.2f}x peak anon")
    if not a.malloc_mmap_threshold:
        print("  note: with glibc's dynamic mmap threshold most of the anonymous memory's growth is heap fragmentation, "
              "which slows down block after block (module docstring): these peaks are upper bounds; "
              "--malloc-mmap-threshold 131072 measures what grows with the store")
    store_per_pic = (inf["out_bytes"] / inf["pictures"]).mean()
    print(f"  disk: test features {feat_per_pic:,.0f} B/picture -> {feat_per_pic * TEST_PICTURES / 1e9:,.1f} GB for "
          f"{TEST_PICTURES:,} pictures (fusion split: {feat_per_pic * FUSION_PRODUCTS * 1.75 / 1e9:,.1f} GB); "
          f"fusion member store {store_per_pic:,.1f} B/picture -> {store_per_pic * TEST_PICTURES / 1e9:,.2f} GB")
    print(f"  page cache: fusion_to_store touches every feature page once, so the process's RSS (not its anonymous "
          f"memory) grows toward the features' {feat_per_pic * TEST_PICTURES / 1e9:,.1f} GB as far as free memory "
          f"allows; those pages are clean and reclaimable")
    per_epoch = ext[("train", "fusion")]["wall"] / a.epochs
    fi = ext[("infer", "fusion")]
    three = fi["read"] + 3 * (fi["wall"] - fi["read"])  # 3 heads: one read of each block, 3 forwards
    print(f"  step 06b with its defaults (20 epochs x 2 variants x 3 seeds = 6 heads; each variant's 3 heads through "
          f"fusion_to_store): about {6 * 20 * per_epoch / 3600:,.1f} h of training and {2 * three / 3600:,.1f} h of "
          f"test inference on this CPU (validation products on top)")


if __name__ == "__main__":
    main()
