"""The `cerberus` command line. Thin: parse options, build a Decoder, print."""

from __future__ import annotations

import json
import math
import os
import sys
from enum import Enum
from pathlib import Path

import typer

from .methods import LLAMA_CPP, METHODS
from .models import CerberusError
from .runtime.formats import WEIGHTS
from .sampling import ACCEPTANCES, DEFAULT_ACCEPTANCE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cerberus: faster LLM decoding with draft heads, tree verification and an entropy gate.",
)


Method = Enum("Method", {name: name for name in METHODS}, type=str)  # names: methods.py
# generate also runs the llama.cpp peer on the same prompt ids (bench/llamacpp.py)
GenerateMethod = Enum("GenerateMethod", {name: name for name in (*METHODS, LLAMA_CPP)}, type=str)


Weights = Enum("Weights", {name: name for name in WEIGHTS}, type=str)  # names: runtime/formats.py


class Runtime(str, Enum):
    lean = "lean"
    hf = "hf"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Gate(str, Enum):
    hidden = "hidden"
    logits = "logits"
    off = "off"


Acceptance = Enum("Acceptance", {name: name for name in ACCEPTANCES}, type=str)  # names: sampling.py


# shared options (typer reads them from the function signatures)
ModelOpt = typer.Option(
    "default", "--model", "-m", help="'default' (SmolLM2-135M-Instruct), a HF model dir or a .gguf file."
)
WeightsOpt = typer.Option(
    Weights.auto,
    "--weights",
    "--dtype",
    help="Weight format. auto: the heads' calibrated fastest on this machine, else int4 on a CPU (the GGUF's own "
    "4-bit blocks) and bfloat16 on CUDA; w4a8: int4 weights x int8 activations, AVX512-VNNI or AVX2 (docs/runtime.md).",
)
RuntimeOpt = typer.Option(
    Runtime.lean, "--runtime", help="lean: our compact forward; hf: the unmodified transformers model (reference)."
)
DeviceOpt = typer.Option(Device.auto, "--device")
MethodOpt = typer.Option(Method("ar"), "--method", help="Decoding method.")
HeadsOpt = typer.Option("default", "--heads", help="Heads dir, 'default' (shipped) or 'none' (untrained).")
GateOpt = typer.Option(None, "--gate", help="Entropy gate: hidden | logits | off (default: the heads' own).")
ThresholdOpt = typer.Option(None, "--gate-threshold", help="Speculate when entropy < this (default: the heads').")
TreeOpt = typer.Option(None, "--tree", help="JSON file with a tree in Medusa 'choices' notation.")
ConfidenceOpt = typer.Option(
    None,
    "--min-confidence",
    min=0.0,
    max=1.0,
    help="Verify only tree nodes the heads give at least this chance of being accepted (0: the whole tree; "
    "default: calibrated, else 0).",
)
CalibrateOpt = typer.Option(
    None,
    "--calibrate/--no-calibrate",
    help="Heads with no calibration for this machine get a quick one (~60 s, once) before first use; "
    "--no-calibrate skips it and uses the defaults (default: on, unless $CERBERUS_NO_CALIBRATE=1).",
    show_default=False,
)
AcceptanceOpt = typer.Option(
    Acceptance(DEFAULT_ACCEPTANCE),
    "--acceptance",
    help="How speculative methods accept drafts when sampling (temperature > 0): exact = the base model's "
    "distribution exactly; typical = Medusa's rule (longer accepted paths, lossy). Greedy ignores it.",
)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def check_options(seed=None, threshold=None, tree=None) -> None:
    """Checks shared by the commands, made before the model loads (bad values fail fast)."""
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.manual_seed takes
        fail(f"--seed must fit in 64 bits (got {seed})")
    if threshold is not None and math.isnan(threshold):
        fail("--gate-threshold must be a number (inf: always speculate, -inf: never), not nan")
    if tree is not None:  # checked even where the method ignores it (--method ar)
        from .tree import build_tree, load_tree

        build_tree(load_tree(tree))


