"""Issue 16 (hardening): one test per defect, each the reproduction asserting the fixed behaviour,
and a table of bad CLI inputs that must each give exit 2, one line on stderr and no traceback.

Fast: the tiny random model (``tiny_lm``), direct calls, the CLI run in-process through
``cli.main`` (the real error path) with ``load_model`` patched to return the tiny model. Only the
SIGTERM test starts a server process.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from cerberus_decoding import cli
from cerberus_decoding.calibration import run as cal
from cerberus_decoding.calibration.files import calibration_path
from cerberus_decoding.heads import new_heads, remove_stale_temp_files, save_heads
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.models import CerberusError
from cerberus_decoding.server import create_app, served_names
from cerberus_decoding.train import train as train_mod
from cerberus_decoding.train.distill import distill
from cerberus_decoding.train.prompts import builtin_prompts
from cerberus_decoding.train.train import TrainConfig, train

DEAD_PID = 4_194_304 + 17  # above Linux's largest pid_max: no such process


@pytest.fixture(scope="module")
def tiny_data(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilled")
    distill(tiny_lm, builtin_prompts(8), out, batch_size=4, max_new_tokens=16, source="test")
    return out


def _cfg(**kw) -> TrainConfig:
    base = dict(head_vocab=256, batch_size=32, epochs=50, eval_every=100, save_every=2, max_steps=4, holdout=0.2)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def run_dir(tiny_lm, tiny_data, tmp_path_factory):
    """A finished 4-step training run (trainer_state.pt, latest/, heads/)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_lm, tiny_data, out, _cfg())
    return out


@pytest.fixture
def small_vocab_heads(tiny_lm, tmp_path):
    """Cerberus heads for the tiny model whose head vocabulary is 512 tokens."""
    heads = new_heads(tiny_lm, "cerberus")
    heads.set_vocab(torch.arange(512), tiny_lm.model.get_output_embeddings().weight)
    save_heads(heads, tmp_path / "heads")
    return tmp_path / "heads"


