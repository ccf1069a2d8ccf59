"""Calibration: the chosen tree and threshold are the optimum of the stated objective, the file
round-trips, and build_decoder uses it only for the device and dtype it was measured on."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from cerberus_decoding import calibrate as cal
from cerberus_decoding.heads import new_heads, save_heads
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.tree import DEFAULT_TREE, expected_length

COSTS = {1: 10.0, 2: 10.5, 4: 11.0, 8: 14.0, 16: 30.0}  # ms, a CPU-like curve: flat, then linear
OVERHEADS = {"step": 0.5, "spec": 1.0}


def all_trees(depth: int, k: int):
    """Every non-empty prefix-closed set of rank paths up to ``depth`` with ranks < ``k``."""
    universe = [p for d in range(1, depth + 1) for p in itertools.product(range(k), repeat=d)]
    for bits in range(1, 2 ** len(universe)):
        nodes = {p for i, p in enumerate(universe) if bits >> i & 1}
        if all(len(p) == 1 or p[:-1] in nodes for p in nodes):
            yield [list(p) for p in nodes]


def tree_rate(choices, accuracy) -> float:
    _, spec_ms = cal.step_costs(COSTS, OVERHEADS, len(choices))
    return expected_length(choices, accuracy) / spec_ms


@pytest.mark.parametrize("seed", range(4))
def test_chosen_tree_maximises_expected_tokens_per_second(seed):
    rng = np.random.default_rng(seed)
    accuracy = [sorted(rng.uniform(0, 0.9, 3), reverse=True) for _ in range(2)]  # 2 heads, top-3
    tree, rows = cal.choose_tree(accuracy, COSTS, OVERHEADS, range(1, 16))
    best = max(tree_rate(t, accuracy) for t in all_trees(2, 3))  # 4095 candidate sets, every size
    assert tree_rate(tree, accuracy) == pytest.approx(best, rel=1e-12)
    assert [r["nodes"] for r in rows] == list(range(1, 13))  # stops at the 12 nodes the table allows


def test_expensive_verification_picks_a_small_tree():
    accuracy = [[0.6, 0.2, 0.1], [0.5, 0.1, 0.05]]
    steep = {1: 10.0, 2: 20.0, 4: 40.0, 16: 160.0}  # every verified token costs a full step
    tree, _ = cal.choose_tree(accuracy, steep, {"step": 0.0, "spec": 0.0}, range(1, 15))
    assert tree == [[0]]
    flat = {1: 10.0, 16: 10.0}  # free verification: the biggest tree wins
    tree, _ = cal.choose_tree(accuracy, flat, {"step": 0.0, "spec": 0.0}, range(1, 12))
    assert len(tree) == 11


def test_monotone_costs_remove_dips_only():
    assert cal.monotone_costs(COSTS) == COSTS
    fitted = cal.monotone_costs({1: 10.0, 2: 14.0, 4: 12.0, 8: 20.0, 16: 19.0, 32: 30.0})
    assert fitted == pytest.approx({1: 10.0, 2: 13.0, 4: 13.0, 8: 19.5, 16: 19.5, 32: 30.0})


def brute_threshold_rate(values, accepted, spec_ms, ar_ms) -> float:
    """Best tokens/s over every threshold that splits the data differently (and some that don't)."""
    points = np.sort(np.unique(values))
    grid = [-math.inf, math.inf, *points, *((points[:-1] + points[1:]) / 2), *(points + 1e-9)]
    return max(cal.gated_rate(values, accepted, spec_ms, ar_ms, th) for th in grid)


@pytest.mark.parametrize("seed", range(6))
def test_chosen_threshold_is_the_best_over_all_thresholds(seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 5, 40)
    accepted = rng.integers(1, 5, 40).astype(float)  # not monotone in entropy on purpose
    spec_ms, ar_ms = 2.5, 1.0
    th, rate = cal.choose_threshold(values, accepted, spec_ms, ar_ms, values)
    assert rate == pytest.approx(cal.gated_rate(values, accepted, spec_ms, ar_ms, th))
    assert rate == pytest.approx(brute_threshold_rate(values, accepted, spec_ms, ar_ms), rel=1e-12)


def test_threshold_extremes_and_the_monotone_case():
    values = np.linspace(0, 4, 41)
    accepted = np.where(values < 1.5, 4.0, 1.0)  # confident steps accept a lot, the others nothing
    th, _ = cal.choose_threshold(values, accepted, 2.0, 1.0, values)
    assert 1.4 < th <= 1.5
    th, _ = cal.choose_threshold(values, np.full(41, 1.5), 2.0, 1.0, values)  # never pays
    assert th == -math.inf
    th, _ = cal.choose_threshold(values, np.full(41, 3.0), 2.0, 1.0, values)  # always pays
    assert th == math.inf


def test_entropy_bins_report_where_speculation_pays():
    values = np.linspace(0, 4, 40)
    accepted = np.where(values < 2, 3.0, 1.0)
    bins = cal.entropy_bins(values, accepted, 2.0, 1.0, 4)
    assert [b["count"] for b in bins] == [10, 10, 10, 10]
    assert [b["pays"] for b in bins] == [True, True, False, False]


def test_accuracy_table_is_conditional_on_the_top_path():
    ranks = np.array([[0, 0], [0, 1], [0, 0], [1, 0], [1, 0], [3, 1], [0, -1]])  # top_k 3: 3 = missed
    table = cal.accuracy_table(ranks, top_k=3, prior=0.0)
    assert table[0] == pytest.approx([4 / 7, 2 / 7, 0.0])
    # head 1 counted only where head 0's best guess was right (rows 0-2; row 6 has no head-1 token)
    assert table[1] == pytest.approx([2 / 3, 1 / 3, 0.0])
    shrunk = cal.accuracy_table(ranks, top_k=3, prior=3.0)[1]
    marginal = [4 / 6, 2 / 6, 0.0]
    assert shrunk == pytest.approx([(c + 3 * m) / 6 for c, m in zip([2, 1, 0], marginal, strict=True)])


def test_accepted_lengths_follow_the_tree():
    tree = [[0], [1], [0, 0]]
    ranks = np.array([[0, 0, 5], [1, 0, 0], [0, 1, 0], [3, 0, 0], [0, -1, 0]])
    assert cal.accepted_lengths(ranks, tree).tolist() == [3, 2, 2, 1, 2]


def test_observe_ranks_match_the_heads_logits(tiny_lm):
    heads = new_heads(tiny_lm, "cerberus", num_heads=2)
    prompt, answer = [5, 17, 99, 400], [7, 8, 9, 10, 11, 12]
    obs = cal.observe(tiny_lm, heads, prompt, answer, top_k=50000)
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
    assert len(obs["hidden"]) == len(obs["logits"]) == len(answer)


def _fake_calibration(tiny_lm, **kw) -> dict:
    data = {
        "version": 1,
        "model": tiny_lm.name,
        "device": "cpu",
        "dtype": "float32",
        "hardware": "test",
        "tree": [[0], [1], [0, 0]],
        "gate": "logits",
        "threshold": 1.25,
        "thresholds": {"logits": 1.25, "hidden": 0.5},
        "predicted": {},
        "measured": {},
    }
    data.update(kw)
    return data


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Calibrations go to $CERBERUS_CACHE: a fresh one per test, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CERBERUS_CACHE", str(path))
    return path


@pytest.fixture
def heads_dir(tiny_lm, tmp_path):
    save_heads(new_heads(tiny_lm, "cerberus"), tmp_path)
    return tmp_path


def test_build_decoder_uses_a_matching_calibration(tiny_lm, heads_dir, capsys):
    cal.write_calibration(heads_dir, _fake_calibration(tiny_lm))
    assert cal.read_calibration(heads_dir, "cpu-float32")["tree"] == [[0], [1], [0, 0]]
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    err = capsys.readouterr().err
    assert "using calibration from" in err and "tree of 3 nodes, threshold 1.25" in err
    assert dec.tree.size == 4 and dec.gate == "logits" and dec.threshold == 1.25
    # the other entropy has its own scale, hence its own threshold
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), gate="hidden")
    assert dec.gate == "hidden" and dec.threshold == 0.5
    # explicit options still win
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir), threshold=3.0, tree=[[0], [1], [2], [3]])
    assert dec.tree.size == 5 and dec.threshold == 3.0
    assert build_decoder(tiny_lm, "cerberus-nogate", heads=str(heads_dir)).threshold == math.inf


