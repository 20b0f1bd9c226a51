"""Read and load backbone weights: local state-dict files or torchvision weight names, always ``weights_only``.

Every file is read by :func:`safe_load`, which calls ``torch.load(..., weights_only=True)``, so a
checkpoint can never run code. Key and shape mismatches are reported by name, with both shapes, and
the file they came from. The backbone reads plain state dicts (torchvision's ImageNet files);
checkpoint formats that wrap one belong to their readers (``detection.weights`` for detectors).
"""

import os
import pickle
import warnings
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import LEVELS
from .deform import offset_state_keys

__all__ = [
    "WeightsError",
    "is_state_dict",
    "load_backbone_weights",
    "load_state_dict_checked",
    "load_torchvision_weights",
    "read_checkpoint",
    "resolve_torchvision_weights",
    "safe_load",
]

_MAX_LISTED = 5


class WeightsError(RuntimeError):
    """A weights file could not be read, or does not fit the model."""


def _truncated(path: Path, detail: str) -> WeightsError:
    return WeightsError(f"{path}: truncated PyTorch checkpoint ({detail}): the file was cut short; copy or download it again")


def _refused(path: Path) -> WeightsError:
    try:
        found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
    except Exception:  # the listing is a courtesy; the refusal stands without it
        found = "unknown"
    return WeightsError(
        f"{path}: refused to load: the file holds Python objects ({found}), not only tensors and plain containers, "
        "and unpickling them could run code. List them without running anything: "
        f"python -c \"import torch; print(torch.serialization.get_unsafe_globals_in_checkpoint('{path}'))\"; "
        "if you trust the file, load it with torch.load(weights_only=False) and re-save only its state dict"
    )


