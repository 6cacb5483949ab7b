#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (one H100/H200: torch and transformers there, no network).
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Runs `pytest -m gpu` (train-step on CUDA = CPU in fp32 with packed rows and chunked log-probs, the bf16
# default and FSDP2 + bf16 on one GPU within 2·lr per update of fp32, hf generation and the hf PRM on
# CUDA) and bench/gpu_bench.py (MFU, tokens/s and peak memory of an update on Qwen2.5-0.5B's and 1.5B's
# shapes at 16 rows × 4096 tokens in bf16: whole logits vs chunked, padded vs packed with sdpa or flex
# attention; hf generate tokens/s), writing logs and a table to OUT_DIR. About 6-10 minutes on an
# H100/H200 (BENCH_TIMEOUT caps the benchmark, default 420 s). Packages the machine lacks travel as wheels in .whl/
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
timeout "${BENCH_TIMEOUT:-420}" $PY bench/gpu_bench.py $SMALL --out "$OUT_DIR/bench.md" 2>&1 | grep -v "Writing model shards" | tee "$OUT_DIR/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
