"""The base-model call every part of Cerberus goes through.

A runtime holds the weights in one format and offers::

    cache = runtime.new_cache(capacity, device)
    hidden = runtime.forward(cache, ids, positions, tree_mask=None)  # [q] -> [q, H], K/V into cache
    logits = runtime.lm_head(hidden)                                  # [q, H] -> [q, V]

and the cache offers ``length``, ``truncate(n)`` and ``compact(start, rows)`` (keep the rows of the
last forward, e.g. the accepted tree path). For distillation::

    hidden = runtime.forward_padded(ids)                     # [B, T] right-padded, no cache -> [B, T, H]
    hidden = runtime.forward_rows(caches, ids, positions)    # lean: one token for each of B caches -> [B, H]
    rows = runtime.generate_padded(prompts, max_new_tokens, eos, pad, keep_hidden)  # one left-padded batch

Two runtimes: ``lean`` (runtime/lean.py, our own forward, every weight format) and ``hf``
(runtime/hf.py, the unmodified transformers model).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models import CerberusError
from .formats import INT4_FORMATS, QUANTIZED, WEIGHTS, activation_dtype, require_w4a8, w4a8_available

RUNTIMES = ("lean", "hf")


def resolve_weights(weights: str, device: torch.device, runtime: str) -> str:
    """``auto`` without a calibration: on a CPU w4a8 where its kernel is built (every calibration of
    the shipped heads measured it fastest: 2.5x int4 on AVX2, level with it on AVX-512), else int4;
    bfloat16 on CUDA; the ``hf`` runtime runs float32 on a CPU (its bfloat16 is slower there without
    AVX-512)."""
    if weights not in WEIGHTS:
        raise CerberusError(f"Unknown --weights {weights!r}; use one of {', '.join(WEIGHTS)}.")
    if weights == "auto":
        if device.type == "cuda":
            return "bfloat16"
        if runtime == "hf":
            return "float32"
        return "w4a8" if w4a8_available() else "int4"
    if runtime == "hf" and weights in QUANTIZED:
        raise CerberusError(f"--runtime hf runs float32 or bfloat16 weights, not {weights}; use --runtime lean.")
    if device.type == "cuda" and weights in QUANTIZED:
        raise CerberusError(f"--weights {weights} has no CUDA kernel here; use --weights bfloat16 on a GPU.")
    if weights == "w4a8":
        require_w4a8()
    return weights


# Attention kernels allowed on CUDA. Not cuDNN's, which torch picks first on an H100: it builds and
# caches a graph per shape, and a decoding step's keys grow by one every step, so each step would
# pay a build (docs/runtime.md, CUDA).
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(device: torch.device):
    """The context every runtime computes attention in: ``CUDA_SDPA_BACKENDS`` on CUDA, torch's
    own choice elsewhere."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def cuda_graphs_default() -> bool:
    """Whether CUDA steps are replayed from CUDA graphs (docs/runtime.md, CUDA graphs): yes unless
    ``CERBERUS_CUDA_GRAPHS=0``. On a GPU a small model's step is bound by kernel launches."""
    return os.environ.get("CERBERUS_CUDA_GRAPHS", "1") != "0"


def capture(body: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``body`` captured as a CUDA graph after two warm-up runs on a side stream (torch.cuda.graphs'
    recipe) -> (graph, the output tensor every replay overwrites). The warm-ups run with the inputs'
    current values, so anything ``body`` writes is written again by the first replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


def build_runtime(hf_model, weights: str, runtime: str, gguf: Path | None = None):
    """The runtime for a loaded transformers model (float32 on the CPU: the source of the weights)."""
    if runtime not in RUNTIMES:
        raise CerberusError(f"Unknown --runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    if runtime == "hf":
        from .hf import HFRuntime

        return HFRuntime(hf_model.to(activation_dtype(weights)), weights)
    from .lean import LeanLlama

    blocks = None
    if weights in INT4_FORMATS and gguf is not None:
        from .gguf import read_q4_blocks

        cfg = hf_model.config
        blocks = read_q4_blocks(gguf, cfg.num_attention_heads, cfg.num_key_value_heads)
    return LeanLlama(hf_model, weights, blocks)


def split_answers(tokens: torch.Tensor, hidden: torch.Tensor | None, eos: int) -> list:
    """A padded batch's greedy steps, tokens [B, n] and hidden [B, n, H] (or None), -> one
    (tokens [m], hidden [m, H] or None) per row, each cut after its first ``eos``."""
    tokens, hidden = tokens.cpu(), None if hidden is None else hidden.cpu()
    out = []
    for i, row in enumerate(tokens):
        ends = (row == eos).nonzero()
        n = int(ends[0]) + 1 if len(ends) else row.numel()
        out.append((row[:n].clone(), None if hidden is None else hidden[i, :n].clone()))
    return out


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")  # what changes the kernels


def machine(device: torch.device | str = "cpu") -> dict:
    """What timings depend on: device type, CPU model and the ISA flags torch's kernels use (or the GPU's
    name), thread count and torch version. Two machines with the same dict run the same kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"device": "cuda", "name": torch.cuda.get_device_name(device), "torch": torch.__version__}
    info = {}  # the first processor's "key: value" lines
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    return {
        "device": "cpu",
        "name": name,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def hardware(device: torch.device | str = "cpu") -> str:
    """``machine`` in words: "AMD EPYC, AVX2, 2 threads, torch 2.13.0+cpu" or "NVIDIA H100, torch 2.11"."""
    m = machine(device)
    if m["device"] == "cuda":
        return f"{m['name']}, torch {m['torch']}"
    threads = m["threads"]
    return f"{m['name']}, {m['isa']}, {threads} thread{'s' if threads > 1 else ''}, torch {m['torch']}"
