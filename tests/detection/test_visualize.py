"""predictions.png: the threshold is stated, empty cells say so, captions are readable and never overlap."""

import torch

from detection.config import load_config
from detection.visualize import _place, draw_predictions, save_prediction_grid

NAMES = ["__background__", "person", "bowl"]


def image():
    torch.manual_seed(0)
    return torch.rand(3, 96, 128) * 0.2 + 0.4


def prediction(score):
    return {"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([score])}


def test_an_image_without_detections_above_the_threshold_says_so():
    img = image()
    bare = (img * 255).round().to(torch.uint8)
    drawn = draw_predictions(img, prediction(0.34), NAMES, score_threshold=0.5)
    assert not torch.equal(drawn, bare)  # "no detections above 0.5" is written on it
    assert torch.equal(drawn[:, :40], bare[:, :40])  # along the bottom, leaving the picture
    shown = draw_predictions(img, prediction(0.34), NAMES, score_threshold=0.3)
    assert not torch.equal(shown, drawn)


def test_the_grid_threshold_is_the_configured_one(tmp_path):
    assert load_config(None).eval.vis_score_threshold == 0.5
    low = save_prediction_grid([image()], [prediction(0.34)], NAMES, tmp_path / "low.png", score_threshold=0.3)
    high = save_prediction_grid([image()], [prediction(0.34)], NAMES, tmp_path / "high.png", score_threshold=0.5)
    assert low.read_bytes() != high.read_bytes()


def test_captions_have_a_filled_background_and_do_not_overlap():
    img = torch.full((3, 128, 128), 0.5)
    same = {"boxes": torch.tensor([[20.0, 30.0, 100.0, 100.0]] * 3), "labels": torch.tensor([1, 2, 1]),
            "scores": torch.tensor([0.9, 0.8, 0.7])}
    drawn = draw_predictions(img, same, NAMES, score_threshold=0.5)
    # The caption of the first box sits above it on a filled background in the box colour (label 1: (60, 180, 75)).
    strip = drawn[:, 15:29, 21:40].reshape(3, -1).T.tolist()
    assert strip.count([60, 180, 75]) > len(strip) // 3
    taken = []
    for _ in range(3):
        taken.append(_place((40, 12), (20, 30, 100, 100), (128, 128), taken))
    for i, a in enumerate(taken):
        for b in taken[i + 1:]:
            assert a[3] <= b[1] or b[3] <= a[1], (a, b)