# ---- 1. no code execution on resume -----------------------------------------------------------------
class Payload:
    """Unpickling this object would create ``path``: what a crafted trainer_state.pt could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_resume_does_not_run_code_from_the_state_file(tiny_lm, tiny_data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save(
        {"heads": {}, "optimizer": Payload(marker), "step": 0, "history": {}, "config": {}}, out / "trainer_state.pt"
    )
    with pytest.raises(CerberusError, match="Cannot load the trainer state"):
        train(tiny_lm, tiny_data, out, _cfg(), resume=True)
    assert not marker.exists()


def test_resume_of_a_real_run_still_works(tiny_lm, tiny_data, run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = train(tiny_lm, tiny_data, copy, _cfg(max_steps=6), resume=True)
    assert summary["steps"] == 6


# ---- 2. request size ---------------------------------------------------------------------------------------
@pytest.fixture
def ar_decoder(tiny_lm):
    return build_decoder(tiny_lm, "ar")


def test_oversized_requests_are_refused_before_tokenizing(ar_decoder, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(ar_decoder, "encode", never)
    with TestClient(create_app(ar_decoder, "tiny", max_request_bytes=100_000)) as tc:
        r = tc.post("/v1/completions", content=json.dumps({"prompt": "word " * 40_000}))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        # under the byte limit, but more characters than 512 tokens could ever cover
        r = tc.post("/v1/completions", json={"prompt": "a" * 90_000})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = tc.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 90_000}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        # JSON nested 100,000 deep (item 8): a 400, not a 500
        r = tc.post("/v1/completions", content="[" * 100_000 + "]" * 100_000)
        assert r.status_code == 413
    with TestClient(create_app(ar_decoder, "tiny")) as tc:
        r = tc.post("/v1/completions", content="[" * 100_000 + "]" * 100_000)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert tc.get("/health").status_code == 200


# ---- 3. API key --------------------------------------------------------------------------------------
def test_empty_api_key_is_refused_and_openapi_needs_the_key(ar_decoder):
    with pytest.raises(CerberusError, match="empty"):
        create_app(ar_decoder, "tiny", api_key="")
    with TestClient(create_app(ar_decoder, "tiny", api_key="k")) as tc:
        assert tc.get("/openapi.json").status_code == 401
        assert tc.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()["info"]["title"] == "Cerberus"
        assert tc.get("/docs").status_code == 404 and tc.get("/redoc").status_code == 404
    with TestClient(create_app(ar_decoder, "tiny")) as tc:
        assert tc.get("/openapi.json").status_code == 200


# ---- 4. calibrate writes to the cache, never into the package ---------------------------------------------
def test_calibrate_does_not_write_into_a_read_only_heads_dir(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("CERBERUS_CACHE", str(tmp_path / "cache"))
    heads_dir = tmp_path / "heads"
    save_heads(new_heads(tiny_lm, "cerberus"), heads_dir)
    heads_dir.chmod(0o555)  # as an installed package often is
    try:
        data = cal.calibrate(
            tiny_lm,
            heads_dir,
            ["Why is the sky blue?"],
            10,
            max_new_tokens=12,
            top_k=3,
            qs=(1, 2, 4),
            context=16,
            repeats=1,
            n_bins=2,
        )
    finally:
        heads_dir.chmod(0o755)
    assert calibration_path(heads_dir, data["hardware_key"]).is_relative_to(tmp_path / "cache")
    assert calibration_path(heads_dir, data["hardware_key"]).is_file()
    assert sorted(p.name for p in heads_dir.iterdir()) == ["config.json", "model.safetensors"]


# ---- 5. non-finite values ------------------------------------------------------------------------------
def test_nan_shard_is_refused(tiny_data, tiny_lm, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = load_file(data / "shard-00001.safetensors")
    shard["hidden"][3, 5] = float("nan")  # corrupted values, header intact
    save_file(shard, data / "shard-00001.safetensors")
    with pytest.raises(CerberusError, match="non-finite"):
        train(tiny_lm, data, tmp_path / "run", _cfg())
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_training_and_no_heads_are_written(tiny_lm, tiny_data, tmp_path, monkeypatch):
    real = train_mod.head_loss

    def diverging(*args):
        loss, per_head = real(*args)
        return loss * float("nan"), per_head

    monkeypatch.setattr(train_mod, "head_loss", diverging)
    with pytest.raises(CerberusError, match="loss is nan at step 1"):
        train(tiny_lm, tiny_data, tmp_path / "run", _cfg())
    assert not (tmp_path / "run").exists()  # no heads, and no empty directory (item 10)


def test_non_finite_heads_are_never_written(tiny_lm, tmp_path):
    heads = new_heads(tiny_lm, "cerberus")
    heads.blocks[0][0].linear.weight.data[0, 0] = math.inf
    with pytest.raises(CerberusError, match="non-finite"):
        save_heads(heads, tmp_path / "heads")
    assert not (tmp_path / "heads").exists()


# ---- 7. validation at load ---------------------------------------------------------------------------
def test_tree_beyond_the_head_vocabulary_is_refused_at_load(tiny_lm, small_vocab_heads):
    with pytest.raises(CerberusError, match="rank 9000, but the heads choose among 512 tokens"):
        build_decoder(tiny_lm, "cerberus", heads=str(small_vocab_heads), tree=[[0], [0, 0], [9000]])
    assert build_decoder(tiny_lm, "cerberus", heads=str(small_vocab_heads), tree=[[0], [0, 0], [511]]).tree.top_k == 512


# ---- 10. leftovers after a kill -------------------------------------------------------------------------
def test_stale_temp_files_are_removed_on_the_next_run(tiny_lm, tiny_data, tmp_path):
    import shutil

    out = tmp_path / "distilled"
    shutil.copytree(tiny_data, out)
    stale = out / f".shard-00001.safetensors.{DEAD_PID}.x1y2.tmp"  # a writer killed mid-write
    live = out / f".shard-00002.safetensors.{os.getppid()}.a1b2.tmp"  # another worker, still writing
    stale.touch()
    live.touch()
    distill(tiny_lm, builtin_prompts(8), out, batch_size=4, max_new_tokens=16, source="test")
    assert not stale.exists() and live.exists()
    live.unlink()
    state = tmp_path / "run"
    state.mkdir()
    (state / f".trainer_state.pt.{DEAD_PID}.zz.tmp").touch()
    assert [p.name for p in remove_stale_temp_files(state)] == [f".trainer_state.pt.{DEAD_PID}.zz.tmp"]


def test_failed_train_leaves_no_empty_directory(tiny_lm, tmp_path):
    with pytest.raises(CerberusError, match="distill"):
        train(tiny_lm, tmp_path / "no-data", tmp_path / "run", _cfg())
    assert not (tmp_path / "run").exists()


# ---- 11. served model names ----------------------------------------------------------------------------
def test_default_and_served_model_names_are_accepted(ar_decoder):
    names = served_names(["mine", "other"], "SmolLM2-135M-Instruct", "default")
    assert names == ["mine", "other", "SmolLM2-135M-Instruct", "default"]
    with TestClient(create_app(ar_decoder, names)) as tc:
        assert [m["id"] for m in tc.get("/v1/models").json()["data"]] == names
        for name in names:
            r = tc.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == name
        assert tc.get("/v1/models/default").json()["id"] == "default"
        r = tc.post("/v1/completions", json={"model": "nope", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 404 and "'mine'" in r.json()["error"]["message"]


def test_served_model_name_is_repeatable_on_the_command_line(tiny_lm, monkeypatch):
    from cerberus_decoding import models, server

    got = {}
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: tiny_lm)
    monkeypatch.setattr(server, "serve", lambda decoder, host, port, names, *rest: got.update(names=names))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--served-model-name", "a", "--served-model-name", "b", "--max-request-bytes", "4096"])
    assert exit_info.value.code == 0
    assert got["names"] == ["a", "b", "tiny-llama", "default"]


# ---- 12. SIGTERM during a stream -------------------------------------------------------------------------
def test_sigterm_ends_a_running_stream_and_the_server_exits(tiny_lm, tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_lm.model.config.to_dict() | {"max_position_embeddings": 8192}
    model_dir = tmp_path / "long-tiny"
    LlamaForCausalLM(type(tiny_lm.model.config).from_dict(config)).save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CERBERUS_API_KEY", None)
    args = [sys.executable, "-m", "cerberus_decoding.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"prompt": "Once upon a time", "max_tokens": 8000, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 5:
                    sent = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        stopped = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "cancelled"
    assert len(events) < 1000  # cut short, not run to its 8000 tokens
    assert stopped < 3, f"took {stopped:.1f}s to stop"


# ---- 7-8. the table of bad CLI inputs ------------------------------------------------------------------
def _heads_with_config(tiny_lm, path: Path, config) -> str:
    save_heads(new_heads(tiny_lm, "cerberus"), path)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _cases(tmp: Path, tiny_lm, tiny_data: Path, run_dir: Path, small_vocab_heads: Path) -> list[tuple]:
    """(what, argv, stdin bytes)."""
    bad_tree = tmp / "bad-tree.json"
    bad_tree.write_text("[[0], [oops")
    latin1_tree = tmp / "latin1-tree.json"
    latin1_tree.write_bytes(b"[[0]] \xe9")
    big_rank = tmp / "big-rank.json"
    big_rank.write_text("[[0], [0, 0], [9000]]")
    good = json.loads((small_vocab_heads / "config.json").read_text())
    corrupt_state = tmp / "corrupt-run"
    corrupt_state.mkdir()
    (corrupt_state / "trainer_state.pt").write_bytes(b"not a checkpoint")
    truncated = tmp / "truncated-run"
    truncated.mkdir()
    whole = (run_dir / "trainer_state.pt").read_bytes()
    (truncated / "trainer_state.pt").write_bytes(whole[: len(whole) // 2])
    bad_settings = tmp / "bad-settings"
    bad_settings.mkdir()
    (bad_settings / "settings.json").write_text("{oops")
    bad_shard = tmp / "bad-shard"
    bad_shard.mkdir()
    settings = {
        "model": "tiny-llama",
        "batch_size": 1,
        "max_new_tokens": 4,
        "source": "builtin:1:0",
    }
    (bad_shard / "settings.json").write_text(json.dumps(settings))
    (bad_shard / "shard-00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops...")
    latin1_prompts = tmp / "prompts.jsonl"
    latin1_prompts.write_bytes(b'{"turns": ["caf\xe9"]}\n')
    data = str(tiny_data)
    heads = str(small_vocab_heads)
    gen = ["generate", "hi", "-n", "2"]
    train = ["train", "--data", data, "--head-vocab", "256", "--resume", "--out"]
    return [
        ("7: --stop ''", [*gen, "--stop", ""], None),
        ("7: --gate-threshold nan", [*gen, "--gate-threshold", "nan"], None),
        ("7: malformed --tree with --method ar", [*gen, "--method", "ar", "--tree", str(bad_tree)], None),
        (
            "7: tree rank beyond the head vocabulary",
            [*gen, "--method", "cerberus", "--heads", heads, "--tree", str(big_rank)],
            None,
        ),
        (
            "8: heads config []",
            [*gen, "--method", "cerberus", "--heads", _heads_with_config(tiny_lm, tmp / "h1", [])],
            None,
        ),
        (
            "8: heads base_model a string",
            [
                *gen,
                "--method",
                "cerberus",
                "--heads",
                _heads_with_config(tiny_lm, tmp / "h2", good | {"base_model": "x"}),
            ],
            None,
        ),
        (
            "8: heads num_heads 'four'",
            [
                *gen,
                "--method",
                "cerberus",
                "--heads",
                _heads_with_config(tiny_lm, tmp / "h3", good | {"num_heads": "four"}),
            ],
            None,
        ),
        ("8: tree file not UTF-8", [*gen, "--tree", str(latin1_tree)], None),
        ("8: tree file a directory", [*gen, "--tree", str(tmp)], None),
        ("8: --seed beyond 64 bits", [*gen, "--seed", "1180591620717411303424"], None),
        ("8: non-UTF-8 prompt on stdin", ["generate", "-n", "2"], b"caf\xe9\n"),
        ("8: non-UTF-8 prompt in argv", ["generate", "caf\udce9", "-n", "2"], None),
        ("8: non-UTF-8 line in chat", ["chat", "-n", "2"], b"caf\xe9\n"),
        ("8: --trace into a missing directory", [*gen, "--trace", "/nonexistent/dir/t.jsonl"], None),
        ("8: train --resume, corrupt state", [*train, str(corrupt_state)], None),
        ("8: train --resume, truncated state", [*train, str(truncated)], None),
        ("8: train --resume, other --num-heads", [*train, str(run_dir), "--num-heads", "2"], None),
        ("8: distill, corrupt settings.json", ["distill", "--out", str(bad_settings), "--num-prompts", "1"], None),
        (
            "8: distill, corrupt shard when writing answers",
            ["distill", "--out", str(bad_shard), "--num-prompts", "1", "--batch-size", "1", "--max-new-tokens", "4"],
            None,
        ),
        (
            "8: distill, non-UTF-8 prompt file",
            ["distill", "--out", str(tmp / "d"), "--prompts", str(latin1_prompts)],
            None,
        ),
        (
            "8: train --seed beyond 64 bits",
            ["train", "--data", data, "--out", str(tmp / "t"), "--seed", str(2**70)],
            None,
        ),
        ("3: serve --api-key ''", ["serve", "--api-key", ""], None),
    ]


def _error_lines(err: str) -> list[str]:
    """stderr without what a good run prints too: chat's banner, progress bars, the configuration line."""
    lines = [line for line in err.splitlines() if line.strip()]
    notices = ("Chat started", "No calibration of")
    config = re.compile(r"^[\w+-]+: weights \w+ \(")  # "cerberus: weights int4 (auto: ...), ..."
    return [line for line in lines if not line.startswith(notices) and not config.match(line) and "%|" not in line]


