"""Mean accepted tokens per step on held-out prompts of the *training* distribution.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/heldout_accepted.py

Takes the first 12 builtin prompts whose answers `cerberus train` held out (same seeded split), and
decodes them greedily in float32 with the shipped heads and the 15-node default tree. Set against
`cerberus bench --tree benchmarks/default_tree.json` on the benchmark questions, it separates what
the heads lack in general from what they lose on new kinds of questions (docs/training.md).
"""

from __future__ import annotations

import torch

from cerberus_decoding.engine import SamplingConfig
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.models import load_model
from cerberus_decoding.train.prompts import builtin_prompts
from cerberus_decoding.train.train import _split
from cerberus_decoding.tree import DEFAULT_TREE


def main() -> None:
    prompts = builtin_prompts(4000, 0)
    held = _split(torch.arange(len(prompts)), 0.05, 0)  # train()'s split: by answer, seed 0
    held_prompts = [p for p, h in zip(prompts, held.tolist(), strict=True) if h][:12]
    lm = load_model("default", "float32", "cpu")
    for method in ("medusa", "cerberus-nogate"):
        decoder = build_decoder(lm, method, heads="default", tree=DEFAULT_TREE)
        tokens = steps = 0
        for prompt in held_prompts:
            result = decoder.generate(decoder.encode(prompt), SamplingConfig(max_new_tokens=64))
            tokens, steps = tokens + result.new_tokens, steps + len(result.steps)
        print(f"{method}: {len(held_prompts)} held-out prompts, {tokens / steps:.3f} tokens per step")


if __name__ == "__main__":
    main()
