"""Pick the longest accepted path of a verified tree, and the bonus token after it."""

from __future__ import annotations

import torch

from .sampling import probabilities, sample


def accept_greedy(tree, tokens: torch.Tensor, logits: torch.Tensor):
    """tokens [N+1] fed, logits [N+1, V] from one forward -> (accepted node ids [a], bonus [1]).

    A node is accepted when it equals the base model's argmax at its parent and its parent was
    accepted: exactly the tokens greedy auto-regressive decoding would have produced.
    """
    predicted = logits.argmax(-1)  # [N+1]
    return _longest_path(tree, tokens[1:] == predicted[tree.parent[1:]], predicted)


def accept_typical(tree, tokens, logits, temperature, top_p, generator, epsilon=0.09, delta=0.3):
    """Medusa's typical acceptance (lossy): keep a token whose probability beats
    ``min(epsilon, delta * exp(-entropy))`` of its parent's distribution."""
    probs = probabilities(logits, temperature, 1.0)  # [N+1, V]
    ent = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)  # [N+1]
    threshold = torch.minimum(torch.full_like(ent, epsilon), delta * torch.exp(-ent))
    parents = tree.parent[1:]
    p_token = probs[parents, tokens[1:]]
    accepted, last = _longest_path(tree, p_token > threshold[parents], None)
    bonus = sample(logits[last], temperature, top_p, generator)
    return accepted, bonus


def _longest_path(tree, ok: torch.Tensor, predicted):
    """ok [N] per non-root node -> (accepted node ids, bonus token or last node id)."""
    ok = torch.cat([ok, ok.new_zeros(1)])  # padding id N+1 -> index N: never ok
    run = ok[tree.paths - 1].long().cumprod(dim=1)  # [P, D] 1 while the path is still accepted
    lengths = run.sum(1)
    best = int(lengths.argmax())
    accepted = tree.paths[best, : int(lengths[best])]
    last = int(accepted[-1]) if accepted.numel() else 0
    if predicted is None:
        return accepted, last
    return accepted, predicted[last : last + 1]
