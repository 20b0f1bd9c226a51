"""``detection.load_run``: a finished run folder, or one checkpoint file, as a ready detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detection import LoadedRun, load_run
from detection.config import ConfigError, load_config
from detection.data import read_rgb_image
from detection.trainer import build_model, train
from detection.weights import load_weights, read_detector_checkpoint

REPO = Path(__file__).resolve().parents[2]
# box_score_thresh=0: a 2-iteration model scores ~1/81 per class, and the tests need detections to compare.
TINY = ["model.backbone.base_channels=32", "model.backbone.fpn.out_channels=32", "model.min_size=64",
        "model.max_size=64", "model.head.box_score_thresh=0.0", "train.max_iters=2", "train.checkpoint_period=0",
        "data.train.augment=[]"]


@pytest.fixture(scope="module")
def tiny_run(coco128, tmp_path_factory) -> Path:
    """A Mask R-CNN trained for 2 iterations on the real COCO subset, at 64 px."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "smoke" / "tiny_cpu.yaml", [
        "data.source=coco", f"data.train.ann_file={coco128 / 'annotations' / 'instances.json'}",
        f"data.train.img_dir={coco128 / 'images'}", *TINY,
    ])
    train(cfg, output_dir=out, log=lambda s: None)
    return out


def _reference(run_dir: Path, image: torch.Tensor) -> dict:
    """What the plain pieces (build_model + load_weights) predict for ``image``."""
    cfg = load_config(run_dir / "config.yaml")
    state, _ = read_detector_checkpoint(run_dir / "model_final.pth")
    model = load_weights(build_model(cfg, 81), state).eval()
    with torch.no_grad():
        return model([image])[0]


def test_a_run_folder_loads_config_names_and_the_final_model(tiny_run, coco128):
    run = load_run(tiny_run)
    assert isinstance(run, LoadedRun)
    assert run.checkpoint == tiny_run / "model_final.pth"
    assert not run.model.training
    assert run.class_names[:3] == ["__background__", "person", "bicycle"] and len(run.class_names) == 81
    assert run.config.model.arch == "mask_rcnn"
    image = coco128 / "images" / "000000000009.jpg"
    out = run.predict(image)[0]
    expected = _reference(tiny_run, torch.from_numpy(read_rgb_image(image)).permute(2, 0, 1).float() / 255)
    assert len(out["boxes"]) == len(expected["boxes"]) > 0
    assert torch.allclose(out["boxes"], expected["boxes"], atol=1e-4)
    assert torch.equal(out["labels"], expected["labels"])
    assert out["names"] == [run.class_names[int(i)] for i in expected["labels"]]
    assert out["masks"].shape[1:] == (1, 480, 640)
    assert run.label_to_cat_id(1) == 1 and run.label_to_cat_id(80) == 90  # COCO's ids have gaps


def test_paths_arrays_and_tensors_give_the_same_detections(tiny_run, coco128):
    run = load_run(tiny_run)
    path = coco128 / "images" / "000000000009.jpg"
    array = read_rgb_image(path)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    by_path, by_array, by_tensor = run.predict([path, array, tensor], batch_size=2)
    for other in (by_array, by_tensor):
        assert other["names"] == by_path["names"]  # batching reorders float operations: boxes agree to rounding
        assert torch.allclose(other["boxes"], by_path["boxes"], atol=1e-3)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        run.predict(np.zeros((8, 8), np.float32))


def test_score_threshold_drops_low_scores(tiny_run, coco128):
    run = load_run(tiny_run)
    image = coco128 / "images" / "000000000009.jpg"
    everything = run.predict(image, score_threshold=0.0)[0]
    cut = float(everything["scores"].median())
    kept = run.predict(image, score_threshold=cut)[0]
    assert 0 < len(kept["scores"]) < len(everything["scores"])
    assert bool((kept["scores"] >= cut).all()) and len(kept["names"]) == len(kept["scores"]) == len(kept["masks"])


def test_a_checkpoint_file_alone_uses_its_stored_config(tiny_run, coco128, tmp_path):
    alone = tmp_path / "elsewhere" / "weights.pth"
    alone.parent.mkdir()
    alone.write_bytes((tiny_run / "model_final.pth").read_bytes())  # no config.yaml next to it
    run = load_run(alone, overrides=["eval.score_threshold=0.01"])
    assert run.checkpoint == alone and run.config.eval.score_threshold == 0.01
    assert run.config.model == load_run(tiny_run).config.model
    image = coco128 / "images" / "000000000009.jpg"
    assert torch.equal(run.predict(image)[0]["boxes"], load_run(tiny_run).predict(image, score_threshold=0.01)[0]["boxes"])


def test_the_fast_path_is_a_new_object_with_the_same_detections(tiny_run, coco128):
    run = load_run(tiny_run)
    image = coco128 / "images" / "000000000009.jpg"
    expected = run.predict(image)[0]
    fast = load_run(tiny_run).optimize_for_inference()
    assert isinstance(fast, LoadedRun) and fast.class_names == run.class_names
    out = fast.predict(image)[0]
    assert len(out["boxes"]) == len(expected["boxes"])
    assert torch.allclose(out["scores"], expected["scores"], atol=1e-3)


def test_a_state_dict_without_a_config_asks_for_one(tiny_run, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(read_detector_checkpoint(tiny_run / "model_final.pth")[0], plain)
    with pytest.raises(ConfigError, match="stores no config; give the config"):
        load_run(plain)
    run = load_run(plain, config=tiny_run / "config.yaml", log=lambda s: None)
    assert run.class_names[1] == "class 1"  # no category mapping in a bare state dict


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder or checkpoint file"):
        load_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model_final.pth or other checkpoint"):
        load_run(tmp_path)
