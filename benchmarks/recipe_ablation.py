"""Training-recipe ablation: held-out accuracy of runs that differ from the shipped recipe in one option.

Train the runs first, one per option, on the same distilled data and the same positions, e.g.:

    for run in "base" "vocab16k --head-vocab 16384" "decay1 --loss-decay 1.0" "layers3 --num-layers 3" \
               "soft8 --soft-targets 8"; do
        set -- $run; name=$1; shift
        cerberus train --data DATA --heads-type cerberus --num-layers 2 --epochs 2 --batch-size 1024 --lr 2e-3 \
            --max-positions 130000 --out runs/ablation/$name "$@"
    done
    python benchmarks/recipe_ablation.py runs/ablation/* [--out docs/training_ablation.png]

(a later --num-layers overrides the first). Prints per-head held-out top-1 / top-5 with the difference
to the first run and the share of held-out targets outside the head vocabulary, and plots top-1 per head.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def load_runs(dirs: list[Path]) -> dict[str, dict]:
    runs = {}
    for d in dirs:
        summary = d / "summary.json"
        if summary.is_file():
            runs[d.name] = json.loads(summary.read_text())
    if not runs:
        raise SystemExit("No run directory with a summary.json (a finished `cerberus train`).")
    return runs


def table(runs: dict[str, dict]) -> Table:
    base = next(iter(runs.values()))["eval"]
    t = Table(title="held-out accuracy per head (difference to the first run)")
    columns = ("run", "top-1 heads 1..K", "top-5 heads 1..K", "head 1 top-1 vs first", "vocab missed", "seconds")
    for col in columns:
        t.add_column(col)
    for name, s in runs.items():
        e = s["eval"]
        t.add_row(
            name,
            " / ".join(f"{x:.3f}" for x in e["top1"]),
            " / ".join(f"{x:.3f}" for x in e["top5"]),
            f"{e['top1'][0] - base['top1'][0]:+.3f}",
            f"{s.get('heldout_vocab_missed', s['head_vocab_missed']):.3f}",
            f"{s['seconds']:.0f}",
        )
    return t


def plot(runs: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for i, (name, s) in enumerate(runs.items()):
        top1 = s["eval"]["top1"]
        ax.bar([k + i * width for k in range(len(top1))], top1, width, label=name)
    heads = len(next(iter(runs.values()))["eval"]["top1"])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(heads)], [f"head {k + 1}" for k in range(heads)])
    positions = next(iter(runs.values()))["train_positions"]
    ax.set(ylabel="held-out top-1", title=f"recipe ablation, {positions:,} training positions")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="`cerberus train --out` directories; the first is the base")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "recipe_ablation.png")
    args = ap.parse_args()
    runs = load_runs(args.runs)
    Console(width=160).print(table(runs))
    plot(runs, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
