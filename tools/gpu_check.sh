#!/usr/bin/env bash
# GPU evidence in one run (about 6-8 minutes on one H100):
#   1. the GPU-marked tests (train_step under fp16 / bf16 PrecisionPolicy, float32 boxes, GradScaler, fast inference path);
#   2. Mask R-CNN R50-FPN at 800 px, batch 8: train img/s in fp32 / fp16 / bf16, with and without
#      channels_last, inference img/s and peak memory, each beside torchvision's identical model;
#   3. 200 AMP training iterations of the smoke recipe on the GPU, to show the loss falls.
#
# Needs torch, torchvision, numpy, pyyaml (the model, benchmark and GPU tests import nothing else).
# Step 3 also needs pycocotools, which the data pipeline uses. On a machine without network, bring
# wheels made elsewhere (pip download pycocotools -d wheels/) and set WHEELS=wheels/; without
# pycocotools step 3 is skipped with a message.
#
# Results go to $OUT (default: gpu_check_out/): JSON, Markdown tables and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
QUICK=${QUICK:-0}               # QUICK=1: tiny sizes, for checking the script itself on any machine
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$QUICK" = 1 ]; then SIZE=128; BATCH=2; REPEATS=1; ITERS=4; else SIZE=800; BATCH=8; REPEATS=5; ITERS=200; fi

echo "== environment"
python - <<'PY' | tee "$OUT/env.txt"
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for mod in ("pycocotools", "albumentations"):
    try:
        __import__(mod); print(mod, "present")
    except ImportError:
        print(mod, "absent")
PY

echo "== 1. GPU-marked tests"
if [ "$DEVICE" = cuda ]; then
  python -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
else
  echo "skipped (DEVICE=$DEVICE)" | tee "$OUT/gpu_tests.txt"
fi

echo "== 2. benchmark: mask_rcnn R50-FPN ${SIZE}px batch ${BATCH} on $DEVICE"
for prec in fp32 fp16 bf16; do
  for cl in "" "--channels-last"; do
    tag="train_${prec}${cl:+_cl}"
    python tools/benchmark.py model --device "$DEVICE" --arch mask_rcnn --size "$SIZE" --batch "$BATCH" \
      --precision "$prec" $cl --what train --repeats "$REPEATS" --warmup 1 \
      --json "$OUT/$tag.json" --markdown "$OUT/$tag.md" 2>&1 | tee "$OUT/$tag.log"
  done
  python tools/benchmark.py model --device "$DEVICE" --arch mask_rcnn --size "$SIZE" --batch "$BATCH" \
    --precision "$prec" --fast --what inference --repeats "$REPEATS" --warmup 1 \
    --json "$OUT/infer_${prec}.json" --markdown "$OUT/infer_${prec}.md" 2>&1 | tee "$OUT/infer_${prec}.log"
done
python tools/benchmark.py model --device "$DEVICE" --arch mask_rcnn --size "$SIZE" --batch "$BATCH" --what memory \
  --json "$OUT/memory.json" --markdown "$OUT/memory.md" 2>&1 | tee "$OUT/memory.log"

echo "== 3. ${ITERS} AMP training iterations on $DEVICE"
if ! python -c "import pycocotools" 2>/dev/null && [ -n "${WHEELS:-}" ]; then
  pip install --no-index --find-links "$WHEELS" pycocotools
fi
if python -c "import pycocotools" 2>/dev/null; then
  python tools/train_det.py --config configs/smoke/tiny_cpu.yaml --output-dir "$OUT/train" \
    --set train.max_iters="$ITERS" train.device="$DEVICE" train.amp.enabled=true train.amp.dtype=float16 \
          train.log_period=10 train.checkpoint_period=0 data.num_workers=2 data.shapes.num_train=200 \
          data.shapes.num_val=0 data.train.augment=[] data.shapes.cache_dir="$OUT/shapes" 2>&1 | tee "$OUT/train.log"
  python - "$OUT/train/metrics.jsonl" <<'PY' | tee "$OUT/train_loss.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"type": "train"' in l]
first, last = rows[0], rows[-1]
print(f"loss at iteration {first['iteration']}: {first['loss']:.3f}; at iteration {last['iteration']}: {last['loss']:.3f}")
PY
else
  echo "skipped: pycocotools is not installed (set WHEELS=<folder of wheels>)" | tee "$OUT/train_loss.txt"
fi
echo "== done; results in $OUT"
