"""Weight formats of the lean runtime: one small linear layer per format.

  float32, bfloat16   dense ``F.linear``.
  int8                per-output-channel int8 weights: ``w = q * scale``.
  int4                group-wise (group 32) 4-bit weights: ``w = q * scale + min`` per group, so a
                      GGUF Q4_0 / Q4_1 block maps onto it exactly.
  w4a8                int4's weights, with each row's activations quantized to int8 per group of 32
                      inside the matmul (a GGUF Q8_0 block: ``x = a * d``), so that the products are
                      integer dot products, as llama.cpp computes its Q4 formats (AVX512-VNNI or
                      AVX2: our kernel only).
  w8a8                w4a8's LM head (not a ``--weights`` value): int8 weights per group of 32 with a
                      float16 scale each (a GGUF Q8_0 block, loaded exactly) times the same int8
                      activations: llama.cpp's arithmetic for a Q8_0 tensor, integer dot products.

The quantized formats take activations in bfloat16 and run our CPU kernels (cpu_kernels.cpp:
``int4_linear``, ``int8_linear``; int4 keeps float16 scales and mins, as a GGUF block does, so its
weights are reproduced exactly; each weight is decoded once for all the rows of a call). Where
those cannot be built (they need AVX512-BF16), or a layer's sizes are not multiples of 16 outputs
and 32 inputs, they run torch's ``_weight_int4pack_mm_for_cpu`` (which computes
``(q - 8) * scale + zero`` with bf16 scales) and ``_weight_int8pack_mm``. Each of these kernels
computes every output row independently of the others: a row's result is the same whether it runs
alone or among 16 rows, bitwise (tests check it on this CPU). That is what makes speculative
verification reproduce the one-token step exactly. ``w4a8`` quantizes a row's activations from
that row alone, so it keeps the property; it has no torch fallback (where our kernels cannot be built,
or the CPU has neither AVX512-VNNI nor AVX2, it is an error naming int4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import CerberusError
from ..sampling import with_greedy
from . import cpu_kernels

WEIGHTS = ("auto", "float32", "bfloat16", "int8", "int4", "w4a8")
INT4_FORMATS = ("int4", "w4a8")  # group-wise 4-bit weights: a GGUF's Q4 blocks load exactly
QUANTIZED = ("int8", *INT4_FORMATS)  # CPU only, bfloat16 activations between layers
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
        self.kernels = None  # torch.ops.cerberus where our int4 / int8 kernel runs this layer
        self.matmul = None  # x [M, K] -> [M, N], set with the weights by the format's constructor
        self.matmul_argmax = None  # x [M, K] -> ([M, N], [M] each row's first maximum), where one kernel does both

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the kernels take [M, K]
            return self(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def with_argmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (y [M, N], each row's first maximum [M]: ``sampling.greedy(y)``), greedy
        decoding's LM head: one kernel call where the format has one (w8a8), else the layer then greedy."""
        if self.matmul_argmax is not None and self.bias is None:
            return self.matmul_argmax(x)
        return with_greedy(self)(x)


