"""Pick the longest accepted path of a verified tree.

``verify`` owns the rule "the LM head runs only where verification reads it": a node is judged by
its parent's distribution, so logits are needed at the internal nodes (those with children), plus
at the last accepted node when it is a leaf (the caller draws the bonus token from them). For a
small tree all rows go through the LM head in one call, cheaper than a second call for that leaf.
"""

from __future__ import annotations

import torch

from .sampling import probabilities


def verify(tree, tokens: torch.Tensor, hidden: torch.Tensor, lm_head, temperature: float = 0.0):
    """tokens [N+1] fed, hidden [N+1, H] their final hidden states ->
    (accepted path: node ids from the root [a+1], logits after its last node [V])."""
    rows = tree.lm_head_rows  # internal nodes; every node when the tree is small (see tree.py)
    logits = lm_head(hidden[rows])  # [R, V]
    all_logits = logits.new_empty(tree.size, logits.shape[-1])  # [N+1, V]; only these rows are read
    all_logits[rows] = logits
    if temperature <= 0:
        accepted = accept_greedy(tree, tokens, all_logits)
    else:
        accepted = accept_typical(tree, tokens, all_logits, temperature)
    path = torch.cat([accepted.new_zeros(1), accepted])
    last = int(path[-1])
    return path, all_logits[last] if last in tree.lm_head_set else lm_head(hidden[last : last + 1])[0]


def accept_greedy(tree, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """tokens [N+1] fed, logits [N+1, V] -> accepted node ids [a], in path order.

    A node is accepted when it equals the base model's argmax at its parent and its parent was
    accepted: exactly the tokens greedy auto-regressive decoding would have produced.
    """
    parents = tree.parent[1:]
    return _longest_path(tree, tokens[1:] == logits[parents].argmax(-1))


def accept_typical(tree, tokens, logits, temperature, epsilon=0.09, delta=0.3) -> torch.Tensor:
    """Medusa's typical acceptance (lossy): keep a token whose probability beats
    ``min(epsilon, delta * exp(-entropy))`` of its parent's distribution."""
    parents = tree.parent[1:]
    probs = probabilities(logits[parents], temperature, 1.0)  # [N, V]
    ent = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [N]
    threshold = torch.minimum(torch.full_like(ent, epsilon), delta * torch.exp(-ent))
    p_token = probs.gather(-1, tokens[1:, None])[:, 0]
    return _longest_path(tree, p_token > threshold)


def _longest_path(tree, ok: torch.Tensor) -> torch.Tensor:
    """ok [N] per non-root node -> node ids of the longest all-ok path from the root."""
    ok = torch.cat([ok, ok.new_zeros(1)])  # padding id N+1 -> index N: never ok
    run = ok[tree.paths - 1].long().cumprod(dim=1)  # [P, D] 1 while the path is still accepted
    lengths = run.sum(1)
    best = int(lengths.argmax())
    return tree.paths[best, : int(lengths[best])]
