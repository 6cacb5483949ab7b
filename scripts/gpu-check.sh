#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (one H100/H200: torch and transformers there, no network).
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Runs `pytest -m gpu` (train-step on CUDA = CPU, FSDP2 + bf16 on one GPU, hf generation and the hf PRM
# on CUDA) and bench/gpu_bench.py (train-step tokens/s and MFU on a ~0.5B random Qwen2, hf generate
# tokens/s), writing logs and a table to OUT_DIR. Packages the machine lacks travel as wheels in .whl/
# (fetch them beforehand: see docs/PERFORMANCE.md). Without CUDA it runs the CPU-safe parts: the gpu
# tests skip and the benchmark runs a tiny config.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ! $PY -c 'import polars, math_verify, pebble' 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/scope-site .whl/*.whl \
        && export PYTHONPATH=/tmp/scope-site:$PWD
fi
SMALL=""
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
else
    echo "no CUDA device: running the CPU-safe parts" | tee "$OUT_DIR/gpu.txt"
    SMALL=--small
fi
$PY -c 'import torch, transformers, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT_DIR/gpu.txt"
status=0
$PY -m pytest -q -m gpu -p no:cacheprovider --timeout 300 tests/test_gpu.py tests/test_prm.py 2>&1 | tee "$OUT_DIR/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
$PY bench/gpu_bench.py $SMALL --out "$OUT_DIR/bench.md" 2>&1 | grep -v "Writing model shards" | tee "$OUT_DIR/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
