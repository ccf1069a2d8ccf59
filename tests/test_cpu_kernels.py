"""The lean runtime's CPU kernels (runtime/cpu_kernels.cpp): right, and each row's bits its own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cerberus_decoding import sampling
from cerberus_decoding.models import CerberusError
from cerberus_decoding.runtime import cpu_kernels
from cerberus_decoding.runtime.formats import dense, dequantize, quantize_int4, quantize_q8_0
from cerberus_decoding.runtime.lean import LeanLlama, _rope

ops = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(ops is None, reason="the CPU kernels could not be built here")


def layer_inputs(n: int, heads: int, kv_heads: int, head_dim: int, capacity: int, dtype, seed: int = 0):
    """A layer's fused projection output for n rows, RoPE tables for their positions, and a filled cache."""
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g)).to(dtype)
    angle = torch.rand(n, head_dim // 2, generator=g) * 6.28
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(dtype)
    sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)  # signed, as the lean runtime stores it
    k = (2 * torch.randn(kv_heads, capacity, head_dim, generator=g)).to(dtype)
    v = torch.randn(kv_heads, capacity, head_dim, generator=g).to(dtype)
    return qkv, cos, sin, k, v


def chain(context: int, n: int):
    """Row r of a chain: its slot context + r, and it reads context + [0, r]."""
    slots = torch.arange(context, context + n)
    return slots, slots.expand(n, n).contiguous(), torch.arange(1, n + 1)


@needs_kernels
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (16, 4, 2), (128, 8, 8), (32, 16, 2)])
def test_rope_attention_matches_rope_and_scaled_dot_product_attention(head_dim, heads, kv_heads):
    context, n = 37, 5
    qkv, cos, sin, k, v = layer_inputs(n, heads, kv_heads, head_dim, 64, torch.float32)
    slots, own, count = chain(context, n)
    k_ref, v_ref = k.clone(), v.clone()
    out = ops.rope_attention(qkv, cos, sin, k, v, slots, context, own, count)  # writes k, v
    qk = _rope(qkv[:, : (heads + kv_heads) * head_dim].view(n, -1, head_dim), cos[:, None], sin[:, None])
    k_ref[:, slots] = qk[:, heads:].transpose(0, 1)
    v_ref[:, slots] = qkv[:, (heads + kv_heads) * head_dim :].view(n, kv_heads, head_dim).transpose(0, 1)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v_ref)
    for r in range(n):
        end = context + r + 1
        group = qk[r, :heads].reshape(1, kv_heads, heads // kv_heads, head_dim)
        ref = F.scaled_dot_product_attention(group, k_ref[None, :, :end], v_ref[None, :, :end]).reshape(-1)
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (16, 4, 2), (128, 8, 8), (32, 16, 2)])
def test_rope_attention_in_bfloat16_matches_float_attention_to_bfloat16_precision(head_dim, heads, kv_heads):
    """bfloat16 caches: on AVX512-BF16 the scores are bfloat16 dot products of the rounded query
    (16 keys at a time), elsewhere float FMAs; both within bfloat16 rounding of float attention."""
    context, n = 45, 4
    qkv, cos, sin, k, v = layer_inputs(n, heads, kv_heads, head_dim, 64, torch.bfloat16, seed=1)
    slots, own, count = chain(context, n)
    out = ops.rope_attention(qkv, cos, sin, k, v, slots, context, own, count).float()  # writes k, v
    qk = _rope(
        qkv[:, : (heads + kv_heads) * head_dim].float().view(n, -1, head_dim),
        cos.float()[:, None],
        sin.float()[:, None],
    )
    for r in range(n):
        end = context + r + 1
        group = qk[r, :heads].reshape(1, kv_heads, heads // kv_heads, head_dim)
        ref = F.scaled_dot_product_attention(group, k[None, :, :end].float(), v[None, :, :end].float()).reshape(-1)
        torch.testing.assert_close(out[r], ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_has_the_same_bits_alone_among_rows_and_on_gathered_keys(dtype):
    """What verification relies on: the row of a tree node equals the one-token step at that node,
    whose keys are the context then the node's ancestors and itself, contiguous in the cache."""
    context, n = 300, 8
    qkv, cos, sin, k, v = layer_inputs(n, 9, 3, 64, 512, dtype)
    slots, own, count = chain(context, n)
    k_rows, v_rows = k.clone(), v.clone()
    rows = ops.rope_attention(qkv, cos, sin, k_rows, v_rows, slots, context, own, count)
    for r in range(n):  # one token at a time, as AR decoding feeds them
        one = torch.tensor([[context + r]])
        step = ops.rope_attention(
            qkv[r : r + 1], cos[r : r + 1], sin[r : r + 1], k, v, one[0], context + r, one, count[:1]
        )
        assert torch.equal(rows[r], step[0]), f"row {r}"
    assert torch.equal(k, k_rows) and torch.equal(v, v_rows)
    # row 2 again, its three entries written to scattered slots (other branches' entries between them)
    scattered = torch.tensor([context + 9, context + 3, context + 14])
    off_chain = ops.rope_attention(
        qkv[:3], cos[:3], sin[:3], k, v, scattered, context, scattered.expand(3, 3).contiguous(), count[:3]
    )
    assert torch.equal(off_chain[2], rows[2])
    # and other keys change the row: the op reads what it is told to
    other = torch.tensor([[context + 9, context + 3, context + 20]])
    changed = ops.rope_attention(qkv[2:3], cos[2:3], sin[2:3], k, v, scattered[2:], context, other, count[2:3])
    assert not torch.equal(changed[0], rows[2])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_and_silu_mul_match_torch_and_are_row_wise(dtype):
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(6, 576, generator=g)).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    ref = F.rms_norm(x.float(), (576,), w.float(), 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5).float(), ref, **tol)
    gate_up = (4 * torch.randn(6, 2 * 1536, generator=g)).to(dtype)
    ref = F.silu(gate_up[:, :1536].float()) * gate_up[:, 1536:].float()
    torch.testing.assert_close(ops.silu_mul(gate_up).float(), ref, **tol)
    for r in range(6):
        assert torch.equal(ops.rms_norm(x[r : r + 1], w, 1e-5)[0], ops.rms_norm(x, w, 1e-5)[r])
        assert torch.equal(ops.silu_mul(gate_up[r : r + 1])[0], ops.silu_mul(gate_up)[r])


