"""Verification cost curve: time of one forward of q tokens over a ~300-token cache, per weight format.

Prints milliseconds and the ratio to q = 1 (what a q-token tree costs in AR steps) and saves a plot.
The measurement is the one `cerberus calibrate` uses (calibrate.measure_costs: forward + LM head +
argmax, q tokens laid out as a chain). ``hf`` in --weights is transformers' float32 model.

    python benchmarks/verify_cost.py [--model default] [--device cpu] [--weights int4,int8,bfloat16,float32,hf]
                                     [--repeats 5] [--context 300] [--out benchmarks/out/verify_cost.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cerberus_decoding.calibration.measure import COST_QS, measure_costs
from cerberus_decoding.models import load_model
from cerberus_decoding.runtime import hardware
from cerberus_decoding.runtime.lean import TREE_ATTENTION


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="int4,int8,bfloat16,float32,hf", help="formats; hf = transformers, float32")
    ap.add_argument("--qs", default=",".join(map(str, COST_QS)), help="comma list of token counts")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds over all q (median kept)")
    ap.add_argument("--context", type=int, default=300, help="cached tokens before the verified ones")
    ap.add_argument(
        "--tree-attention",
        default=None,
        help="comma list of the lean runtime's tree attention paths (kernel, rows, masked; default: the device's)",
    )
    ap.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also measure each lean format replayed from CUDA graphs (what CUDA runs by default)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "verify_cost.png")
    return ap.parse_args(argv)


def plot(curves: dict[str, dict[int, float]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    for dtype, costs in curves.items():
        qs = sorted(costs)
        ax_ms.plot(qs, [costs[q] for q in qs], marker="o", label=dtype)
        ax_ratio.plot(qs, [costs[q] / costs[1] for q in qs], marker="o", label=dtype)
    ax_ms.set(xlabel="tokens verified in one forward (q)", ylabel="ms", title="forward + LM head")
    ax_ratio.set(
        xlabel="tokens verified in one forward (q)", ylabel="cost / cost(q=1)", title="relative to one AR step"
    )
    ax_ratio.axhline(1.0, color="grey", lw=0.5)
    for ax in (ax_ms, ax_ratio):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    qs = tuple(int(q) for q in args.qs.split(","))
    if 1 not in qs:
        qs = (1, *qs)  # the ratio needs the AR step
    curves, device = {}, None
    paths = args.tree_attention.split(",") if args.tree_attention else [None]
    if unknown := set(paths) - {None, *TREE_ATTENTION}:
        sys.exit(f"Unknown tree attention {', '.join(sorted(unknown))}; use {', '.join(TREE_ATTENTION)}.")
    for dtype in args.weights.split(","):
        dtype = dtype.strip()
        hf = dtype == "hf"
        lm = load_model(args.model, "float32" if hf else dtype, args.device, "hf" if hf else "lean")
        device = lm.device.type
        variants = [(p, False) for p in paths] + ([(paths[-1], True)] if args.cuda_graphs else [])
        for path, graphs in [(None, False)] if hf else variants:
            name = " ".join(filter(None, [dtype, path, "graphs" if graphs else None]))
            if not hf:
                lm.runtime.tree_attention = path or lm.runtime.tree_attention
                lm.runtime.cuda_graphs = graphs
            print(f"measuring {lm.name} {name} on {device} ...", file=sys.stderr, flush=True)
            costs = measure_costs(lm, qs, args.context, args.repeats, progress=True)
            curves[name] = costs
            print(f"\n{name} on {device}, {args.context}-token cache")
            print(f"{'q':>4} {'ms':>9} {'x q=1':>7}")
            for q in qs:
                print(f"{q:>4} {costs[q]:9.2f} {costs[q] / costs[1]:7.2f}")
        del lm
    title = f"{args.model} on {device} ({hardware(device)}), {args.context}-token cache, median of {args.repeats}"
    plot(curves, title, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"title": title, "cost_ms": curves}, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
