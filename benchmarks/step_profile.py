"""Where a decoding step's time goes, per method: base forward, LM head, heads, verification,
cache compaction, detokenising and the rest (Python bookkeeping); ``--ops`` adds torch's profiler
table of the kernels inside (attention, int4 matmuls, element-wise ops).

    .venv/bin/python benchmarks/step_profile.py --methods ar,medusa,cerberus --max-new-tokens 96 --weights int4
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from cerberus_decoding import verify
from cerberus_decoding.engine import Decoder, SamplingConfig
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.models import load_model
from cerberus_decoding.runtime import hardware
from cerberus_decoding.runtime.hf import KVCache as HFCache
from cerberus_decoding.runtime.lean import KVCache as LeanCache

PROMPTS = [
    "Explain how vaccines work.",
    "Write a Python function that merges two sorted lists.",
    "Give me five tips for a job interview.",
]


def timed(totals: dict, name: str, fn, inside: list[float]):
    """``fn`` adding its own time to ``totals[name]``: the time of timed calls it makes (verification
    calls the LM head) counts for them, not for it. ``inside``: the open calls' nested time, shared."""

    def wrapper(*args, **kw):
        t0 = time.perf_counter()
        inside.append(0.0)
        try:
            return fn(*args, **kw)
        finally:
            spent, nested = time.perf_counter() - t0, inside.pop()
            totals[name] += spent - nested
            if inside:
                inside[-1] += spent

    return wrapper


def profile(decoder: Decoder, cfg: SamplingConfig) -> tuple[dict, int, int, float]:
    totals: dict = defaultdict(float)
    inside: list[float] = []
    rt = decoder.runtime
    originals = [
        (rt, "forward", rt.forward),
        (rt, "lm_head", rt.lm_head),
        (rt, "lm_head_greedy", rt.lm_head_greedy),
        (verify, "verify_greedy", verify.verify_greedy),
    ]
    originals += [(cls, "compact", cls.compact) for cls in (HFCache, LeanCache)]
    originals += [(decoder.tokenizer, "decode", decoder.tokenizer.decode)]
    names = ["base forward", "LM head", "LM head", "verification", "cache compaction", "cache compaction", "detokenise"]
    if decoder.heads is not None:
        originals.append((decoder.heads, "draft", decoder.heads.draft))
        names.append("draft heads")
    for (owner, attr, fn), name in zip(originals, names, strict=True):
        setattr(owner, attr, timed(totals, name, fn, inside))
    tokens = steps = 0
    seconds = 0.0
    try:
        for p in PROMPTS:
            r = decoder.generate(decoder.encode(p), cfg)
            tokens, steps, seconds = tokens + r.new_tokens, steps + len(r.steps), seconds + r.seconds
    finally:
        for owner, attr, fn in originals:
            if isinstance(owner, type) or owner is verify:
                setattr(owner, attr, fn)
            else:
                delattr(owner, attr)  # back to the class's method
    return totals, tokens, steps, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="ar,medusa,cerberus")
    ap.add_argument("--heads", default="default")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--runtime", default="lean")
    ap.add_argument("--tree", default=None, help="JSON tree file (default: the heads' calibrated or default tree)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--ops", action="store_true", help="Also print torch's profiler table per method.")
    args = ap.parse_args()
    lm = load_model("default", args.weights, "auto", args.runtime)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
    table = Table(title=f"ms per step, {lm.name}, {lm.weights} ({lm.runtime.name}), {hardware(lm.device)}")
    parts = ["base forward", "LM head", "draft heads", "verification", "cache compaction", "detokenise", "other"]
    for col in ["method", "tokens/s", "tokens/step", *parts]:
        table.add_column(col)
    for method in args.methods.split(","):
        decoder = build_decoder(lm, method, heads=args.heads, tree=args.tree)
        decoder.generate(decoder.encode("Hello"), SamplingConfig(max_new_tokens=8))  # warm-up
        totals, tokens, steps, seconds = profile(decoder, cfg)
        if args.ops:
            from torch.profiler import profile as torch_profile

            with torch_profile() as prof:
                decoder.generate(decoder.encode(PROMPTS[0]), cfg)
            Console().print(f"[bold]{method}[/bold]: kernels by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
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
