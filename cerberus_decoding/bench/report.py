"""Bench output: a rich table in the terminal, results.json, report.md and two PNG charts."""

from __future__ import annotations

import json
from pathlib import Path

FIELDS = ("tokens_per_second", "speedup", "mean_accepted", "speculative_share", "mismatches", "ttft_ms")
SPEEDUP_PNG, ACCEPTED_PNG = "speedup.png", "accepted.png"
# methods whose mean accepted length is 1 by construction: left out of the acceptance chart
ONE_TOKEN_METHODS = ("ar", "hf")


def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _row(entry: dict) -> list[str]:
    return [
        _fmt(entry["tokens_per_second"], ".1f"),
        _fmt(entry["speedup"], ".2f", "x"),
        _fmt(entry["mean_accepted"]),
        _fmt(entry["speculative_share"], ".0%"),
        _fmt(entry.get("ttft_ms"), ".0f"),
        _mismatch_cell(entry),
    ]


def _mismatch_cell(entry: dict) -> str:
    """Mismatches against ar; for a method in another weight format, its agreement with ar instead."""
    agree = entry.get("agreement")
    if agree is None or agree.get("identical_share") is None:
        ties = entry.get("ties")
        if ties:  # divergences at proven near-ties (bench/run.py, tie_bound)
            n = entry["mismatches"]
            return f"{n} ({'at a tie' if n == 1 else 'all at ties'})" if ties == n else f"{n} ({ties} at ties)"
        return _fmt(entry["mismatches"], "d")  # None when sampling: outputs differ by design
    return f"other format: {agree['identical_share']:.0%} identical, {agree['tokens_before_divergence']:.0f} tok agree"


def _decoding(results: dict) -> str:
    temperature = results.get("temperature") or 0.0
    return f"sampling at temperature {temperature:g}" if temperature > 0 else "greedy"


def _categories(results: dict) -> list[str]:
    first = next(iter(results["methods"].values()), {"categories": {}})
    return list(first["categories"])


