"""Draft heads on the base model's last hidden state: Medusa heads and Cerberus heads.

Head k (0-based) reads the hidden state at position t and predicts the token at t + k + 2 (the base
LM head predicts t + 1). All heads run in one call; their logits come from one matmul against the
(shared, frozen) LM head, optionally restricted to a reduced vocabulary of frequent tokens.

Cerberus heads are chained: head k's block reads Concat(h, z_{k-1}). In the paper the chain starts
from z_0 = h. With ``root_token`` it starts from the input embedding of token t + 1 instead: the
step's root, which the base model has already chosen when the heads run, so the heads no longer
have to guess it. Same cost (one embedding row), same sequential link.

A checkpoint is a directory with ``config.json`` and ``model.safetensors``. The config records the
base model's fingerprint so that heads are never run on a model they were not trained for.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .lookup import HEADS_NGRAM, NGRAM
from .models import CerberusError, process_alive
from .runtime import capture

HEAD_TYPES = ("medusa", "cerberus")


def model_fingerprint(model, name: str) -> dict:
    """Identity of a base model: name, sizes and a hash of (a strided sample of) its LM head."""
    weight = model.get_output_embeddings().weight  # [V, H]
    sample = weight[::64].detach().to("cpu", torch.bfloat16).contiguous()  # bf16: same for fp32 and bf16 loads
    digest = hashlib.sha256(sample.view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    return {
        "name": name,
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "lm_head_sha": digest,
    }


@dataclass
class HeadsConfig:
    head_type: str = "cerberus"
    num_heads: int = 4
    num_layers: int = 1
    hidden_size: int = 0
    vocab_size: int = 0
    head_vocab_size: int = 0  # 0 = full vocabulary
    own_lm_head: bool = False
    root_token: bool = False  # cerberus only: the chain starts from the root token's embedding
    reads_drafts: bool = False  # root_token heads: head k >= 2 also reads the token head k - 1 drafted
    reads_lookup: bool = False  # root_token heads: the chain also reads what prompt lookup found after the root
    lookup_tokens: int = 1  # reads_lookup: how many of lookup's tokens are read; head k's logits raise the k-th
    lookup_max_ngram: int = NGRAM  # reads_lookup: the longest n-gram matched (the match's length n is read up to it)
    base_model: dict = field(default_factory=dict)
    gate: str = "logits"  # default gate for this checkpoint: hidden | logits | off
    gate_threshold: float = float("inf")
    tree: list | None = None  # default tree for this checkpoint (Medusa choices notation)
    training: dict = field(default_factory=dict)  # recipe and held-out accuracy, for the record

    @classmethod
    def from_dict(cls, d: dict) -> HeadsConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ResBlock(nn.Module):
    """``x + SiLU(W x)`` with W zero-initialised, so an untrained block is the identity."""

    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.linear = nn.Linear(width_in, width_out)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.packed = None  # DraftHeads.pack_for: the same layer in a faster format, inference only

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        linear = self.linear if self.packed is None else self.packed
        return (x if residual is None else residual) + F.silu(linear(x))


class DraftHeads(nn.Module):
    """K heads mapping a hidden state ``[..., H]`` to head states ``[..., K, H]`` and logits."""

    def __init__(self, config: HeadsConfig, lm_head_weight: torch.Tensor | None = None):
        super().__init__()
        if config.head_type not in HEAD_TYPES:
            raise CerberusError(f"Unknown head type {config.head_type!r}; use one of {HEAD_TYPES}.")
        if config.root_token and config.head_type != "cerberus":
            raise CerberusError("root_token needs Cerberus heads (it is where their chain starts).")
        if config.reads_drafts and not config.root_token:
            raise CerberusError("reads_drafts needs root_token heads (the drafts continue the root's chain).")
        if config.reads_lookup and not config.root_token:
            raise CerberusError("reads_lookup needs root_token heads (the lookup continues the root).")
        if config.reads_lookup and not 1 <= config.lookup_tokens <= config.num_heads:
            raise CerberusError(f"lookup_tokens must be 1..num_heads ({config.num_heads}); got {config.lookup_tokens}.")
        self.config = config
        H, K, L = config.hidden_size, config.num_heads, config.num_layers
        sequential = config.head_type == "cerberus"
        # Cerberus: the first block of head k reads Concat(h, z_{k-1}) (2H -> H) and adds it to h.
        self.blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(2 * H if (sequential and layer == 0) else H, H) for layer in range(L))
            for _ in range(K)
        )
        if config.reads_lookup:  # zero at the start: untrained, the heads read the root alone
            self.lookup_token = nn.Linear(H, H, bias=False)  # the token lookup proposes, embedded
            # how long the matched n-gram was (0: none)
            self.lookup_ngram = nn.Embedding(config.lookup_max_ngram + 1, H)
            # head k's logit bonus for lookup's k-th token, per n-gram length (0: unused) [T * (n_max + 1)]
            self.lookup_bonus = nn.Linear(H, config.lookup_tokens * (config.lookup_max_ngram + 1))
            for weight in self.lookup_parameters():
                nn.init.zeros_(weight)
        v_head = config.head_vocab_size or config.vocab_size
        self.register_buffer("vocab_ids", torch.arange(v_head), persistent=True)  # [V'] token ids
        if config.own_lm_head:
            self.lm_heads = nn.ModuleList(nn.Linear(H, v_head, bias=False) for _ in range(K))
        self.register_buffer("shared_weight", torch.empty(0), persistent=False)  # [V', H]
        self.packed_logits = None  # pack_for: shared_weight (or each own LM head) in a faster format, inference only
        self.packed_lookup_token = None  # pack_for: lookup_token in that format (``reads_lookup``)
        self.kernel_draft = None  # pack_for: what the CPU kernels' draft_topk takes besides one position's inputs
        self.register_buffer("embed_weight", torch.empty(0), persistent=False)  # [V, H], root_token only
        self.register_buffer("output_weight", torch.empty(0), persistent=False)  # [V, H] base LM head, reads_lookup
        self.graphs: dict = {}  # (k, heads, rootless, dtype) or ("draft", tree, dtype) -> a captured call (CUDA graphs)
        if lm_head_weight is not None:
            self.attach_lm_head(lm_head_weight)

    def lookup_parameters(self) -> list[nn.Parameter]:
        """The weights that read lookup (``reads_lookup``; what ``--train-only lookup`` trains)."""
        return [p for name, p in self.named_parameters() if name.startswith("lookup_")]

    def attach_base(self, model) -> None:
        """Take what the heads borrow from the base model: LM head rows and (root_token) embeddings."""
        self.attach_lm_head(model.get_output_embeddings().weight)
        if self.config.root_token:
            self.embed_weight = model.get_input_embeddings().weight.detach()
        if self.config.reads_lookup:  # the copy column's rows: any token lookup finds
            self.output_weight = model.get_output_embeddings().weight.detach()

    def attach_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Take the base LM head rows of the head vocabulary (frozen, not saved with the heads)."""
        rows = lm_head_weight.detach()[self.vocab_ids.to(lm_head_weight.device)]
        self.shared_weight = rows.to(self.blocks[0][0].linear.weight.dtype).contiguous()

    def set_vocab(self, vocab_ids: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        self.vocab_ids = vocab_ids.to(torch.long).clone()
        self.config.head_vocab_size = int(vocab_ids.numel())
        self.attach_lm_head(lm_head_weight)
        if self.config.own_lm_head:
            for head in self.lm_heads:
                head.weight.data = self.shared_weight.clone()

    def init_own_lm_heads(self) -> None:
        for head in self.lm_heads:
            head.weight.data.copy_(self.shared_weight)

    def states(self, h: torch.Tensor, root: torch.Tensor | None = None, heads: int | None = None) -> torch.Tensor:
        """h [..., H], root [...] token ids (root_token heads; ``reads_drafts``: [..., K] the path, the
        root then the token each head drafted) -> [..., K, H]; only the first ``heads`` heads when
        given (a head never reads a later one)"""
        prev = h
        path = None
        if self.config.root_token:
            if root is None:
                raise CerberusError("These heads read the root token; pass it.")
            root, lookup = self.split_lookup(root)
            if self.config.reads_drafts:
                path, root = root, root[..., 0]
            prev = F.embedding(root, self.embed_weight).to(h.dtype)  # [..., H]; no host sync (CUDA graphs)
            if lookup is not None:
                prev = prev + self.lookup_input(lookup, h.dtype)
        outs = []
        for k in range(len(self.blocks[:heads])):
            if path is not None and k > 0:  # the token head k - 1 drafted: where this head's prediction follows
                prev = prev + F.embedding(path[..., k], self.embed_weight).to(h.dtype)
            prev = self._state(k, h, prev)
            outs.append(prev)
        return torch.stack(outs, dim=-2)

    def split_lookup(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What root_token heads read besides h -> (the root [...] or path [..., K], lookup's
        (n, t_1 .. t_T) [..., 1 + T] or None for heads that do not read lookup)."""
        if not self.config.reads_lookup:
            return inputs, None
        root, lookup = inputs[..., : -1 - self.config.lookup_tokens], inputs[..., -1 - self.config.lookup_tokens :]
        return (root if self.config.reads_drafts else root[..., 0]), lookup

    def copy_bonus(self, logits: torch.Tensor, z: torch.Tensor, lookup: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Heads first .. first + J - 1's logits [..., J, V'] -> [..., J, V' + 1]: lookup's token for
        each head (``copied``) raised by a learned amount, a function of the head's state z [..., J, H]
        per matched n-gram length (zero at the start, none without a match), and one more column, the
        copy column: that token where it lies outside the head vocabulary (its base LM-head logit plus
        the bonus; -inf elsewhere), so that copies of rare tokens (names, numbers) are drafted too.
        lookup [..., 1 + T]."""
        J, T, lengths = logits.shape[-2], self.config.lookup_tokens, self.config.lookup_max_ngram + 1
        R = max(0, min(J, T - first))  # the heads here that read a token of lookup (all, but in old heads)
        n = lookup[..., 0]  # [...]
        # each head's bonus row for this n only (a batched matmul over all lengths is slow on CPUs)
        weight = self.lookup_bonus.weight.view(T, lengths, -1)[first : first + R, n].movedim(0, -2)  # [..., R, H]
        bias = self.lookup_bonus.bias.view(T, lengths)[first : first + R, n].movedim(0, -1)  # [..., R]
        bonus = (z[..., :R, :] * weight.to(z.dtype)).sum(-1) + bias.to(z.dtype)  # [..., R]
        bonus = F.pad(bonus, (0, J - R)).expand(z.shape[:-1])[..., None]  # [..., J, 1]
        token = self.copied(lookup, first, J).expand(z.shape[:-1])  # [..., J]
        read = (token >= 0) & (n[..., None] > 0)  # [..., J]
        found = (self.vocab_ids == token[..., None]) & read[..., None]  # [..., J, V']
        logits = logits + bonus.to(logits.dtype) * found.to(logits.dtype)
        outside = read & ~found.any(-1)  # [..., J]
        row = F.embedding(token.clamp_min(0), self.output_weight).to(z.dtype)  # [..., J, H]
        copy = ((z * row).sum(-1, keepdim=True) + bonus).masked_fill(~outside[..., None], float("-inf"))
        return torch.cat([logits, copy.to(logits.dtype)], -1)

    def copied(self, lookup: torch.Tensor, first: int, J: int) -> torch.Tensor:
        """lookup [..., 1 + T] -> [..., J]: the token of lookup's chain that heads first .. first + J - 1
        each read (-1: none, past the T tokens read)."""
        tokens = lookup[..., 1 + first : 1 + min(first + J, self.config.lookup_tokens)]
        return F.pad(tokens, (0, J - tokens.shape[-1]), value=-1)

    def columns(self, tokens: torch.Tensor, lookup: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [..., K'] (head k's at k) -> their column in the heads' logits [..., K']: the index
        in the head vocabulary, or for heads that read lookup the copy column V' where the token is the
        head's copy from outside the vocabulary; -1 where none (what the heads cannot draft)."""
        index = self.column_of().to(tokens.device)
        cols = torch.where(tokens >= 0, index[tokens.clamp_min(0)], -1)
        if not self.config.reads_lookup:
            return cols
        copy = self.copied(lookup, 0, tokens.shape[-1])  # [..., K']
        copied = (cols < 0) & (tokens >= 0) & (tokens == copy) & (lookup[..., :1] > 0)
        return torch.where(copied, self.vocab_ids.numel(), cols)

    def column_of(self) -> torch.Tensor:
        """[V] each token's column in the head vocabulary (-1: outside it)"""
        index = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.vocab_ids.device)
        index[self.vocab_ids] = torch.arange(self.vocab_ids.numel(), device=self.vocab_ids.device)
        return index

    def token_ids(self, cols: torch.Tensor, lookup: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
        """Columns of heads first .. first + J - 1's logits [..., J, k] -> token ids [..., J, k] (the copy
        column: lookup's token for that head)."""
        ids = self.vocab_ids[cols.clamp_max(self.vocab_ids.numel() - 1)]
        if not self.config.reads_lookup:
            return ids
        copy = self.copied(lookup, first, cols.shape[-2]).expand(cols.shape[:-1])  # [..., J]
        return torch.where(cols == self.vocab_ids.numel(), copy[..., None], ids)

    def lookup_input(self, lookup: torch.Tensor, dtype) -> torch.Tensor:
        """lookup [..., 1 + T]: (n, t_1 .. t_T), the n-gram ending in the root that prompt lookup matched
        (n = 0: none) and the tokens that followed it -> [..., H], what the chain's start adds for t_1"""
        n, token = lookup[..., 0], lookup[..., 1]
        found = F.embedding(token.clamp_min(0), self.embed_weight).to(dtype) * (n > 0)[..., None].to(dtype)
        linear = self.lookup_token if self.packed_lookup_token is None else self.packed_lookup_token
        return linear(found) + self.lookup_ngram(n).to(dtype)

    def _state(self, k: int, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Head k's state: h [..., H] and (Cerberus) what its chain passes it, prev [..., H] -> [..., H]"""
        blocks = self.blocks[k]
        if self.config.head_type == "cerberus":
            z = blocks[0](torch.cat([h, prev], dim=-1), residual=h)
        else:
            z = blocks[0](h)
        for block in blocks[1:]:
            z = block(z)
        return z

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[..., K, H] -> [..., K, V'] (indices into ``vocab_ids``)"""
        if self.config.own_lm_head:
            return torch.stack([self._logits(k, states[..., k, :]) for k in range(states.shape[-2])], -2)
        return self._logits(0, states)  # one matmul for all heads

    def _logits(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """Head k's logits: [..., H] -> [..., V'] (the shared LM head for every k unless ``own_lm_head``)"""
        if self.config.own_lm_head:
            return (self.packed_logits or self.lm_heads)[k](z)
        if self.packed_logits is not None:
            return self.packed_logits(z)
        return z @ self.shared_weight.T

    def pack_for(self, weights: str) -> DraftHeads:
        """Inference with a quantized base model on a CPU: blocks and LM-head rows (shared, or each
        head's own) in 8 bits (drafts only rank tokens, and bfloat16 matmuls are slow on CPUs without
        AVX512-BF16): int8 per row, or under w4a8 the base model's LM-head format, w8a8 (integer dot
        products: about half the time of int8's on an Intel AVX-512 CPU)."""
        from .runtime.formats import GROUP, QUANTIZED, dense

        if weights not in QUANTIZED or self.shared_weight.device.type != "cpu":
            return self

        def packed(weight: torch.Tensor, bias: torch.Tensor | None = None):
            n, k = weight.shape
            fast = weights == "w4a8" and n % 16 == 0 and k % GROUP == 0  # w8a8's whole tiles
            return dense(weight, "w8a8" if fast else "int8", bias)

        for blocks in self.blocks:
            for block in blocks:
                block.packed = packed(block.linear.weight, block.linear.bias)
        if self.config.reads_lookup:
            self.packed_lookup_token = packed(self.lookup_token.weight)
        if self.config.own_lm_head:
            self.packed_logits = [packed(head.weight) for head in self.lm_heads]
        else:
            self.packed_logits = packed(self.shared_weight)
        self.kernel_draft = self._kernel_draft()
        return self

    def _kernel_draft(self) -> tuple | None:
        """The arguments of the CPU kernels' ``draft_topk`` that stay the same from draft to draft, or
        None where it does not run these heads (heads that read drafts or have their own LM heads, or
        a projection our kernels do not run): then ``topk`` runs the same ops from Python."""
        from .runtime.formats import kernel_projection

        if self.config.reads_drafts or self.config.own_lm_head:
            return None
        layers = [self.packed_lookup_token] if self.config.reads_lookup else []
        layers += [block.packed for blocks in self.blocks for block in blocks] + [self.packed_logits]
        projections = [kernel_projection(layer) for layer in layers]
        if any(p is None for p in projections):
            return None
        none = torch.empty(0)
        lookup = (none,) * 4
        if self.config.reads_lookup:
            bonus = self.lookup_bonus
            lookup = (self.lookup_ngram.weight, bonus.weight, bonus.bias, self.output_weight)
        embed = self.embed_weight if self.config.root_token else none
        columns = [list(column) for column in zip(*projections, strict=True)]  # kinds, packed, scales, biases
        return layers[0].kernels, embed, columns, lookup, self.column_of()

    def forward(self, h: torch.Tensor, root: torch.Tensor | None = None, heads: int | None = None) -> torch.Tensor:
        states = self.states(h, root, heads)  # [..., K, H]
        logits = self.logits(states)  # [..., K, V']
        if self.config.reads_lookup:  # [..., K, V' + 1]: the last column, a copy from outside the vocabulary
            logits = self.copy_bonus(logits, states, self.split_lookup(root)[1])
        return logits

    def topk(
        self,
        h: torch.Tensor,
        k: int,
        root: torch.Tensor | None = None,
        heads: int | None = None,
        graphs=False,
        lookup: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [H], root [] or [1] -> ([K, k] token ids, best first; [K, k] float32 their probabilities
        under each head's softmax) ([heads, k]: only the heads a tree reaches).
        ``lookup`` [1 + T]: what prompt lookup found after the root (``reads_lookup`` heads: ``lookup.first_match``).
        ``graphs``: on CUDA, replayed from a CUDA graph per (k, heads): ~30 small kernels, whose
        launches bound the call there (0.8 ms a step on an H200). Inference only: a graph keeps
        the weights it was captured with."""
        if self.kernel_draft is not None and h.dim() == 1 and root is not None:  # one op instead of ~60
            return self._kernel(h, k, root, heads, lookup)
        if root is not None:
            root = self.inputs(root, lookup)
        if not (graphs and h.is_cuda):
            return self._topk(h, k, root, heads)
        key = (k, heads, root is None, h.dtype)
        return self._replay(key, lambda h, root: self._topk(h, k, root, heads), h, root)

    def _kernel(
        self, h, k: int, root: torch.Tensor, heads: int | None, lookup, tree=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``topk`` at one position on the CPU kernels' ``draft_topk`` (``pack_for``): the same ops,
        the same tokens (tests/test_heads.py); with a ``tree``, ``draft``'s result from ``draft_tree``
        (the tree's tokens and confidences gathered in the op: five small torch ops fewer a step)."""
        ops, embed, (kinds, packed, scales, biases), tables, column = self.kernel_draft
        if self.config.reads_lookup and lookup is None:
            raise CerberusError("These heads read what prompt lookup found after the root; pass it.")
        found = lookup.to(torch.long).contiguous() if self.config.reads_lookup else torch.empty(0, dtype=torch.long)
        heads = self.config.num_heads if heads is None else min(heads, self.config.num_heads)
        sequential = self.config.head_type == "cerberus"
        op, nodes = (ops.draft_topk, ()) if tree is None else (ops.draft_tree, tree.kernel_nodes)
        return op(
            h,
            embed,
            int(root),
            found,
            kinds,
            packed,
            scales,
            biases,
            *tables,
            self.vocab_ids,
            column,
            sequential,
            self.config.num_layers,
            heads,
            k,
            *nodes,
        )

    def inputs(self, root: torch.Tensor, lookup: torch.Tensor | None) -> torch.Tensor:
        """What ``states`` reads besides h at one position: the root [] (and lookup's (n, t_1 .. t_T): [2 + T])."""
        if not self.config.reads_lookup:
            return root.reshape(())
        if lookup is None:
            raise CerberusError("These heads read what prompt lookup found after the root; pass it.")
        return torch.cat([root.reshape(1), lookup.to(root)])

    def _replay(self, key, body, h: torch.Tensor, root: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """``body(h, root)`` replayed from the CUDA graph captured for ``key`` on its first call."""
        if key not in self.graphs:
            h_in, root_in = h.clone(), None if root is None else root.clone()  # the replays' input buffers
            graph, out = capture(lambda: body(h_in, root_in))
            self.graphs[key] = graph, h_in, root_in, out
        graph, h_in, root_in, out = self.graphs[key]
        h_in.copy_(h)
        if root_in is not None:
            root_in.copy_(root)
        graph.replay()
        return tuple(o.clone() for o in out)

    def _topk(self, h, k: int, root, heads) -> tuple[torch.Tensor, torch.Tensor]:
        top, probs = topk_probabilities(self.forward(h, root, heads), k)  # [K', k] each
        return self.token_ids(top.indices, self.split_lookup(root)[1] if self.config.reads_lookup else None), probs

    def draft(
        self, h: torch.Tensor, root: torch.Tensor, tree, graphs=False, lookup=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [H], root [1] -> (the tree's node tokens [N+1], the root first; each node's confidence
        [N+1] float32: the product of the heads' probabilities along its path, the root's 1).
        Heads that read drafts run once per node with children, depth by depth: a node's children
        are the top tokens of the head at its depth given the node's own token and its parent's head
        state. ``lookup`` [1 + T]: what prompt lookup found after the root (``reads_lookup`` heads)."""
        if not self.config.reads_drafts:
            if self.kernel_draft is not None and h.dim() == 1:
                return self._kernel(h, tree.top_k, root, tree.num_heads, lookup, tree)
            tokens, probs = self.topk(h, tree.top_k, root, tree.num_heads, graphs, lookup)
            return tree.candidates(root, tokens), tree.confidence(probs)
        inputs = self.inputs(root, lookup).reshape(-1)  # [1] or [2 + T]
        if not (graphs and h.is_cuda):
            return self._draft(h, inputs, tree)
        key = ("draft", tuple(tree.choices), h.dtype)  # a tree's shape: its own graph
        return self._replay(key, lambda h, inputs: self._draft(h, inputs, tree), h, inputs)

    def _draft(self, h: torch.Tensor, inputs: torch.Tensor, tree) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = inputs.new_empty(tree.size)  # [N+1]
        tokens[:1] = inputs[:1]
        confidence = torch.ones(tree.size, device=h.device)  # [N+1]
        z = None  # the head states of the depth above [I', H]
        for k, (nodes, up, children, rows, ranks, top_k) in enumerate(tree.levels):
            prev = F.embedding(tokens[nodes], self.embed_weight).to(h.dtype)  # [I, H] the nodes' own tokens
            if z is not None:
                prev = z[up] + prev  # and their parents' states: the chain, as ``states`` runs it
            elif self.config.reads_lookup:
                prev = prev + self.lookup_input(inputs[1:], h.dtype)  # the root's chain start, as ``states``
            z = self._state(k, h.expand(nodes.numel(), -1), prev)  # [I, H]
            logits = self._logits(k, z)  # [I, V']
            lookup = inputs[1:] if self.config.reads_lookup else None
            if lookup is not None:
                logits = self.copy_bonus(logits[:, None], z[:, None], lookup, first=k)[:, 0]  # [I, V' + 1]
            top, probs = topk_probabilities(logits, top_k)  # [I, top_k] each
            tokens[children] = self.token_ids(top.indices[rows, ranks][:, None, None], lookup, first=k)[:, 0, 0]
            confidence[children] = confidence[nodes][rows] * probs[rows, ranks]
        return tokens, confidence


def topk_probabilities(logits: torch.Tensor, k: int):
    """logits [..., V] -> (their top k, ``torch.topk``'s (values, indices) [..., k]; the softmax
    probabilities of those k [..., k] float32)"""
    top = logits.topk(k, dim=-1)
    return top, (top.values.float() - logits.float().logsumexp(-1, keepdim=True)).exp()


def with_lookup(inputs: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """What heads that read lookup read besides h, many positions at once: the root [N] or path [N, K]
    and lookup's (n, t_1 .. t_T) [N, 1 + T] (``lookup.first_match``) -> [N, 1 or K + 1 + T]."""
    return torch.cat([inputs.reshape(inputs.shape[0], -1), lookup.to(inputs)], 1)


def lookup_reads(reads_lookup: bool, num_heads: int) -> dict:
    """What new heads read of lookup: one token of its chain per head, matches up to HEADS_NGRAM long
    (HeadsConfig's defaults are what heads written before 2026-11-29 read)."""
    if not reads_lookup:
        return {}
    return {"lookup_tokens": num_heads, "lookup_max_ngram": HEADS_NGRAM}


def new_heads(
    lm,
    head_type: str = "cerberus",
    num_heads: int = 4,
    num_layers: int = 1,
    own_lm_head: bool = False,
    root_token: bool = False,
    reads_drafts: bool = False,
    reads_lookup: bool = False,
    seed: int | None = None,
) -> DraftHeads:
    """Untrained heads for a loaded base model (identity blocks; predictions = base LM head's)."""
    weight = lm.model.get_output_embeddings().weight
    config = HeadsConfig(
        head_type=head_type,
        num_heads=num_heads,
        num_layers=num_layers,
        hidden_size=int(weight.shape[1]),
        vocab_size=int(weight.shape[0]),
        own_lm_head=own_lm_head,
        root_token=root_token,
        reads_drafts=reads_drafts,
        reads_lookup=reads_lookup,
        **lookup_reads(reads_lookup, num_heads),
        base_model=model_fingerprint(lm.model, lm.name),
    )
    if seed is not None:
        torch.manual_seed(seed)
    heads = DraftHeads(config)
    heads.attach_base(lm.model)
    if own_lm_head:
        heads.init_own_lm_heads()
    return heads.to(device=weight.device, dtype=weight.dtype)


def random_heads(lm, head_type: str, seed: int = 0, scale: float = 0.02, **kw) -> DraftHeads:
    """Heads with random (non-zero) block weights: a stand-in for badly trained heads in tests."""
    heads = new_heads(lm, head_type, **kw)
    g = torch.Generator().manual_seed(seed)
    for p in [*heads.blocks.parameters(), *heads.lookup_parameters()]:
        p.data = (torch.randn(p.shape, generator=g) * scale).to(p)
    return heads.to(lm.dtype)


def save_heads(heads: DraftHeads, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically (temp files + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    bad = [k for k, v in heads.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CerberusError(
            f"Refusing to write heads to {path}: {', '.join(bad[:3])} hold non-finite values (NaN or inf). "
            "Training diverged; lower --lr or check the distilled data."
        )
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in heads.state_dict().items()}
    _atomic_write(path / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    cfg = asdict(heads.config)
    cfg["model_type"] = f"{heads.config.head_type}_heads"
    _atomic_write(path / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))


TEMP_SUFFIX = ".tmp"


def _atomic_write(target: Path, write) -> None:
    """Write to ``.NAME.PID.XXXX.tmp`` next to ``target``, then rename; a killed writer's file is
    found and removed by ``remove_stale_temp_files``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Remove the temp files of ``_atomic_write`` calls whose process is gone (killed mid-write).
    Files of live processes stay: several distill workers may share one directory."""
    removed = []
    for tmp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        pid = tmp.name.removesuffix(TEMP_SUFFIX).split(".")[-2]
        if tmp.is_file() and pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# type checks for config.json: (types, description)
_CONFIG_TYPES = {
    "head_type": (str, "a string"),
    "num_heads": (int, "a positive integer"),
    "num_layers": (int, "a positive integer"),
    "hidden_size": (int, "an integer >= 0"),
    "vocab_size": (int, "an integer >= 0"),
    "head_vocab_size": (int, "an integer >= 0"),
    "own_lm_head": (bool, "true or false"),
    "root_token": (bool, "true or false"),
    "reads_drafts": (bool, "true or false"),
    "base_model": (dict, "an object"),
    "gate": (str, "a string"),
    "gate_threshold": ((int, float), "a number"),
    "tree": ((list, type(None)), "a list of paths or null"),
    "training": (dict, "an object"),
}


def _check_config(d, cfg_file: Path) -> None:
    if not isinstance(d, dict):
        raise CerberusError(f"Heads config {cfg_file} must hold a JSON object; re-save the heads or fix the file.")
    for key, (types, what) in _CONFIG_TYPES.items():
        value = d.get(key)
        if key not in d or (value is None and key == "tree"):
            continue
        wrong_type = not isinstance(value, types) or (isinstance(value, bool) and types is int)
        too_small = isinstance(value, int) and key in ("num_heads", "num_layers") and value < 1
        if wrong_type or too_small or (isinstance(value, int) and value < 0 and key != "gate_threshold"):
            raise CerberusError(f"Heads config {cfg_file}: '{key}' must be {what} (got {value!r}).")


def read_heads_config(path: str | Path) -> HeadsConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CerberusError(f"Heads directory {path} has no config.json (expected config.json + model.safetensors).")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CerberusError(f"Heads config {cfg_file} is corrupt: {e}") from None
    _check_config(data, cfg_file)
    return HeadsConfig.from_dict(data)


def load_heads(path: str | Path, lm) -> DraftHeads:
    """Load heads for a loaded base model; refuses heads trained for another model."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_heads_config(path)
    expected = model_fingerprint(lm.model, lm.name)
    got = config.base_model
    if {k: got.get(k) for k in ("hidden_size", "vocab_size", "lm_head_sha")} != {
        k: expected[k] for k in ("hidden_size", "vocab_size", "lm_head_sha")
    }:
        raise CerberusError(
            f"Heads in {path} were trained for base model {got.get('name')!r} "
            f"(hidden {got.get('hidden_size')}, vocab {got.get('vocab_size')}, lm_head {got.get('lm_head_sha')}), "
            f"but the loaded model is {expected['name']!r} (hidden {expected['hidden_size']}, vocab "
            f"{expected['vocab_size']}, lm_head {expected['lm_head_sha']}). Train heads for this model "
            "with `cerberus train`, or pass --heads for the right model."
        )
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CerberusError(f"Heads directory {path} has no model.safetensors.")
    try:
        state = load_file(weights)
    except Exception as e:
        raise CerberusError(f"Heads weights {weights} are corrupt or unreadable: {e}") from e
    heads = DraftHeads(config)
    if "vocab_ids" in state:
        heads.vocab_ids = torch.empty_like(state["vocab_ids"])
        if heads.config.own_lm_head:
            for head in heads.lm_heads:
                head.weight.data = torch.empty(state["vocab_ids"].numel(), config.hidden_size)
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CerberusError(f"Heads weights {weights} do not match {path / 'config.json'}: {e}") from e
    heads.to(device=lm.device, dtype=lm.dtype)
    heads.attach_base(lm.model)
    heads.vocab_ids = heads.vocab_ids.to(torch.long)
    return heads.eval().requires_grad_(False)
