#!/usr/bin/env bash
# The CUDA checks of one GPU session, in one command (docs/results.md): the CUDA lossless test, the
# verification cost (masked tree attention and exact rows), a step profile, then the CUDA bench until
# BUDGET seconds have passed (the bench is stopped with SIGINT, which keeps its partial report).
# Usage: scripts/cuda_checks.sh OUT_DIR, with the default model installed and this repository
# importable (PYTHONPATH). Environment: BUDGET (default 540), METHODS, CATEGORIES.
set -u
out=${1:-out/cuda-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CERBERUS_NO_CALIBRATE=1
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

echo "=== lossless"
timeout -s INT 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_lossless.py -k cuda --durations=3 2>&1 | tail -40
echo "=== verification cost at $((SECONDS - start)) s"
timeout -s INT 80 python3 benchmarks/verify_cost.py --device cuda --weights bfloat16 --tree-attention masked,rows \
    --qs 1,2,4,8,16,32,64 --repeats 3 --out "$out/verify_cost_cuda.png" 2>&1 | grep -v "it/s\|s/it"
echo "=== step profile at $((SECONDS - start)) s"
timeout -s INT 70 python3 benchmarks/step_profile.py --methods ar,cerberus-nogate --tree benchmarks/default_tree.json \
    --weights bfloat16 --max-new-tokens 64 --ops 2>&1 | grep -v "it/s\|s/it" | tail -80
left=$((${BUDGET:-540} - (SECONDS - start)))
echo "=== bench at $((SECONDS - start)) s, ${left} s left"
categories=${CATEGORIES:+--categories $CATEGORIES}
timeout -s INT "$left" python3 -m cerberus_decoding.cli bench --device cuda --weights bfloat16 --questions builtin \
    --limit 1 $categories --max-new-tokens 128 --methods "${METHODS:-ar,medusa,cerberus-nogate}" \
    --tree benchmarks/default_tree.json --no-calibrate --warmup 1 --repeats 1 --out "$out/bench" 2>&1 |
    grep -v "it/s\|s/it\|gen/s\|run/s" | tail -60
echo "=== all done at $((SECONDS - start)) s"
