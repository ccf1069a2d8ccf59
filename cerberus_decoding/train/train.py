"""Train draft heads on distilled data; the base model stays frozen and is not even run.

Each distilled position i of an answer gives the hidden state h_i that produced token g_i. Head k
learns g_{i+k+1} from h_i (the base LM head already gives g_i). Loss = sum_k w^k * CE_k.

Runs as one process or data-parallel under ``accelerate launch`` / ``torchrun`` (each process takes
its slice of every global batch; gradients are averaged, so the trajectory matches one process).
Checkpoints are atomic; ``--resume`` restores heads, optimiser, schedule and position in the data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..heads import (
    DraftHeads,
    HeadsConfig,
    _atomic_write,
    lookup_reads,
    model_fingerprint,
    remove_stale_temp_files,
    save_heads,
    with_lookup,
)
from ..lookup import lookup_matches
from ..models import CerberusError

IGNORE = -100


@dataclass
class TrainConfig:
    head_type: str = "cerberus"
    num_heads: int = 4
    num_layers: int = 1
    head_vocab: int = 8192  # 0 = full vocabulary
    own_lm_head: bool = False
    root_token: bool = False  # cerberus: start the chain from the root token's embedding
    reads_drafts: bool = False  # root_token: head k >= 2 also reads the token head k - 1 drafted
    reads_lookup: bool = False  # root_token: the chain also reads what prompt lookup found after the root
    epochs: float = 3.0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # share of steps
    loss_decay: float = 0.8  # head k weighs decay**k
    soft_targets: int = 0  # > 0: also learn the base model's top-k distribution at each target (self-distillation)
    soft_weight: float = 0.5  # share of the soft-target loss when soft_targets > 0
    holdout: float = 0.05  # share of answers held out for evaluation
    eval_every: int = 200
    save_every: int = 200
    seed: int = 0
    init_from: str = ""  # heads directory to start from (same shapes; ``reads_drafts`` may differ)
    # "lookup": with init_from, train only what reads lookup; the started-from heads stay as they are
    train_only: str = ""
    max_steps: int = 0  # stop after this many steps (0 = run all epochs); for tests and time budgets
    max_positions: int = 0  # train on the first N training positions only (0 = all): accuracy vs data size
    shards: str = ""  # "START:STOP": train on these of the data's shards (a Python slice, in name order); "": all
    precision: str = "float32"  # the heads' matmuls: float32, bfloat16 (autocast) or auto (training_precision)


PRECISIONS = ("auto", "float32", "bfloat16")


def training_precision(requested: str, device: torch.device) -> str:
    """``auto``: bfloat16 autocast on a CPU with bfloat16 dot products (AVX512-BF16 or AMX), where a
    training step is ~1.8x faster at the same held-out accuracy (docs/training.md); float32
    elsewhere: CPUs without them emulate bfloat16 (slower than float32), and on a GPU the shipped
    recipe takes about a minute in float32."""
    if requested not in PRECISIONS:
        raise CerberusError(f"Unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}.")
    if requested != "auto":
        return requested
    if device.type != "cpu":
        return "float32"
    from ..runtime import machine

    flags = machine(device)["flags"]
    return "bfloat16" if "avx512_bf16" in flags or "amx_bf16" in flags else "float32"


def load_distilled(data_dir: str | Path, shards: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> hidden [N, H] bf16, tokens [N] long, row [N] long (answer id of each position, counted over
    all the shards, so that ids stay those of ``shard_prompts`` and prompts.jsonl). ``shards``: which
    shards to load, "START:STOP" (a Python slice in name order; "" = all)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    paths = sorted(Path(data_dir).glob("shard-*.safetensors"))
    if not paths:
        raise CerberusError(f"No distilled shards (shard-*.safetensors) in {data_dir}; run `cerberus distill` first.")
    chosen = set(paths[shard_slice(shards)])
    if not chosen:
        raise CerberusError(f"--shards {shards} selects none of the {len(paths)} shards in {data_dir}.")
    hidden, tokens, rows, offset = [], [], [], 0
    for path in paths:
        if path not in chosen:  # its answers still count, for the ids of the chosen ones
            with safe_open(path, "pt") as shard:
                offset += len(shard.get_tensor("lengths"))
            continue
        try:
            shard = load_file(path)
        except Exception as e:
            raise CerberusError(f"Distilled shard {path} is corrupt ({e}); delete it and re-run distill.") from e
        if "hidden" not in shard:
            raise CerberusError(f"{path} has no hidden states; distill with hidden states kept.")
        if not torch.isfinite(shard["hidden"]).all():
            raise CerberusError(
                f"Distilled shard {path} holds non-finite hidden states (NaN or inf): it is corrupt; "
                "delete it and re-run distill."
            )
        lengths = shard["lengths"].long()
        hidden.append(shard["hidden"])
        tokens.append(shard["tokens"].long())
        rows.append(torch.repeat_interleave(torch.arange(offset, offset + len(lengths)), lengths))
        offset += len(lengths)
    return torch.cat(hidden), torch.cat(tokens), torch.cat(rows)


def shard_slice(shards: str) -> slice:
    """``--shards`` "START:STOP" (either may be empty, negatives count from the end) -> slice."""
    parts = shards.split(":") if shards else ["", ""]
    try:
        if len(parts) != 2:
            raise ValueError
        return slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        raise CerberusError(f"--shards {shards!r}: give START:STOP, e.g. ':-1' (all but the last) or '-1:'.") from None


def head_labels(tokens: torch.Tensor, rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N] tokens of concatenated answers -> [N, K] labels: head k at i gets token i+k+1 of the same answer."""
    where = target_positions(rows, num_heads)
    return torch.where(where >= 0, tokens[where.clamp_min(0)], IGNORE)


