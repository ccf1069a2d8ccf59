"""The reference runtime: the unmodified transformers model over a compactable KV cache.

``--runtime hf`` runs it; tests use it as the reference for the lean forward, and it is the
fallback for architectures the lean forward does not cover (float32 / bfloat16 weights only).

The cache is preallocated and the model's own forward writes into it:

Each layer owns one buffer of ``[B, kv_heads, max_len, head_dim]``; ``update`` writes the new
entries after the current length and returns views of the filled part, so a forward never copies
the whole cache. After tree verification, ``compact`` keeps the accepted nodes' entries and drops
the rest.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..sampling import greedy, with_greedy
from . import attention_kernels, split_answers


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

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[BufferLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Forget every entry from ``length`` on (a rejected draft, or an edited chat history)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)

    @torch.inference_mode()
    def compact(self, start: int, keep: list[int]) -> None:
        """Keep entries ``[0, start)`` plus ``start + keep`` (ascending offsets), moved to follow them.

        ``keep`` indexes the entries written by the last forward (e.g. the accepted tree path).
        """
        n = len(keep)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            src = torch.tensor(keep, device=layer.keys.device) + start
            # index_select copies first, so overlapping source and target ranges are safe
            layer.keys[:, :, start : start + n] = layer.keys.index_select(2, src)
            layer.values[:, :, start : start + n] = layer.values.index_select(2, src)
            layer.length = start + n


class HFRuntime:
    """``forward`` / ``lm_head`` of a transformers causal LM (see runtime/__init__.py)."""

    name = "hf"
    cuda_graphs = False  # transformers' forward is never replayed from CUDA graphs

    def __init__(self, model, weights: str):
        self.model, self.weights, self.dtype = model, weights, model.dtype
        # transformers renamed ``past_key_values`` to ``cache`` in 5.2x; pass whichever this one takes
        takes = inspect.signature(type(model.model).forward).parameters
        self.cache_kw = "cache" if "cache" in takes else "past_key_values"

    def new_cache(self, capacity: int, device) -> KVCache:
        return KVCache(self.model.config.num_hidden_layers, capacity)

    def forward(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, tree_mask=None) -> torch.Tensor:
        mask = None
        if tree_mask is not None:  # [q, q] tree part; every node also sees the whole context
            past = cache.length
            mask = torch.ones(1, 1, ids.numel(), past + ids.numel(), dtype=torch.bool, device=ids.device)
            mask[0, 0, :, past:] = tree_mask
        with attention_kernels(ids.device):
            out = self.model.model(
                input_ids=ids.view(1, -1),
                position_ids=positions.view(1, -1),
                attention_mask=mask,
                use_cache=True,
                **{self.cache_kw: cache},
            )
        return out.last_hidden_state[0]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def lm_head_greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[q, H] -> (logits [q, V], greedy's next tokens [q])"""
        return with_greedy(self.lm_head)(hidden)

    def forward_padded(self, ids: torch.Tensor) -> torch.Tensor:
        """Causal forward of B right-padded sequences, no cache: ids [B, T] -> hidden [B, T, H]."""
        with attention_kernels(ids.device):
            return self.model.model(input_ids=ids).last_hidden_state

    @torch.inference_mode()
    def generate_padded(self, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int, keep_hidden: bool):
        """Greedy answers for a batch of prompts in one left-padded batch (transformers' own batching:
        the GPU path of distillation, thousands of rows) -> list of (tokens [n], hidden [n, H] bf16 or None)."""
        with attention_kernels(self.model.device):
            return self._generate_padded(prompts, max_new_tokens, eos, pad, keep_hidden)

    def _generate_padded(self, prompts, max_new_tokens: int, eos: int, pad: int, keep_hidden: bool):
        from transformers import DynamicCache

        model, device = self.model, self.model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=model.config)
        hidden = model.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self.cache_kw: cache}
        ).last_hidden_state[:, -1]  # [B, H]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        tokens, hiddens = [], []
        last_pos = positions[:, -1]
        for _ in range(max_new_tokens):
            nxt = greedy(model.lm_head(hidden))  # [B]
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            if keep_hidden:
                hiddens.append(hidden.to(torch.bfloat16))
            done |= nxt == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            hidden = model.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                use_cache=True,
                **{self.cache_kw: cache},
            ).last_hidden_state[:, -1]
        return split_answers(torch.stack(tokens, 1), torch.stack(hiddens, 1) if keep_hidden else None, eos)
