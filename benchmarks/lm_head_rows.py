"""What the LM head costs by number of rows, as verification calls it: greedy (logits + argmax in one
call), the caches cold as after a step's forward. It sizes ``tree.LIKELY_LEAF``: a leaf's row computed
up front costs one more row of the call; computed afterwards (the accepted path ended there) a second
call of one row. Computing it up front pays when the leaf is accepted at least
row / (second call + row) of the time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm_head_rows.py [--weights auto] [--rows 2,3,4,5,6,8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from cerberus_decoding.models import load_model
from cerberus_decoding.runtime import hardware
from cerberus_decoding.tree import LIKELY_LEAF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--rows", default="2,3,4,5,6,8", help="row counts besides 1")
    ap.add_argument("--repeats", type=int, default=9, help="rounds over all row counts (median kept)")
    args = ap.parse_args()
    lm = load_model("default", args.weights, "cpu", "lean")
    rows = sorted({1, *(int(r) for r in args.rows.split(","))})  # 1 row: also a second call's cost
    hidden = lm.model.config.hidden_size
    evict = torch.zeros(64 * 2**20 // 4)  # 64 MB streamed between calls, as a step's weights stream through the caches
    times: dict[int, list[float]] = {r: [] for r in rows}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for r in rows:
                h = torch.randn(r, hidden).to(lm.runtime.dtype)
                evict += 1
                t0 = time.perf_counter()
                lm.runtime.lm_head_greedy(h)
                times[r].append(time.perf_counter() - t0)
    ms = {r: 1000 * statistics.median(t) for r, t in times.items()}
    table = Table(title=f"LM head + argmax, {lm.name}, {lm.weights}, {hardware(lm.device)}, caches cold")
    for col in ("rows", "ms", "ms a row more than 1 row"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r), f"{ms[r]:.2f}", f"{(ms[r] - ms[1]) / (r - 1):.2f}" if r > 1 else "")
    Console().print(table)
    if len(rows) > 1:
        row = (ms[rows[-1]] - ms[1]) / (rows[-1] - 1)
        print(
            f"A leaf's row up front pays when it is accepted at least {row:.2f} / ({ms[1]:.2f} + {row:.2f}) = "
            f"{row / (ms[1] + row):.2f} of the time (tree.LIKELY_LEAF = {LIKELY_LEAF})."
        )


if __name__ == "__main__":
    main()
