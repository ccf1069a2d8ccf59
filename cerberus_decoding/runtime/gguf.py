"""Read a Llama-family GGUF's 4-bit blocks as they are, for the int4 format.

Q4_0 / Q4_1 store 32 weights per block: ``w = d * (q - 8)`` and ``w = d * q + m``. The int4 kernel
computes ``w = (q - 8) * scale + zero``, so ``scale = d`` and ``zero = m + 8 d`` (Q4_1) or 0 (Q4_0)
reproduce the file's weights with no de-quantize / re-quantize round trip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import CerberusError

# GGUF name of each projection of block i, keyed by the Hugging Face module name
PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def read_q4_blocks(path: Path, num_heads: int, num_kv_heads: int) -> dict[str, tuple]:
    """``{hf_name: (q [N, K] uint8, scale [N, K/32], zero [N, K/32])}`` for every Q4_0/Q4_1 projection.

    Tensors of other types are left out (the caller quantizes them on load).
    """
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise CerberusError(f"Cannot read GGUF file {path}: {e}") from e
    kinds = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}  # bytes per block
    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{name}.weight
        if len(parts) != 4 or parts[0] != "blk" or t.tensor_type not in kinds:
            continue
        hf = next((k for k, v in PROJECTIONS.items() if v == parts[2]), None)
        if hf is None:
            continue
        blocks = np.asarray(t.data).reshape(t.data.shape[0], -1, kinds[t.tensor_type])  # [N, K/32, bytes]
        q, scale, zero = _unpack(blocks, t.tensor_type == GGMLQuantizationType.Q4_1)
        if parts[2] in ("attn_q", "attn_k"):  # llama.cpp stores q/k rows permuted for its RoPE layout
            order = _unpermute_rows(q.shape[0], num_heads if parts[2] == "attn_q" else num_kv_heads)
            q, scale, zero = q[order], scale[order], zero[order]
        out[f"model.layers.{parts[1]}.{hf}"] = (q, scale, zero)
    return out


def _unpack(blocks: np.ndarray, has_min: bool):
    """[N, G, bytes] ggml blocks -> q [N, G*32] (0..15), scale and zero [N, G] float32."""
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)) if has_min else None
    qs = torch.from_numpy(blocks[..., 4 if has_min else 2 :].copy())  # [N, G, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # low nibbles: elements 0-15, high: 16-31
    zero = m + 8 * d if has_min else torch.zeros_like(d)
    return q.reshape(q.shape[0], -1), d, zero


def _unpermute_rows(n: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (``hf = gguf[order]``)."""
    perm = torch.arange(n).view(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)  # gguf row i = hf perm[i]
    return torch.argsort(perm)
