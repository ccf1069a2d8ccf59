"""Calibration: the choice is the argmax of the predicted table, the file is keyed by machine and
round-trips, first use calibrates once (also with concurrent first runs), and the effective
configuration says where each setting came from."""

from __future__ import annotations

import itertools
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from cerberus_decoding import methods
from cerberus_decoding.calibration import choose, files, measure, run
from cerberus_decoding.engine import SamplingConfig
from cerberus_decoding.heads import new_heads, random_heads, read_heads_config, save_heads
from cerberus_decoding.lookup import MAX_LEN, chain_hits
from cerberus_decoding.methods import build_decoder, choose_weights, default_heads_dir, effective_config
from cerberus_decoding.runtime import machine
from cerberus_decoding.runtime.formats import WEIGHTS
from cerberus_decoding.tree import DEFAULT_TREE


def test_monotone_costs_remove_dips_only():
    curve = {1: 10.0, 2: 10.5, 4: 11.0, 8: 14.0, 16: 30.0}  # a CPU-like curve: flat, then linear
    assert choose.monotone_costs(curve) == curve
    fitted = choose.monotone_costs({1: 10.0, 2: 14.0, 4: 12.0, 8: 20.0, 16: 19.0, 32: 30.0})
    assert fitted == pytest.approx({1: 10.0, 2: 13.0, 4: 13.0, 8: 19.5, 16: 19.5, 32: 30.0})


