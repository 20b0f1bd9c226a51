"""COCO data pipeline: dataset, augmentation, batching, loaders and the synthetic shapes dataset.

Nothing here imports pycocotools or albumentations at import time; they are loaded by the functions that
need them.

Example::

    from detection.data import CocoDetection, build_dataloader, build_transforms

    augment = build_transforms([{"name": "horizontal_flip", "p": 0.5}], train=True)
    train_set = CocoDetection("instances_train.json", "train/", train=True, transforms=augment)
    val_set = CocoDetection("instances_val.json", "val/", train=False, category_mapping=train_set.categories)
    loader = build_dataloader(train_set, batch_size=4, train=True, num_workers=2, seed=0)
    for epoch in range(12):
        loader.batch_sampler.set_epoch(epoch)
        for images, targets, skipped in loader:
            ...
"""

from .coco import (
    CategoryMapping,
    CocoDetection,
    DatasetError,
    SkippedImage,
    decode_segmentation,
    read_rgb_image,
)
from .copy_paste import CopyPasteDataset, with_copy_paste
from .loader import build_dataloader, resolve_num_workers
from .sampler import AspectRatioBatchSampler, Batch, collate_fn, worker_init_fn
from .shapes import SHAPE_CATEGORIES, ensure_shapes_dataset, make_shapes_dataset, make_shapes_splits
from .transforms import DetectionTransform, build_transforms, transform_names

__all__ = [
    "SHAPE_CATEGORIES",
    "AspectRatioBatchSampler",
    "Batch",
    "CategoryMapping",
    "CocoDetection",
    "CopyPasteDataset",
    "DatasetError",
    "DetectionTransform",
    "SkippedImage",
    "build_dataloader",
    "build_transforms",
    "collate_fn",
    "decode_segmentation",
    "ensure_shapes_dataset",
    "make_shapes_dataset",
    "make_shapes_splits",
    "read_rgb_image",
    "resolve_num_workers",
    "transform_names",
    "with_copy_paste",
    "worker_init_fn",
]
