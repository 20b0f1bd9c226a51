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
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_best.pth", "model_final.pth"]
