"""The exact-rows attention kernel (row_attention.cpp), compiled for this CPU on first use.

``scaled_dot_product_attention`` gives a tree node's row the one-token step's bits only when it is
called once per row (docs/runtime.md): about 40 us a call, so every extra row of a verification cost
another 1.3 ms on the default model. The kernel computes every row of a forward in one call, each
in a fixed order of arithmetic that depends only on its query and its keys, so rows stay bitwise the
one-token step by construction. It is built with the machine's own instruction set (``-march=native``)
by torch's extension builder (g++ and ninja, about 10 s once; cached under ~/.cache/torch_extensions
per instruction set). Where it cannot be built the lean runtime falls back to one
``scaled_dot_product_attention`` call per row and says so once.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("row_attention.cpp")
HEAD_DIMS = (16, 32, 64, 128)  # the kernel's compiled row widths
MAX_GROUP = 8  # query heads per kv head


def supports(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> bool:
    """Whether the kernel covers a model's attention shape and activation dtype."""
    group = num_heads // num_kv_heads
    return head_dim in HEAD_DIMS and group <= MAX_GROUP and dtype in (torch.float32, torch.bfloat16)


@functools.cache
def load():
    """``torch.ops.cerberus.row_attention``, or None (with one line on stderr) where it cannot be built.

    ``row_attention(q [n, Hq, D], k [Hkv, capacity, D], v, context, own [n, E], own_count [n]) -> [n, Hq, D]``:
    row r attends to the cache's entries ``[0, context)`` then ``own[r, :own_count[r]]``, in that order.
    """
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package: put its binary where torch's builder looks

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    isa = torch.backends.cpu.get_cpu_capability().lower()
    try:
        cpp_extension.load(
            name=f"cerberus_row_attention_{isa}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a read-only cache: the slower exact path still works
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(
            f"The row attention kernel could not be built ({reason}); the lean runtime computes each "
            "tree row with its own attention call instead (same outputs, slower verification).",
            file=sys.stderr,
        )
        return None
    return torch.ops.cerberus.row_attention
