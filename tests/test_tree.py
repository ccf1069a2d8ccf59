"""Tree buffers (property tests on random trees) and the best-tree construction."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cerberus_decoding import sampling
from cerberus_decoding.models import CerberusError
from cerberus_decoding.tree import DEFAULT_TREE, LIKELY_LEAF, SMALL_TREE, best_tree, build_tree, expected_length, prune
from cerberus_decoding.verify import verify_greedy


@st.composite
def trees(draw):
    """Random valid trees: every node's parent path is in the tree."""
    nodes = set()
    for _ in range(draw(st.integers(1, 24))):
        parent = draw(st.sampled_from([()] + sorted(nodes)))
        if len(parent) < 5:
            nodes.add(parent + (draw(st.integers(0, 5)),))
    return [list(n) for n in nodes]


@given(trees())
@settings(max_examples=150, deadline=None)
def test_tree_buffers(choices):
    tree = build_tree(choices)
    nodes = [()] + [tuple(c) for c in tree.choices]
    assert sorted(nodes[1:]) == sorted(tuple(c) for c in choices)
    for i, node in enumerate(nodes):
        ancestors = {j for j, other in enumerate(nodes) if node[: len(other)] == other}
        assert set(tree.mask[i].nonzero().flatten().tolist()) == ancestors  # itself, ancestors, root
        assert int(tree.depth[i]) == len(node)
        has_child = any(len(o) == len(node) + 1 and o[: len(node)] == node for o in nodes)
        assert (i in tree.internal.tolist()) == has_child
        if i:
            assert nodes[int(tree.parent[i])] == node[:-1]
            assert int(tree.head[i - 1]) == len(node) - 1 and int(tree.rank[i - 1]) == node[-1]
    # retrieved paths reproduce exactly the leaves, each path listed root-to-leaf
    n = tree.size
    leaves = {nd for nd in nodes[1:] if not any(o[: len(nd)] == nd and len(o) > len(nd) for o in nodes)}
    got = set()
    for row in tree.paths.tolist():
        path = [nodes[j] for j in row if j != n]
        assert all(path[d] == path[-1][: d + 1] for d in range(len(path)))
        got.add(path[-1])
    assert got == leaves


@given(trees(), st.integers(0, 10_000), st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9, 1.0]))
@settings(max_examples=150, deadline=None)
def test_pruning_keeps_exactly_the_confident_nodes_as_a_tree_whose_tokens_line_up(choices, seed, threshold):
    """A node's confidence is the product of the heads' probabilities along its path; pruning keeps the
    nodes at or above the threshold (the rest: whole subtrees), as a tree of their own whose buffers
    are those of the same choices built from scratch, their tokens in its order."""
    tree = build_tree(choices)
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(tree.num_heads, tree.top_k, generator=g).sort(-1, descending=True).values  # [K, k]
    tokens = torch.randperm(1000, generator=g)[: tree.size]  # [N+1], distinct
    confidence = tree.confidence(probs)
    for i, c in enumerate([()] + tree.choices):
        expected = torch.tensor([float(probs[d, r]) for d, r in enumerate(c)]).prod()
        assert torch.allclose(confidence[i], expected), c
    pruned = prune(tree, tokens, confidence, threshold)
    kept = [c for i, c in enumerate(tree.choices, start=1) if confidence[i] >= threshold or threshold == 0]
    if not kept:
        assert pruned is None
        return
    small, small_tokens = pruned
    assert small.choices == [tuple(c) for c in build_tree(kept).choices] == sorted(kept, key=lambda c: (len(c), c))
    rebuilt = build_tree(kept)
    for name in ("mask", "depth", "parent", "head", "rank", "paths", "internal"):
        assert torch.equal(getattr(small, name), getattr(rebuilt, name)), name
    token_of = {c: int(tokens[i]) for i, c in enumerate([()] + tree.choices)}
    assert small_tokens.tolist() == [token_of[c] for c in [()] + small.choices]


def test_pruning_keeps_a_node_at_the_threshold_and_never_one_without_its_parent():
    tree = build_tree([[0], [1], [0, 0], [1, 0]])  # nodes: [0], [1], [0, 0], [1, 0]
    tokens = torch.tensor([9, 1, 2, 3, 4])
    at = prune(tree, tokens, tree.confidence(torch.tensor([[0.5, 0.25], [0.5, 0.5]])), 0.25)  # exact products
    assert at[0].choices == [(0,), (1,), (0, 0)] and at[1].tolist() == [9, 1, 2, 3]  # [1, 0]: 0.125
    # a confidence the heads' products never give (a child surer than its parent): the child goes too
    orphan = prune(tree, tokens, torch.tensor([1.0, 0.9, 0.1, 0.8, 0.8]), 0.5)
    assert orphan[0].choices == [(0,), (0, 0)] and orphan[1].tolist() == [9, 1, 3]
    assert prune(tree, tokens, torch.tensor([1.0, 0.1, 0.1, 0.1, 0.1]), 0.5) is None  # an AR step
    assert prune(tree, tokens, torch.zeros(5), 0.0) == (tree, tokens)  # 0: the whole tree, always


