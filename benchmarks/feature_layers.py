"""Do the heads gain from the base model's middle layers? (EAGLE-3 fuses low, middle and high features.)

Cerberus heads (root token, 2 blocks, the shipped recipe) read h' = h_final + W [RMSNorm(h_l) for l in
LAYERS] instead of h_final (W zero-initialised, so the untrained fusion is the shipped input):

    # states of layers 4, 8, ..., 27 and the final one, teacher-forced in float32 through transformers
    python benchmarks/feature_layers.py extract --answers 1024 --out data/flens/train0.safetensors
    python benchmarks/feature_layers.py extract --bench --out data/flens/bench.safetensors
    for layers in "" 30 16 24 4,12,20 8,16,24; do
        python benchmarks/feature_layers.py train --data data/flens/train0.safetensors \
            --bench data/flens/bench.safetensors --layers "$layers"
    done

    for lm_head in trainable own; do   # the LM-head rows the heads score against
        python benchmarks/feature_layers.py train --data data/flens/train0.safetensors \
            --bench data/flens/bench.safetensors --lm-head $lm_head
    done

``--answers N``: the first N committed answers (``make data/instructions-40000.answers.safetensors``,
the ``corpus/heads.mix`` prompts); ``--bench``: the builtin bench questions' float32 greedy answers
(128 tokens). ``--layers 30`` fuses the final state again: a control with the same added weights
and no new information. Prints held-out and bench-question top-1 / top-5 per head (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cerberus_decoding.heads import DraftHeads, HeadsConfig
from cerberus_decoding.models import load_model
from cerberus_decoding.train.distill import MAX_PROMPT_TOKENS, chat_ids, distill, read_answers
from cerberus_decoding.train.prompts import Prompt, load_prompts
from cerberus_decoding.train.train import (
    _lr_factor,
    _split,
    evaluate,
    frequent_vocab,
    head_labels,
    head_loss,
    head_targets,
)

LAYERS = [4, 8, 12, 16, 20, 24, 27, 30]  # transformers' hidden_states index; 30 = the final normalized state


def answer_pairs(lm, args) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) to teacher-force."""
    tok = lm.tokenizer
    if args.bench:
        from cerberus_decoding.bench.questions import BUILTIN, load_questions

        prompts = [Prompt(q.turns[0], "builtin-questions", q.category) for q in load_questions(BUILTIN)]
        with tempfile.TemporaryDirectory() as d:
            distill(lm, prompts, d, batch_size=8, max_new_tokens=128, source="feature-layers", keep_hidden=False)
            answers, _ = read_answers(f"{d}/answers.safetensors", "feature-layers")
        return [(chat_ids(tok, p.text), a) for p, a in zip(prompts, answers, strict=True)]
    mix = open("corpus/heads.mix").read().strip()
    prompts, source = load_prompts("corpus/instructions", 40000, mix, 0)
    encoded = [ids for ids in (chat_ids(tok, p.text) for p in prompts) if len(ids) <= MAX_PROMPT_TOKENS]
    answers, _ = read_answers("data/instructions-40000.answers.safetensors", source)
    return list(zip(encoded, answers, strict=False))[: args.answers]


