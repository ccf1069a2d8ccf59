"""Run decoding methods side by side on the same questions and the same loaded model; compute metrics.

Every method sees the same questions in the same process. Questions are the outer loop and methods
the inner one, so slow drift of the machine (heat, other load) spreads over all methods alike.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine import SamplingConfig
from ..methods import METHODS, build_decoder
from ..models import CerberusError, LoadedModel
from ..runtime.formats import QUANTIZED
from ..sampling import ACCEPTANCES, DEFAULT_ACCEPTANCE
from .llamacpp import LLAMA_CPP, generate_greedy, load_llama
from .questions import Question

REFERENCE = "ar"
HF_GREEDY, HF_PLD = "hf", "hf-pld"
PLD_LOOKUP_TOKENS = 10  # transformers' prompt_lookup_num_tokens


@dataclass
class Turn:
    """One generated answer: its prompt (for the logit-gap forward) and what came out."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    seconds: float
    steps: int | None  # decoding forwards after the prompt's (which gives the first token); None where unknown
    speculative_steps: int | None  # None where the method has no such notion
    first_token_seconds: float | None = None  # time to the first new token (prompt processing included)


@dataclass
class Measurement:
    question: Question
    method: str
    turns: list[Turn]  # from the first repeat
    seconds: float  # median over repeats of the whole conversation's generation time

    @property
    def tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)


@dataclass
class BenchRun:
    methods: list[str]
    questions: list[Question]
    measurements: dict[tuple, Measurement] = field(default_factory=dict)  # (question_id, method) -> ...
    interrupted: bool = False
    configs: dict[str, object] = field(default_factory=dict)  # method -> methods.EffectiveConfig (ours only)

    def complete(self) -> list[Question]:
        """Questions that every method finished (an interrupted run may have a half-measured one)."""
        return [q for q in self.questions if all((q.question_id, m) in self.measurements for m in self.methods)]


Runner = Callable[[list[int]], Turn]


def parse_methods(spec: str | list[str], temperature: float = 0.0) -> list[str]:
    """Comma list -> unique names, ``ar`` first (always run: the reference for speedup and mismatches).

    When sampling (temperature > 0), each of our speculative methods runs once per acceptance rule,
    as ``cerberus[exact]`` and ``cerberus[typical]``; a name given with its rule runs only that one.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    out = []
    for name in names:
        method, acceptance = split_acceptance(name)
        if acceptance is not None and temperature <= 0:
            raise CerberusError(f"{name}: an acceptance rule only matters when sampling; add --temperature T > 0.")
        if acceptance is not None and (method == REFERENCE or is_peer(method)):
            raise CerberusError(f"{name}: {method} has no drafts to accept; name it without [{acceptance}].")
        if method == LLAMA_CPP and temperature > 0:
            raise CerberusError(f"The {LLAMA_CPP} row decodes greedily; drop it or --temperature.")
        if acceptance is None and temperature > 0 and method != REFERENCE and not is_peer(method):
            out += [f"{method}[{a}]" for a in ACCEPTANCES]
        else:
            out.append(name)
    return [REFERENCE] + [n for n in dict.fromkeys(out) if n != REFERENCE]


def split_acceptance(name: str) -> tuple[str, str | None]:
    """``cerberus[typical]`` -> ("cerberus", "typical"); ``cerberus`` -> ("cerberus", None)."""
    if not name.endswith("]") or "[" not in name:
        return name, None
    method, _, acceptance = name[:-1].partition("[")
    if acceptance not in ACCEPTANCES:
        raise CerberusError(f"{name}: unknown acceptance {acceptance!r}; use one of {', '.join(ACCEPTANCES)}.")
    return method, acceptance


def hf_kind(method: str) -> str | None:
    """Which transformers generate() a method name means, or None for our engine.

    ``pld`` is our own prompt-lookup decoder once methods.py offers it; until then it is transformers'.
    """
    if method == HF_GREEDY:
        return HF_GREEDY
    if method == HF_PLD or (method == "pld" and "pld" not in METHODS):
        return HF_PLD
    return None


def is_peer(method: str) -> bool:
    """A method that is not our engine: transformers' generate or llama.cpp."""
    return hf_kind(method) is not None or method == LLAMA_CPP


