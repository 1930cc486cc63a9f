"""Process-group setup for single-process and torchrun (multi-process, multi-node) training.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python` run has none of
them and trains in one process without a process group. NCCL is used when every process has a GPU, gloo
otherwise (CPU).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None for a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistContext(0, 1, 0, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int) -> None:
    """Different but reproducible streams per rank (else every rank draws the same latents and crops)."""
    s = seed + 1009 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around a network when there is a process group (the module itself otherwise).

    Every parameter takes part in every forward (per-domain heads are all evaluated then selected), so
    `find_unused_parameters` stays off; this also allows several forwards of one network before a backward,
    which the StarGAN v2 steps need (e.g. the style encoder on the fake and on the real image).
    The networks have no buffers (instance norm without running statistics): nothing to broadcast.
    """
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


@contextlib.contextmanager
def no_sync(*modules: nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce of networks whose gradients this step throws away (e.g. D in a G step)."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            if isinstance(m, DistributedDataParallel):
                stack.enter_context(m.no_sync())
        yield


def allreduce_grads_(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients of parameters outside DDP (the texture aggregation) over all ranks."""
    if not ctx.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def allreduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of logged scalars over ranks (so rank 0's log describes the whole batch)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when the flag is true on any rank (stop signals, non-finite losses)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
