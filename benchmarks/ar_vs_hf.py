"""Our auto-regressive loop vs transformers `generate` (greedy), same prompts, same process.

    .venv/bin/python benchmarks/ar_vs_hf.py --dtype float32 --repeats 5 --max-new-tokens 128

Prints tokens/s of each (median over repeats of the total over prompts) and the ratio ours/hf.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.engine import Decoder, SamplingConfig
from cerberus_decoding.models import load_model

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a refrigerator works in simple terms.",
    "Give me three tips for learning a new language.",
    "What is the capital of Australia, and why was it chosen?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lm = load_model(args.model, args.dtype, args.device)
    ours = Decoder(lm)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens)
    encoded = [ours.encode(p) for p in PROMPTS]

    def run_ours() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(ours.generate(ids, cfg).new_tokens for ids in encoded)
        return n, time.perf_counter() - t0

    @torch.inference_mode()
    def run_hf() -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        for ids in encoded:
            x = torch.tensor([ids], device=lm.device)
            out = lm.model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=False)
            n += out.shape[1] - x.shape[1]
        return n, time.perf_counter() - t0

    run_ours(), run_hf()  # warm-up
    rates = {"ours": [], "hf": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            n, s = fn()
            rates[name].append(n / s)
    table = Table(title=f"AR decoding, {lm.name}, {args.dtype}, {lm.device}, {args.max_new_tokens} new tokens")
    for col in ("loop", "tokens/s (median)", "all runs"):
        table.add_column(col)
    for name, r in rates.items():
        table.add_row(name, f"{statistics.median(r):.2f}", " ".join(f"{x:.1f}" for x in r))
    ratios = [a / b for a, b in zip(rates["ours"], rates["hf"], strict=True)]
    table.add_row("ratio ours/hf", f"{statistics.median(ratios):.3f}", " ".join(f"{x:.2f}" for x in ratios))
    Console().print(table)


if __name__ == "__main__":
    main()
