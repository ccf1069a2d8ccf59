"""Self-distillation: the base model's own greedy answers, with the hidden states that produced them.

Output directory:
  settings.json          what was run (model, dtype, prompts, batch size, ...)
  prompts.jsonl          source and category of every distilled prompt, in order (per-source reports)
  shard-00000.safetensors, ...   one per batch, written atomically:
      tokens  [T] int32   generated tokens of every answer, concatenated
      lengths [R] int32   tokens per answer
      hidden  [T, H] bf16 (optional) last hidden state that predicted each token
  answers.safetensors    when every shard is done: all answers' tokens and lengths, no hidden states
                         (a few MB: commit it, and ``--answers`` rebuilds the shards without generating)
A killed run loses at most the batch in flight; running the same command again continues.
``max_tokens`` / ``deadline`` stop a run early after whole batches; ``answers.safetensors`` then holds
the answers of the batches done so far, in prompt order.

Targets are the base model's float32 greedy choices, the dtype that verifies on CPU: a run in
another dtype generates in that dtype, then ``teacher_forced`` recomputes tokens and hidden states
with a float32 forward over prompt + answer (right-padded batches: causal attention makes the
padding invisible). The same pass rebuilds shards from a recorded answers file, several times
faster than generating. Prompts longer than ``MAX_PROMPT_TOKENS`` are skipped (counted in settings).
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..heads import _atomic_write, remove_stale_temp_files
from ..models import CerberusError, LoadedModel
from .prompts import Prompt

MAX_PROMPT_TOKENS = 1024


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.inference_mode()
def generate_batch(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int):
    """Greedy answers for a batch of prompts (left-padded) -> list of (tokens [n], hidden [n, H])."""
    from transformers import DynamicCache

    model, device = lm.model, lm.device
    # transformers renamed ``past_key_values`` to ``cache`` in 5.2x; take whichever this version has
    kw = "cache" if "cache" in inspect.signature(type(model.model).forward).parameters else "past_key_values"
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    hidden = model.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache}
    ).last_hidden_state[:, -1]  # [B, H]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, hiddens = [], []
    last_pos = positions[:, -1]
    for _ in range(max_new_tokens):
        nxt = model.lm_head(hidden).argmax(-1)  # [B]
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        hiddens.append(hidden.to(torch.bfloat16))
        done |= nxt == eos
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        last_pos = last_pos + 1
        hidden = model.model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None], use_cache=True, **{kw: cache}
        ).last_hidden_state[:, -1]
    toks = torch.stack(tokens, 1).cpu()  # [B, n]
    hids = torch.stack(hiddens, 1).cpu()  # [B, n, H]
    out = []
    for i in range(len(prompts)):
        row = toks[i]
        ends = (row == eos).nonzero()
        n = int(ends[0]) + 1 if len(ends) else row.numel()
        out.append((row[:n].clone(), hids[i, :n].clone()))
    return out


@torch.inference_mode()
def teacher_forced(model, prompts: list[list[int]], answers: list[list[int]], tokens_per_forward: int = 8192):
    """Prompts and their answers -> list of (tokens [n], hidden [n, H]): at each answer position, the
    model's own greedy choice and the hidden state that made it. Sequences go right-padded in groups
    of similar length (at most ``tokens_per_forward`` padded tokens a forward): under causal
    attention the padding after a sequence cannot change it."""
    seqs = [p + a[:-1] for p, a in zip(prompts, answers, strict=True)]  # the last answer token is never fed
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list = [None] * len(seqs)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(seqs[order[end]]) <= tokens_per_forward:
            end += 1
        group = order[start:end]
        width = len(seqs[group[-1]])
        ids = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        hidden = model.model(input_ids=ids.to(model.device)).last_hidden_state  # [b, T, H]
        for row, i in enumerate(group):
            h = hidden[row, len(prompts[i]) - 1 : len(seqs[i])]  # [n, H]: the states that chose answer i
            out[i] = (model.lm_head(h).argmax(-1).cpu(), h.to(torch.bfloat16).cpu())
        start = end
    return out


def read_answers(path: str | Path, source: str) -> list[list[int]]:
    """The answers recorded by an earlier distill run over the same prompts."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tokens, lengths = f.get_tensor("tokens").tolist(), f.get_tensor("lengths").tolist()
    except Exception as e:
        raise CerberusError(f"Answers file {path} is missing or unreadable ({e}).") from e
    if meta.get("source") != source:
        raise CerberusError(
            f"{path} holds answers to prompts {meta.get('source')!r}, not {source!r}; pass the same --prompts "
            "and --num-prompts it was made with."
        )
    rows, i = [], 0
    for n in lengths:
        rows.append(tokens[i : i + n])
        i += n
    return rows


