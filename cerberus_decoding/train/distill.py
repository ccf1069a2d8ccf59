"""Self-distillation: the base model's own greedy answers, with the hidden states that produced them.

Output directory:
  settings.json          what was run (model, generator, prompts, batch size, ...)
  prompts.jsonl          source and category of every distilled prompt, in order (per-source reports)
  shard-00000.safetensors, ...   one per batch of prompts, written atomically; metadata ``generator``:
      tokens  [T] int32   generated tokens of every answer, concatenated (the heads' targets)
      lengths [R] int32   tokens per answer
      hidden  [T, H] bf16 (optional) last hidden state that predicted each token
      answers [T] int32   (when targets were recomputed) the answers the hidden states were computed
                          along; metadata ``answers_generator`` says what made them
  answers.safetensors    when every shard is done: all answers and lengths, no hidden states (a few MB:
                         commit it, and ``--answers`` rebuilds the shards without generating)
A killed run loses at most the batch in flight; running the same command again continues.
``max_tokens`` / ``deadline`` stop a run early after whole batches; ``answers.safetensors`` then holds
the answers of the batches done so far, in prompt order.

Generation goes through the runtime API. The lean runtime decodes ``rows_per_step`` sequences at
once with continuous batching (``generate_rows``): each answer is bitwise the one ``cerberus
generate`` gives in that weight format. On a GPU (and on the hf runtime) a batch is one
left-padded batch over a shared cache, ``runtime.generate_padded``: thousands of rows a forward.

Hidden states are float32 and so are their targets (the base model's float32 greedy choices): a run in
another format generates its answers, then ``teacher_forced`` recomputes tokens and hidden states with
a float32 forward over prompt + answer. The same pass rebuilds shards from a recorded answers file.
``answers.safetensors`` keeps the answers themselves, not the recomputed targets, so rebuilding from it
is a fixed point (targets recomputed along recomputed targets would follow another path). Without
hidden states (``keep_hidden=False``) the answers stay the generating format's own.
Prompts longer than ``MAX_PROMPT_TOKENS`` are skipped (counted in settings).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..heads import _atomic_write, remove_stale_temp_files
from ..models import CerberusError, LoadedModel
from ..sampling import greedy
from .prompts import Prompt

MAX_PROMPT_TOKENS = 1024
FLOAT32_TARGETS = ", float32 targets"  # how a shard's generator says its targets were recomputed


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.inference_mode()
def generate_rows(
    runtime, prompts: list[list[int]], max_new_tokens: int, eos: int, rows: int, keep_hidden: bool, device
):
    """Greedy answers, ``rows`` sequences decoded together; a finished row takes the next prompt
    (continuous batching) -> list of (tokens [n], hidden [n, H] bf16 or None), in prompt order.
    Each sequence has its own cache and ``runtime.forward_rows`` computes every row exactly as the
    one-token step, so each answer is bitwise the one ``cerberus generate`` gives in that format."""
    out: list = [None] * len(prompts)
    waiting = iter(range(len(prompts)))
    capacity = max(map(len, prompts)) + max_new_tokens

    def start(cache) -> dict | None:
        """Prefill the next prompt into ``cache`` -> its row, or None when no prompt is left."""
        i = next(waiting, None)
        if i is None:
            return None
        cache.truncate(0)
        ids = torch.tensor(prompts[i], device=device)
        hidden = runtime.forward(cache, ids, torch.arange(len(ids), device=device))[-1:]  # [1, H]
        return {"index": i, "cache": cache, "tokens": [], "hidden": [], "last": hidden}

    live = [row for _ in range(min(rows, len(prompts))) if (row := start(runtime.new_cache(capacity, device)))]
    bar = tqdm(total=len(prompts), desc="answers", unit="answer", leave=False, disable=len(prompts) < 64)
    while live:
        hidden = torch.cat([row["last"] for row in live])  # [B, H]
        chosen = greedy(runtime.lm_head(hidden))  # [B]
        going, fed, joined = [], [], []
        for row, token, h in zip(live, chosen.tolist(), hidden, strict=True):
            row["tokens"].append(token)
            if keep_hidden:
                row["hidden"].append(h.to(torch.bfloat16))
            if token != eos and len(row["tokens"]) < max_new_tokens:
                going.append(row)
                fed.append(token)
                continue
            hiddens = torch.stack(row["hidden"]).cpu() if keep_hidden else None
            out[row["index"]] = (torch.tensor(row["tokens"]), hiddens)
            bar.update()
            if (new := start(row["cache"])) is not None:
                joined.append(new)  # its first token is chosen at the next step
        if going:
            caches = [row["cache"] for row in going]
            positions = torch.tensor([c.length for c in caches], device=device)
            hidden = runtime.forward_rows(caches, torch.tensor(fed, device=device), positions)  # [b, H]
            for row, h in zip(going, hidden.split(1), strict=True):
                row["last"] = h
        live = going + joined
    bar.close()
    return out


@torch.inference_mode()
def teacher_forced(runtime, prompts: list[list[int]], answers: list[list[int]], tokens_per_forward: int, device):
    """Prompts and their answers -> list of (tokens [n], hidden [n, H] bf16): at each answer position,
    the model's own greedy choice and the hidden state that made it. Sequences go right-padded in
    groups of similar length (at most ``tokens_per_forward`` padded tokens a forward): under causal
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
        ids = torch.zeros((len(group), len(seqs[group[-1]])), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        hidden = runtime.forward_padded(ids.to(device))  # [b, T, H]
        for row, i in enumerate(group):
            h = hidden[row, len(prompts[i]) - 1 : len(seqs[i])]  # [n, H]: the states that chose answer i
            out[i] = (greedy(runtime.lm_head(h)).cpu(), h.to(torch.bfloat16).cpu())
        start = end
    return out


def float32_runtime(lm: LoadedModel):
    """The runtime that recomputes targets: ``lm``'s own in float32, or a float32 one of the same kind."""
    from ..runtime import build_runtime

    if lm.weights == "float32":
        return lm.runtime
    in_float32 = next(lm.model.parameters()).dtype == torch.float32  # lean formats keep a float32 copy
    model = lm.model if in_float32 else copy.deepcopy(lm.model).float()
    return build_runtime(model, "float32", lm.runtime.name)


def read_answers(path: str | Path, source: str) -> tuple[list[list[int]], list[str]]:
    """The answers recorded by an earlier distill run over the same prompts -> (answers, what
    generated each one)."""
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
    per_shard = int(meta.get("batch_size") or 1)
    made_by = [f"{meta.get('dtype', 'unrecorded')}, runtime unrecorded"] * len(rows)  # files before generators
    for first, last, generator in json.loads(meta.get("generators", "[]")):
        made_by[first * per_shard : (last + 1) * per_shard] = [generator] * ((last + 1 - first) * per_shard)
    return rows, made_by[: len(rows)]


def write_answers(out: Path, settings: dict, shards: int) -> int:
    """Collect the answers of shards 0..shards-1 into one compact file (no hidden states) -> answers.
    Its metadata says what generated which shards (``generators``: [[first, last, generator], ...])."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "lengths": []}
    generators: list[list] = []
    for b in range(shards):
        path = out / f"shard-{b:05d}.safetensors"
        try:
            with safe_open(str(path), "pt") as f:  # reads only the answers and lengths, not the hidden states
                recomputed = "answers" in f.keys()  # targets recomputed: keep the answers they were computed along
                parts["tokens"].append(f.get_tensor("answers" if recomputed else "tokens"))
                parts["lengths"].append(f.get_tensor("lengths"))
                meta = f.metadata() or {}
                generator = meta.get("answers_generator" if recomputed else "generator", "unrecorded")
        except Exception as e:
            raise CerberusError(
                f"Distilled shard {path} is corrupt ({e}); delete it and run the same distill command again."
            ) from None
        if generators and generators[-1][2] == generator:
            generators[-1][1] = b
        else:
            generators.append([b, b, generator])
    tensors = {k: torch.cat(v).to(torch.int32).contiguous() for k, v in parts.items()}
    meta = {k: str(settings[k]) for k in ("model", "source", "batch_size", "max_new_tokens")}
    meta["generators"] = json.dumps(generators)
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
    answers: tuple[list[list[int]], list[str]] | None = None,
    max_tokens: int = 0,
    deadline: float = 0.0,
    rows_per_step: int = 8,
) -> dict:
    """Distil ``prompts`` into ``out_dir``, one shard per batch. ``worker``/``workers``: this process does
    batches worker, worker + workers, ...; several processes can share one directory. ``answers``
    (from ``read_answers``): take these answers instead of generating; only the hidden states are computed
    (none with ``keep_hidden=False``: the shards are written straight from the file). ``rows_per_step``:
    sequences the lean runtime decodes together (``generate_rows``). ``max_tokens`` (> 0): start no
    batch once the shards hold that many tokens; ``deadline`` (> 0): nor after that many seconds.
    Both stop after whole batches, so the same command resumes."""
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
        "generator": f"{lm.weights} {lm.runtime.name} {lm.device.type}",
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
        changed = {k for k in ("model", "batch_size", "max_new_tokens", "source") if old.get(k) != settings[k]}
        if changed:
            raise CerberusError(
                f"{out} was distilled with other settings ({', '.join(sorted(changed))}); "
                "use a new --out directory or the same settings to resume."
            )
    if answers is not None:
        answers, recorded_by = answers
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
    runtime, device = lm.runtime, lm.device
    # targets are float32 greedy choices: another format's answers are recomputed in float32
    targets = float32_runtime(lm) if keep_hidden and (answers is not None or lm.weights != "float32") else None
    own_hidden = keep_hidden and targets is None  # the generating forward's hidden states are the targets'
    tokens_per_forward = 8192 if device.type == "cpu" else 262144
    desc = f"distilling {worker}/{workers}"
    bar = tqdm(todo, desc=desc, unit="batch", initial=len(mine) - len(todo), total=len(mine))
    for b in bar:
        if (max_tokens and done_tokens + total_tokens >= max_tokens) or (
            deadline and time.perf_counter() - t0 > deadline
        ):
            bar.write(f"stopping after {done_tokens + total_tokens} tokens (--max-tokens / --deadline)")
            break
        batch = encoded[b * batch_size : (b + 1) * batch_size]
        made_by = settings["generator"]
        if answers is not None:
            made_by = recorded_by[b * batch_size]
            rows = [(torch.tensor(a), None) for a in answers[b * batch_size : (b + 1) * batch_size]]
        elif device.type == "cuda" or runtime.name == "hf":  # one padded batch: thousands of rows on a GPU
            rows = runtime.generate_padded(batch, max_new_tokens, eos, pad, own_hidden)
        else:
            rows = generate_rows(runtime, batch, max_new_tokens, eos, rows_per_step, own_hidden, device)
        meta, answered = {"generator": made_by}, {}
        if targets is not None:  # keep the answers the hidden states are computed along, beside their targets
            answered["answers"] = torch.cat([r[0] for r in rows]).to(torch.int32)
            rows = teacher_forced(targets, batch, [r[0].tolist() for r in rows], tokens_per_forward, device)
            # "float32 targets" said once, however often they were recomputed
            meta = {"generator": made_by.removesuffix(FLOAT32_TARGETS) + FLOAT32_TARGETS, "answers_generator": made_by}
        tensors = {
            "tokens": torch.cat([r[0] for r in rows]).to(torch.int32),
            "lengths": torch.tensor([len(r[0]) for r in rows], dtype=torch.int32),
            "prompt_tokens": torch.tensor([t for ids in batch for t in ids], dtype=torch.int32),  # for lookup
            "prompt_lengths": torch.tensor([len(ids) for ids in batch], dtype=torch.int32),
            **answered,
        }
        if keep_hidden:
            tensors["hidden"] = torch.cat([r[1] for r in rows]).contiguous()
        _atomic_write(shard[b], lambda p, t=tensors, m=meta: save_file(t, p, metadata=m))
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
