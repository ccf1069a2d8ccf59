"""Issue 15: prompt files and mixes for distillation, batched distillation, resume after a kill."""

from __future__ import annotations

import json
import lzma
import signal
import subprocess
import sys

import pytest
import torch

from cerberus_decoding.models import CerberusError
from cerberus_decoding.train.distill import chat_ids, distill, generate_rows, teacher_forced
from cerberus_decoding.train.prompts import Prompt, load_prompts, parse_mix, read_prompt_file


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def prompt_dir(tmp_path):
    d = tmp_path / "instructions"
    d.mkdir()
    records = [{"id": f"a-{i}", "source": "x", "category": "math", "prompt": f"a{i}"} for i in range(10)]
    _jsonl(d / "alpha.jsonl", records)
    records = [{"id": f"b-{i}", "source": "y", "category": "code", "prompt": f"b{i}"} for i in range(6)]
    (d / "beta.jsonl.xz").write_bytes(lzma.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    (d / "gamma.txt").write_text("g0\n\ng1\ng2\n", encoding="utf-8")
    return d


def test_prompt_records_plain_text_and_compressed_files_are_read(prompt_dir):
    assert read_prompt_file(prompt_dir / "alpha.jsonl")[3] == Prompt("a3", "alpha", "math")
    assert [p.text for p in read_prompt_file(prompt_dir / "beta.jsonl.xz")] == [f"b{i}" for i in range(6)]
    assert read_prompt_file(prompt_dir / "gamma.txt") == [Prompt(f"g{i}", "gamma") for i in range(3)]


def test_a_json_string_may_hold_a_unicode_line_separator(tmp_path):
    path = _jsonl(tmp_path / "ls.jsonl", [{"prompt": "one\u2028two"}, {"prompt": "three"}])
    assert [p.text for p in read_prompt_file(path)] == ["one\u2028two", "three"]


def test_malformed_and_empty_prompt_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "ok", \n', encoding="utf-8")
    with pytest.raises(CerberusError, match=r"bad\.jsonl: line 2"):
        read_prompt_file(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CerberusError, match="holds no prompts"):
        read_prompt_file(empty)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CerberusError, match="no prompt files"):
        load_prompts(str(tmp_path / "nothing"), 5)


def test_a_mix_takes_its_shares_in_a_fixed_seeded_order(prompt_dir):
    chosen, source = load_prompts(str(prompt_dir), 10, "alpha=0.5,code=0.3,builtin=0.2", seed=1)
    assert len(chosen) == 10
    assert sum(p.source == "alpha" for p in chosen) == 5
    assert sum(p.category == "code" for p in chosen) == 3
    assert sum(p.source == "builtin" for p in chosen) == 2
    again, source_again = load_prompts(str(prompt_dir), 10, "alpha=0.5,code=0.3,builtin=0.2", seed=1)
    assert again == chosen and source_again == source  # deterministic
    other, other_source = load_prompts(str(prompt_dir), 10, "alpha=0.5,code=0.3,builtin=0.2", seed=2)
    assert other != chosen and other_source != source  # the identifier tells selections apart


def test_mixes_that_do_not_add_up_or_ask_too_much_are_refused(prompt_dir):
    with pytest.raises(CerberusError, match="add up to 0.9, not 1"):
        parse_mix("alpha=0.5,beta=0.4")
    with pytest.raises(CerberusError, match="KEY=SHARE"):
        parse_mix("alpha=half,beta=0.5")
    with pytest.raises(CerberusError, match="neither a source"):
        load_prompts(str(prompt_dir), 10, "alpha=0.5,delta=0.5")
    with pytest.raises(CerberusError, match="only 6"):
        load_prompts(str(prompt_dir), 20, "alpha=0.5,beta=0.5")


def test_without_a_mix_a_directory_is_shuffled_and_a_file_keeps_its_order(prompt_dir):
    everything, _ = load_prompts(str(prompt_dir), 100)
    assert len(everything) == 19 and {p.source for p in everything} == {"alpha", "beta", "gamma"}
    first, _ = load_prompts(str(prompt_dir / "alpha.jsonl"), 4)
    assert [p.text for p in first] == ["a0", "a1", "a2", "a3"]


