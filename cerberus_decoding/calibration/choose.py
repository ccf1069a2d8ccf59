"""Choose the weight format, tree, gate threshold and pruning with the best predicted tokens/s.

The prediction is a table: for every weight format measured (its cost curve and per-step overheads),
every tree size N (``best_tree(accuracy, N)``, Medusa's greedy construction) and every gate threshold
candidate of both entropies, the tokens/s decoding would reach over the calibration positions:

    tokens/s = sum(accepted_t if entropy_t < threshold else 1) / sum(spec_ms(N) if ... else ar_ms)

where ``accepted_t`` is exact, not modelled: one plus the depth of the deepest tree node whose rank
path matches the true tokens' ranks at position t. Ungated rows also try each ``min_confidence`` in
CONFIDENCES: at position t only the nodes the heads' probabilities give that chance are verified
(``tree.prune``), so a step costs the verification of those alone (an AR step and the heads'
draft when none is left). The choice is the table's argmax.
"""

from __future__ import annotations

import math

import numpy as np

from ..gate import ENTROPY_GATES
from ..tree import best_tree


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


def cost_at(costs: dict, q):
    """Verification cost of q tokens, linearly interpolated between measured points (ms): a float
    for a number, an array for an array of them."""
    qs = sorted(int(k) for k in costs)
    ms = np.interp(q, qs, [costs[k] if k in costs else costs[str(k)] for k in qs])
    return float(ms) if np.isscalar(q) else ms


def step_costs(costs: dict, overheads: dict, choices) -> tuple[float, float]:
    """(AR step ms, speculative step ms with this tree: its verification, and the heads it reaches)."""
    ar = cost_at(costs, 1) + overheads["step"]
    return ar, cost_at(costs, len(choices) + 1) + overheads["step"] + overheads["spec"] + draft_ms(overheads, choices)


def gate_ms(overheads: dict, gate: str, threshold: float) -> float:
    """What every step pays for a gate: its entropy where the threshold is finite (an infinite one
    decides without it; files before the twenty-fifth session counted the logits' in ``step``)."""
    return overheads.get("entropy", {}).get(gate, 0.0) if math.isfinite(threshold) else 0.0


def draft_ms(overheads: dict, choices) -> float:
    """The heads drafting this tree (a step runs only the heads its tree reaches)."""
    return overheads["heads"][max(len(c) for c in choices) - 1]


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


def gated_rate(values: np.ndarray, accepted: np.ndarray, spec_ms: float, ar_ms: float, threshold: float) -> float:
    """Tokens/s over the calibration positions when a step speculates iff value < threshold.

    Each position stands for a step that starts there: tokens/s = sum of tokens / sum of time
    (a ratio of sums, not a mean of per-step rates).
    """
    spec = values < threshold
    tokens = np.where(spec, accepted, 1.0).sum()
    ms = np.where(spec, spec_ms, ar_ms).sum()
    return 1000.0 * float(tokens / ms)


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


