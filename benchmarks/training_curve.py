"""Held-out head accuracy vs distilled data size, Medusa vs Cerberus heads, from training runs.

    .venv/bin/python benchmarks/training_curve.py runs/sub6-medusa runs/sub6-cerberus ... --out docs/training_curve.png

Each run directory holds the `summary.json` that `cerberus train` writes. Prints a Markdown table
(per-head top-1 / top-5) and plots top-1 of heads 1 and 2 against training positions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/training_curve.png"))
    ap.add_argument("--label", default="", help="appended to every run's name, e.g. the data set")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text())
        config = summary.get("config") or json.loads((run / "heads" / "config.json").read_text())
        label = variant(config) + (f" ({args.label})" if args.label else "")
        rows.append((label, summary["train_positions"], summary["eval"], summary["seconds"]))
    rows.sort(key=lambda r: (r[0], r[1]))
    print("| heads | train tokens | top-1 (heads 1-4) | top-5 (heads 1-4) | train seconds |")
    print("|---|---|---|---|---|")
    for kind, n, ev, secs in rows:
        top1 = " / ".join(f"{a:.3f}" for a in ev["top1"])
        top5 = " / ".join(f"{a:.3f}" for a in ev["top5"])
        print(f"| {kind} | {n:,} | {top1} | {top5} | {secs:.0f} |")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, kind in enumerate(sorted({r[0] for r in rows})):
        pts = [(n, ev) for k, n, ev, _ in rows if k == kind]
        for head, style in ((0, "-"), (1, "--")):
            ax.plot(
                [n for n, _ in pts],
                [ev["top1"][head] for _, ev in pts],
                style,
                color=f"C{i}",
                marker="o",
                label=f"{kind}, head {head + 1}",
            )
    ax.set(xscale="log", xlabel="distilled training tokens", ylabel="held-out top-1")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ticks = [25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000]
    ax.set_xticks(ticks, ["25k", "50k", "100k", "200k", "500k", "1M", "2M"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


def variant(config: dict) -> str:
    """A run's head design in words: type, root-token start, blocks per head."""
    name = config["head_type"]
    if config.get("root_token"):
        name += " + root token"
    layers = config.get("num_layers", 1)
    return name + (f", {layers} blocks" if layers > 1 else "")


if __name__ == "__main__":
    main()
