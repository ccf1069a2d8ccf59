"""Prompt lookup: the n-gram matcher, the merge into the heads' tree, and greedy losslessness."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cerberus_decoding.lookup import MAX_LEN, LookupDrafter, NgramIndex, continuation, union_tree
from cerberus_decoding.tree import DEFAULT_TREE, build_tree, tree_from_parents

from .conftest import assert_lossless, references_for


def reference_match(tokens, root, ngram, max_len, min_ngram=1):
    """Rescan: the longest suffix of tokens + [root] that occurred earlier, latest occurrence first."""
    seq = [*tokens, root]
    for n in range(min(ngram, len(tokens)), min_ngram - 1, -1):
        suffix = seq[-n:]
        for i in range(len(seq) - n - 1, -1, -1):
            if seq[i : i + n] == suffix:
                ext = list(seq)
                for j in range(max_len):  # copy forward; past the end, from what was just copied
                    ext.append(ext[i + n + j])
                return n, ext[len(seq) :]
    return 0, []


def index_of(tokens, ngram=3):
    index = NgramIndex(ngram)
    index.reset(tokens)
    return index


# ---- the matcher ----------------------------------------------------------------------------


def test_longest_match_wins_over_a_more_recent_shorter_one():
    ctx = [7, 2, 3, 10, 11, 9, 2, 3, 20, 21, 7, 2]
    assert index_of(ctx).match(3, 4) == (3, [10, 11, 9, 2])  # (7, 2, 3), not the later (2, 3)
    assert index_of(ctx, ngram=2).match(3, 4) == (2, [20, 21, 7, 2])  # (2, 3): its latest occurrence


def test_most_recent_occurrence():
    ctx = [1, 2, 5, 1, 2, 6, 1, 2, 7, 8, 1]
    assert index_of(ctx).match(2, 3) == (2, [7, 8, 1])


def test_no_match():
    assert index_of([1, 2, 3, 4]).match(9, 5) == (0, [])
    assert index_of([]).match(1, 5) == (0, [])
    assert index_of([1]).match(1, 5) == (1, [1, 1, 1, 1, 1])  # the root itself repeats the context


def test_min_ngram_rejects_short_matches():
    ctx = [4, 5, 6, 9, 5]
    assert index_of(ctx).match(6, 3) == (2, [9, 5, 6])
    assert index_of(ctx).match(6, 3, min_ngram=3) == (0, [])


def test_match_at_the_very_end_continues_the_loop():
    # (5, 6, 7) occurred ending at 3; what follows runs into the current suffix and on into the draft
    assert index_of([5, 6, 7, 5, 6]).match(7, 7) == (3, [5, 6, 7, 5, 6, 7, 5])
    # the earlier occurrence ends right before root: the chain starts with the root token itself
    assert index_of([4, 4, 4]).match(4, 3) == (3, [4, 4, 4])


def test_continuation_reads_context_then_root_then_itself():
    assert continuation([1, 2, 3], 4, 1, 6) == [2, 3, 4, 2, 3, 4]
    assert continuation([1, 2, 3], 4, 3, 3) == [4, 4, 4]


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), max_size=60),
    chunks=st.lists(st.integers(1, 7), max_size=20),
    roots=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    ngram=st.integers(1, 4),
    max_len=st.integers(1, 12),
    min_ngram=st.integers(1, 3),
)
def test_incremental_index_equals_rescan(tokens, chunks, roots, ngram, max_len, min_ngram):
    index = NgramIndex(ngram)
    seen = min(len(tokens), chunks[0] if chunks else 0)
    index.reset(tokens[:seen])
    for size in [*chunks[1:], len(tokens), 0]:  # feed the rest in chunks, checking after each
        for root in roots:
            expected = reference_match(tokens[:seen], root, ngram, max_len, min_ngram)
            assert index.match(root, max_len, min_ngram) == expected
        index.extend(tokens[seen : seen + size])
        seen = min(len(tokens), seen + size)
    assert index.tokens == tokens


# ---- merging a chain into the heads' tree ------------------------------------------------------


def ancestors(parents, i):
    out = []
    while i:
        out.append(i)
        i = parents[i - 1]
    return out[::-1]


def token_paths(parents, tokens):
    return {tuple(tokens[j] for j in ancestors(parents, i)) for i in range(1, len(parents) + 1)}


def check_tree(parents, tokens):
    """Buffers agree with the parent links; no two siblings carry the same token (no duplicates)."""
    tree = tree_from_parents(parents)
    assert tree.size == len(tokens)
    for i in range(1, tree.size):
        anc = ancestors(parents, i)
        assert tree.mask[i].nonzero().flatten().tolist() == [0, *anc]
        assert int(tree.depth[i]) == len(anc)
        assert int(tree.parent[i]) == parents[i - 1]
    for row in tree.paths.tolist():  # each leaf path is a root-to-leaf chain of parent links
        nodes = [j for j in row if j < tree.size]
        assert ancestors(parents, nodes[-1]) == nodes
    siblings = [(p, tokens[i + 1]) for i, p in enumerate(parents)]
    assert len(set(siblings)) == len(siblings)
    return tree


@st.composite
def tree_tokens_chain(draw):
    """A random choices-tree with sibling-distinct tokens, and a chain that follows it for a while."""
    choices = {()}
    for _ in range(draw(st.integers(1, 25))):
        base = draw(st.sampled_from(sorted(choices)))
        if len(base) < 4:
            choices.add((*base, draw(st.integers(0, 3))))
    tree = build_tree([list(c) for c in choices if c])
    parents = tree.parent[1:].tolist()
    # a node's token: its rank plus 10 x depth keeps siblings distinct, as a head's top-k does
    tokens = [100, *(tree.rank + 10 * tree.depth[1:]).tolist()]
    follow = draw(st.integers(0, 4))
    chain, node = [], 0
    for _ in range(follow):
        kids = [i + 1 for i, p in enumerate(parents) if p == node]
        if not kids:
            break
        node = draw(st.sampled_from(kids))
        chain.append(tokens[node])
    chain += draw(st.lists(st.integers(0, 60), max_size=8))
    return parents, tokens, chain


@settings(max_examples=300, deadline=None)
@given(data=tree_tokens_chain())
def test_union_keeps_the_tree_adds_the_chain_once(data):
    parents, tokens, chain = data
    new_parents, new_tokens, shared = union_tree(parents, tokens, chain)
    check_tree(new_parents, new_tokens)
    assert new_tokens[0] == tokens[0]
    assert len(new_parents) == len(parents) + len(chain) - shared  # shared prefix not duplicated
    paths = token_paths(new_parents, new_tokens)
    assert token_paths(parents, tokens) <= paths  # every heads node is still there
    assert all(tuple(chain[:d]) in paths for d in range(1, len(chain) + 1))  # and the whole chain
    assert tuple(chain[: shared + 1]) not in token_paths(parents, tokens) or shared == len(chain)


@settings(max_examples=200, deadline=None)
@given(data=tree_tokens_chain(), budget=st.integers(2, 30))
def test_union_within_a_budget(data, budget):
    parents, tokens, chain = data
    new_parents, new_tokens, _ = union_tree(parents, tokens, chain, budget)
    check_tree(new_parents, new_tokens)
    assert len(new_tokens) <= budget
    paths = token_paths(new_parents, new_tokens)
    kept = chain[: budget - 1]
    assert all(tuple(kept[:d]) in paths for d in range(1, len(kept) + 1))  # the chain has priority


def test_union_shares_a_matching_prefix():
    tree = build_tree(DEFAULT_TREE)
    topk = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]])
    tokens = tree.candidates(torch.tensor([5]), topk).tolist()
    # [0, 0, 0] is in the tree (10, 20, 30); the chain goes on with 99, 98 under it
    parents, new_tokens, shared = union_tree(tree.parent[1:].tolist(), tokens, [10, 20, 30, 99, 98])
    assert shared == 3 and len(new_tokens) == tree.size + 2
    assert new_tokens[-2:] == [99, 98]
    assert parents[-2:] == [1 + tree.choices.index((0, 0, 0)), tree.size]  # under [0, 0, 0], then a chain


def test_tree_from_parents_matches_build_tree():
    tree = build_tree(DEFAULT_TREE)
    again = tree_from_parents(tree.parent[1:].tolist())
    for name in ("mask", "depth", "parent", "head", "rank", "paths"):
        assert torch.equal(getattr(tree, name), getattr(again, name)), name
    assert again.choices == tree.choices


def test_drafter_chain_and_union():
    drafter = LookupDrafter(max_len=4)
    drafter.reset([1, 2, 3, 4, 5, 6, 1, 2])
    tree, tokens = drafter.draft(torch.tensor([3]), None, None)
    assert tokens.tolist() == [3, 4, 5, 6, 1] and tree.parent.tolist() == [0, 0, 1, 2, 3]
    assert drafter.draft(torch.tensor([9]), None, None) is None  # no match: a plain AR step
    heads = build_tree(DEFAULT_TREE)
    ranked = torch.tensor([[4, 7, 8, 9], [5, 7, 8, 9], [0, 7, 8, 9], [0, 7, 8, 9]])
    tree, tokens = drafter.draft(torch.tensor([3]), heads, lambda: (heads, heads.candidates(torch.tensor([3]), ranked)))
    assert tree.size == heads.size + 2  # 4, 5 shared with the heads' [0], [0, 0]; 6, 1 appended
    assert tokens[: heads.size].tolist() == heads.candidates(torch.tensor([3]), ranked).tolist()
    tree, tokens = drafter.draft(torch.tensor([9]), heads, lambda: (heads, heads.candidates(torch.tensor([9]), ranked)))
    assert tree is heads
    # the heads' tree pruned to [0], [0, 0] this step: the chain joins what is left; all pruned: the chain alone
    small = heads.subtree((0, 1, 5))[0]
    tree, tokens = drafter.draft(torch.tensor([3]), heads, lambda: (small, torch.tensor([3, 4, 5])))
    assert tokens.tolist() == [3, 4, 5, 6, 1] and tree.parent.tolist() == [0, 0, 1, 2, 3]
    tree, tokens = drafter.draft(torch.tensor([3]), heads, lambda: None)
    assert tokens.tolist() == [3, 4, 5, 6, 1] and tree.parent.tolist() == [0, 0, 1, 2, 3]
    assert drafter.draft(torch.tensor([9]), heads, lambda: None) is None  # no chain, nothing drafted: AR
    solo = LookupDrafter(max_len=4, solo_ngram=2)
    solo.reset([1, 2, 3, 4, 5, 6, 1, 2])
    assert solo.draft(torch.tensor([3]), None, None) is not None  # (2, 3) matched
    assert solo.draft(torch.tensor([5]), None, None) is None  # only (5,): too short without heads


def test_a_chain_can_replace_the_heads_tree_and_then_the_heads_do_not_run():
    """merge=False (where verification is steep): a matching chain is verified alone, without
    running the heads; with no match the heads' tree is verified as usual."""
    calls = []

    def ranked():
        return torch.tensor([[4, 7, 8, 9], [5, 7, 8, 9], [0, 7, 8, 9], [0, 7, 8, 9]])

    def drafts():  # the heads' tree tokens after the root 9 (the only root the heads run for here)
        calls.append(1)
        return heads, heads.candidates(torch.tensor([9]), ranked())

    drafter = LookupDrafter(max_len=4, merge=False)
    drafter.reset([1, 2, 3, 4, 5, 6, 1, 2])
    heads = build_tree(DEFAULT_TREE)
    tree, tokens = drafter.draft(torch.tensor([3]), heads, drafts)
    assert tokens.tolist() == [3, 4, 5, 6, 1] and tree.parent.tolist() == [0, 0, 1, 2, 3] and not calls
    tree, tokens = drafter.draft(torch.tensor([9]), heads, drafts)  # no chain: the heads' tree
    assert tree is heads and len(calls) == 1
    assert tokens.tolist() == heads.candidates(torch.tensor([9]), ranked()).tolist()