def target_positions(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N] answer id per position -> [N, K]: the position whose token head k learns at i (i + k + 1 in the
    same answer), or -1 where the answer ends before it."""
    n = rows.numel()
    out = torch.full((n, num_heads), -1, dtype=torch.long)
    for k in range(num_heads):
        shift = k + 1
        same = rows[shift:] == rows[:-shift]
        out[: n - shift, k] = torch.where(same, torch.arange(shift, n), -1)
    return out


def frequent_vocab(labels: torch.Tensor, size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The ``size`` most frequent label tokens (sorted ids) and the share of labels they miss."""
    valid = labels[labels != IGNORE]
    counts = torch.bincount(valid, minlength=vocab_size)
    ids = counts.topk(min(size, vocab_size)).indices.sort().values
    missed = 1.0 - float(counts[ids].sum()) / max(1, valid.numel())
    return ids, missed


def vocab_missed(labels: torch.Tensor, vocab_ids: torch.Tensor) -> float:
    """The share of (valid) labels outside the head vocabulary ``vocab_ids``."""
    valid = labels[labels != IGNORE]
    return 1.0 - float(torch.isin(valid, vocab_ids).float().mean())


def head_targets(heads: DraftHeads, labels: torch.Tensor, lookup: torch.Tensor | None = None) -> torch.Tensor:
    """Token labels [N, K] -> the heads' logit columns to learn (``DraftHeads.columns``; IGNORE where
    none: a token the heads cannot draft, or no label)."""
    cols = heads.columns(labels, lookup)
    return cols.masked_fill(cols < 0, IGNORE)


