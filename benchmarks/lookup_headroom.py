"""How much prompt lookup knows that head 1 does not, on the builtin questions' greedy answers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lookup_headroom.py --data data/bench-answers [--heads DIR]

At every answer position (root = the model's token there, context = the prompt and the answer before
it) lookup's first token (``lookup.first_match``: the token after the latest earlier occurrence of the
longest n-gram ending in the root, as long as the heads read: up to 8 for heads written since
2026-11-29) is set beside head 1's top-1 (the shipped Cerberus heads by default). Prints, per matched
n-gram length, how often a match exists and is right, how often head 1 is right there, and the
top-1 of two fixed rules that trust lookup at n >= 2 or n >= 1, the headroom that heads reading
lookup (``--reads-lookup``, docs/training.md) learn to use. ``--data``: the answers
``benchmarks/head_accuracy.py --data`` keeps (made there on first use).
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.bench.questions import BUILTIN, load_questions
from cerberus_decoding.heads import load_heads, with_lookup
from cerberus_decoding.methods import default_heads_dir
from cerberus_decoding.models import load_model
from cerberus_decoding.train.distill import chat_ids
from cerberus_decoding.train.train import answer_lookup, head_inputs, head_labels, load_distilled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the bench answers (benchmarks/head_accuracy.py --data)")
    ap.add_argument("--heads", help="heads directory (default: the shipped Cerberus heads)")
    args = ap.parse_args()
    lm = load_model("default", "float32", "cpu", runtime="hf")
    hidden, tokens, rows = load_distilled(args.data)
    prompts = [chat_ids(lm.tokenizer, q.turns[0]) for q in load_questions(BUILTIN)]
    heads = load_heads(args.heads or default_heads_dir(lm, "cerberus"), lm).eval()
    labels = head_labels(tokens, rows, heads.config.num_heads)
    lookup = answer_lookup(prompts, tokens, rows, heads.config)  # [N, 1 + T]
    inputs = head_inputs(tokens, labels, heads.config.reads_drafts)
    if heads.config.reads_lookup:
        inputs = with_lookup(inputs, lookup)
    top1 = torch.cat(
        [
            heads(hidden[i : i + 1024].to(heads.shared_weight.dtype), inputs[i : i + 1024]).argmax(-1, keepdim=True)
            for i in range(0, len(tokens), 1024)
        ]
    )  # [N, K, 1] columns
    head1 = heads.token_ids(top1, lookup if heads.config.reads_lookup else None)[:, 0, 0]  # [N] head 1's top-1 token
    valid = labels[:, 0] >= 0
    n, found, y = lookup[valid, 0], lookup[valid, 1], labels[valid, 0]
    head_right, lookup_right = head1[valid] == y, found == y
    table = Table(title=f"lookup vs head 1 on the builtin questions' answers ({int(valid.sum())} positions)")
    for col in ("matched n-gram", "share of positions", "lookup right there", "head 1 right there", "either right"):
        table.add_column(col)
    for length in range(int(n.max()) + 1):
        at = n == length
        share = float(at.float().mean())
        right = float(lookup_right[at].float().mean()) if length else float("nan")
        table.add_row(
            str(length) if length else "none",
            f"{share:.3f}",
            f"{right:.3f}",
            f"{float(head_right[at].float().mean()):.3f}",
            f"{float((head_right | lookup_right)[at].float().mean()):.3f}",
        )
    console = Console()
    console.print(table)
    console.print(f"head 1 top-1: {float(head_right.float().mean()):.3f}")
    for least in (2, 1):
        rule = torch.where(n >= least, found, head1[valid])
        console.print(f"lookup's token where n >= {least}, else head 1: {float((rule == y).float().mean()):.3f}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