@needs_kernels
def test_silu_mul_over_every_bfloat16_gate():
    """Every bfloat16 value as the gate (infinities, NaN, subnormals, both signs) times up = 1 and
    up = -3: torch's SiLU rounded to bfloat16, NaN where it is NaN (on AVX2 the op runs on 256-bit
    halves with its own rounding to bfloat16, this covers every lane value)."""
    gates = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # [65536]
    for up in (1.0, -3.0):
        x = torch.cat([gates, torch.full_like(gates, up)])[None]
        out = ops.silu_mul(x)[0].float()
        ref = (F.silu(gates.float()) * up).bfloat16().float()
        torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-30, equal_nan=True)


def test_kernels_that_cannot_be_built_fall_back_to_torch_ops(tiny_lm, monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("error: g++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "load", cpu_kernels.load.__wrapped__)
    rt = LeanLlama(tiny_lm.model, "bfloat16")
    assert rt.tree_attention == "rows" and rt.kernels is None
    assert "g++: command not found" in capsys.readouterr().err
    with pytest.raises(CerberusError, match="could not be built.*'rows'"):
        LeanLlama(tiny_lm.model, "bfloat16", tree_attention="kernel")


def test_unsupported_shapes_fall_back_or_name_the_other_paths():
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden": 4096, "intermediate": 14336, "head_dim": 128, "heads": 32, "kv_heads": 8}
    assert cpu_kernels.supports(shape, torch.bfloat16)
    assert not cpu_kernels.supports({**shape, "head_dim": 80}, torch.bfloat16)
    assert not cpu_kernels.supports({**shape, "kv_heads": 2}, torch.bfloat16)  # 16 query heads per kv head
    assert not cpu_kernels.supports(shape, torch.float16)
    cfg = LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).eval()  # head_dim 10
    assert LeanLlama(model, "float32").tree_attention == "rows"
    with pytest.raises(CerberusError, match="head_dim.*use tree attention 'rows'"):
        LeanLlama(model, "float32", tree_attention="kernel")


@needs_kernels
def test_rope_attention_refuses_slots_outside_the_cache():
    qkv, cos, sin, k, v = layer_inputs(1, 9, 3, 64, 16, torch.float32)
    one = torch.ones(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="bad slots"):
        ops.rope_attention(qkv, cos, sin, k, v, torch.tensor([16]), 15, torch.tensor([[16]]), one)
    with pytest.raises(RuntimeError, match="bad slots"):
        ops.rope_attention(qkv, cos, sin, k, v, torch.tensor([3]), 3, torch.tensor([[-1]]), one)


needs_quantized = pytest.mark.skipif(
    ops is None or not ops.quantized_matmuls(), reason="our int4 / int8 kernels need AVX512-BF16"
)


@needs_quantized
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(960, 576), (80, 1536)])  # 60 and 5 column tiles
def test_quantized_linears_match_their_weights_and_give_each_row_its_own_bits(fmt, n, k):
    """int4_linear / int8_linear (formats.dense packs for them): x @ W^T of the weights the layer
    stores, and a row's output is the same alone as among 16 rows, whatever the row blocking."""
    g = torch.Generator().manual_seed(5)
    layer = dense(torch.randn(n, k, generator=g) * 0.05, fmt)
    assert layer.kernels is not None
    x = torch.randn(16, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ dequantize(layer).T
    torch.testing.assert_close(layer(x).float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())
    alone = torch.cat([layer(x[i : i + 1]) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(layer(x[:m]), alone[:m]), f"{m} rows"


@needs_quantized
def test_quantized_linears_refuse_weights_that_do_not_match():
    layer = dense(torch.randn(32, 64), "int4")
    with pytest.raises(RuntimeError, match="does not match"):
        ops.int4_linear(torch.zeros(1, 96, dtype=torch.bfloat16), layer.packed)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.int4_linear(torch.zeros(1, 64), layer.packed)


needs_w4a8 = pytest.mark.skipif(ops is None or not ops.w4a8_matmuls(), reason="w4a8 needs AVX512-VNNI or AVX2")


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """The activations w4a8 multiplies by: each group of 32 rounded to int8 steps of max|x| / 127
    (as the kernel does it, float32: x * (127 / max|x|), rounded half to even)."""
    groups = x.float().view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # (not 127 / amax: a reciprocal, then * 127)
    return (torch.round(groups * inv) * (amax / 127)).view(x.shape)


@needs_w4a8
@pytest.mark.parametrize("n,k", [(960, 576), (80, 1536)])
def test_w4a8_is_int4_weights_times_int8_activations_and_gives_each_row_its_own_bits(n, k):
    """The layer's weights are int4's (same 4-bit codes, scales and mins), its activations each
    row's own Q8_0 rounding: the product matches float64 arithmetic on those to float32 accuracy,
    and a row's output is the same alone as among 16 rows."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(n, k, generator=g) * 0.05
    layer = dense(w, "w4a8")
    assert layer.kernels is not None
    q, scale, mins = quantize_int4(w)  # its weights: the 4-bit codes with float16 scales and mins
    exact = q.view(n, -1, 32) * scale.half().float()[..., None] + mins.half().float()[..., None]
    assert torch.equal(dequantize(layer), exact.view(n, k))
    int4 = dense(w, "int4")
    if int4.kernels is not None:  # int4 on our kernel holds the same (torch's fallback: bfloat16 scales)
        assert torch.equal(dequantize(layer), dequantize(int4))
    x = torch.randn(16, k, generator=g).to(torch.bfloat16)
    x[3] = 0  # an all-zero group: scale 0, no division by it
    ref = (quantize_activations_q8(x).double() @ dequantize(layer).double().T).float()
    out = layer(x).float()
    torch.testing.assert_close(out, ref.bfloat16().float(), rtol=8e-3, atol=1e-5 * ref.abs().max().item())
    assert (out - x.float() @ dequantize(layer).T).abs().max() < 0.05 * ref.abs().max()  # int8 rounding: small
    alone = torch.cat([layer(x[i : i + 1]) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(layer(x[:m]), alone[:m]), f"{m} rows"
    with pytest.raises(RuntimeError, match="does not match"):
        ops.w4a8_linear(torch.zeros(1, k + 32, dtype=torch.bfloat16), layer.packed)


@needs_w4a8
def test_w8a8_is_q8_0_weights_times_int8_activations_and_gives_each_row_its_own_bits():
    """w4a8's LM head: int8 weights per group of 32 with float16 scales (Q8_0 blocks) times each row's
    own Q8_0 activations, matching float64 arithmetic on those, a row's bits the same alone as among
    16 rows (what makes a verified row's next token the one-token step's)."""
    g = torch.Generator().manual_seed(7)
    n, k = 4096, 576
    w = torch.randn(n, k, generator=g) * 0.05
    w[5, :32] = 0  # an all-zero weight group
    layer = dense(w, "w8a8")
    q, scale = quantize_q8_0(w)
    assert q.abs().max() == 127 and torch.equal(scale, scale.half().float())
    exact = q.view(n, -1, 32).float() * scale[..., None]
    assert torch.equal(dequantize(layer), exact.view(n, k))
    assert torch.equal(dequantize(dense(dequantize(layer), "w8a8")), dequantize(layer))  # Q8_0 blocks load exactly
    x = torch.randn(16, k, generator=g).to(torch.bfloat16)
    x[3] = 0
    x[4, 32:64] = 0
    ref = (quantize_activations_q8(x).double() @ dequantize(layer).double().T).float()
    out = layer(x).float()
    torch.testing.assert_close(out, ref.bfloat16().float(), rtol=8e-3, atol=1e-5 * ref.abs().max().item())
    assert (out - x.float() @ dequantize(layer).T).abs().max() < 0.05 * ref.abs().max()
    alone = torch.cat([layer(x[i : i + 1]) for i in range(16)])
    for m in range(1, 17):
        assert torch.equal(layer(x[:m]), alone[:m]), f"{m} rows"
    with pytest.raises(RuntimeError, match="does not match"):
        ops.w8a8_linear(torch.zeros(1, k + 32, dtype=torch.bfloat16), layer.packed)


@needs_w4a8
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_lm_head_with_its_argmax_gives_the_logits_and_greedys_tokens(threads):
    """w8a8's fused LM head + argmax (greedy decoding's LM head): the same logits as the layer, and
    torch's argmax of them, ties across the threads' columns included (the first column wins)."""
    g = torch.Generator().manual_seed(3)
    n, k = 4096, 576
    w = torch.randn(n, k, generator=g) * 0.05
    w[[7, 2100, 4000]] = w[3000] * 4  # the same largest logit in columns the threads split between them
    layer = dense(w, "w8a8")
    x = torch.randn(5, k, generator=g).to(torch.bfloat16)
    x[0] = w[3000].to(torch.bfloat16)  # rows 0, 1: the repeated column is their maximum
    x[1] = (w[3000] * 2).to(torch.bfloat16)
    x[2] = 0  # every logit zero: the first column
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in range(1, 6):
            logits, ids = layer.with_argmax(x[:m])
            assert torch.equal(logits, layer(x[:m])) and torch.equal(ids, logits.float().argmax(-1)), m
        assert layer.with_argmax(x[:2])[1].tolist() == [7, 7]
    finally:
        torch.set_num_threads(before)


def test_w4a8_without_its_kernel_is_an_error_naming_int4(monkeypatch):
    from cerberus_decoding.models import CerberusError
    from cerberus_decoding.runtime import resolve_weights

    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    with pytest.raises(CerberusError, match="AVX512-VNNI or AVX2.*--weights int4"):
        dense(torch.randn(32, 64), "w4a8")
    with pytest.raises(CerberusError, match="AVX512-VNNI or AVX2.*--weights int4"):
        resolve_weights("w4a8", torch.device("cpu"), "lean")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_is_torch_argmax_ties_infinities_and_nan_included(dtype):
    g = torch.Generator().manual_seed(7)
    for v in (1, 5, 16, 17, 49152, 49157):
        x = torch.randn(6, v, generator=g).to(dtype)
        x[1] = x[1].round()  # many ties (bfloat16 logits have them): the first one wins
        x[2, v // 2 :] = x[2].max()  # the maximum repeated in the tail
        x[3] = -math.inf  # nothing but -inf: index 0
        x[4, -1] = math.inf
        x[5, v // 3] = math.nan
        assert torch.equal(ops.argmax_rows(x), x.argmax(-1)), v
    logits = torch.randn(3, 4, 100, generator=g).to(dtype)
    assert torch.equal(sampling.greedy(logits), logits.float().argmax(-1))  # greedy runs it, any leading shape


def test_without_our_kernels_the_quantized_formats_run_torch_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    w = torch.randn(48, 64) * 0.05
    x = torch.randn(3, 64).to(torch.bfloat16)
    for fmt in ("int4", "int8"):
        layer = dense(w, fmt)
        assert layer.kernels is None
        torch.testing.assert_close(layer(x).float(), x.float() @ dequantize(layer).T, rtol=8e-3, atol=2e-3)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(3)])
        assert torch.equal(layer(x), alone)
