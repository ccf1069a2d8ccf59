"""The command line: user mistakes give a clear one-line error and a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "cerberus_decoding.cli"]


def run(*args, stdin: str | None = None, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_missing_model_path():
    assert_user_error(run("generate", "hi", "--model", "/no/such/model"), "does not exist")


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    assert_user_error(run("generate", "hi", "--model", str(bad)), "not a GGUF file")


def test_root_token_with_medusa_heads_is_refused(tmp_path):
    result = run(
        "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--heads-type", "medusa", "--root-token"
    )
    assert_user_error(result, "--root-token needs --heads-type cerberus")


@pytest.mark.parametrize("shard", ["2/2", "x/2", "1", "-1/3"])
def test_bad_distill_shard_is_refused(tmp_path, shard):
    assert_user_error(run("distill", "--out", str(tmp_path), "--shard", shard), "--shard must be I/N")


def test_directory_without_config(tmp_path):
    assert_user_error(run("generate", "hi", "--model", str(tmp_path)), "config.json")


@pytest.mark.parametrize(
    "args",
    [
        ["--temperature", "-1"],
        ["--max-new-tokens", "0"],
        ["--dtype", "float64"],
        ["--method", "magic"],
        ["--top-p", "0"],
        ["--acceptance", "lossy"],
        ["--min-confidence", "1.5"],
        ["--min-confidence", "-0.1"],
        ["--min-confidence", "nan"],
    ],
)
def test_bad_option_values(args):
    result = run("generate", "hi", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_bench_acceptance_names_need_sampling():
    assert_user_error(run("bench", "--methods", "cerberus[exact]"), "--temperature")
    assert_user_error(run("bench", "--methods", "cerberus[lossy]", "-t", "0.7"), "unknown acceptance")


def test_prompt_longer_than_the_context():
    assert_user_error(run("generate", "--raw", stdin="word " * 9000), "context")


def test_wrong_heads_for_the_model(tmp_path, tiny_lm):
    from cerberus_decoding.heads import new_heads, save_heads

    save_heads(new_heads(tiny_lm, "cerberus"), tmp_path)
    assert_user_error(run("generate", "hi", "--method", "cerberus", "--heads", str(tmp_path)), "trained for")


def test_generate_json_and_stdin(lm):
    from cerberus_decoding.methods import choose_weights

    # --weights auto: the format calibrated fastest on this machine (ar reads the Cerberus heads'
    # shipped calibration: w4a8 on every CPU of this fleet), else the device's default (w4a8 where
    # its kernel is built, else int4)
    auto = choose_weights(lm, "auto", "ar", "default", calibrate=False).weights
    assert auto in ("int4", "w4a8")  # the shipped calibrations pick one of the 4-bit formats on these CPUs
    result = run("generate", "--json", "-n", "8", stdin="Name a fruit.")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {
        "text",
        "token_ids",
        "new_tokens",
        "seconds",
        "tokens_per_second",
        "steps",
        "mean_accepted",
        "speculative_steps",
        "method",
        "weights",
        "runtime",
        "config",
    }
    assert out["method"] == "ar" and out["steps"] == out["new_tokens"] - 1 and out["mean_accepted"] == 1.0
    assert out["weights"] == auto and out["runtime"] == "lean"
    # what it ran with, and why
    assert out["config"]["weights"] == auto and out["config"]["tree"] is None
    assert out["config"]["why"].startswith(f"ar: weights {auto} (auto:")
    assert f"weights {auto} (auto:" in result.stderr  # also said on stderr when streaming


def test_chat_keeps_the_conversation(lm):
    from cerberus_decoding.engine import Decoder, SamplingConfig
    from cerberus_decoding.methods import choose_weights

    result = run("chat", "-n", "12", stdin="My name is Ada.\nWhat is my name?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant>") == 2
    second = result.stdout.split("assistant>")[2].split("you>")[0].strip()
    # the same question asked alone (greedy, in the CLI's --weights auto format; every method decodes the same)
    ar = Decoder(choose_weights(lm, "auto", "ar", "default", calibrate=False))
    alone = ar.generate(ar.encode("What is my name?"), SamplingConfig(max_new_tokens=12)).text.strip()
    assert second and alone and second != alone  # the second turn saw the first one