def _sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def engine_runner(
    decoder, max_new_tokens: int, temperature: float = 0.0, acceptance: str = DEFAULT_ACCEPTANCE, seed: int = 0
) -> Runner:
    """Greedy, or sampling with the same seed for every generation (reproducible runs)."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, acceptance=acceptance)

    def run(ids: list[int]) -> Turn:
        first = []

        def on_text(_piece: str) -> None:  # the first text a user would see
            if not first:
                first.append(time.perf_counter() - start)

        _sync(decoder.lm)
        start = time.perf_counter()
        result = decoder.generate(ids, config, on_text=on_text)
        _sync(decoder.lm)
        seconds = time.perf_counter() - start
        ttft = first[0] if first else seconds
        return Turn(ids, result.token_ids, result.text, seconds, len(result.steps), result.speculative_steps, ttft)

    return run


def hf_runner(
    lm: LoadedModel, eos_ids: set[int], max_new_tokens: int, lookup: bool, temperature: float = 0.0, seed: int = 0
) -> Runner:
    # the same stop tokens as our engine, so that both stop at the same place
    pad = lm.tokenizer.pad_token_id
    kwargs = {"do_sample": False, "eos_token_id": sorted(eos_ids), "pad_token_id": min(eos_ids) if pad is None else pad}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = PLD_LOOKUP_TOKENS

    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """Notes when generate() hands over its first new token (its first put() is the prompt)."""

        def __init__(self, start: float):
            self.start, self.puts, self.seconds = start, 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.seconds = time.perf_counter() - self.start

        def end(self):
            pass

    @torch.inference_mode()
    def run(ids: list[int]) -> Turn:
        n = min(max_new_tokens, lm.context_length - len(ids))  # the engine clamps to the context the same way
        x = torch.tensor([ids], device=lm.device)
        if temperature > 0:
            torch.manual_seed(seed)
        _sync(lm)
        start = time.perf_counter()
        streamer = FirstToken(start)
        out = lm.model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, streamer=streamer, **kwargs
        )
        _sync(lm)
        seconds = time.perf_counter() - start
        new = out[0, len(ids) :].tolist()
        text = lm.tokenizer.decode(new, skip_special_tokens=True)
        # plain greedy is one forward per token; how many forwards assisted generation made is not exposed
        return Turn(ids, new, text, seconds, None if lookup else max(len(new) - 1, 0), None, streamer.seconds)

    return run


def llamacpp_runner(lm: LoadedModel, eos_ids: set[int], max_new_tokens: int) -> Runner:
    llama = load_llama(lm)

    def run(ids: list[int]) -> Turn:
        new, seconds, first = generate_greedy(llama, ids, eos_ids, max_new_tokens)
        text = lm.tokenizer.decode(new, skip_special_tokens=True)
        return Turn(ids, new, text, seconds, max(len(new) - 1, 0), None, first)  # one eval per later token

    return run


def build_runners(
    lm: LoadedModel,
    methods: list[str],
    max_new_tokens: int,
    heads: str = "default",
    gate: str | None = None,
    threshold: float | None = None,
    tree: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    calibrate: bool | None = None,
    min_confidence: float | None = None,
):
    """-> (runners by method, the reference ar decoder used to encode prompts for everyone, the
    effective configuration of each of our methods).

    ``methods`` as parse_methods returns them: ``name[acceptance]`` runs ``name`` with that rule."""
    reference = build_decoder(lm, REFERENCE)
    runners: dict[str, Runner] = {}
    configs = {}
    decoders = {}  # one decoder per method, shared by its acceptance rules
    for name in methods:
        method, acceptance = split_acceptance(name)
        kind = hf_kind(method)
        if method == REFERENCE:
            runners[name] = engine_runner(reference, max_new_tokens, temperature, seed=seed)
            configs[name] = reference.config
        elif kind is not None:
            runners[name] = hf_runner(lm, reference.eos_ids, max_new_tokens, kind == HF_PLD, temperature, seed)
        elif method == LLAMA_CPP:
            runners[name] = llamacpp_runner(lm, reference.eos_ids, max_new_tokens)
        else:  # build_decoder validates the name and the heads
            if method not in decoders:
                decoders[method] = build_decoder(
                    lm, method, heads, gate, threshold, tree, calibrate=calibrate, min_confidence=min_confidence
                )
            rule = acceptance or DEFAULT_ACCEPTANCE
            runners[name] = engine_runner(decoders[method], max_new_tokens, temperature, rule, seed)
            configs[name] = decoders[method].config
    return runners, reference, configs


def run_conversation(run: Runner, reference, question: Question) -> list[Turn]:
    """Each turn is asked after the model's own earlier answers, through the chat template."""
    messages, turns = [], []
    for text in question.turns:
        messages.append({"role": "user", "content": text})
        ids = reference.encode(messages)
        reference.check_fits(len(ids))
        turn = run(ids)
        turns.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return turns