def brute_threshold_rate(values, accepted, spec_ms, ar_ms) -> float:
    """Best tokens/s over every threshold that splits the data differently (and some that don't)."""
    points = np.sort(np.unique(values))
    grid = [-math.inf, math.inf, *points, *((points[:-1] + points[1:]) / 2), *(points + 1e-9)]
    return max(choose.gated_rate(values, accepted, spec_ms, ar_ms, th) for th in grid)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_candidates_contain_the_best_split(seed):
    """Equal-count bin edges with one position per bin are every split point: the table then holds the
    best threshold over all thresholds, even where acceptance is not monotone in entropy."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 5, 40)
    accepted = rng.integers(1, 5, 40).astype(float)  # not monotone in entropy on purpose
    best = max(choose.gated_rate(values, accepted, 2.5, 1.0, th) for th in choose.threshold_candidates(values, 40))
    assert best == pytest.approx(brute_threshold_rate(values, accepted, 2.5, 1.0), rel=1e-12)


def test_best_row_is_the_argmax_and_ties_keep_less_work():
    rows = [
        {"weights": w, "nodes": n, "tokens_per_s": r}
        for w, n, r in [
            ("int4", 1, 30.0),
            ("int4", 2, 41.0),
            ("int4", 3, 41.0),
            ("float32", 1, 15.0),
            ("float32", 5, 44.0),
        ]
    ]
    assert choose.best_row(rows) == rows[4]
    assert choose.best_row(rows, weights="int4") == rows[1]  # a tie: the smaller tree
    with pytest.raises(ValueError):
        choose.best_row(rows, weights="int8")


def synthetic_calibration(n: int = 40):
    """Half the positions are confident (logits entropy 0.5) and every head is right there; the other
    half are unsure (entropy 3.0) and every head is wrong. ``hidden`` carries no signal."""
    good = np.arange(n) % 2 == 0
    ranks = np.where(good[:, None], 0, 10).repeat(3, axis=1)  # 3 heads, top_k 10: 10 = missed
    entropies = {"logits": np.where(good, 0.5, 3.0), "hidden": np.random.default_rng(0).uniform(0, 1, n)}
    free = {"step": 0, "spec": 0, "heads": [0] * 3}
    formats = {
        "steep": {"cost_ms": {1: 10.0, 2: 21.0, 4: 41.0, 8: 81.0, 16: 161.0}, "overhead_ms": free},
        "flat": {"cost_ms": {1: 10.0, 2: 11.0, 4: 12.0, 8: 13.0, 16: 14.0}, "overhead_ms": free},
    }
    return formats, ranks, entropies


def test_the_choice_is_the_known_best_of_a_synthetic_table():
    formats, ranks, entropies = synthetic_calibration()
    rows, trees = choose.predict_table(formats, ranks, entropies, top_k=10, n_bins=4)
    best = choose.best_row(rows)
    # the flat format, the 3-node chain (every head right), speculating on the confident half only:
    # (2 x 4 tokens) per (12 ms + 10 ms) for each pair of positions
    assert (best["weights"], best["nodes"], best["gate"]) == ("flat", 3, "logits")
    assert trees[3] == [[0], [0, 0], [0, 0, 0]]
    assert 0.5 < best["threshold"] <= 3.0 and best["speculative_share"] == 0.5
    assert best["tokens_per_s"] == pytest.approx(1000 * 5 / 22)
    assert best["tokens_per_s"] == max(r["tokens_per_s"] for r in rows)
    # and run's per-format candidates start with that row as a decoder configuration, then the best
    # rows of the next-best tree sizes, in predicted order
    candidates = run._choices(rows, trees, "flat", ungated=False, n=3)
    choice = candidates[0]
    assert (choice["tree"], choice["gate"], choice["threshold"]) == (trees[3], "logits", best["threshold"])
    assert choice["thresholds"]["logits"] == best["threshold"]
    sizes = [len(c["tree"]) for c in candidates]
    assert len(set(sizes)) == 3 and sizes[0] == 3
    rates = [c["predicted"]["tokens_per_s"] for c in candidates]
    assert rates == sorted(rates, reverse=True)
    assert rates[1] == max(choose.best_row(rows, weights="flat", nodes=n)["tokens_per_s"] for n in trees if n != 3)
    # the smallest tree always races (last when not predicted into the first n)
    smallest = min(n for n in trees if any(r["nodes"] == n and r["weights"] == "flat" for r in rows))
    two = run._choices(rows, trees, "flat", ungated=False, n=2)
    assert len(two[0]["tree"]) == 3 and len(two[-1]["tree"]) == smallest
    # Medusa heads run ungated: the best tree when always speculating
    ungated = run._choices(rows, trees, "flat", ungated=True, n=1)
    assert len(ungated) == 1 and ungated[0]["threshold"] == math.inf and ungated[0]["tree"] == trees[3]


def test_a_gate_pays_for_its_entropy_on_every_step():
    """The logits' entropy (a softmax over the vocabulary) is paid on every step of a gated choice,
    AR steps included, and by no ungated one: at 0.5 ms the known best above (5 tokens in 22 ms)
    takes 23 ms, at 2 ms always speculating with the chain wins instead (5 tokens in 24 ms)."""
    formats, ranks, entropies = synthetic_calibration()
    flat = {"flat": formats["flat"]}
    for entropy_ms, gate, expected in ((0.5, "logits", 5 / 23), (2.0, "hidden", 5 / 24)):
        flat["flat"]["overhead_ms"] = {
            "step": 0,
            "spec": 0,
            "heads": [0] * 3,
            "entropy": {"logits": entropy_ms, "hidden": 0},
        }
        best = choose.best_row(choose.predict_table(flat, ranks, entropies, top_k=10, n_bins=4)[0])
        assert best["gate"] == gate and best["nodes"] == 3 and best["tokens_per_s"] == pytest.approx(1000 * expected)
        assert (best["threshold"] == math.inf) == (gate == "hidden")


def test_the_race_takes_the_smallest_tree_the_prediction_cannot_tell_from_the_best():
    """Predictions within PREDICTION_MARGIN of the best are within their own error: the smallest such
    tree races second, the smallest of all last, and the rest follow by prediction."""
    predicted = {1: 100.0, 2: 150.0, 3: 191.0, 4: 198.0, 5: 200.0, 6: 199.0}
    trees = {n: [[0] * d for d in range(1, n + 1)] for n in predicted}

    def sizes(k: int) -> list[int]:
        rows = [
            {"weights": "w", "nodes": n, "gate": gate, "threshold": math.inf, "min_confidence": 0.0}
            | {"tokens_per_s": rate, "ar_tokens_per_s": 100.0, "speculative_share": 1.0}
            for gate in ("logits", "hidden")
            for n, rate in predicted.items()
        ]
        return [len(c["tree"]) for c in run._choices(rows, trees, "w", ungated=False, n=k)]

    assert sizes(3) == [5, 3, 1] and sizes(4) == [5, 3, 6, 1] and sizes(2) == [5, 1] and sizes(1) == [5]
    predicted[3] = 189.0  # 5.5% below the best: the prediction tells them apart
    assert sizes(3) == [5, 4, 1]


def test_a_tree_pays_for_the_heads_it_reaches():
    """Deep heads that cost more than the tokens they add: the choice stops at depth 1."""
    formats, ranks, entropies = synthetic_calibration()
    flat = formats["flat"] | {"overhead_ms": {"step": 0, "spec": 0, "heads": [1.0, 30.0, 60.0]}}
    rows, trees = choose.predict_table({"flat": flat}, ranks, entropies, top_k=10, n_bins=4)
    best = choose.best_row(rows)
    assert max(len(c) for c in trees[best["nodes"]]) == 1
    # confident half: 2 tokens per (11 + 1) ms; the other half: AR steps of 10 ms
    assert best["tokens_per_s"] == pytest.approx(1000 * 3 / 22)


def test_pruned_steps_verify_only_the_confident_nodes():
    """Per position: the nodes whose path probability reaches the threshold are verified, and the
    step yields one token plus the deepest verified node on the true path."""
    choices = [[0], [1], [0, 0]]
    ranks = np.array([[0, 0], [1, 0], [0, 0], [0, 5]])  # [T, K] the true tokens' ranks
    probs = np.array(  # [T, K, 2] each head's top-2 probabilities
        [[[0.9, 0.05], [0.8, 0.1]], [[0.5, 0.4], [0.1, 0.05]], [[0.3, 0.2], [0.9, 0.1]], [[0.9, 0.1], [0.5, 0.2]]]
    )
    tokens, nodes = choose.pruned_steps(ranks, probs, choices, 0.35)
    # t0: [0] 0.9, [1] 0.05, [0, 0] 0.72 -> [0], [0, 0] verified, both right: 3 tokens
    # t1: [0] 0.5, [1] 0.4, [0, 0] 0.05 -> [0], [1]; the truth is [1]: 2 tokens
    # t2: nothing reaches 0.35 -> an AR step: 1 token; t3: [0], [0, 0] 0.45; head 2 wrong: 2 tokens
    assert tokens.tolist() == [3, 2, 1, 2] and nodes.tolist() == [2, 2, 0, 2]


def test_pruning_wins_where_the_heads_know_when_they_are_right():
    """Heads sure where they are right and unsure where wrong, each verified row 40% of a step:
    verifying only the confident nodes beats every unpruned choice; without the probabilities there
    is no such row."""
    formats, ranks, entropies = synthetic_calibration()
    formats = {"steep": formats["steep"] | {"cost_ms": {1: 10.0, 2: 14.0, 4: 22.0, 8: 38.0, 16: 70.0}}}
    good = ranks[:, 0] == 0
    top = np.array([[0.9, 0.05] + [0.005] * 8, [0.2] + [0.1] * 8 + [0.0]])  # confident, unsure: top-10 probabilities
    probs = top[np.where(good, 0, 1)][:, None, :].repeat(3, axis=1)  # [T, 3 heads, 10]
    entropies["logits"] = entropies["hidden"]  # no gate can tell the positions apart
    steep = {"steep": formats["steep"]}
    rows, trees = choose.predict_table(steep, ranks, entropies, top_k=10, n_bins=4, probs=probs)
    best = choose.best_row(rows)
    assert best["min_confidence"] > 0.2 and best["threshold"] == math.inf and best["nodes"] == 3
    assert best["tokens_per_s"] > max(r["tokens_per_s"] for r in rows if r["min_confidence"] == 0) * 1.3
    # the confident half: 4 tokens for a 4-token verification (22 ms), the rest AR steps of 10 ms
    assert best["tokens_per_s"] == pytest.approx(1000 * 5 / 32)
    assert all(r["min_confidence"] == 0 for r in choose.predict_table(steep, ranks, entropies, 10, 4)[0])
    choice = run._choices(rows, trees, "steep", ungated=False, n=1)[0]
    assert choice["min_confidence"] == best["min_confidence"] and choice["tree"] == trees[3]


def test_gate_and_pruning_together_where_each_catches_what_the_other_cannot():
    """A third of the positions: heads right and sure, the model sure (entropy 0.5); a third: heads
    sure but wrong where the model is unsure (3.0: pruning cannot see it, the gate can); a third:
    heads unsure and wrong where the model is sure (the gate cannot see it, pruning can). The best
    row gates and prunes, and a gated-off step skips the draft too."""
    formats, _, entropies = synthetic_calibration()
    steep = {"steep": formats["steep"] | {"cost_ms": {1: 10.0, 2: 14.0, 4: 22.0, 8: 38.0, 16: 70.0}}}
    kind = np.arange(60) % 3  # 0: right and sure, 1: sure but wrong (unsure model), 2: unsure and wrong
    ranks = np.where(kind[:, None] == 0, 0, 10).repeat(3, axis=1)
    entropies = {"logits": np.where(kind == 1, 3.0, 0.5), "hidden": np.random.default_rng(0).uniform(0, 1, 60)}
    top = np.array([[0.9, 0.05] + [0.005] * 8, [0.2] + [0.1] * 8 + [0.0]])  # sure, unsure: top-10 probabilities
    probs = top[np.where(kind == 2, 1, 0)][:, None, :].repeat(3, axis=1)  # [T, 3 heads, 10]
    rows, trees = choose.predict_table(steep, ranks, entropies, top_k=10, n_bins=4, probs=probs)
    best = choose.best_row(rows)
    assert best["gate"] == "logits" and best["threshold"] == 3.0 and best["min_confidence"] > 0.2
    # per three positions: 4 tokens in a 4-token verification (22 ms), two AR steps (10 ms each)
    assert best["tokens_per_s"] == pytest.approx(1000 * 6 / 42)
    gate_only = max(r["tokens_per_s"] for r in rows if r["min_confidence"] == 0)
    prune_only = max(r["tokens_per_s"] for r in rows if r["threshold"] == math.inf and r["min_confidence"] > 0)
    assert best["tokens_per_s"] > 1.25 * max(gate_only, prune_only)
    choice = run._choices(rows, trees, "steep", ungated=False, n=1)[0]
    assert (choice["gate"], choice["threshold"], choice["min_confidence"]) == ("logits", 3.0, best["min_confidence"])


def test_the_loaded_format_stays_unless_another_is_clearly_faster():
    predicted = {"int4": 37.81, "int8": 37.84, "float32": 15.0}
    assert choose.fastest_format(predicted, "int4") == "int4"  # 0.1% is timing noise
    assert choose.fastest_format(predicted | {"int8": 41.0}, "int4") == "int8"  # 8% is not
    assert choose.fastest_format(predicted, "bfloat16") == "int8"  # not measured: the fastest


def test_a_steep_cost_curve_turns_speculation_off():
    formats, ranks, entropies = synthetic_calibration()
    rows, trees = choose.predict_table({"steep": formats["steep"]}, ranks, entropies, top_k=10, n_bins=4)
    best = choose.best_row(rows)
    # even on the confident half, 4 tokens cost 41 ms against 4 AR steps' 40: never speculate
    assert best["threshold"] == -math.inf and best["nodes"] == 1  # ties keep the least work
    assert best["tokens_per_s"] == pytest.approx(100.0)


def test_entropy_bins_report_where_speculation_pays():
    values = np.linspace(0, 4, 40)
    accepted = np.where(values < 2, 3.0, 1.0)
    bins = choose.entropy_bins(values, accepted, 2.0, 1.0, 4)
    assert [b["count"] for b in bins] == [10, 10, 10, 10]
    assert [b["pays"] for b in bins] == [True, True, False, False]


def test_accuracy_table_is_conditional_on_the_top_path():
    ranks = np.array([[0, 0], [0, 1], [0, 0], [1, 0], [1, 0], [3, 1], [0, -1]])  # top_k 3: 3 = missed
    table = choose.accuracy_table(ranks, top_k=3, prior=0.0)
    assert table[0] == pytest.approx([4 / 7, 2 / 7, 0.0])
    # head 1 counted only where head 0's best guess was right (rows 0-2; row 6 has no head-1 token)
    assert table[1] == pytest.approx([2 / 3, 1 / 3, 0.0])
    shrunk = choose.accuracy_table(ranks, top_k=3, prior=3.0)[1]
    marginal = [4 / 6, 2 / 6, 0.0]
    assert shrunk == pytest.approx([(c + 3 * m) / 6 for c, m in zip([2, 1, 0], marginal, strict=True)])


def test_accepted_lengths_follow_the_tree():
    tree = [[0], [1], [0, 0]]
    ranks = np.array([[0, 0, 5], [1, 0, 0], [0, 1, 0], [3, 0, 0], [0, -1, 0]])
    assert choose.accepted_lengths(ranks, tree).tolist() == [3, 2, 2, 1, 2]


def test_observe_ranks_match_the_heads_logits(tiny_lm):
    heads = new_heads(tiny_lm, "cerberus", num_heads=2)
    prompt, answer = [5, 17, 99, 400], [7, 8, 9, 10, 11, 12]
    obs = measure.observe(tiny_lm, heads, prompt, answer, top_k=50000)
    ids = prompt + answer
    with torch.inference_mode():
        states = tiny_lm.model.model(torch.tensor([ids])).last_hidden_state[0]  # [L, H]
        logits = heads(states)  # [L, K, V]
    assert obs["ranks"].shape == (len(answer), 2)
    for i, t in enumerate(range(len(prompt) - 1, len(ids) - 1)):
        for d in range(2):
            if t + d + 2 >= len(ids):
                assert obs["ranks"][i, d] == -1
            else:
                want = int((logits[t, d] > logits[t, d, ids[t + d + 2]]).sum())
                assert obs["ranks"][i, d] == want
            # what pruning reads: each head's probabilities of its best tokens, best first
            top = logits[t, d].float().softmax(-1).sort(descending=True).values[:50000]
            assert np.allclose(obs["probs"][i, d], top.numpy(), rtol=1e-4, atol=1e-8)
    assert len(obs["hidden"]) == len(obs["logits"]) == len(answer)


def test_observe_ranks_heads_that_read_drafts_along_the_answer(tiny_lm):
    """Heads that read drafts are ranked given the answer's own tokens as the drafts before them:
    the path a step accepts when every head before was right (what the tree search assumes)."""
    heads = random_heads(tiny_lm, "cerberus", seed=1, scale=0.5, num_heads=2, root_token=True, reads_drafts=True)
    prompt, answer = [5, 17, 99, 400], [7, 8, 9, 10, 11, 12]
    obs = measure.observe(tiny_lm, heads, prompt, answer, top_k=50000)
    ids = prompt + answer
    with torch.inference_mode():
        states = tiny_lm.model.model(torch.tensor([ids])).last_hidden_state[0]  # [L, H]
        path = torch.tensor([ids[t + 1 : t + 3] for t in range(len(prompt) - 1, len(ids) - 2)])  # [T - 1, 2]
        logits = heads(states[len(prompt) - 1 : len(ids) - 2], path)  # [T - 1, K, V]
    for i in range(len(answer) - 1):
        for d in range(2):
            t = len(prompt) - 1 + i
            if t + d + 2 < len(ids):
                assert obs["ranks"][i, d] == int((logits[i, d] > logits[i, d, ids[t + d + 2]]).sum())


def test_chain_hits_count_the_right_tokens_of_each_lookup_chain():
    # prompt "1 2 3 4 5"; the answer copies "2 3 4" then leaves the text
    prompt, answer = [1, 2, 3, 4, 5], [9, 2, 3, 4, 7, 8]
    hits = chain_hits(prompt, answer, max_len=3, min_ngram=1)
    # root 9: unseen; root 2: chain 3 4 5, answer goes on 3 4 7 -> 2 right; root 3 (bigram 2 3): chain
    # 4 5 9 vs 4 7 8 -> 1; root 4: 5 9 2 vs 7 8 -> 0; root 7: unseen; root 8: unseen
    assert hits == [-1, 2, 1, 0, -1, -1]
    assert len(hits) == len(answer)  # one per step root, as observe's other arrays
    assert chain_hits(prompt, answer, max_len=3, min_ngram=2)[1] == -1  # root 2 alone is a unigram


def test_lookup_rate_walks_the_steps_decoding_takes():
    """A copied run of 10 tokens with 3-token chains is 3 steps (4 + 4 + 2 tokens), not 10 good ones."""
    hits = np.arange(9, -1, -1)  # at position t the rest of the answer, 9 - t tokens, can be copied
    flat = {1: 10.0, 2: 10.0, 4: 10.0, 8: 10.0, 16: 10.0}
    free = {"step": 0.0, "spec": 0.0, "heads": [0.0]}
    assert choose.lookup_rate(hits, 3, flat, free) == pytest.approx(1000 * 10 / 30)
    # two answers: a step never runs past the end of its answer into the next one
    assert choose.lookup_rate(np.tile(hits, 2), 3, flat, free, answers=[10, 10]) == pytest.approx(1000 * 20 / 60)


STEEP = {1: 10.0, 2: 13.0, 4: 21.0, 8: 37.0, 16: 70.0}  # verification cost by tokens: this CPU's shape


def copy_runs(rng, n: int = 400) -> np.ndarray:
    """Lookup hits of an answer: most steps have no chain, some copy runs of 2-12 tokens (at t, the
    rest of the run)."""
    hits = []
    while len(hits) < n:
        run_len = int(rng.integers(2, 13))
        hits += [-1] * int(rng.integers(3, 12)) + list(range(run_len - 1, -1, -1))
    return np.array(hits)


def test_lookup_length_follows_the_cost_curve():
    """Long chains pay where verification is flat (a GPU) and cost where it is steep (this CPU)."""
    hits = copy_runs(np.random.default_rng(0))
    overheads = {"step": 1.0, "spec": 0.5, "heads": [1.0, 1.5]}
    flat = {1: 10.0, 2: 10.5, 4: 11.0, 8: 11.5, 16: 12.0}
    long, _ = choose.best_lookup_length(hits, flat, overheads, 10)
    short, rate = choose.best_lookup_length(hits, STEEP, overheads, 10)
    assert long >= 8 and 1 <= short < long
    assert rate == choose.lookup_rate(hits, short, STEEP, overheads) > choose.lookup_rate(hits, 0, STEEP, overheads)
    assert choose.lookup_rate(hits, 0, STEEP, overheads) == pytest.approx(1000 / 11.0)  # no chains: AR steps
    useless = np.where(hits >= 0, 0, -1)  # chains that are always wrong never pay
    assert choose.best_lookup_length(useless, flat, overheads, 10)[0] == 0
    # merged into a tree that yields 2 tokens every step, chains pay less, and a steep curve
    # charges each chain on top of the tree
    merged = (np.full(len(hits), 2.0), np.ones(len(hits), dtype=bool), [[0]])
    assert choose.best_lookup_length(hits, STEEP, overheads, 10, merged)[0] <= short
    assert choose.lookup_rate(hits, 0, STEEP, overheads, merged) == pytest.approx(1000 * 2 / (13.0 + 2.5))


def test_a_chain_replaces_the_tree_where_verification_is_steep():
    """cerberus+lookup's two ways: merge the chain into the heads' tree, or verify it instead of the
    tree where one matches (the heads then do not run). Merging pays on a flat curve, replacing on a
    steep one."""
    overheads = {"step": 1.0, "spec": 0.5, "heads": [1.0, 1.5]}
    flat_10 = dict.fromkeys((1, 2, 4, 8, 16), 10.0)
    # t=0: a chain with 2 right tokens, the tree accepts 1 (2 tokens); t=3: no chain, the tree's 2 tokens
    hits, tree = np.array([2, 1, 0, -1]), (np.full(4, 2.0), np.ones(4, dtype=bool), [[0]])
    merged = choose.lookup_rate(hits, 2, flat_10, overheads, tree)
    instead = choose.lookup_rate(hits, 2, flat_10, overheads, tree, instead=True)
    assert merged == pytest.approx(1000 * 5 / (2 * (10 + 1 + 0.5 + 1.0)))  # both steps run the heads
    assert instead == pytest.approx(1000 * 5 / ((10 + 1 + 0.5) + (10 + 1 + 0.5 + 1.0)))  # the chain's does not

    rng = np.random.default_rng(0)
    hits = copy_runs(rng)
    tree = (np.where(rng.random(len(hits)) < 0.6, 3.0, 1.0), np.ones(len(hits), dtype=bool), [[0], [0, 0]])
    overheads["heads"] = [0.2, 0.3]  # heads cheap next to a step: what they cost here does not decide
    flat = {1: 10.0, 2: 10.2, 4: 10.4, 8: 10.8, 16: 11.6}
    for costs, merging_pays in ((flat, True), (STEEP, False)):
        _, merged = choose.best_lookup_length(hits, costs, overheads, 10, tree)
        _, instead = choose.best_lookup_length(hits, costs, overheads, 10, tree, instead=True)
        assert (merged > instead) == merging_pays


# ---- files, first use and the effective configuration ---------------------------------------------


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Calibrations go to $CERBERUS_CACHE: a fresh one per test, never the user's; first-use
    calibration is on (the suite turns it off elsewhere) and short."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CERBERUS_CACHE", str(path))
    monkeypatch.delenv(run.NO_CALIBRATE_ENV, raising=False)
    monkeypatch.setattr(run, "QUICK_SECONDS", 4.0)
    monkeypatch.setattr(run, "QUICK_QS", (1, 2, 4, 8))
    return path


@pytest.fixture
def heads_dir(tiny_lm, tmp_path):
    save_heads(new_heads(tiny_lm, "cerberus"), tmp_path / "heads")
    return tmp_path / "heads"


def fake_calibration(key: str, **choice) -> dict:
    """A calibration file as ``run.calibrate`` writes it, with one float32 choice."""
    choice = {
        "tree": [[0], [1], [0, 0]],
        "gate": "logits",
        "threshold": 1.25,
        "thresholds": {"logits": 1.25, "hidden": 0.5},
        "predicted": {},
    } | choice
    return {
        "version": files.VERSION,
        "kind": "full",
        "date": "2026-11-26T00:00:00+00:00",
        "hardware_key": key,
        "hardware_text": "test",
        "weights": "float32",
        "known_formats": [w for w in WEIGHTS if w != "auto"],
        "choices": {"float32": choice},
        "checks": {},
    }


def this_key() -> str:
    return files.hardware_key(machine("cpu"))


def test_the_hardware_key_tells_machines_apart():
    here = machine("cpu")
    keys = {files.hardware_key(here)}
    for change in (
        {"isa": "AVX2" if here.get("isa") == "AVX512" else "AVX512"},  # the fleet's other kind
        {"threads": here["threads"] + 1},
        {"torch": "9.9"},
        {"name": "Other CPU"},
        {"flags": here["flags"] + ["amx_bf16"]},
    ):
        keys.add(files.hardware_key(here | change))
    assert len(keys) == 6
    assert files.hardware_key(dict(here)) == files.hardware_key(here)  # stable
    # a GPU's machine() has no ISA or thread count (this once raised KeyError on the first CUDA run)
    gpu = {"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"}
    keys.add(files.hardware_key(gpu))
    assert files.hardware_key(gpu).startswith("cuda-nvidia-h100-80gb-hbm3-torch2.11.0-")
    assert all("/" not in k and " " not in k for k in keys)  # a file name


def test_a_matching_calibration_is_used_and_says_so(tiny_lm, heads_dir):
    files.write_calibration(files.calibration_path(heads_dir, this_key()), fake_calibration(this_key()))
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    assert dec.tree.size == 4 and dec.gate == "logits" and dec.threshold == 1.25
    assert dec.config.source["tree"] == dec.config.source["threshold"] == "calibrated"
    assert "calibration made on this machine, 2026-11-26" in dec.config.why()
    # the other entropy lives on another scale, hence its own threshold
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), gate="hidden")
    assert dec.gate == "hidden" and dec.threshold == 0.5 and dec.config.source["gate"] == "flag"
    # flags win over the calibration
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), threshold=3.0, tree=[[0], [1], [2], [3]])
    assert dec.tree.size == 5 and dec.threshold == 3.0 and dec.config.source["tree"] == "flag"
    nogate = build_decoder(tiny_lm, "cerberus-nogate", heads=str(heads_dir))
    assert nogate.threshold == math.inf and nogate.tree.size == 4
    # infinite thresholds read as what they do
    for threshold, says in ((math.inf, "always speculates"), (-math.inf, "never speculates")):
        dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), threshold=threshold)
        assert f"3-node tree (calibrated), {says} (flag)" in dec.config.why()


def test_a_shipped_calibration_is_read_after_the_users(tiny_lm, heads_dir):
    files.write_calibration(files.shipped_path(heads_dir, this_key()), fake_calibration(this_key(), tree=[[0]]))
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    assert dec.tree.size == 2 and "shipped with the heads for this machine" in dec.config.why()
    files.write_calibration(files.calibration_path(heads_dir, this_key()), fake_calibration(this_key()))
    assert build_decoder(tiny_lm, "cerberus", heads=str(heads_dir)).tree.size == 4  # the user's wins


def test_another_machines_calibration_is_not_reused(tiny_lm, heads_dir, monkeypatch):
    files.write_calibration(files.calibration_path(heads_dir, this_key()), fake_calibration(this_key()))
    other = machine("cpu") | {"isa": "AVX512", "flags": ["avx2", "avx512f", "avx512_bf16"]}
    monkeypatch.setattr(run, "machine", lambda device: other)
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), calibrate=False)
    assert dec.tree.size == len(DEFAULT_TREE) + 1  # the checkpoint's defaults, not the other machine's choice
    assert dec.config.calibration == "defaults: no calibration" and dec.config.source["tree"] == "method default"
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))  # first use on that machine: calibrates
    made = files.calibration_path(heads_dir, files.hardware_key(other))
    assert made.is_file() and json.loads(made.read_text())["kind"] == "quick"
    assert dec.config.source["tree"] == "calibrated"


def test_a_corrupt_calibration_is_ignored_with_a_warning_and_redone(tiny_lm, heads_dir, capsys):
    path = files.calibration_path(heads_dir, this_key())
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 2, "choices": ')  # a killed writer of an older version, say
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    err = capsys.readouterr().err
    assert f"warning: ignoring calibration {path}" in err and "calibrating for about" in err
    assert json.loads(path.read_text())["hardware_key"] == this_key()  # replaced by a good one
    assert dec.config.source["threshold"] == "calibrated"


def test_a_calibration_made_before_a_format_this_machine_runs_is_redone(tiny_lm, heads_dir, monkeypatch, capsys):
    """A file from before w4a8 (no ``known_formats``) never measured it, so its fastest format is not
    this machine's: ignored with a warning and redone where w4a8 runs, still used where it does not."""
    old = fake_calibration(this_key(), tree=[[0]])
    del old["known_formats"]
    path = files.write_calibration(files.shipped_path(heads_dir, this_key()), old)
    monkeypatch.setattr(run, "supported_formats", lambda lm: ["float32", "int4", "int8", "bfloat16"])
    assert build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), calibrate=False).tree.size == 2  # used
    monkeypatch.setattr(run, "supported_formats", lambda lm: ["float32", "w4a8", "int4", "int8", "bfloat16"])
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), calibrate=False)
    err = capsys.readouterr().err
    assert f"warning: ignoring calibration {path}: made before the w4a8 format" in err
    assert dec.config.calibration == "defaults: no calibration"
    old["choices"]["w4a8"] = old["choices"]["float32"]  # measured it (made by this version before the list)
    files.write_calibration(path, old)
    assert build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), calibrate=False).tree.size == 2


