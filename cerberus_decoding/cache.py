"""A preallocated KV cache that the model's own forward writes into, and that we can compact.

Each layer owns one buffer of ``[B, kv_heads, max_len, head_dim]``; ``update`` writes the new
entries after the current length and returns views of the filled part, so a forward never copies
the whole cache. After tree verification, ``compact`` keeps the accepted nodes' entries and drops
the rest.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class BufferLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(b, h, self.max_len, d)  # [B, Hkv, max_len, D]
        self.values = value_states.new_zeros(b, h, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        end = self.length + q
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} entries")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove))


class KVCache(Cache):
    """The cache of one sequence (batch 1) or of a batch of equal-length rows."""

    def __init__(self, num_layers: int, max_len: int):
        super().__init__(layers=[BufferLayer(max_len) for _ in range(num_layers)])
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, max_len: int) -> KVCache:
        return cls(model.config.num_hidden_layers, max_len)

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Forget every entry from ``length`` on (a rejected draft, or an edited chat history)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)

    @torch.inference_mode()
    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Keep entries ``[0, start)`` plus ``start + keep`` (ascending offsets), moved to follow them.

        ``keep`` indexes the entries written by the last forward (e.g. the accepted tree path).
        """
        n = keep.numel()
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            src = keep.to(layer.keys.device) + start
            # index_select copies first, so overlapping source and target ranges are safe
            layer.keys[:, :, start : start + n] = layer.keys.index_select(2, src)
            layer.values[:, :, start : start + n] = layer.values.index_select(2, src)
            layer.length = start + n
