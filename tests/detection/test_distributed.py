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