# ---- lossless on the default model -------------------------------------------------------------

PASSAGE = (
    "The Northwind bridge opened in 1932 after four years of construction. It spans 1.2 kilometres "
    "across the Ashford estuary and carries two railway tracks and a footpath. In 1987 the bridge was "
    "closed for six months while engineers replaced the original steel cables, and since then it has "
    "carried about forty trains a day."
)
CODE = (
    "def total(items):\n    result = 0\n    for item in items:\n"
    "        result = result + item.price * item.count\n    return result\n"
)
PROMPTS = [
    f"Summarise this passage in two sentences:\n\n{PASSAGE}",
    f"Extract the fields year_opened, length and tracks from this text as JSON:\n\n{PASSAGE}",
    f"Rewrite this function to use sum() and a generator expression, keeping the name:\n\n{CODE}",
    f"Add a docstring and type hints to this function and show the full code:\n\n{CODE}",
    f"Repeat the following passage word for word, then say how many sentences it has:\n\n{PASSAGE}",
    "Name: Ada Park; Age: 36; City: Leeds; Job: nurse.\nName: Tom Reyes; Age: 41; City: York; Job: baker.\n"
    "Write each person as a line 'NAME is AGE and works as a JOB in CITY.'",
    "Write a Python function that returns the n-th Fibonacci number, with a short explanation.",
    "List the first twelve months of the year, one per line, with their number of days.",
    "What is the capital of France? Answer in one word, then explain why it became the capital.",
    "Translate to French: 'The cat sleeps on the warm windowsill every afternoon.'",
    "Count from one to thirty in words, separated by commas.",
]


