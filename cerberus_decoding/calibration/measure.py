"""Pick the tree and the gate threshold for this hardware from measured costs and acceptance.

Speculation pays when the tokens a step yields outgrow what the step costs, and both sides depend
on the machine: on a GPU verifying 64 tokens costs about as much as 1, on a 2-core CPU it costs
several times more. So we measure, on the loaded model's device and dtype:

1. the verification cost curve: one forward (plus LM head and argmax) of q tokens over a ~300-token
   cache, for q = 1..64, and the per-step overheads (entropies and detokenising on every step; heads,
   tree building, path selection and cache compaction on speculative steps);
2. the heads' acceptance on calibration prompts: for each position of the model's own greedy answer,
   the rank of the true token among each head's guesses, and both entropies the gate can read.

Then the tree is ``best_tree(accuracy, N)`` for the N that maximises
``expected_length / (cost(N + 1) + overheads)`` and the gate threshold is the one that maximises
tokens per second over the calibration positions. The result goes to ``calibration.json`` under
``$CERBERUS_CACHE/calibration/`` (never into the heads directory, which may be the installed package);
``build_decoder`` uses it, or else the one shipped next to the heads, when the device type and dtype
match (see ``calibrated_config``).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import gate as gating
from .engine import Decoder, SamplingConfig
from .heads import HeadsConfig, _atomic_write, load_heads
from .models import CerberusError, LoadedModel, cache_root
from .runtime import hardware
from .tree import best_tree, build_tree, expected_length
from .verify import accept_greedy

CALIBRATION_FILE = "calibration.json"
BUILTIN_QUESTIONS = Path(__file__).parent / "data" / "builtin_questions.jsonl"
COST_QS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GATE_KINDS = ("hidden", "logits")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


# ---- 1. what a step costs -------------------------------------------------------------------------


@torch.inference_mode()
def measure_costs(
    lm: LoadedModel,
    qs=COST_QS,
    context: int = 300,
    repeats: int = 5,
    time_limit: float | None = None,
    progress: bool = False,
) -> dict[int, float]:
    """Median milliseconds of one verification of q tokens (forward + LM head + argmax) over a
    ``context``-token cache, for each q. q = 1 is a plain AR step (no mask); q > 1 carries a 4D
    tree mask like a speculative step (a chain: the mask's shape, not its pattern, sets the cost).

    Rounds go over all q in turn so that load from other processes spreads over every q instead
    of inflating a few. After two rounds, stops once ``time_limit`` seconds have passed.
    """
    from tqdm import tqdm

    rt, device = lm.runtime, lm.device
    cache = rt.new_cache(context + max(qs), device)
    g = torch.Generator().manual_seed(0)
    vocab = int(lm.model.config.vocab_size)
    prefix = torch.randint(vocab, (context,), generator=g).to(device)
    rt.forward(cache, prefix, torch.arange(context, device=device))
    inputs = {}
    for q in qs:
        ids = torch.randint(vocab, (q,), generator=g).to(device)
        mask = None if q == 1 else torch.tril(torch.ones(q, q, dtype=torch.bool, device=device))
        inputs[q] = (ids, torch.arange(context, context + q, device=device), mask)

    def once(q: int) -> float:
        cache.truncate(context)
        ids, pos, mask = inputs[q]
        _sync(device)
        t0 = time.perf_counter()
        rt.lm_head(rt.forward(cache, ids, pos, mask)).argmax(-1)
        _sync(device)
        return time.perf_counter() - t0

    for q in (min(qs), max(qs)):  # warm-up: first calls allocate
        once(q)
    start = time.perf_counter()
    samples: dict[int, list[float]] = {q: [] for q in qs}
    rounds = tqdm(range(repeats), desc="verification cost", unit="round", disable=not progress, file=sys.stderr)
    for r in rounds:
        for q in qs:
            samples[q].append(once(q))
        if time_limit is not None and r >= 1 and time.perf_counter() - start > time_limit:
            break
    return {q: _median_ms(s) for q, s in samples.items()}


@torch.inference_mode()
def measure_overheads(lm: LoadedModel, heads, top_k: int, context: int = 300, repeats: int = 5) -> dict:
    """Milliseconds a step spends outside the verification forward (medians).

    ``step``: what every step pays (both gate entropies, detokenising the answer so far).
    ``spec``: what only a speculative step pays (heads' top-k, tree tokens, path selection, compaction),
    measured on a tree with ``top_k`` ranks at depth 1 and a chain through every head.
    """
    rt, device, tokenizer = lm.runtime, lm.device, lm.tokenizer
    k = heads.config.num_heads
    tree = build_tree([[r] for r in range(top_k)] + [[0] * d for d in range(2, k + 1)]).to(device)
    cache = rt.new_cache(context + tree.size, device)
    g = torch.Generator().manual_seed(1)
    vocab = int(lm.model.config.vocab_size)
    hidden = rt.forward(
        cache, torch.randint(vocab, (context,), generator=g).to(device), torch.arange(context, device=device)
    )[-1:]  # [1, H]
    logits = rt.lm_head(hidden)[0]  # [V]
    hidden = hidden[0]
    root = logits.argmax(-1, keepdim=True)
    answer = torch.randint(vocab, (128,), generator=g).tolist()  # a mid-length answer to detokenise
    step, spec = [], []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        gating.entropy(hidden)
        gating.entropy(logits)
        tokenizer.decode(answer, skip_special_tokens=True)
        t1 = time.perf_counter()
        tokens = tree.candidates(root, heads.topk_tokens(hidden, tree.top_k, root))  # [N+1]
        _sync(device)
        t2 = time.perf_counter()
        cache.truncate(context)
        all_logits = rt.lm_head(rt.forward(cache, tokens, context + tree.depth, tree.mask))  # not timed
        _sync(device)
        t3 = time.perf_counter()
        accepted = accept_greedy(tree, tokens, all_logits)
        cache.compact(context, torch.cat([accepted.new_zeros(1), accepted]))
        _sync(device)
        t4 = time.perf_counter()
        step.append(t1 - t0)
        spec.append((t2 - t1) + (t4 - t3))
    return {"step": _median_ms(step[1:]), "spec": _median_ms(spec[1:])}  # first round: warm-up


def monotone_costs(costs: dict) -> dict:
    """The least-squares non-decreasing fit of a cost curve (pool adjacent violators).

    Verifying more tokens does not cost less, so a dip is timing noise; left in, it would make a
    bigger tree look cheaper than a smaller one.
    """
    qs = sorted(costs)
    blocks: list[list[float]] = []  # [sum, count] of pooled neighbours
    for q in qs:
        blocks.append([costs[q], 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, n = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += n
    fitted = [total / n for total, n in blocks for _ in range(int(n))]
    return dict(zip(qs, fitted, strict=True))


def cost_at(costs: dict, q: float) -> float:
    """Verification cost of q tokens, linearly interpolated between measured points (ms)."""
    qs = sorted(int(k) for k in costs)
    return float(np.interp(q, qs, [costs[k] if k in costs else costs[str(k)] for k in qs]))


# ---- 2. how often the heads are right ---------------------------------------------------------------


@torch.inference_mode()
def observe(
    lm: LoadedModel, heads, prompt_ids: list[int], answer_ids: list[int], top_k: int, chunk: int = 64
) -> dict[str, np.ndarray]:
    """Teacher-force prompt + the model's own greedy answer and read, at every answer position t
    (the state whose LM head chose token t + 1, i.e. a step's root):

    ``ranks`` [T, K]: rank of the true token t + d + 2 among head d's logits; ``top_k`` when it is
    not in the top-k (or outside the heads' vocabulary), -1 when the answer ends before it.
    ``hidden`` / ``logits`` [T]: the two entropies the gate can read at t.

    One forward over the whole sequence replaces per-step bookkeeping; in float32 its states match
    the incremental ones up to rounding.
    """
    ids = list(prompt_ids) + list(answer_ids)
    rt, device = lm.runtime, lm.device
    cache = rt.new_cache(len(ids), device)
    states = rt.forward(cache, torch.tensor(ids, device=device), torch.arange(len(ids), device=device))  # [L, H]
    start, end = len(prompt_ids) - 1, len(ids) - 1  # roots are answer tokens start + 1 .. end
    states = states[start:end]  # [T, H]
    num_heads = heads.config.num_heads
    # token id -> index in the heads' (maybe reduced) vocabulary, -1 when absent
    lookup = torch.full((int(lm.model.config.vocab_size),), -1, dtype=torch.long, device=device)
    lookup[heads.vocab_ids.to(device)] = torch.arange(heads.vocab_ids.numel(), device=device)
    seq = torch.tensor(ids + [-1] * (num_heads + 2), device=device)  # padded: -1 past the end
    ranks, h_ent, l_ent = [], [], []
    for a in range(0, states.shape[0], chunk):
        h = states[a : a + chunk]  # [c, H]
        t = torch.arange(start + a, start + a + h.shape[0], device=device)  # [c] absolute positions
        target = seq[t[:, None] + torch.arange(2, num_heads + 2, device=device)]  # [c, K] token at t + d + 2
        logits = heads(h, seq[t + 1]).float()  # [c, K, V']; the root is token t + 1
        idx = lookup[target.clamp_min(0)]  # [c, K]
        true_logit = logits.gather(-1, idx.clamp_min(0)[..., None])[..., 0]  # [c, K]
        rank = (logits > true_logit[..., None]).sum(-1)  # [c, K]
        rank = torch.where((idx < 0) | (rank >= top_k), torch.full_like(rank, top_k), rank)
        ranks.append(torch.where(target < 0, torch.full_like(rank, -1), rank).cpu())
        base = rt.lm_head(h)  # [c, V]
        h_ent += [gating.entropy(x) for x in h]
        l_ent += [gating.entropy(x) for x in base]
    return {"ranks": torch.cat(ranks).numpy(), "hidden": np.array(h_ent), "logits": np.array(l_ent)}


def accuracy_table(ranks: np.ndarray, top_k: int, prior: float = 10.0) -> list[list[float]]:
    """``accuracy[d][r]`` ~ P(head d's rank-r guess is right | heads 0..d-1 were right with their top guess).

    Counted over positions where the top path up to head d was right, shrunk towards head d's
    unconditional rate with ``prior`` pseudo-positions so that deep heads with few such positions
    stay sensible. Trees also hold off-top paths like [1, 0]; for them the same conditional rate is
    an approximation (the best guess is as likely right after a second-rank hit as after a first).
    """
    table = []
    for d in range(ranks.shape[1]):
        valid = ranks[:, d] >= 0
        marginal = np.array([(ranks[valid, d] == r).sum() for r in range(top_k)]) / max(int(valid.sum()), 1)
        cond = valid & (ranks[:, :d] == 0).all(axis=1)
        counts = np.array([(ranks[cond, d] == r).sum() for r in range(top_k)])
        table.append([float(x) for x in (counts + prior * marginal) / (int(cond.sum()) + prior)])
    return table


def accepted_lengths(ranks: np.ndarray, choices) -> np.ndarray:
    """Tokens a greedy step with this tree would yield at each position (root/bonus included): the
    deepest tree node whose path of ranks matches the true tokens' ranks, plus one."""
    nodes = {tuple(c) for c in choices}
    out = np.ones(ranks.shape[0])
    for t, row in enumerate(ranks):
        path = ()
        for r in row:
            path += (int(r),)
            if r < 0 or path not in nodes:
                break
            out[t] = len(path) + 1
    return out


# ---- 3. and 4. the choices ----------------------------------------------------------------------


def step_costs(costs: dict, overheads: dict, num_nodes: int) -> tuple[float, float]:
    """(AR step ms, speculative step ms with an N-node tree)."""
    ar = cost_at(costs, 1) + overheads["step"]
    return ar, cost_at(costs, num_nodes + 1) + overheads["step"] + overheads["spec"]


def choose_tree(accuracy, costs: dict, overheads: dict, sizes) -> tuple[list[list[int]], list[dict]]:
    """The tree (Medusa's greedy ``best_tree`` for each N) that maximises expected tokens per ms of a
    speculative step, and one row per N for the report."""
    rows = []
    for n in sizes:
        choices = best_tree(accuracy, n)
        if len(choices) < n:  # the accuracy table has fewer nodes than that
            break
        _, spec = step_costs(costs, overheads, n)
        length = expected_length(choices, accuracy)
        rows.append(
            {
                "nodes": n,
                "expected_length": length,
                "step_ms": spec,
                "tokens_per_s": 1000 * length / spec,
                "tree": choices,
            }
        )
    if not rows:
        raise CerberusError("No tree size to choose from.")
    best = max(rows, key=lambda row: row["tokens_per_s"])
    return best["tree"], [{k: v for k, v in row.items() if k != "tree"} for row in rows]


def gated_rate(values: np.ndarray, accepted: np.ndarray, spec_ms: float, ar_ms: float, threshold: float) -> float:
    """Tokens/s over the calibration positions when a step speculates iff value < threshold.

    Each position stands for a step that starts there: tokens/s = sum of tokens / sum of time
    (a ratio of sums, not a mean of per-step rates).
    """
    spec = values < threshold
    tokens = np.where(spec, accepted, 1.0).sum()
    ms = np.where(spec, spec_ms, ar_ms).sum()
    return 1000.0 * float(tokens / ms)


def choose_threshold(
    values: np.ndarray, accepted: np.ndarray, spec_ms: float, ar_ms: float, candidates
) -> tuple[float, float]:
    """(threshold, tokens/s): the candidate (plus +-inf) that maximises ``gated_rate``. Brute force,
    so it also holds when acceptance is not monotone in entropy."""
    best = None
    for th in sorted({-math.inf, math.inf, *(float(c) for c in candidates)}):
        rate = gated_rate(values, accepted, spec_ms, ar_ms, th)
        if best is None or rate > best[1] + 1e-12:  # ties keep the lower threshold (less work)
            best = (th, rate)
    return best


def entropy_bins(values: np.ndarray, accepted: np.ndarray, spec_ms: float, ar_ms: float, n_bins: int) -> list[dict]:
    """Equal-count bins of one entropy: positions, mean accepted length, and whether speculating in
    that bin alone beats an AR step (E[accepted | bin] / spec cost > 1 / AR cost)."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)))
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = i == len(edges) - 2
        inside = (values >= lo) & ((values <= hi) if last else (values < hi))
        if not inside.any():
            continue
        mean = float(accepted[inside].mean())
        rows.append(
            {
                "lo": float(lo),
                "hi": float(hi),
                "count": int(inside.sum()),
                "mean_accepted": mean,
                "pays": mean / spec_ms > 1.0 / ar_ms,
            }
        )
    return rows


# ---- the whole run ------------------------------------------------------------------------------


def load_calibration_prompts(questions: str) -> list[str]:
    """``builtin`` or a prompt file (Spec-Bench question.jsonl, ShareGPT, Alpaca): first turns."""
    from .train.prompts import read_prompts

    if questions == "builtin":
        if not BUILTIN_QUESTIONS.is_file():
            raise CerberusError(f"The builtin questions ({BUILTIN_QUESTIONS}) are missing; pass --questions FILE.")
        return read_prompts(BUILTIN_QUESTIONS)
    return read_prompts(questions)


def _until(deadline: float | None):
    """An ``on_text`` callback that cancels generation after ``deadline`` (None: never)."""
    return lambda _: deadline is None or time.perf_counter() < deadline


def calibrate(
    lm: LoadedModel,
    heads_dir: str | Path,
    prompts: list[str],
    budget_seconds: float = 300.0,
    gate: str = "logits",
    max_new_tokens: int = 128,
    top_k: int = 10,
    qs=COST_QS,
    context: int = 300,
    repeats: int = 5,
    n_bins: int = 10,
    progress: bool = False,
    write: bool = True,
) -> dict:
    """Measure, choose, and (``write``) save ``calibration.json`` for ``heads_dir`` (at ``calibration_path``);
    returns its content.

    The budget covers everything: the cost curve gets at most a third of it (at least two rounds), the
    acceptance measurement runs prompt after prompt until it is spent (at least one prompt).
    """
    from tqdm import tqdm

    if gate not in GATE_KINDS:
        raise CerberusError(f"Calibrate a gate that reads an entropy: {' or '.join(GATE_KINDS)} (got {gate!r}).")
    if not prompts:
        raise CerberusError("No calibration prompts.")
    heads_dir = Path(heads_dir)
    heads = load_heads(heads_dir, lm).pack_for(lm.weights)  # as build_decoder runs them
    start = time.perf_counter()
    deadline = start + budget_seconds
    costs = measure_costs(lm, qs, context, repeats, time_limit=budget_seconds / 3, progress=progress)
    overheads = measure_overheads(lm, heads, top_k, context)

    decoder = Decoder(lm, method="ar")
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    obs = {"ranks": [], "hidden": [], "logits": []}
    used = 0
    bar = tqdm(prompts, desc="acceptance", unit="prompt", disable=not progress, file=sys.stderr)
    for prompt in bar:
        if used and time.perf_counter() > deadline:
            break
        ids = decoder.encode(prompt)
        if len(ids) + max_new_tokens + heads.config.num_heads + 2 > lm.context_length:
            continue
        result = decoder.generate(ids, config, on_text=_until(None if used == 0 else deadline))
        if len(result.token_ids) < 2:
            continue
        for key, value in observe(lm, heads, ids, result.token_ids, top_k).items():
            obs[key].append(value)
        used += 1
        bar.set_postfix(positions=sum(len(x) for x in obs["hidden"]))
    bar.close()
    if not used:
        raise CerberusError("No calibration prompt produced an answer (prompts too long for the context?).")
    ranks = np.concatenate(obs["ranks"])
    accuracy = accuracy_table(ranks, top_k)
    fit = monotone_costs(costs)
    tree, tree_rows = choose_tree(accuracy, fit, overheads, range(1, max(fit)))
    ar_ms, spec_ms = step_costs(fit, overheads, len(tree))
    # the gate analysis uses positions where every head has a true token (none cut by the answer's end)
    full = (ranks >= 0).all(axis=1)
    if not full.any():
        raise CerberusError("The answers were too short to calibrate on; raise --max-new-tokens or --budget-seconds.")
    accepted = accepted_lengths(ranks[full], tree)
    curves, thresholds = {}, {}
    for kind in GATE_KINDS:
        values = np.concatenate(obs[kind])[full]
        bins = entropy_bins(values, accepted, spec_ms, ar_ms, n_bins)
        th, rate = choose_threshold(values, accepted, spec_ms, ar_ms, [b["lo"] for b in bins[1:]])
        thresholds[kind] = th
        curves[kind] = {"bins": bins, "threshold": th, "tokens_per_s": rate}
    data = {
        "version": 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": lm.name,
        "device": lm.device.type,
        "weights": lm.weights,
        "dtype": dtype_name(lm.dtype),
        "hardware": hardware(lm.device),
        "tree": tree,
        "gate": gate,
        "threshold": thresholds[gate],
        "thresholds": thresholds,
        "predicted": {
            "ar_tokens_per_s": 1000.0 / ar_ms,
            "spec_tokens_per_s": gated_rate(np.zeros(len(accepted)), accepted, spec_ms, ar_ms, math.inf),
            "gated_tokens_per_s": curves[gate]["tokens_per_s"],
            "expected_length": expected_length(tree, accuracy),
            "empirical_length": float(accepted.mean()) if len(accepted) else 0.0,
        },
        "measured": {
            "context": context,
            "cost_ms": {str(q): v for q, v in costs.items()},  # medians as measured
            "cost_fit_ms": {str(q): v for q, v in fit.items()},  # made non-decreasing; the choices use it
            "overhead_ms": overheads,
            "ar_step_ms": ar_ms,
            "spec_step_ms": spec_ms,
            "top_k": top_k,
            "accuracy": accuracy,
            "trees": tree_rows,
            "entropy": curves,
            "prompts": used,
            "positions": int(len(ranks)),
            "seconds": time.perf_counter() - start,
        },
    }
    if write:
        write_calibration(heads_dir, data)
    return data


# ---- 5. the file, and using it ------------------------------------------------------------------


def calibration_key(device: str, weights: str) -> str:
    """Calibrations are kept per device type and weight format (``cpu-int4``, ``cuda-bfloat16``)."""
    return f"{device}-{weights}"


def _key_of(data: dict) -> str:
    return calibration_key(data.get("device"), data.get("weights", data.get("dtype")))


def calibration_path(heads_dir: str | Path, key: str) -> Path:
    """Where `cerberus calibrate` writes for these heads: under ``$CERBERUS_CACHE``, never into the heads
    directory (which may be the installed package), keyed by the heads' weights, so retrained heads
    start uncalibrated and a copy of the same heads finds its calibration."""
    heads_dir = Path(heads_dir)
    weights = heads_dir / "model.safetensors"
    digest = hashlib.sha256()
    if weights.is_file():
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(str(heads_dir.resolve()).encode())
    return cache_root() / "calibration" / f"{heads_dir.name}-{digest.hexdigest()[:16]}" / f"calibration.{key}.json"


def calibration_file(heads_dir: str | Path, key: str) -> Path | None:
    """The calibration in use for ``key``: the user's (``calibration_path``) first, then one shipped
    with the heads (``calibration.<key>.json``, or a ``calibration.json`` made for that key)."""
    shipped = Path(heads_dir) / f"calibration.{key}.json"
    for path in (calibration_path(heads_dir, key), shipped, Path(heads_dir) / CALIBRATION_FILE):
        if path.is_file():
            return path
    return None


def write_calibration(heads_dir: str | Path, data: dict) -> Path:
    """Write the calibration atomically (a reader never sees half a file) to ``calibration_path``."""
    target = calibration_path(heads_dir, _key_of(data))
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, lambda p: Path(p).write_text(json.dumps(data, indent=2)))
    return target


def read_calibration(heads_dir: str | Path, key: str) -> dict | None:
    """The calibration for ``key``, or None (absent, unreadable, or made for another key)."""
    path = calibration_file(heads_dir, key)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        build_tree(data["tree"])
        float(data["threshold"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, CerberusError) as e:
        print(f"ignoring {path}: unreadable ({e}); run `cerberus calibrate` again", file=sys.stderr)
        return None
    return data if _key_of(data) == key else None


def calibrated_config(
    heads_dir: str | Path, lm: LoadedModel, config: HeadsConfig, gate: str | None = None
) -> HeadsConfig:
    """The heads' config with the calibrated tree, gate and threshold when ``heads_dir`` holds a
    calibration for the loaded model's device type and weight format; otherwise ``config`` unchanged.

    ``gate``: the gate the caller asked for (None: the calibrated one); its own calibrated threshold
    is used, since the two entropies live on different scales. Prints one notice line to stderr.
    """
    key = calibration_key(lm.device.type, lm.weights)
    data = read_calibration(heads_dir, key)
    if data is None:
        print(
            f"no calibration for {key} with heads {heads_dir}: using their defaults (run `cerberus calibrate`)",
            file=sys.stderr,
        )
        return config
    path = calibration_file(heads_dir, key)
    kind = gate if gate in GATE_KINDS else data.get("gate", config.gate)
    thresholds = data.get("thresholds") or {data.get("gate"): data["threshold"]}
    threshold = float(thresholds.get(kind, config.gate_threshold))
    print(
        f"using calibration from {path} (tree of {len(data['tree'])} nodes, threshold {threshold:.4g})", file=sys.stderr
    )
    return replace(
        config, tree=[list(c) for c in data["tree"]], gate=data.get("gate", config.gate), gate_threshold=threshold
    )


def format_summary(data: dict) -> str:
    """A few lines for the terminal: cost curve, chosen tree and threshold, predicted speeds."""
    m, p = data["measured"], data["predicted"]
    base = m["cost_ms"]["1"]
    lines = [
        f"verification cost on {data['device']}/{data.get('weights', data['dtype'])} ({data['hardware']}), "
        f"{m['context']}-token cache:",
        "  q      " + " ".join(f"{q:>6}" for q in m["cost_ms"]),
        "  ms     " + " ".join(f"{v:6.1f}" for v in m["cost_ms"].values()),
        "  x q=1  " + " ".join(f"{v / base:6.2f}" for v in m["cost_ms"].values()),
        f"overhead per step {m['overhead_ms']['step']:.1f} ms, per speculative step +{m['overhead_ms']['spec']:.1f} ms",
        f"acceptance measured on {m['positions']} positions from {m['prompts']} prompts",
        f"tree: {len(data['tree'])} nodes, expected {p['expected_length']:.2f} tokens/step "
        f"(observed {p['empirical_length']:.2f})",
    ]
    for kind in GATE_KINDS:
        curve = m["entropy"][kind]
        mark = " (chosen)" if kind == data["gate"] else ""
        lines.append(f"gate {kind}{mark}: threshold {curve['threshold']:.4g} -> {curve['tokens_per_s']:.2f} tokens/s")
    lines.append(
        f"predicted tokens/s: AR {p['ar_tokens_per_s']:.2f}, always speculate "
        f"{p['spec_tokens_per_s']:.2f}, gated {p['gated_tokens_per_s']:.2f}"
    )
    return "\n".join(lines)
