"""Distillation throughput per path, in one run: answer tokens per second on the same prompts.

  hf float32, padded batch B    transformers' left-padded batch (the CPU path before forward_rows;
                                the GPU path today)
  lean <format>, R rows         the runtime API: R sequences decoded together, a finished row taking
                                the next prompt (train/distill.generate_rows)

Every path answers the same prompts (a fixed slice of the shipped heads' prompt selection) greedily
up to --max-new-tokens; the prompt's own forward is part of the time. Prints a table and saves a
PNG. Answers only: no hidden states, no float32 teacher forcing.

    python benchmarks/distill_speed.py [--prompts 48] [--max-new-tokens 256] [--batch 8] [--rows 8]
                                       [--formats int4,float32] [--out benchmarks/out/distill_speed.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cerberus_decoding.models import load_model
from cerberus_decoding.runtime import hardware
from cerberus_decoding.train.distill import MAX_PROMPT_TOKENS, chat_ids, generate_rows
from cerberus_decoding.train.prompts import load_prompts

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48, help="prompts answered by every path")
    ap.add_argument("--offset", type=int, default=20000, help="where in the shipped selection they start")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="prompts per padded batch (hf path)")
    ap.add_argument("--rows", type=int, default=8, help="sequences decoded together (lean paths)")
    ap.add_argument("--formats", default="int4,float32", help="lean weight formats to run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "distill_speed.png")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    lm = load_model("default", "float32", "cpu", "hf")
    mix = (ROOT / "corpus" / "heads.mix").read_text().strip()
    chosen, _ = load_prompts(str(ROOT / "corpus" / "instructions"), 40000, mix, seed=0)
    prompts = [ids for p in chosen[args.offset :] if len(ids := chat_ids(lm.tokenizer, p.text)) <= MAX_PROMPT_TOKENS]
    prompts = prompts[: args.prompts]
    eos, device = lm.tokenizer.eos_token_id, lm.device

    def padded():
        rt, out = lm.runtime, []
        for i in range(0, len(prompts), args.batch):
            out += rt.generate_padded(prompts[i : i + args.batch], args.max_new_tokens, eos, eos, False)
        return out

    paths = {f"hf float32, padded batch {args.batch}": padded}
    for fmt in args.formats.split(","):
        rt = lm.with_weights(fmt).runtime if fmt != "float32" else load_model("default", "float32", "cpu").runtime
        paths[f"lean {fmt}, {args.rows} rows"] = lambda rt=rt: generate_rows(
            rt, prompts, args.max_new_tokens, eos, args.rows, False, device
        )
    rows = []
    for name, run in paths.items():
        start = time.perf_counter()
        answers = run()
        seconds = time.perf_counter() - start
        tokens = sum(len(t) for t, _ in answers)
        row = {"path": name, "answer_tokens": tokens, "seconds": round(seconds, 1)}
        rows.append(row | {"tokens_per_s": tokens / seconds})
        print(f"{name}: {tokens} answer tokens in {seconds:.0f} s", flush=True)
    base = rows[0]["tokens_per_s"]
    where = hardware(device)
    prompt_tokens = sum(map(len, prompts))
    print(f"\n{len(prompts)} prompts ({prompt_tokens} prompt tokens), up to {args.max_new_tokens} new; {where}")
    print(f"| path | answer tokens | seconds | answer tokens/s | vs {rows[0]['path']} |\n|---|---|---|---|---|")
    for r in rows:
        ratio = r["tokens_per_s"] / base
        print(f"| {r['path']} | {r['answer_tokens']} | {r['seconds']} | {r['tokens_per_s']:.1f} | {ratio:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"hardware": where, "prompts": len(prompts), "prompt_tokens": prompt_tokens, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.barh([r["path"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set(xlabel="answer tokens / s", title=f"distillation throughput, {where}")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