def utf8_text(text: str, where: str) -> str:
    """``text`` unchanged, or a clean error if it holds undecodable bytes (argv and stdin decode them
    to lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fail(f"{where} is not valid UTF-8 text; convert it to UTF-8")
    return text


def read_stdin(where: str) -> str:
    try:
        return utf8_text(sys.stdin.read(), where)
    except UnicodeDecodeError:
        fail(f"{where} is not valid UTF-8 text; convert it to UTF-8")


def open_trace(trace: Path | None):
    """Open --trace before generating, so a bad path fails before the work, not after it."""
    if trace is None:
        return None
    try:
        return open(trace, "w", encoding="utf-8")
    except OSError as e:
        fail(f"cannot write --trace {trace}: {e.strerror}; pick a file in an existing directory")


def make_decoder(model, weights, runtime, device, method, heads, gate, threshold, tree, calibrate, min_confidence):
    """Load the model, settle its weight format and build the decoder; say what it runs with and why."""
    from .methods import build_decoder, choose_weights
    from .models import load_model

    check_options(threshold=threshold, tree=tree)
    lm = load_model(model, weights.value, device.value, runtime.value)
    lm = choose_weights(lm, weights.value, method.value, heads, calibrate)
    decoder = build_decoder(
        lm,
        method.value,
        heads,
        gate.value if gate else None,
        threshold,
        str(tree) if tree else None,
        None,
        calibrate,
        min_confidence,
    )
    typer.secho(decoder.config.why(), dim=True, err=True)
    return decoder


@app.command()
def generate(
    prompt: str = typer.Argument(None, help="The prompt; read from stdin when omitted."),
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
    method: GenerateMethod = typer.Option(
        GenerateMethod("ar"), "--method", help=f"Decoding method ({LLAMA_CPP}: the peer, greedy, on the same GGUF)."
    ),
    heads: str = HeadsOpt,
    gate: Gate = GateOpt,
    gate_threshold: float = ThresholdOpt,
    tree: Path = TreeOpt,
    min_confidence: float = ConfidenceOpt,
    calibrate: bool = CalibrateOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy (lossless)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(None, "--seed"),
    acceptance: Acceptance = AcceptanceOpt,
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
        prompt = read_stdin("the prompt on stdin")
    if not utf8_text(prompt, "the prompt").strip():
        fail("the prompt is empty")
    if top_p <= 0:
        fail("--top-p must be > 0")
    if any(not s for s in stop or []):
        fail('--stop "" would stop at once; give a non-empty stop string')
    check_options(seed=seed)
    if method.value == LLAMA_CPP:
        if temperature > 0 or stop or trace:
            fail(f"--method {LLAMA_CPP} decodes greedily here: drop --temperature, --stop and --trace")
        return generate_with_llamacpp(prompt, model, device, raw, max_new_tokens, as_json)
    trace_file = open_trace(trace)
    decoder = make_decoder(
        model, weights, runtime, device, method, heads, gate, gate_threshold, tree, calibrate, min_confidence
    )
    decoder.trace_entropies = trace_file is not None
    ids = decoder.encode(prompt, raw=raw)
    cfg = SamplingConfig(max_new_tokens, temperature, top_p, seed, list(stop or []), acceptance.value)
    stream = None if as_json else (lambda s: print(s, end="", flush=True))
    result = decoder.generate(ids, cfg, on_text=stream)
    if trace_file:
        with trace_file:
            trace_file.write("".join(json.dumps(s) + "\n" for s in result.trace()))
    if as_json:
        summary = result.summary()
        keys = ("text", "token_ids", "new_tokens", "seconds", "tokens_per_second", "steps", "mean_accepted")
        out = {k: summary[k] for k in (*keys, "speculative_steps", "method")}
        config = decoder.config.to_json() | {"why": decoder.config.why()}
        print(json.dumps(out | {"weights": decoder.lm.weights, "runtime": decoder.lm.runtime.name, "config": config}))
    else:
        print()
        typer.secho(_stats_line(result), fg=typer.colors.CYAN, err=True)


def generate_with_llamacpp(prompt: str, model: str, device, raw: bool, max_new_tokens: int, as_json: bool) -> None:
    """The peer on the same prompt ids as ``ar`` (our tokenizer and chat template), greedy."""
    from .bench.llamacpp import generate_greedy, load_llama, require_llama_cpp
    from .methods import build_decoder
    from .models import load_model

    require_llama_cpp()  # before the model loads
    lm = load_model(model, "auto", device.value)
    reference = build_decoder(lm, "ar")
    ids = reference.encode(prompt, raw=raw)
    new, seconds, first = generate_greedy(load_llama(lm), ids, reference.eos_ids, max_new_tokens)
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    stats = {"new_tokens": len(new), "seconds": seconds, "tokens_per_second": len(new) / seconds}
    if as_json:
        print(json.dumps({"text": text, "token_ids": new, **stats, "first_token_seconds": first, "method": LLAMA_CPP}))
    else:
        print(text)
        typer.secho(
            f"[{LLAMA_CPP}] {len(new)} tokens in {seconds:.2f}s = {stats['tokens_per_second']:.1f} tokens/s; "
            f"first token after {1000 * first:.0f} ms",
            fg=typer.colors.CYAN,
            err=True,
        )


def _stats_line(result) -> str:
    return (
        f"[{result.method}] {result.new_tokens} tokens in {result.seconds:.2f}s = "
        f"{result.tokens_per_second:.1f} tokens/s; {len(result.steps)} steps, "
        f"{result.mean_accepted:.2f} tokens/step, {result.speculative_steps} speculative"
    )


@app.command()
def chat(
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
    method: Method = MethodOpt,
    heads: str = HeadsOpt,
    gate: Gate = GateOpt,
    gate_threshold: float = ThresholdOpt,
    tree: Path = TreeOpt,
    min_confidence: float = ConfidenceOpt,
    calibrate: bool = CalibrateOpt,
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(None, "--seed"),
    acceptance: Acceptance = AcceptanceOpt,
    system: str = typer.Option(None, "--system", help="System prompt."),
):
    """Multi-turn chat in the terminal; earlier turns' KV cache is reused. /reset clears, /exit quits."""
    from .engine import SamplingConfig

    check_options(seed=seed)
    decoder = make_decoder(
        model, weights, runtime, device, method, heads, gate, gate_threshold, tree, calibrate, min_confidence
    )
    history = [{"role": "system", "content": system}] if system else []
    typer.secho("Chat started. /reset clears the conversation, /exit or Ctrl-D quits.", err=True)
    while True:
        try:
            line = utf8_text(input("you> "), "the input")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        except UnicodeDecodeError:
            fail("the input is not valid UTF-8 text; convert it to UTF-8")
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
        result = decoder.generate(
            ids,
            SamplingConfig(max_new_tokens, temperature, top_p, seed, acceptance=acceptance.value),
            on_text=lambda s: print(s, end="", flush=True),
            reuse_cache=True,
        )
        print()
        typer.secho(_stats_line(result), fg=typer.colors.CYAN, err=True)
        history.append({"role": "assistant", "content": result.text})