@pytest.mark.parametrize("other", [{"device": "cuda"}, {"dtype": "bfloat16"}])
def test_a_calibration_for_other_hardware_is_ignored(tiny_lm, heads_dir, capsys, other):
    cal.write_calibration(heads_dir, _fake_calibration(tiny_lm, **other))
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    err = capsys.readouterr().err
    assert "no calibration for cpu-float32" in err
    assert dec.tree.size == len(DEFAULT_TREE) + 1
    assert dec.threshold == math.inf  # the heads' own default


def test_a_corrupt_calibration_is_ignored(tiny_lm, heads_dir, capsys):
    (heads_dir / cal.CALIBRATION_FILE).write_text("{not json")
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    assert "ignoring" in capsys.readouterr().err
    assert dec.tree.size == len(DEFAULT_TREE) + 1


def test_calibrate_end_to_end(tiny_lm, heads_dir, capsys):
    prompts = ["Write a short poem about the sea.", "Why is the sky blue?"]
    data = cal.calibrate(
        tiny_lm,
        heads_dir,
        prompts,
        budget_seconds=30,
        max_new_tokens=24,
        top_k=4,
        qs=(1, 2, 4, 8),
        context=32,
        repeats=2,
        n_bins=4,
    )
    assert not (heads_dir / cal.CALIBRATION_FILE).exists()  # never next to the heads (maybe the package)
    saved = json.loads(cal.calibration_path(heads_dir, "cpu-float32").read_text())
    assert saved == json.loads(json.dumps(data))
    assert (saved["device"], saved["dtype"], saved["model"]) == ("cpu", "float32", "tiny-llama")
    assert set(saved["measured"]["cost_ms"]) == set(saved["measured"]["cost_fit_ms"]) == {"1", "2", "4", "8"}
    assert len(saved["tree"]) <= 7 and saved["measured"]["prompts"] >= 1
    assert set(saved["thresholds"]) == {"hidden", "logits"}
    assert "gate logits (chosen)" in cal.format_summary(saved)
    dec = build_decoder(tiny_lm, "cerberus", heads=str(heads_dir))
    assert dec.tree.size == len(saved["tree"]) + 1 and dec.threshold == saved["threshold"]
    assert "using calibration" in capsys.readouterr().err
