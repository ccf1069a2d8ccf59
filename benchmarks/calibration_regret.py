"""Regret of the automatic calibration: its choice against the best cell of an exhaustive grid.

For each weight format, 4 tree sizes (``best_tree`` of the calibration's accuracy table) x 5 logits
gate thresholds (never, the 25/50/75% quantiles of the calibration positions' entropy, always) are
decoded for real, with plain ``ar`` of the same format and the calibration's own choice measured in
the same run. Prompts are held-out training prompts taken from the end of the shipped calibration
file (calibration reads it from the start), so neither calibration nor head training saw them.

Prompts are the outer loop and the cells the inner one (rotated per prompt), so machine drift spreads
over every cell. Tokens/s is total tokens over total time per cell. Prints the table, the best cell,
the automatic choice and its regret (1 - auto / best); saves a JSON and a heatmap PNG per format.

    python benchmarks/calibration_regret.py [--heads default] [--formats int4,int8,bfloat16,float32]
        [--prompts 5] [--max-new-tokens 64] [--out benchmarks/out/calibration_regret.png]

Needs a calibration of the heads for this machine (shipped, or `cerberus calibrate`; a quick one is
made when there is none).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from cerberus_decoding.calibration.run import calibration_prompts, supported_formats
from cerberus_decoding.engine import Decoder, SamplingConfig
from cerberus_decoding.heads import load_heads
from cerberus_decoding.methods import build_decoder, default_heads_dir, machine_calibration
from cerberus_decoding.models import load_model
from cerberus_decoding.runtime import hardware
from cerberus_decoding.tree import best_tree, build_tree

TREE_SIZES = (1, 3, 7, 15)
QUANTILES = (0.25, 0.5, 0.75)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="default", help="heads directory or 'default' (shipped cerberus heads)")
    ap.add_argument("--formats", default=None, help="comma list (default: every format the device runs)")
    ap.add_argument("--prompts", type=int, default=5, help="held-out prompts per cell")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--also", type=Path, default=None, help="another calibration file whose choice to measure too")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "calibration_regret.png")
    return ap.parse_args(argv)


def entropy_quantiles(data: dict) -> list[float]:
    """Quantiles of the logits entropy over the calibration positions, read off its equal-count bins."""
    bins = data["measured"]["entropy"]["logits"]
    counts = np.cumsum([b["count"] for b in bins]) / sum(b["count"] for b in bins)
    return [bins[int(np.searchsorted(counts, q))]["hi"] for q in QUANTILES]


def grid(data: dict) -> list[tuple[int, float]]:
    """(tree size, threshold) cells: never-speculate once (the tree does not matter), then every size
    with every other threshold."""
    thresholds = [*entropy_quantiles(data), math.inf]
    return [(1, -math.inf)] + [(n, th) for n in TREE_SIZES for th in thresholds]


def measure_format(lm, heads_dir, data, weights, prompts, max_new_tokens, also=None) -> dict:
    """tokens/s of ar, every grid cell and the automatic choice (and ``also``'s) for one weight format."""
    from tqdm import tqdm

    flm = lm.with_weights(weights)
    heads = load_heads(heads_dir, flm).pack_for(weights)
    accuracy = data["measured"]["accuracy"]
    decoders = {"ar": Decoder(flm, method="ar")}
    for n, th in grid(data):
        decoders[(n, th)] = Decoder(flm, heads, build_tree(best_tree(accuracy, n)), "logits", th, "cerberus")
    for name, cal in (("auto", data), ("also", also)):
        choice = cal["choices"].get(weights) if cal else None
        if choice is not None:
            tree = build_tree(choice["tree"])
            decoders[name] = Decoder(flm, heads, tree, choice["gate"], float(choice["threshold"]), "cerberus")
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    totals = {name: [0, 0.0] for name in decoders}
    names = list(decoders)
    reference = decoders["ar"]
    mismatches = 0
    bar = tqdm(total=len(prompts) * len(names), desc=weights, unit="gen", file=sys.stderr)
    for i, prompt in enumerate(prompts):
        ids = reference.encode(prompt)
        outputs = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who runs first
            t0 = time.perf_counter()
            result = decoders[name].generate(ids, config)
            totals[name][0] += len(result.token_ids)
            totals[name][1] += time.perf_counter() - t0
            outputs[name] = result.token_ids
            bar.update()
        mismatches += sum(out != outputs["ar"] for out in outputs.values())
    bar.close()
    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    cells = [{"nodes": n, "threshold": th, "tokens_per_s": rates[(n, th)]} for n, th in grid(data)]
    return {
        "ar": rates["ar"],
        "auto": rates.get("auto"),
        "also": rates.get("also"),
        "cells": cells,
        "mismatches": mismatches,
    }


def plot(results: dict, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    best = max(c["tokens_per_s"] for r in results.values() for c in r["cells"])
    for ax, (weights, r) in zip(axes[0], results.items(), strict=True):
        ths = sorted({c["threshold"] for c in r["cells"] if c["threshold"] > -math.inf})
        table = np.array(
            [
                [next(c["tokens_per_s"] for c in r["cells"] if (c["nodes"], c["threshold"]) == (n, th)) for th in ths]
                for n in TREE_SIZES
            ]
        )
        im = ax.imshow(table, vmin=0, vmax=best, cmap="viridis")
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(ths)), [f"{t:.2f}" for t in ths])
        ax.set_yticks(range(len(TREE_SIZES)), TREE_SIZES)
        auto = f"{r['auto']:.1f}" if r["auto"] else "-"
        ax.set(
            xlabel="logits gate threshold",
            ylabel="tree nodes",
            title=f"{weights}: ar {r['ar']:.1f}, never {r['cells'][0]['tokens_per_s']:.1f}, auto {auto}",
        )
    fig.colorbar(im, ax=axes[0].tolist(), label="tokens/s")
    fig.suptitle(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    lm = load_model("default", "auto", "cpu")
    heads_dir = default_heads_dir(lm, "cerberus") if args.heads == "default" else Path(args.heads)
    found = machine_calibration(lm, heads_dir, calibrate=True)
    data = found[0]
    formats = args.formats.split(",") if args.formats else supported_formats(lm)
    prompts = calibration_prompts()[-args.prompts :]
    build_decoder(lm, "ar")  # fail early on a broken install
    also = json.loads(args.also.read_text()) if args.also else None
    results = {w: measure_format(lm, heads_dir, data, w, prompts, args.max_new_tokens, also) for w in formats}

    cells = [(w, c) for w, r in results.items() for c in r["cells"]]
    best_w, best = max(cells, key=lambda wc: wc[1]["tokens_per_s"])
    auto_w = data["weights"]
    auto = results[auto_w]["auto"] if auto_w in results else None
    table = Table(
        title=f"calibration regret on {hardware()} ({len(prompts)} held-out prompts x "
        f"{args.max_new_tokens} tokens, tokens/s)"
    )
    for col in ("weights", "tree nodes", *(f"th {q:.0%}" for q in QUANTILES), "always", "never", "ar", "auto"):
        table.add_column(col, justify="right")
    for w, r in results.items():
        by = {(c["nodes"], c["threshold"]): c["tokens_per_s"] for c in r["cells"]}
        ths = sorted({th for n, th in by if th > -math.inf})
        for n in TREE_SIZES:
            table.add_row(
                w,
                str(n),
                *(f"{by[(n, th)]:.1f}" for th in ths),
                f"{by[(1, -math.inf)]:.1f}",
                f"{r['ar']:.1f}",
                f"{r['auto']:.1f}" if r["auto"] else "-",
            )
    console = Console()
    console.print(table)
    regret = None if auto is None else 1 - auto / best["tokens_per_s"]
    if also:
        also_rate = results.get(also["weights"], {}).get("also")
        console.print(
            f"{also['kind']} calibration {args.also} chose {also['weights']}: "
            f"{also_rate:.1f} tokens/s, regret {1 - also_rate / best['tokens_per_s']:.1%}"
        )
    summary = {
        "hardware": hardware(),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "calibration": {
            "kind": data["kind"],
            "date": data["date"],
            "weights": auto_w,
            "choice": data["choices"][auto_w],
        },
        "best_cell": {"weights": best_w, **best},
        "auto_tokens_per_s": auto,
        "regret": regret,
        "also": None
        if also is None
        else {
            "file": str(args.also),
            "kind": also["kind"],
            "weights": also["weights"],
            "choice": also["choices"][also["weights"]],
        },
        "results": results,
    }
    console.print(
        f"best cell: {best_w}, {best['nodes']} nodes, threshold {best['threshold']:.3g}: "
        f"{best['tokens_per_s']:.1f} tokens/s; automatic choice ({auto_w}): "
        f"{auto:.1f} tokens/s; regret {regret:.1%} (target: within 3%)"
    )
    mismatched = {w: r["mismatches"] for w, r in results.items() if r["mismatches"]}
    console.print(f"outputs differing from ar of the same format: {mismatched or 'none'}")
    plot(results, f"calibration regret, {hardware()}", args.out)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))  # inf is written as Infinity
    console.print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
