"""Calibrate heads on this machine: measure, choose, check the choice by running it, write the file.

``cerberus calibrate`` runs the full calibration (minutes). The first use of heads on a machine with
no calibration for it runs a quick one automatically (``ensure_calibration``, about a minute).
Both measure every weight format the device supports, because the fastest format, tree and
threshold differ between machines (AVX-512 + BF16 or AVX2 only, CPU or GPU).

Calibration prompts are training prompts held out from head training
(``data/calibration_prompts.jsonl``, made by ``scripts/make_calibration_prompts.py``), never the
bench questions: measuring acceptance on what the bench asks would flatter the bench.
"""

from __future__ import annotations

import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..engine import Decoder, SamplingConfig
from ..gate import ENTROPY_GATES
from ..heads import load_heads
from ..lookup import MAX_LEN as LOOKUP_MAX_LEN
from ..models import CerberusError, LoadedModel
from ..runtime import hardware, machine
from ..runtime.formats import WEIGHTS, w4a8_available
from ..tree import build_tree, expected_length
from .choose import (
    accepted_lengths,
    accuracy_table,
    best_lookup_length,
    best_row,
    entropy_bins,
    fastest_format,
    gate_ms,
    monotone_costs,
    predict_table,
    step_costs,
)
from .files import VERSION, calibration_path, hardware_key, read_calibration, write_calibration
from .measure import COST_QS, measure_costs, measure_overheads, observe

CALIBRATION_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "calibration_prompts.jsonl"
QUICK_SECONDS = 60.0  # the automatic first-use calibration
QUICK_QS = (1, 2, 4, 8, 16, 32)
# a choice that runs slower than this x AR in the check falls back to AR steps: AR unless speculation
# measured at least as fast (an Intel AVX-512 calibration kept a 1-node tree its check ran at 0.98x
# AR under a tolerance of 0.97; the bench then ran it at 0.94x)
CHECK_TOLERANCE = 1.0
CANDIDATES = 3  # tree sizes the check races on the fastest format, best predicted first (quick: 2)
# tree sizes predicted within this share of the best are within the prediction's own error (it runs
# 10-40% above what the races measure): the race takes the smallest of them second (an Intel AVX-512
# calibration predicted 3- to 12-node trees within 3.1% of each other; racing the three best
# predicted, 6, 5 and 4 nodes, it kept a 5-node tree the bench ran at 1.15x AR, a 3-node one 1.22x)
PREDICTION_MARGIN = 0.05
# a raced tree must run this much faster than a smaller one to be chosen over it: the race decodes a
# few prompts (a few % of noise), and they come from the heads' training distribution, where the
# heads accept more than on users' questions, which favours larger trees (an AVX-512 calibration
# kept a 2-node tree 1% ahead of the 1-node one in its race; the bench ran it at 0.95x AR, and a
# 1-node tree at 1.04x)
RACE_MARGIN = 0.03
# a full calibration keeps this share of its budget to race cerberus+lookup against lookup chains
# alone (pld): the prediction favoured the heads next to the chains on an Intel AVX-512 CPU (357
# against 337 tokens/s) where the bench measured the opposite (286 against 304)
LOOKUP_RACE_SHARE = 0.1
LOOKUP_KINDS = {"merged": "merged into the tree", "instead": "instead of it"}  # chains next to the heads
NO_CALIBRATE_ENV = "CERBERUS_NO_CALIBRATE"
HELD_OUT = "held-out training prompts"  # what the default calibration prompts are, in reports


def calibration_prompts(source: str | None = None) -> list[str]:
    """The held-out calibration prompts (default), or first turns of a prompt file."""
    from ..train.prompts import read_prompts

    path = Path(source) if source else CALIBRATION_PROMPTS
    if not path.is_file():
        raise CerberusError(f"Calibration prompts {path} are missing; reinstall, or pass --prompts FILE.")
    return read_prompts(path)


