"""Where tensors go: one rule for every step and loader of the kit."""
from __future__ import annotations


def pick_device(name=None):
    """`name` as a torch.device (cpu, cuda, cuda:1, or a torch.device); None or "": the GPU when there is
    one, else the CPU"""
    import torch
    if name: return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
