"""Model speed and memory: our detector beside torchvision's identical model, same weights, same process.

Usage::

    python tools/bench_model.py --arch mask_rcnn --size 800 --precision fp32
    python tools/bench_model.py --arch mask_rcnn --size 800 --fast --precision bf16 --what inference
    python tools/bench_model.py --what memory --size 800 --batch 2          # activation checkpointing
    python tools/bench_model.py --device cuda --batch 8 --precision fp16 --channels-last --what train

What is measured (``--what``, any of):

- ``backbone``: ResNet-FPN forward on ``[batch, 3, size, size]`` (eval, inference mode) against
  ``torchvision.models.detection.backbone_utils.resnet_fpn_backbone``;
- ``inference``: one detector forward per image of ``size x size`` (the model transform resizes it to
  ``min_size=size``), ours optionally through ``optimize_for_inference`` (``--fast``), against
  torchvision's stock ``<arch>_resnet50_fpn`` in fp32 (the usual baseline) and, with ``--precision``
  other than fp32, also under the same autocast. Both use ``box_score_thresh=0`` so that every image
  keeps 100 detections (random weights would otherwise keep none and skip the mask head);
- ``train``: one training step (forward, backward, SGD step) on ``batch`` images with 4 objects each,
  both models under the same autocast setting, ours in the memory format the trainer uses
  (``train.channels_last: auto``: channels-last on CPU and under CUDA autocast), torchvision's as built
  (channels-last for both with ``--channels-last``); with ``--precision`` other than fp32, also
  against torchvision's step in fp32;
- ``memory``: peak memory of one training step of ours without and with activation checkpointing
  (``checkpoint_stages`` c2..c5) and of torchvision's model, each in a fresh subprocess on CPU (peak
  RSS) or in-process on CUDA (``max_memory_allocated``), plus the loss of each (they must be equal).

Runs alternate ours / torchvision; the first ``--warmup`` runs of each are not timed; medians are
reported with the ratio ours / torchvision (< 1 means ours is faster or smaller).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from detection.precision import PRECISIONS, PrecisionPolicy, short_name

#: the ``--precision`` names: the short names of detection.precision
_PRECISION_NAMES = sorted({short_name(dtype) for dtype in PRECISIONS.values()})
_TV_BUILDERS = {
    "faster_rcnn": "fasterrcnn_resnet50_fpn",
    "mask_rcnn": "maskrcnn_resnet50_fpn",
    "retinanet": "retinanet_resnet50_fpn",
    "fcos": "fcos_resnet50_fpn",
    "keypoint_rcnn": "keypointrcnn_resnet50_fpn",
    "faster_rcnn_v2": "fasterrcnn_resnet50_fpn_v2",
    "mask_rcnn_v2": "maskrcnn_resnet50_fpn_v2",
    "retinanet_v2": "retinanet_resnet50_fpn_v2",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="mask_rcnn", choices=sorted(_TV_BUILDERS), help="detector (default mask_rcnn)")
    parser.add_argument("--backbone", default="resnet50", help="backbone name (default resnet50; torchvision's side "
                        "uses the same name through resnet_fpn_backbone for --what backbone)")
    parser.add_argument("--size", type=int, default=800, help="image side in pixels and min_size (default 800)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step / backbone forward (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=_PRECISION_NAMES, default="fp32", help="autocast dtype (default fp32)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for both models")
    parser.add_argument("--fast", action="store_true", help="ours through optimize_for_inference (inference only)")
    parser.add_argument("--what", nargs="+", default=["backbone", "inference", "train"],
                        choices=("backbone", "inference", "train", "memory"), help="what to measure")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--memory-probe", choices=("ours", "ours_ckpt", "torchvision"), help=argparse.SUPPRESS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(fn_ours: Callable[[], Any], fn_tv: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    ours, tv = [], []
    for i in range(warmup + repeats):
        # Alternate which runs first, so slow drifts of a shared machine hit both sides alike.
        order = [("ours", fn_ours), ("tv", fn_tv)] if i % 2 == 0 else [("tv", fn_tv), ("ours", fn_ours)]
        for name, fn in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                (ours if name == "ours" else tv).append(dt)
    return ours, tv


def _row(what: str, ours: list[float], tv: list[float], per: int, note: str = "") -> dict[str, Any]:
    mo, mt = statistics.median(ours), statistics.median(tv)
    return {"what": what, "ours_s": mo, "torchvision_s": mt, "ratio": mo / mt, "ours_items_per_s": per / mo,
            "torchvision_items_per_s": per / mt, "note": note, "ours_all": ours, "torchvision_all": tv}


def _targets(batch: int, size: int, arch: str, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + size * 0.05
        boxes = torch.cat([xy, xy + wh], 1)
        t = {"boxes": boxes, "labels": torch.randint(1, 91, (4,), generator=g)}
        if arch.startswith("mask"):
            masks = torch.zeros(4, size, size, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            t["masks"] = masks
        if arch.startswith("keypoint"):
            kp = torch.zeros(4, 17, 3)
            kp[..., :2] = boxes[:, None, :2] + 2
            kp[..., 2] = 1
            t["keypoints"] = kp
        out.append({k: v.to(device) for k, v in t.items()})
    return out


def _build_pair(args: argparse.Namespace, device: torch.device, **options: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    import torchvision.models.detection as tvd

    from detection import build_detector

    torch.manual_seed(args.seed)
    tv = getattr(tvd, _TV_BUILDERS[args.arch])(weights=None, weights_backbone=None, **options)
    ours = build_detector(args.arch, backbone="resnet50", num_classes=2 if args.arch == "keypoint_rcnn" else 91, **options)
    ours.load_state_dict(tv.state_dict())
    return ours.to(device), tv.to(device)


def _autocast(device: torch.device, precision: str):
    return PrecisionPolicy.of(precision, device).autocast()


def bench_backbone(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from backbone import build_backbone

    torch.manual_seed(args.seed)
    tv = resnet_fpn_backbone(backbone_name=args.backbone, weights=None, trainable_layers=5).eval().to(device)
    ours = build_backbone(args.backbone).eval().to(device)
    ours.load_state_dict(tv.state_dict())
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    if args.channels_last:
        for m in (ours, tv):
            m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run(model: torch.nn.Module) -> Callable[[], Any]:
        def f() -> Any:
            with torch.inference_mode(), _autocast(device, args.precision):
                return model(x)
        return f

    o, t = _time_pair(run(ours), run(tv), args.repeats, args.warmup, device)
    return _row(f"backbone+FPN forward ({args.backbone}, batch {args.batch}, {args.precision})", o, t, args.batch)


def bench_inference(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from detection.inference import optimize_for_inference

    score = {"box_score_thresh": 0.0} if "rcnn" in args.arch else {"score_thresh": 0.0}
    ours, tv = _build_pair(args, device, min_size=args.size, max_size=max(args.size, 1333), **score)
    ours.eval()
    tv.eval()
    if args.fast:
        ours = optimize_for_inference(ours, precision=args.precision, channels_last=True)
    elif args.channels_last:
        ours.backbone.to(memory_format=torch.channels_last)
    if args.channels_last:
        tv.backbone.to(memory_format=torch.channels_last)
    image = [torch.rand(3, args.size, args.size, device=device)]

    def ours_fn() -> Any:
        with torch.inference_mode():
            if args.fast:
                return ours(image)
            with _autocast(device, args.precision):
                return ours(image)

    def tv_fn(precision: str) -> Callable[[], Any]:
        def f() -> Any:
            with torch.inference_mode(), _autocast(device, precision):
                return tv(image)
        return f

    label = f"{args.arch} inference, 1 image {args.size}px, ours {'fast ' if args.fast else ''}{args.precision}"
    rows = []
    o, t = _time_pair(ours_fn, tv_fn("fp32"), args.repeats, args.warmup, device)
    rows.append(_row(label + " vs torchvision fp32", o, t, 1))
    if args.precision != "fp32":
        o, t = _time_pair(ours_fn, tv_fn(args.precision), args.repeats, args.warmup, device)
        rows.append(_row(label + f" vs torchvision {args.precision}", o, t, 1))
    with torch.inference_mode():
        out = ours_fn()[0]
    rows[-1]["ours_box_dtype"] = str(out["boxes"].dtype)
    with torch.inference_mode(), _autocast(device, args.precision):
        rows[-1]["torchvision_box_dtype"] = str(tv(image)[0]["boxes"].dtype)
    return rows


def _train_step_fn(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], device: torch.device,
                   precision: str, seed: int) -> Callable[[], float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    scaler = PrecisionPolicy.of(precision, device).grad_scaler()

    def step() -> float:
        torch.manual_seed(seed)
        with _autocast(device, precision):
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench_train(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from detection.models import to_channels_last

    ours, tv = _build_pair(args, device, min_size=args.size, max_size=max(args.size, 1333))
    ours.train()
    tv.train()
    # Ours in the memory format the trainer picks (train.channels_last: auto), torchvision's as built.
    ours_cl = args.channels_last or PrecisionPolicy(device.type, PRECISIONS[args.precision]).channels_last
    if ours_cl:
        to_channels_last(ours)
    if args.channels_last:
        tv.backbone.to(memory_format=torch.channels_last)
    images = [torch.rand(3, args.size, args.size, device=device) for _ in range(args.batch)]
    targets = _targets(args.batch, args.size, args.arch, device)
    ours_step = _train_step_fn(ours, images, targets, device, args.precision, args.seed)
    cl = ", channels_last" if args.channels_last else ""
    layout = ", ours channels-last (train.channels_last: auto)" if ours_cl and not args.channels_last else ""
    label = f"{args.arch} train step, batch {args.batch} at {args.size}px, {args.precision}{cl}{layout}"
    o, t = _time_pair(ours_step, _train_step_fn(tv, images, targets, device, args.precision, args.seed),
                      args.repeats, args.warmup, device)
    rows = [_row(label, o, t, args.batch)]
    if args.precision != "fp32":  # the usual baseline: torchvision's model trained in fp32
        o, t = _time_pair(ours_step, _train_step_fn(tv, images, targets, device, "fp32", args.seed),
                          args.repeats, args.warmup, device)
        rows.append(_row(f"{label}, vs torchvision fp32", o, t, args.batch))
    return rows


def _memory_probe(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One training step of one model in this (fresh) process; reports peak memory and the loss."""
    import torchvision.models.detection as tvd

    from detection import build_detector

    torch.manual_seed(args.seed)
    kind = args.memory_probe
    options = {"min_size": args.size, "max_size": max(args.size, 1333)}
    if kind == "torchvision":
        model = getattr(tvd, _TV_BUILDERS[args.arch])(weights=None, weights_backbone=None, **options)
    else:
        stages = ("c2", "c3", "c4", "c5") if kind == "ours_ckpt" else ()
        model = build_detector(args.arch, backbone={"name": args.backbone, "checkpoint_stages": stages}, num_classes=91, **options)
        torch.manual_seed(args.seed)
        reference = getattr(tvd, _TV_BUILDERS[args.arch])(weights=None, weights_backbone=None, **options)
        model.load_state_dict(reference.state_dict())
        del reference
    model.to(device).train()
    images = [torch.rand(3, args.size, args.size, device=device) for _ in range(args.batch)]
    targets = _targets(args.batch, args.size, args.arch, device)
    step = _train_step_fn(model, images, targets, device, args.precision, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = step()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with _RssSampler() as rss:
            loss = step()
        peak = rss.peak - rss.base
    return {"probe": kind, "peak_bytes": peak, "loss": loss}


class _RssSampler:
    """Peak resident memory of this process while the ``with`` body runs, sampled every millisecond
    from ``/proc/self/statm`` (the high-water mark ``ru_maxrss`` would also count whatever the process
    touched before, such as loading the weights); falls back to ``ru_maxrss`` without ``/proc``."""

    def __init__(self) -> None:
        self.proc = os.path.exists("/proc/self/statm")
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        if self.proc:
            with open("/proc/self/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> _RssSampler:
        gc.collect()
        self.base = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def bench_memory(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    results = {}
    for kind in ("ours", "ours_ckpt", "torchvision"):
        cmd = [sys.executable, __file__, "--memory-probe", kind, "--arch", args.arch, "--backbone", args.backbone,
               "--size", str(args.size), "--batch", str(args.batch), "--device", str(device), "--precision",
               args.precision, "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {kind} failed:\n{proc.stderr[-2000:]}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    what = "peak GPU memory (max_memory_allocated)" if device.type == "cuda" else "peak RSS increase"
    ours, ckpt, tv = (results[k]["peak_bytes"] / 2**20 for k in ("ours", "ours_ckpt", "torchvision"))
    return [
        {"what": f"train-step {what}, MiB: ours vs torchvision ({args.arch} {args.backbone}, batch {args.batch}, {args.size}px)",
         "ours_mib": ours, "torchvision_mib": tv, "ratio": ours / tv,
         "losses": {k: results[k]["loss"] for k in results}},
        {"what": f"train-step {what}, MiB: ours with activation checkpointing (c2..c5) vs without",
         "ours_ckpt_mib": ckpt, "ours_mib": ours, "ratio": ckpt / ours,
         "same_loss": results["ours"]["loss"] == results["ours_ckpt"]["loss"],
         "losses": {k: results[k]["loss"] for k in results}},
    ]


def machine_description(device: torch.device) -> str:
    import torchvision

    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        except OSError:
            pass
        hw = f"{cpu}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}"
    return f"{hw}; torch {torch.__version__}, torchvision {torchvision.__version__}"


def format_table(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}", "", "| measurement | ours | torchvision | ours / torchvision |", "|---|---:|---:|---:|"]
    for row in result["rows"]:
        if "ours_s" in row:
            lines.append(f"| {row['what']} | {row['ours_s']:.3f} s | {row['torchvision_s']:.3f} s | {row['ratio']:.2f} |")
        elif "ours_ckpt_mib" in row:
            lines.append(f"| {row['what']} | {row['ours_ckpt_mib']:.0f} (ckpt) | {row['ours_mib']:.0f} (no ckpt) | {row['ratio']:.2f} |")
        else:
            lines.append(f"| {row['what']} | {row['ours_mib']:.0f} | {row['torchvision_mib']:.0f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if "backbone" in args.what:
        rows.append(bench_backbone(args, device))
    if "inference" in args.what:
        rows += bench_inference(args, device)
    if "train" in args.what:
        rows += bench_train(args, device)
    if "memory" in args.what:
        rows += bench_memory(args, device)
    return {"machine": machine_description(device), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "args": {k: v for k, v in vars(args).items() if k != "memory_probe"}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_model.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.memory_probe:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(_memory_probe(args, torch.device(args.device))))
        return 0
    result = run(args)
    table = format_table(result)
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