QUESTIONS = [
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 17 times 3? Answer briefly.",
    "Summarize in one sentence: The museum reopened after a two-year renovation with a new wing for modern art.",
]


def test_lean_batched_distillation_gives_exactly_the_greedy_answers_of_generate(lm, references):
    """The CPU path: the default 4-bit format, 3 rows decoded together while finished rows take new
    prompts. Every answer is bitwise the one greedy generation gives for that prompt alone (no tie
    allowance)."""
    chosen = list(references.values())[:5]  # the last two join as rows finish
    rows = generate_rows(lm.runtime, [ids for ids, _ in chosen], 128, lm.tokenizer.eos_token_id, 3, False, lm.device)
    for (_, want), (tokens, hidden) in zip(chosen, rows, strict=True):
        assert tokens.tolist() == want and hidden is None


@pytest.mark.parametrize("runtime", ["hf", "lean"])
def test_padded_batch_distillation_gives_the_unbatched_greedy_answers(lm_hf, lm_f32, runtime):
    """The GPU path (one left-padded batch: transformers' own, or the lean runtime's over a shared
    cache) against one prompt at a time, float32: equal tokens, or a divergence at a proven near-tie;
    the teacher-forced pass (right-padded, on either runtime) recomputes the same tokens."""
    from cerberus_decoding.bench.run import logit_gap

    lm = lm_hf if runtime == "hf" else lm_f32
    tok, rt = lm.tokenizer, lm.runtime
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    eos = tok.eos_token_id
    batched = rt.generate_padded(prompts, 24, eos, eos, True)
    for ids, (tokens, _) in zip(prompts, batched, strict=True):
        alone = rt.generate_padded([ids], 24, eos, eos, False)[0][0].tolist()
        got = tokens.tolist()
        if got != alone:
            i = next((i for i, (a, b) in enumerate(zip(got, alone, strict=False)) if a != b), min(len(got), len(alone)))
            assert logit_gap(lm, ids, alone[:i]) < 1e-3, f"batched generation diverged at token {i}"
    for forcing in (lm_hf.runtime, lm_f32.runtime):
        forced = teacher_forced(forcing, prompts, [t.tolist() for t, _ in batched], 4096, lm.device)
        for (tokens, hidden), (targets, forced_hidden) in zip(batched, forced, strict=True):
            assert torch.equal(tokens, targets)  # the model's own greedy choices, recomputed in one forward
            torch.testing.assert_close(hidden.float(), forced_hidden.float(), atol=0.05, rtol=0.02)


def test_recorded_answers_continue_with_another_generator_and_say_which_made_which(tiny_lm, tiny_lean, tmp_path):
    """A run's first shards taken from an answers file as they are (no forward), the rest generated
    on the lean runtime: answers.safetensors holds all of them and records each shard's generator."""
    from safetensors import safe_open

    from cerberus_decoding.train.distill import read_answers

    prompts = [f"Give me tip number {i} for cooking rice." for i in range(12)]
    first = tmp_path / "first"
    distill(tiny_lm, prompts, first, batch_size=4, max_new_tokens=16, keep_hidden=False, source="mixed")
    recorded, made_by = read_answers(first / "answers.safetensors", "mixed")
    assert len(recorded) == 12 and set(made_by) == {"float32 hf cpu"}
    out = tmp_path / "out"
    distill(tiny_lean, prompts, out, 4, 16, keep_hidden=False, source="mixed", answers=(recorded[:8], made_by[:8]))
    distill(tiny_lean, prompts, out, 4, 16, keep_hidden=False, source="mixed", rows_per_step=3)
    answers, made_by = read_answers(out / "answers.safetensors", "mixed")
    assert answers[:8] == recorded[:8] and len(answers) == 12
    assert made_by == ["float32 hf cpu"] * 8 + ["float32 lean cpu"] * 4
    with safe_open(str(out / "shard-00000.safetensors"), "pt") as f:
        assert "hidden" not in f.keys()