def run_bench(
    runners: dict[str, Runner],
    reference,
    questions: list[Question],
    warmup: int = 1,
    repeats: int = 1,
    progress: bool = True,
) -> BenchRun:
    """Warm every method up, then time each question ``repeats`` times per method (median kept).

    Ctrl-C stops early and returns what was measured so far, with ``interrupted`` set.
    """
    from tqdm import tqdm

    methods = list(runners)
    bench = BenchRun(methods, list(questions))
    try:
        if warmup and questions:
            with tqdm(
                total=warmup * len(methods),
                desc="warm-up",
                unit="gen",
                disable=not progress,
                file=sys.stderr,
                leave=False,
            ) as bar:
                for method in methods:
                    for i in range(warmup):
                        q = questions[i % len(questions)]
                        runners[method](reference.encode(q.turns[0]))  # not timed: caches, allocator, kernels
                        bar.update()
        with tqdm(
            total=len(questions) * len(methods), desc="bench", unit="run", disable=not progress, file=sys.stderr
        ) as bar:
            for i, q in enumerate(questions):
                # rotate who goes first, so that no method always runs right after another's warm caches
                for method in methods[i % len(methods) :] + methods[: i % len(methods)]:
                    bar.set_postfix_str(f"{q.category}/{q.question_id} {method}", refresh=False)
                    runs = [run_conversation(runners[method], reference, q) for _ in range(repeats)]
                    seconds = statistics.median(sum(t.seconds for t in turns) for turns in runs)
                    bench.measurements[q.question_id, method] = Measurement(q, method, runs[0], seconds)
                    bar.update()
    except KeyboardInterrupt:
        bench.interrupted = True
    return bench


# ---- mismatches ---------------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def top2_logits(lm: LoadedModel, prompt_ids: list[int], prefix: list[int]) -> tuple[float, float]:
    """The base model's two largest logits for the token after prompt + prefix (one forward)."""
    ids = torch.tensor(prompt_ids + prefix, device=lm.device)
    hidden = lm.runtime.forward(lm.runtime.new_cache(ids.numel(), lm.device), ids, torch.arange(ids.numel()))
    top, second = lm.runtime.lm_head(hidden[-1:])[0].float().topk(2).values.tolist()
    return top, second


# The lossless rule. Row-invariant formats on a CPU verify bitwise as the one-token step computes
# (runtime/lean.py), so any divergence from ar there is a bug. Elsewhere (float32; bfloat16 on
# CUDA, whose kernels differ between q rows and one) a divergence is a proven near-tie when ar's own
# top-2 logit gap at that token is at most ``tie_bound``.
EXACT_FORMATS = ("bfloat16", *QUANTIZED)
FLOAT32_TIE_GAP = 1e-3  # float32 rounding between kernels moves a logit by ~1e-6
BF16_TIE_STEPS = 2  # bfloat16 logits: this many representable steps at the top logit's size


