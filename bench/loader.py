"""Training loader throughput per worker next to the bare JPEG decode rate of the same pictures.

    python bench/loader.py                   # writes the `demo` synthetic preset to a temp folder
    python bench/loader.py --data data/demo  # a folder with train.bson + category_names.csv

Prints, for the same pictures:
  1. decode only (bytes already in memory, one process): simplejpeg, torchvision.io.decode_jpeg, PIL;
  2. the real training DataLoader (cdkit.data.loaders: pread + decode + random crop + collate) with
     num_workers=0 and 1, without the batch transforms (those run on the GPU in training), and its
     ratio to the bare simplejpeg rate (target >= 70%).
Each rate is given per wall second and per CPU second of the process that decodes (the worker's,
read from RUSAGE_CHILDREN once it has been joined, so it includes the worker's start). On a machine
shared with other jobs the per CPU second figures are the ones to compare.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_seconds(children=False):
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rate(fn, items):
    "(pictures per wall second, pictures per CPU second) of one pass"
    c0, t0 = cpu_seconds(), time.perf_counter()
    for it in items: fn(it)
    return len(items) / (time.perf_counter() - t0), len(items) / (cpu_seconds() - c0)


def decoders():
    import simplejpeg
    from PIL import Image
    from torchvision.io import decode_jpeg
    return {
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
        "torchvision": lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
        "PIL": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
    }


def loader_rate(ds, bs, num_workers):
    """(pictures per wall second, pictures per CPU second of the process that decodes) of one epoch
    of the training DataLoader without batch transforms; the first batch (worker start) excluded from
    the wall time. A worker's CPU time is read from RUSAGE_CHILDREN once it has been joined."""
    from cdkit.data.loaders import picture_dl
    dl = picture_dl(ds, bs=bs, num_workers=num_workers, shuffle=True, drop_last=True, device="cpu", seed=0)
    c0, k0 = cpu_seconds(), cpu_seconds(children=True)
    it = iter(dl)
    x, y = next(it)
    n, t0 = 0, time.perf_counter()
    for x, y in it: n += len(x)
    wall = n / (time.perf_counter() - t0)
    del it  # joins the worker, whose CPU time then shows in RUSAGE_CHILDREN
    cpu = (cpu_seconds(children=True) - k0) if num_workers else (cpu_seconds() - c0)
    return wall, (n + len(x)) / cpu, tuple(x.shape), x.dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder with train.bson and category_names.csv (default: synth demo in a temp dir)")
    p.add_argument("--n", type=int, default=4000, help="pictures for the decode-only rates")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--item-size", type=int, default=160)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best is kept")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # as in DataLoader workers (fastai sets one thread there)

    from cdkit.data.bsonfile import build_index, image_table
    from cdkit.data.loaders import PictureDataset
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else Path(tmp) / "demo"
        if not a.data:
            from cdkit.data.synth import write_dataset
            t0 = time.perf_counter()
            write_dataset(data, preset="demo", seed=0)
            print(f"wrote the synthetic demo preset to {data} in {time.perf_counter() - t0:.1f} s")
        images = image_table(build_index(data / "train.bson"))
        images["label"] = 0
        ds = PictureDataset(images, data / "train.bson", a.item_size, crop="random", split_idx=0)
        rows = np.random.default_rng(0).permutation(len(images))[:a.n]
        jpegs = [ds.jpeg(i) for i in rows]
        print(f"{len(images):,} pictures in {data / 'train.bson'}; decode rates on {len(jpegs):,} of them "
              f"(mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB), one process, one thread, bytes in memory:")
        # The rates are interleaved over rounds and the best round kept, since other processes may
        # share the CPUs; per CPU second rates are the steadier figure on a busy machine.
        best = {}
        def keep(key, wall, cpu):
            w0, c0 = best.get(key, (0, 0))
            best[key] = (max(w0, wall), max(c0, cpu))
        dec = decoders()
        for _ in range(a.rounds):
            for name, f in dec.items(): keep(name, *rate(f, jpegs))
            keep("pread+decode", *rate(ds.decode_row, rows))
            for w in (0, 1):
                wall, cpu, shape, dtype = loader_rate(ds, a.bs, w)
                keep(f"loader w={w}", wall, cpu)
        bare_w, bare_c = best["simplejpeg"]
        for name in (*dec, "pread+decode"):
            w, c = best[name]
            print(f"  {name:14s} {w:7,.0f} pictures/s wall, {c:7,.0f} per CPU second ({c / bare_c:.0%} of simplejpeg)")
        print(f"training DataLoader (pread + decode + random crop {a.item_size} + collate, bs={a.bs}, "
              f"batches {shape} {dtype}), {len(ds):,} pictures an epoch:")
        for w in (0, 1):
            wall, cpu = best[f"loader w={w}"]
            print(f"  num_workers={w}: {wall:7,.0f} pictures/s wall ({wall / bare_w:.0%} of bare decode), "
                  f"{cpu:7,.0f} per CPU second of the decoding process ({cpu / bare_c:.0%} of bare decode)")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"bad pictures: {ds.bad_pictures}")


if __name__ == "__main__":
    main()
