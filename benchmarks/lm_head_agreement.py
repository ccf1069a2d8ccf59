"""How often an LM-head format changes the greedy next token against float32, teacher-forced.

The float32 model answers the builtin questions' first turns greedily; every position of prompt +
answer is then run through float32 (the reference) and through the forward of ``--forward`` (w4a8:
the CPU's served format), whose final hidden states go through each LM-head format below. A row
counts as changed when its argmax differs from float32's; "clear" leaves out the near-ties, where
float32's own top-2 gap is below 0.1.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm_head_agreement.py [--max-new-tokens 128]

docs/runtime.md has the result (w4a8's LM head: int8 per row with bfloat16 activations, or w8a8).
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.bench.questions import BUILTIN, load_questions
from cerberus_decoding.engine import SamplingConfig
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.models import load_model
from cerberus_decoding.runtime.formats import dense

HEAD_FORMATS = ("bfloat16", "int8", "w8a8")
NEAR_TIE = 0.1


def final_states(lm, ids: list[int]) -> torch.Tensor:
    """ids [T] -> the runtime's final hidden states [T, H], one prompt-style forward."""
    rt = lm.runtime
    cache = rt.new_cache(len(ids) + 8, lm.device)
    return rt.forward(cache, torch.tensor(ids, device=lm.device), torch.arange(len(ids), device=lm.device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--forward", default="w4a8", help="the weight format of the forward under the heads")
    args = ap.parse_args()
    f32 = load_model("default", "float32", "cpu")
    served = f32.with_weights(args.forward)
    weight = f32.model.get_output_embeddings().weight.detach().float()  # [V, H] the GGUF's de-quantized rows
    heads = {fmt: dense(weight, fmt) for fmt in HEAD_FORMATS}
    ar = build_decoder(f32, "ar", calibrate=False)
    changed = {fmt: [0, 0] for fmt in HEAD_FORMATS}  # all rows, clear rows
    rows = clear = 0
    with torch.inference_mode():
        for q in load_questions(BUILTIN):
            ids = ar.encode(q.turns[0])
            ids += ar.generate(ids, SamplingConfig(max_new_tokens=args.max_new_tokens)).token_ids
            ref = f32.runtime.lm_head(final_states(f32, ids)).float()  # [T, V]
            top2 = ref.topk(2, dim=-1).values
            is_clear = (top2[:, 0] - top2[:, 1]) >= NEAR_TIE  # [T]
            want = ref.argmax(-1)
            hidden = final_states(served, ids).to(torch.bfloat16)  # [T, H]
            rows, clear = rows + len(ids), clear + int(is_clear.sum())
            for fmt, head in heads.items():
                differs = head(hidden).float().argmax(-1) != want
                changed[fmt][0] += int(differs.sum())
                changed[fmt][1] += int((differs & is_clear).sum())
    table = Table(title=f"greedy next token changed against float32 ({args.forward} forward, {rows} positions)")
    for col in ("LM head", "changed", f"changed where float32's top-2 gap >= {NEAR_TIE}"):
        table.add_column(col)
    for fmt, (n_all, n_clear) in changed.items():
        table.add_row(fmt, f"{100 * n_all / rows:.2f}%", f"{100 * n_clear / max(clear, 1):.2f}%")
    Console().print(table)


if __name__ == "__main__":
    main()
