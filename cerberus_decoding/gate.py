"""The entropy gate: speculate only on steps where the model is confident enough to pay off.

Two readings of "the entropy of the last hidden state" are offered: ``hidden`` (softmax over the
hidden vector itself, the paper's wording) and ``logits`` (the next-token distribution's entropy).
"""

from __future__ import annotations

import math

import torch

ENTROPY_GATES = ("hidden", "logits")  # the gates that read an entropy (and have a threshold)
GATES = (*ENTROPY_GATES, "off")


def entropy(x: torch.Tensor) -> float:
    """Entropy (nats) of softmax(x) for a 1-D tensor."""
    logp = torch.log_softmax(x.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())


def reads(gate: str, threshold: float) -> str | None:
    """The entropy this gate's decision reads: None when the gate is off or its threshold infinite
    (always or never, whatever the entropy), so a step need not compute it."""
    return gate if gate in ENTROPY_GATES and math.isfinite(threshold) else None


def speculate(gate: str, threshold: float, hidden_entropy: float, logits_entropy: float) -> bool:
    """True: run heads + tree this step. False: a plain one-token step."""
    kind = reads(gate, threshold)
    if kind is None:
        return gate == "off" or threshold > 0
    return (hidden_entropy if kind == "hidden" else logits_entropy) < threshold
