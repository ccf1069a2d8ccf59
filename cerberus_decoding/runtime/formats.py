"""Weight formats of the lean runtime: one small linear layer per format.

  float32, bfloat16   dense ``F.linear``.
  int8                per-output-channel int8 weights, ``aten._weight_int8pack_mm``.
  int4                group-wise (group 32) 4-bit weights, ``aten._weight_int4pack_mm_for_cpu``:
                      the kernel computes ``w = (q - 8) * scale + zero`` per group, so a GGUF Q4_0 /
                      Q4_1 block maps onto it exactly (up to the rounding of its scales to bf16).

The quantized formats take activations in bfloat16 (the kernels are vectorized for it). Each of
these kernels computes every output row independently of the others: a row's result is the same
whether it runs alone or among 16 rows, bitwise (tests/test_runtime.py checks it on this CPU). That
is what makes speculative verification reproduce the one-token step exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import CerberusError

WEIGHTS = ("auto", "float32", "bfloat16", "int8", "int4")
GROUP = 32  # int4 group size: the GGUF block size


def activation_dtype(weights: str) -> torch.dtype:
    return torch.float32 if weights == "float32" else torch.bfloat16


class Linear:
    """``y = x W^T (+ b)`` with W stored in one of the formats above. x [..., K] -> y [..., N].
    A plain class, not a ``torch.nn.Module``: a module's call costs a few microseconds of hooks
    bookkeeping, and a decoding step makes 121 of these calls."""

    def __init__(self, fmt: str, out_features: int, bias: torch.Tensor | None = None):
        self.fmt, self.out_features = fmt, out_features
        self.bias = bias
        self.without_onednn = False  # bfloat16 shapes oneDNN does not compute row-invariantly (dense)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.without_onednn:
            y = _linear_without_onednn(x, self.weight)
        elif self.fmt == "float32" or self.fmt == "bfloat16":
            y = F.linear(x, self.weight)
        else:  # the packed kernels take [M, K]
            rows = x.reshape(-1, x.shape[-1])
            if self.fmt == "int4":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
            else:
                y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def dense(weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> Linear:
    """A float weight [N, K] in format ``fmt`` (quantized on load for int8 / int4)."""
    dtype = activation_dtype(fmt)
    layer = Linear(fmt, weight.shape[0], None if bias is None else bias.to(dtype))
    if fmt == "int4":
        _check_int4(weight.shape[1])
        q, scale, zero = quantize_int4(weight.float())
        return _set_int4(layer, q, scale, zero)
    if fmt == "int8":
        w = weight.float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127  # [N]
        layer.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        layer.scales = scale.to(dtype)
        return layer
    layer.weight = weight.to(dtype).contiguous()
    if fmt == "bfloat16" and weight.device.type == "cpu":
        layer.without_onednn = not _onednn_row_invariant(tuple(layer.weight.shape))
    return layer


_ROW_INVARIANT: dict[tuple[int, int], bool] = {}


def _onednn_row_invariant(shape: tuple[int, int], rows: int = 32) -> bool:
    """Whether bfloat16 ``F.linear`` (oneDNN on a CPU) gives every row the same bits among up to
    ``rows`` rows as alone, for a weight of this shape. Measured once per shape, on this CPU: with
    AVX512-BF16, oneDNN changes how it splits the inner dimension with the row count when it is
    above 1024 (the down projection's 1536), so a verified row would differ from the one-token step.
    Where it is not, layers of that shape run without oneDNN: row-invariant, as fast for one row,
    2-3x slower for several."""
    if shape not in _ROW_INVARIANT:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(shape, generator=g).to(torch.bfloat16)
        x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16)
        alone = torch.cat([F.linear(x[i : i + 1], w) for i in range(rows)])
        _ROW_INVARIANT[shape] = all(torch.equal(F.linear(x[:m], w), alone[:m]) for m in range(2, rows + 1))
    return _ROW_INVARIANT[shape]


def _linear_without_onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def int4_from_blocks(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Linear:
    """q [N, K] in 0..15, scale / zero [N, K / 32] float: w = (q - 8) * scale + zero."""
    return _set_int4(Linear("int4", q.shape[0]), q, scale, zero)


def quantize_int4(w: torch.Tensor):
    """Asymmetric group-wise 4-bit quantization of a float weight [N, K] -> (q, scale, zero)."""
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)  # [N, K/32]
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).view(n, k)
    return q, scale, lo + 8 * scale  # the kernel subtracts 8 from q


def _check_int4(k: int) -> None:
    if k % GROUP:
        raise CerberusError(f"int4 needs input sizes divisible by {GROUP}; this layer has {k}. Use --weights int8.")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise CerberusError("This torch build has no CPU int4 kernel; use --weights int8 or bfloat16.")


def _set_int4(layer: Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Linear:
    _check_int4(q.shape[1])
    layer.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    # [K/32, N, 2] in the activation dtype, as the kernel wants
    layer.scales_zeros = torch.stack([scale.T, zero.T], -1).to(torch.bfloat16).contiguous()
    return layer


def dequantize(layer: Linear) -> torch.Tensor:
    """The float weight [N, K] a layer multiplies by (for tests and the docs' error table)."""
    if layer.fmt == "int4":  # float32 activations: slow, but every weight comes out unrounded
        eye = torch.eye(layer.scales_zeros.shape[0] * GROUP)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, GROUP, layer.scales_zeros.float()).T
    if layer.fmt == "int8":
        return layer.qweight.float() * layer.scales.float()[:, None]
    return layer.weight.float()
