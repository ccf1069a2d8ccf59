"""`cerberus bench`: every decoding method side by side on the same questions and the same model.

questions.py reads Spec-Bench-format question files (and the builtin set), run.py generates and
measures, report.py writes the table, results.json, report.md and charts.
"""

from __future__ import annotations

from ..models import LoadedModel
from ..runtime import hardware
from .questions import (
    BUILTIN,
    BUILTIN_CATEGORIES,
    Question,
    load_questions,
    parse_questions,
    select_questions,
)
from .run import BenchRun, build_runners, mismatch_details, parse_methods, per_question, run_bench, summarize

__all__ = [
    "BUILTIN",
    "BUILTIN_CATEGORIES",
    "Question",
    "load_questions",
    "parse_questions",
    "select_questions",
    "BenchRun",
    "parse_methods",
    "run_bench",
    "summarize",
    "benchmark",
    "results_dict",
]


def benchmark(
    lm: LoadedModel,
    questions: list[Question],
    methods: str | list[str],
    max_new_tokens: int = 128,
    heads: str = "default",
    gate: str | None = None,
    threshold: float | None = None,
    tree: str | None = None,
    warmup: int = 1,
    repeats: int = 1,
    progress: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    calibrate: bool | None = None,
    min_confidence: float | None = None,
) -> BenchRun:
    """Build every method on ``lm`` (ar always included) and measure them; Ctrl-C returns a partial run.

    ``temperature`` > 0 samples (every generation seeded with ``seed``) and runs each speculative
    method once per acceptance rule (``cerberus[exact]``, ``cerberus[typical]``)."""
    names = parse_methods(methods, temperature)
    runners, reference, configs = build_runners(
        lm, names, max_new_tokens, heads, gate, threshold, tree, temperature, seed, calibrate, min_confidence
    )
    run = run_bench(runners, reference, questions, warmup, repeats, progress)
    run.configs = configs
    return run


def results_dict(lm: LoadedModel, bench: BenchRun, max_new_tokens: int, temperature: float = 0.0, **extra) -> dict:
    """The results.json object: the fixed top-level shape first, then extras (details, settings).
    Sampled runs (temperature > 0) differ from ar by design: no mismatch details."""
    sampled = temperature > 0
    details = {} if sampled else mismatch_details(lm, bench)
    return {
        "model": lm.name,
        "device": str(lm.device),
        "weights": lm.weights,
        "runtime": lm.runtime.name,
        "tree_attention": getattr(lm.runtime, "tree_attention", None),  # lean: kernel / rows / masked
        "dtype": str(lm.dtype).removeprefix("torch."),
        "hardware": hardware(lm.device),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "questions": len(bench.complete()),
        "methods": summarize(bench, details, sampled),
        "interrupted": bench.interrupted,
        "configs": {m: c.to_json() | {"why": c.why()} for m, c in bench.configs.items()},
        **extra,
        "mismatch_details": details,
        "per_question": per_question(bench),
    }
