"""Markdown tables of evaluation metrics for the log."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["STAT_NAMES", "format_category_table", "format_summary_table"]

# Names of the AP entries of COCOeval.stats, in order (the AR entries are not part of the flat dict).
STAT_NAMES: dict[str, tuple[str, ...]] = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl"),
}


def _format_value(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3f}"


def format_summary_table(metrics: Mapping[str, float], iou_type: str) -> str:
    names = STAT_NAMES[iou_type]
    header = "| " + " | ".join(f"{n:>7}" for n in names) + " |"
    rule = "|" + "|".join(":" + "-" * 7 + ":" for _ in names) + "|"
    row = "| " + " | ".join(f"{_format_value(metrics[f'{iou_type}/{n}']):>7}" for n in names) + " |"
    return "\n".join((header, rule, row))


def format_category_table(per_cat: Mapping[str, float], columns: int = 3) -> str:
    items = list(per_cat.items())
    width = max([len("category")] + [len(n) for n, _ in items])
    rows = []
    for start in range(0, len(items), columns):
        chunk = items[start : start + columns]
        chunk += [("", None)] * (columns - len(chunk))
        cells = [f"{n:<{width}} | {(_format_value(v) if v is not None else ''):>7}" for n, v in chunk]
        rows.append("| " + " | ".join(cells) + " |")
    header = "| " + " | ".join(f"{'category':<{width}} | {'AP':>7}" for _ in range(columns)) + " |"
    rule = "|" + "|".join(":" + "-" * (width + 1) + "|" + "-" * 8 + ":" for _ in range(columns)) + "|"
    return "\n".join([header, rule, *rows])
