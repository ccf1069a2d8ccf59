"""Greedy speculative output equals greedy auto-regressive output, token for token (float32).

Untrained heads (random blocks: they rarely guess right, so this exercises rejection) and the
shipped trained heads (long accepted paths, cache compaction every step). A difference passes only
at a proven near-tie (top-2 logit gap below conftest.TIE_BOUND at the first differing token).
"""

from __future__ import annotations

import math

import pytest

from cerberus_decoding.engine import Decoder, SamplingConfig
from cerberus_decoding.methods import build_decoder

from .conftest import PROMPTS, assert_lossless

pytestmark = pytest.mark.slow
N_TOKENS = 128
CONFIG = SamplingConfig(max_new_tokens=N_TOKENS)


@pytest.fixture(scope="module")
def references(lm):
    ar = Decoder(lm)
    out = {}
    for p in PROMPTS[:10]:
        ids = ar.encode(p)
        out[p] = (ids, ar.generate(ids, CONFIG).token_ids)
    return out


@pytest.mark.parametrize(
    "method,heads",
    [
        ("medusa", "none"),
        ("cerberus-nogate", "none"),
        ("medusa", "default"),
        ("cerberus", "default"),
        ("cerberus-nogate", "default"),
    ],
)
def test_speculative_greedy_equals_ar(lm, references, method, heads):
    decoder = build_decoder(lm, method, heads=heads)
    accepted = []
    for ids, reference in references.values():
        result = decoder.generate(ids, CONFIG)
        assert_lossless(lm, ids, reference, result.token_ids)
        accepted.append(result.mean_accepted)
    if heads == "default" and method != "cerberus":
        assert sum(accepted) / len(accepted) > 1.3  # trained heads really draft (not a no-op engine)


def test_gate_limits(lm, references):
    """threshold -inf = pure AR (heads never run); +inf = always speculative (= cerberus-nogate)."""
    prompts = list(references)[:3]
    never = build_decoder(lm, "cerberus", heads="none", gate="logits", threshold=-math.inf)
    always = build_decoder(lm, "cerberus", heads="none", gate="logits", threshold=math.inf)
    nogate = build_decoder(lm, "cerberus-nogate", heads="none")
    for p in prompts:
        ids, reference = references[p]
        r = never.generate(ids, CONFIG)
        assert r.token_ids == reference
        assert all(s.mode == "ar" and s.accepted == 1 for s in r.steps)
        a, b = always.generate(ids, CONFIG), nogate.generate(ids, CONFIG)
        assert a.token_ids == b.token_ids
        assert [s.accepted for s in a.steps] == [s.accepted for s in b.steps]
        assert all(s.mode == "spec" for s in a.steps)
    assert never.heads_calls == 0
    before = always.heads_calls
    steps = len(always.generate(references[prompts[0]][0], CONFIG).steps)
    assert always.heads_calls - before == steps  # one heads call per (speculative) step


def test_gate_mixes_modes_and_stays_lossless(lm, references):
    gated = build_decoder(lm, "cerberus", heads="none", gate="logits", threshold=1.0)
    modes = set()
    for p in list(references)[:3]:
        ids, reference = references[p]
        r = gated.generate(ids, CONFIG)
        assert_lossless(lm, ids, reference, r.token_ids)
        modes |= {s.mode for s in r.steps}
        calls_before = gated.heads_calls
        r2 = gated.generate(ids, CONFIG)
        assert gated.heads_calls - calls_before == r2.speculative_steps  # heads run only on SPEC steps
    assert modes == {"ar", "spec"}
