"""Candidate trees in Medusa's "choices" notation, and the buffers that verify them in one forward.

A tree is a list of paths of top-k ranks: ``[1, 0]`` is the node reached by taking head 0's
second-best token, then head 1's best token. Node 0 is the root (the token the base model already
chose); node i >= 1 is ``choices[i - 1]`` after sorting by depth.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import CerberusError

# Sized for a 2-core CPU in float32, where verifying ~16 tokens costs ~1.7 single-token steps.
DEFAULT_TREE = [
    [0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2, 0], [0, 2], [0, 0, 1],
    [0, 1, 0], [0, 0, 0, 0], [3], [1, 1], [0, 0, 0, 1],
]


@dataclass
class Tree:
    choices: list[tuple[int, ...]]  # sorted, node i + 1 = choices[i]
    mask: torch.Tensor  # [N+1, N+1] bool, node attends to itself and its ancestors
    depth: torch.Tensor  # [N+1] long, root 0
    parent: torch.Tensor  # [N+1] long, root -> 0
    head: torch.Tensor  # [N] which head drafts node i + 1 (depth - 1)
    rank: torch.Tensor  # [N] which of that head's top-k
    paths: torch.Tensor  # [P, D] node ids of each leaf path (depth 1..D), padded with N+1
    top_k: int  # largest rank + 1
    num_heads: int  # deepest depth

    @property
    def size(self) -> int:
        """Number of nodes including the root (tokens fed to one verification forward)."""
        return len(self.choices) + 1

    def to(self, device) -> Tree:
        for name in ("mask", "depth", "parent", "head", "rank", "paths"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def candidates(self, root: torch.Tensor, topk_tokens: torch.Tensor) -> torch.Tensor:
        """root [1], topk_tokens [K, k] -> node tokens [N+1]"""
        return torch.cat([root.view(1), topk_tokens[self.head, self.rank]])


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
    n = len(choices) + 1
    parent = torch.zeros(n, dtype=torch.long)
    depth = torch.zeros(n, dtype=torch.long)
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    for c, i in index.items():
        depth[i] = len(c)
        parent[i] = index.get(c[:-1], 0)
        for d in range(1, len(c)):
            mask[i, index[c[:d]]] = True
    leaves = [c for c in choices if not any(o[: len(c)] == c and len(o) > len(c) for o in choices)]
    max_depth = max(len(c) for c in choices)
    paths = torch.full((len(leaves), max_depth), n, dtype=torch.long)
    for p, leaf in enumerate(leaves):
        for d in range(1, len(leaf) + 1):
            paths[p, d - 1] = index[leaf[:d]]
    return Tree(
        choices=choices, mask=mask, depth=depth, parent=parent,
        head=depth[1:] - 1, rank=torch.tensor([c[-1] for c in choices], dtype=torch.long),
        paths=paths, top_k=max(c[-1] for c in choices) + 1, num_heads=max_depth,
    )


def load_tree(path: str | Path) -> list[list[int]]:
    try:
        choices = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CerberusError(f"Tree file {path} does not exist.") from None
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