@torch.inference_mode()
def extract(args) -> None:
    lm = load_model("default", "float32", "cpu", runtime="hf")
    pairs = answer_pairs(lm, args)
    seqs = [p + a[:-1] for p, a in pairs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list = [None] * len(seqs)
    start, t0 = 0, time.perf_counter()
    while start < len(order):  # right-padded groups of similar length, as distill's teacher_forced
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(seqs[order[end]]) <= 4096:
            end += 1
        group = order[start:end]
        ids = torch.zeros((len(group), len(seqs[group[-1]])), dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
        states = lm.model.model(ids, output_hidden_states=True).hidden_states
        for r, i in enumerate(group):
            a, b = len(pairs[i][0]) - 1, len(seqs[i])
            targets = lm.model.lm_head(states[-1][r, a:b]).argmax(-1)  # the float32 greedy choices
            out[i] = (targets, torch.stack([states[layer][r, a:b] for layer in LAYERS], 1).to(torch.bfloat16))
        start = end
        print(f"{sum(o[0].numel() for o in out if o):,} positions, {time.perf_counter() - t0:.0f} s", flush=True)
    tensors = {
        "tokens": torch.cat([o[0] for o in out]).to(torch.int32),
        "lengths": torch.tensor([len(o[0]) for o in out], dtype=torch.int32),
        "hidden": torch.cat([o[1] for o in out]).contiguous(),  # [N, len(LAYERS), H]
    }
    save_file(tensors, args.out, metadata={"layers": json.dumps(LAYERS)})


class Fuse(nn.Module):
    """[B, len(LAYERS), H] -> [B, H]: the final state plus a projection of the chosen layers' states."""

    def __init__(self, layers: list[int], hidden: int):
        super().__init__()
        self.index = [LAYERS.index(layer) for layer in layers]
        self.norms = nn.ParameterList(nn.Parameter(torch.ones(hidden)) for _ in layers)
        self.proj = nn.Linear(hidden * len(layers), hidden, bias=False) if layers else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            return x[:, -1]
        feats = [F.rms_norm(x[:, i], x.shape[-1:], w, 1e-5) for i, w in zip(self.index, self.norms, strict=True)]
        return x[:, -1] + self.proj(torch.cat(feats, -1))


def load(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_file(path)
    lengths = d["lengths"].long()
    return d["hidden"], d["tokens"].long(), torch.repeat_interleave(torch.arange(len(lengths)), lengths)


@torch.no_grad()
def accuracy(heads, fuse, hidden, tokens, rows) -> dict:
    """``train.evaluate`` on the fused states: top-1 / top-5 per head."""
    scores = evaluate(heads, fuse(hidden.float()), head_labels(tokens, rows, heads.config.num_heads), tokens)
    return {k: [round(x, 4) for x in scores[k]] for k in ("top1", "top5")}


def train(args) -> None:
    torch.manual_seed(0)
    lm = load_model("default", "float32", "cpu", runtime="hf")
    hidden, tokens, rows = load(args.data)
    labels = head_labels(tokens, rows, 4)
    held = _split(rows, 0.05, 0)
    train_idx = (~held).nonzero()[:, 0]
    weight = lm.model.get_output_embeddings().weight.detach().float()
    config = HeadsConfig(num_heads=4, num_layers=2, hidden_size=weight.shape[1], vocab_size=weight.shape[0])
    config.root_token, config.own_lm_head = True, args.lm_head == "own"
    heads = DraftHeads(config)
    heads.attach_base(lm.model)
    heads.set_vocab(frequent_vocab(labels[train_idx], 8192, weight.shape[0])[0], weight)
    if args.lm_head == "trainable":  # one trainable copy of the shared rows
        rows = nn.Parameter(heads.shared_weight.clone())
        del heads.shared_weight
        heads.shared_weight = rows
    fuse = Fuse([int(x) for x in args.layers.split(",") if x], weight.shape[1])
    targets = head_targets(heads, labels[train_idx])
    opt = torch.optim.AdamW([p for m in (heads, fuse) for p in m.parameters() if p.requires_grad], lr=2e-3)
    batch, t0 = 1024, time.perf_counter()
    per_epoch = len(train_idx) // batch
    total = per_epoch * 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, max(1, total // 20)))
    for step in range(total):  # the shipped recipe: 2 epochs, batch 1,024, lr 2e-3, cosine, bfloat16 autocast
        epoch, offset = divmod(step, per_epoch)
        if offset == 0:
            order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(1000 + epoch))
        j = order[offset * batch : (offset + 1) * batch]
        idx = train_idx[j]
        with torch.autocast("cpu", torch.bfloat16):
            logits = heads(fuse(hidden[idx].float()), tokens[idx])
        loss, _ = head_loss(logits, targets[j], 0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    heads.eval()
    bench = load(args.bench)
    result = {
        "layers": args.layers or "final only",
        "lm_head": args.lm_head,
        "train_positions": len(train_idx),
        "seconds": round(time.perf_counter() - t0),
        "held_out": accuracy(heads, fuse, hidden[held], tokens[held], rows[held]),
        "bench_questions": accuracy(heads, fuse, *bench),
    }
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract")
    ex.add_argument("--answers", type=int, default=1024)
    ex.add_argument("--bench", action="store_true")
    ex.add_argument("--out", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--data", required=True)
    tr.add_argument("--bench", required=True)
    tr.add_argument("--layers", default="", help="comma-separated LAYERS to fuse (empty: the final state only)")
    tr.add_argument(
        "--lm-head",
        choices=("frozen", "trainable", "own"),
        default="frozen",
        help="the rows the heads score against: the base LM head's (frozen, shipped), one trainable copy "
        "shared by the heads, or each head its own (--own-lm-head)",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    (extract if args.command == "extract" else train)(args)


if __name__ == "__main__":
    main()
