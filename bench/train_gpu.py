"""Training throughput (images/s) per study backbone at the study's input sizes: forward, backward and
optimizer step on random batches (no data loading), bf16 autocast + channels_last on a GPU.

    python bench/train_gpu.py                      # every study backbone, batch 64
    python bench/train_gpu.py --arch resnet101 --bs 160 --steps 30
    python bench/train_gpu.py --end-to-end --arch resnet101 --bs 160 --workers 8 --data-dir data/cdiscount

--end-to-end runs the kit's real path beside the model-only figure: pictures read from a BSON file and
decoded by `cdkit.data.loaders.make_dataloaders`' workers, batch transforms on the device, the Learner of
`cdkit.train.models.make_learner` with the precision callbacks, timed step by step with
`cdkit.base.instrument.StepTimer`. It prints end-to-end images/s, the ratio end-to-end / model-only (1.0:
the input pipeline costs nothing; 0.5: half the step is spent outside the model) and the share of
each part of a step (data wait, transfer, augmentation, forward, backward, each callback). Without
--data-dir it writes a small synthetic set (cdkit.data.synth) to a temporary folder.

Report only. Without a GPU it says so and measures a tiny CPU figure (64 px, batch 8) instead, to
show the script works; those numbers say nothing about GPU training.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelFitException

from cdkit.train.models import STUDY, create_model


def images_per_s(arch, size, bs, steps, device, bf16, channels_last, n_classes=5270, warmup=3):
    model = create_model(arch, n_classes).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(bs, 3, size, size, device=device).to(memory_format=fmt)
    y = torch.randint(0, n_classes, (bs,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda": torch.cuda.synchronize()
            t0 = time.perf_counter()
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda": torch.cuda.synchronize()
    return bs * steps / (time.perf_counter() - t0)


class StopAfterSteps(Callback):
    "End fit after n training steps"
    order = 200
    def __init__(self, n): self.n = n
    def before_fit(self): self.done = 0
    def after_batch(self):
        if not self.training: return
        self.done += 1
        if self.done >= self.n: raise CancelFitException()


def end_to_end(arch, size, bs, steps, workers, device, bf16, channels_last, data_dir=None, skip=2):
    """Images/s of real training steps (loader, batch transforms, learner, callbacks) and the StepTimer
    summary; the data is `data_dir` (train.bson, category_names.csv) or a small synthetic set"""
    from cdkit.train.callbacks import precision_callbacks
    from cdkit.data.loaders import make_dataloaders
    from cdkit.base.instrument import StepTimer
    from cdkit.data.bsonfile import build_index, image_table
    from cdkit.data.catalog import Catalog
    from cdkit.train.models import make_learner
    from cdkit.data.split import attach_split, make_split
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            from cdkit.data.synth import write_dataset
            data_dir = Path(tmp) / "data"
            write_dataset(data_dir, "tiny", n_train_products=max(150, 3 * bs * (steps + skip) // 4))
        catalog, bson_path = Catalog.from_csv(Path(data_dir) / "category_names.csv"), Path(data_dir) / "train.bson"
        index = build_index(bson_path)
        images = image_table(index)  # as the prepare step builds it: labels and the validation fold
        images["label"] = catalog.to_class(images["category_id"].to_numpy())
        images["fold"] = attach_split(images, make_split(index, valid_frac=0.05))
        dls = make_dataloaders(images, bson_path, catalog.n_classes, size=size, item_size=size, bs=bs,
                               num_workers=workers, device=device)
        cbs, note = precision_callbacks("bf16" if bf16 else "none", channels_last, device)
        learn = make_learner(dls, arch, catalog.n_classes, cbs=cbs)
        timer = StepTimer(sync=device.type == "cuda", skip=skip)
        n_steps = min(steps + skip, len(dls.train))
        learn.fit(1, lr=1e-4, cbs=[timer, StopAfterSteps(n_steps)])
        summary = timer.summary()
        ips = bs * summary.attrs["steps"] / summary.attrs["step_seconds"]
        return ips, summary, note, len(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", default=list(STUDY), help="backbones (study names or timm names)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--end-to-end", action="store_true", help="also time real training steps: loader + learner + callbacks")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (--end-to-end)")
    p.add_argument("--data-dir", default=None, help="train.bson + category_names.csv for --end-to-end (default: synthetic)")
    a = p.parse_args(argv)
    if a.end_to_end: return main_end_to_end(a)
    cuda = torch.cuda.is_available()
    if not cuda:
        print("no GPU present: a tiny CPU figure only (64 px, batch 8, 2 steps, fp32)")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name()}  bf16={not a.no_bf16}  channels_last={not a.no_channels_last}")
    print(f"{'arch':<14}{'size':>6}{'batch':>7}{'images/s':>11}")
    for arch in a.arch:
        size = STUDY[arch].size if arch in STUDY else 180
        if cuda:
            ips = images_per_s(arch, size, a.bs, a.steps, device, not a.no_bf16, not a.no_channels_last)
        else:
            size = 75 if arch.startswith("inception") else 64  # Inception needs >= 75 px
            ips = images_per_s(arch, size, 8, 2, device, False, False, warmup=1)
        print(f"{arch:<14}{size:>6}{(a.bs if cuda else 8):>7}{ips:>11.1f}", flush=True)


def main_end_to_end(a):
    "Model-only and end-to-end images/s of each --arch, their ratio, and where an end-to-end step goes"
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name()}  bf16={not a.no_bf16}  channels_last={not a.no_channels_last}")
    else:
        print("no GPU present: end-to-end on the CPU, tiny setting (64 px, batch 8, fp32); the ratio and shares show "
              "the method works, not what a GPU would do")
    bs, steps = (a.bs, a.steps) if cuda else (8, 8)
    bf16, cl = cuda and not a.no_bf16, cuda and not a.no_channels_last
    for arch in a.arch:
        size = (STUDY[arch].size if arch in STUDY else 180) if cuda else (75 if arch.startswith("inception") else 64)
        model_only = images_per_s(arch, size, bs, steps, device, bf16, cl, warmup=2 if cuda else 1)
        ips, summary, note, n_pics = end_to_end(arch, size, bs, steps, a.workers, device, bf16, cl, a.data_dir)
        print(f"\n{arch} {size}px batch {bs}, {a.workers} loader workers, {summary.attrs['steps']} timed steps"
              f"{' (' + note + ')' if note else ''}")
        print(f"  model only {model_only:,.1f} images/s   end-to-end {ips:,.1f} images/s   "
              f"ratio end-to-end / model-only {ips / model_only:.2f}")
        for part, sec, ms, share in summary.itertuples(index=False):
            print(f"  {part:<26}{ms:>9.1f} ms/step{share:>8.1%}")


if __name__ == "__main__":
    main()