def kernel_projection(layer: Linear) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(kind, packed weight, scale, bias) as ``cpu_kernels`` ``layers`` takes a projection (an empty
    tensor for a missing scale or bias), or None when our kernels do not run this layer."""
    if layer.kernels is None or layer.fmt not in cpu_kernels.PROJECTIONS:
        return None
    none = torch.empty(0)
    scale = layer.scales if layer.fmt == "int8" else none
    return cpu_kernels.PROJECTIONS.index(layer.fmt), layer.packed, scale, none if layer.bias is None else layer.bias


def dense(weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> Linear:
    """A float weight [N, K] in format ``fmt`` (quantized on load for int8 / int4)."""
    dtype = activation_dtype(fmt)
    layer = Linear(fmt, weight.shape[0], None if bias is None else bias.to(dtype))
    if fmt == "w8a8":
        return _w8a8(layer, *quantize_q8_0(weight.float()))
    if fmt in INT4_FORMATS:
        _check_int4(weight.shape[1])
        q, scale, mins = quantize_int4(weight.float())
        return _set_int4(layer, q, scale, mins)
    if fmt == "int8":
        w = weight.float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127  # [N]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
        layer.kernels = ops = _quantized_kernels(*q.shape)
        if ops is not None:  # [N/16, K/2, 16, 2]: 16 columns x 2 inputs a step
            layer.packed = q.view(q.shape[0] // 16, 16, -1, 2).transpose(1, 2).contiguous().view(torch.uint8)
            layer.scales = scale.contiguous()
            layer.matmul = lambda x: ops.int8_linear(x, layer.packed, layer.scales)
        else:
            layer.packed, layer.scales = q.contiguous(), scale.to(dtype)
            layer.matmul = lambda x: torch.ops.aten._weight_int8pack_mm(x, layer.packed, layer.scales)
        return layer
    layer.weight = weight.to(dtype).contiguous()
    layer.matmul = lambda x: F.linear(x, layer.weight)
    if fmt == "bfloat16" and weight.device.type == "cpu" and not _onednn_row_invariant(tuple(layer.weight.shape)):
        layer.matmul = lambda x: _linear_without_onednn(x, layer.weight)
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


def int4_from_blocks(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, fmt: str = "int4") -> Linear:
    """q [N, K] in 0..15, scale / mins [N, K / 32] float: w = q * scale + min, in int4 or w4a8."""
    return _set_int4(Linear(fmt, q.shape[0]), q, scale, mins)


def quantize_int4(w: torch.Tensor):
    """Asymmetric group-wise 4-bit quantization of a float weight [N, K] -> (q, scale, mins)."""
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)  # [N, K/32]
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).view(n, k)
    return q, scale, lo


def quantize_q8_0(w: torch.Tensor):
    """Symmetric int8 per group of 32, as a GGUF Q8_0 block: float [N, K] -> (q [N, K] int8, scale
    [N, K/32] float16-exact). A GGUF's de-quantized Q8_0 weights come back as its own blocks."""
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).half().float()  # [N, K/32], as the kernel reads it
    q = torch.round(groups / scale.clamp_min(1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(n, k), scale


def _w8a8(layer: Linear, q: torch.Tensor, scale: torch.Tensor) -> Linear:
    n, k = q.shape
    require_w4a8()
    if n % 16 or k % GROUP:
        raise CerberusError(f"w8a8 needs sizes divisible by 16 outputs and {GROUP} inputs; this layer is {n} x {k}.")
    layer.kernels = ops = cpu_kernels.load()
    # [N/16, K/32, 544]: vector c of a group, byte 4j + e = q[j, 4c + e], then 16 float16 scales
    codes = q.view(n // 16, 16, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, k // GROUP, 512)
    scales = scale.half().view(n // 16, 16, -1).transpose(1, 2).contiguous().view(torch.uint8)  # [N/16, K/32, 32]
    layer.packed = torch.cat([codes.view(torch.uint8), scales], -1).contiguous()
    layer.matmul = lambda x: ops.w8a8_linear(x, layer.packed)
    layer.matmul_argmax = lambda x: ops.w8a8_linear_argmax(x, layer.packed)
    return layer


def _quantized_kernels(n: int, k: int):
    """torch.ops.cerberus where our int4 / int8 kernels can run an [N, K] layer (they need
    AVX512-BF16 and whole tiles of 16 outputs and 32 inputs), else None."""
    ops = cpu_kernels.load()
    if ops is None or n % 16 or k % GROUP or not ops.quantized_matmuls():
        return None
    return ops


def w4a8_available() -> bool:
    """Whether this CPU runs the w4a8 format (our kernel, built with AVX512-VNNI or AVX2)."""
    ops = cpu_kernels.load()
    return ops is not None and ops.w4a8_matmuls()


def require_w4a8() -> None:
    if not w4a8_available():
        raise CerberusError(
            "--weights w4a8 needs our CPU kernels built for AVX512-VNNI or AVX2 (and a C++ compiler); "
            "use --weights int4."
        )


def _check_int4(k: int) -> None:
    if k % GROUP:
        raise CerberusError(f"int4 needs input sizes divisible by {GROUP}; this layer has {k}. Use --weights int8.")


def _set_int4(layer: Linear, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> Linear:
    n, k = q.shape
    _check_int4(k)
    if layer.fmt == "w4a8":
        require_w4a8()
        if n % 16:
            raise CerberusError(f"w4a8 needs output sizes divisible by 16; this layer has {n}. Use --weights int4.")
        layer.kernels = ops = cpu_kernels.load()
        # vector i of a group: byte 4j + e = q[j, 8i + e] | q[j, 8i + 4 + e] << 4 (cpu_kernels.cpp)
        tiles = q.to(torch.uint8).view(n // 16, 16, k // GROUP, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
        layer.packed = _tile_groups(tiles[..., 0] | tiles[..., 1] << 4, scale, mins)
        layer.matmul = lambda x: ops.w4a8_linear(x, layer.packed)
        return layer
    layer.kernels = ops = _quantized_kernels(n, k)
    if ops is not None:
        # chunk c of a group: byte 2j + e = q[j, 4c + e] | q[j, 4c + 2 + e] << 4 (cpu_kernels.cpp)
        tiles = q.to(torch.uint8).view(n // 16, 16, k // GROUP, 8, 2, 2).permute(0, 2, 3, 1, 5, 4)
        layer.packed = _tile_groups(tiles[..., 0] | tiles[..., 1] << 4, scale, mins)
        layer.matmul = lambda x: ops.int4_linear(x, layer.packed)
        return layer
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise CerberusError("This torch build has no CPU int4 kernel; use --weights int8 or bfloat16.")
    layer.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    # [K/32, N, 2] in the activation dtype, as torch's kernel wants: it computes (q - 8) * scale + zero
    layer.scales_zeros = torch.stack([scale.T, (mins + 8 * scale).T], -1).to(torch.bfloat16).contiguous()
    layer.matmul = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, GROUP, layer.scales_zeros)
    return layer


def _tile_groups(nibbles: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """[N/16, K/32, 320 bytes]: per 16 columns and group, the 256 bytes of codes (``nibbles``, in the
    kernel's order), then the 16 columns' float16 scales and float16 mins."""
    tiles, groups = scale.shape[0] // 16, scale.shape[1]
    halves = [t.half().view(tiles, 16, groups).transpose(1, 2).contiguous().view(torch.uint8) for t in (scale, mins)]
    return torch.cat([nibbles.reshape(tiles, groups, 256), *halves], -1).contiguous()


def dequantize(layer: Linear) -> torch.Tensor:
    """The float weight [N, K] a layer multiplies by (for tests and the docs' error table)."""
    n = layer.out_features
    if layer.fmt == "w8a8":
        q = layer.packed[..., :512].contiguous().view(torch.int8).reshape(n // 16, -1, 8, 16, 4)  # [N/16, G, c, j, e]
        q = q.permute(0, 3, 1, 2, 4).reshape(n, -1, GROUP).float()
        scale = layer.packed[..., 512:].contiguous().view(torch.float16).float().transpose(1, 2).reshape(n, -1, 1)
        return (q * scale).view(n, -1)
    if layer.fmt in INT4_FORMATS and layer.kernels is not None:
        if layer.fmt == "w4a8":
            nibbles = layer.packed[..., :256].reshape(n // 16, -1, 4, 16, 4)  # [N/16, G, vector, column, e]
            q = torch.stack([nibbles & 15, nibbles >> 4], -2).permute(0, 3, 1, 2, 4, 5).reshape(n, -1, GROUP).float()
        else:
            nibbles = layer.packed[..., :256].reshape(n // 16, -1, 8, 16, 2)  # [N/16, G, chunk, column, e]
            q = torch.stack([nibbles & 15, nibbles >> 4], -1).permute(0, 3, 1, 2, 5, 4).reshape(n, -1, GROUP).float()
        scale, mins = (layer.packed[..., a : a + 32].contiguous().view(torch.float16) for a in (256, 288))
        scale, mins = (t.float().transpose(1, 2).reshape(n, -1, 1) for t in (scale, mins))  # [N, G, 1]
        return (q * scale + mins).view(n, -1)
    if layer.fmt == "int4":  # float32 activations: slow, but every weight comes out unrounded
        eye = torch.eye(layer.scales_zeros.shape[0] * GROUP)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, GROUP, layer.scales_zeros.float()).T
    if layer.fmt == "int8" and layer.kernels is not None:
        q = layer.packed.view(torch.int8).transpose(1, 2).reshape(n, -1)  # [N/16, 16, K/2, 2] -> [N, K]
        return q.float() * layer.scales[:, None]
    if layer.fmt == "int8":
        return layer.packed.float() * layer.scales.float()[:, None]
    return layer.weight.float()
