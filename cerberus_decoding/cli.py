"""The `cerberus` command line. Thin: parse options, build a Decoder, print."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from .models import CerberusError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cerberus: faster LLM decoding with draft heads, tree verification and an entropy gate.")


class Method(str, Enum):
    ar = "ar"
    medusa = "medusa"
    cerberus = "cerberus"
    cerberus_nogate = "cerberus-nogate"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Gate(str, Enum):
    hidden = "hidden"
    logits = "logits"
    off = "off"


# shared options (typer reads them from the function signatures)
ModelOpt = typer.Option("default", "--model", "-m", help="'default' (SmolLM2-135M-Instruct), a HF model dir or a .gguf file.")
DTypeOpt = typer.Option(DType.float32, "--dtype", help="float32 is exact and fastest on CPUs without AVX-512.")
DeviceOpt = typer.Option(Device.auto, "--device")
MethodOpt = typer.Option(Method.ar, "--method", help="Decoding method.")
HeadsOpt = typer.Option("default", "--heads", help="Heads dir, 'default' (shipped) or 'none' (untrained).")
GateOpt = typer.Option(None, "--gate", help="Entropy gate: hidden | logits | off (default: the heads' own).")
ThresholdOpt = typer.Option(None, "--gate-threshold", help="Speculate when entropy < this (default: the heads').")
TreeOpt = typer.Option(None, "--tree", help="JSON file with a tree in Medusa 'choices' notation.")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def make_decoder(model, dtype, device, method, heads, gate, threshold, tree):
    from .methods import build_decoder
    from .models import load_model

    lm = load_model(model, dtype.value, device.value)
    return build_decoder(lm, method.value, heads, gate.value if gate else None, threshold,
                         str(tree) if tree else None)


@app.command()
def generate(
    prompt: str = typer.Argument(None, help="The prompt; read from stdin when omitted."),
    model: str = ModelOpt, dtype: DType = DTypeOpt, device: Device = DeviceOpt, method: Method = MethodOpt,
    heads: str = HeadsOpt, gate: Gate = GateOpt, gate_threshold: float = ThresholdOpt, tree: Path = TreeOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy (lossless)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: continue the text as is."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    trace: Path = typer.Option(None, "--trace", help="Write one JSON line per decoding step here."),
):
    """Generate a reply to PROMPT, streaming it, then print a stats line."""
    from .engine import SamplingConfig

    if prompt is None:
        if sys.stdin.isatty():
            fail("give a PROMPT argument or pipe one on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        fail("the prompt is empty")
    if top_p <= 0:
        fail("--top-p must be > 0")
    decoder = make_decoder(model, dtype, device, method, heads, gate, gate_threshold, tree)
    ids = decoder.encode(prompt, raw=raw)
    cfg = SamplingConfig(max_new_tokens, temperature, top_p, seed, list(stop or []))
    stream = None if as_json else (lambda s: print(s, end="", flush=True))
    result = decoder.generate(ids, cfg, on_text=stream)
    if trace:
        trace.write_text("".join(json.dumps(s) + "\n" for s in result.trace()))
    if as_json:
        summary = result.summary()
        print(json.dumps({k: summary[k] for k in ("text", "token_ids", "new_tokens", "seconds", "tokens_per_second",
                                                  "steps", "mean_accepted", "speculative_steps", "method")}))
    else:
        print()
        typer.secho(_stats_line(result), fg=typer.colors.CYAN, err=True)


def _stats_line(result) -> str:
    return (f"[{result.method}] {result.new_tokens} tokens in {result.seconds:.2f}s = "
            f"{result.tokens_per_second:.1f} tokens/s; {len(result.steps)} steps, "
            f"{result.mean_accepted:.2f} tokens/step, {result.speculative_steps} speculative")


@app.command()
def chat(
    model: str = ModelOpt, dtype: DType = DTypeOpt, device: Device = DeviceOpt, method: Method = MethodOpt,
    heads: str = HeadsOpt, gate: Gate = GateOpt, gate_threshold: float = ThresholdOpt, tree: Path = TreeOpt,
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(None, "--seed"),
    system: str = typer.Option(None, "--system", help="System prompt."),
):
    """Multi-turn chat in the terminal; earlier turns' KV cache is reused. /reset clears, /exit quits."""
    from .engine import SamplingConfig

    decoder = make_decoder(model, dtype, device, method, heads, gate, gate_threshold, tree)
    history = [{"role": "system", "content": system}] if system else []
    typer.secho("Chat started. /reset clears the conversation, /exit or Ctrl-D quits.", err=True)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = decoder.encode(history)
        try:
            decoder.check_fits(len(ids))
        except CerberusError as e:
            typer.secho(f"error: {e} Use /reset to start over.", fg=typer.colors.RED, err=True)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        result = decoder.generate(ids, SamplingConfig(max_new_tokens, temperature, top_p, seed),
                                  on_text=lambda s: print(s, end="", flush=True), reuse_cache=True)
        print()
        typer.secho(_stats_line(result), fg=typer.colors.CYAN, err=True)
        history.append({"role": "assistant", "content": result.text})


# --- more commands are registered below by their modules -------------------------------------


def main() -> None:
    try:
        app()
    except CerberusError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