def test_a_killed_distillation_resumes_without_losing_or_repeating_anything(tiny_lm, tiny_lean, tmp_path):
    """Kill a run in the middle of a batch; the same command then finishes and the shards hold every
    prompt's answer exactly once, equal to an uninterrupted run."""
    from safetensors.torch import load_file

    prompts = [f"Tell me fact number {i} about the sea." for i in range(12)]
    reference = tmp_path / "reference"
    distill(tiny_lean, prompts, reference, batch_size=4, max_new_tokens=48, source="kill-test")
    out = tmp_path / "killed"
    saved = tmp_path / "tiny-model"
    tiny_lm.model.save_pretrained(saved)
    tiny_lm.tokenizer.save_pretrained(saved)
    script = f"""
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from cerberus_decoding.models import LoadedModel
from cerberus_decoding.runtime import build_runtime
from cerberus_decoding.train import distill as d
real = d.generate_rows
def slow(*a, **k):
    out = real(*a, **k)
    print("batch", flush=True)
    time.sleep(60)  # killed here: a batch computed but not yet written
    return out
d.generate_rows = slow
model = AutoModelForCausalLM.from_pretrained({str(saved)!r}).eval().requires_grad_(False)
tok = AutoTokenizer.from_pretrained({str(saved)!r})
lm = LoadedModel(model, tok, "tiny-llama", torch.device("cpu"), torch.float32, build_runtime(model, "float32", "lean"))
d.distill(lm, {prompts!r}, {str(out)!r}, batch_size=4, max_new_tokens=48, source="kill-test")
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "batch"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "shard-00000.safetensors").exists()
    distill(tiny_lean, prompts, out, batch_size=4, max_new_tokens=48, source="kill-test")
    for b in range(3):
        got, want = load_file(out / f"shard-{b:05d}.safetensors"), load_file(reference / f"shard-{b:05d}.safetensors")
        assert torch.equal(got["lengths"], want["lengths"]) and torch.equal(got["tokens"], want["tokens"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_the_committed_answers_match_the_shipped_prompt_selection(lm, lm_int4, tmp_path):
    """`make heads` rebuilds the heads' data from the committed answers: they must belong to the
    selection that corpus/heads.mix makes (the identifier carries a digest of the prompts), and the
    CPU path's answers are the int4 runtime's own greedy answers to those prompts."""
    from pathlib import Path

    from cerberus_decoding.engine import Decoder, SamplingConfig
    from cerberus_decoding.train.distill import MAX_PROMPT_TOKENS, read_answers

    root = Path(__file__).resolve().parent.parent
    mix = (root / "corpus" / "heads.mix").read_text().strip()
    chosen, source = load_prompts(str(root / "corpus" / "instructions"), 40000, mix, seed=0)
    packed = root / "distilled" / "SmolLM2-135M-Instruct" / "instructions-40000.answers.safetensors.xz"
    answers = tmp_path / "answers.safetensors"
    answers.write_bytes(lzma.decompress(packed.read_bytes()))
    rows, made_by = read_answers(answers, source)
    # the shipped heads were trained on the first 23 shards (23,552 answers; 5% of them held out), their
    # lookup adapter on the last (1,024 answers the heads never saw)
    assert len(rows) == 24576 and sum(map(len, rows)) == 3_831_607
    # shards 0-9, 11-16 and 19-22 from the GPU path (transformers', then the lean runtime's padded
    # batch), shards 10 (an AVX2 CPU), 17-18 (an AMD AVX-512 CPU) and 23 (an Intel one) from the CPU path
    assert made_by[10239] == "bfloat16 hf cuda, float32 targets" and made_by[10240] == "int4 lean cpu"
    assert made_by[11264] == made_by[17407] == "bfloat16 lean cuda, float32 targets"
    assert made_by[17408] == made_by[19455] == "int4 lean cpu"
    assert made_by[19456] == made_by[23551] == "bfloat16 lean cuda, float32 targets"
    assert made_by[23552] == made_by[-1] == "int4 lean cpu"
    prompts = [ids for p in chosen[:24700] if len(ids := chat_ids(lm.tokenizer, p.text)) <= MAX_PROMPT_TOKENS]
    int4 = Decoder(lm_int4)
    for shard in (10, 17, 23):  # a short answer of each CPU machine's shards, regenerated here
        i = min(range(1024 * shard, 1024 * shard + 32), key=lambda i: len(rows[i]))
        assert int4.generate(prompts[i], SamplingConfig(max_new_tokens=256)).token_ids == rows[i]


def test_a_bfloat16_run_stores_float32_targets_along_its_own_answers(tiny_lm, tmp_path):
    """The GPU path's settings (hf runtime, bfloat16), run on the CPU: answers generated in bfloat16,
    then targets and hidden states recomputed by a float32 forward (of the bfloat16 weights, the only
    ones such a run holds) along them. answers.safetensors keeps the bfloat16 answers themselves, so
    rebuilding from it gives the same shards and writes the same file back."""
    import copy
    import dataclasses

    from safetensors import safe_open

    from cerberus_decoding.runtime.hf import HFRuntime

    bf16 = copy.deepcopy(tiny_lm.model).to(torch.bfloat16)
    lm = dataclasses.replace(tiny_lm, model=bf16, dtype=torch.bfloat16, runtime=HFRuntime(bf16, "bfloat16"))
    prompts = [f"Name a river, number {i}." for i in range(4)]
    distill(lm, prompts, tmp_path, batch_size=4, max_new_tokens=12, source="bf16")
    ids = [chat_ids(lm.tokenizer, p) for p in prompts]
    eos = lm.tokenizer.eos_token_id
    answers = [t.tolist() for t, _ in lm.runtime.generate_padded(ids, 12, eos, eos, False)]
    want = teacher_forced(HFRuntime(copy.deepcopy(bf16).float(), "float32"), ids, answers, 4096, lm.device)
    targets = torch.cat([t for t, _ in want]).to(torch.int32)
    with safe_open(str(tmp_path / "shard-00000.safetensors"), "pt") as f:
        assert f.metadata()["generator"] == "bfloat16 hf cpu, float32 targets"
        assert torch.equal(f.get_tensor("tokens"), targets)
        assert torch.equal(f.get_tensor("hidden"), torch.cat([h for _, h in want]))
    assert next(bf16.parameters()).dtype == torch.bfloat16  # the float32 copy left the model alone
    from cerberus_decoding.train.distill import read_answers

    recorded, made_by = read_answers(tmp_path / "answers.safetensors", "bf16")
    assert recorded == answers and made_by == ["bfloat16 hf cpu"] * 4  # the answers, not their targets
    rebuilt = tmp_path / "rebuilt"  # float32 targets recomputed again: the label says it once
    distill(lm, prompts, rebuilt, 4, 12, source="bf16", answers=(recorded, made_by))
    with safe_open(str(rebuilt / "shard-00000.safetensors"), "pt") as f:
        assert f.metadata()["generator"] == "bfloat16 hf cpu, float32 targets"
        assert torch.equal(f.get_tensor("tokens"), targets)  # the same path, so the same targets
    assert read_answers(rebuilt / "answers.safetensors", "bf16") == (recorded, made_by)  # a fixed point


def test_rebuilding_from_recorded_answers_writes_them_back(tiny_lm, tmp_path):
    """The heads learn the float32 targets along recorded answers; answers.safetensors must keep the
    answers themselves (the path the hidden states were computed along), or the next rebuild from it
    would teacher-force along the targets: another path. Answers the model would never give make the
    targets differ from them everywhere."""
    from safetensors import safe_open

    from cerberus_decoding.train.distill import read_answers

    prompts = [f"Count to {i}." for i in range(3)]
    g = torch.Generator().manual_seed(0)
    recorded = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 7)]
    made_by = ["bfloat16 lean cuda"] * 3
    distill(tiny_lm, prompts, tmp_path, batch_size=4, max_new_tokens=12, source="s", answers=(recorded, made_by))
    with safe_open(str(tmp_path / "shard-00000.safetensors"), "pt") as f:
        targets, path = f.get_tensor("tokens"), f.get_tensor("answers")
        assert f.metadata()["generator"] == "bfloat16 lean cuda, float32 targets"
    assert path.tolist() == sum(recorded, []) and not torch.equal(targets, path)
    assert read_answers(tmp_path / "answers.safetensors", "s") == (recorded, made_by)
