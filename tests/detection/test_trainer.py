"""The trainer end to end on the smoke config: outputs, exact resume, guards, interruption, checkpoints."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from detection import loop as loop_mod
from detection import trainer as trainer_mod
from detection.checkpoint import Checkpointer, load_checkpoint
from detection.config import load_config
from detection.engine import NonFiniteLossError
from detection.logger import read_jsonl
from detection.trainer import ResumeError, evaluate_only, train

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


def smoke_cfg(shapes_cache, *overrides):
    return load_config(SMOKE, [f"data.shapes.cache_dir={shapes_cache}", *overrides])


def train_losses(out: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r.get("type") == "train"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shapes_cache):
    out = tmp_path_factory.mktemp("run")
    metrics = train(smoke_cfg(shapes_cache), output_dir=out, log=lambda s: None)
    return out, metrics


def test_a_run_writes_every_output(finished_run):
    out, metrics = finished_run
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "results.json", "model_final.pth", "last_checkpoint"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl", "segm/AP", "segm/AP50"):
        assert key in saved and key in metrics
    assert "bbox/AP-circle" in saved and saved["train/iterations"] == 4
    from PIL import Image

    for png in ("predictions.png", "curves.png"):
        with Image.open(out / png) as img:
            img.load()
            assert img.size[0] > 100 and img.size[1] > 100
    saved_cfg = load_config(out / "config.yaml")
    assert saved_cfg.output_dir == str(out)  # the folder actually used, not the config's output/smoke
    assert saved_cfg == dataclasses.replace(smoke_cfg(saved_cfg.data.shapes.cache_dir), output_dir=str(out))


def test_checkpoint_holds_everything_needed_to_resume(finished_run):
    out, _ = finished_run
    ckpt = load_checkpoint(out / "model_final.pth")
    for key in ("model", "optimizer", "scheduler", "scaler", "sampler", "iteration", "epoch", "rng", "config", "categories",
                "versions", "best_metric"):
        assert key in ckpt, key
    assert ckpt["iteration"] == 4
    # 8 images in batches of 2: 4 batches per epoch, so after 4 iterations the next batch is epoch 1's first.
    assert ckpt["sampler"] == {"epoch": 1, "start_batch": 0} and ckpt["epoch"] == 1
    assert load_checkpoint(out / "model_0000002.pth")["sampler"] == {"epoch": 0, "start_batch": 2}
    assert ckpt["categories"]["categories"][0]["name"] == "circle" or "circle" in json.dumps(ckpt["categories"])
    assert ckpt["config"]["model"]["backbone"]["name"] == "resnet18"
    assert set(ckpt["versions"]) >= {"torch", "torchvision"}
    # The last k numbered checkpoints are kept (k=3 by default; one was written at iteration 2).
    assert (out / "model_0000002.pth").is_file()


def test_resume_continues_exactly(finished_run, tmp_path, shapes_cache):
    out, _ = finished_run
    reference = train_losses(out)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out / "model_0000002.pth", resumed / "model_0000002.pth")
    # A run killed after iteration 4 was logged: its records after the checkpoint are dropped on resume.
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    # Temporary files of writes killed midway are removed at start-up; other files are left alone.
    for name in (".model_0000004.pth.0123456789ab.tmp", ".metrics.json.abcdef012345.tmp"):
        (resumed / name).write_bytes(b"PK partial")
    (resumed / "notes.tmp").write_text("mine")
    logged = []
    train(smoke_cfg(shapes_cache), output_dir=resumed, resume=True, log=logged.append)
    assert sorted(p.name for p in resumed.glob("*.tmp")) == ["notes.tmp"] and not list(resumed.glob(".*.tmp"))
    assert sum("removed 2 temporary file(s)" in line for line in logged) == 1
    records = read_jsonl(resumed / "metrics.jsonl")
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["iteration"] for r in records if r["type"] == "eval"] == [4]
    after = train_losses(resumed)
    for it in (1, 2, 3, 4):
        assert after[it] == pytest.approx(reference[it], rel=1e-6, abs=1e-7), it


def test_a_checkpoint_without_the_data_position_resumes_exactly_from_its_iteration(finished_run, tmp_path, shapes_cache):
    out, _ = finished_run
    reference = train_losses(out)
    ckpt = load_checkpoint(out / "model_0000002.pth")
    del ckpt["sampler"]  # checkpoints written before the data position was stored
    torch.save(ckpt, tmp_path / "model_0000002.pth")
    train(smoke_cfg(shapes_cache), output_dir=tmp_path, resume=True, log=lambda s: None)
    after = train_losses(tmp_path)
    assert sorted(after) == [3, 4]
    for it in (3, 4):
        assert after[it] == pytest.approx(reference[it], rel=1e-6, abs=1e-7), it


def test_process_settings_change_only_when_the_config_asks(finished_run, tmp_path, shapes_cache):
    assert not torch.are_deterministic_algorithms_enabled()  # the default run left them alone
    threads = torch.get_num_threads()
    logged = []
    cfg = smoke_cfg(shapes_cache, f"train.num_threads={threads}", "train.max_iters=1", "train.checkpoint_period=0",
                    "data.shapes.num_val=0")
    try:
        train(cfg, output_dir=tmp_path, log=logged.append)
    finally:
        torch.set_num_threads(threads)
    assert f"torch.set_num_threads({threads}) (train.num_threads)" in logged
    assert not any("deterministic" in line for line in logged)


def test_resume_with_a_different_model_is_refused(finished_run, tmp_path, shapes_cache):
    out, _ = finished_run
    cfg = smoke_cfg(shapes_cache, "model.backbone.name=resnet34", "model.min_size=160")
    with pytest.raises(ResumeError) as info:
        train(cfg, output_dir=tmp_path, resume=str(out / "model_0000002.pth"), log=lambda s: None)
    message = str(info.value)
    assert "its model config differs from this run's" in message
    assert "model.backbone.name: resnet18 != resnet34" in message
    assert "model.min_size: 128 != 160" in message


def test_resume_without_checkpoint_explains(tmp_path, shapes_cache):
    with pytest.raises(FileNotFoundError, match=re.escape(f"--resume: no checkpoint in {tmp_path}")):
        train(smoke_cfg(shapes_cache), output_dir=tmp_path, resume=True, log=lambda s: None)


def test_eval_only_reproduces_the_final_metrics(finished_run, tmp_path, shapes_cache):
    out, metrics = finished_run
    again = evaluate_only(smoke_cfg(shapes_cache), out / "model_final.pth", output_dir=tmp_path, log=lambda s: None)
    for key in ("bbox/AP", "bbox/AP50", "segm/AP"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9)
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "predictions.png").is_file()


def test_eval_only_never_writes_over_a_training_run(finished_run, shapes_cache):
    from tools.train_det import main

    out, _ = finished_run
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "results.json", "config.yaml", "predictions.png")}
    args = ["--config", str(SMOKE), "--set", f"data.shapes.cache_dir={shapes_cache}", "--eval-only"]
    assert main([*args, "--output-dir", str(out)]) == 0  # the training folder: its newest checkpoint, eval/ inside
    assert {name: (out / name).read_bytes() for name in before} == before
    for name in before:
        assert (out / "eval" / name).is_file(), name
    assert load_config(out / "eval" / "config.yaml").output_dir == str(out / "eval")


class NanLosses(torch.nn.Module):
    """Wraps a detector and poisons one loss term in training."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, targets=None):
        out = self.model(images, targets)
        if self.training:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def test_non_finite_losses_skip_steps_then_stop_with_context(tmp_path, shapes_cache, monkeypatch):
    real = trainer_mod.build_model
    monkeypatch.setattr(trainer_mod, "build_model", lambda cfg, n: NanLosses(real(cfg, n)))
    cfg = smoke_cfg(shapes_cache, "train.max_bad_steps=3")
    logged = []
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, output_dir=tmp_path, log=logged.append)
    message = str(info.value)
    assert message.startswith("3 consecutive non-finite steps (train.max_bad_steps=3), the last non-finite loss at "
                              "iteration 3: ")
    assert "first bad step: non-finite loss at iteration 1: " in message
    assert "loss_mask=nan" in message and "loss_classifier=" in message
    assert re.search(r"image ids in this batch: \[\d+, \d+\]", message)
    assert sum("non-finite loss at iteration" in line and "skipped step" in line for line in logged) == 2
    # Skipped steps are logged as skipped, never as a loss of 0.
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("type") == "train"]
    assert [r["iteration"] for r in records] == [1, 2] and all(r["skipped"] is True and "loss" not in r for r in records)