def threshold_candidates(values: np.ndarray, n_bins: int) -> list[float]:
    """Never (-inf), always (+inf), and the edges of ``n_bins`` equal-count bins of the entropy."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)))[1:] if len(values) else []
    return sorted({-math.inf, math.inf, *(float(e) for e in edges)})


# min_confidence candidates (0: verify the whole tree), for trees of up to PRUNED_SIZES nodes
CONFIDENCES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
PRUNED_SIZES = 32


def pruned_steps(ranks: np.ndarray, probs: np.ndarray, choices, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """What a greedy step at each position yields and verifies when the tree is pruned to the nodes
    whose confidence (the product of the heads' probabilities along the node's path, ``probs``
    [T, K, k] from ``measure.observe``) is at least ``min_confidence`` -> (tokens [T], root and bonus
    included; draft nodes verified [T], 0: an AR step)."""
    kept = np.ones((len(ranks), len(choices)), dtype=bool)
    matched = np.ones_like(kept)
    for i, c in enumerate(choices):
        confidence = np.prod([probs[:, d, r] for d, r in enumerate(c)], axis=0)
        kept[:, i] = confidence >= min_confidence
        matched[:, i] = (ranks[:, : len(c)] == np.array(c)).all(axis=1)
    depth = np.array([len(c) for c in choices])
    return 1 + np.where(kept & matched, depth, 0).max(axis=1), kept.sum(axis=1)


def tree_sizes(costs: dict, limit: int = 63) -> list[int]:
    """Tree sizes N whose verification (N + 1 tokens) lies inside the measured cost curve."""
    return list(range(1, min(limit, max(int(q) for q in costs) - 1) + 1))


def predict_table(
    formats: dict[str, dict],
    ranks: np.ndarray,
    entropies: dict[str, np.ndarray],
    top_k: int,
    n_bins: int = 10,
    probs: np.ndarray | None = None,
) -> tuple[list[dict], dict[int, list[list[int]]]]:
    """The predicted tokens/s of every (weights, tree size, gate, threshold, min_confidence), and the
    tree of each size.

    ``formats``: weights -> {"cost_ms": {q: ms}, "overhead_ms": {"step", "spec", "heads"}} as measured.
    ``ranks`` [T, K], ``entropies`` {gate: [T]}, ``probs`` [T, K, top_k] (None: no pruning rows):
    ``measure.observe`` over the calibration answers. Rows are ordered from less to more work
    (smaller trees, lower thresholds, then pruning) so that ``best_row`` breaks ties towards less work.
    """
    accuracy = accuracy_table(ranks, top_k)
    full = (ranks >= 0).all(axis=1)  # positions where every head has a true token
    if not full.any():
        raise ValueError("no position where every head has a true token: the answers are too short")
    sizes = sorted({n for m in formats.values() for n in tree_sizes(m["cost_ms"])})
    trees = {n: best_tree(accuracy, n) for n in sizes}
    trees = {n: t for n, t in trees.items() if len(t) == n}  # the table holds fewer nodes than that
    accepted = {n: accepted_lengths(ranks[full], t) for n, t in trees.items()}
    candidates = {g: threshold_candidates(entropies[g][full], n_bins) for g in ENTROPY_GATES}
    pruned = {}  # (n, min_confidence) -> (tokens [T], nodes verified [T])
    if probs is not None:
        for n in (n for n in trees if n <= PRUNED_SIZES):
            for c in CONFIDENCES[1:]:
                pruned[n, c] = pruned_steps(ranks[full], probs[full], trees[n], c)
    rows = []
    for weights, m in formats.items():
        fit = monotone_costs(m["cost_ms"])
        for n in (n for n in trees if n in tree_sizes(fit)):
            ar_ms, spec_ms = step_costs(fit, m["overhead_ms"], trees[n])
            row = {"weights": weights, "nodes": n, "ar_tokens_per_s": 1000.0 / ar_ms}
            for gate in ENTROPY_GATES:
                values = entropies[gate][full]
                for th in candidates[gate]:
                    entropy_ms = gate_ms(m["overhead_ms"], gate, th)
                    rate = gated_rate(values, accepted[n], spec_ms + entropy_ms, ar_ms + entropy_ms, th)
                    share = float((values < th).mean())
                    rows.append(
                        row
                        | {
                            "gate": gate,
                            "threshold": th,
                            "min_confidence": 0.0,
                            "tokens_per_s": rate,
                            "speculative_share": share,
                        }
                    )
            for c in (c for c in CONFIDENCES[1:] if (n, c) in pruned):  # drafts, verifies what is left
                tokens, nodes = pruned[n, c]
                spec = cost_at(fit, nodes + 1) + m["overhead_ms"]["step"] + m["overhead_ms"]["spec"]
                drafted_ms = np.where(nodes > 0, spec, ar_ms) + draft_ms(m["overhead_ms"], trees[n])
                # always drafting, then each gate's finite thresholds: a gated-off step is an AR step
                # that skips the draft too (pruning cannot tell the heads' confident mistakes apart)
                gates = [(ENTROPY_GATES[0], math.inf)]
                gates += [(g, th) for g in ENTROPY_GATES for th in candidates[g] if math.isfinite(th)]
                for gate, th in gates:
                    on = entropies[gate][full] < th
                    ms = np.where(on, drafted_ms, ar_ms) + gate_ms(m["overhead_ms"], gate, th)
                    rate = 1000.0 * float(np.where(on, tokens, 1.0).sum() / ms.sum())
                    rows.append(
                        row
                        | {
                            "gate": gate,
                            "threshold": th,
                            "min_confidence": c,
                            "tokens_per_s": rate,
                            "speculative_share": float((on & (nodes > 0)).mean()),
                        }
                    )
    return rows, trees


def best_row(rows: list[dict], **where) -> dict:
    """The row with the most tokens/s among those matching ``where`` (e.g. ``weights="int4"``,
    ``threshold=math.inf`` for heads that run ungated); the first of equals wins."""
    matching = [r for r in rows if all(r[k] == v for k, v in where.items())]
    if not matching:
        raise ValueError(f"no calibration row with {where}")
    return max(matching, key=lambda r: r["tokens_per_s"])  # max keeps the first of equals


def fastest_format(predicted: dict[str, float], preferred: str, margin: float = 0.05) -> str:
    """The format with the most predicted tokens/s, except that ``preferred`` (the one loaded: the
    device default under --weights auto) stays unless another beats it by more than ``margin``.
    A short calibration's step timings carry a few percent of noise; a switch must be worth it."""
    best = max(predicted, key=predicted.get)
    if preferred in predicted and predicted[preferred] >= (1 - margin) * predicted[best]:
        return preferred
    return best


