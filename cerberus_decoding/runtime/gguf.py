"""Read a Llama-family GGUF's 4-bit blocks as they are, for the int4 format.

Q4_0 / Q4_1 store 32 weights per block: ``w = d * (q - 8)`` and ``w = d * q + m``. The int4 format
computes ``w = q * scale + min``, so ``scale = d`` and ``min = m`` (Q4_1) or ``-8 d`` (Q4_0)
reproduce the file's weights with no de-quantize / re-quantize round trip.

Parsing a GGUF's header with the ``gguf`` library reads every metadata field (49k vocabulary strings
and merges: about 9 s on a 2-core CPU), so where each 4-bit tensor lies in the file is kept in a
small index next to the converted weights (models.gguf_cache_dir) and the blocks are memory-mapped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from ..heads import _atomic_write
from ..models import CerberusError, gguf_cache_dir

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


INDEX_FILE = "q4_tensors.json"
INDEX_VERSION = 1
BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}  # per block of 32 weights


def read_q4_blocks(path: Path, num_heads: int, num_kv_heads: int) -> dict[str, tuple]:
    """``{hf_name: (q [N, K] uint8, scale [N, K/32], min [N, K/32])}`` for every Q4_0/Q4_1 projection.

    Tensors of other types are left out (the caller quantizes them on load).
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for t in q4_tensor_index(path):
        blocks = data[t["offset"] : t["offset"] + t["rows"] * t["row_bytes"]]
        blocks = np.asarray(blocks).reshape(t["rows"], -1, BLOCK_BYTES[t["type"]])  # [N, K/32, bytes]
        q, scale, mins = _unpack(blocks, has_min=t["type"] == GGMLQuantizationType.Q4_1)
        kind = t["kind"]
        if kind in ("attn_q", "attn_k"):  # llama.cpp stores q/k rows permuted for its RoPE layout
            order = _unpermute_rows(q.shape[0], num_heads if kind == "attn_q" else num_kv_heads)
            q, scale, mins = q[order], scale[order], mins[order]
        out[f"model.layers.{t['layer']}.{t['hf']}"] = (q, scale, mins)
    return out


def q4_tensor_index(path: Path) -> list[dict]:
    """Where each Q4_0/Q4_1 projection lies in the GGUF: read from the cached index, or parsed once
    with the ``gguf`` library and cached (written atomically; an unreadable index is rebuilt). The
    cache directory is keyed by the file's path, size and modification time."""
    index_path = gguf_cache_dir(path) / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
        if index.get("version") == INDEX_VERSION:
            return index["tensors"]
    except (OSError, ValueError, AttributeError):
        pass
    tensors = _parse_q4_tensors(path)
    index = json.dumps({"version": INDEX_VERSION, "tensors": tensors})
    try:  # a cache that cannot be written only costs the next load the parse again
        index_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(index_path, lambda p: Path(p).write_text(index))
    except OSError:
        pass
    return tensors


def _parse_q4_tensors(path: Path) -> list[dict]:
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise CerberusError(f"Cannot read GGUF file {path}: {e}") from e
    tensors = []
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.{i}.{name}.weight
        if len(parts) != 4 or parts[0] != "blk" or t.tensor_type not in BLOCK_BYTES:
            continue
        hf = next((k for k, v in PROJECTIONS.items() if v == parts[2]), None)
        if hf is None:
            continue
        rows, row_bytes = (int(n) for n in t.data.shape)  # quantized data: [N, bytes per row]
        tensors.append(
            {"layer": int(parts[1]), "kind": parts[2], "hf": hf, "type": int(t.tensor_type), "rows": rows}
            | {"row_bytes": row_bytes, "offset": int(t.data_offset)}
        )
    return tensors


def _unpack(blocks: np.ndarray, has_min: bool):
    """[N, G, bytes] ggml blocks -> q [N, G*32] (0..15), scale and min [N, G] float32."""
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)) if has_min else None
    qs = torch.from_numpy(blocks[..., 4 if has_min else 2 :].copy())  # [N, G, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # low nibbles: elements 0-15, high: 16-31
    return q.reshape(q.shape[0], -1), d, m if has_min else -8 * d


def _unpermute_rows(n: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (``hf = gguf[order]``)."""
    perm = torch.arange(n).view(heads, 2, n // heads // 2).transpose(1, 2).reshape(-1)  # gguf row i = hf perm[i]
    return torch.argsort(perm)
