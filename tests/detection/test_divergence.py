"""A diverging run: non-finite gradients skip the optimizer step for every precision, the weights are
checked before every checkpoint, the bad-step count is training state, and the run exits 1."""

import json
import math

import pytest
import torch
from PIL import Image

from detection import trainer as trainer_mod
from detection.checkpoint import load_checkpoint
from detection.engine import train_step
from detection.logger import read_jsonl
from detection.precision import PrecisionPolicy
from detection.trainer import train

from .test_trainer import SMOKE, smoke_cfg


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


class Scaled(torch.nn.Module):
    """A detector whose training losses are multiplied by ``factor`` at the iterations in ``when`` (1-based)."""

    def __init__(self, model, factor, when):
        super().__init__()
        self.model, self.factor, self.when, self.calls = model, factor, set(when), 0

    def forward(self, images, targets=None):
        out = self.model(images, targets)
        if self.training:
            self.calls += 1
            if self.calls in self.when:
                out = {k: v * self.factor for k, v in out.items()}
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_non_finite_gradients_leave_the_weights_untouched(dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = PrecisionPolicy.resolve(dtype is not None, dtype or "float16", torch.device("cpu"))

    def huge(x, targets):  # a finite loss whose gradient norm overflows
        return {"loss": model(torch.stack(x)).float().sum() * 1e30}

    result = train_step(huge, [torch.ones(3)], [{}], optimizer=opt, scaler=precision.grad_scaler(), precision=precision)
    assert math.isfinite(result.losses["loss"])
    assert not result.finite and not result.stepped and result.bad == "gradients"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    def grad_inf(x, targets):  # finite loss, an inf gradient
        w = next(model.parameters())
        w.register_hook(lambda g: g * float("inf"))
        return {"loss": model(torch.stack(x)).float().sum()}

    result = train_step(grad_inf, [torch.ones(3)], [{}], optimizer=opt, scaler=precision.grad_scaler(),
                        precision=precision)
    assert math.isfinite(result.losses["loss"]) and result.bad == "gradients" and not result.stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_huge_finite_loss_is_skipped_and_counted_through_resume(tmp_path, shapes_cache, monkeypatch):
    real = trainer_mod.build_model
    monkeypatch.setattr(trainer_mod, "build_model", lambda cfg, n: Scaled(real(cfg, n), 1e30, when={2}))
    logged = []
    train(smoke_cfg(shapes_cache, "train.clip_grad_norm=null"), output_dir=tmp_path, log=logged.append)
    assert any("skipped step" in line and "non-finite gradients at iteration 2" in line for line in logged)
    final = load_checkpoint(tmp_path / "model_final.pth")
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert final["bad_steps"]["total"] == 1 and "iteration 2" in final["bad_steps"]["first"]
    records = {r["iteration"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("type") == "train"}
    assert records[2].get("skipped") is True and "loss" not in records[2]
    # The count is training state: resuming from iteration 2's checkpoint keeps it.
    monkeypatch.setattr(trainer_mod, "build_model", lambda cfg, n: Scaled(real(cfg, n), 1.0, when=()))
    out = tmp_path / "resumed"
    train(smoke_cfg(shapes_cache), output_dir=out, resume=tmp_path / "model_0000002.pth", log=lambda s: None)
    assert load_checkpoint(out / "model_final.pth")["bad_steps"]["total"] == 1


def test_non_finite_weights_are_never_saved_and_the_run_exits_1(tmp_path, shapes_cache, monkeypatch, capsys):
    from tools.train_det import main

    real = trainer_mod.build_model

    def poisoned(cfg, n):  # the 4th training forward finds NaN weights
        model = real(cfg, n)
        calls = {"n": 0}

        def poison(module, args):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 4:
                    module.backbone.body.conv1.weight.data.fill_(float("nan"))

        model.register_forward_pre_hook(poison)
        return model

    monkeypatch.setattr(trainer_mod, "build_model", poisoned)
    code = main(["--config", str(SMOKE), "--output-dir", str(tmp_path), "--set", f"data.shapes.cache_dir={shapes_cache}",
                 "train.max_bad_steps=100"])
    err = capsys.readouterr().err
    assert code == 1
    assert "the model diverged" in err and "first bad step: non-finite loss at iteration 4" in err
    assert "image ids in this batch: [" in err and "loss_classifier=" in err
    assert not (tmp_path / "model_final.pth").exists() and not (tmp_path / "model_best.pth").exists()
    assert (tmp_path / "model_0000002.pth").is_file()  # saved before the weights went bad


def quarter_coco(coco128, out, n=4):
    """``n`` annotated coco128 images at a quarter of their size, polygons and boxes scaled with them."""
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    polys = [a for a in data["annotations"] if not a.get("iscrowd") and isinstance(a.get("segmentation"), list)]
    ids = sorted({a["image_id"] for a in polys})[:n]
    (out / "images").mkdir(parents=True)
    images = []
    for im in (i for i in data["images"] if i["id"] in ids):
        with Image.open(coco128 / "images" / im["file_name"]) as img:
            w, h = img.size
            img.convert("RGB").resize((w // 4, h // 4)).save(out / "images" / im["file_name"])
        images.append({**im, "width": w // 4, "height": h // 4})
    anns = [{**a, "bbox": [v / 4 for v in a["bbox"]], "area": a["area"] / 16,
             "segmentation": [[v / 4 for v in s] for s in a["segmentation"]]} for a in polys if a["image_id"] in ids]
    ann = out / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": data["categories"]}))
    return ann, out / "images"


def test_the_reported_diverging_recipe_ends_with_finite_weights_or_exit_1(coco128, tmp_path, capsys):
    from tools.train_det import main

    ann, img = quarter_coco(coco128, tmp_path / "data")
    out = tmp_path / "run"
    code = main(["--config", str(SMOKE), "--output-dir", str(out), "--set", "data.source=coco",
                 f"data.train.ann_file={ann}", f"data.train.img_dir={img}", f"data.val.ann_file={ann}",
                 f"data.val.img_dir={img}", "model.backbone.base_channels=32", "model.head.box_head_dim=256",
                 "model.head.mask_head_channels=[64,64]", "train.max_iters=29", "train.checkpoint_period=10"])
    err = capsys.readouterr().err
    for path in out.glob("*.pth"):
        weights = load_checkpoint(path)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), path
    assert code == 0 or (code == 1 and "first bad step" in err), err[-500:]
    if code == 0:
        assert (out / "model_final.pth").is_file()