def test_tiny_model_lookup_is_lossless(tiny_lm):
    """Fast: a random model loops, so chains are found and verified on most steps."""
    from cerberus_decoding.engine import SamplingConfig
    from cerberus_decoding.methods import build_decoder

    cfg = SamplingConfig(max_new_tokens=48)
    ar = build_decoder(tiny_lm, "ar")
    pld = build_decoder(tiny_lm, "pld")
    both = build_decoder(tiny_lm, "cerberus+lookup", heads="none", gate="logits", threshold=10.0)
    for prompt in PROMPTS[:3]:
        ids = ar.encode(prompt)
        ref = ar.generate(ids, cfg).token_ids
        for dec in (pld, both):
            assert_lossless(tiny_lm, ids, ref, dec.generate(ids, cfg).token_ids)
    assert pld.drafter.stats["chains"] > 0 and both.drafter.stats["chains"] > 0


@pytest.mark.slow
def test_greedy_lookup_methods_are_lossless(lm):
    from cerberus_decoding.engine import SamplingConfig
    from cerberus_decoding.methods import build_decoder

    chains = {"max_len": MAX_LEN}  # the longest chains, whatever this machine's calibration chose
    pld = build_decoder(lm, "pld", lookup=chains)
    # a finite gate threshold: confident steps verify heads + chain, the others the chain alone
    both = build_decoder(lm, "cerberus+lookup", heads="none", gate="logits", threshold=1.0, lookup=chains)
    # the chain instead of the heads' tree where one matches, the tree (every step) where none does
    instead = build_decoder(lm, "cerberus+lookup", heads="none", gate="off", lookup=chains | {"merge": False})
    cfg = SamplingConfig(max_new_tokens=64)
    spec_steps = {"pld": 0, "cerberus+lookup": 0, "instead": 0}
    # prompts that copy from their input (a passage, code, a record list) and one that repeats itself
    # (the rest: tests/test_lossless.py)
    for ids, ref in references_for(lm, [PROMPTS[i] for i in (0, 2, 4, 5, -1)], 64).values():
        for name, dec in (("pld", pld), ("cerberus+lookup", both), ("instead", instead)):
            result = dec.generate(ids, cfg)
            assert_lossless(lm, ids, ref, result.token_ids)
            spec_steps[name] += result.speculative_steps
    assert all(spec_steps.values())  # the drafts were really verified, not skipped
    assert both.heads_calls > 0 and both.drafter.stats["chains"] > 0
    # ungated, every step drafts: the chain where one matches, else the heads (never both)
    assert 0 < instead.heads_calls == instead.drafter.stats["steps"] - instead.drafter.stats["chains"]