def bitwise_exact(lm: LoadedModel) -> bool:
    """True where speculative greedy output must equal ar's bit for bit, with no tie allowance."""
    return lm.weights in EXACT_FORMATS and lm.device.type == "cpu"


def tie_bound(lm: LoadedModel, top: float) -> float:
    """The largest top-2 logit gap at which a divergence from ar is a proven near-tie (not for
    ``bitwise_exact`` formats). For bfloat16 logits (every format but float32: the activations'
    dtype) that is their own resolution at ``top``."""
    if lm.dtype == torch.bfloat16:
        step = 2.0 ** (math.floor(math.log2(abs(top))) - 7)  # bfloat16: 8 significant bits
        return BF16_TIE_STEPS * step
    return FLOAT32_TIE_GAP


def logit_gap(lm: LoadedModel, prompt_ids: list[int], prefix: list[int]) -> float:
    """Top-1 minus top-2 logit of the base model for the token after prompt + prefix.

    A tiny gap means a near-tie, where rounding (bfloat16, a different kernel or batch shape) can
    legitimately flip the greedy choice.
    """
    top, second = top2_logits(lm, prompt_ids, prefix)
    return top - second


def other_numerics(lm: LoadedModel, method: str) -> bool:
    """True for a method that runs other numerics than ``ar`` (transformers' generate runs the float32
    model, llama.cpp quantizes activations): its output is compared by agreement, not counted as mismatches."""
    return method == LLAMA_CPP or (hf_kind(method) is not None and (lm.runtime.name, lm.weights) != ("hf", "float32"))


def agreement(bench: BenchRun, method: str) -> dict:
    """Share of questions whose tokens equal ar's, and mean tokens before the first difference."""
    same, before = 0, []
    for q in bench.complete():
        a = [t for turn in bench.measurements[q.question_id, REFERENCE].turns for t in turn.token_ids]
        b = [t for turn in bench.measurements[q.question_id, method].turns for t in turn.token_ids]
        pos = first_difference(a, b)
        same += pos is None
        before.append(len(a) if pos is None else pos)
    n = len(before)
    return {
        "identical_share": round(same / n, 4) if n else None,
        "tokens_before_divergence": statistics.fmean(before) if n else None,
    }


def mismatch_details(lm: LoadedModel, bench: BenchRun) -> dict[str, list[dict]]:
    """For each method, the questions whose tokens differ from ar's: where, and the logit gap there."""
    tok = lm.tokenizer
    details: dict[str, list[dict]] = {m: [] for m in bench.methods if m != REFERENCE and not other_numerics(lm, m)}
    for q in bench.complete():
        ref = bench.measurements[q.question_id, REFERENCE]
        for method in details:
            got = bench.measurements[q.question_id, method]
            for turn_no, (a, b) in enumerate(zip(ref.turns, got.turns, strict=True), 1):
                pos = first_difference(a.token_ids, b.token_ids)
                if pos is None:
                    continue
                ar_tok = a.token_ids[pos] if pos < len(a.token_ids) else None
                m_tok = b.token_ids[pos] if pos < len(b.token_ids) else None
                # earlier turns matched, so both methods saw the same prompt for this turn
                details[method].append(
                    {
                        "question_id": q.question_id,
                        "category": q.category,
                        "turn": turn_no,
                        "position": pos,
                        "ar_token": ar_tok,
                        "token": m_tok,
                        "ar_piece": None if ar_tok is None else tok.decode([ar_tok]),
                        "piece": None if m_tok is None else tok.decode([m_tok]),
                        **_tie(lm, a.prompt_ids, a.token_ids[:pos]),
                    }
                )
                break  # one per question: later turns' prompts already differ
    return details


def _tie(lm: LoadedModel, prompt_ids: list[int], prefix: list[int]) -> dict:
    """At a divergence: ar's logit gap there and whether it is a proven near-tie."""
    top, second = top2_logits(lm, prompt_ids, prefix)
    tie = not bitwise_exact(lm) and top - second <= tie_bound(lm, top)
    return {"logit_gap": round(top - second, 6), "top_logit": round(top, 4), "tie": tie}