def test_bad_cli_inputs_are_one_line_errors(
    tiny_lm, tiny_data, run_dir, small_vocab_heads, tmp_path, monkeypatch, capsys
):
    from cerberus_decoding import models

    monkeypatch.setattr(models, "load_model", lambda *a, **kw: tiny_lm)
    monkeypatch.delenv("CERBERUS_API_KEY", raising=False)
    failures = []
    for what, args, stdin in _cases(tmp_path, tiny_lm, tiny_data, run_dir, small_vocab_heads):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8"))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        err = capsys.readouterr().err
        lines = _error_lines(err)
        if exit_info.value.code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err:
            failures.append(f"{what}: exit {exit_info.value.code}, stderr {err!r}")
    assert not failures, "\n".join(failures)


def test_empty_api_key_in_the_environment_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("CERBERUS_API_KEY", "")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve"])
    assert exit_info.value.code == 2 and "API key" in capsys.readouterr().err


# ---- 6. stop strings: streamed text equals the final text ------------------------------------------------
@pytest.mark.slow
def test_multi_token_stop_strings_stream_exactly_the_final_text(lm):
    from cerberus_decoding.engine import Decoder, SamplingConfig

    ar = Decoder(lm)
    ids = ar.encode("Greet me in one friendly sentence, then ask how you can help.")
    full = ar.generate(ids, SamplingConfig(max_new_tokens=40)).text
    words = full.split()
    stops = [" ".join(words[i : i + 2]) for i in (1, 3, 5)] + [full[3:9], words[-1]]
    for stop in stops:
        pieces = []
        result = ar.generate(ids, SamplingConfig(max_new_tokens=40, stop=[stop]), on_text=pieces.append)
        assert result.text == full[: full.index(stop)], stop
        assert "".join(pieces) == result.text, stop  # nothing of the stop string leaked while streaming
        assert result.finish_reason == "stop"


