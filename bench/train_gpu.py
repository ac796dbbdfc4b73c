"""Training throughput (images/s) per study backbone at the study's input sizes: forward, backward and
optimizer step on random batches (no data loading), bf16 autocast + channels_last on a GPU.

    python bench/train_gpu.py                      # every study backbone, batch 64
    python bench/train_gpu.py --arch resnet101 --bs 160 --steps 30

Report only. Without a GPU it says so and measures a tiny CPU figure (64 px, batch 8) instead, to
show the script works; those numbers say nothing about GPU training.
"""
from __future__ import annotations

import argparse
import time

import torch

from cdkit.models import STUDY, create_model


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", default=list(STUDY), help="backbones (study names or timm names)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    a = p.parse_args(argv)
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


if __name__ == "__main__":
    main()
