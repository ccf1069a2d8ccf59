"""Candidate trees in Medusa's "choices" notation, and the buffers that verify them in one forward.

A tree is a list of paths of top-k ranks: ``[1, 0]`` is the node reached by taking head 0's
second-best token, then head 1's best token. Node 0 is the root (the token the base model already
chose); node i >= 1 is ``choices[i - 1]`` after sorting by depth.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .models import CerberusError

# Sized for a 2-core CPU in float32, where verifying ~16 tokens costs ~1.7 single-token steps.
DEFAULT_TREE = [
    [0],
    [1],
    [2],
    [0, 0],
    [0, 1],
    [1, 0],
    [0, 0, 0],
    [2, 0],
    [0, 2],
    [0, 0, 1],
    [0, 1, 0],
    [0, 0, 0, 0],
    [3],
    [1, 1],
    [0, 0, 0, 1],
]


SMALL_TREE = 4  # nodes, root included
# A leaf's logits are read only when the accepted path ends there, and computed afterwards they cost a
# second LM-head call: on a 2-core AVX2 CPU a row costs 0.2-0.4 ms inside the call and a second call
# ~2.2 ms (benchmarks/lm_head_rows.py: up front pays from ~0.13), so a leaf at least this likely to be
# accepted gets its row up front.
LIKELY_LEAF = 0.2


@dataclass
class Tree:
    choices: list[tuple[int, ...]]  # node i + 1 = choices[i] (build_tree sorts them by depth)
    mask: torch.Tensor  # [N+1, N+1] bool, node attends to itself and its ancestors
    depth: torch.Tensor  # [N+1] long, root 0
    parent: torch.Tensor  # [N+1] long, root -> 0
    head: torch.Tensor  # [N] which head drafts node i + 1 (depth - 1)
    rank: torch.Tensor  # [N] which of that head's top-k
    paths: torch.Tensor  # [P, D] node ids of each leaf path (depth 1..D), padded with N+1
    internal: torch.Tensor  # [I] nodes with children: the only ones whose logits verification reads
    top_k: int  # largest rank + 1
    num_heads: int  # deepest depth
    likely_leaves: bool = False  # every leaf is at least LIKELY_LEAF likely to be accepted (``prune``)

    @cached_property
    def lm_head_rows(self) -> torch.Tensor:
        """Rows whose logits verification computes up front: the internal nodes, or every node of a
        tree of at most SMALL_TREE nodes or of likely leaves (a few more rows in the one LM-head call
        cost less than a second call for an accepted leaf)."""
        every_row = self.likely_leaves or self.size <= SMALL_TREE
        return torch.arange(self.size, device=self.internal.device) if every_row else self.internal

    @cached_property
    def lm_head_row_of(self) -> dict[int, int]:
        """node -> its row among ``lm_head_rows`` (node ids: the same on every device)"""
        return {node: row for row, node in enumerate(self.lm_head_rows.tolist())}

    @cached_property
    def children(self) -> list[list[int]]:
        """children[n]: node n's children in draft order (ascending ids: by rank, then lookup branches)."""
        out: list[list[int]] = [[] for _ in range(self.size)]
        for node, parent in enumerate(self.parent[1:].tolist(), start=1):
            out[parent].append(node)
        return out

    @cached_property
    def kernel_nodes(self) -> tuple[list[int], list[int]]:
        """Each node's index in the heads' flattened top-k [K * top_k] and its parent, nodes 1..N:
        what the CPU kernels' ``draft_tree`` gathers (``candidates`` and ``confidence`` in one op)"""
        return (self.head * self.top_k + self.rank).tolist(), self.parent[1:].tolist()

    @property
    def size(self) -> int:
        """Number of nodes including the root (tokens fed to one verification forward)."""
        return len(self.choices) + 1

    @cached_property
    def levels(self) -> list[tuple]:
        """Depth by depth, what heads that read their parent's draft run (``DraftHeads.draft``):
        per depth d, (the nodes at d with children [I], each one's parent's index in the previous
        depth's nodes [I], the nodes at d + 1 [M], each one's parent's index in this depth's nodes [M],
        their ranks [M], the largest rank + 1)."""
        parent, depth, device = self.parent.tolist(), self.depth.tolist(), self.parent.device
        out, above = [], [0]
        for d in range(self.num_heads):
            nodes = sorted({parent[n] for n in range(1, self.size) if depth[n] == d + 1})
            children = [n for n in range(1, self.size) if depth[n] == d + 1]
            out.append(
                tuple(
                    torch.tensor(x, dtype=torch.long, device=device)
                    for x in (
                        nodes,
                        [above.index(parent[n]) if d else 0 for n in nodes],
                        children,
                        [nodes.index(parent[n]) for n in children],
                        [self.choices[n - 1][-1] for n in children],
                    )
                )
                + (max(self.choices[n - 1][-1] for n in children) + 1,)
            )
            above = nodes
        return out

    def to(self, device) -> Tree:
        for name in ("mask", "depth", "parent", "head", "rank", "paths", "internal"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("lm_head_rows", "levels", "subtrees"):  # cached on the old device
            self.__dict__.pop(name, None)
        return self

    @cached_property
    def subtrees(self) -> dict[tuple, tuple[Tree, torch.Tensor]]:
        """``subtree``'s trees so far and their nodes as an index (a step's pruned tree is one of a few shapes)"""
        return {}

    def subtree(self, nodes: tuple[int, ...], likely_leaves: bool = False) -> tuple[Tree, torch.Tensor]:
        """The tree of ``nodes`` (ascending node ids, the root and each node's parent among them),
        its nodes in their order here, and ``nodes`` as an index on the tree's device: a step's
        tokens ``tokens.index_select(0, index)`` line up with it."""
        found = self.subtrees.get((nodes, likely_leaves))
        if found is None:
            if len(self.subtrees) >= 1024:  # shapes are few in practice; never let the memo grow unbounded
                self.subtrees.clear()
            index = {node: i for i, node in enumerate(nodes)}
            parents = [index[p] for p in self.parent[list(nodes[1:])].tolist()]
            tree = tree_from_parents(parents, [self.choices[n - 1] for n in nodes[1:]]).to(self.mask.device)
            tree.likely_leaves = likely_leaves
            found = self.subtrees[nodes, likely_leaves] = tree, torch.tensor(nodes, device=self.mask.device)
        return found

    def candidates(self, root: torch.Tensor, topk_tokens: torch.Tensor) -> torch.Tensor:
        """root [1], topk_tokens [K, k] -> node tokens [N+1]"""
        return torch.cat([root.view(1), topk_tokens[self.head, self.rank]])

    def confidence(self, topk_probs: torch.Tensor) -> torch.Tensor:
        """topk_probs [K, k] (the heads' probabilities of their top-k tokens) -> [N+1] each node's
        product of them along its path (the heads' estimate that verification accepts it), root 1"""
        p = topk_probs[self.head, self.rank].float()  # [N]
        return torch.where(self.mask[:, 1:], p, 1.0).prod(-1)


def prune(tree: Tree, tokens: torch.Tensor, confidence: torch.Tensor, min_confidence: float):
    """A step's drafted tree cut to the nodes worth verifying: those the heads give at least
    ``min_confidence`` of being accepted (``confidence`` [N+1], ``DraftHeads.draft``; 0 keeps every
    node) -> (tree, its tokens), or None when no draft node is left: the step is a plain AR step.
    From ``min_confidence`` LIKELY_LEAF on, its leaves are likely: verification computes their logits
    up front (``Tree.lm_head_rows``)."""
    if min_confidence <= 0:
        return tree, tokens
    keep = [c >= min_confidence for c in confidence.tolist()]  # on the host: fewer ops than on tensors
    keep[0] = True
    for node, children in enumerate(tree.children):  # a node needs its parent (a product: it is never
        for child in children:  # less sure of a parent than of its child, but rounding is not ours)
            keep[child] = keep[child] and keep[node]
    nodes = tuple(i for i, k in enumerate(keep) if k)
    if len(nodes) == 1:
        return None
    likely_leaves = min_confidence >= LIKELY_LEAF
    if len(nodes) == tree.size and likely_leaves == tree.likely_leaves:
        return tree, tokens
    subtree, index = tree.subtree(nodes, likely_leaves)
    return subtree, tokens if len(nodes) == tree.size else tokens.index_select(0, index)


def build_tree(choices) -> Tree:
    choices = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
    if not choices:
        raise CerberusError("A tree needs at least one node.")
    index = {c: i + 1 for i, c in enumerate(choices)}
    for c in choices:
        if any(r < 0 for r in c):
            raise CerberusError(f"Tree node {list(c)} has a negative rank.")
        if len(c) > 1 and c[:-1] not in index:
            raise CerberusError(f"Tree node {list(c)} has no parent {list(c[:-1])} in the tree.")
    return tree_from_parents([index.get(c[:-1], 0) for c in choices], choices)


def tree_from_parents(parents: list[int], choices=None) -> Tree:
    """A tree from explicit parent links: ``parents[i]`` is the parent of node i + 1 (0 = root).

    Nodes keep the given order, so a caller's token list lines up with the buffers. Parents must
    come before their children. Without ``choices``, each node's choice is its parent's plus its
    position among its siblings, so ``head``/``rank`` read as "depth - 1" and "sibling number".
    """
    n = len(parents) + 1
    if n < 2:
        raise CerberusError("A tree needs at least one node.")
    if any(not 0 <= p <= i for i, p in enumerate(parents)):
        raise CerberusError("Every tree node's parent must be the root or an earlier node.")
    if choices is None:
        paths_of, counts = [()], [0] * n
        for p in parents:
            paths_of.append(paths_of[p] + (counts[p],))
            counts[p] += 1
        choices = paths_of[1:]
    choices = [tuple(c) for c in choices]
    parent = torch.tensor([0, *parents], dtype=torch.long)  # [N+1]
    depth = torch.tensor([0] + [len(c) for c in choices], dtype=torch.long)  # [N+1]
    mask = torch.eye(n, dtype=torch.bool)  # [N+1, N+1]
    for i, p in enumerate(parents, start=1):
        mask[i] |= mask[p]  # a node sees what its parent sees (parents are built first)
    has_child = set(parents)
    leaves = [i for i in range(1, n) if i not in has_child]
    max_depth = int(depth.max())
    paths = torch.full((len(leaves), max_depth), n, dtype=torch.long)  # [P, D], padded with N+1
    for row, leaf in enumerate(leaves):
        ids = mask[leaf, 1:].nonzero().flatten() + 1  # ancestors and itself, ascending = by depth
        paths[row, : ids.numel()] = ids
    return Tree(
        choices=choices,
        mask=mask,
        depth=depth,
        parent=parent,
        head=depth[1:] - 1,
        rank=torch.tensor([c[-1] for c in choices], dtype=torch.long),
        paths=paths,
        internal=torch.tensor(sorted(has_child), dtype=torch.long),
        top_k=max(c[-1] for c in choices) + 1,
        num_heads=max_depth,
    )


def load_tree(path: str | Path) -> list[list[int]]:
    try:
        choices = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CerberusError(f"Tree file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not UTF-8
        raise CerberusError(f"Cannot read tree file {path} ({e}); give a UTF-8 JSON file.") from None
    except json.JSONDecodeError as e:
        raise CerberusError(f"Tree file {path} is not valid JSON: {e}") from e
    if isinstance(choices, dict):
        choices = choices.get("tree") or choices.get("choices")
    if not isinstance(choices, list) or not all(
        isinstance(c, list) and c and all(isinstance(r, int) for r in c) for c in choices
    ):
        raise CerberusError(f"Tree file {path} must hold a list of paths of ranks, e.g. [[0], [0, 0], [1]].")
    return choices


def expected_length(choices, accuracy) -> float:
    """Expected tokens per step (bonus included) if head d's rank-r guess is right with prob accuracy[d][r]."""
    total = 1.0
    for c in choices:
        p = 1.0
        for d, r in enumerate(c):
            p *= accuracy[d][r] if r < len(accuracy[d]) else 0.0
        total += p
    return total


def best_tree(accuracy, num_nodes: int) -> list[list[int]]:
    """The N-node tree maximising expected accepted length (Medusa's greedy construction).

    ``accuracy[d][r]``: probability that head d's rank-r token is right (given its prefix was).
    A node's value is the product along its path; every child is worth at most its parent, so
    taking the best frontier node N times is optimal for this objective.
    """
    heap = [(-accuracy[0][r], (r,)) for r in range(len(accuracy[0]))]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < num_nodes:
        neg_p, node = heapq.heappop(heap)
        chosen.append(list(node))
        d = len(node)
        if d < len(accuracy):
            for r in range(len(accuracy[d])):
                heapq.heappush(heap, (neg_p * accuracy[d][r], node + (r,)))
    return chosen
