"""Data-parallel training over processes started by `accelerate launch` / `torchrun`, on GPUs (NCCL)
or on CPUs (gloo, which is how CI checks this path).

fastai 2.8's `distrib_ctx` assumes CUDA in two places, both fixed here by small subclasses rather
than by patching fastai:

1. `DistributedTrainer` builds `Accelerator(**kwargs)`. Without CUDA and without `cpu=True`,
   accelerate does not see a distributed set-up and `prepare` hands back the model unwrapped, and
   `_wrap_dl` then reads `model.device`, which a plain `nn.Module` does not have. `Trainer` passes
   `cpu=True` when there is no GPU (accelerate then joins a gloo process group and wraps the model in
   DDP) and takes the device from the model's parameters, which works wrapped or not.
2. `DistributedDL._broadcast` shares rank 0's shuffled indices with a CUDA tensor, "nccl only works
   with cuda tensors"; gloo cannot take one. `BroadcastDL` puts the tensor on the device the process
   group's backend wants.

Use: `with distrib_ctx(learn): learn.fit(...)` in every process; a no-op for a single process.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from fastai.distributed import DistributedDL, DistributedTrainer

log = logging.getLogger(__name__)


def world_size() -> int:
    "Processes in this training (WORLD_SIZE set by the launcher; 1 without one)"
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def _launcher_processes(cmdline):
    "The --num_processes of an `accelerate launch` command line (a list of arguments), or None"
    if "launch" not in cmdline: return None
    for i, a in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(cmdline) and cmdline[i + 1].isdigit(): return int(cmdline[i + 1])
            if a.startswith(flag + "="): return int(a.split("=", 1)[1]) if a.split("=", 1)[1].isdigit() else None
    return None


def check_launch(parent_cmdline=None):
    """Refuse a run that `accelerate launch` started as one process although it was asked for several:
    `--cpu --num_processes N` without `--multi_gpu` takes accelerate's single-process path silently.
    `parent_cmdline` (tests): the launcher's arguments; default read from /proc (Linux)."""
    if world_size() > 1 or not any(k.startswith("ACCELERATE_") for k in os.environ): return
    if parent_cmdline is None:
        try:
            parent_cmdline = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            return
    n = _launcher_processes(parent_cmdline)
    if n and n > 1:
        from cdkit.base.params import ParamsError
        raise ParamsError(f"accelerate launch asked for {n} processes but started one: without --multi_gpu (e.g. with "
                          f"--cpu) accelerate runs a single process. Use `accelerate launch --multi_gpu --num_processes "
                          f"{n} -m cdkit train ...` (without --cpu; on a machine without GPUs it trains over gloo), or "
                          "answer `accelerate config` once")


def init_state():
    """accelerate's process state (joins the process group when launched with several processes):
    NCCL on GPUs, gloo on CPUs. `.device` is this process's device, `.main_process_first()` a
    context manager for work only one process should do first (e.g. building the data indices)."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


class BroadcastDL(DistributedDL):
    "A DistributedDL that broadcasts rank 0's indices on the device of the process group's backend"

    def _broadcast(self, t, rank):
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = torch.tensor(t, dtype=torch.long, device=device)
        torch.distributed.broadcast(t, rank)
        return t.cpu().tolist()


class Trainer(DistributedTrainer):
    "fastai's DistributedTrainer that also runs on CPUs (gloo): see the module docstring"

    def __init__(self, sync_bn=True, **kwargs):
        if not torch.cuda.is_available():
            kwargs.setdefault("cpu", True)
            sync_bn = False  # SyncBatchNorm runs on GPUs only
        super().__init__(sync_bn=sync_bn, **kwargs)

    def before_fit(self):
        super().before_fit()
        log.info("rank %d/%d: %s over %s, %d training batches per epoch", rank(), world_size(),
                 type(self.learn.model).__name__, torch.distributed.get_backend(), len(self.learn.dls.train))

    def _wrap_dl(self, dl):
        if isinstance(dl, DistributedDL): return dl
        return BroadcastDL(dl, device=next(self.learn.model.parameters()).device)


@contextmanager
def distrib_ctx(learn, sync_bn=True, **accelerator_kw):
    "Train `learn` data-parallel inside the block when launched with several processes"
    if world_size() <= 1:
        yield learn
        return
    from fastai.callback.progress import ProgressCallback
    learn.add_cb(Trainer(sync_bn, **accelerator_kw))
    quiet = rank() > 0 and hasattr(learn, "progress")  # one progress bar, rank 0's
    if quiet: learn.remove_cb(ProgressCallback)
    try:
        yield learn
    finally:
        learn.remove_cb(Trainer)
        if quiet: learn.add_cb(ProgressCallback())
