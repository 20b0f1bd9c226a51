"""Real-data proof: every image of coco128-instances through the eval and the train pipeline."""

from __future__ import annotations

import numpy as np
import torch

from detection.data import CocoDetection, build_transforms


def _xyxy(bbox: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = bbox
    return [
        min(max(x, 0), width),
        min(max(y, 0), height),
        min(max(x + w, 0), width),
        min(max(y + h, 0), height),
    ]


def _kept(ann: dict, width: int, height: int) -> bool:
    x1, y1, x2, y2 = _xyxy(ann["bbox"], width, height)
    return x2 - x1 >= 1 and y2 - y1 >= 1


def test_eval_pipeline_matches_pycocotools_on_every_image(coco128_dir):
    ds = CocoDetection(coco128_dir / "annotations" / "instances.json", coco128_dir / "images", train=False)
    assert len(ds) == 128 and {250, 508} <= set(ds.ids)
    assert ds.categories.num_classes == 81 and ds.categories.cat_ids[-1] == 90
    crowd_seen = 0
    for i in range(len(ds)):
        image, target = ds[i]
        info = ds.coco.imgs[ds.ids[i]]
        h, w = info["height"], info["width"]
        assert image.shape == (3, h, w) and image.dtype == torch.float32
        assert int(target["image_id"]) == info["id"] and target["image_id"].dtype == torch.int64
        assert target["orig_size"].tolist() == [h, w]
        anns = [a for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[info["id"]])) if _kept(a, w, h)]
        assert len(target["boxes"]) == len(anns)
        if not anns:
            assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, h, w)
            continue
        expected_boxes = torch.tensor([_xyxy(a["bbox"], w, h) for a in anns], dtype=torch.float64)
        assert torch.allclose(target["boxes"].double(), expected_boxes, atol=1e-3)
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        assert [ds.categories.to_cat_id(int(k)) for k in target["labels"]] == [a["category_id"] for a in anns]
        for k, ann in enumerate(anns):
            assert np.array_equal(target["masks"][k].numpy(), ds.coco.annToMask(ann))
        crowd_seen += int(target["iscrowd"].sum())
        if info["file_name"] == "000000000086.jpg":  # the greyscale image
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert crowd_seen == 10
    # crowd annotation ids beyond int32 survive in the ground truth used for evaluation
    assert max(ds.coco.anns) > 2**31


def test_train_pipeline_with_flip_and_jitter_on_every_image(coco128_dir):
    augment = build_transforms(
        [
            {"name": "horizontal_flip", "p": 0.5},
            {"name": "scale_jitter", "size": 512, "min_scale": 0.5, "max_scale": 1.0},
        ],
        train=True,
    )
    ds = CocoDetection(
        coco128_dir / "annotations" / "instances.json", coco128_dir / "images", train=True, transforms=augment
    )
    assert len(ds) == 126 and 250 not in ds.ids and 508 not in ds.ids
    flipped = 0
    for i in range(len(ds)):
        augment.set_random_seed(i)
        image, target = ds[i]
        # checks in numpy: torch's small multi-threaded ops are slow on a busy 2-core machine
        t = {k: v.numpy() for k, v in target.items()}
        info = ds.coco.imgs[ds.ids[i]]
        h, w = info["height"], info["width"]
        anns = [
            a
            for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[info["id"]]))
            if not a["iscrowd"] and _kept(a, w, h)
        ]
        n = len(t["boxes"])
        out_h, out_w = image.shape[1:]
        scale = out_w / w
        assert abs(out_h / h - scale) < 0.01 and 256 - 1 <= max(out_h, out_w) <= 512 + 1
        assert t["orig_size"].tolist() == [h, w]
        assert t["iscrowd"].tolist() == [0] * n  # crowd regions never reach training targets
        assert t["masks"].shape == (n, out_h, out_w)
        assert np.array_equal(t["area"], t["masks"].sum(axis=(1, 2)).astype(np.float32))
        # only objects that shrink under 1 px can disappear
        big = [a for a in anns if min(a["bbox"][2], a["bbox"][3]) * scale >= 1.5]
        assert len(big) <= n <= len(anns)
        if n == len(anns):
            labels = [ds.categories.to_label(a["category_id"]) for a in anns]
            assert t["labels"].tolist() == labels
            orig = np.asarray([_xyxy(a["bbox"], w, h) for a in anns], dtype=np.float32) * scale
            mirrored = np.stack([out_w - orig[:, 2], orig[:, 1], out_w - orig[:, 0], orig[:, 3]], axis=1)
            same = np.allclose(t["boxes"], orig, atol=1.0)
            mirror = np.allclose(t["boxes"], mirrored, atol=1.0)
            assert same or mirror
            flipped += mirror and not same
        for k in range(n):
            rows = np.flatnonzero(t["masks"][k].any(axis=1))
            cols = np.flatnonzero(t["masks"][k].any(axis=0))
            assert len(rows) > 0
            x1, y1, x2, y2 = t["boxes"][k]
            assert x1 - 2 <= cols[0] and cols[-1] <= x2 + 1 and y1 - 2 <= rows[0] and rows[-1] <= y2 + 1
    assert 20 < flipped < 110  # p = 0.5 over ~120 comparable images
