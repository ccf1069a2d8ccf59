"""Head accuracy on answers the heads never saw: the builtin bench questions' own greedy answers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/head_accuracy.py [--max-new-tokens 128] [--heads DIR ...]

The base model (float32, transformers) answers the first turn of every builtin question greedily
(batched distillation into a temporary directory, never into training data); each head is then scored
on those answers exactly as `cerberus train` scores its held-out split: head k at position i must
give token i + k + 1. Prints top-1 / top-5 per head for the shipped Medusa and Cerberus heads, overall
and per question category. Issue 15's target: the first Cerberus head's top-1 >= 0.55.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.bench.questions import BUILTIN, load_questions
from cerberus_decoding.heads import load_heads
from cerberus_decoding.methods import default_heads_dir
from cerberus_decoding.models import load_model
from cerberus_decoding.train.distill import distill
from cerberus_decoding.train.prompts import Prompt
from cerberus_decoding.train.train import evaluate, head_labels, load_distilled, prompt_groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heads", nargs="*", help="heads directories (default: the shipped medusa and cerberus)")
    args = ap.parse_args()
    lm = load_model("default", "float32", "cpu", runtime="hf")
    questions = load_questions(BUILTIN)
    prompts = [Prompt(q.turns[0], "builtin-questions", q.category) for q in questions]
    with tempfile.TemporaryDirectory() as out:
        distill(lm, prompts, out, batch_size=8, max_new_tokens=args.max_new_tokens, source="head-accuracy")
        hidden, tokens, rows = load_distilled(out)
        groups = prompt_groups(out, rows)
    dirs = args.heads or [str(default_heads_dir(lm, t)) for t in ("medusa", "cerberus")]
    table = Table(title=f"head accuracy on the builtin questions' greedy answers ({tokens.numel()} positions)")
    for col in ("heads", "group", "positions", "top-1 per head", "top-5 per head"):
        table.add_column(col)
    for d in dirs:
        heads = load_heads(d, lm).eval()
        labels = head_labels(tokens, rows, heads.config.num_heads)
        scores = {"all": evaluate(heads, hidden, labels, tokens)}
        for name, member in sorted(groups.items()):
            if name.startswith("category:"):
                scores[name.removeprefix("category:")] = evaluate(heads, hidden[member], labels[member], tokens[member])
        for group, s in scores.items():
            table.add_row(
                f"{heads.config.head_type}",
                group,
                str(s["positions"]),
                " ".join(f"{x:.3f}" for x in s["top1"]),
                " ".join(f"{x:.3f}" for x in s["top5"]),
            )
        table.add_section()
    Console().print(table)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