def head_loss(
    logits: torch.Tensor, labels: torch.Tensor, decay: float, soft=None, soft_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, K, V'], labels [B, K] -> weighted loss, per-head losses [K] (detached). No host sync:
    a head with no valid label in the batch contributes 0. ``soft`` = (ids [B, K, k], probs [B, K, k]):
    the base model's top-k distribution at each target (head vocabulary), mixed in with ``soft_weight``."""
    total, per_head = logits.new_zeros(()), []
    for k in range(logits.shape[1]):
        valid = labels[:, k] != IGNORE
        loss_sum = F.cross_entropy(logits[:, k].float(), labels[:, k], ignore_index=IGNORE, reduction="sum")
        loss_k = loss_sum / valid.sum().clamp_min(1)
        if soft is not None:
            log_q = logits[:, k].float().log_softmax(-1).gather(-1, soft[0][:, k])  # [B, k]
            soft_sum = -((soft[1][:, k] * log_q).sum(-1) * valid).sum()
            loss_k = (1 - soft_weight) * loss_k + soft_weight * soft_sum / valid.sum().clamp_min(1)
        total = total + decay**k * loss_k
        per_head.append(loss_k.detach())
    return total, torch.stack(per_head)


@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, head_weight: torch.Tensor, k: int, chunk: int = 8192):
    """The base model's next-token distribution at each position, restricted to the head vocabulary and
    cut to its top k (renormalized): hidden [N, H], head_weight [V', H] (the LM head's head-vocab rows)
    -> ids [N, k] (head-vocab indices), probs [N, k]."""
    ids, probs = [], []
    w = head_weight.float()
    for i in range(0, hidden.shape[0], chunk):
        p = (hidden[i : i + chunk].float() @ w.T).softmax(-1)  # [n, V']
        top = p.topk(k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values / top.values.sum(-1, keepdim=True))
    return torch.cat(ids), torch.cat(probs)


@torch.no_grad()
def evaluate(
    heads: DraftHeads, hidden: torch.Tensor, labels: torch.Tensor, roots: torch.Tensor, batch: int = 1024
) -> dict:
    """Per-head top-1 / top-5 on full-vocabulary labels (tokens outside the head vocabulary count as misses),
    and ``chain``: the tokens a chain of the heads' top-1 drafts would have accepted, per position.
    ``roots``: what the heads read besides the state (``head_inputs``)."""
    K = labels.shape[1]
    device = heads.shared_weight.device
    hit1, hit5, count = (torch.zeros(K, device=device) for _ in range(3))
    chain = torch.zeros((), device=device)
    dtype = heads.shared_weight.dtype
    for i in range(0, hidden.shape[0], batch):
        h = hidden[i : i + batch].to(device, dtype)
        y = labels[i : i + batch].to(device)
        r = roots[i : i + batch].to(device)
        lookup = heads.split_lookup(r)[1] if heads.config.reads_lookup else None
        top5 = heads.token_ids(heads(h, r).topk(5, dim=-1).indices, lookup)  # [B, K, 5] ids
        valid = y != IGNORE
        right = (top5[..., 0] == y) & valid  # [B, K]
        hit1 += right.sum(0)
        hit5 += ((top5 == y[..., None]).any(-1) & valid).sum(0)
        count += valid.sum(0)
        chain += right.long().cumprod(1).sum()
    positions = int(count[0])
    count = count.clamp_min(1)
    return {
        "top1": (hit1 / count).tolist(),
        "top5": (hit5 / count).tolist(),
        "chain": float(chain) / max(1, positions),
        "positions": positions,
    }


def head_inputs(roots: torch.Tensor, labels: torch.Tensor, reads_drafts: bool) -> torch.Tensor:
    """What the heads read at each position besides its state: the root token [N] (the base model's
    choice there), or for ``reads_drafts`` heads the path [N, K]: the root, then the token before each
    later head's target, which is the previous head's label (0 past an answer's end, where that head
    has no label either). Along an accepted path the drafts are exactly these tokens."""
    if not reads_drafts:
        return roots
    return torch.cat([roots[:, None], labels[:, :-1].clamp_min(0)], 1)


def answer_lookup(
    prompts: list[list[int]], tokens: torch.Tensor, rows: torch.Tensor, config: HeadsConfig
) -> torch.Tensor:
    """[N, 1 + T]: what heads with ``config`` read of prompt lookup at every answer position
    (``lookup.lookup_matches``), given each answer's prompt ids (``prompts[row]``)."""
    answer_rows, lengths = rows.unique_consecutive(return_counts=True)
    out = []
    for row, answer in zip(answer_rows.tolist(), tokens.split(lengths.tolist()), strict=True):
        out += lookup_matches(prompts[row], answer.tolist(), config.lookup_tokens, config.lookup_max_ngram)
    return torch.tensor(out, dtype=torch.long).reshape(-1, 1 + config.lookup_tokens)


