"""`cerberus bench`: question files, the builtin set, metrics, mismatch analysis and a tiny real run."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from cerberus_decoding.bench import (
    BUILTIN_CATEGORIES,
    Question,
    load_questions,
    parse_questions,
    select_questions,
)
from cerberus_decoding.bench.report import _mismatch_cell
from cerberus_decoding.bench.run import (
    FLOAT32_TIE_GAP,
    BenchRun,
    Measurement,
    Turn,
    bitwise_exact,
    first_difference,
    logit_gap,
    mismatch_details,
    parse_methods,
    run_bench,
    summarize,
    tie_bound,
    top2_logits,
)
from cerberus_decoding.models import CerberusError
from cerberus_decoding.runtime import resolve_weights

METRICS = {"tokens_per_second", "speedup", "mean_accepted", "speculative_share", "mismatches", "ties", "ttft_ms"}


def _write(tmp_path, lines):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_spec_bench_file_with_two_turn_questions(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps(
                {
                    "question_id": 7,
                    "category": "writing",
                    "turns": ["First ask.", "Then follow up."],
                    "reference": ["ignored"],
                }
            ),
            "",
            json.dumps({"question_id": "q8", "category": "qa", "turns": ["Only one turn?"]}),
        ],
    )
    qs = parse_questions(path)
    assert qs == [Question(7, "writing", ("First ask.", "Then follow up.")), Question("q8", "qa", ("Only one turn?",))]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "JSON object"),
        ('{"question_id": 3, "category": "qa"}', "missing turns"),
        ('{"question_id": 3, "category": "qa", "turns": []}', "turns"),
        ('{"question_id": 3, "category": "qa", "turns": ["ok", 5]}', "turn"),
        ('{"question_id": 3, "category": "", "turns": ["ok"]}', "category"),
        ('{"question_id": true, "category": "qa", "turns": ["ok"]}', "question_id"),
        ('{"question_id": 1, "category": "qa", "turns": ["again"]}', "duplicate"),
    ],
)
def test_malformed_question_files_name_the_file_and_line(tmp_path, bad, message):
    good = json.dumps({"question_id": 1, "category": "qa", "turns": ["fine"]})
    path = _write(tmp_path, [good, "", bad])
    with pytest.raises(CerberusError) as err:
        parse_questions(path)
    assert f"{path}, line 3" in str(err.value)
    assert message in str(err.value)


def test_missing_and_empty_question_files(tmp_path):
    with pytest.raises(CerberusError, match="does not exist"):
        parse_questions(tmp_path / "nope.jsonl")
    with pytest.raises(CerberusError, match="no questions"):
        parse_questions(_write(tmp_path, [""]))


def test_builtin_set_covers_every_category():
    qs = load_questions("builtin")
    counts = Counter(q.category for q in qs)
    assert set(counts) == set(BUILTIN_CATEGORIES) and len(BUILTIN_CATEGORIES) == 13
    assert all(counts[c] >= 3 for c in BUILTIN_CATEGORIES), counts
    for q in qs:
        assert len(q.turns) == (2 if q.category in BUILTIN_CATEGORIES[:8] else 1), q
    # summarization and rag questions carry their passage in the prompt
    assert all(len(q.turns[0]) > 300 for q in qs if q.category in ("summarization", "rag"))


def test_select_keeps_first_n_per_category_in_file_order():
    qs = load_questions("builtin")
    chosen = select_questions(qs, ["qa", "writing"], limit=2)
    assert [q.category for q in chosen] == ["writing", "writing", "qa", "qa"]
    assert chosen[:2] == [q for q in qs if q.category == "writing"][:2]
    assert len(select_questions(qs, None, 1)) == 13
    with pytest.raises(CerberusError, match="poetry"):
        select_questions(qs, ["poetry"], None)


def test_parse_methods_always_runs_ar_first():
    assert parse_methods("medusa, hf,medusa") == ["ar", "medusa", "hf"]
    assert parse_methods("hf,ar") == ["ar", "hf"]


def test_sampled_runs_name_each_acceptance_rule():
    """At temperature > 0 every speculative method of ours runs with exact and typical acceptance."""
    assert parse_methods("cerberus,hf,pld", 0.7) == [
        "ar",
        "cerberus[exact]",
        "cerberus[typical]",
        "hf",
        "pld[exact]",
        "pld[typical]",
    ]
    assert parse_methods("cerberus[typical],medusa[exact]", 0.7) == ["ar", "cerberus[typical]", "medusa[exact]"]
    with pytest.raises(CerberusError, match="--temperature"):
        parse_methods("cerberus[exact]")
    with pytest.raises(CerberusError, match="lossy"):
        parse_methods("cerberus[lossy]", 0.7)
    with pytest.raises(CerberusError, match="no drafts"):
        parse_methods("hf[exact]", 0.7)


def _measure(q, method, tokens, seconds, steps, spec, prompt=(1, 2, 3)):
    turns = [
        Turn(list(prompt), list(t), "", seconds / len(tokens), s, p)
        for t, s, p in zip(tokens, steps, spec, strict=True)
    ]
    return Measurement(q, method, turns, seconds)


def test_metrics_and_mismatch_details(tiny_lm):
    qa, qb = Question(1, "a", ("x",)), Question(2, "b", ("y", "z"))
    run = BenchRun(["ar", "fast"], [qa, qb])
    # the first token of a turn comes from the prompt's forward; each step makes the rest
    run.measurements[1, "ar"] = _measure(qa, "ar", [[5, 6, 7, 8]], 4.0, [3], [0])
    run.measurements[2, "ar"] = _measure(qb, "ar", [[1, 2], [3, 4]], 2.0, [1, 1], [0, 0])
    run.measurements[1, "fast"] = _measure(qa, "fast", [[5, 6, 7, 8]], 1.0, [1], [1])
    run.measurements[2, "fast"] = _measure(qb, "fast", [[1, 2], [3, 9]], 2.0, [1, 1], [0, 0])
    details = mismatch_details(tiny_lm, run)
    assert len(details["fast"]) == 1
    d = details["fast"][0]
    assert (d["question_id"], d["turn"], d["position"], d["ar_token"], d["token"]) == (2, 2, 1, 4, 9)
    assert d["logit_gap"] == pytest.approx(logit_gap(tiny_lm, [1, 2, 3], [3]), abs=1e-5)
    assert d["logit_gap"] >= 0
    # float32: a divergence is excused only where ar's own top-2 logits are within 1e-3
    assert d["tie"] == (d["logit_gap"] <= FLOAT32_TIE_GAP) and not d["tie"]
    summary = summarize(run, details)
    ar, fast = summary["ar"], summary["fast"]
    assert ar["speedup"] == 1.0 and ar["mismatches"] == 0 and ar["speculative_share"] == 0.0
    assert fast["tokens_per_second"] == pytest.approx(8 / 3, abs=1e-3)  # rounded in the report
    assert fast["speedup"] == pytest.approx((8 / 3) / (8 / 6), rel=1e-3)
    assert ar["mean_accepted"] == 1.0
    assert fast["mean_accepted"] == pytest.approx(5 / 3, abs=1e-4) and fast["speculative_share"] == pytest.approx(
        1 / 3, abs=1e-4
    )
    assert fast["mismatches"] == 1 and fast["ties"] == 0
    # the same divergence, now at a proven near-tie: counted as a tie and shown as one
    tied = {"fast": [dict(d, tie=True)]}
    assert summarize(run, tied)["fast"]["ties"] == 1
    assert _mismatch_cell(summarize(run, tied)["fast"]) == "1 (at a tie)"
    assert _mismatch_cell(fast) == "1"
    assert fast["categories"]["a"]["speedup"] == pytest.approx(4.0)
    assert fast["categories"]["a"]["mismatches"] == 0
    assert fast["categories"]["b"]["mismatches"] == 1 and set(fast["categories"]["b"]) == METRICS
    assert first_difference([1, 2], [1, 2]) is None and first_difference([1, 2], [1, 2, 3]) == 2


def test_tie_rule_follows_the_format(tiny_lm):
    """Where a divergence from ar may pass as a proven near-tie: never in a format a CPU verifies
    bitwise; within 1e-3 in float32; within two bfloat16 steps at the top logit's size where the
    logits are bfloat16 (on CUDA, whose kernels are not row-invariant)."""
    assert not bitwise_exact(tiny_lm) and tie_bound(tiny_lm, 25.0) == FLOAT32_TIE_GAP
    bf16 = tiny_lm.with_weights("bfloat16")
    assert bitwise_exact(bf16)  # on a CPU: any divergence is a bug, whatever the gap
    assert tie_bound(bf16, 20.0) == 0.25 and tie_bound(bf16, 12.0) == 0.125 and tie_bound(bf16, -40.0) == 0.5
    assert tie_bound(tiny_lm.with_weights("int8"), 20.0) == 0.25  # bfloat16 activations, so bfloat16 logits
    q = Question(1, "a", ("x",))
    run = BenchRun(["ar", "fast"], [q])
    run.measurements[1, "ar"] = _measure(q, "ar", [[5, 6]], 1.0, [1], [0])
    run.measurements[1, "fast"] = _measure(q, "fast", [[5, 7]], 1.0, [1], [1])
    (d,) = mismatch_details(bf16, run)["fast"]
    assert d["tie"] is False and d["top_logit"] == pytest.approx(top2_logits(bf16, [1, 2, 3], [5])[0], abs=1e-3)


class _Ref:
    """Stands in for the ar decoder's prompt handling."""

    def encode(self, prompt):
        return [len(prompt if isinstance(prompt, list) else [prompt])]

    def check_fits(self, n):
        pass


