"""The row attention kernel (runtime/row_attention.cpp): right, and each row's bits its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cerberus_decoding.models import CerberusError
from cerberus_decoding.runtime import row_attention
from cerberus_decoding.runtime.lean import LeanLlama

kernel = row_attention.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the row attention kernel could not be built here")


def cache(kv_heads: int, capacity: int, head_dim: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = (2 * torch.randn(kv_heads, capacity, head_dim, generator=g)).to(dtype)
    v = torch.randn(kv_heads, capacity, head_dim, generator=g).to(dtype)
    return k, v


@needs_kernel
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (16, 4, 2), (128, 8, 8), (32, 16, 2)])
def test_rows_match_scaled_dot_product_attention_in_float32(head_dim, heads, kv_heads):
    context, n = 37, 5
    k, v = cache(kv_heads, 64, head_dim, torch.float32)
    q = 2 * torch.randn(n, heads, head_dim, generator=torch.Generator().manual_seed(1))
    own = torch.arange(context, context + n).expand(n, n).contiguous()  # a chain: row r reads context + r + 1
    out = kernel(q, k, v, context, own, torch.arange(1, n + 1))
    for r in range(n):
        end = context + r + 1
        group = q[r].view(1, kv_heads, heads // kv_heads, head_dim)
        ref = F.scaled_dot_product_attention(group, k[None, :, :end], v[None, :, :end]).reshape(heads, head_dim)
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_has_the_same_bits_alone_among_rows_and_on_gathered_keys(dtype):
    """What verification relies on: the row of a tree node equals the one-token step at that node,
    whose keys are the context then the node's ancestors and itself, contiguous in the cache."""
    context, n = 300, 8
    k, v = cache(3, 512, 64, dtype)
    q = (2 * torch.randn(n, 9, 64, generator=torch.Generator().manual_seed(2))).to(dtype)
    own = torch.arange(context, context + n).expand(n, n).contiguous()
    rows = kernel(q, k, v, context, own, torch.arange(1, n + 1))
    for r in range(n):  # alone, as the one-token step at context + r sees its cache
        step = kernel(q[r : r + 1], k, v, context + r, torch.tensor([[context + r]]), torch.ones(1, dtype=torch.long))
        assert torch.equal(rows[r], step[0]), f"row {r}"
    # the same keys written to scattered slots (other branches' entries between them)
    scattered = torch.tensor([context + 9, context + 3, context + 14])
    k2, v2 = k.clone(), v.clone()
    k2[:, scattered], v2[:, scattered] = k[:, context : context + 3], v[:, context : context + 3]
    off_chain = kernel(q[2:3], k2, v2, context, scattered[None], torch.tensor([3]))
    assert torch.equal(off_chain[0], rows[2])
    # and another key changes the row (the kernel reads what it is told to)
    changed = kernel(
        q[2:3], k2, v2, context, torch.tensor([[context + 9, context + 3, context + 20]]), torch.tensor([3])
    )
    assert not torch.equal(changed[0], rows[2])


def test_a_kernel_that_cannot_be_built_falls_back_to_per_row_calls(tiny_lm, monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("error: g++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(row_attention, "load", row_attention.load.__wrapped__)
    rt = LeanLlama(tiny_lm.model, "bfloat16")
    assert rt.tree_attention == "rows" and rt.row_kernel is None
    assert "g++: command not found" in capsys.readouterr().err
    with pytest.raises(CerberusError, match="could not be built.*'rows'"):
        LeanLlama(tiny_lm.model, "bfloat16", tree_attention="kernel")


def test_unsupported_shapes_fall_back_or_name_the_other_paths():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert not row_attention.supports(80, 32, 8, torch.bfloat16)  # head_dim 80
    assert not row_attention.supports(64, 32, 2, torch.bfloat16)  # 16 query heads per kv head
    assert not row_attention.supports(64, 8, 8, torch.float16)
    cfg = LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).eval()  # head_dim 10
    assert LeanLlama(model, "float32").tree_attention == "rows"
    with pytest.raises(CerberusError, match="head_dim.*use tree attention 'rows'"):
        LeanLlama(model, "float32", tree_attention="kernel")
