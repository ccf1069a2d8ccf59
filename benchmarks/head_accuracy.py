"""Head accuracy on answers the heads never saw: the builtin bench questions' own greedy answers.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/head_accuracy.py [--max-new-tokens 128] [--heads DIR ...] [--data DIR]

The base model (float32, transformers) answers the first turn of every builtin question greedily
(batched distillation into a temporary directory, never into training data); each head is then scored
on those answers exactly as `cerberus train` scores its held-out split: head k at position i must
give token i + k + 1. Prints top-1 / top-5 per head for the shipped Medusa and Cerberus heads, overall
and per question category; the tokens a chain of each position's top-1 drafts would accept; and
the draft tokens the 15-node `benchmarks/default_tree.json` would accept per step, drafted at every
position as decoding drafts it (the float32 states of these answers, not a decoding run's).
``--data DIR`` keeps the answers there and reuses them on the next run (they take minutes).
Issue 15's target: the first Cerberus head's top-1 >= 0.55.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.bench.questions import BUILTIN, load_questions
from cerberus_decoding.heads import load_heads, with_lookup
from cerberus_decoding.methods import default_heads_dir
from cerberus_decoding.models import load_model
from cerberus_decoding.train.distill import chat_ids, distill
from cerberus_decoding.train.prompts import Prompt
from cerberus_decoding.train.train import (
    answer_lookup,
    evaluate,
    head_inputs,
    head_labels,
    load_distilled,
    prompt_groups,
)
from cerberus_decoding.tree import build_tree, load_tree

DEFAULT_TREE = Path(__file__).parent / "default_tree.json"


def tree_accepts(
    heads, tree, hidden: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, lookup=None
) -> torch.Tensor:
    """[N] draft tokens ``tree`` accepts per step at every position of the answers (bonus not counted):
    the longest prefix of a leaf's path (``tree.paths``) that equals the answer's next tokens.
    ``lookup`` [N, 1 + T]: what prompt lookup found at each position (heads that read it)."""
    leaf_paths = [[n for n in path if n < tree.size] for path in tree.paths.tolist()]  # node ids by depth
    token_ids, row_ids = tokens.tolist(), rows.tolist()
    accepted = torch.zeros(hidden.shape[0])
    for i in range(hidden.shape[0]):
        found = None if lookup is None else lookup[i]
        h = hidden[i].to(heads.shared_weight.dtype)
        drafted = heads.draft(h, tokens[i : i + 1], tree, lookup=found)[0].tolist()
        best = 0
        for path in leaf_paths:
            d = 0  # matched depth: the answer position of the next node's token is i + d + 1
            while d < len(path) and i + d + 1 < len(token_ids) and row_ids[i + d + 1] == row_ids[i]:
                if drafted[path[d]] != token_ids[i + d + 1]:
                    break
                d += 1
            best = max(best, d)
        accepted[i] = best
    return accepted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heads", nargs="*", help="heads directories (default: the shipped medusa and cerberus)")
    ap.add_argument("--data", help="keep the distilled answers in this directory and reuse them")
    args = ap.parse_args()
    lm = load_model("default", "float32", "cpu", runtime="hf")
    questions = load_questions(BUILTIN)
    prompts = [Prompt(q.turns[0], "builtin-questions", q.category) for q in questions]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.data or tmp
        if not list(Path(out).glob("shard-*.safetensors")):
            distill(lm, prompts, out, batch_size=8, max_new_tokens=args.max_new_tokens, source="head-accuracy")
        hidden, tokens, rows = load_distilled(out)
        groups = prompt_groups(out, rows)
    dirs = args.heads or [str(default_heads_dir(lm, t)) for t in ("medusa", "cerberus")]
    table = Table(title=f"head accuracy on the builtin questions' greedy answers ({tokens.numel()} positions)")
    tree = build_tree(load_tree(DEFAULT_TREE))
    for col in (
        "heads",
        "group",
        "positions",
        "top-1 per head",
        "top-5 per head",
        "top-1 chain accepts",
        "tree accepts",
    ):
        table.add_column(col)
    for d in dirs:
        heads = load_heads(d, lm).eval()
        labels = head_labels(tokens, rows, heads.config.num_heads)
        inputs = head_inputs(tokens, labels, heads.config.reads_drafts)
        lookup = None
        if heads.config.reads_lookup:
            prompt_ids = [chat_ids(lm.tokenizer, p.text) for p in prompts]
            lookup = answer_lookup(prompt_ids, tokens, rows, heads.config)  # [N, 1 + T]
            inputs = with_lookup(inputs, lookup)
        scores = {"all": evaluate(heads, hidden, labels, inputs)}
        accepted = tree_accepts(heads, tree, hidden, tokens, rows, lookup)  # [N], drafted once for every group
        accepts = {"all": float(accepted.mean())}
        for name, member in sorted(groups.items()):
            if name.startswith("category:"):
                group = name.removeprefix("category:")
                scores[group] = evaluate(heads, hidden[member], labels[member], inputs[member])
                accepts[group] = float(accepted[member].mean())
        for group, s in scores.items():
            table.add_row(
                f"{heads.config.head_type}{' (reads drafts)' if heads.config.reads_drafts else ''}"
                f"{' (reads lookup)' if heads.config.reads_lookup else ''}",
                group,
                str(s["positions"]),
                " ".join(f"{x:.3f}" for x in s["top1"]),
                " ".join(f"{x:.3f}" for x in s["top5"]),
                f"{s['chain']:.3f}",
                f"{accepts[group]:.3f}",
            )
        table.add_section()
    Console().print(table)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
