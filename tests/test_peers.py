"""The llama.cpp row: it gets exactly the prompt ids ``ar`` gets, it is compared by agreement (never as
mismatches), and without the optional extra asking for it is a one-line error naming the install."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from cerberus_decoding import cli
from cerberus_decoding.bench import llamacpp
from cerberus_decoding.bench.questions import Question
from cerberus_decoding.bench.run import build_runners, other_numerics, parse_methods, run_conversation
from cerberus_decoding.methods import LLAMA_CPP, build_decoder


class FakeLlama:
    """Records what llama.cpp would be fed; its 'logits' always pick token 7, then EOS."""

    def __init__(self, eos: int, vocab: int = 49152):
        self.fed, self.eos, self.vocab = [], eos, vocab

    def n_vocab(self):
        return self.vocab

    def n_ctx(self):
        return 2048

    def reset(self):
        self.fed.append("reset")

    def eval(self, tokens):
        self.fed.append(list(tokens))

    def logits(self):
        row = np.zeros(self.vocab, dtype=np.float32)
        row[self.eos if len(self.fed) > 3 else 7] = 1.0
        return row


def test_llama_cpp_is_fed_the_ids_ar_gets(lm, monkeypatch):
    eos = min(build_decoder(lm, "ar").eos_ids)
    fake = FakeLlama(eos)
    monkeypatch.setattr("cerberus_decoding.bench.run.load_llama", lambda lm: fake)
    monkeypatch.setattr(llamacpp, "last_logits", lambda llama: llama.logits())
    runners, reference, _ = build_runners(lm, ["ar", LLAMA_CPP], max_new_tokens=6)
    question = Question(1, "writing", ("Write a haiku about rain.",))
    ar_turn = run_conversation(runners["ar"], reference, question)[0]
    turn = run_conversation(runners[LLAMA_CPP], reference, question)[0]
    assert fake.fed[0] == "reset" and fake.fed[1] == ar_turn.prompt_ids  # the prompt, as ids, as ar got it
    assert fake.fed[2:] == [[7], [7]]  # then one token at a time, its own greedy choices
    assert turn.token_ids == [7, 7, eos]  # stops after EOS (kept, never fed), as our engine does
    assert turn.first_token_seconds is not None and turn.first_token_seconds <= turn.seconds
    assert other_numerics(lm, LLAMA_CPP)  # agreement, never mismatches


def test_greedy_only_and_no_acceptance_rule():
    with pytest.raises(Exception, match="decodes greedily"):
        parse_methods("ar,llama.cpp", temperature=0.7)
    with pytest.raises(Exception, match="no drafts to accept"):
        parse_methods("ar,llama.cpp[exact]", temperature=0.7)
    assert parse_methods("llama.cpp,cerberus") == ["ar", LLAMA_CPP, "cerberus"]


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--methods", "ar,llama.cpp", "--limit", "1"],
        ["generate", "--method", "llama.cpp", "Name a fruit."],
    ],
)
def test_a_missing_extra_is_a_one_line_error(args, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    monkeypatch.setattr("cerberus_decoding.models.load_model", lambda *a, **kw: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: llama.cpp needs llama-cpp-python: pip install -e '.[peers]'")


def test_a_hugging_face_directory_has_no_llama_cpp_row(tiny_lm, monkeypatch):
    monkeypatch.setattr(llamacpp, "require_llama_cpp", lambda: None)
    with pytest.raises(Exception, match="needs a GGUF model"):
        llamacpp.load_llama(tiny_lm)  # built in code: no GGUF behind it


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the [peers] extra is not installed")
def test_the_llama_cpp_row_runs_where_the_extra_is_installed(lm, tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "bench"
    args = [
        "bench",
        "--categories",
        "writing,math",
        "--limit",
        "1",
        "--max-new-tokens",
        "16",
        "--methods",
        "ar,llama.cpp",
        "--warmup",
        "0",
        "--no-calibrate",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    row = json.loads((out / "results.json").read_text())["methods"][LLAMA_CPP]
    assert row["mismatches"] is None and 0 <= row["agreement"]["identical_share"] <= 1
    assert row["tokens_per_second"] > 0 and row["ttft_ms"] > 0 and row["mean_accepted"] == 1.0
