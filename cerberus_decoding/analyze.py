"""`cerberus analyze`: the paper's Section 3 findings, measured on your model and heads.

1. The share of speculative steps that accept no extra token (the waste the gate removes).
2. Accepted length vs entropy, binned, for both entropy readings, with Spearman's correlation.
3. A threshold sweep: real gated runs at entropy quantiles, tokens/s and accepted length each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .engine import SamplingConfig
from .methods import build_decoder

KINDS = ("hidden", "logits")


def first_turn_prompts(questions) -> list[str]:
    return [q.turns[0] for q in questions]


def run_all(decoder, prompts: list[str], max_new_tokens: int, desc: str):
    """-> (steps of every run, total tokens, total seconds)"""
    steps, tokens, seconds = [], 0, 0.0
    for p in tqdm(prompts, desc=desc, leave=False):
        r = decoder.generate(decoder.encode(p), SamplingConfig(max_new_tokens=max_new_tokens))
        steps += r.steps
        tokens += r.new_tokens
        seconds += r.seconds
    return steps, tokens, seconds


def binned(entropy: np.ndarray, accepted: np.ndarray, bins: int = 8) -> list[dict]:
    """Equal-count bins of entropy -> mean accepted length in each."""
    edges = np.unique(np.quantile(entropy, np.linspace(0, 1, bins + 1)))
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (entropy >= lo) & ((entropy < hi) | (hi == edges[-1]))
        if sel.any():
            out.append(
                {
                    "low": float(lo),
                    "high": float(hi),
                    "steps": int(sel.sum()),
                    "mean_accepted": float(accepted[sel].mean()),
                }
            )
    return out


def analyze(
    lm,
    heads: str,
    prompts: list[str],
    out_dir: str | Path,
    max_new_tokens: int = 128,
    head_type: str = "cerberus",
    gate: str = "logits",
    sweep: int = 5,
) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = "cerberus-nogate" if head_type == "cerberus" else "medusa"
    always = build_decoder(lm, method, heads=heads, gate="off")
    always.trace_entropies = True
    steps, _, _ = run_all(always, prompts, max_new_tokens, "always speculate")
    spec = [s for s in steps if s.mode == "spec"]
    accepted = np.array([s.accepted for s in spec], dtype=float)
    report: dict = {
        "model": lm.name,
        "heads": heads,
        "head_type": head_type,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "speculative_steps": len(spec),
        "zero_accept_share": float((accepted == 1).mean()),
        "mean_accepted": float(accepted.mean()),
        "correlation": {},
        "bins": {},
    }

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, KINDS, strict=True):
        ent = np.array([getattr(s, f"{kind}_entropy") for s in spec])
        rho, p = spearmanr(ent, accepted)
        report["correlation"][kind] = {"spearman": float(rho), "p_value": float(p)}
        report["bins"][kind] = binned(ent, accepted)
        mids = [(b["low"] + b["high"]) / 2 for b in report["bins"][kind]]
        ax.plot(mids, [b["mean_accepted"] for b in report["bins"][kind]], "o-")
        ax.set(xlabel=f"{kind} entropy (nats)", ylabel="tokens per step", title=f"{kind}: Spearman {rho:.2f}")
    fig.tight_layout()
    fig.savefig(out / "accepted_vs_entropy.png", dpi=120)
    plt.close(fig)

    # threshold sweep with real gated runs: -inf (pure AR), quantiles, +inf (always speculate)
    ent = np.array([getattr(s, f"{gate}_entropy") for s in spec])
    thresholds = [-math.inf] + [float(np.quantile(ent, q)) for q in np.linspace(0.2, 0.8, sweep - 2)] + [math.inf]
    rows = []
    for t in tqdm(thresholds, desc="threshold sweep"):
        gated = build_decoder(
            lm, "cerberus" if head_type == "cerberus" else "medusa", heads=heads, gate=gate, threshold=t
        )
        s, tokens, seconds = run_all(gated, prompts, max_new_tokens, f"threshold {t:.3g}")
        rows.append(
            {
                "threshold": t,
                "tokens_per_second": tokens / seconds,
                "mean_accepted": sum(x.accepted for x in s) / len(s),
                "speculative_share": sum(x.mode == "spec" for x in s) / len(s),
            }
        )
    report["sweep"] = {"gate": gate, "rows": rows}
    report["best_threshold"] = max(rows, key=lambda r: r["tokens_per_second"])["threshold"]

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r for r in rows if math.isfinite(r["threshold"])]
    ax.plot([r["threshold"] for r in finite], [r["tokens_per_second"] for r in finite], "o-", label="gated")
    for r, style in ((rows[0], ":"), (rows[-1], "--")):
        ax.axhline(r["tokens_per_second"], ls=style, label="AR" if r is rows[0] else "always speculate")
    ax.set(xlabel=f"{gate} entropy threshold", ylabel="tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "threshold_sweep.png", dpi=120)
    plt.close(fig)

    (out / "analysis.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    lines = [
        f"# Entropy analysis: {r['model']}, {r['head_type']} heads ({r['heads']})",
        "",
        f"{r['prompts']} prompts x {r['max_new_tokens']} new tokens, always speculating: "
        f"{r['speculative_steps']} speculative steps, {r['mean_accepted']:.2f} tokens per step.",
        "",
        f"**Speculative steps that accept no extra token: {100 * r['zero_accept_share']:.1f}%** "
        "(the paper reports 18.38% for Medusa on Vicuna-7B).",
        "",
        "## Accepted length vs entropy",
        "",
        "![accepted vs entropy](accepted_vs_entropy.png)",
        "",
        "| entropy | Spearman rho | p-value |",
        "|---|---|---|",
    ]
    for kind, c in r["correlation"].items():
        lines.append(f"| {kind} | {c['spearman']:.3f} | {c['p_value']:.2g} |")
    for kind, bins in r["bins"].items():
        lines += ["", f"### {kind} entropy bins", "", "| entropy range | steps | tokens/step |", "|---|---|---|"]
        lines += [f"| {b['low']:.3f} - {b['high']:.3f} | {b['steps']} | {b['mean_accepted']:.2f} |" for b in bins]
    lines += [
        "",
        f"## Threshold sweep ({r['sweep']['gate']} entropy)",
        "",
        "![sweep](threshold_sweep.png)",
        "",
        "| threshold | tokens/s | tokens/step | speculative share |",
        "|---|---|---|---|",
    ]
    for row in r["sweep"]["rows"]:
        lines.append(
            f"| {row['threshold']:.3f} | {row['tokens_per_second']:.2f} | {row['mean_accepted']:.2f} | "
            f"{row['speculative_share']:.2f} |"
        )
    lines += ["", f"Best threshold: **{r['best_threshold']:.3f}**", ""]
    return "\n".join(lines)
