"""The lean runtime's CPU kernels (cpu_kernels.cpp), compiled for this CPU on first use.

A decoding step of a small model on a CPU is bound by per-op overhead as much as by its matmuls,
and ``scaled_dot_product_attention`` gives a tree node's row the one-token step's bits only when
it is called once per row (docs/runtime.md): about 40 us a call, so every extra row of a
verification cost another 1.3 ms on the default model. Three ops replace a dozen torch ops a layer,
four are the quantized formats' matmuls, two are greedy decoding's argmax (one with the LM head),
and one drafts with the heads:

    rope_attention(qkv, cos, sin, k, v, slots, context, own, own_count) -> [n, Hq D]
        RoPE, the rows' keys and values into the cache at ``slots``, and attention for every row at
        once: row r reads the cache's ``[0, context)`` then ``own[r, :own_count[r]]``, in that order.
    rms_norm(x, weight, eps) -> RMSNorm of each row
    silu_mul(gate_up) -> SiLU(gate) * up
    int4_linear(x, packed), int8_linear(x, packed, scale) -> x W^T for the int4 / int8 formats
        (formats.py packs W for them; AVX512-BF16 only: ``quantized_matmuls()`` says whether built)
    w4a8_linear(x, packed) -> x W^T for the w4a8 format (AVX512-VNNI or AVX2: ``w4a8_matmuls()``)
    argmax_rows(logits) -> each row's first maximum (sampling.greedy)
    w8a8_linear_argmax(x, packed) -> (x W^T, each row's first maximum): greedy's LM head under w4a8
    layers(x, norms, kinds, packed, scales, biases, cos, sin, k, v, slots, context, own, own_count, eps)
        -> every decoder layer and the final norm, the ops above in LeanLlama._layers's order, called
        from C++ (where every projection runs one of the quantized kernels: ``PROJECTIONS``); where
        every projection has 8-bit activations (w4a8) the threads run it in one parallel region
    draft_topk(h, embed, root, lookup, kinds, packed, scales, biases, ngram, bonus_weight, bonus_bias,
               output_weight, vocab_ids, column, sequential, num_layers, heads, top_k)
        -> the draft heads' top-k tokens at one position and their probabilities: DraftHeads.topk's
        ops, called from C++ (heads.py, ``DraftHeads.pack_for``)
    draft_tree(..., top_k, nodes, parents) -> the same gathered into a tree's nodes: their tokens
        and confidences (DraftHeads.draft; Tree.candidates and Tree.confidence in the op)

Each computes a row with arithmetic that depends only on that row's inputs, so a tree node's row
is bitwise the one-token step at that node by construction. They are built with the machine's own
instruction set (``-march=native``) by torch's extension builder (g++ and ninja, about 10 s once;
cached under ~/.cache/torch_extensions per CPU model and instruction set). Where they cannot be built the lean
runtime says so once and runs torch's ops, with one attention call per tree row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEAD_DIMS = (16, 32, 64, 128)  # the attention's compiled row widths
# the projection kinds of the ``layers`` and ``draft_topk`` ops, in cpu_kernels.cpp's order
PROJECTIONS = ("w4a8", "int4", "int8", "w8a8")
MAX_GROUP = 8  # query heads per kv head


def supports(cfg_shape: dict, dtype: torch.dtype) -> bool:
    """Whether the kernels cover a model: ``cfg_shape`` has hidden, intermediate, head_dim, heads, kv_heads."""
    return (
        cfg_shape["head_dim"] in HEAD_DIMS
        and cfg_shape["heads"] // cfg_shape["kv_heads"] <= MAX_GROUP
        and cfg_shape["hidden"] % 16 == 0
        and cfg_shape["intermediate"] % 16 == 0
        and dtype in (torch.float32, torch.bfloat16)
    )


@functools.cache
def load():
    """``torch.ops.cerberus`` with the ops, or None (with one line on stderr) where they cannot be built."""
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package: put its binary where torch's builder looks

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from . import machine

    cpu = machine("cpu")  # -march=native code is this CPU's: one build per CPU model and ISA
    tag = hashlib.sha256(json.dumps([cpu["name"], cpu["flags"]]).encode()).hexdigest()[:8]
    try:
        cpp_extension.load(
            name=f"cerberus_cpu_kernels_{cpu['isa'].lower()}_{tag}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a read-only cache: torch's ops still work
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(
            f"The lean runtime's CPU kernels could not be built ({reason}); it runs torch's ops instead "
            "(same outputs as AR decoding, slower steps and verification).",
            file=sys.stderr,
        )
        return None
    return torch.ops.cerberus
