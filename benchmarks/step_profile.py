"""Where a decoding step's time goes, per method: base forward, LM head, heads, verification,
cache compaction, detokenising and the rest (Python bookkeeping).

    .venv/bin/python benchmarks/step_profile.py --methods ar,medusa,cerberus --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from cerberus_decoding import engine
from cerberus_decoding.cache import KVCache
from cerberus_decoding.engine import Decoder, SamplingConfig
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.models import load_model

PROMPTS = [
    "Explain how vaccines work.",
    "Write a Python function that merges two sorted lists.",
    "Give me five tips for a job interview.",
]


def timed(totals: dict, name: str, fn):
    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            totals[name] += time.perf_counter() - t0

    return wrapper


def profile(decoder: Decoder, cfg: SamplingConfig) -> tuple[dict, int, int, float]:
    totals: dict = defaultdict(float)
    decoder._forward = timed(totals, "base forward", decoder._forward)
    decoder._lm_head = timed(totals, "LM head", decoder._lm_head)
    if decoder.heads is not None:
        decoder.heads.topk_tokens = timed(totals, "draft heads", decoder.heads.topk_tokens)
    patches = {"accept_greedy": engine.accept_greedy}
    engine.accept_greedy = timed(totals, "verification", engine.accept_greedy)
    compact = KVCache.compact
    KVCache.compact = timed(totals, "cache compaction", compact)
    decode = decoder.tokenizer.decode
    decoder.tokenizer.decode = timed(totals, "detokenise", decode)
    tokens = steps = 0
    seconds = 0.0
    try:
        for p in PROMPTS:
            r = decoder.generate(decoder.encode(p), cfg)
            tokens, steps, seconds = tokens + r.new_tokens, steps + len(r.steps), seconds + r.seconds
    finally:
        engine.accept_greedy = patches["accept_greedy"]
        KVCache.compact = compact
        decoder.tokenizer.decode = decode
    return totals, tokens, steps, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="ar,medusa,cerberus")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    lm = load_model("default", args.dtype, "auto")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
    table = Table(title=f"ms per step, {lm.name}, {args.dtype}")
    parts = ["base forward", "LM head", "draft heads", "verification", "cache compaction", "detokenise", "other"]
    for col in ["method", "tokens/s", "tokens/step", *parts]:
        table.add_column(col)
    for method in args.methods.split(","):
        decoder = build_decoder(lm, method, heads=args.heads)
        decoder.generate(decoder.encode("Hello"), SamplingConfig(max_new_tokens=8))  # warm-up
        totals, tokens, steps, seconds = profile(decoder, cfg)
        totals["other"] = seconds - sum(totals.values())
        table.add_row(
            method,
            f"{tokens / seconds:.1f}",
            f"{tokens / steps:.2f}",
            *(f"{1000 * totals[p] / steps:.1f}" for p in parts),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
