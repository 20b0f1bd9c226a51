"""Mixed precision on CUDA: reduced-precision activations, float32 boxes, GradScaler steps, scaler state.

Marked ``gpu``: skipped where CUDA is absent (CI). Run them with ``tools/gpu_check.sh`` or
``python -m pytest -m gpu tests/gpu``.
"""

import pytest
import torch

from detection import build_detector
from detection.amp import autocast, make_grad_scaler
from detection.inference import optimize_for_inference

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def tiny_detector(arch: str = "mask_rcnn") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(
        arch, backbone={"name": "resnet18", "fpn": {"out_channels": 64}}, num_classes=4, min_size=256, max_size=256,
        box_score_thresh=0.0,
    ).to(DEVICE)


def batch(n: int = 2, size: int = 256) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, size, size, device=DEVICE) for _ in range(n)]
    boxes = torch.tensor([[20.0, 30.0, 120.0, 140.0], [100.0, 90.0, 220.0, 200.0]], device=DEVICE)
    masks = torch.zeros(2, size, size, dtype=torch.uint8, device=DEVICE)
    for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[j, y0:y1, x0:x1] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2], device=DEVICE), "masks": masks} for _ in range(n)]
    return images, targets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backbone_runs_in_reduced_precision_and_boxes_stay_float32(dtype):
    model = tiny_detector()
    seen = {}
    model.backbone.body.layer2.register_forward_hook(lambda m, i, o: seen.setdefault("c3", o.dtype))
    model.backbone.fpn.register_forward_hook(lambda m, i, o: seen.setdefault("p2", o["p2"].dtype))
    images, targets = batch()
    model.train()
    with autocast(DEVICE, True, dtype):
        losses = model(images, targets)
    assert seen == {"c3": dtype, "p2": dtype}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad(), autocast(DEVICE, True, dtype):
        out = model(images)[0]
    assert out["boxes"].dtype == torch.float32
    assert out["scores"].dtype == torch.float32
    assert out["masks"].dtype == torch.float32


def test_grad_scaler_step_updates_weights_and_state_reloads(tmp_path):
    model = tiny_detector()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = make_grad_scaler(DEVICE, True, "float16")
    assert scaler.is_enabled()
    before = model.backbone.fpn.layer_blocks[0][0].weight.detach().clone()
    images, targets = batch()
    for _ in range(2):
        with autocast(DEVICE, True, torch.float16):
            loss = sum(model(images, targets).values())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert not torch.equal(before, model.backbone.fpn.layer_blocks[0][0].weight)
    torch.save({"scaler": scaler.state_dict()}, tmp_path / "s.pth")
    fresh = make_grad_scaler(DEVICE, True, "float16")
    fresh.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True)["scaler"])
    assert fresh.get_scale() == scaler.get_scale()


def test_bf16_needs_no_scaler():
    assert not make_grad_scaler(DEVICE, True, "bfloat16").is_enabled()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fast_inference_path_outputs_float32(precision):
    reference = tiny_detector().eval()
    fast = tiny_detector().eval()
    fast.load_state_dict(reference.state_dict())
    optimize_for_inference(fast, precision=precision)
    images, _ = batch(1)
    with torch.no_grad():
        out = fast(images)[0]
        ref = reference(images)[0]
    assert out["boxes"].dtype == torch.float32 and out["masks"].dtype == torch.float32
    assert len(out["boxes"]) > 0 and len(ref["boxes"]) > 0