def test_concurrent_first_runs_calibrate_once(tiny_lm, heads_dir, monkeypatch):
    calls, real = [], run.calibrate

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(run, "calibrate", counting)
    results, errors = [], []

    def first_use():
        try:
            results.append(run.ensure_calibration(tiny_lm, heads_dir))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    saved = json.loads(files.calibration_path(heads_dir, this_key()).read_text())
    assert all(
        data["date"] == saved["date"] and data["choices"] == json.loads(json.dumps(saved["choices"]))
        for data, _ in results
    )
    leftovers = [p.name for p in files.calibration_path(heads_dir, this_key()).parent.iterdir()]
    assert not [n for n in leftovers if n.endswith(".tmp")]


def test_calibrate_end_to_end(tiny_lm, heads_dir):
    prompts = ["Write a short poem about the sea.", "Why is the sky blue?", "List three colours."]
    before = sorted(p.name for p in heads_dir.rglob("*"))
    data = run.calibrate(
        tiny_lm,
        heads_dir,
        prompts,
        budget_seconds=20,
        max_new_tokens=24,
        top_k=4,
        context=32,
        n_bins=4,
        qs=(1, 2, 4, 8),
        repeats=2,
    )
    assert sorted(p.name for p in heads_dir.rglob("*")) == before  # never into the heads (maybe the package)
    saved = json.loads(files.calibration_path(heads_dir, this_key()).read_text())
    assert saved == json.loads(json.dumps(data))
    assert (saved["weights"], saved["model"], saved["kind"]) == ("float32", "tiny-llama", "full")
    assert set(saved["measured"]["formats"]["float32"]["cost_ms"]) == {"1", "2", "4", "8"}
    choice = saved["choices"]["float32"]
    assert len(choice["tree"]) <= 6 and set(choice["thresholds"]) == {"hidden", "logits"}
    assert saved["checks"]["float32"]["prompts"] >= 1 and saved["checks"]["float32"]["weights"] == "float32"
    assert "chosen: float32" in run.format_summary(saved)
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    assert dec.tree.size == len(choice["tree"]) + 1 and dec.threshold == choice["threshold"]
    # prompt-lookup chains: a length for lookup alone, one merged into the chosen tree and one verified
    # instead of it; cerberus+lookup runs the faster of the last two, raced against chains alone
    # where its heads speculate (test_cerberus_lookup_is_raced_against_chains_alone)
    kinds = {"solo", "merged", "instead"}
    assert set(choice["lookup"]) - {"raced"} == kinds
    assert ("raced" in choice["lookup"]) == (choice["threshold"] > -math.inf)
    assert all(0 <= choice["lookup"][k]["max_len"] <= MAX_LEN for k in kinds)
    assert all(choice["lookup"][k]["tokens_per_s"] > 0 for k in kinds)
    choice["lookup"].pop("raced", None)  # the predicted choice, as before a race
    files.write_calibration(files.calibration_path(heads_dir, this_key()), saved)
    both = build_decoder(tiny_lm, "cerberus+lookup", heads=str(heads_dir))
    faster = max(("merged", "instead"), key=lambda k: choice["lookup"][k]["tokens_per_s"])
    assert both.drafter.max_len == choice["lookup"][faster]["max_len"] and both.drafter.merge == (faster == "merged")
    assert both.config.source["lookup"] == both.config.source["lookup_merge"] == "calibrated"
    assert "longest lookup chain: pld" in run.format_summary(saved)


