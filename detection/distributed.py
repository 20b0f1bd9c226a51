"""Thin helpers over ``torch.distributed`` for runs started by ``torchrun`` (or a single process).

Every collective is bounded by the process group's timeout (``train.dist_timeout``). Each helper
first records, in the process group's store, how many collectives this rank has entered; when one
times out, :class:`DistributedTimeout` names the ranks that never reached it. The collectives that
``DistributedDataParallel`` runs itself are counted the same way: each training step is entered
through :func:`bounded` and each gradient-bucket all-reduce through the communication hook of
:func:`count_gradient_all_reduces`, so a rank stopped inside a step is named too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = [
    "DistributedTimeout",
    "all_gather_object",
    "any_rank",
    "barrier",
    "bounded",
    "cleanup",
    "count_gradient_all_reduces",
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


def _enter() -> Any:
    """Count one more collective entered by this rank and record it in the store (which it returns)."""
    global _entered
    _entered += 1
    store = _store()
    if store is not None:
        store.set(f"detection/entered/{get_rank()}", str(_entered))
    return store


def _is_timeout(exc: RuntimeError) -> bool:
    # gloo and nccl report a timeout as RuntimeError (DistBackendError), also through DDP's futures
    text = str(exc).lower()
    return not isinstance(exc, DistributedTimeout) and ("timed out" in text or "timeout" in text)


def _timeout_error(what: str, store: Any) -> DistributedTimeout:
    missing = _ranks_behind(store, _entered)
    who = f"rank(s) {', '.join(map(str, missing))} did not" if missing else "another rank did not"
    return DistributedTimeout(
        f"rank {get_rank()}: {who} reach {what} within train.dist_timeout={_timeout_s:g}s (stalled or stopped); "
        "stopping. Check that process, or raise train.dist_timeout for slow steps."
    )


def _bounded(what: str, fn: Callable[[], Any]) -> Any:
    """Run the collective ``fn``; a timeout becomes :class:`DistributedTimeout` naming the missing ranks."""
    with bounded(what):
        return fn()


@contextlib.contextmanager
def bounded(what: str) -> Iterator[None]:
    """Run a block of collectives that torch issues itself (a ``DistributedDataParallel`` step) as one of ours.

    Entering the block counts as a collective entered; a collective timeout inside it becomes
    :class:`DistributedTimeout` naming the ranks that entered fewer collectives (with
    :func:`count_gradient_all_reduces`, each gradient bucket's all-reduce counts too). ``what`` names
    the collectives in the message. Nothing happens without a process group.
    """
    if not is_distributed():
        yield
        return
    store = _enter()
    try:
        yield
    except RuntimeError as exc:
        if not _is_timeout(exc):
            raise
        raise _timeout_error(what, store) from None


def count_gradient_all_reduces(model: nn.parallel.DistributedDataParallel) -> None:
    """Count each gradient-bucket all-reduce of ``model`` as a collective entered (DDP's communication hook).

    The all-reduce itself is torch's default one (``allreduce_hook``: gradients averaged over ranks);
    recording it lets a rank that times out inside :func:`bounded` name the ranks that stopped
    before their backward pass reached it.
    """

    # Unannotated: DDP checks a hook's annotations as objects, and this module's are strings.
    def counted_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        _enter()
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, counted_allreduce)


def _ranks_behind(store: Any, entered: int) -> list[int]:
    if store is None:
        return []
    store.set_timeout(datetime.timedelta(seconds=5))
    behind = []
    for r in range(get_world_size()):
        if r == get_rank():
            continue
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
