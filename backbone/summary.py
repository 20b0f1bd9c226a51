"""One-call model summary: per stage, trainable / total parameters, norm type, BN-statistics state."""

from __future__ import annotations

from torch import nn

from .norm import BN_TYPES, norm_kind

__all__ = ["summarize", "summary_rows"]


def _parts(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    from .build import BackboneWithFPN
    from .resnet import ResNetBody

    if isinstance(model, ResNetBody):
        return model.stages()
    if isinstance(model, BackboneWithFPN):
        parts = model.body.stages()
        if model.fpn is not None:
            parts.append(("fpn", [model.fpn]))
        return parts
    parts = []
    for name, child in model.named_children():
        if isinstance(child, (BackboneWithFPN, ResNetBody)):
            parts += [(f"{name}.{sub}", mods) for sub, mods in _parts(child)]
        elif any(True for _ in child.parameters()) or any(norm_kind(m) for m in child.modules()):
            parts.append((name, [child]))
    return parts


def summary_rows(model: nn.Module) -> list[dict[str, object]]:
    """The data behind :func:`summarize`: one dict per part with ``part``, ``trainable``, ``total``,
    ``norm`` (comma-separated kinds, or ``-``) and ``bn_stats`` (``update``, ``frozen`` or ``-``)."""
    rows = []
    for name, modules in _parts(model):
        params = {id(p): p for m in modules for p in m.parameters()}
        kinds = sorted({k for m in modules for sub in m.modules() if (k := norm_kind(sub))})
        bns = [sub for m in modules for sub in m.modules() if isinstance(sub, BN_TYPES)]
        if not bns:
            stats = "-"
        else:
            stats = "update" if any(b.training and b.track_running_stats for b in bns) else "frozen"
        rows.append(
            {
                "part": name,
                "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
                "total": sum(p.numel() for p in params.values()),
                "norm": ",".join(kinds) or "-",
                "bn_stats": stats,
            }
        )
    return rows


def summarize(model: nn.Module) -> str:
    """A table of the model's parts, for a backbone, a body or a detector built on them.

    For each stage (stem, c2..c5, fpn, and a detector's heads) it shows trainable and total
    parameters, the norm layer type, and whether BN running statistics update in the module's
    current mode (call it after ``model.train()`` to see what training will do).

    Example:
        >>> print(summarize(build_backbone("resnet18", trainable_stages=3)))  # doctest: +SKIP
        part   trainable      total  norm  BN stats
        stem           0      9,536  bn    frozen
        ...
    """
    rows = summary_rows(model)
    header = ("part", "trainable", "total", "norm", "BN stats")
    table = [header] + [
        (str(r["part"]), f"{r['trainable']:,}", f"{r['total']:,}", str(r["norm"]), str(r["bn_stats"])) for r in rows
    ]
    all_params = {id(p): p for p in model.parameters()}
    table.append(
        (
            "total",
            f"{sum(p.numel() for p in all_params.values() if p.requires_grad):,}",
            f"{sum(p.numel() for p in all_params.values()):,}",
            "",
            "",
        )
    )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    align = ["<", ">", ">", "<", "<"]
    lines = ["  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip() for row in table]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
