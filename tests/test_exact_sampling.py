"""Exact speculative sampling: the tokens it produces are distributed exactly as plain sampling.

No sampling noise: a tiny trigram "model" over a 6-token vocabulary and deterministic top-k
drafters, and every random choice of ``verify`` (``sampling.coin`` / ``sampling.draw``) replaced by
an enumerator that runs it once per outcome and multiplies the branch probabilities. That gives
the exact joint distribution of the first 3 tokens under speculative decoding (the engine's loop:
the pending root, verify's accepted path, verify's next token as the next root), compared with
plain auto-regressive sampling by total variation. Exact acceptance must match to float precision;
typical acceptance and two plausible wrong rules must not.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from contextlib import contextmanager
from functools import cache

import pytest
import torch

from cerberus_decoding import sampling
from cerberus_decoding import verify as verify_module
from cerberus_decoding.lookup import union_tree
from cerberus_decoding.sampling import probabilities
from cerberus_decoding.tree import build_tree, tree_from_parents
from cerberus_decoding.verify import verify

V = 6  # vocabulary
PROMPT = (0, 1)  # the context's last two tokens (a trigram model reads no more)
N_TOKENS = 3  # joint distribution of the first 3 sampled tokens
HEADS = 3  # draft depth

_gen = torch.Generator().manual_seed(0)
LOGITS = 1.5 * torch.randn(V, V, V, generator=_gen)  # [V, V, V]: logits of the next token after (a, b)
# "trained" heads guess the greedy continuation of a slightly wrong model; "random" heads guess anything
TRAINED_VIEW = LOGITS + 0.8 * torch.randn(V, V, V, generator=_gen)  # [V, V, V]
RANDOM_HEADS = torch.randn(HEADS, V, V, V, generator=_gen)  # [K, V, V, V]: head d's scores after (a, root)

SHAPES = {
    "chain": [[0], [0, 0], [0, 0, 0]],
    "tree": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]],
    "wide": [[0], [1], [2], [3]],
}


def head_topk(heads: str, a: int, root: int, k: int) -> torch.Tensor:
    """-> [K, k] token ids: what K draft heads propose after context (..., a) and root (deterministic)."""
    if heads == "random":
        return RANDOM_HEADS[:, a, root].topk(k, dim=-1).indices
    rows, (x, y) = [], (a, root)
    for _ in range(HEADS):  # each head: top-k of the guessed model at its guessed greedy context
        scores = TRAINED_VIEW[x, y]
        rows.append(scores.topk(k).indices)
        x, y = y, int(scores.argmax())
    return torch.stack(rows)


def drafter(shape: str, heads: str):
    """(a, root) -> (tree, tokens [N+1]): a heads' tree, one with duplicate siblings, or a merged
    prompt-lookup tree."""
    if shape in SHAPES:
        tree = build_tree(SHAPES[shape])

        def draft(a, root):
            return tree, tree.candidates(torch.tensor([root]), head_topk(heads, a, root, tree.top_k))

        return draft
    if shape == "duplicates":  # root -> [t0, t0, t1], first t0 -> [u0, u0]: duplicates among siblings
        tree = tree_from_parents([0, 0, 0, 1, 1])

        def draft(a, root):
            top = head_topk(heads, a, root, 2)
            t0, t1, u0 = int(top[0, 0]), int(top[0, 1]), int(top[1, 0])
            return tree, torch.tensor([root, t0, t0, t1, u0, u0])

        return draft
    if shape == "lookup":  # a lookup chain merged into the heads' tree (shares a prefix or branches off)
        heads_tree = build_tree(SHAPES["tree"])

        def draft(a, root):
            tokens = heads_tree.candidates(torch.tensor([root]), head_topk(heads, a, root, heads_tree.top_k))
            chain = [(root + a) % V, (root * 2 + 1) % V, a]
            parents, merged, _ = union_tree(heads_tree.parent[1:].tolist(), tokens.tolist(), chain)
            return tree_from_parents(parents), torch.tensor(merged)

        return draft
    raise ValueError(shape)


def lm_head(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [R, 1] = the index a * V + b of each row's last two tokens -> logits [R, V]."""
    return LOGITS.view(V * V, V)[hidden[:, 0].long()]


