"""tools/infer_det.py: label names and category ids come from the checkpoint's category mapping."""

from __future__ import annotations

import pytest
import torch

from detection.data import CategoryMapping
from detection.weights import read_detector_checkpoint


def test_labels_come_from_the_stored_category_mapping(load_tool, tmp_path, capsys):
    tool = load_tool("infer_det")
    mapping = CategoryMapping([{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}])
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "categories": mapping.state_dict()}, path)
    _, extras = read_detector_checkpoint(path)
    names, to_cat_id = tool._labels(extras, 3, str(path))
    assert names == ["__background__", "dog", "cat"]
    assert [to_cat_id(1), to_cat_id(2)] == [3, 7]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("num_classes", [4, 91])  # 91: no special case for torchvision's COCO models
def test_without_a_mapping_labels_are_plain_class_numbers(load_tool, num_classes, capsys):
    tool = load_tool("infer_det")
    names, to_cat_id = tool._labels({}, num_classes, "weights.pth")
    assert names == ["__background__"] + [f"class {i}" for i in range(1, num_classes)]
    assert to_cat_id(2) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"weights.pth: no category mapping stored; labels are named 'class 1'..'class {num_classes - 1}' and "
        f"written as category ids 1..{num_classes - 1}"
    ]
