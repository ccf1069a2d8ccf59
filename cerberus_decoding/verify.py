"""Pick the accepted path of a verified tree, and the token after it.

``verify`` owns the rule "the LM head runs only where verification reads it": a node is judged by
its parent's distribution, so logits are needed at the internal nodes (those with children), plus
at the last accepted node when it is a leaf (the next token is drawn from them). For a small tree,
or one whose leaves are all likely to be accepted (``tree.LIKELY_LEAF``), all rows go through the LM
head in one call, cheaper than a second call for that leaf.

Three rules: greedy (temperature 0, lossless), exact (recursive rejection sampling, lossless at
any temperature, docs/sampling.md) and Medusa's typical acceptance (lossy).
"""

from __future__ import annotations

import torch

from . import sampling
from .sampling import probabilities, with_greedy


def verify(
    tree,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    lm_head,
    temperature: float = 0.0,
    top_p: float = 1.0,
    acceptance: str = "exact",
    generator: torch.Generator | None = None,
    lm_head_greedy=None,
):
    """tokens [N+1] fed, hidden [N+1, H] their final hidden states ->
    (accepted path: node ids from the root, a list of a+1; logits after its last node [V]; next token [1]).

    The next token is the one after the path (the caller's next pending token): greedy, drawn from
    the base model's distribution there, or, with exact acceptance after rejected children, from
    what the rejections left of it. ``lm_head_greedy`` (hidden -> logits and their greedy tokens,
    the runtime's fused call) serves greedy verification where given.
    """
    if temperature <= 0:
        return verify_greedy(tree, tokens, hidden, lm_head_greedy or with_greedy(lm_head))
    rows = tree.lm_head_rows  # internal nodes; every node when the tree is small or its leaves likely (tree.py)
    logits = lm_head(hidden[rows])  # [R, V]
    all_logits = logits.new_empty(tree.size, logits.shape[-1])  # [N+1, V]; only these rows are read
    all_logits[rows] = logits
    residual = None
    if acceptance == "typical":
        accepted = accept_typical(tree, tokens, all_logits, temperature)
    elif acceptance == "exact":
        accepted, residual = accept_exact(tree, tokens, all_logits, temperature, top_p, generator)
    else:
        raise ValueError(f"Unknown acceptance {acceptance!r}; use exact or typical.")
    path = [0, *accepted.tolist()]
    last = path[-1]
    last_logits = all_logits[last] if last in tree.lm_head_row_of else lm_head(hidden[last : last + 1])[0]
    if residual is not None:
        next_token = sampling.draw(residual, generator)
    else:
        next_token = sampling.sample(last_logits, temperature, top_p, generator)
    return path, last_logits, next_token


def verify_greedy(tree, tokens: torch.Tensor, hidden: torch.Tensor, lm_head_greedy):
    """``verify`` at temperature 0, on Python lists: one argmax per LM-head row, then a walk down
    the tree. A node is accepted when it equals the argmax at its parent and its parent was
    accepted: exactly the tokens greedy auto-regressive decoding would have produced. (The tensor
    version of this walk cost ~0.3 ms of small ops a step on a CPU.)"""
    rows = tree.lm_head_rows
    logits, chosen = lm_head_greedy(hidden if rows.numel() == hidden.shape[0] else hidden[rows])  # [R, V], [R]
    choice = chosen.tolist()  # the base model's token after each row's node
    row_of = tree.lm_head_row_of  # node -> its row in ``logits``
    token_ids, children = tokens.tolist(), tree.children

    def accepted_below(node: int) -> list[int]:
        """The longest accepted path under ``node`` (siblings may repeat a token: keep the longer)."""
        best: list[int] = []
        if children[node]:  # a node with children always has its logits (tree.lm_head_rows)
            want = choice[row_of[node]]
            for child in children[node]:
                if token_ids[child] == want and len(below := [child, *accepted_below(child)]) > len(best):
                    best = below
        return best

    path = [0, *accepted_below(0)]
    last = path[-1]
    if last in row_of:  # the next token as a view of the kernel's result: a new tensor cost ~30 us here
        row = row_of[last]
        return path, logits[row], chosen[row : row + 1]
    last_logits, next_token = lm_head_greedy(hidden[last : last + 1])  # an accepted leaf of a large tree:
    return path, last_logits[0], next_token  # its logits were not computed up front


def accept_exact(tree, tokens, logits, temperature, top_p, generator):
    """tokens [N+1] fed, logits [N+1, V] -> (accepted node ids [a], residual [V] or None).

    Recursive rejection sampling for deterministic drafts (as EAGLE and SGLang do on trees). From
    the root: with p the base model's distribution at the node (temperature and top-p applied, as
    plain sampling does), try its children in draft order; accept child x with probability
    p(x) / (mass of p not yet rejected); on rejection remove x from p. Along an accepted child go
    on from its node. If every child is rejected, the next token must be drawn from the residual
    (p without the rejected tokens, renormalized): that is returned; None means nothing was
    rejected at the last node, so the next token comes from its plain distribution. Every token
    produced is then distributed exactly as plain sampling would produce it (docs/sampling.md).
    """
    token_ids = tokens.tolist()
    node, accepted = 0, []
    while tree.children[node]:
        residual = probabilities(logits[node], temperature, top_p)  # [V], rejected tokens get 0
        for child in tree.children[node]:
            x = token_ids[child]
            p_x = float(residual[x])
            # a duplicate of a rejected sibling, or a token top-p removed, has p_x = 0: never accepted
            if p_x > 0 and sampling.coin(p_x / float(residual.sum()), generator):
                break
            residual[x] = 0.0
        else:
            # Never all zero: the last token with mass left is accepted with probability 1.
            return torch.tensor(accepted, dtype=torch.long, device=tokens.device), residual
        accepted.append(child)
        node = child
    return torch.tensor(accepted, dtype=torch.long, device=tokens.device), None


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