# ---- metrics ------------------------------------------------------------------------------------


def _total(values: list[int | None]) -> int | None:
    """Sum, or None when any part is unknown (a partly known count would mislead)."""
    return None if any(v is None for v in values) else sum(values)


def _fields(rows: list[Measurement], ref_rows: list[Measurement], mismatched: dict[int, bool]) -> dict:
    """The metrics over ``rows``; ``mismatched``: question id -> whether its divergence is a proven tie."""
    tokens = sum(r.tokens for r in rows)
    step_tokens = sum(max(len(t.token_ids) - 1, 0) for r in rows for t in r.turns)  # the first comes from the prompt
    seconds = sum(r.seconds for r in rows)
    tps = tokens / seconds if seconds > 0 else 0.0
    ref_tokens, ref_seconds = sum(r.tokens for r in ref_rows), sum(r.seconds for r in ref_rows)
    ref_tps = ref_tokens / ref_seconds if ref_seconds > 0 else 0.0
    turns = [t for r in rows for t in r.turns]
    firsts = [t.first_token_seconds for t in turns]
    steps = _total([t.steps for t in turns])
    spec = _total([t.speculative_steps for t in turns])
    return {
        "tokens_per_second": round(tps, 3),
        "speedup": round(tps / ref_tps, 4) if ref_tps > 0 else None,
        "mean_accepted": round(step_tokens / steps, 4) if steps else None,
        "speculative_share": round(spec / steps, 4) if steps and spec is not None else None,
        "mismatches": sum(r.question.question_id in mismatched for r in rows),
        "ties": sum(mismatched.get(r.question.question_id, False) for r in rows),
        "ttft_ms": None if None in firsts or not firsts else round(1000 * statistics.median(firsts), 2),
    }


def summarize(bench: BenchRun, details: dict[str, list[dict]], sampled: bool = False) -> dict[str, dict]:
    """Per method: the five metrics overall and per category, over the questions every method finished.

    tokens_per_second is total tokens / total (median) seconds, so long answers weigh more, as in use;
    speedup is that against ar's on the very same questions. ``sampled``: the run sampled
    (temperature > 0), so outputs differ from ar's by design: no mismatches or agreement.
    """
    questions = bench.complete()
    categories = list(dict.fromkeys(q.category for q in questions))
    out = {}
    for method in bench.methods:
        mismatched = {d["question_id"]: d["tie"] for d in details.get(method, [])}

        def rows(qs, m=method):
            return [bench.measurements[q.question_id, m] for q in qs]

        entry = _fields(rows(questions), rows(questions, REFERENCE), mismatched)
        entry["categories"] = {}
        for cat in categories:
            qs = [q for q in questions if q.category == cat]
            entry["categories"][cat] = _fields(rows(qs), rows(qs, REFERENCE), mismatched)
        if sampled:
            for e in (entry, *entry["categories"].values()):
                e["mismatches"] = e["ties"] = None
        elif method != REFERENCE and method not in details:  # another weight format: agreement instead
            entry["mismatches"] = entry["ties"] = None
            entry["agreement"] = agreement(bench, method)
        out[method] = entry
    return out


def per_question(bench: BenchRun) -> list[dict]:
    return [
        {
            "question_id": m.question.question_id,
            "category": m.question.category,
            "method": m.method,
            "tokens": m.tokens,
            "seconds": round(m.seconds, 5),
            "steps": _total([t.steps for t in m.turns]),
        }
        for q in bench.complete()
        for m in (bench.measurements[q.question_id, k] for k in bench.methods)
    ]


def default_methods() -> str:
    """The issue's list; with our own ``pld`` in methods.py, transformers' one runs as ``hf-pld`` as well."""
    ours = "pld" in METHODS
    return "ar,hf," + ("hf-pld," if ours else "") + "pld,medusa,cerberus,cerberus-nogate"