def shard_prompts(data_dir: str | Path) -> list[list[int]]:
    """Each distilled answer's prompt ids (chat template included), as its shard keeps them."""
    from safetensors import safe_open

    prompts = []
    for path in sorted(Path(data_dir).glob("shard-*.safetensors")):
        with safe_open(path, "pt") as shard:
            if "prompt_tokens" not in shard.keys():
                raise CerberusError(
                    f"{path} keeps no prompt tokens (distilled before they were kept), and heads that read "
                    "lookup need them: re-run `cerberus distill` into a new --out (--answers keeps the answers)."
                )
            ids, lengths = shard.get_tensor("prompt_tokens"), shard.get_tensor("prompt_lengths")
        prompts += [p.tolist() for p in ids.split(lengths.tolist())]
    return prompts


def prompt_groups(data_dir: str | Path, rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """{"source:NAME" | "category:NAME": [N] bool} from the distill run's prompts.jsonl (None if absent)."""
    path = Path(data_dir) / "prompts.jsonl"
    if not path.is_file():
        return None
    meta = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        groups.setdefault(f"source:{m['source']}", []).append(i)
        if m.get("category"):
            groups.setdefault(f"category:{m['category']}", []).append(i)
    n_rows = max(len(meta), int(rows.max()) + 1)
    out = {}
    for name, ids in groups.items():
        member = torch.zeros(n_rows, dtype=torch.bool)
        member[ids] = True
        out[name] = member[rows]
    return out


def _split(rows: torch.Tensor, holdout: float, seed: int) -> torch.Tensor:
    """Boolean [N]: True for positions of held-out answers (chosen by answer, seeded)."""
    n_rows = int(rows.max()) + 1
    g = torch.Generator().manual_seed(seed)
    held = torch.randperm(n_rows, generator=g)[: max(1, int(n_rows * holdout))]
    is_held = torch.zeros(n_rows, dtype=torch.bool)
    is_held[held] = True
    return is_held[rows]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


SHAPE_KEYS = (
    "head_type",
    "num_heads",
    "num_layers",
    "head_vocab",
    "own_lm_head",
    "root_token",
    "reads_drafts",
    "reads_lookup",
)


def load_trainer_state(path: Path, cfg: TrainConfig, train_positions: int) -> dict:
    """The checkpoint ``--resume`` continues from, if it was started with the same head shapes on the
    same ``train_positions`` (other data would silently change its data order). Loaded with
    ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CerberusError(
            f"Cannot load the trainer state {path} ({type(e).__name__}): it is corrupt, truncated or not written "
            "by `cerberus train`. Delete it to start over, or use a new --out."
        ) from None
    if not isinstance(state, dict) or not {"heads", "optimizer", "step", "history", "config"} <= set(state):
        raise CerberusError(f"{path} is not a `cerberus train` state. Delete it to start over, or use a new --out.")
    old = state["config"] if isinstance(state["config"], dict) else {}
    changed = [k for k in SHAPE_KEYS if old.get(k) != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"{k}={old.get(k)!r}" for k in changed)
        raise CerberusError(
            f"The run in {path.parent} was started with {was}; resume it with the same options or use a new --out."
        )
    if state.get("train_positions", train_positions) != train_positions:
        raise CerberusError(
            f"The run in {path.parent} was started on {state['train_positions']} training positions and the "
            f"data now gives {train_positions}: the data changed. Train into a new --out (or delete "
            f"{path.parent}) to use it."
        )
    return state


def start_from(heads: DraftHeads, path: str | Path, lm) -> dict:
    """Copy trained heads' weights and head vocabulary into ``heads`` (``--init-from``): they must
    have been trained for this base model with the same shapes; ``reads_drafts`` and ``reads_lookup``
    may differ (heads with them have the same weights and more, which start at zero or learn from
    there). -> their training record."""
    from ..heads import load_heads

    start = load_heads(path, lm)
    ours, theirs = asdict(heads.config), asdict(start.config)
    keys = ("head_type", "num_heads", "num_layers", "own_lm_head", "root_token")
    changed = [f"{k}={theirs[k]!r}" for k in keys if ours[k] != theirs[k]]
    if changed:
        raise CerberusError(
            f"--init-from {path}: those heads have {', '.join(changed)}; "
            "train with the same options to start from them."
        )
    heads.set_vocab(start.vocab_ids.cpu(), lm.model.get_output_embeddings().weight.detach().float().cpu())
    weights = {k: v.float() if v.is_floating_point() else v for k, v in start.state_dict().items()}
    if start.config.reads_lookup and heads.config.reads_lookup:
        carry_lookup(weights, start.config, heads.config)
    missing, unexpected = heads.load_state_dict(weights, strict=False)  # reading lookup: its weights start at zero
    if unexpected:
        raise CerberusError(f"--init-from {path}: those heads read lookup; train with --reads-lookup to keep it.")
    if any(not k.startswith("lookup_") for k in missing):
        raise CerberusError(f"--init-from {path}: those heads lack {missing}; train with the same options.")
    return start.config.training


def carry_lookup(weights: dict, theirs: HeadsConfig, ours: HeadsConfig) -> None:
    """Lookup weights of heads that read fewer of lookup's tokens or shorter n-grams (heads trained
    before 2026-11-29 read 1 token, n up to 3), in place, in ``ours``' shapes: the longer matches
    start with their longest length's weights (it meant "at least that long"), the deeper heads'
    copy bonus at zero."""
    T0, N0, T, N = theirs.lookup_tokens, theirs.lookup_max_ngram + 1, ours.lookup_tokens, ours.lookup_max_ngram + 1
    if (T0, N0) == (T, N):
        return
    if T0 > T or N0 > N:
        raise CerberusError("--init-from: those heads read more of lookup than these would; train with their shapes.")
    longer = [*range(N0), *[N0 - 1] * (N - N0)]  # each new length's row: the old one it starts from
    for key in ("lookup_bonus.weight", "lookup_bonus.bias"):
        old = weights[key].view(T0, N0, -1)[:, longer]  # [T0, N, H or 1]
        new = old.new_zeros(T, N, old.shape[-1])
        new[:T0] = old
        weights[key] = new.reshape(T * N, *weights[key].shape[1:])
    weights["lookup_ngram.weight"] = weights["lookup_ngram.weight"][longer]


def check_finite_loss(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise CerberusError(
            f"The training loss is {float(loss.detach())} at step {step + 1}: training diverged or the data is "
            "corrupt. Lower --lr or re-run distill; checkpoints from earlier steps are kept."
        )


def train(lm, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False, device=None) -> dict:
    """Train heads for ``lm`` on distilled data; writes checkpoints and the final heads to ``out_dir``.
    ``device``: where the heads train (default: the base model's device; the base model is never run)."""
    from accelerate import Accelerator

    device = torch.device(device) if device is not None else lm.device
    cfg = replace(cfg, precision=training_precision(cfg.precision, device))  # auto: decided here, recorded as decided
    acc = Accelerator(cpu=device.type == "cpu")
    out = Path(out_dir)
    state_file = out / "trainer_state.pt"
    if state_file.exists() and not resume:
        raise CerberusError(f"{out} already has a training run; pass --resume to continue it or use a new --out.")
    for folder in (out, out / "latest", out / "heads"):
        if folder.is_dir():
            remove_stale_temp_files(folder)  # left by a run killed mid-write
    torch.manual_seed(cfg.seed)

    hidden, tokens, rows = load_distilled(data_dir, cfg.shards)

    labels = head_labels(tokens, rows, cfg.num_heads)
    held = _split(rows, cfg.holdout, cfg.seed)  # by answer, over all the data: the same for every max_positions
    train_idx = (~held).nonzero()[:, 0]
    if cfg.max_positions:
        train_idx = train_idx[: cfg.max_positions]
    weight = lm.model.get_output_embeddings().weight.detach().float().cpu()  # [V, H]
    hc = HeadsConfig(
        head_type=cfg.head_type,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        hidden_size=weight.shape[1],
        vocab_size=weight.shape[0],
        own_lm_head=cfg.own_lm_head,
        root_token=cfg.root_token,
        reads_drafts=cfg.reads_drafts,
        reads_lookup=cfg.reads_lookup,
        **lookup_reads(cfg.reads_lookup, cfg.num_heads),
        base_model=model_fingerprint(lm.model, lm.name),
    )
    inputs = head_inputs(tokens, labels, cfg.reads_drafts)  # [N] or [N, K]
    if cfg.reads_lookup:
        lookup = answer_lookup(shard_prompts(data_dir), tokens, rows, hc)  # [N, 1 + K]
        inputs = with_lookup(inputs, lookup)  # [N, 1 or K + 1 + K]
    train_h, train_y, train_r = hidden[train_idx], labels[train_idx], inputs[train_idx]
    resumed = load_trainer_state(state_file, cfg, len(train_idx)) if resume and state_file.exists() else None
    eval_h, eval_y, eval_r = hidden[held], labels[held], inputs[held]
    groups = prompt_groups(data_dir, rows)

    heads = DraftHeads(hc)
    heads.attach_base(lm.model)  # LM head rows and, for root_token heads, the input embeddings
    missed, started_from = 0.0, None
    if cfg.init_from:
        started_from = start_from(heads, cfg.init_from, lm)  # their own training record, kept with ours
        missed = vocab_missed(train_y, heads.vocab_ids)
    elif cfg.head_vocab and cfg.head_vocab < weight.shape[0]:
        vocab_ids, missed = frequent_vocab(train_y, cfg.head_vocab, weight.shape[0])
        heads.set_vocab(vocab_ids, weight)
    elif cfg.own_lm_head:
        heads.init_own_lm_heads()
    found = heads.split_lookup(train_r)[1] if cfg.reads_lookup else None  # a copy lookup found: the copy column
    train_targets = head_targets(heads, train_y, found)
    soft = None
    if cfg.soft_targets:  # [N, K] positions -> the base model's top-k there, gathered per batch
        soft_ids, soft_probs = teacher_topk(hidden, weight[heads.vocab_ids], cfg.soft_targets)
        where = target_positions(rows, cfg.num_heads)[train_idx].clamp_min(0)  # no target: its label is IGNORE
        soft = (where, soft_ids, soft_probs)

    if cfg.train_only:
        if cfg.train_only != "lookup" or not (cfg.reads_lookup and cfg.init_from):
            raise CerberusError(
                f"--train-only {cfg.train_only}: the one choice is 'lookup', which needs --reads-lookup and "
                "--init-from (the heads it adds to)."
            )
        heads.requires_grad_(False)
        for p in heads.lookup_parameters():
            p.requires_grad_(True)
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = train_h.shape[0]
    steps_per_epoch = max(1, n_train // cfg.batch_size)
    total = int(steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warmup = max(1, int(total * cfg.warmup))
    step, history = 0, {"loss": [], "eval": []}
    if resumed is not None:
        try:
            heads.load_state_dict(resumed["heads"])
            opt.load_state_dict(resumed["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CerberusError(
                f"The trainer state {state_file} does not fit these heads ({e}); resume with the options the run "
                "was started with, or use a new --out."
            ) from None
        step, history = int(resumed["step"]), resumed["history"]
    heads, opt = acc.prepare(heads, opt)
    core = acc.unwrap_model(heads)
    if acc.device.type != "cpu":  # the whole data set on the accelerator: no host gather per step
        train_h, train_targets, train_r = train_h.to(acc.device), train_targets.to(acc.device), train_r.to(acc.device)
        soft = None if soft is None else tuple(t.to(acc.device) for t in soft)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup), last_epoch=step - 1)

    orders: dict[int, torch.Tensor] = {}

    def batch_indices(s: int) -> torch.Tensor:
        epoch, offset = divmod(s, steps_per_epoch)
        if epoch not in orders:  # one permutation per epoch, a function of (seed, epoch) only: resumable
            orders.clear()
            orders[epoch] = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + 1000 + epoch))
        idx = orders[epoch][offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
        return idx[acc.process_index :: acc.num_processes].to(train_h.device)  # this process's slice

    def checkpoint(final: bool = False) -> None:
        if not acc.is_main_process:
            return
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails before its first checkpoint leaves nothing
        state = {
            "heads": core.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "history": history,
            "config": asdict(cfg),
            "processes": acc.num_processes,
            "train_positions": n_train,
        }
        _atomic_write(state_file, lambda p: torch.save(state, p))
        core.config.training = {
            "config": asdict(cfg),
            "step": step,
            "train_positions": n_train,
            "head_vocab_missed": round(missed, 4),
            "eval": history["eval"][-1] if history["eval"] else None,
            **({"started_from": started_from} if started_from else {}),
        }
        save_heads(core, out / ("heads" if final else "latest"))

    pending: list[torch.Tensor] = []  # losses of steps not yet read back from the device

    def flush_losses() -> None:
        values = torch.stack(pending).tolist()
        for i, v in enumerate(values):
            check_finite_loss(torch.tensor(v), step - len(values) + i)
        history["loss"].extend(round(v, 6) for v in values)
        pending.clear()

    bar = tqdm(total=total, initial=step, desc=f"train {cfg.head_type}", disable=not acc.is_local_main_process)
    t0 = time.perf_counter()
    heads.train()
    while step < total:
        idx = batch_indices(step)
        h = train_h[idx].float().to(acc.device)
        y = train_targets[idx].to(acc.device)
        batch_soft = None
        if soft is not None:
            where = soft[0][idx]  # [B, K] positions of the targets
            batch_soft = (soft[1][where], soft[2][where])  # [B, K, k] each
        with torch.autocast(acc.device.type, torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            logits = heads(h, train_r[idx].to(acc.device))  # [B, K, V']
        loss, per_head = head_loss(logits, y, cfg.loss_decay, batch_soft, cfg.soft_weight)  # in float32
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        sched.step()
        step += 1
        pending.append(acc.reduce(loss.detach(), "mean"))  # mean over processes; read every 50 steps (no sync)
        if step % 50 == 0 or step % cfg.save_every == 0 or step == total:
            flush_losses()
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", h1=f"{float(per_head[0]):.2f}")
        bar.update(1)
        if step % cfg.eval_every == 0 or step == total:
            heads.eval()
            metrics = evaluate(core, eval_h, eval_y, eval_r)
            heads.train()
            history["eval"].append({"step": step, **metrics})
            top1 = " ".join(f"{a:.3f}" for a in metrics["top1"])
            bar.write(f"step {step}: held-out top1 {top1}, top-1 chain accepts {metrics['chain']:.3f}")
        if step % cfg.save_every == 0 or step == total:
            checkpoint(final=step == total)
    bar.close()
    summary = {
        "config": asdict(cfg),
        "steps": step,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_positions": n_train,
        "eval_positions": int(held.sum()),
        "head_vocab_missed": round(missed, 4),
        "heldout_vocab_missed": round(vocab_missed(eval_y, core.vocab_ids.cpu()), 4),
        "eval": history["eval"][-1] if history["eval"] else None,
    }
    if groups is not None:  # held-out accuracy per data source and category
        heads.eval()
        summary["by_group"] = {
            name: evaluate(core, eval_h[member[held]], eval_y[member[held]], eval_r[member[held]])
            for name, member in sorted(groups.items())
            if bool(member[held].any())
        }
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return summary
