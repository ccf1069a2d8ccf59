#!/usr/bin/env bash
# The CUDA checks of one GPU session, in one command (docs/results.md): the CUDA lossless tests
# (eager and CUDA-graph replay), the verification cost (masked tree attention, exact rows, graphs),
# then the CUDA bench with graphs and eagerly until BUDGET seconds have passed (each bench is stopped
# with SIGINT, which keeps its partial report).
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
timeout -s INT 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_lossless.py -k cuda --durations=3 2>&1 | tail -40
echo "=== verification cost at $((SECONDS - start)) s"
timeout -s INT 100 python3 benchmarks/verify_cost.py --device cuda --weights bfloat16 --tree-attention rows,masked \
    --cuda-graphs --qs 1,2,4,8,16,32,64 --repeats 3 --out "$out/verify_cost_cuda.png" 2>&1 | grep -v "it/s\|s/it"

bench() {  # bench SECONDS OUT_SUBDIR: the builtin questions, one per category, default tree
    local categories=${CATEGORIES:+--categories $CATEGORIES}
    timeout -s INT "$1" python3 -m cerberus_decoding.cli bench --device cuda --weights bfloat16 --questions builtin \
        --limit 1 $categories --max-new-tokens 128 --methods "${METHODS:-ar,medusa,cerberus-nogate}" \
        --tree benchmarks/default_tree.json --no-calibrate --warmup 1 --repeats 1 --out "$out/$2" 2>&1 |
        grep -v "it/s\|s/it\|gen/s\|run/s" | tail -40
}
left=$((${BUDGET:-540} - (SECONDS - start)))
echo "=== bench, CUDA graphs, at $((SECONDS - start)) s"
CERBERUS_CUDA_GRAPHS=1 bench $((left / 2)) bench-graphs
echo "=== bench, eager, at $((SECONDS - start)) s"
bench $((${BUDGET:-540} - (SECONDS - start))) bench
echo "=== all done at $((SECONDS - start)) s"
