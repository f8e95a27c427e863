#!/usr/bin/env bash
# Issue 25's GPU figures in one run on the lent GPU machine (one H100 / H200; /work/shared/GPU.md): end-to-end
# images/s at batch 32 against model-only images/s on the same 1024-px JPEGs, and the peak memory of the 7B-shape
# bundle in bfloat16 and reloaded in 4-bit (`python -m benchmarks.datapath --config 7b`), then the tests of the CUDA,
# 4-bit and worker paths. About 5 minutes expected, 8 at most (each step under `timeout`: 60 + 330 + 60 + 30 s).
#
# 1. Here, before the run: the wheels the machine lacks, for its Python 3.12, into `.whl/` (git-ignored; 57 MB, never
#    committed). bitsandbytes 0.50.2 is tagged manylinux_2_24, hence the second --platform:
#
#        pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#            --platform manylinux_2_24_x86_64 -d .whl transformers==5.24.0 trl==1.16.0 peft==0.21.2 \
#            datasets==5.2.0 evaluate==0.4.6 bitsandbytes==0.50.2 dill==0.4.1 multiprocess==0.70.19
#
# 2. The dry run here (CPU, the same code at 7B widths, one text layer and one vision block, a few images; minutes):
#
#        python -m benchmarks.datapath --config 7b --device cpu --text-layers 1 --vision-blocks 1 --images 8 \
#            --batch-size 4 --workers 1 --repeats 1
#
# 3. On the machine, from the project's root (the device tool: command `bash benchmarks/gpu_issue25.sh`, carry
#    [".whl"], timeout_s 540):
#
#        bash benchmarks/gpu_issue25.sh [OUT]      # OUT: the argument, else $OUT (the device tool's), else gpu-out/
#
# A dry run of this script on the CPU (no wheels installed: this machine's packages; the benchmark step refuses at
# once without CUDA unless DATAPATH_ARGS gives a CPU shape, e.g. "--config small --device cpu --images 8 ..."):
#
#        INSTALL_WHEELS=0 PYTHON=python bash benchmarks/gpu_issue25.sh /tmp/gpu-dry-run
#
# What comes back under OUT: device.txt, summary.txt (one line per step: exit status, seconds), <step>.log, and
# datapath-7b.json (rewritten after each part, so a step cut by its timeout still leaves what it measured). To cut
# the benchmark's time: DATAPATH_ARGS="--images 128" or "--text-layers 14 --vision-blocks 16" (the JSON's `shape`
# says what ran) or "--skip-4bit-end-to-end". The 7B bundle saved for the 4-bit reload (about 17 GB of the 64 GiB
# disk) goes into a folder made here and removed at the end.
set -uo pipefail
OUT="${1:-${OUT:-gpu-out}}"
mkdir -p "$OUT"
export PY="${PYTHON:-python3}" SITE="${SITE:-/tmp/site}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$PWD"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/emovlm-kd-issue25.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
: > "$OUT/summary.txt"

. "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"  # step NAME SECONDS COMMAND...

install_wheels() {  # once per machine: a second run on a warm machine finds the marker of the same wheel set
    local wheels=(.whl/*.whl)
    [ -e "${wheels[0]}" ] || { echo "no wheels in .whl/ (see the top of benchmarks/gpu_issue25.sh)"; return 1; }
    local marker="$SITE/.emovlm-kd-wheels"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$(ls .whl)" ]; then
        echo "wheels already installed in $SITE"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        && ls .whl > "$marker"
}

export -f install_wheels
if [ "${INSTALL_WHEELS:-1}" = 1 ]; then step install 60 bash -c install_wheels; fi
"$PY" - > "$OUT/device.txt" 2>&1 <<'EOF'
import os, torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
print("cpus", len(os.sched_getaffinity(0)))
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as error:
    print("bitsandbytes does not import:", error)
EOF
nvidia-smi >> "$OUT/device.txt" 2>&1
df -h "$WORK" >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# shellcheck disable=SC2086  # DATAPATH_ARGS: extra flags, split on purpose
step datapath-7b 330 "$PY" -m benchmarks.datapath --config 7b --batch-size 32 --tmp-dir "$WORK" \
    --output "$OUT/datapath-7b.json" ${DATAPATH_ARGS:-}
step tests-cuda 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py tests/test_quantized.py \
    tests/test_datapath_bench.py
step tests-workers 30 "$PY" -m pytest -q -p no:cacheprovider tests/test_collections.py -k "worker or pin"
echo "logs and JSON in $OUT/ (summary: $OUT/summary.txt)"