@pytest.mark.parametrize(("with_heads", "winner"), [(40.0, "with_heads"), (30.5, "alone")])
def test_cerberus_lookup_is_raced_against_chains_alone(tiny_lm, heads_dir, monkeypatch, with_heads, winner):
    """A full calibration runs cerberus+lookup (the heads' tree next to the chains) and lookup chains
    alone on the same prompts; where the heads do not run RACE_MARGIN faster, cerberus+lookup runs the
    chains alone (its heads never draft), which says why and gives pld's tokens. Here the race really
    runs both and its rates are then set: 30 tokens/s alone."""
    real_choices, real_race = run._choices, run.race
    forced = lambda *a, **k: [c | {"threshold": math.inf} for c in real_choices(*a, **k)]  # noqa: E731
    monkeypatch.setattr(run, "_choices", forced)
    raced = []

    def measured(lm, decoders, *args):
        rate, used = real_race(lm, decoders, *args)
        if {name for name, _ in decoders} == {"alone", "with_heads"}:
            raced.append({name: d.method for name, d in decoders})
            rate = {"alone": 30.0, "with_heads": with_heads}
        return rate, used

    monkeypatch.setattr(run, "race", measured)
    prompts = ["Write a short poem about the sea.", "Why is the sky blue?", "List three colours."]
    kw = dict(max_new_tokens=24, top_k=4, context=32, n_bins=4, qs=(1, 2, 4), repeats=1)
    data = run.calibrate(tiny_lm, heads_dir, prompts, budget_seconds=20, **kw)
    assert raced == [{"alone": "pld", "with_heads": "cerberus+lookup"}]
    lookup = data["choices"]["float32"]["lookup"]
    assert lookup["raced"]["winner"] == winner and lookup["raced"]["prompts"] >= 1
    assert "raced cerberus+lookup" in run.format_summary(data)
    both = build_decoder(tiny_lm, "cerberus+lookup", heads=str(heads_dir))
    ids = both.encode("Repeat: red green blue, red green blue, red green blue.")
    out = both.generate(ids, SamplingConfig(max_new_tokens=24)).token_ids
    assert out == build_decoder(tiny_lm, "ar").generate(ids, SamplingConfig(max_new_tokens=24)).token_ids
    if winner == "alone":
        assert both.threshold == -math.inf and both.heads_calls == 0
        assert both.drafter.max_len == lookup["solo"]["max_len"]
        assert "heads never draft (calibrated: lookup chains alone ran faster)" in both.config.why()
        flagged = build_decoder(tiny_lm, "cerberus+lookup", heads=str(heads_dir), threshold=math.inf)
        assert flagged.threshold == math.inf and flagged.config.source["threshold"] == "flag"  # flags still win
    else:
        assert both.threshold == math.inf and both.heads_calls > 0


