#!/usr/bin/env bash
# The shipped heads' recipe, one script for both paths (docs/training.md):
#   GPU (`make heads-gpu`): distil by generation and train both heads, in one command of under 10 minutes;
#       every stage is time-boxed and leaves its results in OUT_DIR as it ends: distill.json,
#       answers.safetensors.xz (what distilled/ commits), heads.tar (runs/*/heads), reports.tar.
#       With ANSWERS (the committed answers) it first rebuilds their shards, then generates more.
#   CPU (`make heads`): ANSWERS=the committed answers, GENERATE=0, DEVICE=cpu, RESUME=1, no time limits:
#       the hidden states are rebuilt by teacher forcing, then the same training; hours, so every stage
#       resumes where a killed run stopped (run the same command again).
# Usage: scripts/make_heads.sh OUT_DIR, with the default model installed and this repository importable.
# Environment: DEVICE, WEIGHTS, RUNTIME, ANSWERS, GENERATE, PROMPTS, BATCH, MAX_NEW, DISTILL_SECONDS,
# DISTILL_TOKENS, TRAIN_SECONDS (0 = no limit), EPOCHS, TRAIN_BATCH, LR, TRAIN_ARGS (more `cerberus train`
# options for every run, e.g. --own-lm-head), CERBERUS_ARGS (for the Cerberus runs only, e.g. --reads-drafts),
# ADAPTER_SHARDS (the last N shards, 1 by default, are kept for the lookup adapter: the heads never train on them),
# LOOKUP_EPOCHS (the adapter's; its heads, runs/cerberus-lookup, are the shipped Cerberus heads),
# RESUME (1: continue the training runs in RUNS), CURVE, BUDGET,
# DATA, RUNS, CLI,
# STAGES (any of distill, train, curve; all three by default).
set -uo pipefail
out=${1:-out/heads-gpu}
mkdir -p "$out"
cli=${CLI:-python3 -m cerberus_decoding.cli}
device=${DEVICE:-cuda}
runtime=${RUNTIME:-lean}
data=${DATA:-data/distill-instructions}
runs=${RUNS:-runs}
stages=${STAGES:-distill train curve}
start=$SECONDS

distill() {  # distill ARGS...: the one prompt selection every shard of the run belongs to
    $cli distill --prompts corpus/instructions --mix "$(cat corpus/heads.mix)" --num-prompts "${PROMPTS:-40000}" \
        --seed 0 --device "$device" --weights "${WEIGHTS:-bfloat16}" --batch-size "${BATCH:-1024}" \
        --max-new-tokens "${MAX_NEW:-256}" --out "$data" "$@"
}

train() {  # train NAME ARGS...: the same recipe for every run
    local name=$1
    shift
    timeout "${TRAIN_SECONDS:-150}" $cli train --data "$data" --device "$device" --num-layers 2 \
        --epochs "${EPOCHS:-2}" --batch-size "${TRAIN_BATCH:-1024}" --lr "${LR:-2e-3}" --eval-every 1000 \
        --save-every 500 --out "$runs/$name" ${RESUME:+--resume} ${TRAIN_ARGS:-} "$@" | tail -1
    echo "$name done at $((SECONDS - start)) s"
}

if [[ " $stages " == *" distill "* ]]; then
    if [ -n "${ANSWERS:-}" ]; then  # recorded answers: their shards rebuilt by teacher forcing
        distill --runtime "$runtime" --answers "$ANSWERS" | tee "$out/recorded.json"
    fi
    if [ "${GENERATE:-1}" = 1 ]; then  # new answers while time and the token budget last
        grow=(--deadline "${DISTILL_SECONDS:-170}" --max-tokens "${DISTILL_TOKENS:-0}")
        distill --runtime "$runtime" "${grow[@]}" | tee "$out/distill.json" ||
            { echo "the $runtime runtime failed; generating with --runtime hf"; distill --runtime hf "${grow[@]}" | tee "$out/distill.json"; }
    fi
    [ -f "$data/answers.safetensors" ] || { echo "distill produced no answers"; exit 1; }
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.compress(open(sys.argv[1],'rb').read()))" \
        "$data/answers.safetensors" "$out/answers.safetensors.xz"
    echo "distilled in $((SECONDS - start)) s"
fi

if [[ " $stages " == *" train "* ]]; then
    adapter=${ADAPTER_SHARDS:-1}
    train medusa --heads-type medusa --shards ":-$adapter"
    train cerberus --heads-type cerberus ${CERBERUS_ARGS:-} --shards ":-$adapter"
    # then what reads prompt lookup, on top of the trained Cerberus heads (which stay as they are), on
    # answers they never saw, as on new text (docs/training.md, "Every head copies")
    [ -d "$runs/cerberus/heads" ] && EPOCHS=${LOOKUP_EPOCHS:-2} train cerberus-lookup --heads-type cerberus \
        ${CERBERUS_ARGS:-} --reads-lookup --train-only lookup --init-from "$runs/cerberus/heads" --shards "-$adapter:"
    heads=()
    for t in medusa cerberus cerberus-lookup; do  # the final heads, or the last checkpoint of a run that ran out of time
        if [ -d "$runs/$t/heads" ]; then heads+=("$runs/$t/heads"); elif [ -d "$runs/$t/latest" ]; then heads+=("$runs/$t/latest"); fi
    done
    tar -cf "$out/heads.tar" "${heads[@]}" $(ls "$runs"/*/summary.json 2>/dev/null)
fi

if [[ " $stages " == *" curve "* ]]; then
    for n in ${CURVE:-250000 500000 1000000 2000000}; do  # accuracy vs data size, while time is left
        [ $((SECONDS - start)) -lt "${BUDGET:-430}" ] || break
        train "curve-$n" --heads-type cerberus --max-positions "$n"
    done
fi
tar -cf "$out/reports.tar" $(ls "$runs"/*/summary.json 2>/dev/null) "$data/settings.json"
echo "all done in $((SECONDS - start)) s"