def supported_formats(lm: LoadedModel) -> list[str]:
    """The weight formats calibration measures: every one the device has kernels for, the loaded
    one first (its heads' acceptance is measured in it). The transformers runtime runs only its own."""
    if lm.runtime.name != "lean":
        return [lm.weights]
    if lm.device.type == "cuda":
        formats = ["bfloat16", "float32"]
    else:
        formats = ["w4a8", "int4", "int8", "bfloat16", "float32"]
        if not w4a8_available():
            formats.remove("w4a8")
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            formats.remove("int4")
    return [lm.weights] + [f for f in formats if f != lm.weights]


def auto_calibration_enabled(flag: bool | None = None) -> bool:
    """``flag`` (the CLI's --calibrate/--no-calibrate) when given, else on unless $CERBERUS_NO_CALIBRATE."""
    return flag if flag is not None else os.environ.get(NO_CALIBRATE_ENV, "") in ("", "0")


def ensure_calibration(lm: LoadedModel, heads_dir: Path, run: bool = True) -> tuple[dict, Path] | None:
    """This machine's calibration for ``heads_dir``: the user's or a shipped one, else (``run``) a quick
    one made now. Concurrent first runs take a lock, so one calibrates and the others read its file."""
    from filelock import FileLock

    key = hardware_key(machine(lm.device))
    formats = supported_formats(lm)
    found = read_calibration(heads_dir, key, formats)
    if found is not None or not run:
        return found
    target = calibration_path(heads_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        found = read_calibration(heads_dir, key, formats)  # another process may have made it while we waited
        if found is None:
            print(
                f"No calibration of {heads_dir} for this machine ({key}): calibrating for about "
                f"{QUICK_SECONDS:.0f} s, once (--no-calibrate or ${NO_CALIBRATE_ENV}=1 skips this; "
                "`cerberus calibrate` runs the full one).",
                file=sys.stderr,
            )
            data = calibrate(lm, heads_dir, calibration_prompts(), QUICK_SECONDS, quick=True, progress=True)
            found = data, target
    return found


def _observe_prompts(lm, heads, prompts, max_new_tokens, top_k, deadline, progress) -> tuple[dict, int]:
    """``observe`` over the model's greedy answers to ``prompts`` until ``deadline`` (the first answer is
    always finished)."""
    from tqdm import tqdm

    decoder = Decoder(lm, method="ar")
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    obs = {"ranks": [], "probs": [], "lookup": [], **{g: [] for g in ENTROPY_GATES}}
    answers = []  # positions of each answer, in order (the lookup prediction walks each one)
    used = 0
    bar = tqdm(prompts, desc="acceptance", unit="prompt", disable=not progress, file=sys.stderr)
    for prompt in bar:
        if used and time.perf_counter() > deadline:
            break
        ids = decoder.encode(prompt)
        if len(ids) + max_new_tokens + heads.config.num_heads + 2 > lm.context_length:
            continue
        until = (lambda _: time.perf_counter() < deadline) if used else None
        result = decoder.generate(ids, config, on_text=until)
        if len(result.token_ids) < 2:
            continue
        for key, value in observe(lm, heads, ids, result.token_ids, top_k).items():
            obs[key].append(value)
        answers.append(len(obs["lookup"][-1]))
        used += 1
        bar.set_postfix(positions=sum(len(x) for x in obs["logits"]))
    bar.close()
    if not used:
        raise CerberusError("No calibration prompt produced an answer (prompts too long for the context?).")
    return {k: np.concatenate(v) for k, v in obs.items()} | {"answers": answers}, used


def _choices(rows: list[dict], trees: dict, weights: str, ungated: bool, n: int) -> list[dict]:
    """``n`` tree sizes of one weight format to race, the best predicted first, each as a decoder
    configuration with its best threshold and pruning, and the best threshold of each gate for the
    same tree (so ``--gate hidden`` gets a threshold on its own scale). With ``n`` > 2 the smallest
    size predicted within PREDICTION_MARGIN of the best comes second. With ``n`` > 1 the smallest
    tree is always among them (last, if not among the first ``n``): the baseline a larger tree must
    beat for real. The prediction favours larger trees (calibration prompts are the heads' training
    distribution): an AVX-512 calibration raced only 2-, 3- and 4-node trees and kept the 2-node
    one, which the bench then ran at 1.00x and 1.06x ``ar`` in two runs; the 1-node tree had won
    the race before and run at 1.06x. ``ungated`` (the Medusa baseline): always speculating, whole
    trees."""
    where = {"weights": weights} | ({"threshold": math.inf, "min_confidence": 0.0} if ungated else {})
    sizes = sorted({r["nodes"] for r in rows if r["weights"] == weights})
    per_size = [best_row(rows, **where, nodes=size) for size in sizes]
    ranked = sorted(per_size, key=lambda r: -r["tokens_per_s"])  # a stable sort: ties keep fewer nodes
    if n > 2 and ranked:  # second: the smallest tree the prediction cannot tell from the best
        close = next(r for r in per_size if r["tokens_per_s"] >= (1 - PREDICTION_MARGIN) * ranked[0]["tokens_per_s"])
        if close is not ranked[0]:
            ranked.remove(close)
            ranked.insert(1, close)
    ranked = ranked[:n]
    if n > 1 and per_size and per_size[0] not in ranked:
        ranked[-1] = per_size[0]
    out = []
    for best in ranked:
        same_tree = {"weights": weights, "nodes": best["nodes"], "min_confidence": 0.0}  # gated rows
        thresholds = {g: best_row(rows, **same_tree, gate=g)["threshold"] for g in ENTROPY_GATES}
        out.append(
            {
                "tree": trees[best["nodes"]],
                "gate": best["gate"],
                "threshold": best["threshold"],
                "thresholds": thresholds,
                "min_confidence": best["min_confidence"],
                "predicted": {k: best[k] for k in ("tokens_per_s", "ar_tokens_per_s", "speculative_share")},
            }
        )
    return out


def check_choices(
    lm: LoadedModel, heads, choices: list[dict], prompts: list[str], seconds: float, max_new_tokens: int
) -> dict:
    """Run the candidate choices and plain AR (same format) on held-out prompts for ``seconds`` (at
    least one prompt each), every prompt by all of them in a rotating order: the measured tokens/s
    of AR and of each candidate, and each candidate's ratio to AR."""
    decoders = [("ar", Decoder(lm, method="ar"))] + [
        (i, Decoder(lm, heads, build_tree(c["tree"]), c["gate"], c["threshold"], min_confidence=c["min_confidence"]))
        for i, c in enumerate(choices)
    ]
    rate, used = race(lm, decoders, prompts, seconds, max_new_tokens)
    candidates = [
        {k: c[k] for k in ("gate", "threshold", "min_confidence")}
        | {"nodes": len(c["tree"]), "tokens_per_s": rate[i], "ratio": rate[i] / max(rate["ar"], 1e-9)}
        for i, c in enumerate(choices)
    ]
    return {"prompts": used, "ar_tokens_per_s": rate["ar"], "candidates": candidates}


def race(lm: LoadedModel, decoders: list, prompts: list[str], seconds: float, max_new_tokens: int):
    """Decoders [(name, Decoder)] on the same prompts for ``seconds`` (at least one prompt each), every
    prompt by all of them in a rotating order -> ({name: tokens/s}, prompts used)."""
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    totals = {name: [0, 0.0] for name, _ in decoders}
    deadline, used, round_s = time.perf_counter() + seconds, 0, 0.0
    for prompt in prompts:
        if used and time.perf_counter() + round_s > deadline:  # the next round would overrun the budget
            break
        started = time.perf_counter()
        ids = decoders[0][1].encode(prompt)
        if len(ids) + max_new_tokens + 64 > lm.context_length:
            continue
        shift = used % len(decoders)  # who runs first rotates, so drifting load spreads evenly
        for name, decoder in decoders[shift:] + decoders[:shift]:
            t0 = time.perf_counter()
            result = decoder.generate(ids, config)
            totals[name][0] += len(result.token_ids)
            totals[name][1] += time.perf_counter() - t0
        used, round_s = used + 1, time.perf_counter() - started
    return {name: n / max(s, 1e-9) for name, (n, s) in totals.items()}, used


def race_lookup(lm: LoadedModel, heads, choice: dict, prompts: list[str], seconds: float, max_new_tokens: int) -> dict:
    """cerberus+lookup as calibrated (the heads' tree and gate, lookup chains merged into the tree or
    verified instead of it) against lookup chains alone (pld) on the same prompts -> the lookup
    choice's "raced" entry: both rates and the winner, "with_heads" only if the heads ran RACE_MARGIN
    faster (the simpler method wins a tie, as the smaller tree does in the tree race)."""
    from ..lookup import LookupDrafter
    from ..methods import calibrated_lookup

    kind, with_heads = calibrated_lookup(choice["lookup"], with_heads=True)
    alone = choice["lookup"]["solo"]
    decoders = [
        ("alone", Decoder(lm, method="pld", drafter=LookupDrafter(max_len=alone["max_len"]))),
        (
            "with_heads",
            Decoder(
                lm,
                heads,
                build_tree(choice["tree"]),
                gate=choice["gate"],
                threshold=choice["threshold"],
                min_confidence=choice["min_confidence"],
                method="cerberus+lookup",
                drafter=LookupDrafter(max_len=with_heads["max_len"], merge=kind == "merged"),
            ),
        ),
    ]
    rate, used = race(lm, decoders, prompts, seconds, max_new_tokens)
    winner = "with_heads" if rate["with_heads"] > (1 + RACE_MARGIN) * rate["alone"] else "alone"
    return {"kind": kind, "with_heads": rate["with_heads"], "alone": rate["alone"], "prompts": used, "winner": winner}


def measured_rate(check: dict) -> float:
    """Tokens/s a format's check measured for its final choice: AR's where it fell back to AR steps."""
    return check["ar_tokens_per_s"] if check["fallback"] else check["tokens_per_s"]


def race_winner(tried: list[dict], measured: list[dict]) -> int:
    """Index of the raced choice to keep: the smallest tree within RACE_MARGIN of the fastest measured
    (the faster of equal sizes)."""
    fastest = max(m["tokens_per_s"] for m in measured)
    close = [j for j, m in enumerate(measured) if m["tokens_per_s"] >= (1 - RACE_MARGIN) * fastest]
    return min(close, key=lambda j: (len(tried[j]["tree"]), -measured[j]["tokens_per_s"]))


def calibrate(
    lm: LoadedModel,
    heads_dir: str | Path,
    prompts: list[str],
    budget_seconds: float = 300.0,
    quick: bool = False,
    formats: list[str] | None = None,
    max_new_tokens: int = 128,
    top_k: int = 10,
    n_bins: int = 10,
    context: int = 300,
    progress: bool = False,
    write: bool = True,
    prompt_source: str = HELD_OUT,
    qs: tuple[int, ...] | None = None,
    repeats: int | None = None,
) -> dict:
    """Measure every format in ``formats`` (default: ``supported_formats``), the heads' acceptance on
    ``prompts``, choose, check, and (``write``) save to ``calibration_path``; returns the file's content.

    The budget covers everything: the cost curves get at most 35% of it, acceptance runs prompt after
    prompt until 80% is spent, the check gets the rest (each at least one round or prompt), less the
    10% a full calibration keeps to race cerberus+lookup against lookup chains alone. The races
    generate answers as long as the observed ones (``max_new_tokens``): heads are right more often
    later in an answer (the shipped Cerberus heads: 1.85 tokens a step over 128-token answers to the
    bench questions, 2.23 over 512), so races of shorter answers favour smaller trees.
    """
    if not prompts:
        raise CerberusError("No calibration prompts.")
    heads_dir = Path(heads_dir)
    formats = formats or supported_formats(lm)
    qs, repeats = qs or (QUICK_QS if quick else COST_QS), repeats or (3 if quick else 5)
    start = time.perf_counter()
    if quick:  # a quick calibration must answer within its budget: shorter answers
        max_new_tokens = min(max_new_tokens, 64)

    measured = {}
    for weights in formats:
        flm = lm.with_weights(weights)
        heads = load_heads(heads_dir, flm).pack_for(weights)  # as build_decoder runs them
        share = 0.35 * budget_seconds / len(formats)
        costs = measure_costs(flm, qs, context, repeats, time_limit=share, progress=progress)
        overheads = measure_overheads(flm, heads, top_k, context, repeats=repeats)
        measured[weights] = {"cost_ms": costs, "cost_fit_ms": monotone_costs(costs), "overhead_ms": overheads}
        del flm, heads

    heads = load_heads(heads_dir, lm).pack_for(lm.weights)
    ungated = heads.config.head_type == "medusa"  # the Medusa baseline runs without the gate
    obs, used = _observe_prompts(lm, heads, prompts, max_new_tokens, top_k, start + 0.8 * budget_seconds, progress)
    ranks = obs["ranks"]
    try:
        rows, trees = predict_table(measured, ranks, {g: obs[g] for g in ENTROPY_GATES}, top_k, n_bins, obs["probs"])
    except ValueError as e:
        raise CerberusError(f"Cannot calibrate: {e}; raise --max-new-tokens or --budget-seconds.") from e
    candidates = {w: _choices(rows, trees, w, ungated, 2 if quick else CANDIDATES) for w in measured}
    choices = {w: c[0] for w, c in candidates.items()}
    best = fastest_format({w: c["predicted"]["tokens_per_s"] for w, c in choices.items()}, lm.weights)

    # check by running: the predicted best format's leading candidates against each other (the
    # prediction's order is noisy where candidates are close), and in full runs every other format
    # whose choice speculates, the same way (a user may force it with --weights, and the measurement
    # picks the format); the fastest candidate measured wins, and if it runs below CHECK_TOLERANCE x
    # AR the format falls back to AR steps
    checks = {}
    order = [best] + ([] if quick else [w for w in choices if w != best and choices[w]["threshold"] > -math.inf])
    for i, weights in enumerate(order):
        flm = lm.with_weights(weights)
        reserve = 0.0 if quick else LOOKUP_RACE_SHARE * budget_seconds
        seconds = max(0.0, start + budget_seconds - reserve - time.perf_counter()) / (len(order) - i)
        heads_w = load_heads(heads_dir, flm).pack_for(weights)
        tried = candidates[weights]
        if tried[0]["threshold"] > -math.inf:  # race the ones that speculate (AR runs in every round)
            tried = [c for c in tried if c["threshold"] > -math.inf]
        else:  # predicted: speculation never pays here; nothing to race
            tried = tried[:1]
        check = check_choices(flm, heads_w, tried, prompts[used:] or prompts, seconds, max_new_tokens)
        winner = race_winner(tried, check["candidates"])
        choices[weights] = tried[winner]
        check |= {k: check["candidates"][winner][k] for k in ("tokens_per_s", "ratio")}
        speculates = choices[weights]["threshold"] > -math.inf
        check["fallback"] = bool(not ungated and speculates and check["ratio"] < CHECK_TOLERANCE)
        if check["fallback"]:  # predicted to pay, measured not to: the gate never speculates
            choices[weights] |= {"threshold": -math.inf, "thresholds": dict.fromkeys(ENTROPY_GATES, -math.inf)}
            choices[weights]["predicted"]["tokens_per_s"] = choices[weights]["predicted"]["ar_tokens_per_s"]
        checks[weights] = check | {"weights": weights}
        del flm, heads_w
    # the format: what the checks measured beats the prediction (an AVX-512 calibration predicted int4
    # within 5% of w4a8 and kept it, then measured 196 tokens/s for int4's choice against 225 for
    # w4a8's); the predicted winner stays unless another ran more than the margin faster
    best = fastest_format({w: measured_rate(c) for w, c in checks.items()}, best)

    # prompt-lookup chains (pld, cerberus+lookup): the length with the best predicted tokens/s on each
    # format's cost curve, alone, merged into the chosen tree under its gate, and verified instead of
    # that tree where a chain matches (0: no chains)
    for weights, choice in choices.items():
        m = measured[weights]
        speculate = obs[choice["gate"]] < choice["threshold"]
        merged = (accepted_lengths(ranks, choice["tree"]), speculate, choice["tree"])
        entropy_ms = gate_ms(m["overhead_ms"], choice["gate"], choice["threshold"])  # the tree's gate, every step
        gated = m["overhead_ms"] | {"step": m["overhead_ms"]["step"] + entropy_ms}
        choice["lookup"] = {}
        for kind, tree in (("solo", None), ("merged", merged), ("instead", merged)):
            length, rate = best_lookup_length(
                obs["lookup"],
                m["cost_fit_ms"],
                m["overhead_ms"] if tree is None else gated,
                LOOKUP_MAX_LEN,
                tree,
                obs["answers"],
                kind == "instead",
            )
            choice["lookup"][kind] = {"max_len": length, "tokens_per_s": rate}
    # the format cerberus+lookup runs: race it against chains alone where its heads speculate (a full
    # calibration; a quick one keeps the prediction)
    if not quick and choices[best]["threshold"] > -math.inf:
        flm = lm.with_weights(best)
        heads_w = load_heads(heads_dir, flm).pack_for(best)
        seconds = max(LOOKUP_RACE_SHARE * budget_seconds, start + budget_seconds - time.perf_counter())
        held_out = prompts[used:] or prompts
        choices[best]["lookup"]["raced"] = race_lookup(flm, heads_w, choices[best], held_out, seconds, max_new_tokens)
        del flm, heads_w

    fit, overheads = measured[best]["cost_fit_ms"], measured[best]["overhead_ms"]
    ar_ms, spec_ms = step_costs(fit, overheads, choices[best]["tree"])
    full = (ranks >= 0).all(axis=1)
    accepted = accepted_lengths(ranks[full], choices[best]["tree"])
    accuracy = accuracy_table(ranks, top_k)
    here = machine(lm.device)
    data = {
        "version": VERSION,
        "kind": "quick" if quick else "full",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": lm.name,
        "heads": heads_dir.name,
        "head_type": heads.config.head_type,
        "hardware": here,
        "hardware_key": hardware_key(here),
        "hardware_text": hardware(lm.device),
        "weights": best,
        "known_formats": [w for w in WEIGHTS if w != "auto"],  # what a later version may add is not measured here
        "choices": choices,
        "checks": checks,  # by format; the chosen one is always checked
        "measured": {
            "formats": {w: {k: {str(q): v for q, v in m[k].items()} for k in m} for w, m in measured.items()},
            "context": context,
            "top_k": top_k,
            "accuracy": accuracy,
            "expected_length": expected_length(choices[best]["tree"], accuracy),
            "empirical_length": float(accepted.mean()),
            "prompts": used,
            "prompt_source": prompt_source,
            "observed_in": lm.weights,
            "positions": int(len(ranks)),
            "entropy": {g: entropy_bins(obs[g][full], accepted, spec_ms, ar_ms, n_bins) for g in ENTROPY_GATES},
            "table": [
                best_row(rows, weights=w, nodes=n)
                for w in measured
                for n in sorted({r["nodes"] for r in rows})
                if any(r["weights"] == w and r["nodes"] == n for r in rows)
            ],
            "seconds": time.perf_counter() - start,
        },
    }
    if write:
        write_calibration(calibration_path(heads_dir, data["hardware_key"]), data)
    return data


def describe(data: dict, shipped: bool) -> str:
    """Where a calibration comes from, in a few words, for notices and reports."""
    where = "shipped with the heads for this machine" if shipped else "made on this machine"
    return f"{data['kind']} calibration {where}, {data['date'][:10]}"


def format_summary(data: dict) -> str:
    """A few lines for the terminal: each format's cost curve and choice, the winner and its check."""
    m = data["measured"]
    lines = [
        f"calibrated on {data['hardware_text']} ({data['kind']}, {m['seconds']:.0f} s); "
        f"acceptance from {m['positions']} positions of {m['prompts']} {m['prompt_source']}"
    ]
    for weights, f in m["formats"].items():
        base = f["cost_ms"]["1"]
        c = data["choices"][weights]
        p = c["predicted"]
        lines += [
            f"{weights}: one-token step {base:.1f} ms; verification x q=1: "
            + ", ".join(f"{q}:{v / base:.2f}" for q, v in f["cost_ms"].items() if q != "1"),
            f"  best: {len(c['tree'])}-node tree, "
            + ("never speculate" if c["threshold"] == -math.inf else f"gate {c['gate']} < {c['threshold']:.3g}")
            + " -> predicted "
            f"{p['tokens_per_s']:.1f} tokens/s vs AR {p['ar_tokens_per_s']:.1f} "
            f"({p['tokens_per_s'] / p['ar_tokens_per_s']:.2f}x, speculating on {p['speculative_share']:.0%} of steps)",
        ]
    for weights, c in data["checks"].items():
        if weights == data["weights"]:
            continue
        lines.append(
            f"checked {weights} too: {c['tokens_per_s']:.1f} vs AR {c['ar_tokens_per_s']:.1f} tokens/s "
            f"({c['ratio']:.2f}x)" + (" -> falls back to AR steps" if c["fallback"] else "")
        )
    lookup = data["choices"][data["weights"]].get("lookup")
    if lookup:
        lines.append(
            "longest lookup chain: "
            + ", ".join(
                f"{method} {lookup[kind]['max_len']} tokens (predicted {lookup[kind]['tokens_per_s']:.1f} tokens/s)"
                for method, kind in (("pld", "solo"), *((LOOKUP_KINDS[k], k) for k in ("merged", "instead")))
                if kind in lookup  # calibrations before 2026-11-27 have no "instead"
            )
        )
    if lookup and "raced" in lookup:
        r = lookup["raced"]
        lines.append(
            f"raced cerberus+lookup on {r['prompts']} prompts: with the heads ({LOOKUP_KINDS[r['kind']]}) "
            f"{r['with_heads']:.1f} tokens/s, chains alone {r['alone']:.1f} -> "
            + ("with the heads" if r["winner"] == "with_heads" else "cerberus+lookup runs the chains alone")
        )
    ch = data["checks"][data["weights"]]
    raced = ch.get("candidates", [])
    if len(raced) > 1:
        lines.append(
            f"raced {len(raced)} trees on the same prompts: "
            + ", ".join(f"{c['nodes']} nodes {c['tokens_per_s']:.1f} tokens/s ({c['ratio']:.2f}x)" for c in raced)
        )
    lines.append(
        f"chosen: {data['weights']}, {len(data['choices'][data['weights']]['tree'])}-node tree; checked by running "
        f"it on {ch['prompts']} prompts: {ch['tokens_per_s']:.1f} vs AR {ch['ar_tokens_per_s']:.1f} tokens/s "
        f"({ch['ratio']:.2f}x)" + (" -> slower than AR: falls back to AR steps" if ch["fallback"] else "")
    )
    return "\n".join(lines)
