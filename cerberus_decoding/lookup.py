"""Prompt-lookup drafts: copy what followed the last occurrence of the current n-gram.

Outputs often repeat their input (summaries, extraction, code edits) or themselves (small models
loop). The suffix of ``context + root`` is looked up among earlier n-grams, longest first, most
recent occurrence; the tokens that followed it are the draft chain. The chain is verified alone
(``pld``, or a step where the gate skipped the heads) or merged into the heads' tree, sharing the
nodes where the chain agrees with the heads, or verified instead of the heads' tree when one matches
(which pays where verification cost is steep: calibration picks). The engine verifies it as any other
tree, so greedy decoding stays exactly the base model's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .tree import Tree, tree_from_parents

MAX_LEN = 10  # longest chain by default; calibration picks a length 0..MAX_LEN per machine
NGRAM = 3  # longest n-gram matched
HEADS_NGRAM = 8  # longest n-gram matched for heads that read lookup: a longer match copies more reliably
MIN_NGRAM = 2  # shortest n-gram matched, next to the heads and alone


class NgramIndex:
    """Every n-gram (n = 1..ngram) of the context -> where its latest occurrence ends.

    Updated token by token as the context grows, so a lookup is ``ngram`` dict reads, not a scan.
    """

    def __init__(self, ngram: int = NGRAM):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1 (got {ngram}).")
        self.ngram = ngram
        self.tokens: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence

    def reset(self, ids: list[int]) -> None:
        self.tokens, self.last = [], {}
        self.extend(ids)

    def extend(self, ids: list[int]) -> None:
        toks, last = self.tokens, self.last
        for t in ids:
            toks.append(int(t))
            end = len(toks)
            for n in range(1, min(self.ngram, end) + 1):
                last[tuple(toks[end - n :])] = end

    def match(self, root: int, max_len: int, min_ngram: int = 1) -> tuple[int, list[int]]:
        """-> (n, chain): the longest n-gram ending in ``root`` seen in the context, and up to
        ``max_len`` tokens that followed it; (0, []) when none of length >= ``min_ngram`` exists.

        The indexed n-grams all lie inside the context, so each one found ends before the suffix
        being matched (which ends in root): a match is never the suffix itself.
        """
        toks = self.tokens
        for n in range(min(self.ngram, len(toks)), max(min_ngram, 1) - 1, -1):
            end = self.last.get((*toks[len(toks) - n + 1 :], root))
            if end is not None:
                return n, continuation(toks, root, end, max_len)
        return 0, []


def first_match(index: NgramIndex, root: int, tokens: int = 1) -> list[int]:
    """[n, t_1 .. t_tokens]: the longest n-gram ending in ``root`` that ``index`` has seen and the
    ``tokens`` tokens that followed its latest occurrence (the start of ``pld``'s chain), or
    [0, -1, ...] when there is none: what heads that read lookup read (``reads_lookup``)."""
    n, chain = index.match(root, tokens)
    return [n, *chain] if chain else [0] + [-1] * tokens


def lookup_matches(
    prompt_ids: list[int], answer_ids: list[int], tokens: int = 1, ngram: int = NGRAM
) -> list[list[int]]:
    """``first_match`` at each position t of an answer (root ``answer_ids[t]``, context the prompt and
    the answer before it), as decoding meets them: what heads that read lookup are trained on."""
    index = NgramIndex(ngram)
    index.reset(prompt_ids)
    out = []
    for root in answer_ids:
        out.append(first_match(index, root, tokens))
        index.extend([root])
    return out


def chain_hits(
    prompt_ids: list[int], answer_ids: list[int], max_len: int, min_ngram: int, ngram: int = NGRAM
) -> list[int]:
    """What lookup chains would have given at each step of a greedy answer (calibration): at
    position t (root ``answer_ids[t]``, context the prompt and the answer before it), how many
    leading tokens of the chain equal the answer's next tokens (0..max_len; fewer near the end),
    or -1 where no n-gram of at least ``min_ngram`` tokens matches. One value per answer token."""
    index = NgramIndex(ngram)
    index.reset(prompt_ids)
    hits = []
    for t, root in enumerate(answer_ids):
        _, chain = index.match(root, max_len, min_ngram)
        if chain:
            truth = answer_ids[t + 1 : t + 1 + len(chain)]
            n = 0
            while n < len(truth) and chain[n] == truth[n]:
                n += 1
            hits.append(n)
        else:
            hits.append(-1)
        index.extend([root])
    return hits


def continuation(tokens: list[int], root: int, start: int, max_len: int) -> list[int]:
    """``max_len`` tokens of ``tokens + [root]`` from ``start`` on. Past the end they come from the
    chain itself: a match close to the end means the text is looping, and the loop goes on."""
    seq_len = len(tokens) + 1
    chain: list[int] = []
    for p in range(start, start + max_len):
        if p < len(tokens):
            chain.append(tokens[p])
        elif p == len(tokens):
            chain.append(root)
        else:
            chain.append(chain[p - seq_len])  # p - seq_len < len(chain) since start < seq_len
    return chain


def union_tree(
    parents: list[int], tokens: list[int], chain: list[int], budget: int | None = None
) -> tuple[list[int], list[int], int]:
    """Merge a chain (the tokens after the root) into a token tree.

    ``parents[i]`` is node i + 1's parent, ``tokens`` [N+1] the node tokens (root first). The chain
    walks down the tree while its tokens match a child, and the rest hangs off the last matched
    node as a new branch. With a ``budget`` (most nodes, root included), the tree's other nodes are
    dropped from the back of its order (for a built tree: deepest, then highest rank) to make room.
    -> (parents, tokens, number of chain tokens already in the tree).
    """
    if budget is not None:
        chain = chain[: budget - 1]
    child = {(p, tokens[i + 1]): i + 1 for i, p in enumerate(parents)}
    path, node = [], 0
    for t in chain:
        node = child.get((node, t))
        if node is None:
            break
        path.append(node)
    shared = len(path)
    rest = chain[shared:]
    n_old = len(parents)
    keep = list(range(1, n_old + 1))
    if budget is not None and n_old + 1 + len(rest) > budget:
        rest = rest[: budget - 1 - shared]
        room = budget - 1 - shared - len(rest)  # for nodes off the chain's path
        on_path = set(path)
        others = [i for i in keep if i not in on_path][:room]  # a prefix: parents come before children
        keep = sorted(on_path.union(others))
    new_id = {0: 0, **{old: new for new, old in enumerate(keep, start=1)}}
    out_parents = [new_id[parents[old - 1]] for old in keep]
    out_tokens = [tokens[0]] + [tokens[old] for old in keep]
    attach = new_id[path[-1]] if path else 0
    for t in rest:
        out_parents.append(attach)
        out_tokens.append(t)
        attach = len(out_tokens) - 1
    return out_parents, out_tokens, shared


class LookupDrafter:
    """The engine's ``drafter``: prompt-lookup chains, merged with the heads' tree when it runs.

    max_len:    longest chain (tokens after the root); 0 drafts none (calibration may find that
                no chain pays on a machine: ``calibration.choose.best_lookup_length``).
    ngram:      longest n-gram matched (longest first, down to the minimum).
    merge:      merge the chain into the heads' tree (True), or verify the chain instead of the
                heads' tree when there is one (False: the heads then do not run that step).
    min_ngram:  shortest match used next to the heads' tree.
    solo_ngram: shortest match verified on a step without the heads (``pld``, or the gate chose
                AR): a chain then costs a bigger forward than the one-token step it replaces.
    budget:     most nodes of a merged tree, root included (None: heads' tree + max_len).
    """

    def __init__(
        self,
        max_len: int = MAX_LEN,
        ngram: int = NGRAM,
        merge: bool = True,
        min_ngram: int = MIN_NGRAM,
        solo_ngram: int = MIN_NGRAM,
        budget: int | None = None,
    ):
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0 (got {max_len}).")
        self.max_len, self.merge, self.budget = max_len, merge, budget
        self.min_ngram, self.solo_ngram = min_ngram, solo_ngram
        self.index = NgramIndex(ngram)
        self.trees: dict[tuple[int, ...], Tree] = {}  # parent links -> built tree (shapes recur)
        self.stats = {"steps": 0, "chains": 0, "shared": 0}

    @property
    def max_nodes(self) -> int:
        return self.max_len

    def reset(self, prompt_ids: list[int]) -> None:
        self.index.reset(prompt_ids)

    def extend(self, new_ids: list[int]) -> None:
        self.index.extend(new_ids)

    def draft(self, root: torch.Tensor, heads_tree: Tree | None, drafts: Callable[[], tuple | None] | None):
        """root [1], the heads' tree and ``drafts()``, which runs the heads -> (the tree they drafted:
        the heads' tree or part of it, its tokens [N+1]) or None (no node worth verifying)
        (None, None: the gate chose no heads this step) -> (tree, tokens [N+1]) or None."""
        self.stats["steps"] += 1
        r = int(root)
        min_n = self.min_ngram if heads_tree is not None else self.solo_ngram
        _, chain = self.index.match(r, self.max_len, min_n)  # max_len 0: always empty
        if not chain:
            return None if heads_tree is None else drafts()
        self.stats["chains"] += 1
        drafted = drafts() if heads_tree is not None and self.merge else None
        if drafted is None:
            parents, tokens = list(range(len(chain))), [r, *chain]
        else:
            tree, heads_tokens = drafted
            budget = self.budget or heads_tree.size + self.max_len
            parents, tokens, shared = union_tree(tree.parent[1:].tolist(), heads_tokens.tolist(), chain, budget)
            self.stats["shared"] += shared
        return self._tree(parents, root.device), torch.tensor(tokens, device=root.device)

    def _tree(self, parents: list[int], device) -> Tree:
        key = tuple(parents)
        tree = self.trees.get(key)
        if tree is None:
            if len(self.trees) >= 1024:  # shapes are few in practice; never let the memo grow unbounded
                self.trees.clear()
            tree = self.trees[key] = tree_from_parents(parents).to(device)
        return tree