def test_ctrl_c_mid_iteration_resumes_exactly_and_is_reported_once(finished_run, tmp_path, shapes_cache, monkeypatch,
                                                                    capsys):
    from tools.train_det import main

    out, _ = finished_run
    real_step = loop_mod.train_step
    calls = {"n": 0}

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of iteration 3's forward pass, after it drew random numbers
            torch.rand(1000)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "train_step", interrupting_step)
    args = ["--config", str(SMOKE), "--output-dir", str(tmp_path), "--set", f"data.shapes.cache_dir={shapes_cache}",
            "train.checkpoint_period=0"]
    assert main(args) == 130
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("interrupted at iteration 2") == 1
    ckpt = load_checkpoint(tmp_path / "model_0000002.pth")
    assert ckpt["iteration"] == 2 and ckpt["sampler"] == {"epoch": 0, "start_batch": 2}
    monkeypatch.setattr(loop_mod, "train_step", real_step)
    assert main([*args, "--resume"]) == 0
    assert load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 4
    reference, after = train_losses(out), train_losses(tmp_path)
    assert sorted(after) == [1, 2, 3, 4]
    for it in (3, 4):
        assert after[it] == pytest.approx(reference[it], rel=1e-6, abs=1e-7), it


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    good = ckpt.save_numbered(10, {"model": {"w": torch.ones(2)}, "iteration": 10})
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_numbered(20, {"model": {"w": torch.zeros(2)}, "iteration": 20})
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.last() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000010.pth"]
    assert torch.equal(torch.load(good, weights_only=True)["model"]["w"], torch.ones(2))


