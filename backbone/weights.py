"""Resolve and load weights: local checkpoint files or torchvision weight names, always ``weights_only``.

Every load goes through :func:`read_checkpoint`, which calls ``torch.load(..., weights_only=True)``, so
a checkpoint can never run code. Key and shape mismatches are reported by name, with both shapes, and
the file they came from.
"""

from __future__ import annotations

import os
import pickle
import socket
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsError",
    "load_state_dict_checked",
    "read_checkpoint",
    "read_checkpoint_and_extras",
    "resolve_torchvision_weights",
]

_MAX_LISTED = 5


class WeightsError(RuntimeError):
    """A weights file could not be read, or does not fit the model."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``path`` with ``torch.load(weights_only=True)``.

    Accepts a plain state dict (torchvision's format), or a dict that holds one under ``"model"``,
    ``"state_dict"`` or ``"model_state"`` (our training checkpoints, and common trainer formats).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: the file is truncated, not a PyTorch file, unsafe to unpickle, or holds no state dict.
    """
    return read_checkpoint_and_extras(path)[0]


def read_checkpoint_and_extras(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Like :func:`read_checkpoint`, also returning the file's other top-level entries (for a training
    checkpoint: ``config``, ``categories``, ``iteration``...; empty for a plain state dict)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files from torch < 1.6 are raw pickles (protocol byte 0x80).
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file): it starts with "
            f"{head!r}, while torch.save writes a zip archive starting with b'PK'"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc) and "Unsupported class" not in str(exc):
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file): {exc}") from exc
        raise WeightsError(
            f"{path}: refused to load: the file holds objects other than tensors and plain containers, and loading "
            f"it could run code (torch.load weights_only=True). Re-save just the state dict. Detail: {exc}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise WeightsError(
            f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file): {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner), {k: v for k, v in obj.items() if k != key}
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj), {}
        keys = list(obj)[:_MAX_LISTED]
        raise WeightsError(
            f"{path}: expected a state dict (parameter name -> tensor) or a dict holding one under 'model' or "
            f"'state_dict'; found a dict with keys {keys}"
        )
    raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor), found a {type(obj).__name__}")


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state_dict`` into ``module`` strictly, with an error that names keys and shapes.

    Args:
        module: destination.
        state_dict: tensors by parameter name.
        source: where the tensors came from (a file path or a description), used in messages.
        ignore_prefixes: keys in ``state_dict`` starting with these are dropped first (``fc.`` for an
            ImageNet classifier, ``layer4.`` when the body stops at C4).

    Raises:
        WeightsError: shape mismatches, missing or unexpected keys, listing the first few of each.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise WeightsError(
            f"{source}: {len(mismatched)} tensor(s) have the wrong shape for this model, first: "
            + "; ".join(mismatched[:_MAX_LISTED])
            + ". Check that the checkpoint matches the architecture (backbone name, num_classes, FPN width)."
        )
    result = module.load_state_dict(sd, strict=False)
    # BN's batch counter is not a weight: checkpoints made with FrozenBatchNorm2d do not carry it.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[:_MAX_LISTED]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:_MAX_LISTED]}")
        raise WeightsError(
            f"{source}: the checkpoint does not match the model: " + "; ".join(parts)
            + ". A checkpoint of a different architecture, or a wrapper that renamed the keys (e.g. 'module.' "
            "from DistributedDataParallel), causes this."
        )


def resolve_torchvision_weights(arch: str, name: str) -> tuple[str, str]:
    """Map a torchvision weights name for ``arch`` to ``(qualified name, url)``.

    ``name`` may be a member (``"IMAGENET1K_V2"``), ``"DEFAULT"``, or fully qualified
    (``"ResNet50_Weights.IMAGENET1K_V2"``).
    """
    from torchvision.models import get_model_weights, get_weight

    enum_cls = get_model_weights(arch)
    if "." in name:
        try:
            weights = get_weight(name)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"unknown torchvision weights {name!r} ({exc})") from exc
        if type(weights) is not enum_cls:
            raise ValueError(f"weights {name!r} belong to another model; {arch} takes {enum_cls.__name__}.*")
    else:
        members = [m for m in enum_cls.__members__]
        if name not in members:
            raise ValueError(
                f"unknown weights {name!r} for {arch}; torchvision offers {members}, or pass a local file path"
            )
        weights = enum_cls[name]
    return f"{enum_cls.__name__}.{weights.name}", weights.url


def fetch_torchvision_weights(arch: str, name: str, *, timeout_s: float = 20.0) -> Path:
    """Return the local file of a torchvision weights name, downloading it into torch's cache if needed.

    Raises:
        WeightsError: the file is not cached and cannot be downloaded; the message says how to pass a
            local file instead.
    """
    qualified, url = resolve_torchvision_weights(arch, name)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cache.is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(url, str(cache), progress=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ssl, timeout)
        raise WeightsError(
            f"could not download torchvision weights {qualified} from {url} ({type(exc).__name__}: {exc}). "
            f"This machine looks offline. Download the file where there is network access and either pass its "
            f"path (weights: /path/to/{os.path.basename(url)}) or copy it to {cache} and keep the name."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    return cache