def safe_load(path: str | os.PathLike[str]) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what is wrong.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: the file is truncated, not a PyTorch file, or holds Python objects that
            unpickling could run code for (the message lists them and how to inspect the file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files from torch < 1.6 are raw pickles (protocol byte 0x80).
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise _truncated(path, "its zip archive has no end record")
    if not head.startswith((b"PK", b"\x80")):
        raise WeightsError(
            f"{path}: not a PyTorch checkpoint: it starts with {head!r}, while torch.save writes a zip archive "
            "starting with b'PK'"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise _refused(path) from exc
        if "truncated" in str(exc):
            raise _truncated(path, str(exc)) from exc
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint: {exc}") from exc
    except (EOFError, zipfile.BadZipFile) as exc:
        raise _truncated(path, f"{type(exc).__name__}: {exc}") from exc
    except (RuntimeError, ValueError, OSError, KeyError, IndexError) as exc:
        # A pickle that torch.load cannot interpret (e.g. a plain Python pickle) fails with KeyError / IndexError.
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def is_state_dict(obj: object) -> bool:
    """Whether ``obj`` is a non-empty mapping of parameter names to tensors."""
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a plain state dict (torchvision's ImageNet format) from ``path`` with :func:`safe_load`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: unreadable or unsafe file, or not a plain state dict (a training or detector
            checkpoint that wraps one is named as such, with what to do instead).
    """
    obj = safe_load(path)
    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        wrapped = next((k for k in ("model", "state_dict") if is_state_dict(obj.get(k))), None)
        if wrapped is not None:
            raise WeightsError(
                f"{path}: a training or detector checkpoint (its state dict is under {wrapped!r}), not backbone weights; "
                "the backbone reads a plain state dict such as torchvision's ImageNet files. Load a detector "
                f"checkpoint into the detector (detection.load_weights), or save the part you need: "
                f"torch.save(checkpoint[{wrapped!r}], 'weights.pth')"
            )
        keys = list(obj)[:_MAX_LISTED]
        raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor); found a dict with keys {keys}")
    raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor), found a {type(obj).__name__}")


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    ignore_prefixes: tuple[str, ...] = (),
    new_keys: Collection[str] = (),
) -> list[str]:
    """Load ``state_dict`` into ``module`` strictly, with an error that names keys and shapes.

    Args:
        module: destination.
        state_dict: tensors by parameter name.
        source: where the tensors came from (a file path or a description), used in messages.
        ignore_prefixes: keys in ``state_dict`` starting with these are dropped first (``fc.`` for an
            ImageNet classifier, ``layer4.`` when the body stops at C4).
        new_keys: keys of ``module`` the checkpoint may lack (parts the source architecture does
            not have, such as deformable-conv offsets); they keep their initialisation.

    Returns:
        The keys of ``new_keys`` the checkpoint lacked, in the module's order.

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
    allowed = set(new_keys)
    kept_init = [k for k in missing if k in allowed]
    missing = [k for k in missing if k not in allowed]
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
    return kept_init


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
        members = list(enum_cls.__members__)
        if name not in members:
            raise ValueError(
                f"unknown weights {name!r} for {arch}; torchvision offers {members}, or pass a local file path"
            )
        weights = enum_cls[name]
    return f"{enum_cls.__name__}.{weights.name}", weights.url


def load_torchvision_weights(arch: str, name: str) -> tuple[dict[str, Tensor], str]:
    """The state dict of a torchvision weights name, and where it came from.

    ``torch.hub.load_state_dict_from_url`` reads it from torch's cache (``$TORCH_HOME/hub/checkpoints``)
    or downloads it there, checking the hash in the file name.

    Raises:
        WeightsError: the file is not cached and cannot be downloaded (the message says where to put
            it, or how to pass a local file instead), or the cached file cannot be read.
    """
    qualified, url = resolve_torchvision_weights(arch, name)
    file_name = os.path.basename(url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as exc:  # network errors come in many types (URLError, OSError, ssl, timeout)
        if cached.is_file():
            raise WeightsError(
                f"{cached}: the cached torchvision weights {qualified} cannot be read ({type(exc).__name__}: {exc}); "
                "delete the file to download it again"
            ) from exc
        raise WeightsError(
            f"could not download torchvision weights {qualified} from {url} ({type(exc).__name__}: {exc}). "
            f"Without network access, download the file elsewhere and either pass its path "
            f"(weights: /path/to/{file_name}) or copy it to {cached} and keep the name."
        ) from exc
    if not is_state_dict(state_dict):
        raise WeightsError(f"{cached}: expected a state dict (parameter name -> tensor) for {qualified}")
    return dict(state_dict), str(cached)


def load_backbone_weights(body: nn.Module, name: str, weights: str | os.PathLike[str]) -> list[str]:
    """Load ImageNet weights into a :class:`~backbone.resnet.ResNetBody`: a local file or a torchvision weights name.

    A local file must hold a plain state dict in torchvision's format. The classifier (``fc.*``) and
    stages the body does not build are skipped; everything else must match exactly (strict), or a
    :class:`WeightsError` lists the offending keys. The one exception is the offset convs of
    deformable blocks (``dcn_stages``), which plain ResNets lack: they keep their zero
    initialisation, and a ``UserWarning`` lists them as new keys.

    Returns:
        The state-dict keys the file did not provide (the new offset-conv keys), in order.
    """
    text = os.fspath(weights)
    looks_like_path = os.sep in text or text.endswith((".pth", ".pt", ".bin", ".ckpt")) or text.startswith("~")
    if Path(text).expanduser().is_file() or looks_like_path:
        source = str(Path(text).expanduser())
        state_dict = read_checkpoint(source)
    else:
        state_dict, source = load_torchvision_weights(name, text)
    unbuilt = tuple(f"layer{i + 1}." for i in range(len(body.stage_names), len(LEVELS)))
    new = load_state_dict_checked(
        body, state_dict, source=source, ignore_prefixes=("fc.",) + unbuilt, new_keys=offset_state_keys(body)
    )
    if new:
        warnings.warn(
            f"{source}: {len(new)} new key(s) not in the checkpoint, the deformable-conv offsets of dcn_stages, "
            f"initialised to zero (plain 3x3 sampling, mask 0.5): {', '.join(new[:_MAX_LISTED])}"
            + (", ..." if len(new) > _MAX_LISTED else ""),
            UserWarning,
            stacklevel=3,
        )
    return new
