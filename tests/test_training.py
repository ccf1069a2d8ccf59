"""Prompt formats, distillation and head training: loss goes down, resume is exact, 2 processes match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from cerberus_decoding.models import CerberusError
from cerberus_decoding.train import train as train_mod
from cerberus_decoding.train.distill import distill
from cerberus_decoding.train.prompts import builtin_prompts, read_prompts
from cerberus_decoding.train.train import TrainConfig, train


def test_prompt_formats_parse(tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello"}]
    sharegpt.write_text(json.dumps([{"conversations": turns}]))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Sort these", "input": "3 1 2", "output": "1 2 3"}]))
    spec = tmp_path / "question.jsonl"
    spec.write_text('{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Another?"]}\n')
    assert read_prompts(sharegpt) == ["Hi?"]
    assert read_prompts(alpaca) == ["Sort these\n\n3 1 2"]
    assert read_prompts(spec) == ["Write a haiku."]


def test_malformed_prompt_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"turns": ["ok"]}\n{"text": "unknown shape"}\n')
    with pytest.raises(CerberusError, match="line 3"):
        read_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"turns": ["ok"]}\n{not json\n')
    with pytest.raises(CerberusError, match="line 2"):
        read_prompts(broken)


def test_builtin_prompts_are_many_distinct_and_cover_the_categories():
    prompts = builtin_prompts(3000)
    assert len(set(prompts)) == 3000
    assert any("Translate" in p for p in prompts) and any("```python" in p for p in prompts)
    assert any("Context:" in p for p in prompts) and any("Summarize" in p for p in prompts)


@pytest.fixture(scope="module")
def tiny_data(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilled")
    distill(tiny_lm, builtin_prompts(24), out, batch_size=8, max_new_tokens=32, source="test")
    return out


def test_distill_writes_shards_and_resumes(tiny_lm, tiny_data):
    shards = sorted(tiny_data.glob("shard-*.safetensors"))
    assert len(shards) == 3
    first = shards[0].stat().st_mtime_ns
    summary = distill(tiny_lm, builtin_prompts(24), tiny_data, batch_size=8, max_new_tokens=32, source="test")
    assert summary["new_tokens"] == 0 and shards[0].stat().st_mtime_ns == first  # nothing redone
    with pytest.raises(CerberusError, match="other settings"):
        distill(tiny_lm, builtin_prompts(24), tiny_data, batch_size=4, max_new_tokens=32, source="test")


def test_distill_split_over_workers_gives_the_same_shards(tiny_lm, tiny_data, tmp_path):
    from safetensors.torch import load_file

    for worker in (1, 0):  # either order; each worker writes only its own batches
        distill(tiny_lm, builtin_prompts(24), tmp_path, 8, 32, source="test", worker=worker, workers=2)
        if worker == 1:
            assert [p.name for p in sorted(tmp_path.glob("shard-*"))] == ["shard-00001.safetensors"]
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        ours, single = load_file(tmp_path / name), load_file(tiny_data / name)
        assert torch.equal(ours["tokens"], single["tokens"]) and torch.equal(ours["lengths"], single["lengths"])


def test_recorded_answers_rebuild_the_shards_without_generating(tiny_lm, tiny_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from cerberus_decoding.runtime.hf import HFRuntime
    from cerberus_decoding.train import distill as distill_mod

    answers = distill_mod.read_answers(tiny_data / "answers.safetensors", "test")
    assert len(answers[0]) == 24 and set(answers[1]) == {"float32 hf cpu"}
    monkeypatch.setattr(HFRuntime, "generate_padded", None)  # generating would fail: only teacher forcing runs
    distill(tiny_lm, builtin_prompts(24), tmp_path, 8, 32, source="test", answers=answers)
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        rebuilt, generated = load_file(tmp_path / name), load_file(tiny_data / name)
        assert torch.equal(rebuilt["tokens"], generated["tokens"])
        torch.testing.assert_close(rebuilt["hidden"].float(), generated["hidden"].float(), atol=0.02, rtol=0.02)
    with pytest.raises(CerberusError, match="not 'other'"):
        distill_mod.read_answers(tiny_data / "answers.safetensors", "other")


def _cfg(**kw):
    base = dict(
        head_type="cerberus",
        head_vocab=512,
        epochs=50,
        batch_size=64,
        lr=3e-3,
        eval_every=10,
        save_every=5,
        max_steps=30,
        holdout=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("head_type,root_token", [("cerberus", False), ("cerberus", True), ("medusa", False)])
def test_training_reduces_the_loss(tiny_lm, tiny_data, tmp_path, head_type, root_token):
    summary = train(tiny_lm, tiny_data, tmp_path, _cfg(head_type=head_type, root_token=root_token))
    history = torch.load(tmp_path / "trainer_state.pt", weights_only=False)["history"]["loss"]
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    assert (tmp_path / "heads" / "config.json").is_file() and summary["steps"] == 30
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["head_type"] == head_type and config["root_token"] is root_token


def test_heads_that_read_drafts_train_from_trained_heads_and_keep_their_first_head(tiny_lm, tiny_data, tmp_path):
    """``--reads-drafts --init-from``: the same weights and head vocabulary to start with; head 1 reads
    what it read before (the root), so before training its held-out accuracy is the start's; the
    chain metric counts the leading heads a top-1 chain gets right."""
    from cerberus_decoding.heads import load_heads

    start = train(tiny_lm, tiny_data, tmp_path / "start", _cfg(root_token=True))
    first = train(
        tiny_lm,
        tiny_data,
        tmp_path / "zero",
        _cfg(root_token=True, reads_drafts=True, init_from=str(tmp_path / "start" / "heads"), max_steps=1, lr=0.0),
    )
    assert first["eval"]["top1"][0] == pytest.approx(start["eval"]["top1"][0], abs=1e-6)
    assert first["eval"]["chain"] <= sum(first["eval"]["top1"]) + 1e-6
    a, b = (load_heads(tmp_path / run / "heads", tiny_lm) for run in ("start", "zero"))
    assert torch.equal(a.vocab_ids, b.vocab_ids) and b.config.reads_drafts
    trained = train(
        tiny_lm,
        tiny_data,
        tmp_path / "drafts",
        _cfg(root_token=True, reads_drafts=True, init_from=str(tmp_path / "start" / "heads")),
    )
    assert trained["eval"]["chain"] > 0
    with pytest.raises(CerberusError, match="num_layers"):
        train(
            tiny_lm,
            tiny_data,
            tmp_path / "bad",
            _cfg(root_token=True, num_layers=2, init_from=str(tmp_path / "start" / "heads")),
        )


def test_bfloat16_training_reduces_the_loss_and_runs_the_heads_in_bfloat16(tiny_lm, tiny_data, tmp_path, monkeypatch):
    """precision auto on a CPU with AVX512-BF16: decided when training starts, recorded as decided."""
    import cerberus_decoding.runtime as runtime

    monkeypatch.setattr(runtime, "machine", lambda device: {"device": "cpu", "flags": ["avx2", "avx512_bf16"]})
    dtypes = []
    real = train_mod.head_loss

    def spy(logits, *args, **kw):
        dtypes.append(logits.dtype)
        return real(logits, *args, **kw)

    monkeypatch.setattr(train_mod, "head_loss", spy)
    summary = train(tiny_lm, tiny_data, tmp_path, _cfg(precision="auto"))
    history = torch.load(tmp_path / "trainer_state.pt", weights_only=False)["history"]["loss"]
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    assert set(dtypes) == {torch.bfloat16} and summary["config"]["precision"] == "bfloat16"
    saved = load_file(tmp_path / "heads" / "model.safetensors")
    assert summary["steps"] == 30 and all(torch.isfinite(t.float()).all() for t in saved.values())


def test_auto_precision_takes_bfloat16_only_where_the_cpu_has_bfloat16_dot_products(monkeypatch):
    import cerberus_decoding.runtime as runtime

    cpu = torch.device("cpu")
    for flags, want in ((["avx2", "avx512f", "avx512_bf16"], "bfloat16"), (["avx2", "amx_bf16"], "bfloat16"),
                        (["avx2", "avx512f"], "float32"), (["avx2"], "float32")):  # fmt: skip
        monkeypatch.setattr(runtime, "machine", lambda device, flags=flags: {"device": "cpu", "flags": flags})
        assert train_mod.training_precision("auto", cpu) == want
        assert train_mod.training_precision("float32", cpu) == "float32"  # a flag wins
    assert train_mod.training_precision("auto", torch.device("cuda")) == "float32"  # the shipped GPU recipe
    with pytest.raises(CerberusError, match="Unknown precision 'fp8'"):
        train_mod.training_precision("fp8", cpu)


def test_soft_targets_point_at_the_labels_and_reduce_to_the_hard_loss():
    """Head k at i learns the base model's distribution at position i + k + 1 of the same answer."""
    tokens, rows = torch.tensor([5, 6, 7, 8, 9, 4, 3]), torch.tensor([0, 0, 0, 0, 1, 1, 1])
    labels = train_mod.head_labels(tokens, rows, 3)
    where = train_mod.target_positions(rows, 3)
    valid = labels != train_mod.IGNORE
    assert labels[0].tolist() == [6, 7, 8] and labels[4].tolist() == [4, 3, train_mod.IGNORE]
    assert labels[3].tolist() == [train_mod.IGNORE] * 3  # the answer ends: nothing to learn
    assert torch.equal(tokens[where][valid], labels[valid]) and valid.sum() == 3 + 2 + 1 + 2 + 1
    hidden, w = torch.randn(7, 16), torch.randn(10, 16)
    ids, probs = train_mod.teacher_topk(hidden, w, 4, chunk=3)
    full = (hidden @ w.T).softmax(-1)
    assert torch.equal(ids, full.topk(4, -1).indices) and torch.allclose(probs.sum(-1), torch.ones(7))
    assert torch.allclose(probs, full.gather(-1, ids) / full.gather(-1, ids).sum(-1, keepdim=True))
    # one-hot soft targets on the labels give exactly the hard loss, whatever their weight
    logits, head_labels = torch.randn(7, 3, 10), labels.clamp_min(0)
    hard, _ = train_mod.head_loss(logits, labels, 0.8)
    one_hot = (head_labels[..., None], torch.ones(7, 3, 1))
    mixed, _ = train_mod.head_loss(logits, labels, 0.8, one_hot, 0.7)
    assert torch.allclose(hard, mixed)
    spread = (ids[where], probs[where])  # a real distribution: a different loss
    assert not torch.allclose(hard, train_mod.head_loss(logits, labels, 0.8, spread, 0.7)[0])


