"""Head accuracy on the hidden states of the format a CPU serves (int4) against the format heads train on
(float32), on the same answers: the int4 runtime's own greedy answers to the builtin questions' first turn.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/head_accuracy_by_format.py [--max-new-tokens 128]

Each answer is teacher-forced once per format (``calibration.measure.observe``), and the shipped heads'
top-1 / top-5 per head are read from the ranks of the true tokens. docs/training.md has the result.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.bench.questions import BUILTIN, load_questions
from cerberus_decoding.calibration.measure import observe
from cerberus_decoding.engine import SamplingConfig
from cerberus_decoding.heads import load_heads
from cerberus_decoding.methods import build_decoder, default_heads_dir
from cerberus_decoding.models import load_model

FORMATS = ("int4", "float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    models = {fmt: load_model("default", fmt, "cpu") for fmt in FORMATS}
    ar = build_decoder(models["int4"], "ar", calibrate=False)
    answers = []
    for q in load_questions(BUILTIN):
        ids = ar.encode(q.turns[0])
        answers.append((ids, ar.generate(ids, SamplingConfig(max_new_tokens=args.max_new_tokens)).token_ids))
    table = Table(title="head accuracy by the format of the hidden states (same answers)")
    for col in ("heads", "states", "positions", "top-1 per head", "top-5 per head"):
        table.add_column(col)
    for head_type in ("cerberus", "medusa"):
        for fmt, lm in models.items():
            heads = load_heads(default_heads_dir(lm, head_type), lm).pack_for(lm.weights)
            ranks = np.concatenate([observe(lm, heads, p, a, top_k=5)["ranks"] for p, a in answers])  # [T, K]
            valid = ranks >= 0  # -1: the answer ends before the head's target
            top1 = ((ranks == 0) & valid).sum(0) / valid.sum(0)
            top5 = ((ranks < 5) & valid).sum(0) / valid.sum(0)
            table.add_row(
                head_type, fmt, str(len(ranks)), " ".join(f"{x:.3f}" for x in top1), " ".join(f"{x:.3f}" for x in top5)
            )
    Console().print(table)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