def test_a_pruned_tree_of_likely_leaves_computes_every_lm_head_row_up_front_and_verifies_the_same():
    """Pruned at LIKELY_LEAF or more, every leaf gets its LM-head row in the one call (no second call
    when the accepted path ends at a leaf); below it only the internal nodes do. Same path, same token."""
    tree = build_tree([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [1]])  # chain: nodes 1, 3, 4, 5; node 2: [1]
    assert tree.size > SMALL_TREE
    tokens = torch.tensor([5, 1, 6, 2, 3, 4])
    confidence = torch.tensor([1.0, 0.9, 0.8, 0.6, 0.5, 0.3])  # every node kept at both thresholds
    likely, likely_tokens = prune(tree, tokens, confidence, LIKELY_LEAF)
    unlikely, unlikely_tokens = prune(tree, tokens, confidence, LIKELY_LEAF / 2)
    assert likely.lm_head_rows.tolist() == list(range(tree.size))
    assert unlikely.lm_head_rows.tolist() == tree.internal.tolist() == [0, 1, 3, 4]
    assert likely_tokens.tolist() == unlikely_tokens.tolist() == tokens.tolist()
    for wanted, path in (([1, 2, 0, 3, 4, 7], [0, 1, 3, 4, 5]), ([1, 2, 0, 9, 0, 0], [0, 1, 3])):
        hidden = torch.nn.functional.one_hot(torch.tensor(wanted), 10).float()  # row i: node i's next token
        results = []
        for pruned in (likely, unlikely):
            calls = []

            def lm_head_greedy(h, calls=calls):  # one-hot rows: the logits are the hidden states
                calls.append(h.shape[0])
                return h, h.argmax(-1)

            got_path, logits, next_token = verify_greedy(pruned, tokens, hidden, lm_head_greedy)
            results.append((got_path, logits.tolist(), next_token.tolist(), len(calls)))
        (p1, l1, n1, calls_likely), (p2, l2, n2, calls_unlikely) = results
        assert p1 == p2 == path and l1 == l2 and n1 == n2 == [wanted[path[-1]]]
        assert calls_likely == 1 and calls_unlikely == (2 if path[-1] == 5 else 1)  # the leaf's second call


@given(trees(), st.integers(0, 10_000))
@settings(max_examples=100, deadline=None)
def test_greedy_acceptance_is_the_longest_agreeing_path(choices, seed):
    tree = build_tree(choices)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 3, (tree.size,), generator=g)
    logits = torch.randn(tree.size, 3, generator=g)
    identity = sampling.with_greedy(lambda rows: rows)  # the logits as the states
    path, last_logits, next_token = verify_greedy(tree, tokens, logits, identity)
    assert int(path[0]) == 0
    accepted = path[1:]
    pred = logits.argmax(-1)
    assert torch.equal(last_logits, logits[path[-1]]) and int(next_token) == int(pred[path[-1]])
    nodes = [()] + [tuple(c) for c in tree.choices]
    index = {nd: i for i, nd in enumerate(nodes)}

    def ok(i):  # node agrees with the base model all the way from the root
        nd = nodes[i]
        return all(tokens[index[nd[: d + 1]]] == pred[index[nd[:d]]] for d in range(len(nd)))

    best = max((len(nodes[i]) for i in range(1, tree.size) if ok(i)), default=0)
    assert len(accepted) == best
    last = accepted[-1] if best else 0
    assert ok(last)
    assert [nodes[int(a)] for a in accepted] == [nodes[last][: d + 1] for d in range(best)]


def test_greedy_token_is_the_first_largest_logit_in_bfloat16():
    """The greedy token (taken in float32 for speed) is bfloat16's own argmax, ties to the first."""
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(64, 49152, generator=g)).to(torch.bfloat16)  # coarse: many ties
    logits[0, 7] = logits[0, 9000] = 100.0  # an exact tie for the largest
    assert torch.equal(sampling.greedy(logits), logits.argmax(-1))
    assert int(sampling.greedy(logits[0])) == 7
    assert sampling.sample(logits[0], 0.0, 1.0, None).tolist() == [7]


def test_bad_trees_are_rejected():
    with pytest.raises(CerberusError, match="parent"):
        build_tree([[0, 1]])
    with pytest.raises(CerberusError):
        build_tree([])


def test_best_tree_is_optimal_for_small_cases():
    accuracy = [[0.6, 0.2, 0.1], [0.5, 0.15], [0.4]]
    all_nodes = [c for d in range(1, 4) for c in itertools.product(*[range(len(accuracy[i])) for i in range(d)])]
    for n in range(1, 6):
        chosen = best_tree(accuracy, n)
        assert len(chosen) == n
        build_tree(chosen)  # valid
        brute = max(
            expected_length(list(map(list, subset)), accuracy)
            for subset in itertools.combinations(all_nodes, n)
            if all(len(c) == 1 or c[:-1] in subset for c in subset)
        )
        assert expected_length(chosen, accuracy) == pytest.approx(brute)


def test_default_tree_is_valid():
    tree = build_tree(DEFAULT_TREE)
    assert tree.size == len(DEFAULT_TREE) + 1 and tree.num_heads <= 4