def hidden_states(tree, tokens: torch.Tensor, a: int) -> torch.Tensor:
    """[N+1, 1]: each node's last two tokens (its parent's and its own), as lm_head reads them."""
    prev = tokens[tree.parent].clone()
    prev[0] = a
    return (prev * V + tokens).float()[:, None]


# ---- exact enumeration of the random choices ---------------------------------------------------


class Enumerator:
    """Stands in for sampling.coin / sampling.draw: replays the ``forced`` choices, then takes the
    first option of every new choice, recording each choice's options and probabilities."""

    def __init__(self, forced: list[int]):
        self.forced, self.trace = forced, []  # trace: (options [(value, probability)], chosen index)

    def _choose(self, options):
        i = len(self.trace)
        k = self.forced[i] if i < len(self.forced) else 0
        self.trace.append((options, k))
        return options[k][0]

    def coin(self, probability: float, generator=None) -> bool:
        assert 0 < probability <= 1 + 1e-6, probability  # the rule never tosses a coin it cannot win
        return self._choose([(v, q) for v, q in ((True, probability), (False, 1 - probability)) if q > 0])

    def draw(self, probs: torch.Tensor, generator=None) -> torch.Tensor:
        w = probs.double() / probs.double().sum()
        assert w.sum() > 0
        return self._choose([(torch.tensor([t]), float(w[t])) for t in w.nonzero().flatten().tolist()])


def enumerate_outcomes(run) -> list[tuple[object, float]]:
    """Every (result, probability) of ``run()``, one run per combination of random choices."""
    out, forced = [], []
    while True:
        e = Enumerator(forced)
        saved = sampling.coin, sampling.draw
        sampling.coin, sampling.draw = e.coin, e.draw
        try:
            result = run()
        finally:
            sampling.coin, sampling.draw = saved
        out.append((result, math.prod(options[k][1] for options, k in e.trace)))
        choices = [k for _, k in e.trace]
        sizes = [len(options) for options, _ in e.trace]
        while choices and choices[-1] + 1 >= sizes[-1]:  # odometer: the next untried combination
            choices.pop()
            sizes.pop()
        if not choices:
            return out
        forced = choices[:-1] + [choices[-1] + 1]


# ---- the distributions ---------------------------------------------------------------------------


def plain_distribution(temperature: float, top_p: float) -> dict[tuple, float]:
    """Auto-regressive sampling: p(t1 | prompt) p(t2 | ., t1) p(t3 | t1, t2)."""
    p = probabilities(LOGITS, temperature, top_p).double()  # [V, V, V]
    out = {}
    for seq in itertools.product(range(V), repeat=N_TOKENS):
        ctx, prob = list(PROMPT), 1.0
        for t in seq:
            prob *= float(p[ctx[-2], ctx[-1], t])
            ctx.append(t)
        if prob > 0:
            out[seq] = prob
    return out


def speculative_distribution(draft, temperature: float, top_p: float, acceptance: str) -> dict[tuple, float]:
    """The engine's loop, enumerated: root drawn from the prompt's distribution, then per step
    the drafted tree verified, its accepted tokens produced and verify's next token the new root."""

    @cache
    def after(a: int, b: int, root: int, need: int) -> dict[tuple, float]:
        """Distribution of the next ``need`` tokens, ``root`` (pending) first, after context (..., a, b)."""
        if need == 1:
            return {(root,): 1.0}
        tree, tokens = draft(b, root)
        hidden = hidden_states(tree, tokens, b)

        def step():
            path, _, nxt = verify(tree, tokens, hidden, lm_head, temperature, top_p, acceptance)
            return tuple(tokens[path].tolist()), int(nxt)

        out = defaultdict(float)
        for (produced, nxt), prob in enumerate_outcomes(step):
            if len(produced) >= need:
                out[produced[:need]] += prob
                continue
            last2 = ((a, b) + produced)[-2:]
            for rest, q in after(*last2, nxt, need - len(produced)).items():
                out[produced + rest] += prob * q
        return dict(out)

    first = probabilities(LOGITS[PROMPT], temperature, top_p).double()  # [V]
    out = defaultdict(float)
    for root in first.nonzero().flatten().tolist():
        for seq, q in after(*PROMPT, root, N_TOKENS).items():
            out[seq] += float(first[root]) * q
    return dict(out)


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in p.keys() | q.keys())


# ---- wrong rules: what the test must catch ----------------------------------------------------------


