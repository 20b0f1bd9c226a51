"""Thin helpers over ``torch.distributed`` for runs started by ``torchrun`` (or a single process).

Every collective is bounded by the process group's timeout (``train.dist_timeout``). Each helper
first records, in the process group's store, how many collectives this rank has entered; when one
times out, :class:`DistributedTimeout` names the ranks that never reached it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedTimeout",
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


class DistributedTimeout(RuntimeError):
    """A collective did not complete within ``train.dist_timeout``: another rank stalled or died."""


_entered = 0  # collectives this process has entered
_timeout_s = 0.0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device_kind: str, timeout_s: float = 300.0) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Uses ``nccl`` when training on CUDA and ``gloo`` on CPU; every collective waits at most
    ``timeout_s`` seconds. Without ``WORLD_SIZE`` > 1 in the environment nothing is initialised
    (a plain single-process run).

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
        global _timeout_s
        _timeout_s = timeout_s
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world_size, local_rank


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def _store() -> Any:
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    return getter() if getter is not None else None


def _bounded(what: str, fn: Callable[[], Any]) -> Any:
    """Run the collective ``fn``; a timeout becomes :class:`DistributedTimeout` naming the missing ranks."""
    global _entered
    _entered += 1
    store, rank = _store(), get_rank()
    if store is not None:
        store.set(f"detection/entered/{rank}", str(_entered))
    try:
        return fn()
    except RuntimeError as exc:  # gloo and nccl report a timeout as RuntimeError (DistBackendError)
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        missing = _ranks_behind(store, _entered)
        who = f"rank(s) {', '.join(map(str, missing))} did not" if missing else "another rank did not"
        raise DistributedTimeout(
            f"rank {rank}: {who} reach {what} within train.dist_timeout={_timeout_s:g}s (stalled or stopped); "
            "stopping. Check that process, or raise train.dist_timeout for slow steps."
        ) from None


def _ranks_behind(store: Any, entered: int) -> list[int]:
    if store is None:
        return []
    store.set_timeout(datetime.timedelta(seconds=5))
    behind = []
    for r in range(get_world_size()):
        try:
            if int(store.get(f"detection/entered/{r}")) < entered:
                behind.append(r)
        except RuntimeError:
            behind.append(r)
    return behind


def barrier() -> None:
    if is_distributed():
        _bounded("a barrier", dist.barrier)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    _bounded("all_gather_object", lambda: dist.all_gather_object(out, obj))
    return out


def reduce_mean(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over ranks (for logging); a no-op average in single-process runs."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].detach().float() for k in keys])
    if is_distributed():
        _bounded("all_reduce (loss averages)", lambda: dist.all_reduce(stacked))
        stacked /= get_world_size()
    return {k: float(v) for k, v in zip(keys, stacked.cpu())}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    _bounded("all_reduce (finite-step check)", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
    return bool(t.item() > 0)
