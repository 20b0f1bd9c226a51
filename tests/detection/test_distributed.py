"""torchrun with 2 CPU processes (gloo): training runs, and its metrics equal a single-process evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detection.config import load_config
from detection.trainer import evaluate_only

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke" / "tiny_cpu.yaml"


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_single_process_eval(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "shapes"
    overrides = [f"data.shapes.cache_dir={cache}", "train.max_iters=2", "data.shapes.num_val=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tools" / "train_det.py"), "--config", str(SMOKE), "--output-dir", str(out), "--set", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "2 process(es) x 2 images" in log
    assert log.count("training mask_rcnn on resnet18") == 1, "only rank 0 logs"
    distributed = json.loads((out / "metrics.json").read_text())
    single = evaluate_only(load_config(SMOKE, overrides), out / "model_final.pth", output_dir=tmp_path / "single",
                           log=lambda s: None)
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50"):
        assert distributed[key] == pytest.approx(single[key], abs=1e-9), key
    # Rank 0 alone wrote the outputs.
    best = ["model_best.pth"] if distributed["bbox/AP"] > 0 else []  # written only for a positive AP
    assert sorted(p.name for p in out.glob("model_*.pth")) == sorted([*best, "model_final.pth"])


STALL_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from detection import distributed as dist
from detection.config import load_config

timeout = load_config(None, ["train.dist_timeout=20"]).train.dist_timeout
rank, world, _ = dist.init_from_env("cpu", timeout)
folder = Path(sys.argv[1])
assert dist.any_rank(False, dist.torch.device("cpu")) is False  # both ranks arrive: fine
if rank == 1:
    (folder / "pid1").write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)  # stalled: never reaches the next collective
    sys.exit(0)
start = time.monotonic()
try:
    dist.any_rank(False, dist.torch.device("cpu"))
except dist.DistributedTimeout as exc:
    (folder / "message").write_text(f"{time.monotonic() - start:.1f} {exc}")
finally:
    while not (folder / "pid1").exists():
        time.sleep(0.1)
    os.kill(int((folder / "pid1").read_text()), signal.SIGKILL)
"""


def test_a_stopped_rank_makes_the_others_stop_within_dist_timeout_naming_it(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert (tmp_path / "message").is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    seconds, message = (tmp_path / "message").read_text().split(" ", 1)
    assert 15 <= float(seconds) < 60
    assert message.startswith("rank 0: rank(s) 1 did not reach all_reduce (finite-step check) within "
                              "train.dist_timeout=20s"), message


DDP_STALL_SCRIPT = """
import importlib.util, os, signal, sys, time
from pathlib import Path
import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

folder, stop_at, tool = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
argv = sys.argv[4:]
spec = importlib.util.spec_from_file_location("train_det", tool)
train_det = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_det)
forwards = 0


def stop(grad):
    (folder / "stopped").write_text(f"{os.getpid()} {time.time()}")
    os.kill(os.getpid(), signal.SIGSTOP)
    return grad


def stop_in_backward(module, args, output):
    # Rank 1 stops when the backward pass of training forward `stop_at` starts: past every collective
    # of the step before it (the finite-loss check included), before its first gradient all-reduce.
    global forwards
    if isinstance(module, GeneralizedRCNN) and module.training:
        forwards += 1
        if forwards == stop_at:
            for loss in output.values():
                loss.register_hook(stop)


if int(os.environ["RANK"]) == 1:
    torch.nn.modules.module.register_module_forward_hook(stop_in_backward)
    train_det.main(argv)
    sys.exit(0)
try:
    code = train_det.main(argv)
except BaseException as exc:
    code = type(exc).__name__
pid, stopped_at = (folder / "stopped").read_text().split() if (folder / "stopped").exists() else (0, time.time())
(folder / "rank0").write_text(f"{code} {time.time() - float(stopped_at):.1f}")
if int(pid):
    os.kill(int(pid), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_rank_stopped_in_the_gradient_all_reduce_is_named_within_dist_timeout(tmp_path):
    script = tmp_path / "ddp_stall.py"
    script.write_text(DDP_STALL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = ["--config", str(SMOKE), "--output-dir", str(tmp_path / "run"), "--set",
            f"data.shapes.cache_dir={tmp_path / 'shapes'}", "data.shapes.num_val=0", "train.max_iters=4",
            "train.checkpoint_period=0", "train.dist_timeout=10"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), "2", str(REPO / "tools" / "train_det.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    log = proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "stopped").is_file() and (tmp_path / "rank0").is_file(), log
    code, seconds = (tmp_path / "rank0").read_text().split()
    assert code == "2", log  # the exit-code table: a distributed timeout is exit 2, like other stops to fix
    assert 10 <= float(seconds) < 30, log
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 0: rank(s) 1 did not reach DDP's gradient all-reduce or buffer broadcast "
                      "(iteration 2) within train.dist_timeout=10s (stalled or stopped); stopping. Check that "
                      "process, or raise train.dist_timeout for slow steps."], log
