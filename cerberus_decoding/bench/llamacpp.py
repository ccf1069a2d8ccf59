"""llama.cpp, the peer CPU users pick: greedy decoding through llama-cpp-python on the same GGUF.

It gets exactly the token ids our methods get (our tokenizer and chat template, fed as ids, not
text), the same thread count, the same stop tokens and the same new-token budget. Its numerics
differ from ours (it quantizes activations to 8 bits for its 4-bit matmuls), so the bench compares
its output by agreement with ``ar``, never as mismatches.

llama-cpp-python is an optional extra (``pip install -e '.[peers]'``): it compiles llama.cpp from
source for 8-10 minutes on 2 cores.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..methods import LLAMA_CPP
from ..models import CerberusError, LoadedModel

INSTALL = "pip install -e '.[peers]'  (or `make bench-peers`; it compiles llama.cpp for 8-10 minutes)"


def require_llama_cpp() -> None:
    """A one-line error naming the install command when the extra is missing (checked before loading)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise CerberusError(f"{LLAMA_CPP} needs llama-cpp-python: {INSTALL}.")


def load_llama(lm: LoadedModel):
    """llama.cpp on ``lm``'s GGUF with torch's thread count, or a one-line error saying what is missing."""
    require_llama_cpp()
    if lm.gguf is None:
        raise CerberusError(
            f"{LLAMA_CPP} needs a GGUF model (--model default or a .gguf file); {lm.name} was loaded "
            "from a Hugging Face directory."
        )
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    return Llama(
        model_path=str(lm.gguf),
        n_ctx=lm.context_length,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )


def generate_greedy(llama, ids: list[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens after ``ids`` (stopping after an EOS id, as our engine does), total seconds and
    seconds to the first token (prompt processing + its argmax)."""
    n = min(max_new_tokens, llama.n_ctx() - len(ids))  # our engine clamps to the context the same way
    start = time.perf_counter()
    llama.reset()
    llama.eval(ids)
    out: list[int] = []
    first = None
    while len(out) < n:
        token = int(last_logits(llama).argmax())  # the first of equal maxima, as torch's argmax
        out.append(token)
        first = first if first is not None else time.perf_counter() - start
        if token in eos_ids or len(out) == n:
            break
        llama.eval([token])
    return out, time.perf_counter() - start, first


def last_logits(llama) -> np.ndarray:
    """The logits after the last evaluated token [V] (a view of llama.cpp's buffer)."""
    from llama_cpp import llama_get_logits_ith

    return np.ctypeslib.as_array(llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),))
