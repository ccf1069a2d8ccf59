"""A lean Llama-family forward (Llama, SmolLM, Mistral, Qwen2) over our own KV cache.

Fused QKV and gate/up projections in any weight format (formats.py), a preallocated cache that
verification compacts, and an attention that makes a tree node's row bitwise equal to the
one-token step at that node. Three ways to compute it (``tree_attention``):

  ``kernel`` (CPU default): our CPU kernels (cpu_kernels.cpp) compute every row of a forward, the
  one-token step's included, in one call per layer; each row reads its context, its ancestors and
  itself, in that order, with arithmetic that depends on nothing else. (RMSNorm and SiLU * up run
  in the kernels too wherever they are built: fewer ops a layer.)

  ``rows`` (the CPU fallback where the kernel cannot be built): one ``scaled_dot_product_attention``
  call per row, the one-token step's call on the same keys in the same order. Rows on the tree's
  main chain (the root and its first-child chain, written right after the context) read a plain
  view of the cache, exactly like the one-token step; other rows read their keys gathered into a
  contiguous copy, which this kernel treats the same (measured, and checked by
  tests/test_runtime.py).

  With row-invariant projections (formats.py) the whole forward is then row-for-row identical to
  decoding the accepted path one token at a time. In w4a8, whose projections run our kernels too
  (``chained_prompts``), a prompt is fed the same way, as chains of ``PROMPT_CHUNK`` rows: its K/V
  entries are the bits decoding it token by token writes (a chat turn that reuses them equals a
  fresh run), and on a CPU this is faster than one causal block under torch's attention up to a
  few thousand tokens (docs/runtime.md).

  ``masked`` (CUDA default): on CUDA a step of a small model is bound by kernel launches, not
  arithmetic, and one attention call per row and layer makes a verification cost grow with the tree
  (2.6x a step at 16 rows on an H100). There one call per layer covers every row under the tree
  mask, like transformers' forward; the one-token step reads the cache under a mask too, so both
  run the same attention kernel. It is not bitwise the one-token step, so CUDA's lossless rule is
  the proven near-tie (cuBLAS is not row-invariant either). On CUDA steps are replayed from CUDA
  graphs by default (``static_forward``, ``_StepGraph``; ``CERBERUS_CUDA_GRAPHS=0`` runs eagerly).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..models import CerberusError
from ..sampling import greedy
from . import attention_kernels, capture, cpu_kernels, cuda_graphs_default, split_answers
from .formats import INT4_FORMATS, Linear, activation_dtype, dense, int4_from_blocks, kernel_projection

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TREE_ATTENTION = ("kernel", "rows", "masked")  # exact, one call / exact, a call per row / one masked call (CUDA)
PROMPT_CHUNK = 128  # rows of a prompt per chain on the kernel path (64 and 32 measured slower)


class KVCache:
    """Keys and values of one sequence: ``[layers, kv_heads, capacity, head_dim]``."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.zeros(layers, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per-layer views
        self.capacity = capacity
        self.length = 0
        self.slot_of: list[int] | None = None  # row -> offset of the last tree forward's entries (None: the row's own)
        self.graphs: dict = {}  # q -> _StepGraph (LeanLlama.cuda_graphs), freed with the cache

    def truncate(self, length: int) -> None:
        """Forget every entry from ``length`` on (a rejected draft, or an edited chat history)."""
        self.length = min(self.length, length)

    def compact(self, start: int, keep: list[int]) -> None:
        """Keep entries ``[0, start)`` plus the rows ``keep`` (ascending) of the last forward, moved to follow them."""
        src = keep if self.slot_of is None else [self.slot_of[row] for row in keep]  # offsets after ``start``
        n = len(keep)
        self.length = start + n
        if src == list(range(n)):
            return  # a path along the tree's main chain: already in place
        index = torch.tensor(src, device=self.k.device) + start
        self.k[:, :, start : start + n] = self.k.index_select(2, index)  # index_select copies first
        self.v[:, :, start : start + n] = self.v.index_select(2, index)


