"""``build_backbone(..., torchvision_names=True)``: torchvision's level names, so its default detectors work."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from backbone import build_backbone

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

SMALL = dict(base_channels=32, fpn={"out_channels": 32})


def test_default_levels_have_torchvisions_names_and_the_same_outputs():
    ours = build_backbone("resnet18", **SMALL).eval()
    renamed = build_backbone("resnet18", torchvision_names=True, **SMALL).eval()
    renamed.load_state_dict(ours.state_dict())  # same state-dict keys: only the output names change
    reference = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    assert renamed.feature_info.names() == ("0", "1", "2", "3", "pool")
    with torch.no_grad():
        assert list(renamed(torch.rand(1, 3, 64, 64))) == list(reference(torch.rand(1, 3, 64, 64)))
    assert renamed.feature_info.strides() == ours.feature_info.strides()
    assert renamed.feature_info.channels() == ours.feature_info.channels()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(ours(x).values(), renamed(x).values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (dict(fpn={"out_channels": 16, "extra": "p6p7_p5"}, out_features=("c3", "c4", "c5")), ("0", "1", "2", "p6", "p7")),
        (dict(fpn={"out_channels": 16, "extra": "none"}), ("0", "1", "2", "3")),
        (dict(fpn=False, out_features=("c4", "c5")), ("0", "1")),
    ],
    ids=["p6p7", "no-extra", "no-fpn"],
)
def test_names_follow_torchvisions_scheme_for_other_layouts(options, names):
    bb = build_backbone("resnet18", torchvision_names=True, base_channels=32, **options).eval()
    assert bb.feature_info.names() == names
    with torch.no_grad():
        assert tuple(bb(torch.rand(1, 3, 64, 64))) == names


@pytest.mark.parametrize("detector", [FasterRCNN, MaskRCNN])
def test_torchvision_detector_with_its_default_poolers_and_anchors(detector):
    torch.manual_seed(0)
    model = detector(build_backbone("resnet18", torchvision_names=True, **SMALL), num_classes=4,
                     min_size=64, max_size=96).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])[0]
    assert {"boxes", "labels", "scores"} <= set(out)
    model.train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 64, 80, dtype=torch.uint8)}
    losses = model([torch.rand(3, 64, 80)], [target])
    assert all(torch.isfinite(v) for v in losses.values())


def test_without_torchvision_names_the_default_poolers_find_no_level():
    """Documented in build_backbone: our names (p2..p6) do not match torchvision's default poolers."""
    model = FasterRCNN(build_backbone("resnet18", **SMALL), num_classes=4, min_size=64, max_size=96).eval()
    with pytest.raises(IndexError):
        model([torch.rand(3, 64, 80)])


def test_renamed_backbone_scripts_and_matches_eager():
    bb = build_backbone("resnet18", torchvision_names=True, **SMALL).eval()
    scripted = torch.jit.script(bb)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected, actual = bb(x), scripted(x)
    assert list(actual) == ["0", "1", "2", "3", "pool"]
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6), name