def test_the_check_races_the_leading_trees_and_keeps_the_fastest_measured(tiny_lm, heads_dir, monkeypatch):
    """Predictions of close candidates are noisy: the check runs the best three tree sizes and AR on
    the same prompts and keeps the fastest measured. Here the prediction is forced to speculate and
    the measurement made to favour the second candidate."""
    real_choices, real_check = run._choices, run.check_choices
    forced = lambda *a, **k: [c | {"threshold": math.inf} for c in real_choices(*a, **k)]  # noqa: E731
    monkeypatch.setattr(run, "_choices", forced)
    raced = []

    def measured(lm, heads, tried, prompts, seconds, max_new_tokens):
        out = real_check(lm, heads, tried, prompts, seconds, max_new_tokens)  # really run each of them
        raced.append([c["tree"] for c in tried])
        for c, rate in zip(out["candidates"], (30.0, 40.0, 20.0), strict=False):
            c |= {"tokens_per_s": rate, "ratio": rate / 25.0}
        return out

    monkeypatch.setattr(run, "check_choices", measured)
    prompts = ["Write a short poem about the sea.", "Why is the sky blue?", "List three colours."]
    kw = dict(max_new_tokens=24, top_k=4, context=32, n_bins=4, qs=(1, 2, 4, 8), repeats=2, write=False)
    data = run.calibrate(tiny_lm, heads_dir, prompts, budget_seconds=20, **kw)
    check = data["checks"]["float32"]
    assert len(raced) == 1 and len(raced[0]) == 3 and len({len(t) for t in raced[0]}) == 3
    assert [c["nodes"] for c in check["candidates"]] == [len(t) for t in raced[0]]
    assert data["choices"]["float32"]["tree"] == raced[0][1]  # the second predicted, the fastest measured
    assert (check["tokens_per_s"], check["fallback"]) == (40.0, False) and check["prompts"] >= 1
    assert "raced 3 trees" in run.format_summary(data)


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_the_format_is_the_fastest_the_checks_measured(tiny_lm, heads_dir, monkeypatch, faster):
    """A full calibration checks every format that speculates; what they measure, not the prediction,
    picks the format (unless the predicted one is within the margin). Each way round: one of them
    overrides whatever the prediction preferred."""
    real_choices, real_check = run._choices, run.check_choices
    forced = lambda *a, **k: [c | {"threshold": math.inf} for c in real_choices(*a, **k)]  # noqa: E731
    monkeypatch.setattr(run, "_choices", forced)

    def measured(lm, heads, tried, prompts, seconds, max_new_tokens):
        out = real_check(lm, heads, tried, prompts, seconds, max_new_tokens)
        rate = 100.0 if lm.weights == faster else 30.0
        for c in out["candidates"]:
            c |= {"tokens_per_s": rate, "ratio": rate / 25.0}
        return out

    monkeypatch.setattr(run, "check_choices", measured)
    prompts = ["Write a short poem about the sea.", "Why is the sky blue?", "List three colours."]
    kw = dict(max_new_tokens=24, top_k=4, context=32, n_bins=4, qs=(1, 2, 4), repeats=1, write=False)
    data = run.calibrate(tiny_lm, heads_dir, prompts, budget_seconds=20, formats=["float32", "bfloat16"], **kw)
    assert set(data["checks"]) == {"float32", "bfloat16"}
    assert data["weights"] == faster and f"chosen: {faster}" in run.format_summary(data)
    assert run.measured_rate(data["checks"][faster]) == 100.0