class LeanLlama(torch.nn.Module):
    """Weights of a Llama-family model in one format, and its forward over a ``KVCache``."""

    name = "lean"

    def __init__(self, hf_model, weights: str, q4_blocks: dict | None = None, tree_attention: str | None = None):
        super().__init__()
        cfg = hf_model.config
        arch = (getattr(cfg, "architectures", None) or [type(hf_model).__name__])[0]
        if arch not in ARCHITECTURES:
            raise CerberusError(f"The lean runtime covers {', '.join(ARCHITECTURES)}, not {arch}; use --runtime hf.")
        self.weights, self.dtype = weights, activation_dtype(weights)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        state = hf_model.state_dict()

        from_gguf = weights in INT4_FORMATS and q4_blocks is not None
        requantized = []

        def linear(names: list[str]) -> Linear:
            """One layer for the concatenated outputs of ``names`` (GGUF 4-bit blocks used as they are)."""
            biases = [state.get(f"{n}.bias") for n in names]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            if from_gguf and all(n in q4_blocks for n in names):
                q, scale, zero = (torch.cat([q4_blocks[n][i] for n in names]) for i in range(3))
                layer = int4_from_blocks(q, scale, zero, weights)
                layer.bias = None if bias is None else bias.to(self.dtype)
                return layer
            if from_gguf:
                requantized.extend(names)
            return dense(torch.cat([state[f"{n}.weight"] for n in names]), weights, bias)

        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                {
                    "attn_norm": _doubled(state[p + "input_layernorm.weight"], self.dtype),
                    "wqkv": linear([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]),
                    "wo": linear([p + "self_attn.o_proj"]),
                    "mlp_norm": _doubled(state[p + "post_attention_layernorm.weight"], self.dtype),
                    "w13": linear([p + "mlp.gate_proj", p + "mlp.up_proj"]),
                    "w2": linear([p + "mlp.down_proj"]),
                }
            )
        if requantized:
            print(
                f"{weights}: {len(requantized)} projections are not Q4_0/Q4_1 in the GGUF; quantized on load "
                "(group 32) from their de-quantized weights",
                file=sys.stderr,
            )
        self.embed = hf_model.get_input_embeddings().weight.detach().to(self.dtype)  # [V, H]
        self.norm = _doubled(state["model.norm.weight"], self.dtype)
        # LM head [V, H]: 8-bit under 4-bit weights (a 4-bit LM head changed 12% of greedy next tokens
        # against float32 on real prompts; int8 changed 4%, like bfloat16); w4a8's runs on integer
        # dot products too, with int8 activations (docs/runtime.md)
        head_format = {"w4a8": "w8a8", "int4": "int8"}.get(weights, weights)
        self.output = dense(hf_model.get_output_embeddings().weight.detach(), head_format)
        # RoPE tables from transformers' own rotary module, so every rope-scaling variant stays right
        device = self.embed.device
        positions = torch.arange(cfg.max_position_embeddings, device=device)[None]
        cos, sin = hf_model.model.rotary_emb(torch.zeros(1, dtype=torch.float32, device=device), positions)
        half = self.head_dim // 2
        sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # signed, for _rope's roll
        self.cos, self.sin = (t.to(self.dtype) for t in (cos[0], sin))  # [max_pos, D]
        if tree_attention is not None and tree_attention not in TREE_ATTENTION:
            raise CerberusError(f"Unknown tree attention {tree_attention!r}; use one of {TREE_ATTENTION}.")
        shape = {
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "head_dim": self.head_dim,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
        }
        fits = device.type == "cpu" and cpu_kernels.supports(shape, self.dtype)
        if tree_attention == "kernel" and not fits:
            raise CerberusError(
                "The CPU kernels run on a CPU with float32 or bfloat16 activations, head_dim "
                f"{cpu_kernels.HEAD_DIMS}, at most {cpu_kernels.MAX_GROUP} query heads per kv head and "
                "widths divisible by 16; use tree attention 'rows' (or 'masked' on CUDA)."
            )
        self.kernels = cpu_kernels.load() if fits else None  # torch.ops.cerberus, or None: torch's ops
        if tree_attention == "kernel" and self.kernels is None:
            raise CerberusError("The CPU kernels could not be built here; use tree attention 'rows'.")
        default = "masked" if device.type == "cuda" else "kernel" if self.kernels is not None else "rows"
        self.tree_attention = tree_attention or default
        self.cuda_graphs = cuda_graphs_default()  # replay CUDA steps (and the heads: engine) from graphs
        self.tree_rows: dict = {}  # tree mask -> _TreeRows: ~0.1 ms of Python a verification, the same few trees
        self.stack = self._kernel_stack() if self.tree_attention == "kernel" else None
        # prompts fed as chains of rows, each computed as its one-token step: w4a8, whose projections
        # run our kernels (row-invariant by construction) on every CPU that has them; int4 and int8
        # keep one causal block, so that their answers stay the same with torch's kernels and ours
        self.chained_prompts = self.stack is not None and weights == "w4a8"

    def _kernel_stack(self) -> tuple | None:
        """The weights as the ``layers`` kernel op takes them (norms, kinds, packed, scales, biases),
        or None where a projection does not run one of our kernels (float formats, torch's int4)."""
        projections = [kernel_projection(layer[name]) for layer in self.layers for name in ("wqkv", "wo", "w13", "w2")]
        if any(p is None for p in projections):
            return None
        norms = [layer[name] for layer in self.layers for name in ("attn_norm", "mlp_norm")] + [self.norm]
        return (norms, *(list(column) for column in zip(*projections, strict=True)))

    def new_cache(self, capacity: int, device) -> KVCache:
        return KVCache(self.num_layers, self.num_kv_heads, capacity, self.head_dim, self.dtype, device)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, H] final hidden states -> [q, V] logits"""
        return self.output(hidden)

    def lm_head_greedy(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[q, H] -> (logits [q, V], greedy's next tokens [q]), in one kernel call under w4a8"""
        return self.output.with_argmax(hidden)

    def forward(self, cache: KVCache, ids, positions, tree_mask=None) -> torch.Tensor:
        """ids, positions [q] -> final normalized hidden states [q, H]; K/V written into ``cache``.

        ``tree_mask`` [q, q] (row attends to column) marks a verification forward; without it the
        q tokens are a causal run (one token, or a prompt).
        """
        q, start = ids.numel(), cache.length
        if start + q > cache.capacity:
            raise CerberusError(f"KV cache overflow: {start + q} > {cache.capacity} entries")
        if tree_mask is None and q > 1 and self.chained_prompts:  # a prompt: chains, each row as its step
            hidden = []
            for s in range(0, q, PROMPT_CHUNK):
                n = min(PROMPT_CHUNK, q - s)
                hidden.append(self.forward(cache, ids[s : s + n], positions[s : s + n], _chain(n)))
            return torch.cat(hidden)
        if self.cuda_graphs and ids.is_cuda and start > 0 and (q == 1 or tree_mask is not None):
            return self._replay(cache, ids, positions, tree_mask)
        masked = tree_mask is not None and self.tree_attention == "masked"
        rows = self._tree_rows(tree_mask) if tree_mask is not None and not masked else None
        slots = torch.arange(q) if rows is None else rows.slots
        slots = (slots + start).to(ids.device)
        cache.slot_of = None if rows is None else rows.slot_of
        # under 'masked' a one-token step reads the cache under a mask too: the kernel its tree rows run
        block = rows is None and (q > 1 or self.tree_attention == "masked")
        causal_prompt = start == 0 and tree_mask is None
        mask = None
        if block and not causal_prompt:
            block_rows = tree_mask  # a tree, or a prompt after the cache: causal
            if block_rows is None:
                block_rows = torch.ones(q, q, dtype=torch.bool, device=ids.device).tril()
            mask = self._block_mask(start + q, start, block_rows)

        fused = None  # the kernel path: RoPE, cache writes and every row's attention in one op a layer
        if self.tree_attention == "kernel" and not block:
            own, own_count = (start + rows.own, rows.own_count) if rows is not None else _own_entry(start)
            if self.stack is not None:  # and every layer in one op
                cos, sin = self.cos[positions], self.sin[positions]  # [q, D]
                x = self.embed[ids]  # [q, H]
                hidden = self.kernels.layers(
                    x, *self.stack, cos, sin, cache.k, cache.v, slots, start, own, own_count, self.eps
                )
                cache.length = start + q
                return hidden

            def fused(i: int, qkv, cos, sin) -> torch.Tensor:
                k, v = cache.layers[i]
                return self.kernels.rope_attention(qkv, cos, sin, k, v, slots, start, own, own_count)

        def attend(i: int, xq, xk, xv) -> torch.Tensor:
            k, v = cache.layers[i]
            xk, xv = xk.transpose(0, 1), xv.transpose(0, 1)  # [Hkv, q, D]
            k.index_copy_(1, slots, xk)  # this forward's entries into their slots
            v.index_copy_(1, slots, xv)
            if block:  # a prompt, or a tree under one mask
                return self._attend_block(k, v, xq, start + q, mask)
            attn = self._attend_rows(k, v, xq, xk, xv, rows, start)
            if rows is not None and rows.off_chain:  # they borrowed the chain's slots: put it back
                k.index_copy_(1, slots, xk)
                v.index_copy_(1, slots, xv)
            return attn

        hidden = self._layers(ids, positions, attend, fused)
        cache.length = start + q
        return hidden

    def forward_rows(self, caches: list[KVCache], ids, positions) -> torch.Tensor:
        """One new token for each of B sequences, each with its own cache: ids, positions [B] ->
        hidden [B, H]. The projections run on the B rows at once; each row attends alone, exactly as
        the one-token step (so every row is bitwise the token it would be decoded alone)."""
        for c in caches:
            if c.length + 1 > c.capacity:
                raise CerberusError(f"KV cache overflow: {c.length + 1} > {c.capacity} entries")

        def attend(i: int, xq, xk, xv) -> torch.Tensor:
            out = []
            for b, c in enumerate(caches):
                k, v = c.layers[i]
                k[:, c.length] = xk[b]
                v[:, c.length] = xv[b]
                out.append(self._attend_step(k, v, xq[b : b + 1], c.length))
            return torch.cat(out)

        entries = [_own_entry(c.length) for c in caches]  # each row's own slot, for every layer's kernel call

        def fused(i: int, qkv, cos, sin) -> torch.Tensor:
            out = []
            for b, (c, (own, one)) in enumerate(zip(caches, entries, strict=True)):
                k, v = c.layers[i]
                row = qkv[b : b + 1], cos[b : b + 1], sin[b : b + 1]
                out.append(self.kernels.rope_attention(*row, k, v, own[0], c.length, own, one))
            return torch.cat(out)

        hidden = self._layers(ids, positions, attend, fused if self.tree_attention == "kernel" else None)
        for c in caches:
            c.length += 1
            c.slot_of = None
        return hidden

    def forward_padded(self, ids: torch.Tensor) -> torch.Tensor:
        """Causal forward of B right-padded sequences from position 0, no cache (teacher forcing):
        ids [B, T] -> hidden [B, T, H]. Padding after a sequence cannot change it."""
        B, T = ids.shape
        rep = self.num_heads // self.num_kv_heads

        def attend(i: int, xq, xk, xv) -> torch.Tensor:  # [B T, heads, D] -> [B T, Hq D]
            q, k, v = (x.view(B, T, -1, self.head_dim).transpose(1, 2) for x in (xq, xk, xv))  # [B, heads, T, D]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B * T, -1)

        positions = torch.arange(T, device=ids.device).repeat(B)
        return self._layers(ids.flatten(), positions, attend).reshape(B, T, -1)

    @torch.inference_mode()
    def generate_padded(self, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int, keep_hidden: bool):
        """Greedy answers for a batch of prompts decoded together, left-padded, over one shared cache
        (the GPU path of distillation: thousands of rows a forward) -> list of (tokens [n], hidden
        [n, H] bf16 or None). Not bitwise what decoding one prompt alone gives (padding changes the
        kernels' shapes), but the same model in the same format."""
        B, P, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
        Hkv, D, device = self.num_kv_heads, self.head_dim, self.embed.device
        rep = self.num_heads // Hkv
        ids = torch.full((B, P), pad, dtype=torch.long)
        real = torch.ones((B, P + N), dtype=torch.bool)  # [B, P + N]: which keys are tokens, not padding
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p)
            real[i, : P - len(p)] = False
        ids, real = ids.to(device), real.to(device)
        positions = (real[:, :P].cumsum(-1) - 1).clamp_min(0)  # [B, P]
        k = torch.zeros(self.num_layers, B, Hkv, P + N, D, dtype=self.dtype, device=device)
        v = torch.zeros_like(k)
        # a padding query also sees itself, so no softmax row is empty (its NaN would reach real rows)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=device)

        hidden = []
        step = max(1, 262144 // P)  # prompt rows a forward
        for r0 in range(0, B, step):
            rows = slice(r0, min(B, r0 + step))
            b = rows.stop - rows.start
            mask = (causal & real[rows, None, None, :P]) | eye  # [b, 1, P, P]

            def attend_prompt(i: int, xq, xk, xv, rows=rows, b=b, mask=mask) -> torch.Tensor:
                q, kk, vv = (x.view(b, P, -1, D).transpose(1, 2) for x in (xq, xk, xv))  # [b, heads, P, D]
                k[i, rows, :, :P], v[i, rows, :, :P] = kk, vv
                kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
                out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # [b, Hq, P, D]
                return out.transpose(1, 2).reshape(b * P, -1)

            h = self._layers(ids[rows].flatten(), positions[rows].flatten(), attend_prompt)
            hidden.append(h.reshape(b, P, -1)[:, -1])
        hidden = torch.cat(hidden)  # [B, H]: the state after each prompt's last token

        position = positions[:, -1]  # [B]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, hiddens = [], []
        for t in range(N):
            nxt = greedy(self.lm_head(hidden))  # [B]
            nxt = torch.where(done, pad, nxt)
            tokens.append(nxt)
            if keep_hidden:
                hiddens.append(hidden.to(torch.bfloat16))
            done |= nxt == eos
            if t == N - 1 or bool(done.all()):
                break
            end, position = P + t + 1, position + 1

            def attend_step(i: int, xq, xk, xv, end=end) -> torch.Tensor:
                k[i, :, :, end - 1], v[i, :, :, end - 1] = xk, xv
                group = xq.view(B, Hkv, rep, D)  # the query heads sharing a kv head as its queries
                keys, values = k[i, :, :, :end], v[i, :, :, :end]  # [B, Hkv, end, D]
                out = F.scaled_dot_product_attention(group, keys, values, attn_mask=real[:, None, None, :end])
                return out.reshape(B, -1)

            hidden = self._layers(nxt, position, attend_step)
        return split_answers(torch.stack(tokens, 1), torch.stack(hiddens, 1) if keep_hidden else None, eos)

    def static_forward(self, cache: KVCache, ids, positions, start, tree) -> torch.Tensor:
        """``forward`` with every shape fixed by the cache's capacity, as a CUDA graph needs: the q
        tokens' K/V go to slots ``start + [0, q)`` (``start`` a 0-d tensor) and each row attends to
        the whole cache under a mask: the context ``[0, start)`` and the rows ``tree`` [q, q] marks
        (causal for a chain). Row for row the same attention as the masked path (float32: within
        rounding; tests/test_runtime.py). ids, positions [q] -> hidden [q, H]; ``cache.length`` is
        left to the caller."""
        q, capacity = ids.numel(), cache.capacity
        slots = start + torch.arange(q, device=ids.device)  # [q]
        mask = self._block_mask(capacity, start, tree)  # [rep q, T]

        def attend(i: int, xq, xk, xv) -> torch.Tensor:
            k, v = cache.layers[i]
            k.index_copy_(1, slots, xk.transpose(0, 1))
            v.index_copy_(1, slots, xv.transpose(0, 1))
            return self._attend_block(k, v, xq, capacity, mask)

        return self._layers(ids, positions, attend)

    def _replay(self, cache: KVCache, ids, positions, tree_mask) -> torch.Tensor:
        """A one-token step or a verification replayed from the CUDA graph of this cache and row
        count (captured on first use): one launch instead of ~450 for a host-bound step."""
        q, start = ids.numel(), cache.length
        graph = cache.graphs.get(q)
        if graph is None:
            graph = cache.graphs[q] = _StepGraph(self, cache, q)
        hidden = graph.replay(ids, positions, start, tree_mask)
        cache.length, cache.slot_of = start + q, None
        return hidden

    def _tree_rows(self, tree_mask: torch.Tensor) -> _TreeRows:
        key = tree_mask.cpu().numpy().tobytes()  # row-major bools: the shape is part of the length
        rows = self.tree_rows.get(key)
        if rows is None:
            if len(self.tree_rows) >= 1024:  # trees are few in practice (lookup merges make more): stay bounded
                self.tree_rows.clear()
            rows = self.tree_rows[key] = _TreeRows(tree_mask)
        return rows

    def _layers(self, ids, positions, attend, fused=None) -> torch.Tensor:
        """The transformer over q tokens: ids, positions [q] -> normalized hidden [q, H].
        ``attend(layer, xq [q, Hq, D], xk [q, Hkv, D], xv [q, Hkv, D]) -> [q, Hq D]`` stores K/V and
        computes attention after RoPE; ``fused(layer, qkv [q, (Hq + 2 Hkv) D], cos, sin [q, D])``, where
        given, does all of it in one kernel op."""
        q = ids.numel()
        cos, sin = self.cos[positions], self.sin[positions]  # [q, D]
        x = self.embed[ids]  # [q, H]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        with attention_kernels(x.device):
            for i, layer in enumerate(self.layers):
                qkv = layer["wqkv"](self._norm(x, layer["attn_norm"]))  # [q, (Hq + 2 Hkv) D]
                if fused is not None:
                    attn = fused(i, qkv, cos, sin)
                else:
                    qk = _rope(qkv[:, : (Hq + Hkv) * D].view(q, Hq + Hkv, D), cos[:, None], sin[:, None])
                    attn = attend(i, qk[:, :Hq], qk[:, Hq:], qkv[:, (Hq + Hkv) * D :].view(q, Hkv, D))
                x = x + layer["wo"](attn)
                x = x + layer["w2"](self._silu_mul(layer["w13"](self._norm(x, layer["mlp_norm"]))))
        return self._norm(x, self.norm)

    def _norm(self, x: torch.Tensor, doubled_weight: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, doubled_weight, self.eps)
        return _rms_norm(x, doubled_weight, self.eps)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[q, 2I] gate and up projections -> [q, I] SiLU(gate) * up"""
        if self.kernels is not None:
            return self.kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _attend_rows(self, k, v, xq, xk, xv, rows, start: int) -> torch.Tensor:
        """Each row alone, exactly as the one-token step computes it. k, v [Hkv, capacity, D] (one
        layer's cache, this forward's entries in their slots), xk, xv [Hkv, q, D] (those entries),
        xq [q, Hq, D] -> [q, Hq D]"""
        if rows is None:
            return self._attend_step(k, v, xq, start)
        q, Hkv, D = xq.shape[0], self.num_kv_heads, self.head_dim
        group = xq.view(q, Hkv, -1, D)  # [q, Hkv, Hq / Hkv, D]: query heads sharing a kv head
        out = [None] * q
        for r in rows.chain:  # context + chain so far: a view, as in the one-token step
            end = start + r[1] + 1
            out[r[0]] = F.scaled_dot_product_attention(group[r[0], None], k[None, :, :end], v[None, :, :end])
        for r, ancestors in rows.off_chain:  # its ancestors' entries copied right after the context
            end = start + ancestors.numel()
            k[:, start:end] = xk[:, ancestors]
            v[:, start:end] = xv[:, ancestors]
            out[r] = F.scaled_dot_product_attention(group[r, None], k[None, :, :end], v[None, :, :end])
        return torch.cat(out).reshape(q, -1)

    def _attend_step(self, k, v, xq, start: int) -> torch.Tensor:
        """The one-token step: xq [1, Hq, D] attends to the cache's ``[0, start]`` (its context and
        itself) -> [1, Hq D]"""
        group = xq.view(1, self.num_kv_heads, -1, self.head_dim)  # [1, Hkv, Hq / Hkv, D]
        return F.scaled_dot_product_attention(group, k[None, :, : start + 1], v[None, :, : start + 1]).view(1, -1)

    def _block_mask(self, n_keys: int, start, tree: torch.Tensor) -> torch.Tensor:
        """[rep q, n_keys] bool, built once per forward for every layer's ``_attend_block``: the keys
        each of its grouped query rows reads: the cache's first ``start`` entries (an int, or a 0-d
        tensor for a CUDA graph), then the block's rows at ``start`` as ``tree`` [q, q] marks (causal
        for a run of tokens); nothing after them."""
        q = tree.shape[0]
        mask = (torch.arange(n_keys, device=tree.device) < start).expand(q, n_keys).clone()  # [q, T]
        mask.index_copy_(1, start + torch.arange(q, device=tree.device), tree)
        return mask.repeat(self.num_heads // self.num_kv_heads, 1)  # the grouped query rows' order

    def _attend_block(self, k, v, xq, n_keys: int, mask=None) -> torch.Tensor:
        """The q rows in one call over the cache's first ``n_keys`` entries: a prompt from position 0
        (``mask`` None: causal), or under a ``_block_mask`` (of ``forward`` or ``static_forward``) a tree or a
        prompt after the cache. xq [q, Hq, D] -> [q, Hq D]"""
        q, Hkv, D = xq.shape[0], self.num_kv_heads, self.head_dim
        rep = self.num_heads // Hkv
        if mask is None:
            keys = k[:, :n_keys].repeat_interleave(rep, 0)[None]  # [1, Hq, n_keys, D]
            values = v[:, :n_keys].repeat_interleave(rep, 0)[None]
            out = F.scaled_dot_product_attention(xq.transpose(0, 1)[None], keys, values, is_causal=True)
            return out[0].transpose(0, 1).reshape(q, -1)
        # the rep query heads that share a kv head stacked as rows: the cache is read as it lies, no copy
        query = xq.view(q, Hkv, rep, D).permute(1, 2, 0, 3).reshape(1, Hkv, rep * q, D)  # [1, Hkv, rep q, D]
        keys, values = k[None, :, :n_keys], v[None, :, :n_keys]  # [1, Hkv, T, D]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)  # [1, Hkv, rep q, D]
        return out.view(Hkv, rep, q, D).permute(2, 0, 1, 3).reshape(q, -1)


class _StepGraph:
    """``LeanLlama.static_forward`` over one cache for q rows, captured as a CUDA graph. Inputs are
    copied into static buffers before each replay; the output buffer is overwritten by the next."""

    def __init__(self, model: LeanLlama, cache: KVCache, q: int):
        device = cache.k.device
        self.ids = torch.zeros(q, dtype=torch.long, device=device)
        self.positions = torch.zeros(q, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.tree = torch.ones(q, q, dtype=torch.bool, device=device).tril()

        def body():
            return model.static_forward(cache, self.ids, self.positions, self.start, self.tree)

        self.body, self.graph, self.hidden = body, None, None

    def replay(self, ids, positions, start: int, tree_mask) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.start.fill_(start)
        if tree_mask is not None:
            self.tree.copy_(tree_mask)
        if self.graph is None:  # the warm-ups write this step's K/V, which the replay writes again
            self.graph, self.hidden = capture(self.body)
        self.graph.replay()
        return self.hidden.clone()


class _TreeRows:
    """Where each row of a verification forward writes its K/V and which keys it reads.

    The main chain (the root, then first children) gets the first slots after the context, so its
    rows read plain views of the cache. Every other row reads the context followed by copies of its
    ancestors' entries (itself included), written over the chain's slots while it is computed.
    """

    def __init__(self, mask: torch.Tensor):
        device, mask = mask.device, mask.cpu()
        q = mask.shape[0]
        ancestors = [mask[r, : r + 1].nonzero().flatten().tolist() for r in range(q)]  # depth order, itself last
        chain = [0]
        for r in range(1, q):
            if ancestors[r] == chain + [r]:
                chain.append(r)
        order = chain + [r for r in range(q) if r not in chain]
        self.slots = torch.empty(q, dtype=torch.long)  # [q] row r's entry is at context + slots[r]
        self.slots[order] = torch.arange(q)
        self.slot_of = None if order == list(range(q)) else self.slots.tolist()  # KVCache.slot_of
        self.chain = [(r, i) for i, r in enumerate(chain)]  # (row, slot)
        self.off_chain = [(r, torch.tensor(ancestors[r], device=device)) for r in order[len(chain) :]]
        # for the kernel: [q, depth + 1] each row's ancestors' and its own slots after the context, and their count
        self.own_count = torch.tensor([len(a) for a in ancestors])
        self.own = torch.zeros(q, int(self.own_count.max()), dtype=torch.long)
        for r, a in enumerate(ancestors):
            self.own[r, : len(a)] = self.slots[a]


def _chain(n: int) -> torch.Tensor:
    """[n, n] the tree mask of a chain: each row attends to itself and the rows before it"""
    return torch.ones(n, n, dtype=torch.bool).tril()


def _own_entry(start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's one-token step: after the context ``[0, start)`` the row reads its own entry."""
    return torch.tensor([[start]]), torch.ones(1, dtype=torch.long)


def _doubled(weight: torch.Tensor, dtype) -> torch.Tensor:
    """An RMSNorm weight [H] as the [2H] LayerNorm weight ``_rms_norm`` uses."""
    return torch.cat([weight, weight]).to(dtype)


def _rms_norm(x: torch.Tensor, doubled_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [q, H] with weight w, computed as the LayerNorm of [x, -x]: that row has mean 0
    and variance mean(x^2), so its first half is x / sqrt(mean(x^2) + eps) * w. On a CPU a decoding
    step is bound by per-op overhead, and LayerNorm is one fused kernel where ``F.rms_norm`` runs
    about ten (measured: 1.5 ms of a 28 ms int4 step). Row-wise like it, so row-invariant. The half
    is made contiguous for the int4 kernel: free for one row, a copy for several."""
    H = x.shape[-1]
    return F.layer_norm(torch.cat([x, -x], -1), (2 * H,), doubled_weight, None, eps)[:, :H].contiguous()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [q, heads, D], cos / signed sin [q, 1, D]: transformers' rotate-half RoPE,
    x cos + (-x2, x1) sin, with the sign folded into ``sin``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
