"""The heads' context layer: one causal self-attention layer over the answer so far.

Draft heads that read only the last hidden state h_t cannot look back: whatever the base model's last
layer did not put into h_t is lost to them. The context layer gives Cerberus heads that look-back at
the price of one small attention layer. At every answer position i it forms

    x_i = W_in [h_i ; E[g_i]]                 (the state, and the token g_i the base model chose from it)
    a_i = E[g_i] + W_out Attn(RMSNorm(x))_i    (causal over x_0..x_i, RoPE on the position in the answer)

and the Cerberus chain starts from a_t instead of E[g_t] (heads.py): the root token's embedding plus
what attention over the answer adds (W_out starts at zero, so untrained it is the root-token chain).
Its keys and values of past positions are kept between decoding steps (``DraftContext``), so a step
feeds only the positions it accepted. The context is the answer, not the prompt: training data holds
the answers' hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 64
ROPE_THETA = 10000.0


def attention_heads(hidden_size: int) -> int:
    """Heads of HEAD_DIM channels (one head for models narrower than that)."""
    heads = max(1, hidden_size // HEAD_DIM)
    return heads if hidden_size % heads == 0 else 1


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, D], positions [..., T] -> x rotated by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    freq = ROPE_THETA ** -(torch.arange(half, device=x.device, dtype=torch.float32) / half)  # [D/2]
    angle = positions[..., None].float() * freq  # [..., T, D/2]
    cos, sin = angle.cos()[..., None, :].to(x.dtype), angle.sin()[..., None, :].to(x.dtype)  # [..., T, 1, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class ContextLayer(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        H = hidden_size
        self.heads = attention_heads(H)
        self.inp = nn.Linear(2 * H, H, bias=False)
        self.norm = nn.RMSNorm(H, eps=1e-6)
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.out = nn.Linear(H, H, bias=False)
        nn.init.zeros_(self.out.weight)  # untrained: a = E[g], the root-token heads' start
        self.packed: dict = {}  # pack: the projections in a faster format, inference only

    def pack(self, weights: str) -> None:
        """Inference on a CPU: the three projections in ``weights`` (as the heads' blocks, heads.py)."""
        from .runtime.formats import dense

        self.packed = {name: dense(getattr(self, name).weight, weights) for name in ("inp", "qkv", "out")}

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # in x's dtype (bfloat16 under autocast: the fused kernel)
        return F.rms_norm(x, x.shape[-1:], self.norm.weight.to(x.dtype), self.norm.eps)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.packed[name](x) if name in self.packed else getattr(self, name)(x)

    def project(self, h: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor):
        """h, emb [..., T, H], positions [..., T] -> q, k, v [..., T, heads, D]."""
        x = self._linear("inp", torch.cat([h, emb], dim=-1))
        *lead, T, H = x.shape
        q, k, v = self._linear("qkv", self._norm(x)).view(*lead, T, 3, self.heads, H // self.heads).unbind(-3)
        return rope(q, positions), rope(k, positions), v

    def sequences(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Whole answers at once (training, offline scoring): h, emb [B, L, H] -> a [B, L, H].
        Answers padded at the end are fine: causal attention never reads a later position."""
        B, L, H = h.shape
        q, k, v = self.project(h, emb, torch.arange(L, device=h.device).expand(B, L))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return emb + self._linear("out", y.transpose(1, 2).reshape(B, L, H))

    def extend(self, context: DraftContext) -> torch.Tensor:
        """Feed the positions ``context`` holds pending -> a [H] of the last one (decoding)."""
        h = torch.cat([p[0] for p in context.pending]).to(self.norm.weight.dtype)  # [n, H]
        tokens = torch.cat([p[1] for p in context.pending])  # [n]
        context.pending.clear()
        n, H = h.shape
        positions = torch.arange(context.length, context.length + n, device=h.device)
        emb = context.embed(tokens).to(h.dtype)
        q, k, v = self.project(h, emb, positions)
        keys, values = context.append(k, v)  # [P + n, heads, D]
        # only the last position's output is read; the others only leave their keys and values
        y = F.scaled_dot_product_attention(q[-1:].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1))
        return emb[-1] + self._linear("out", y.transpose(0, 1).reshape(1, H))[0]


class DraftContext:
    """The answer so far, as the context layer sees it: keys and values of the positions it was fed,
    and the (hidden state, chosen token) pairs of the positions not fed yet (steps where the gate ran
    no heads add their position here and cost nothing)."""

    def __init__(self, embed: torch.Tensor):
        self.embed_weight = embed  # [V, H]
        self.keys: torch.Tensor | None = None  # [capacity, heads, D]
        self.values: torch.Tensor | None = None
        self.length = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_weight[tokens]

    def add(self, hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """hidden [n, H] states, tokens [n] the token chosen from each."""
        self.pending.append((hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [n, heads, D] -> all keys, values so far [length, heads, D]."""
        end = self.length + k.shape[0]
        if self.keys is None or end > self.keys.shape[0]:
            capacity = max(256, 2 * end)
            keys, values = k.new_empty(capacity, *k.shape[1:]), v.new_empty(capacity, *v.shape[1:])
            if self.keys is not None:
                keys[: self.length], values[: self.length] = self.keys[: self.length], self.values[: self.length]
            self.keys, self.values = keys, values
        self.keys[self.length : end], self.values[self.length : end] = k, v
        self.length = end
        return self.keys[:end], self.values[:end]