@app.command()
def serve(
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
    method: Method = MethodOpt,
    heads: str = HeadsOpt,
    gate: Gate = GateOpt,
    gate_threshold: float = ThresholdOpt,
    tree: Path = TreeOpt,
    min_confidence: float = ConfidenceOpt,
    calibrate: bool = CalibrateOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: all interfaces)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="CERBERUS_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 routes and /openapi.json.",
    ),
    served_model_name: list[str] = typer.Option(
        None,
        "--served-model-name",
        "--model-name",
        help="Model id clients pass and see (repeatable: the first is the main one; the model's name, "
        "--model and 'default' for the default model are accepted too).",
    ),
    max_request_bytes: int = typer.Option(
        8 * 1024 * 1024, "--max-request-bytes", min=1024, help="Larger request bodies get a 413."
    ),
    acceptance: Acceptance = typer.Option(
        Acceptance(DEFAULT_ACCEPTANCE),
        "--acceptance",
        help="Default acceptance for sampled requests (a request's 'acceptance' field overrides it): "
        "exact = the base model's distribution exactly; typical = Medusa's rule (lossy).",
    ),
):
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from .server import serve as run_server
    from .server import served_names

    if api_key is None and "CERBERUS_API_KEY" in os.environ:  # click treats an empty variable as unset
        api_key = os.environ["CERBERUS_API_KEY"]
    if api_key is not None and not api_key.strip():
        fail("the API key (--api-key or CERBERUS_API_KEY) is empty; give a key, or unset it to serve without one")
    if any(not name.strip() for name in served_model_name or []):
        fail("--served-model-name must not be empty")
    decoder = make_decoder(
        model, weights, runtime, device, method, heads, gate, gate_threshold, tree, calibrate, min_confidence
    )
    names = served_names(served_model_name or [], decoder.lm.name, model)
    run_server(decoder, host, port, names, api_key, max_request_bytes, acceptance.value)