def lookup_rate(
    hits: np.ndarray,
    length: int,
    costs: dict,
    overheads: dict,
    merged: tuple | None = None,
    answers: list[int] | None = None,
    instead: bool = False,
) -> float:
    """Predicted tokens/s with prompt-lookup chains of ``length`` tokens (0: none).

    ``hits`` [T]: how many tokens of the chain at each position are right, -1 where no chain
    matches (``measure.observe``), over answers of ``answers`` positions each (default: one). Alone
    (``pld``), a step with a chain verifies root + chain and yields 1 + min(hits, length) tokens;
    the others are AR steps. ``merged`` = (accepted [T], speculate [T], tree): the heads' tree under
    its gate (``cerberus+lookup``); where both run, the chain joins the tree's verification (costed
    as if it shared no node with it) and the step yields the longer of the two accepted runs. With
    ``instead``, a step with a chain verifies the chain alone and the heads do not run.

    The steps are walked through each answer as greedy decoding takes them: a step at position t
    that yields a tokens is followed by the one at t + a. Greedy output is fixed, so this is exact
    up to timing; a mean over all positions would count a run of ten copied tokens as ten good
    steps where decoding takes three.
    """
    n = len(hits)
    accepted, speculate, nodes, heads_ms = np.ones(n), np.zeros(n, dtype=bool), 0, 0.0
    if merged is not None:
        accepted, speculate, tree = merged
        nodes, heads_ms = len(tree), draft_ms(overheads, tree)
    chain = (hits >= 0) & (length > 0)
    if instead:
        speculate = speculate & ~chain
    heads_tokens = np.where(speculate, accepted, 1)
    tokens = np.where(chain, np.maximum(1 + np.clip(hits, 0, length), heads_tokens), heads_tokens).astype(int)
    rows = 1 + np.where(speculate, nodes, 0) + np.where(chain, length, 0)  # tokens each step verifies
    drafted = speculate | chain
    ms = (
        cost_at(costs, rows)
        + overheads["step"]
        + np.where(drafted, overheads["spec"], 0.0)
        + np.where(speculate, heads_ms, 0.0)
    )
    total_tokens, total_ms, first = 0, 0.0, 0
    for size in answers if answers is not None else [n]:
        t = first
        while t < first + size:
            total_tokens += int(tokens[t])
            total_ms += float(ms[t])
            t += int(tokens[t])
        first += size
    return 1000.0 * total_tokens / total_ms


def best_lookup_length(
    hits: np.ndarray,
    costs: dict,
    overheads: dict,
    max_len: int,
    merged: tuple | None = None,
    answers: list[int] | None = None,
    instead: bool = False,
) -> tuple[int, float]:
    """(chain length 0..max_len with the most predicted tokens/s, that rate); ties keep the shorter.
    Lengths whose verification lies beyond the measured cost curve are not considered."""
    largest = max(int(q) for q in costs) - 1 - (len(merged[2]) if merged is not None and not instead else 0)
    lengths = range(max(0, min(max_len, largest)) + 1)
    rates = [(lookup_rate(hits, n, costs, overheads, merged, answers, instead), n) for n in lengths]
    rate, length = max(rates, key=lambda r: (r[0], -r[1]))
    return length, rate
