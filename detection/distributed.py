"""Thin helpers over ``torch.distributed`` for runs started by ``torchrun`` (or a single process)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "any_rank",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "reduce_mean",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device_kind: str) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Uses ``nccl`` when training on CUDA and ``gloo`` on CPU. Without ``WORLD_SIZE`` > 1 in the
    environment nothing is initialised (a plain single-process run).

    Returns:
        ``(rank, world_size, local_rank)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_distributed():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return rank, world_size, local_rank


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_mean(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over ranks (for logging); a no-op average in single-process runs."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].detach().float() for k in keys])
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= get_world_size()
    return {k: float(v) for k, v in zip(keys, stacked.cpu())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