def test_ctrl_c_keeps_the_questions_every_method_finished():
    calls = []

    def runner(ids):
        calls.append(ids)
        if len(calls) == 4:  # during the second question's second run
            raise KeyboardInterrupt
        return Turn(ids, [1, 2], "ok", 0.1, 2, 0)

    qs = [Question(1, "a", ("x",)), Question(2, "a", ("y",))]
    run = run_bench({"ar": runner, "other": runner}, _Ref(), qs, warmup=0, repeats=1, progress=False)
    assert run.interrupted and run.complete() == qs[:1]
    assert summarize(run, {})["other"]["tokens_per_second"] == pytest.approx(20.0)


def test_conversation_asks_turn_two_after_the_models_own_answer():
    seen = []

    class Ref(_Ref):
        def encode(self, prompt):
            seen.append(list(prompt))  # the caller keeps extending its list
            return [1]

    def runner(ids):
        return Turn(ids, [7], "my answer", 0.1, 1, 0)

    run_bench({"ar": runner}, Ref(), [Question(1, "w", ("first", "second"))], warmup=0, progress=False)
    assert seen[-1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "my answer"},
        {"role": "user", "content": "second"},
    ]


@pytest.mark.slow
def test_tiny_bench_run_writes_results_report_and_charts(tmp_path):
    from typer.testing import CliRunner

    from cerberus_decoding.cli import app

    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--questions",
            "builtin",
            "--categories",
            "writing,qa",
            "--limit",
            "1",
            "--max-new-tokens",
            "8",
            "--methods",
            "ar,hf,medusa",
            "--heads",
            "none",
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    auto = resolve_weights("auto", torch.device("cpu"), "lean")  # untrained heads: no calibration
    assert {"model", "device", "weights", "runtime", "hardware", "max_new_tokens", "questions"} <= set(results)
    assert results["model"] == "SmolLM2-135M-Instruct" and results["device"] == "cpu"
    assert results["weights"] == auto and results["runtime"] == "lean" and results["dtype"] == "bfloat16"
    assert results["max_new_tokens"] == 8 and results["questions"] == 2
    assert list(results["methods"]) == ["ar", "hf", "medusa"]
    # transformers' generate runs the float32 model: compared by agreement, not counted as mismatches
    assert results["methods"]["hf"]["mismatches"] is None
    assert 0 <= results["methods"]["hf"]["agreement"]["identical_share"] <= 1
    for name, entry in results["methods"].items():
        assert set(entry) == METRICS | {"categories"} | ({"agreement"} if name == "hf" else set())
        assert list(entry["categories"]) == ["writing", "qa"]
        assert all(set(c) == METRICS for c in entry["categories"].values())
        assert entry["tokens_per_second"] > 0
    methods = results["methods"]
    assert methods["ar"]["mismatches"] == 0 and methods["medusa"]["mismatches"] == 0
    # what each of our methods ran with, and why (untrained heads: no calibration to use)
    assert set(results["configs"]) == {"ar", "medusa"}
    medusa = results["configs"]["medusa"]
    assert medusa["gate"] == "off" and medusa["calibration"] == "defaults: no calibration"
    assert medusa["why"].startswith(f"medusa: weights {auto} (auto: default for the device, no calibration)")
    assert medusa["why"] in (out / "report.md").read_text()
    assert methods["ar"]["speedup"] == 1.0 and methods["hf"]["mean_accepted"] == 1.0
    assert methods["hf"]["speculative_share"] is None and methods["medusa"]["speculative_share"] > 0
    for name in ("report.md", "speedup.png", "accepted.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert "| `medusa` |" in (out / "report.md").read_text()
    # which attention the lean runtime ran (the CPU kernels where they build) is in the report
    assert results["tree_attention"] in ("kernel", "rows")
    assert f"lean runtime, tree attention {results['tree_attention']}," in (out / "report.md").read_text()