def test_only_the_last_k_numbered_checkpoints_are_kept(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for it in (1, 2, 3, 4):
        ckpt.save_numbered(it, {"iteration": it})
    ckpt.save("model_best", {"iteration": 2}, update_last=False)
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["model_0000003.pth", "model_0000004.pth", "model_best.pth"]
    assert ckpt.last().name == "model_0000004.pth"


def test_periodic_evaluation_and_best_checkpoint(tmp_path, shapes_cache):
    cfg = smoke_cfg(shapes_cache, "train.eval_period=2")
    train(cfg, output_dir=tmp_path, log=lambda s: None)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("type") == "eval"]
    assert [r["iteration"] for r in evals] == [2, 4]
    assert all("bbox/AP" in r for r in evals)
    best = max(r["bbox/AP"] or 0.0 for r in evals)
    assert (tmp_path / "model_best.pth").is_file() == (best > 0)
    if best > 0:
        assert load_checkpoint(tmp_path / "model_best.pth")["best_metric"] == pytest.approx(best)


@pytest.mark.parametrize("ap", [0.0, float("nan")])
def test_no_best_checkpoint_without_a_positive_ap(tmp_path, shapes_cache, monkeypatch, ap):
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *args, **kwargs: {"bbox/AP": ap})
    train(smoke_cfg(shapes_cache, "train.eval_period=2", "train.checkpoint_period=0"), output_dir=tmp_path,
          log=lambda s: None)
    assert (tmp_path / "model_final.pth").is_file() and not (tmp_path / "model_best.pth").exists()


def test_a_schedule_longer_than_the_run_is_scaled_with_one_warning(tmp_path, shapes_cache):
    logged = []
    cfg = smoke_cfg(shapes_cache, "train.schedule.warmup_iters=1000", "train.schedule.milestones=[60000,80000]",
                    "train.checkpoint_period=0", "eval.num_vis_images=0")
    train(cfg, output_dir=tmp_path, log=logged.append)
    warnings = [line for line in logged if "train.schedule does not fit" in line]
    assert warnings == ["warning: train.schedule does not fit in 4 iterations; scaled to fit: warmup_iters 1000 -> 0; "
                        "milestones [60000, 80000] (iter) -> [2, 3] (iter)"]
    lrs = {r["iteration"]: r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("type") == "train"}
    assert lrs[1] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.001) and lrs[3] == pytest.approx(0.0001)


def test_channels_last_training_runs_the_backbone_in_channels_last(tmp_path, shapes_cache, monkeypatch):
    seen = []
    build = trainer_mod.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.backbone.body.conv1.register_forward_pre_hook(
            lambda m, inputs: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
        return model

    monkeypatch.setattr(trainer_mod, "build_model", build_and_watch)
    cfg = smoke_cfg(shapes_cache, "train.channels_last=true", "train.max_iters=2", "train.checkpoint_period=0",
                    "train.optimizer.name=adamw", "train.optimizer.lr=0.001")
    metrics = train(cfg, output_dir=tmp_path, log=lambda s: None)
    losses = train_losses(tmp_path)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert "bbox/AP" in metrics
    assert seen and all(seen)  # every batch (training and evaluation) entered the backbone channels-last


def test_every_output_file_gets_the_same_permissions_under_the_umask(tmp_path, shapes_cache):
    import os
    import stat

    old = os.umask(0o027)
    try:
        train(smoke_cfg(shapes_cache, "train.max_iters=2", "train.checkpoint_period=1"), output_dir=tmp_path,
              log=lambda s: None)
    finally:
        os.umask(old)
    names = ("metrics.jsonl", "config.yaml", "model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json",
             "results.json", "predictions.png", "curves.png")
    modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in names}
    assert modes == dict.fromkeys(names, 0o640)
