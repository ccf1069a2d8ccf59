"""Turning next-token logits into a token: greedy, or temperature + top-p sampling.

Every random choice of decoding goes through ``draw`` (a token from a distribution) and ``coin``
(an event of a given probability), both fed by the request's seeded generator: the same seed gives
the same output. verify.py calls them as ``sampling.draw`` / ``sampling.coin`` so that a test can
replace both and enumerate every outcome with its exact probability (tests/test_exact_sampling.py).
"""

from __future__ import annotations

import torch

# How a speculative step accepts drafts when sampling (temperature > 0); greedy ignores it.
#   exact:   recursive rejection sampling over the tree: the output is distributed exactly as plain
#            sampling from the base model (docs/sampling.md)
#   typical: Medusa's typical acceptance: keeps plausible drafts, longer accepted paths, lossy
ACCEPTANCES = ("exact", "typical")
DEFAULT_ACCEPTANCE = "exact"


def check_acceptance(acceptance: str) -> str:
    if acceptance not in ACCEPTANCES:
        raise ValueError(f"Unknown acceptance {acceptance!r}; use one of {', '.join(ACCEPTANCES)}.")
    return acceptance


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [...] ids of the largest (the first on ties, NaN counting as largest, as
    torch's argmax). On a CPU through our kernel (runtime/cpu_kernels.cpp): torch's argmax took
    ~60 us over a 49k vocabulary (after converting bfloat16 to float32), every step."""
    if logits.device.type == "cpu" and logits.dtype in (torch.bfloat16, torch.float32) and logits.numel():
        from .runtime import cpu_kernels

        ops = cpu_kernels.load()
        if ops is not None:
            rows = logits.reshape(-1, logits.shape[-1]).contiguous()
            return ops.argmax_rows(rows).view(logits.shape[:-1])
    return logits.float().argmax(-1)


def with_greedy(lm_head):
    """An LM head -> one that also returns each row's greedy token: hidden [q, H] -> (logits [q, V],
    ids [q]), as runtimes' ``lm_head_greedy`` (which do both in one kernel call where they can)."""

    def head(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = lm_head(hidden)
        return logits, greedy(logits)

    return head


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token once the mass before it already reaches top_p (the best token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[V] probabilities (any positive total) -> [1] token id drawn from them."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)


def coin(probability: float, generator: torch.Generator | None) -> bool:
    """True with the given probability."""
    return float(torch.rand((), generator=generator)) < probability


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """[V] logits -> [1] token id. temperature 0 = greedy."""
    if temperature <= 0:
        return greedy(logits).view(1)
    return draw(probabilities(logits, temperature, top_p), generator)