@pytest.mark.parametrize(
    ("rates", "kept"),
    [
        ((39.0, 40.0, 20.0), 0),  # the larger tree is 2.5% ahead: within the race's noise, the smaller stays
        ((30.0, 40.0, 20.0), 1),  # 33% ahead: the larger tree wins
        ((40.0, 40.0, 39.9), 0),  # equal: the smaller
    ],
)
def test_a_larger_tree_must_win_the_race_by_a_margin(rates, kept):
    tried = [{"tree": [[0]] * n} for n in (1, 2, 3)]
    measured = [{"tokens_per_s": r} for r in rates]
    assert run.race_winner(tried, measured) == kept
    assert run.race_winner(tried[::-1], measured[::-1]) == 2 - kept  # by size, not by the order raced


def test_lookup_methods_take_the_calibrated_chain_length(tiny_lm, heads_dir, monkeypatch):
    lookup = {"solo": {"max_len": 3, "tokens_per_s": 9.0}, "merged": {"max_len": 0, "tokens_per_s": 8.0}}
    files.write_calibration(files.calibration_path(heads_dir, this_key()), fake_calibration(this_key(), lookup=lookup))
    # pld has no heads: it reads the Cerberus heads' calibration (here: the test's heads as the shipped ones)
    monkeypatch.setattr(methods, "calibration_heads", lambda lm, method, heads: heads_dir)
    pld = build_decoder(tiny_lm, "pld")
    assert pld.drafter.max_len == 3 and "lookup chains of 3 tokens (calibrated)" in pld.config.why()
    both = build_decoder(tiny_lm, "cerberus+lookup", heads=str(heads_dir))
    assert both.drafter.max_len == 0 and "no lookup chains (calibrated)" in both.config.why()
    # next to the heads, the faster of merging the chains into the tree and verifying them instead of it
    lookup["instead"] = {"max_len": 4, "tokens_per_s": 8.5}
    files.write_calibration(files.calibration_path(heads_dir, this_key()), fake_calibration(this_key(), lookup=lookup))
    both = build_decoder(tiny_lm, "cerberus+lookup", heads=str(heads_dir))
    assert both.drafter.max_len == 4 and not both.drafter.merge
    assert "lookup chains of 4 tokens (calibrated), verified instead of the tree where one matches (calibrated)" in (
        both.config.why()
    )
    flagged = build_decoder(tiny_lm, "cerberus+lookup", heads=str(heads_dir), lookup={"merge": True})
    assert flagged.drafter.merge and flagged.drafter.max_len == 4 and flagged.config.source["lookup_merge"] == "flag"
    assert build_decoder(tiny_lm, "pld").drafter.max_len == 3  # pld reads "solo" whatever the heads' choice
    flag = build_decoder(tiny_lm, "pld", lookup={"max_len": 5})
    assert flag.drafter.max_len == 5 and flag.config.source["lookup"] == "flag"
    assert build_decoder(tiny_lm, "ar").config.lookup is None