def test_training_with_soft_targets_reduces_the_loss(tiny_lm, tiny_data, tmp_path):
    train(tiny_lm, tiny_data, tmp_path, _cfg(soft_targets=8))
    history = torch.load(tmp_path / "trainer_state.pt", weights_only=False)["history"]["loss"]
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5


def test_resume_after_interruption_is_exact(tiny_lm, tiny_data, tmp_path, monkeypatch):
    train(tiny_lm, tiny_data, tmp_path / "full", _cfg())
    full = torch.load(tmp_path / "full" / "trainer_state.pt", weights_only=False)["history"]["loss"]

    calls = {"n": 0}
    real = train_mod.head_loss

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 13:  # killed during step 13; the last checkpoint is step 10
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "head_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_lm, tiny_data, tmp_path / "cut", _cfg())
    monkeypatch.setattr(train_mod, "head_loss", real)
    with pytest.raises(CerberusError, match="--resume"):
        train(tiny_lm, tiny_data, tmp_path / "cut", _cfg())
    train(tiny_lm, tiny_data, tmp_path / "cut", _cfg(), resume=True)
    resumed = torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=False)["history"]["loss"]
    assert len(resumed) == len(full) == 30
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_two_process_training_matches_one_process(tiny_lm, tiny_data, tmp_path):
    model_dir = tmp_path / "tiny-model"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    args = [
        "--data",
        str(tiny_data),
        "--model",
        str(model_dir),
        "--head-vocab",
        "512",
        "--batch-size",
        "64",
        "--max-steps",
        "12",
        "--epochs",
        "50",
        "--eval-every",
        "6",
        "--save-every",
        "6",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "cerberus_decoding.cli", "train", "--out", str(tmp_path / "one"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "cerberus_decoding.cli",
            "train",
            "--out",
            str(tmp_path / "two"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    s1 = torch.load(tmp_path / "one" / "trainer_state.pt", weights_only=False)
    s2 = torch.load(tmp_path / "two" / "trainer_state.pt", weights_only=False)
    assert (s1["processes"], s2["processes"]) == (1, 2)
    h1, h2 = s1["history"]["loss"], s2["history"]["loss"]
    assert len(h1) == len(h2) == 12
    assert h2 == pytest.approx(h1, rel=1e-3, abs=1e-4)


def test_shipped_default_heads_are_trained_for_the_default_model(lm):
    from cerberus_decoding.engine import SamplingConfig
    from cerberus_decoding.methods import build_decoder
    from cerberus_decoding.tree import DEFAULT_TREE

    from .conftest import PROMPTS

    for head_type in ("medusa", "cerberus"):
        method = "medusa" if head_type == "medusa" else "cerberus-nogate"
        # the whole default tree: neither calibration's tree nor its pruning
        decoder = build_decoder(lm, method, heads="default", tree=DEFAULT_TREE, min_confidence=0.0)
        assert decoder.heads.config.base_model["name"] == lm.name
        results = [decoder.generate(decoder.encode(p), SamplingConfig(max_new_tokens=48)) for p in PROMPTS[:2]]
        tokens = sum(s.accepted for r in results for s in r.steps)  # the steps' tokens (not the prompt's first)
        steps = sum(len(r.steps) for r in results)
        assert tokens / steps > 1.5, f"{head_type} heads accept only {tokens / steps:.2f} tokens per step"


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(CerberusError, match="distill"):
        train_mod.load_distilled(tmp_path)


def test_training_on_some_shards_keeps_the_answers_ids(tiny_lm, tiny_data, tmp_path):
    """``--shards START:STOP`` loads those shards only; answer ids stay those of all the data (so the
    prompts and the per-source report still line up), and a bad or empty selection is a clear error."""
    hidden, tokens, rows = train_mod.load_distilled(tiny_data)
    n_shards = len(list(tiny_data.glob("shard-*.safetensors")))
    assert n_shards >= 2
    last_h, last_t, last_r = train_mod.load_distilled(tiny_data, "-1:")
    rest_h, rest_t, rest_r = train_mod.load_distilled(tiny_data, ":-1")
    assert torch.equal(torch.cat([rest_t, last_t]), tokens) and torch.equal(torch.cat([rest_r, last_r]), rows)
    assert torch.equal(torch.cat([rest_h, last_h]), hidden) and int(last_r.min()) == int(rest_r.max()) + 1
    for bad in ("5", "a:b", "1:2:3"):
        with pytest.raises(CerberusError, match="START:STOP"):
            train_mod.load_distilled(tiny_data, bad)
    with pytest.raises(CerberusError, match="selects none"):
        train_mod.load_distilled(tiny_data, f"{n_shards}:")
    summary = train(tiny_lm, tiny_data, tmp_path / "last", _cfg(shards="-1:", max_steps=2))
    assert summary["train_positions"] + summary["eval_positions"] == len(last_t)
    assert summary["config"]["shards"] == "-1:"


def test_resuming_on_changed_data_is_refused(tiny_lm, tiny_data, tmp_path):
    """`make heads` resumes its runs: one started on other data must not silently continue."""
    import shutil

    train(tiny_lm, tiny_data, tmp_path / "run", _cfg(max_steps=4, save_every=2))
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "settings.json", "prompts.jsonl"):
        shutil.copy(tiny_data / name, fewer / name)
    with pytest.raises(CerberusError, match="the data changed"):
        train(tiny_lm, fewer, tmp_path / "run", _cfg(max_steps=8, save_every=2), resume=True)
    summary = train(tiny_lm, tiny_data, tmp_path / "run", _cfg(max_steps=8, save_every=2), resume=True)
    assert summary["steps"] == 8  # the same data resumes


def test_heads_that_read_lookup_train_from_trained_heads(tiny_lm, tiny_data, tmp_path):
    """Distilled shards keep each answer's prompt ids; ``--reads-lookup --init-from`` starts where the
    trained heads were (the lookup weights at zero) and then learns from what lookup found."""
    from cerberus_decoding.heads import load_heads
    from cerberus_decoding.train.distill import chat_ids
    from cerberus_decoding.train.train import load_distilled, shard_prompts

    prompts = shard_prompts(tiny_data)
    assert prompts == [chat_ids(tiny_lm.tokenizer, p) for p in builtin_prompts(24)]
    _, tokens, rows = load_distilled(tiny_data)
    assert int(rows.max()) + 1 == len(prompts)
    start = train(tiny_lm, tiny_data, tmp_path / "start", _cfg(root_token=True))
    zero = _cfg(root_token=True, reads_lookup=True, init_from=str(tmp_path / "start" / "heads"), max_steps=1, lr=0.0)
    first = train(tiny_lm, tiny_data, tmp_path / "zero", zero)
    assert first["eval"]["top1"] == pytest.approx(start["eval"]["top1"], abs=1e-6)
    train(tiny_lm, tiny_data, tmp_path / "lookup", replace(zero, max_steps=30, lr=3e-3))
    heads = load_heads(tmp_path / "lookup" / "heads", tiny_lm)
    assert heads.config.reads_lookup
    assert heads.lookup_token.weight.abs().sum() > 0 and heads.lookup_ngram.weight[1:].abs().sum() > 0


def test_heads_that_read_lookup_need_shards_with_prompts(tiny_lm, tiny_data, tmp_path):
    """Shards distilled before prompts were kept: a clear error that says how to get them."""
    import shutil

    from safetensors.torch import save_file

    old = tmp_path / "old"
    shutil.copytree(tiny_data, old)
    for path in old.glob("shard-*.safetensors"):
        shard = load_file(path)
        save_file({k: v for k, v in shard.items() if not k.startswith("prompt_")}, path)
    with pytest.raises(CerberusError, match="re-run `cerberus distill`"):
        train(tiny_lm, old, tmp_path / "run", _cfg(root_token=True, reads_lookup=True))


def test_a_lookup_adapter_leaves_the_heads_it_starts_from_as_they_were(tiny_lm, tiny_data, tmp_path):
    """``--train-only lookup``: only the weights that read lookup train; the started-from heads' own
    weights come out bitwise the same, and their training record is kept beside the adapter's."""
    from cerberus_decoding.heads import load_heads

    train(tiny_lm, tiny_data, tmp_path / "start", _cfg(root_token=True))
    start_dir = str(tmp_path / "start" / "heads")
    adapter = _cfg(root_token=True, reads_lookup=True, init_from=start_dir, train_only="lookup", lr=1e-2)
    train(tiny_lm, tiny_data, tmp_path / "adapter", adapter)
    start, heads = (load_heads(tmp_path / run / "heads", tiny_lm) for run in ("start", "adapter"))
    for name, weight in start.state_dict().items():
        assert torch.equal(heads.state_dict()[name], weight), name
    assert heads.lookup_bonus.weight.abs().sum() > 0
    assert heads.config.training["started_from"]["step"] == start.config.training["step"]
    with pytest.raises(CerberusError, match="those heads read lookup"):  # the adapter would be dropped
        train(
            tiny_lm, tiny_data, tmp_path / "drop", _cfg(root_token=True, init_from=str(tmp_path / "adapter" / "heads"))
        )
    with pytest.raises(CerberusError, match="needs --reads-lookup and --init-from"):
        train(tiny_lm, tiny_data, tmp_path / "bad", _cfg(root_token=True, init_from=start_dir, train_only="lookup"))


def test_heads_that_read_lookup_as_before_start_heads_that_read_more_of_it(tiny_lm, tiny_data, tmp_path):
    """Heads that read only lookup's first token and n-grams up to 3 (trained before 2026-11-29) still
    load and start a run whose heads read one token each and longer n-grams: head 1's copy bonus and the
    n-gram rows carry over (the longer lengths start from the longest old one, which meant "at least
    that long"), the deeper heads' bonuses start at zero."""
    from dataclasses import replace as replace_config

    from cerberus_decoding.heads import DraftHeads, load_heads, save_heads
    from cerberus_decoding.lookup import HEADS_NGRAM, NGRAM

    train(tiny_lm, tiny_data, tmp_path / "start", _cfg(root_token=True))
    adapter = _cfg(root_token=True, reads_lookup=True, init_from=str(tmp_path / "start" / "heads"), lr=1e-2)
    train(tiny_lm, tiny_data, tmp_path / "adapter", replace(adapter, train_only="lookup"))
    heads = load_heads(tmp_path / "adapter" / "heads", tiny_lm)
    assert (heads.config.lookup_tokens, heads.config.lookup_max_ngram) == (heads.config.num_heads, HEADS_NGRAM)
    old = DraftHeads(replace_config(heads.config, lookup_tokens=1, lookup_max_ngram=NGRAM))
    state = heads.state_dict()
    for key in ("lookup_bonus.weight", "lookup_bonus.bias", "lookup_ngram.weight"):
        rows = state[key].view(-1, HEADS_NGRAM + 1, *state[key].shape[1:])[0]  # head 1's (or the only) rows
        state[key] = rows[: NGRAM + 1].clone()
    old.load_state_dict(state)
    save_heads(old, tmp_path / "old")
    old = load_heads(tmp_path / "old", tiny_lm)
    train(tiny_lm, tiny_data, tmp_path / "more", replace(adapter, init_from=str(tmp_path / "old"), max_steps=1, lr=0.0))
    more = load_heads(tmp_path / "more" / "heads", tiny_lm)
    bonus = more.lookup_bonus.weight.view(heads.config.num_heads, HEADS_NGRAM + 1, -1)
    assert torch.equal(bonus[0, : NGRAM + 1], old.lookup_bonus.weight)
    assert torch.equal(bonus[0, NGRAM + 1 :], old.lookup_bonus.weight[NGRAM].expand(HEADS_NGRAM - NGRAM, -1))
    assert not bonus[1:].any() and not more.lookup_bonus.bias.view(-1, HEADS_NGRAM + 1)[1:].any()
    assert torch.equal(more.lookup_ngram.weight[: NGRAM + 1], old.lookup_ngram.weight)
    assert torch.equal(
        more.lookup_ngram.weight[NGRAM + 1 :], old.lookup_ngram.weight[NGRAM].expand(HEADS_NGRAM - NGRAM, -1)
    )