def write_answers(out: Path, settings: dict, shards: int) -> int:
    """Collect the answers of shards 0..shards-1 into one compact file (no hidden states) -> answers."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "lengths": []}
    for b in range(shards):
        path = out / f"shard-{b:05d}.safetensors"
        try:
            with safe_open(str(path), "pt") as f:  # reads only these two tensors, not the hidden states
                for k, v in parts.items():
                    v.append(f.get_tensor(k))
        except Exception as e:
            raise CerberusError(
                f"Distilled shard {path} is corrupt ({e}); delete it and run the same distill command again."
            ) from None
    tensors = {k: torch.cat(v).to(torch.int32).contiguous() for k, v in parts.items()}
    meta = {k: str(settings[k]) for k in ("model", "dtype", "source", "batch_size", "max_new_tokens")}
    _atomic_write(out / "answers.safetensors", lambda p: save_file(tensors, p, metadata=meta))
    return len(tensors["lengths"])


def shard_lengths(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("lengths")


def read_settings(path: Path) -> dict:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CerberusError(f"{path} is corrupt ({e}); delete it (the shards stay) or use a new --out.") from None
    if not isinstance(settings, dict):
        raise CerberusError(f"{path} must hold a JSON object; delete it (the shards stay) or use a new --out.")
    return settings


def distill(
    lm: LoadedModel,
    prompts: list[Prompt] | list[str],
    out_dir: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    keep_hidden: bool = True,
    source: str = "",
    worker: int = 0,
    workers: int = 1,
    answers: list[list[int]] | None = None,
    max_tokens: int = 0,
    deadline: float = 0.0,
) -> dict:
    """Distil ``prompts`` into ``out_dir``, one shard per batch. ``worker``/``workers``: this process does
    batches worker, worker + workers, ...; several processes can share one directory. ``answers``
    (from ``read_answers``): take these answers instead of generating; only the hidden states are computed.
    ``max_tokens`` (> 0): start no batch once the shards hold that many tokens; ``deadline`` (> 0): nor
    after that many seconds. Both stop after whole batches, so the same command resumes."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    prompts = [p if isinstance(p, Prompt) else Prompt(p, "", "") for p in prompts]
    tok = lm.tokenizer
    encoded, kept = [], []
    for p in prompts:
        ids = chat_ids(tok, p.text)
        if len(ids) <= MAX_PROMPT_TOKENS:  # cutting a prompt would cut its chat template too
            encoded.append(ids)
            kept.append(p)
    settings = {
        "model": lm.name,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "prompts": len(kept),
        "skipped_long_prompts": len(prompts) - len(kept),
        "source": source,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "keep_hidden": keep_hidden,
        "hidden_size": lm.model.config.hidden_size,
    }
    settings_file = out / "settings.json"
    if settings_file.exists():
        old = read_settings(settings_file)
        changed = {k for k in ("model", "dtype", "batch_size", "max_new_tokens", "source") if old.get(k) != settings[k]}
        if changed:
            raise CerberusError(
                f"{out} was distilled with other settings ({', '.join(sorted(changed))}); "
                "use a new --out directory or the same settings to resume."
            )
    if answers is not None:
        if len(answers) > len(kept):
            raise CerberusError(f"The answers file has {len(answers)} answers for {len(kept)} prompts.")
        encoded, kept = encoded[: len(answers)], kept[: len(answers)]  # an early-stopped run answered a prefix
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # left by a run killed mid-write
    _atomic_write(settings_file, lambda p: Path(p).write_text(json.dumps(settings, indent=2)))
    lines = "".join(json.dumps({"source": p.source, "category": p.category}) + "\n" for p in kept)
    _atomic_write(out / "prompts.jsonl", lambda p: Path(p).write_text(lines, encoding="utf-8"))
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    n_batches = (len(kept) + batch_size - 1) // batch_size
    shard = [out / f"shard-{b:05d}.safetensors" for b in range(n_batches)]
    mine = range(worker, n_batches, workers)
    todo = [b for b in mine if not shard[b].exists()]
    done_tokens = sum(int(shard_lengths(shard[b]).sum()) for b in mine if shard[b].exists()) if max_tokens else 0
    total_tokens, t0 = 0, time.perf_counter()
    # generation runs transformers' model (lean formats keep a float32 copy of it); float32 targets:
    # a bfloat16 model (``--runtime hf --weights bfloat16``) recomputes them with a float32 copy
    in_float32 = next(lm.model.parameters()).dtype == torch.float32
    verifier = lm.model if in_float32 else copy.deepcopy(lm.model).float()
    tokens_per_forward = 8192 if lm.device.type == "cpu" else 262144
    desc = f"distilling {worker}/{workers}"
    bar = tqdm(todo, desc=desc, unit="batch", initial=len(mine) - len(todo), total=len(mine))
    for b in bar:
        if (max_tokens and done_tokens + total_tokens >= max_tokens) or (
            deadline and time.perf_counter() - t0 > deadline
        ):
            bar.write(f"stopping after {done_tokens + total_tokens} tokens (--max-tokens / --deadline)")
            break
        batch = encoded[b * batch_size : (b + 1) * batch_size]
        if answers is not None:
            rows = teacher_forced(verifier, batch, answers[b * batch_size : (b + 1) * batch_size], tokens_per_forward)
        else:
            rows = generate_batch(lm, batch, max_new_tokens, eos, pad)
            if verifier is not lm.model:
                rows = teacher_forced(verifier, batch, [r[0].tolist() for r in rows], tokens_per_forward)
        tensors = {
            "tokens": torch.cat([r[0] for r in rows]).to(torch.int32),
            "lengths": torch.tensor([len(r[0]) for r in rows], dtype=torch.int32),
        }
        if keep_hidden:
            tensors["hidden"] = torch.cat([r[1] for r in rows]).contiguous()
        _atomic_write(shard[b], lambda p, t=tensors: save_file(t, p))
        total_tokens += int(tensors["lengths"].sum())
        bar.set_postfix(tok_s=f"{total_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    prefix = next((b for b in range(n_batches) if not shard[b].exists()), n_batches)
    answered = write_answers(out, settings, prefix) if prefix else 0
    seconds = time.perf_counter() - t0
    return {
        "shards": n_batches,
        "shards_done": sum(s.exists() for s in shard),
        "answers": answered,
        "new_tokens": total_tokens,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1),
        "skipped_long_prompts": settings["skipped_long_prompts"],
    }
