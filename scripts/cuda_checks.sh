#!/usr/bin/env bash
# The CUDA checks of one GPU session, in one command (docs/results.md), most wanted first: the
# lossless test of the CUDA default (steps and heads replayed from CUDA graphs), the bench, the
# verification cost (masked tree attention, exact rows, graphs), the step profile, the eager path's
# lossless test (CERBERUS_CUDA_GRAPHS=0), the eager bench, then a quick calibration of both shipped
# heads for this GPU (written into the heads, copied to OUT_DIR: commit them to ship them), all
# within BUDGET seconds (each bench is stopped with SIGINT, which keeps its partial report).
# A device call returns at most 8 files: pack OUT_DIR into one, e.g.
#   scripts/cuda_checks.sh /tmp/cc; tar czf $OUT/cuda-checks.tgz -C /tmp/cc .
# Usage: scripts/cuda_checks.sh OUT_DIR, with the default model installed and this repository
# importable (PYTHONPATH). Environment: BUDGET (default 540), METHODS, CATEGORIES, REPEATS (default 3).
set -u
out=${1:-out/cuda-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CERBERUS_NO_CALIBRATE=1 COLUMNS=160
start=$SECONDS
budget=${BUDGET:-540}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

lossless() {  # lossless SECONDS TEST
    timeout -s INT "$1" python3 -m pytest -q -p no:cacheprovider "tests/test_lossless.py::$2" --durations=2 2>&1 | tail -30
}
bench() {  # bench SECONDS OUT_SUBDIR: the builtin questions, one per category, default tree
    local categories=${CATEGORIES:+--categories $CATEGORIES}
    timeout -s INT "$1" python3 -m cerberus_decoding.cli bench --device cuda --weights bfloat16 --questions builtin \
        --limit 1 $categories --max-new-tokens 128 --methods "${METHODS:-ar,medusa,cerberus-nogate,cerberus}" \
        --tree benchmarks/default_tree.json --no-calibrate --warmup 1 --repeats "${REPEATS:-3}" --out "$out/$2" 2>&1 |
        grep -v "it/s\|s/it\|gen/s\|run/s" | tail -40
}
left() { echo $((budget - (SECONDS - start))); }

echo "=== lossless, CUDA graphs (the default)"
lossless 150 test_cuda_speculative_greedy_equals_ar
echo "=== bench, CUDA graphs, at $((SECONDS - start)) s"
bench $(($(left) * 40 / 100)) bench-graphs
echo "=== verification cost at $((SECONDS - start)) s"
timeout -s INT 70 python3 benchmarks/verify_cost.py --device cuda --weights bfloat16 --tree-attention rows,masked \
    --cuda-graphs --qs 1,2,4,8,16,32,64 --repeats 3 --out "$out/verify_cost_cuda.png" 2>&1 | grep -v "it/s\|s/it"
echo "=== step profile at $((SECONDS - start)) s"
timeout -s INT 60 python3 benchmarks/step_profile.py --methods ar,cerberus-nogate,medusa --weights bfloat16 \
    --max-new-tokens 64 --tree benchmarks/default_tree.json 2>&1 | grep -v "it/s"
echo "=== lossless, eager, at $((SECONDS - start)) s"
lossless $(($(left) * 50 / 100)) test_cuda_eager_steps_are_lossless
echo "=== bench, eager, at $((SECONDS - start)) s"
eager=$(($(left) - 150))
CERBERUS_CUDA_GRAPHS=0 REPEATS=1 bench $((eager > 10 ? eager : 10)) bench
echo "=== calibration, quick, at $((SECONDS - start)) s"
heads=cerberus_decoding/assets/heads/SmolLM2-135M-Instruct
for t in cerberus medusa; do
    timeout 70 python3 -m cerberus_decoding.cli calibrate --heads "$heads/$t" --device cuda --quick \
        --budget-seconds 50 --into-heads 2>&1 | grep -v "it/s\|s/it" | tail -8
    cp "$heads/$t"/calibration/cuda-*.json "$out/calibration-$t.json" 2>/dev/null
done
echo "=== all done at $((SECONDS - start)) s"