def accept_unnormalized(tree, tokens, logits, temperature, top_p, generator):
    """Wrong: accepts child x with p(x), not p(x) / (mass not yet rejected)."""
    node, accepted = 0, []
    while tree.children[node]:
        p = probabilities(logits[node], temperature, top_p)
        residual = p.clone()
        for child in tree.children[node]:
            x = int(tokens[child])
            if residual[x] > 0 and sampling.coin(float(p[x]), generator):
                break
            residual[x] = 0.0
        else:
            return torch.tensor(accepted, dtype=torch.long), residual
        accepted.append(child)
        node = child
    return torch.tensor(accepted, dtype=torch.long), None


ACCEPT_EXACT = verify_module.accept_exact


def accept_without_residual(tree, tokens, logits, temperature, top_p, generator):
    """Wrong: the right acceptance, but the next token drawn from the plain distribution."""
    accepted, _ = ACCEPT_EXACT(tree, tokens, logits, temperature, top_p, generator)
    return accepted, None


@contextmanager
def rule(name: str):
    """-> the ``acceptance`` to pass to verify, with a wrong rule patched in as 'exact' if asked."""
    wrong = {"unnormalized": accept_unnormalized, "no-residual": accept_without_residual}.get(name)
    if wrong is None:
        yield name
        return
    original = verify_module.accept_exact
    verify_module.accept_exact = wrong
    try:
        yield "exact"
    finally:
        verify_module.accept_exact = original


def tv_for(shape: str, heads: str, temperature: float, top_p: float, acceptance: str) -> float:
    with rule(acceptance) as name:
        spec = speculative_distribution(drafter(shape, heads), temperature, top_p, name)
    assert abs(sum(spec.values()) - 1) < 1e-5
    return total_variation(spec, plain_distribution(temperature, top_p))


# ---- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", ["trained", "random"])
@pytest.mark.parametrize("shape", ["chain", "tree", "wide", "duplicates", "lookup"])
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.8)])
def test_exact_acceptance_samples_the_model_distribution(shape, heads, temperature, top_p):
    assert tv_for(shape, heads, temperature, top_p, "exact") < 1e-5


@pytest.mark.parametrize(
    ("acceptance", "shape"),
    [
        ("typical", "tree"),
        ("typical", "chain"),
        ("unnormalized", "tree"),
        ("unnormalized", "wide"),
        ("unnormalized", "duplicates"),
        ("no-residual", "tree"),
        ("no-residual", "chain"),
        ("no-residual", "lookup"),
    ],
)
@pytest.mark.parametrize("heads", ["trained", "random"])
def test_lossy_and_wrong_rules_are_caught(acceptance, shape, heads):
    """The same measurement tells the exact rule from near misses: typical acceptance, acceptance
    without renormalising, and a next token that ignores the rejections."""
    assert tv_for(shape, heads, 1.0, 1.0, acceptance) > 0.02


def test_duplicate_siblings_and_dropped_tokens_never_divide_by_zero():
    """One token holds all the mass (top-p): duplicates of it and tokens outside the nucleus."""
    tree = tree_from_parents([0, 0, 0, 0])
    logits = torch.full((5, V), -10.0)
    logits[:, 3] = 10.0  # top_p 0.5 keeps token 3 alone
    tokens = torch.tensor([0, 5, 5, 3, 3])  # two tokens outside the nucleus, then 3 twice

    def step():
        accepted, residual = verify_module.accept_exact(tree, tokens, logits, 1.0, 0.5, None)
        return tuple(accepted.tolist()), residual

    outcomes = enumerate_outcomes(step)
    assert [(r[0], p) for r, p in outcomes] == [((3,), 1.0)]  # token 3 (node 3) accepted for sure

    tokens = torch.tensor([0, 3, 3, 1, 1])  # p(3) = 1/2 over {3, 1}; then duplicates
    logits = torch.full((5, V), float("-inf"))
    logits[:, 3] = logits[:, 1] = 0.0
    got = defaultdict(float)
    for (accepted, residual), prob in enumerate_outcomes(
        lambda: verify_module.accept_exact(tree, tokens, logits, 1.0, 1.0, None)
    ):
        assert residual is None or residual.sum() > 0
        got[tuple(accepted.tolist())] += prob
    assert got == pytest.approx({(1,): 0.5, (3,): 0.5})  # the second 3 is never tried; 1 surely accepted