def print_table(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape  # "cerberus[exact]" is not a style tag
    from rich.table import Table

    console = console or Console()
    title = (
        f"{results['model']} on {results['device']} ({results['weights']} weights, {results['runtime']} runtime), "
        f"{results['questions']} questions, max {results['max_new_tokens']} new tokens, {_decoding(results)}"
    )
    if results.get("interrupted"):
        title += " - INTERRUPTED"
    table = Table(title=title)
    table.add_column("method", no_wrap=True)  # cerberus-nogate[typical] whole
    for name in ("tokens/s", "speedup", "mean accepted", "speculative", "TTFT ms", "mismatches"):
        table.add_column(name, justify="right")
    for method, entry in results["methods"].items():
        table.add_row(escape(method), *_row(entry))
    console.print(table)
    for config in results.get("configs", {}).values():  # what each method ran with, and why
        console.print(escape(config["why"]), style="dim")
    cats = _categories(results)
    if len(cats) > 1:
        per_cat = Table(title="speedup vs ar (mean accepted) per category")
        per_cat.add_column("category")
        methods = [m for m in results["methods"] if m != "ar"]
        for m in methods:
            per_cat.add_column(escape(m), justify="right")
        for cat in cats:
            cells = []
            for m in methods:
                e = results["methods"][m]["categories"][cat]
                cells.append(f"{_fmt(e['speedup'], '.2f', 'x')} ({_fmt(e['mean_accepted'])})")
            per_cat.add_row(cat, *cells)
        console.print(per_cat)


def write_results(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path


def _bar_chart(
    results: dict, field: str, methods: list[str], ylabel: str, title: str, path: Path, baseline: float | None = None
) -> None:
    # Figure without pyplot: no global backend switch, no GUI; savefig renders with Agg
    from matplotlib.figure import Figure

    groups = _categories(results) + ["overall"]
    fig = Figure(figsize=(max(6.0, 0.8 * len(groups) * max(1, len(methods)) ** 0.5 + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        entry = results["methods"][m]
        values = [entry["categories"][c][field] for c in groups[:-1]] + [entry[field]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=m)
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if methods:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no method to show", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_charts(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    methods = list(results["methods"])
    speed = out / SPEEDUP_PNG
    _bar_chart(
        results,
        "speedup",
        [m for m in methods if m != "ar"],
        "speedup vs ar (x)",
        f"Speedup per category ({results['model']}, {results['device']})",
        speed,
        baseline=1.0,
    )
    accepted = out / ACCEPTED_PNG
    shown = [m for m in methods if m not in ONE_TOKEN_METHODS and results["methods"][m]["mean_accepted"] is not None]
    _bar_chart(
        results,
        "mean_accepted",
        shown,
        "tokens per step",
        f"Mean accepted length per category ({results['model']})",
        accepted,
        baseline=1.0,
    )
    return [speed, accepted]


def _md_cell(piece) -> str:
    return repr(piece).replace("|", "\\|")  # a literal | would split the table cell


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _attention(results: dict) -> str:
    """ ", tree attention kernel" for the lean runtime (older reports and the hf runtime have none)."""
    return f", tree attention {results['tree_attention']}" if results.get("tree_attention") else ""


def write_markdown(results: dict, out: Path) -> Path:
    methods = list(results["methods"])
    cats = _categories(results)
    parts = [
        f"# Cerberus bench: {results['model']}",
        "",
        f"- device: {results['device']} ({results.get('hardware', '?')}), weights: {results['weights']} "
        f"({results['runtime']} runtime{_attention(results)}, {results['dtype']} activations)",
        f"- questions: {results['questions']} ({', '.join(cats) or 'none'}), {_decoding(results)}, "
        f"max {results['max_new_tokens']} new tokens per turn",
        f"- warm-up: {results.get('warmup', '?')} generations per method, "
        f"repeats: {results.get('repeats', '?')} (median time kept)",
    ]
    if results.get("command"):
        parts.append(f"- command: `{results['command']}`")
    if results.get("interrupted"):
        parts.append("- **interrupted**: only questions that every method finished are counted")
    parts += [
        "",
        "## Overall",
        "",
        _md_table(
            ["method", "tokens/s", "speedup", "mean accepted", "speculative share", "TTFT ms (median)", "mismatches"],
            [[f"`{m}`", *_row(results["methods"][m])] for m in methods],
        ),
    ]
    if results.get("configs"):
        parts += ["", "## Configuration per method", ""]
        parts += [f"- {c['why']}" for c in results["configs"].values()]
    for field, label in (
        ("speedup", "Speedup vs ar"),
        ("mean_accepted", "Mean accepted tokens per step"),
        ("tokens_per_second", "Tokens per second"),
    ):
        rows = [[c, *(_fmt(results["methods"][m]["categories"][c][field]) for m in methods)] for c in cats]
        parts += ["", f"## {label} per category", "", _md_table(["category", *methods], rows)]
    parts += [
        "",
        "## Charts",
        "",
        f"![speedup per category]({SPEEDUP_PNG})",
        "",
        f"![mean accepted length per category]({ACCEPTED_PNG})",
    ]
    details = results.get("mismatch_details") or {}
    mismatches = [(m, d) for m, ds in details.items() for d in ds]
    parts += ["", "## Mismatches against ar", ""]
    if (results.get("temperature") or 0) > 0:
        parts.append("Not compared: sampled outputs differ from ar's by design (docs/sampling.md).")
    elif not mismatches:
        parts.append("None: every method produced exactly ar's tokens on every question.")
    else:
        parts.append(
            "Logit gap = top-1 minus top-2 logit of the base model at the first differing position, "
            "given ar's prefix. A gap near 0 is a near-tie that rounding may flip; 'tie' says whether it "
            "is within the format's proven near-tie bound (docs/bench.md; never in a format that "
            "verifies bitwise)."
        )
        parts.append("")
        rows = [
            [
                f"`{m}`",
                str(d["question_id"]),
                d["category"],
                str(d["turn"]),
                str(d["position"]),
                _md_cell(d["ar_piece"]),
                _md_cell(d["piece"]),
                _fmt(d["logit_gap"], ".4f"),
                {True: "yes", False: "**no**"}.get(d.get("tie"), "-"),
            ]
            for m, d in mismatches
        ]
        header = ["method", "question", "category", "turn", "position", "ar token", "token", "logit gap", "tie"]
        parts.append(_md_table(header, rows))
    parts += ["", "Metrics are explained in docs/bench.md.", ""]
    path = out / "report.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def write_all(results: dict, out: Path) -> list[Path]:
    return [write_results(results, out), write_markdown(results, out), *write_charts(results, out)]
