"""Mixed precision on CUDA through the project's own step: reduced-precision activations, float32 boxes,
GradScaler steps and state, the fast inference path.

Marked ``gpu``: skipped where CUDA is absent (CI). Run them with ``tools/gpu_check.sh`` or
``python -m pytest -m gpu tests/gpu``.
"""

import pytest
import torch

from detection import build_detector
from detection.engine import run_inference, train_step
from detection.inference import optimize_for_inference
from detection.precision import PrecisionPolicy

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


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_train_step_runs_the_backbone_in_reduced_precision_and_boxes_stay_float32(dtype):
    policy = PrecisionPolicy.resolve(True, dtype, DEVICE)
    model = tiny_detector()
    seen = {}

    def record(key, dtype_of):
        def hook(module, inputs, output):  # returns None: the output is left as it is
            seen.setdefault(key, dtype_of(output))
        return hook

    model.backbone.body.layer2.register_forward_hook(record("c3", lambda o: o.dtype))
    model.backbone.fpn.register_forward_hook(record("p2", lambda o: o["p2"].dtype))
    images, targets = batch()
    model.train()
    opt = sgd(model)
    result = train_step(model, images, targets, optimizer=opt, scaler=policy.grad_scaler(), precision=policy)
    assert seen == {"c3": policy.dtype, "p2": policy.dtype}
    assert result.finite and result.stepped
    outputs = []
    run_inference(model, [(images, targets, [])], DEVICE, policy, on_batch=lambda i, t, o: outputs.extend(o))
    out = outputs[0]
    assert out["boxes"].dtype == policy.output_dtype == torch.float32
    assert out["scores"].dtype == torch.float32
    assert out["masks"].dtype == torch.float32


def test_fp16_train_steps_update_weights_through_the_scaler_and_its_state_reloads(tmp_path):
    policy = PrecisionPolicy.resolve(True, "float16", DEVICE)
    model = tiny_detector()
    model.train()
    opt = sgd(model)
    scaler = policy.grad_scaler()
    assert scaler.is_enabled()
    before = model.backbone.fpn.layer_blocks[0][0].weight.detach().clone()
    images, targets = batch()
    results = [
        train_step(model, images, targets, optimizer=opt, scaler=scaler, precision=policy, clip_grad_norm=10.0)
        for _ in range(2)
    ]
    assert all(r.finite and r.stepped for r in results)
    assert not torch.equal(before, model.backbone.fpn.layer_blocks[0][0].weight)
    torch.save({"scaler": scaler.state_dict()}, tmp_path / "s.pth")
    fresh = policy.grad_scaler()
    fresh.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True)["scaler"])
    assert fresh.get_scale() == scaler.get_scale()


def test_bf16_needs_no_scaler():
    assert not PrecisionPolicy.resolve(True, "bfloat16", DEVICE).grad_scaler().is_enabled()
    assert PrecisionPolicy.resolve("auto", "bfloat16", DEVICE).dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fast_inference_path_outputs_float32(precision):
    reference = tiny_detector().eval()
    model = tiny_detector().eval()
    model.load_state_dict(reference.state_dict())
    fast = optimize_for_inference(model, precision=precision)
    images, _ = batch(1)
    with torch.no_grad():
        out = fast(images)[0]
        ref = reference(images)[0]
    assert out["boxes"].dtype == torch.float32 and out["masks"].dtype == torch.float32
    assert len(out["boxes"]) > 0 and len(ref["boxes"]) > 0
