#!/usr/bin/env bash
# What a user with a CUDA GPU runs to check this project there (issue 14): the test suite, the demo training run,
# `predict` on its model, the 7B-shape benchmark (predict / protocol / floor / batch 32, peak memory) on Qwen2-VL-7B's,
# Qwen2.5-VL-7B's and Qwen3-VL-8B's shapes, and stage 1's QLoRA steps at 7B widths. Each step runs under `timeout`, its log in OUT/<step>.log, and one summary line per
# step (exit status, seconds) in OUT/summary.txt, so one failing step does not hide the others.
#
#     bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to gpu-check/; run from the project's root
#
# Offline: nothing is downloaded (random 7B-shape weights are built on the GPU). Without CUDA the benchmark steps
# stop at once with exit status 2 and say so; the other steps run on the CPU.
set -uo pipefail
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
: > "$OUT/summary.txt"

. "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"  # step NAME SECONDS COMMAND...

"$PY" - > "$OUT/device.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
EOF
cat "$OUT/device.txt"

step tests 1800 "$PY" -m pytest -q
step demo 900 "$PY" -m emovlm_kd.cli train --output-dir "$OUT/demo"
step predict 300 "$PY" -m emovlm_kd.cli predict --model "$OUT/demo/model" "$OUT/demo/data/synthetic/test" \
    --output "$OUT/predictions.jsonl"
step bench-7b 1200 "$PY" -m benchmarks.bench --config 7b --output "$OUT/bench-7b.json"
step bench-7b-q25 1200 "$PY" -m benchmarks.bench --config 7b --backbone qwen2_5_vl --output "$OUT/bench-7b-qwen2_5_vl.json"
step bench-8b-q3 1200 "$PY" -m benchmarks.bench --config 7b --backbone qwen3_vl --output "$OUT/bench-8b-qwen3_vl.json"
step train-7b 1200 "$PY" -m benchmarks.bench --config 7b --train --output "$OUT/train-7b.json"
echo "logs and JSON in $OUT/ (summary: $OUT/summary.txt)"