@app.command()
def bench(
    questions: str = typer.Option(
        "builtin", "--questions", "-q", help="'builtin' or a Spec-Bench/MT-Bench question.jsonl."
    ),
    methods: str = typer.Option(
        None,
        "--methods",
        help="Comma list: ar, hf, hf-pld, pld and our methods; ar is always run "
        "[default: ar,hf,pld,medusa,cerberus,cerberus-nogate (+ hf-pld)]",
    ),
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
    heads: str = HeadsOpt,
    gate: Gate = GateOpt,
    gate_threshold: float = ThresholdOpt,
    tree: Path = TreeOpt,
    min_confidence: float = ConfidenceOpt,
    calibrate: bool = CalibrateOpt,
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Per turn."),
    limit: int = typer.Option(None, "--limit", min=1, help="First N questions of each category."),
    categories: str = typer.Option(None, "--categories", help="Comma list of categories (default: all)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed generations per method first."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Times each question is timed (median kept)."),
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Writes results.json, report.md, PNGs."),
    temperature: float = typer.Option(
        0.0,
        "--temperature",
        "-t",
        min=0.0,
        help="0 = greedy. T > 0 samples (seeded) and runs each speculative method with both acceptance "
        "rules, as NAME[exact] and NAME[typical] (or name one: cerberus[typical]).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of every sampled generation (with --temperature)."),
):
    """Benchmark methods side by side (same questions, same model): speed, acceptance, exactness."""
    import shlex

    from .bench import benchmark, load_questions, parse_methods, results_dict, select_questions
    from .bench.report import print_table, write_all
    from .bench.run import default_methods, is_peer, split_acceptance
    from .methods import choose_weights, head_type_for
    from .models import load_model

    check_options(seed=seed, threshold=gate_threshold, tree=tree)
    names = parse_methods(methods or default_methods(), temperature)  # bad names fail before the model loads
    if LLAMA_CPP in names:
        from .bench.llamacpp import require_llama_cpp

        require_llama_cpp()
    cats = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    chosen = select_questions(load_questions(questions), cats, limit)
    if not chosen:
        fail("no questions selected")
    methods = methods or default_methods()
    lm = load_model(model, weights.value, device.value, runtime.value)
    # one format for every row: the one calibrated for the first method with heads (ar: cerberus heads)
    ours = [m for m in (split_acceptance(n)[0] for n in names) if not is_peer(m)]
    lm = choose_weights(lm, weights.value, next((m for m in ours if head_type_for(m)), "ar"), heads, calibrate)
    run = benchmark(
        lm,
        chosen,
        methods,
        max_new_tokens,
        heads,
        gate.value if gate else None,
        gate_threshold,
        str(tree) if tree else None,
        warmup,
        repeats,
        temperature=temperature,
        seed=seed,
        calibrate=calibrate,
        min_confidence=min_confidence,
    )
    if run.interrupted:
        typer.secho("interrupted: reporting the questions every method finished", fg=typer.colors.YELLOW, err=True)
    args = [
        "cerberus",
        "bench",
        "--questions",
        questions,
        "--methods",
        methods,
        "--model",
        model,
        "--weights",
        lm.weights,
        "--runtime",
        runtime.value,
        "--device",
        device.value,
        "--heads",
        heads,
        "--max-new-tokens",
        str(max_new_tokens),
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
        "--out",
        str(out),
    ]
    args += ["--limit", str(limit)] if limit else []
    args += ["--categories", ",".join(cats)] if cats else []
    args += ["--gate", gate.value] if gate else []
    args += ["--gate-threshold", str(gate_threshold)] if gate_threshold is not None else []
    args += ["--tree", str(tree)] if tree else []
    args += ["--min-confidence", str(min_confidence)] if min_confidence is not None else []
    args += ["--temperature", str(temperature), "--seed", str(seed)] if temperature > 0 else []
    args += ["--no-calibrate"] if calibrate is False else []
    results = results_dict(
        lm,
        run,
        max_new_tokens,
        temperature,
        command=shlex.join(args),
        heads=heads,
        warmup=warmup,
        repeats=repeats,
        questions_source=questions,
    )
    print_table(results)
    paths = write_all(results, out)
    typer.secho("wrote " + ", ".join(str(p) for p in paths), err=True)
    if run.interrupted:
        raise typer.Exit(130)


@app.command()
def distill(
    prompts: str = typer.Option(
        "builtin",
        "--prompts",
        help="'builtin', a prompt file (JSONL with a 'prompt' field, ShareGPT, Alpaca, question.jsonl, or .txt "
        "with one prompt per line; .xz/.gz read as they are) or a directory of them (corpus/instructions).",
    ),
    out: Path = typer.Option(..., "--out", help="Output directory (re-run the same command to resume)."),
    num_prompts: int = typer.Option(4000, "--num-prompts", min=1, help="How many prompts to use."),
    mix: str = typer.Option(
        None,
        "--mix",
        help="Share of the prompts per source (file name without extensions, or 'builtin') or category, "
        "adding up to 1: e.g. 'dolly15k=0.5,math=0.3,builtin=0.2'. Drawn at random with --seed.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt selection and order."),
    batch_size: int = typer.Option(
        32, "--batch-size", min=1, help="Prompts per shard (and per forward on --runtime hf)."
    ),
    rows: int = typer.Option(
        8, "--rows", min=1, help="Sequences the lean runtime decodes together (continuous batching)."
    ),
    hidden: bool = typer.Option(
        True,
        "--hidden/--no-hidden",
        help="Store float32 hidden states for training (--no-hidden: answers only, in the generating format).",
    ),
    max_new_tokens: int = typer.Option(192, "--max-new-tokens", min=1),
    max_tokens: int = typer.Option(
        0, "--max-tokens", min=0, help="Start no new batch once this many answer tokens are distilled (0 = all)."
    ),
    deadline: float = typer.Option(
        0.0, "--deadline", min=0.0, help="Start no new batch after this many seconds (0 = none); resumable."
    ),
    shard: str = typer.Option(
        "0/1", "--shard", help="I/N: this process does batches I, I+N, ... (run N processes, one per core or GPU)."
    ),
    answers: Path = typer.Option(
        None,
        "--answers",
        help="An answers.safetensors from an earlier run on the same prompts: rebuild the shards from it "
        "(teacher-forced forwards) instead of generating.",
    ),
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
):
    """Self-distillation: the base model's own greedy answers and hidden states, for head training."""
    from .models import load_model
    from .train.distill import distill as run
    from .train.distill import read_answers
    from .train.prompts import load_prompts

    try:
        worker, workers = (int(x) for x in shard.split("/"))
    except ValueError:
        worker, workers = -1, 0
    if not 0 <= worker < workers:
        fail(f"--shard must be I/N with 0 <= I < N (got {shard!r})")
    chosen, source = load_prompts(prompts, num_prompts, mix, seed)
    recorded = read_answers(answers, source) if answers else None
    lm = load_model(model, weights.value, device.value, runtime.value)
    summary = run(
        lm,
        chosen,
        out,
        batch_size,
        max_new_tokens,
        keep_hidden=hidden,
        source=source,
        worker=worker,
        workers=workers,
        answers=recorded,
        max_tokens=max_tokens,
        deadline=deadline,
        rows_per_step=rows,
    )
    typer.echo(json.dumps(summary))


@app.command()
def train(
    data: Path = typer.Option(..., "--data", help="A `cerberus distill` output directory."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, latest/ and heads/."),
    heads_type: str = typer.Option("cerberus", "--heads-type", help="medusa | cerberus"),
    num_heads: int = typer.Option(4, "--num-heads", min=1, max=16),
    num_layers: int = typer.Option(1, "--num-layers", min=1),
    head_vocab: int = typer.Option(8192, "--head-vocab", min=0, help="Most frequent target tokens (0 = all)."),
    own_lm_head: bool = typer.Option(False, "--own-lm-head", help="Each head gets its own LM head (bigger)."),
    root_token: bool | None = typer.Option(
        None,
        "--root-token/--no-root-token",
        help="Cerberus: start the head chain from the embedding of the token the base model just chose "
        "(default for cerberus; --no-root-token is the paper's chain, docs/training.md).",
    ),
    reads_drafts: bool = typer.Option(
        False,
        "--reads-drafts",
        help="Cerberus with --root-token: each later head also reads the token the head before it drafted "
        "(docs/training.md).",
    ),
    reads_lookup: bool = typer.Option(
        False,
        "--reads-lookup",
        help="Cerberus with --root-token: the heads also read what prompt lookup found after the root (head k "
        "its k-th token, also from outside the head vocabulary; docs/training.md).",
    ),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Start from these trained heads (same options; --reads-drafts may be added)."
    ),
    train_only: str = typer.Option(
        "",
        "--train-only",
        help="'lookup': with --reads-lookup --init-from, train only what reads lookup (the heads stay as trained).",
    ),
    epochs: float = typer.Option(3.0, "--epochs", min=0.01),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr", min=0.0),
    eval_every: int = typer.Option(200, "--eval-every", min=1),
    save_every: int = typer.Option(200, "--save-every", min=1),
    max_steps: int = typer.Option(0, "--max-steps", min=0),
    max_positions: int = typer.Option(
        0, "--max-positions", min=0, help="Train on the first N distilled positions only (0 = all): accuracy vs size."
    ),
    shards: str = typer.Option(
        "",
        "--shards",
        help="Train on these of the data's shards, START:STOP in name order (a Python slice): e.g. ':-1' all but "
        "the last, '-1:' the last (what the lookup adapter trains on: answers the heads never saw).",
    ),
    loss_decay: float = typer.Option(0.8, "--loss-decay", min=0.0, help="Head k's loss weighs DECAY**k."),
    soft_targets: int = typer.Option(
        0, "--soft-targets", min=0, help="Also learn the base model's top-K distribution at each target (0 = off)."
    ),
    soft_weight: float = typer.Option(0.5, "--soft-weight", min=0.0, max=1.0, help="Share of the soft-target loss."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto | float32 | bfloat16 (autocast). auto: bfloat16 on CPUs with AVX512-BF16 or AMX, else float32.",
    ),
    model: str = ModelOpt,
    device: Device = DeviceOpt,
):
    """Train Medusa or Cerberus heads on distilled data (base model frozen)."""
    from .models import load_model
    from .train.train import TrainConfig
    from .train.train import train as run

    if heads_type not in ("medusa", "cerberus"):
        fail("--heads-type must be medusa or cerberus")
    if root_token and heads_type != "cerberus":
        fail("--root-token needs --heads-type cerberus")
    check_options(seed=seed)
    from .models import resolve_device

    root_token = heads_type == "cerberus" if root_token is None else root_token
    if reads_drafts and not root_token:
        fail("--reads-drafts needs --heads-type cerberus with --root-token")
    train_device = resolve_device(device.value)
    lm = load_model(model, "float32", "cpu", runtime="hf")  # never run: LM head, embeddings, fingerprint
    cfg = TrainConfig(
        head_type=heads_type,
        num_heads=num_heads,
        num_layers=num_layers,
        head_vocab=head_vocab,
        own_lm_head=own_lm_head,
        root_token=root_token,
        reads_drafts=reads_drafts,
        reads_lookup=reads_lookup,
        init_from=str(init_from or ""),
        train_only=train_only,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        save_every=save_every,
        max_steps=max_steps,
        max_positions=max_positions,
        shards=shards,
        loss_decay=loss_decay,
        soft_targets=soft_targets,
        soft_weight=soft_weight,
        seed=seed,
        precision=precision,
    )
    typer.echo(json.dumps(run(lm, data, out, cfg, resume=resume, device=train_device)))


@app.command()
def calibrate(
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
    heads: str = HeadsOpt,
    head_type: str = typer.Option("cerberus", "--head-type", help="With --heads default: medusa | cerberus."),
    prompts: str = typer.Option(
        None,
        "--prompts",
        help="A prompt file (JSONL 'prompt' field, question.jsonl, ShareGPT, Alpaca, .txt) "
        "[default: the shipped prompts held out from head training]",
    ),
    budget_seconds: float = typer.Option(300.0, "--budget-seconds", min=1.0, help="Time to spend measuring."),
    quick: bool = typer.Option(False, "--quick", help="The short calibration first use runs (60 s budget)."),
    formats: str = typer.Option(None, "--formats", help="Comma list of weight formats [default: all the device runs]."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=8, help="Per calibration answer."),
    into_heads: bool = typer.Option(
        False, "--into-heads", help="Write into the heads directory (calibration/<machine>.json), to ship it with them."
    ),
):
    """Measure every weight format's step costs and the heads' acceptance on this machine, choose the
    format, tree and gate threshold with the most tokens/s, check the choice by running it, and write
    it to $CERBERUS_CACHE/calibration/ (used with these heads on this machine from then on)."""
    from .calibration.files import calibration_path, shipped_path, write_calibration
    from .calibration.run import HELD_OUT, QUICK_SECONDS, calibration_prompts, format_summary
    from .calibration.run import calibrate as run_calibration
    from .methods import heads_path
    from .models import load_model

    if heads == "none":
        fail("calibrate needs a heads directory (--heads DIR or default)")
    if head_type not in ("medusa", "cerberus"):
        fail(f"--head-type must be medusa or cerberus, not {head_type!r}")
    chosen = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    for f in chosen or []:
        if f not in WEIGHTS or f == "auto":
            fail(f"--formats: unknown weight format {f!r}; use {', '.join(w for w in WEIGHTS if w != 'auto')}")
    texts = calibration_prompts(prompts)
    lm = load_model(model, weights.value, device.value, runtime.value)
    heads_dir = heads_path(lm, head_type, heads)  # the head types are also method names
    budget = QUICK_SECONDS if quick else budget_seconds
    source = prompts or HELD_OUT
    data = run_calibration(
        lm,
        heads_dir,
        texts,
        budget,
        quick,
        chosen,
        max_new_tokens,
        progress=True,
        write=not into_heads,
        prompt_source=source,
    )
    print(format_summary(data))
    key = data["hardware_key"]
    path = write_calibration(shipped_path(heads_dir, key), data) if into_heads else calibration_path(heads_dir, key)
    typer.secho(f"wrote {path}", err=True)


@app.command()
def analyze(
    model: str = ModelOpt,
    weights: Weights = WeightsOpt,
    runtime: Runtime = RuntimeOpt,
    device: Device = DeviceOpt,
    heads: str = HeadsOpt,
    heads_type: str = typer.Option("cerberus", "--heads-type", help="medusa | cerberus"),
    questions: str = typer.Option("builtin", "--questions", help="'builtin' or a question.jsonl (first turns)."),
    limit: int = typer.Option(2, "--limit", min=1, help="Questions per category."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    gate: Gate = typer.Option(Gate.logits, "--gate", help="Entropy kind for the threshold sweep."),
    out: Path = typer.Option(Path("bench-out/analysis"), "--out"),
):
    """Entropy vs accepted length, the zero-acceptance share and a threshold sweep (the paper's Section 3)."""
    from .analyze import analyze as run
    from .analyze import first_turn_prompts
    from .bench.questions import load_questions, select_questions
    from .models import load_model

    if heads_type not in ("medusa", "cerberus"):
        fail("--heads-type must be medusa or cerberus")
    if gate == Gate.off:
        fail("--gate must be hidden or logits for the sweep")
    prompts = first_turn_prompts(select_questions(load_questions(questions), limit=limit))
    lm = load_model(model, weights.value, device.value, runtime.value)
    report = run(lm, heads, prompts, out, max_new_tokens, heads_type, gate.value)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"zero-accept share {report['zero_accept_share']:.3f}; best threshold {report['best_threshold']:.3f}")


# --- more commands are registered below by their modules -------------------------------------


def main(args: list[str] | None = None) -> None:
    try:
        app(args, prog_name="cerberus")
    except CerberusError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