def test_the_effective_configuration_follows_the_precedence(tiny_lm, heads_dir):
    ckpt = read_heads_config(heads_dir)
    ckpt.tree, ckpt.gate_threshold = [[0], [1]], 4.0
    eff = effective_config("cerberus", "float32", "flag", ckpt, None)
    assert (eff.tree, eff.threshold, eff.source["tree"]) == ([[0], [1]], 4.0, "checkpoint")
    assert eff.calibration == "defaults: no calibration"
    cal = (fake_calibration("k"), False)
    eff = effective_config("cerberus", "float32", "flag", ckpt, cal)
    assert (eff.tree, eff.threshold, eff.source["threshold"]) == ([[0], [1], [0, 0]], 1.25, "calibrated")
    eff = effective_config("cerberus", "float32", "flag", ckpt, cal, threshold=-1.0, tree=[[0]])
    assert (eff.tree, eff.threshold) == ([[0]], -1.0) and eff.source["tree"] == eff.source["threshold"] == "flag"
    eff = effective_config("cerberus", "int4", "flag", ckpt, cal)  # calibrated for float32 only
    assert eff.source["tree"] == "checkpoint" and "has no int4 choice" in eff.calibration
    medusa = effective_config("medusa", "float32", "flag", ckpt, cal)
    assert medusa.gate == "off" and medusa.threshold == math.inf and medusa.tree == [[0], [1], [0, 0]]
    assert effective_config("medusa", "float32", "flag", ckpt, cal, gate="logits").threshold == 1.25
    pruned = (fake_calibration("k", min_confidence=0.2), False)
    eff = effective_config("cerberus", "float32", "flag", ckpt, pruned)
    assert eff.min_confidence == 0.2 and "confidence >= 0.2 (calibrated)" in eff.why()
    assert effective_config("cerberus", "float32", "flag", ckpt, pruned, min_confidence=0.0).min_confidence == 0
    assert effective_config("medusa", "float32", "flag", ckpt, pruned).min_confidence == 0  # the baseline: whole trees
    assert effective_config("medusa", "float32", "flag", ckpt, pruned, min_confidence=0.3).min_confidence == 0.3
    ar = effective_config("ar", "int4", "auto: default for the device, no calibration", None, cal)
    assert ar.tree is None and "weights int4 (auto: default" in ar.why()
    assert json.loads(json.dumps(medusa.to_json()))["threshold"] == "inf"


