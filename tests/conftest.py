"""Shared fixtures: the default model (session-wide), a tiny random Llama, and the lossless check."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from cerberus_decoding.bench.run import bitwise_exact, tie_bound, top2_logits
from cerberus_decoding.models import LoadedModel, load_model

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
# No first-use calibration in the suite (a minute each time heads meet a new machine): tests that
# exercise it turn it back on. A calibration shipped for this machine is still used where it exists.
os.environ["CERBERUS_NO_CALIBRATE"] = "1"

# Varied real prompts: chat, code, math, lists, extraction, a summary that repeats its input.
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a refrigerator works in simple terms.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is 17 multiplied by 23? Show your steps.",
    "List five tips for staying focused while studying.",
    "Extract the names and ages: 'Anna is 31, her brother Tom is 27 and their aunt Lisa is 58.'",
    "Summarize: The town council met on Monday to discuss the new park. Residents asked for more trees, "
    "a playground and benches. The council agreed to publish a plan by June.",
    "Translate into French: 'The library opens at nine in the morning.'",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Describe the plot of a heist movie in three sentences.",
    "Fix the bug: def is_even(n): return n % 2 == 1",
]


@pytest.fixture(scope="session")
def lm() -> LoadedModel:
    """The default model as users get it: lean runtime, the CPU's default format (w4a8 where its
    kernel is built, else int4: runtime.resolve_weights; every shipped calibration picks it too)."""
    return load_model("default", "auto", "cpu")


@pytest.fixture(scope="session")
def lm_int4(lm) -> LoadedModel:
    """The default model in int4, packed once for the suite (``lm`` itself where int4 is the default)."""
    return lm.with_weights("int4")


def references_for(lm: LoadedModel, prompts: list[str], max_new_tokens: int) -> dict[str, tuple[list[int], list[int]]]:
    """prompt -> (its ids, greedy AR's new tokens) in ``lm``'s format."""
    from cerberus_decoding.engine import Decoder, SamplingConfig

    ar, config = Decoder(lm), SamplingConfig(max_new_tokens=max_new_tokens)
    return {p: (ids := ar.encode(p), ar.generate(ids, config).token_ids) for p in prompts}


@pytest.fixture(scope="session")
def references(lm) -> dict[str, tuple[list[int], list[int]]]:
    """Greedy AR in ``lm``'s format on 8 real prompts x 128 tokens: what the lossless tests compare against."""
    return references_for(lm, PROMPTS[:8], 128)


@pytest.fixture(scope="session")
def lm_f32() -> LoadedModel:
    return load_model("default", "float32", "cpu")


@pytest.fixture(scope="session")
def lm_hf(lm_f32) -> LoadedModel:
    """The unmodified transformers model in float32 (the reference), sharing lm_f32's weights."""
    from cerberus_decoding.runtime.hf import HFRuntime

    return dataclasses.replace(lm_f32, runtime=HFRuntime(lm_f32.model, "float32"))


def tiny_model(tokenizer, arch: str = "llama"):
    """A randomly initialised 2-layer ``arch`` model (llama, or qwen2: q/k/v projections with biases)
    for ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[arch]
    torch.manual_seed(0)
    cfg = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=1,
        pad_token_id=2,
    )
    return model_class(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_lm(lm) -> LoadedModel:
    """A randomly initialised 2-layer Llama with the default tokenizer (fast unit tests)."""
    return LoadedModel(tiny_model(lm.tokenizer), lm.tokenizer, "tiny-llama", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_lean(tiny_lm) -> LoadedModel:
    """tiny_lm on the lean runtime in float32 (the CPU distillation path)."""
    from cerberus_decoding.runtime import build_runtime

    return dataclasses.replace(tiny_lm, runtime=build_runtime(tiny_lm.model, "float32", "lean"))


def assert_lossless(
    lm: LoadedModel,
    prompt_ids: list[int],
    reference: list[int],
    got: list[int],
    exact: bool | None = None,
    tie_steps: float = 1.0,
) -> None:
    """``got`` must equal the greedy AR ``reference`` of the same format: bitwise where ``exact`` (by
    default: the row-invariant formats on a CPU); elsewhere a divergence passes only at a proven
    near-tie (``tie_steps`` times the bench's bound)."""
    if got == reference:
        return
    exact = bitwise_exact(lm) if exact is None else exact
    assert not exact, f"{lm.weights}: output differs from AR (no tie allowance)"
    i = next((k for k, (a, b) in enumerate(zip(reference, got, strict=False)) if a != b), min(len(reference), len(got)))
    assert i < min(len(reference), len(got)), f"lengths differ without a token difference at {i}"
    top, second = top2_logits(lm, prompt_ids, reference[:i])
    gap, bound = top - second, tie_steps * tie_bound(lm, top)
    assert gap <= bound, (
        f"outputs differ at token {i} where the top-2 logit gap is {gap:.4g} (top logit {top:.4g}; not a tie)"
    )
