"""Measure what calibration chooses from: what a step costs on this machine, and how often the heads
are right.

1. ``measure_costs``: one forward (plus LM head and argmax) of q tokens over a ~300-token cache, for
   q = 1..64: the verification cost curve of one weight format on this device.
2. ``measure_overheads``: what a step spends outside the forward (entropies and detokenising on every
   step; heads, tree building, path selection and cache compaction on speculative steps).
3. ``observe``: for each position of the model's own greedy answer to a calibration prompt, the rank
   of the true token among each head's guesses, and both entropies the gate can read.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from .. import gate as gating
from ..heads import topk_probabilities, with_lookup
from ..lookup import MAX_LEN, MIN_NGRAM, chain_hits, lookup_matches
from ..models import LoadedModel
from ..sampling import greedy, with_greedy
from ..stops import TextTracker
from ..tree import build_tree
from ..verify import verify_greedy

COST_QS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Each forward size runs this long before its calls are timed: decoding repeats the same few
# small sizes back to back, and a CPU needs tens of milliseconds to settle after other work (on an
# Intel AVX-512 VM one-token steps took 6-8 ms right after a 64-token forward or a 50 ms pause, and
# ~3.3 ms from about the seventh step on; docs/calibrate.md).
SETTLE_S = 0.05
# calls timed per size and round: one call a round let a burst of other work set a median (a
# calibration read q = 1 at 3.9 ms, above q = 2, against 2.7-2.8 in the runs before and after)
TIMED_CALLS = 3


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
    of inflating a few; in each round a q runs for ``SETTLE_S`` seconds before ``TIMED_CALLS`` of its
    calls are timed, as decoding repeats the same few q back to back. After two rounds, stops once
    ``time_limit`` seconds have passed.
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
        rt.lm_head_greedy(rt.forward(cache, ids, pos, mask))
        _sync(device)
        return time.perf_counter() - t0

    for q in (min(qs), max(qs)):  # warm-up: first calls allocate
        once(q)
    start = time.perf_counter()
    samples: dict[int, list[float]] = {q: [] for q in qs}
    rounds = tqdm(range(repeats), desc="verification cost", unit="round", disable=not progress, file=sys.stderr)
    for r in rounds:
        for q in qs:
            settled = time.perf_counter() + SETTLE_S
            once(q)  # untimed: the steps before a timed one are the same q, as in decoding
            while time.perf_counter() < settled:
                once(q)
            samples[q] += [once(q) for _ in range(TIMED_CALLS)]
        if time_limit is not None and r >= 1 and time.perf_counter() - start > time_limit:
            break
    return {q: _median_ms(s) for q, s in samples.items()}


@torch.inference_mode()
def measure_overheads(lm: LoadedModel, heads, top_k: int, context: int = 300, repeats: int = 5) -> dict:
    """Milliseconds a step spends outside the verification forward (medians).

    ``step``: what every step pays (showing its new tokens after a mid-length answer, stops.TextTracker).
    ``entropy``: what a step pays for each gate's entropy ({"hidden", "logits"}), where it is gated.
    ``spec``: what only a speculative step pays besides the heads (path selection, compaction),
    measured on a tree with ``top_k`` ranks at depth 1 and a chain through every head.
    ``heads``: the heads drafting such a tree of depth d = 1..K (a step runs only the heads its tree
    reaches), its tokens included, each timed right after a one-token step, as decoding runs them
    (the step's weights push the heads' out of the caches: on an Intel AVX-512 CPU a two-head draft
    took 0.44 ms there against 0.32 ms drafted back to back, twenty-fourth session).
    """
    rt, device, tokenizer = lm.runtime, lm.device, lm.tokenizer
    k = heads.config.num_heads
    by_d = [build_tree([[r] for r in range(top_k)] + [[0] * j for j in range(2, d + 1)]) for d in range(1, k + 1)]
    by_d = [t.to(device) for t in by_d]  # [d - 1]: the tree of depth d
    tree = by_d[-1]
    cache = rt.new_cache(context + tree.size, device)
    g = torch.Generator().manual_seed(1)
    vocab = int(lm.model.config.vocab_size)
    hidden = rt.forward(
        cache, torch.randint(vocab, (context,), generator=g).to(device), torch.arange(context, device=device)
    )[-1:]  # [1, H]
    logits = rt.lm_head(hidden)[0]  # [V]
    hidden = hidden[0]
    root = greedy(logits).view(1)
    found = None
    if heads.config.reads_lookup:  # heads that read lookup: a match, so that every copy bonus runs
        found = torch.tensor([1] + [int(root)] * heads.config.lookup_tokens, device=device)
    answer = torch.randint(vocab, (128,), generator=g).tolist()  # a mid-length answer: its last 2 tokens shown
    step, spec, by_depth = [], [], [[] for _ in range(k)]
    entropy: dict[str, list[float]] = {"hidden": [], "logits": []}
    for _ in range(repeats + 1):
        for d in range(1, k + 1):
            cache.truncate(context)
            rt.lm_head_greedy(rt.forward(cache, root, torch.tensor([context], device=device)))  # untimed
            _sync(device)
            t0 = time.perf_counter()
            tokens, _ = heads.draft(hidden, root, by_d[d - 1], rt.cuda_graphs, found)  # [N+1], as decoding runs them
            _sync(device)
            by_depth[d - 1].append(time.perf_counter() - t0)
        shown = TextTracker(tokenizer, [])
        shown.add(answer[:-2])  # the answer so far, shown
        _sync(device)
        for gate, x in (("hidden", hidden), ("logits", logits)):
            t0 = time.perf_counter()
            gating.entropy(x)
            entropy[gate].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        shown.add(answer[-2:])
        t1 = time.perf_counter()
        cache.truncate(context)
        all_logits = rt.lm_head(rt.forward(cache, tokens, context + tree.depth, tree.mask))  # not timed
        _sync(device)
        t3 = time.perf_counter()
        # the logits as the states: the LM head is in the cost curve
        path, _, _ = verify_greedy(tree, tokens, all_logits, with_greedy(lambda rows: rows))
        cache.compact(context, path)
        _sync(device)
        t4 = time.perf_counter()
        step.append(t1 - t0)
        spec.append(t4 - t3)
    return {  # first round: warm-up
        "step": _median_ms(step[1:]),
        "entropy": {gate: _median_ms(t[1:]) for gate, t in entropy.items()},
        "spec": _median_ms(spec[1:]),
        "heads": [_median_ms(t[1:]) for t in by_depth],
    }


# ---- 2. how often the heads are right ---------------------------------------------------------------


@torch.inference_mode()
def observe(
    lm: LoadedModel, heads, prompt_ids: list[int], answer_ids: list[int], top_k: int, chunk: int = 64
) -> dict[str, np.ndarray]:
    """Teacher-force prompt + the model's own greedy answer and read, at every answer position t
    (the state whose LM head chose token t + 1, i.e. a step's root):

    ``ranks`` [T, K]: rank of the true token t + d + 2 among head d's logits; ``top_k`` when it is
    not in the top-k (or outside the heads' vocabulary), -1 when the answer ends before it.
    ``probs`` [T, K, top_k]: head d's probabilities of its top-k tokens, best first (what a step's
    pruning reads: ``tree.prune``).
    ``hidden`` / ``logits`` [T]: the two entropies the gate can read at t.
    ``lookup`` [T]: how many tokens of the prompt-lookup chain at t are right (``lookup.chain_hits``
    with the drafter's defaults: the longest chain calibration considers), -1 where none matches.

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
    seq = torch.tensor(ids + [-1] * (num_heads + 2), device=device)  # padded: -1 past the end
    if heads.config.reads_lookup:  # what prompt lookup finds at each root [T, 1 + lookup_tokens]
        T = heads.config.lookup_tokens
        found = lookup_matches(list(prompt_ids), list(answer_ids), T, heads.config.lookup_max_ngram)
        found = torch.tensor(found, device=device).reshape(-1, 1 + T)
    ranks, probs, h_ent, l_ent = [], [], [], []
    for a in range(0, states.shape[0], chunk):
        h = states[a : a + chunk]  # [c, H]
        t = torch.arange(start + a, start + a + h.shape[0], device=device)  # [c] absolute positions
        target = seq[t[:, None] + torch.arange(2, num_heads + 2, device=device)]  # [c, K] token at t + d + 2
        # the root is token t + 1; heads that read drafts read the true tokens after it (an accepted path's)
        path = seq[t[:, None] + torch.arange(1, num_heads + 1, device=device)].clamp_min(0)  # [c, K]
        inputs = path if heads.config.reads_drafts else path[:, 0]
        if heads.config.reads_lookup:  # and what prompt lookup found at each root
            inputs = with_lookup(inputs, found[a : a + h.shape[0]])
        logits = heads(h, inputs).float()  # [c, K, V'] (+ the copy column, heads that read lookup)
        idx = heads.columns(target, found[a : a + h.shape[0]] if heads.config.reads_lookup else None)  # [c, K]
        true_logit = logits.gather(-1, idx.clamp_min(0)[..., None])[..., 0]  # [c, K]
        rank = (logits > true_logit[..., None]).sum(-1)  # [c, K]
        rank = torch.where((idx < 0) | (rank >= top_k), torch.full_like(rank, top_k), rank)
        ranks.append(torch.where(target < 0, torch.full_like(rank, -1), rank).cpu())
        probs.append(topk_probabilities(logits, min(top_k, logits.shape[-1]))[1].cpu())  # [c, K, top_k]
        base = rt.lm_head(h)  # [c, V]
        h_ent += [gating.entropy(x) for x in h]
        l_ent += [gating.entropy(x) for x in base]
    hits = chain_hits(list(prompt_ids), list(answer_ids), MAX_LEN, MIN_NGRAM)
    return {
        "ranks": torch.cat(ranks).numpy(),
        "probs": torch.cat(probs).numpy(),
        "hidden": np.array(h_ent),
        "logits": np.array(l_ent),
        "lookup": np.array(hits, dtype=np.int64),
    }