def test_auto_weights_take_the_calibrated_fastest_format(lm, lm_int4):
    lm_heads = default_heads_dir(lm, "cerberus")
    heads, key = str(lm_heads), this_key()
    data = fake_calibration(key) | {"weights": "float32"}
    files.write_calibration(files.calibration_path(lm_heads, key), data)
    chosen = choose_weights(lm, "auto", "cerberus", heads)
    assert chosen.weights == "float32" and chosen.weights_why == "auto: calibrated fastest on this machine"
    assert choose_weights(lm_int4, "int4", "cerberus", heads).weights == "int4"  # a flag wins
    assert choose_weights(lm, "auto", "cerberus", heads, calibrate=False).weights == "float32"  # found, not made


def test_the_server_reports_its_configuration(tiny_lm, heads_dir):
    from fastapi.testclient import TestClient

    from cerberus_decoding.server import create_app

    files.write_calibration(files.calibration_path(heads_dir, this_key()), fake_calibration(this_key()))
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))  # what `serve` does before it listens
    with TestClient(create_app(dec, "tiny")) as client:
        config = client.get("/health").json()["config"]
    assert config["source"]["tree"] == "calibrated" and config["tree"] == [[0], [1], [0, 0]]
    assert config["why"] == dec.config.why() and "calibration made on this machine" in config["why"]


def test_step_costs_are_timed_after_the_same_size_ran_for_a_while(tiny_lm, monkeypatch):
    """Decoding repeats the same few forward sizes back to back, and a CPU takes tens of milliseconds
    to settle after other work (one-token steps ran 6-8 ms for ~35 ms after a 64-token forward or a
    pause, then 3.3, on an Intel VM): in each round of ``measure_costs`` a size runs for
    ``SETTLE_S`` seconds before its last call, the timed one, so the cost curve is the steady state's."""
    monkeypatch.setattr(measure, "SETTLE_S", 0.02)
    calls = []  # (size, start time) of every forward
    forward = tiny_lm.runtime.forward

    def counted(cache, ids, *args, **kwargs):
        calls.append((len(ids), time.perf_counter()))
        return forward(cache, ids, *args, **kwargs)

    monkeypatch.setattr(tiny_lm.runtime, "forward", counted)
    costs = measure.measure_costs(tiny_lm, qs=(1, 2, 8), context=16, repeats=2)
    assert set(costs) == {1, 2, 8} and all(ms > 0 for ms in costs.values())
    assert [q for q, _ in calls[:3]] == [16, 1, 8]  # the cached prefix, then one warm-up call at the extremes
    runs = [list(group) for _, group in itertools.groupby(calls[3:], key=lambda call: call[0])]
    assert [same[0][0] for same in runs] == [1, 2, 8] * 2  # the sizes in turn, each round
    for same in runs:  # the timed (last) call starts SETTLE_S after the size's first call of the round
        assert len(same) >= 3 and same[-1][1] - same[0][1] >= 0.02