def test_text_tracker_holds_back_a_possible_stop_string():
    from cerberus_decoding.stops import TextTracker

    class Chars:  # one token per character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    tracker = TextTracker(Chars(), ["How can"])
    shown = [tracker.add([ord(c)]) for c in "Hello! How"]
    assert "".join(shown) == "Hello! "  # "How" might still become "How can"
    assert tracker.add([ord(c) for c in " are"]) == "How are"  # it did not
    assert tracker.add([ord(c) for c in " you. How can"]) == " you. " and tracker.stopped


def test_text_tracker_decodes_new_tokens_only_and_still_gives_the_whole_decode(lm):
    """The default (byte-level) tokenizer is decoded piecewise, the new tokens after the last whole
    character: over random ids (characters split across tokens, special tokens, a genuine U+FFFD)
    fed in random chunks, the streamed text is exactly tokenizer.decode of them all, and the
    tracker re-decodes only a short tail."""
    from cerberus_decoding.stops import TextTracker, decodes_piecewise

    tok = lm.tokenizer
    assert decodes_piecewise(tok)
    byte_pieces = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]  # partial characters
    specials = list(tok.all_special_ids) + tok(["\ufffd"], add_special_tokens=False)["input_ids"][0]
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        ids = []
        for _ in range(120):
            pool = (byte_pieces, specials, range(tok.vocab_size))[int(torch.randint(0, 3, (1,), generator=g))]
            ids.append(int(pool[int(torch.randint(0, len(pool), (1,), generator=g))]))
        tracker, shown, fed = TextTracker(tok, []), [], 0
        while fed < len(ids):
            n = int(torch.randint(1, 5, (1,), generator=g))
            shown.append(tracker.add(ids[fed : fed + n], final=fed + n >= len(ids)))
            fed += n
        assert "".join(shown) == tracker.text == tok.decode(ids, skip_special_tokens=True), trial
    text = "Café crème 🍰🎉, naïve résumé — 東京タワー! " * 8  # characters of 2-4 bytes, split across tokens
    tracker, longest = TextTracker(tok, []), 0
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        tracker.add([i])
        longest = max(longest, len(tracker.ids) - tracker.decoded_ids)
    assert tracker.text == text and longest <= 4  # it re-decodes a character's tokens, never the answer

    class Sentencepiece:  # a decoder that reads across tokens: decoded whole every time
        backend_tokenizer = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids)).strip()

    assert not decodes_piecewise(Sentencepiece()) and not decodes_piecewise(object())
    tracker = TextTracker(Sentencepiece(), [])
    assert tracker.add([1]) + tracker.add([2, 3], final=True) == "1 2 3"


# ---- 9, 10: the GGUF conversion's notice goes to stderr; a killed conversion's leftovers go away -----------
def test_conversion_notice_goes_to_stderr(tmp_path, monkeypatch, capsys):
    import transformers

    from cerberus_decoding import models

    def refuse(*a, **kw):
        raise ValueError("not a real model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(CerberusError, match="Cannot read GGUF"):
        models._convert_gguf(tmp_path / "m.gguf", tmp_path / "cache" / "m")
    out = capsys.readouterr()
    assert out.out == "" and "Converting m.gguf" in out.err


def test_stale_conversion_folders_are_removed(tmp_path):

    from cerberus_decoding import models

    dead, live = tmp_path / ".tmp-999999999-abc", tmp_path / f".tmp-{os.getpid()}-def"
    dead.mkdir()
    live.mkdir()
    (dead / "model.safetensors").write_bytes(b"half written")
    models._remove_stale_conversions(tmp_path)
    assert not dead.exists() and live.exists()
