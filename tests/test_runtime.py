"""The runtime: lean forward vs transformers, exact verification rows, GGUF 4-bit blocks, formats."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch

from cerberus_decoding.bench.run import FLOAT32_TIE_GAP
from cerberus_decoding.engine import Decoder, SamplingConfig
from cerberus_decoding.heads import TEMP_SUFFIX
from cerberus_decoding.models import CerberusError, default_gguf_path, gguf_cache_dir
from cerberus_decoding.runtime import build_runtime, cpu_kernels, gguf, resolve_weights
from cerberus_decoding.runtime.formats import dense, dequantize, int4_from_blocks, w4a8_available
from cerberus_decoding.runtime.gguf import read_q4_blocks
from cerberus_decoding.runtime.lean import LeanLlama
from cerberus_decoding.tree import build_tree

from .conftest import PROMPTS, assert_lossless, tiny_model

# root, two depth-1 nodes, chains below both: main-chain rows and off-chain rows
TREE_NODES = [[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 1], [2]]
TREE = build_tree(TREE_NODES)


def rows_vs_one_token_steps(rt, prefix: list[int], tokens: list[int]):
    """Hidden states of a verification forward of ``tokens`` laid out as TREE, and of the same
    nodes fed one token at a time along each node's own path (what AR decoding computes)."""
    with torch.inference_mode():
        cache = rt.new_cache(64, "cpu")
        rt.forward(cache, torch.tensor(prefix), torch.arange(len(prefix)))
        start = cache.length
        tree_rows = rt.forward(cache, torch.tensor(tokens), start + TREE.depth, TREE.mask)  # [N+1, H]
        singles = []
        for node in range(TREE.size):
            path = TREE.mask[node].nonzero().flatten().tolist()  # ancestors then the node itself
            cache.truncate(start)
            for i, n in enumerate(path):
                h = rt.forward(cache, torch.tensor([tokens[n]]), torch.tensor([start + i]))
            singles.append(h[0])
        return tree_rows, torch.stack(singles)


@pytest.mark.parametrize("tree_attention", ["kernel", "rows"])
@pytest.mark.parametrize("weights", ["int4", "int8", "bfloat16", "w4a8"])
def test_verification_rows_equal_one_token_steps_bitwise(tiny_lm, weights, tree_attention):
    if weights == "w4a8" and not w4a8_available():  # no kernel here: a clear error naming int4, not a skip
        with pytest.raises(CerberusError, match="AVX512-VNNI or AVX2.*--weights int4"):
            LeanLlama(tiny_lm.model, weights, tree_attention=tree_attention)
        return
    rt = LeanLlama(tiny_lm.model, weights, tree_attention=tree_attention)
    g = torch.Generator().manual_seed(0)
    prefix, tokens = torch.randint(5000, (21,), generator=g).tolist(), torch.randint(5000, (TREE.size,), generator=g)
    tree_rows, singles = rows_vs_one_token_steps(rt, prefix, tokens.tolist())
    assert torch.equal(tree_rows, singles)
    with torch.inference_mode():  # the LM head on several rows gives each row's one-row logits
        assert torch.equal(rt.lm_head(tree_rows), torch.cat([rt.lm_head(r[None]) for r in tree_rows]))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("weights", ["int4", "int8", "w4a8"])
def test_all_layers_in_one_kernel_op_give_the_per_op_bits(lm, weights, arch):
    """Where every projection runs our kernels, a forward is one ``layers`` op: the same bits as the
    Python loop over the same ops (a one-token step, a tree, the cache they write)."""
    model = tiny_model(lm.tokenizer, arch)
    if arch == "qwen2":  # transformers initialises biases to zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    if weights == "w4a8" and not w4a8_available():  # its error is tested above
        return
    rt = LeanLlama(model, weights)
    if rt.kernels is None or (weights != "w4a8" and not rt.kernels.quantized_matmuls()):  # torch's int4 / int8
        assert rt.stack is None
        return
    assert rt.stack is not None
    assert LeanLlama(model, "bfloat16").stack is None  # torch's matmuls: the Python loop
    g = torch.Generator().manual_seed(0)
    prefix, tokens = torch.randint(5000, (21,), generator=g), torch.randint(5000, (TREE.size,), generator=g)
    outputs = []
    for stack in (rt.stack, None):
        rt.stack = stack
        with torch.inference_mode():
            cache = rt.new_cache(64, "cpu")
            rt.forward(cache, prefix, torch.arange(21))
            step = rt.forward(cache, prefix[:1], torch.tensor([21]))
            tree = rt.forward(cache, tokens, 22 + TREE.depth, TREE.mask)
        outputs.append((step, tree, cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]))
    for fused, loop in zip(*outputs, strict=True):
        assert torch.equal(fused, loop)


def test_a_prompt_is_fed_as_its_one_token_steps_bitwise(lm):
    """In w4a8, whose projections run our kernels, a prompt is fed as chains of PROMPT_CHUNK rows (three
    here, after a cached prefix): each row gets the hidden state and writes the K/V entries of the
    one-token step at it, so a chat turn that reuses the cache equals a fresh run."""
    from cerberus_decoding.runtime.lean import PROMPT_CHUNK

    model = tiny_model(lm.tokenizer, "llama")
    for weights in ("int4", "bfloat16"):  # one causal block: the same answers with torch's kernels and ours
        assert not LeanLlama(model, weights).chained_prompts
    if not w4a8_available():  # its error is tested above
        return
    rt = LeanLlama(model, "w4a8")
    assert rt.chained_prompts
    n = 2 * PROMPT_CHUNK + 9
    ids = torch.randint(5000, (n,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        prompt = rt.new_cache(n, "cpu")
        hidden = torch.cat(
            [rt.forward(prompt, ids[:5], torch.arange(5)), rt.forward(prompt, ids[5:], torch.arange(5, n))]
        )
        steps = rt.new_cache(n, "cpu")
        singles = torch.cat([rt.forward(steps, ids[i : i + 1], torch.tensor([i])) for i in range(n)])
    assert torch.equal(hidden, singles)
    assert torch.equal(prompt.k, steps.k) and torch.equal(prompt.v, steps.v)


@pytest.mark.parametrize("shape", [(960, 576), (3072, 576), (576, 1536)])  # the default model's projections
def test_bfloat16_layers_give_each_row_its_bits_alone(shape):
    """Up to 32 rows. oneDNN's bfloat16 matmul is not row-invariant for the 1536-wide down
    projection on an AVX512-BF16 CPU: there the layer runs without oneDNN (formats.dense decides)."""
    g = torch.Generator().manual_seed(0)
    layer = dense(torch.randn(shape, generator=g), "bfloat16")
    x = torch.randn(32, shape[1], generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(32)])
        for m in range(2, 33):
            assert torch.equal(layer(x[:m]), alone[:m]), f"{m} rows"


@pytest.mark.slow
def test_default_model_4bit_rows_equal_one_token_steps_bitwise(lm, lm_int4):
    """The default model in int4 and in w4a8 (where its kernel is built: ``lm``'s format then): a
    tree's rows are the one-token steps' bits."""
    ids = Decoder(lm).encode(PROMPTS[0])
    tokens = torch.randint(1000, (TREE.size,), generator=torch.Generator().manual_seed(1)).tolist()
    assert lm.weights == ("w4a8" if w4a8_available() else "int4")
    for model in {lm_int4.weights: lm_int4, lm.weights: lm}.values():
        tree_rows, singles = rows_vs_one_token_steps(model.runtime, ids, tokens)
        assert torch.equal(tree_rows, singles), model.weights


def test_masked_tree_attention_matches_one_token_steps(tiny_lm):
    """CUDA's default: the whole tree in one attention call per layer. Not bitwise (a kernel over a
    block of rows), but each row is the one-token step at that node up to float32 rounding."""
    rt = LeanLlama(tiny_lm.model, "float32", tree_attention="masked")
    g = torch.Generator().manual_seed(3)
    prefix, tokens = torch.randint(5000, (21,), generator=g).tolist(), torch.randint(5000, (TREE.size,), generator=g)
    tree_rows, singles = rows_vs_one_token_steps(rt, prefix, tokens.tolist())
    torch.testing.assert_close(tree_rows, singles, atol=1e-5, rtol=1e-4)
    with pytest.raises(CerberusError, match="tree attention"):
        LeanLlama(tiny_lm.model, "float32", tree_attention="fast")


def test_static_forward_matches_the_step_and_the_tree(tiny_lm):
    """The fixed-shape forward a CUDA graph replays (every row attends to the whole cache under a
    mask) computes the one-token step and a tree verification as the regular forward does, and
    writes the same K/V (float32, within rounding)."""
    rt = LeanLlama(tiny_lm.model, "float32", tree_attention="masked")
    g = torch.Generator().manual_seed(4)
    prefix, tokens = torch.randint(5000, (21,), generator=g), torch.randint(5000, (TREE.size,), generator=g)
    with torch.inference_mode():
        caches = [rt.new_cache(40, "cpu") for _ in range(2)]
        for c in caches:
            rt.forward(c, prefix, torch.arange(21))
        start = torch.tensor(21)
        step = rt.forward(caches[0], tokens[:1], torch.tensor([21]))
        fixed = rt.static_forward(caches[1], tokens[:1], torch.tensor([21]), start, torch.ones(1, 1, dtype=torch.bool))
        torch.testing.assert_close(fixed, step, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-4)
        caches[0].truncate(21)
        tree = rt.forward(caches[0], tokens, 21 + TREE.depth, TREE.mask)
        fixed = rt.static_forward(caches[1], tokens, 21 + TREE.depth, start, TREE.mask)
        torch.testing.assert_close(fixed, tree, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_masked_tree_attention_is_lossless_on_the_default_model(lm_f32):
    """The masked path with the shipped heads decodes what float32 AR decodes (proven-tie rule)."""
    import dataclasses

    from cerberus_decoding.methods import build_decoder

    masked = LeanLlama(lm_f32.model, "float32", tree_attention="masked")
    fmt = dataclasses.replace(lm_f32, runtime=masked)
    cfg = SamplingConfig(max_new_tokens=32)
    decoder = build_decoder(fmt, "cerberus-nogate", heads="default", tree=TREE_NODES, min_confidence=0.0)
    for prompt in PROMPTS[2:4]:
        ids = decoder.encode(prompt)
        reference = Decoder(lm_f32).generate(ids, cfg).token_ids
        result = decoder.generate(ids, cfg)
        assert_lossless(fmt, ids, reference, result.token_ids)
        assert result.mean_accepted > 1.2  # the heads' drafts were verified and kept


def test_lean_float32_forward_matches_transformers(tiny_lm):
    """The same weights through our forward and through transformers' model (float32)."""
    lean, hf = build_runtime(tiny_lm.model, "float32", "lean"), build_runtime(tiny_lm.model, "float32", "hf")
    ids = torch.randint(5000, (40,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a = lean.forward(lean.new_cache(48, "cpu"), ids, torch.arange(40))
        b = hf.forward(hf.new_cache(48, "cpu"), ids, torch.arange(40))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_lean_float32_greedy_equals_transformers_on_real_prompts(lm_f32, lm_hf):
    """8 real prompts x 64 tokens: every token the lean float32 runtime decodes is transformers'
    greedy choice at that point (its argmax, or within the proven-tie bound of it), checked by one
    transformers forward over prompt + answer; the prompts' final hidden states agree within 1e-3
    (absolute; float32 rounding of two op orders). Our loop against transformers' own ``generate``:
    tests/test_engine.py."""
    lean = Decoder(lm_f32)
    cfg = SamplingConfig(max_new_tokens=64)
    for prompt in PROMPTS[:8]:
        ids = lean.encode(prompt)
        ours = lean.generate(ids, cfg).token_ids
        with torch.inference_mode():
            logits = lm_hf.model(torch.tensor([ids + ours])).logits[0, len(ids) - 1 : -1]  # [n, V]
        best = logits.max(-1).values  # transformers' greedy choice's logit at each of our positions
        chosen = logits.gather(-1, torch.tensor(ours)[:, None])[:, 0]
        assert len(ours) == 64 or ours[-1] in lean.eos_ids, prompt
        assert ((best - chosen) <= FLOAT32_TIE_GAP).all(), f"{prompt}: {(best - chosen).max():.3g} from the argmax"
    x = torch.tensor(ids)
    with torch.inference_mode():
        a = lm_f32.runtime.forward(lm_f32.runtime.new_cache(len(ids), "cpu"), x, torch.arange(len(ids)))
        b = lm_hf.runtime.forward(lm_hf.runtime.new_cache(len(ids), "cpu"), x, torch.arange(len(ids)))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_the_gguf_tensor_index_is_parsed_once_and_rebuilt_when_unreadable(lm, tmp_path, monkeypatch):
    """Parsing a GGUF's header takes seconds (every vocabulary string), so where the 4-bit tensors
    lie is cached; loads after the first read the index, and a corrupt index is parsed again."""
    monkeypatch.setenv("CERBERUS_CACHE", str(tmp_path))
    path, cfg = default_gguf_path(), lm.model.config
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
    first = read_q4_blocks(path, *heads)
    index = gguf_cache_dir(path) / gguf.INDEX_FILE
    assert index.is_file() and len(first) == 7 * cfg.num_hidden_layers
    parsed, calls = gguf.q4_tensor_index(path), []
    monkeypatch.setattr(gguf, "_parse_q4_tensors", lambda p: calls.append(p) or parsed)
    cached = read_q4_blocks(path, *heads)
    assert not calls  # read from the index, not parsed
    for name, (q, scale, zero) in first.items():
        assert all(torch.equal(a, b) for a, b in zip((q, scale, zero), cached[name], strict=True)), name
    index.write_text('{"version": 1, "tensors": [')  # a half-written or damaged index
    assert len(read_q4_blocks(path, *heads)) == len(first) and calls == [path]
    assert gguf.q4_tensor_index(path) == parsed and len(calls) == 1  # rewritten whole
    assert not list(index.parent.glob(f"*{TEMP_SUFFIX}"))  # no temp file left behind


def test_gguf_q4_blocks_pack_within_the_documented_bound(lm_f32):
    """The GGUF's Q4_1 blocks, packed as they are, reproduce transformers' de-quantized weights:
    exactly with our int4 kernel (float32 scales), up to the bf16 rounding of each block's scale d and
    offset m + 8d with torch's (docs/runtime.md)."""
    cfg = lm_f32.model.config
    blocks = read_q4_blocks(default_gguf_path(), cfg.num_attention_heads, cfg.num_key_value_heads)
    assert len(blocks) == 7 * cfg.num_hidden_layers  # every projection of every block is Q4
    state = lm_f32.model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.17.mlp.down_proj"):
        q, scale, mins = blocks[name]
        exact = q.float() * scale.repeat_interleave(32, 1) + mins.repeat_interleave(32, 1)
        assert torch.equal(exact, state[name + ".weight"])  # un-permuted rows, same values
        ours = int4_from_blocks(q, scale, mins)
        if ours.kernels is not None:
            assert torch.equal(dequantize(ours), exact), name
        if w4a8_available():  # w4a8's weights too
            assert torch.equal(dequantize(int4_from_blocks(q, scale, mins, "w4a8")), exact), name
        with patch.object(cpu_kernels, "load", lambda: None):  # torch's kernel: bf16 scale and zero
            err = (dequantize(int4_from_blocks(q, scale, mins)) - exact).abs()
        zero = mins + 8 * scale
        bound = ((zero.abs() + 8 * scale) * 2**-8).repeat_interleave(32, 1)  # half a bf16 ulp of each term
        assert (err <= bound).all(), name


def test_w4a8_lm_head_is_the_ggufs_own_q8_0_blocks(lm_f32):
    """Under w4a8 the LM head runs the GGUF's Q8_0 embedding blocks as they are (w8a8): its weights
    are transformers' de-quantized ones, bitwise; int4 keeps int8 per row (bfloat16 activations)."""
    if not w4a8_available():  # no kernel here: asking for w4a8 is a clear error naming int4, not a skip
        with pytest.raises(CerberusError, match="--weights int4"):
            lm_f32.with_weights("w4a8")
        return
    head = lm_f32.with_weights("w4a8").runtime.output
    assert head.fmt == "w8a8"
    assert torch.equal(dequantize(head), lm_f32.model.get_output_embeddings().weight.detach().float())
    assert lm_f32.with_weights("int4").runtime.output.fmt == "int8"


def test_weight_format_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights("auto", cpu, "lean") == ("w4a8" if w4a8_available() else "int4")
    assert resolve_weights("auto", cuda, "lean") == "bfloat16"
    assert resolve_weights("auto", cpu, "hf") == "float32"
    for weights, device, runtime, hint in [
        ("int4", cpu, "hf", "--runtime lean"),
        ("int8", cuda, "lean", "bfloat16"),
        ("fp8", cpu, "lean", "one of"),
    ]:
        with pytest.raises(CerberusError, match=hint):
            resolve_weights(weights, device, runtime)
    with pytest.raises(CerberusError, match="divisible by 32"):
        dense(torch.randn(8, 48), "int4")


def test_unsupported_architecture_names_the_hf_runtime():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(CerberusError, match="--runtime hf"):
        LeanLlama(model, "float32")


def test_projections_missing_from_the_gguf_are_quantized_with_a_notice(tiny_lm, capsys):
    rt = LeanLlama(tiny_lm.model, "int4", q4_blocks={})
    assert "quantized on load" in capsys.readouterr().err
    w = tiny_lm.model.model.layers[0].mlp.down_proj.weight
    err = (dequantize(rt.layers[0]["w2"]) - w).abs().max()
    assert 0 < err < w.abs().max() / 4  # really 4-bit, and close


def test_cli_rejects_a_format_the_runtime_lacks(capsys):
    from cerberus_decoding import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hi", "--weights", "int4", "--runtime", "hf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--runtime lean" in err[0]


def test_the_hf_runtime_hands_its_cache_to_older_transformers_too():
    """transformers before 5.2x names the cache argument ``past_key_values`` (the GPU machines run
    5.17): the hf runtime must pass its cache under the name the model's forward takes."""
    from types import SimpleNamespace

    from cerberus_decoding.runtime.hf import HFRuntime

    class OlderModel(torch.nn.Module):  # the signature of LlamaModel.forward in transformers 5.17
        def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            self.got = past_key_values
            return SimpleNamespace(last_hidden_state=torch.zeros(1, input_ids.shape[1], 4))

    inner = OlderModel()
    rt = HFRuntime(SimpleNamespace(model=inner, dtype=torch.float32), "float32")
    cache = object()
    rt.forward(cache, torch.tensor([5, 6]), torch.tensor([0, 1]))
    assert rt.cache_kw == "past_key_values" and inner.got is cache


def test_cuda_graphs_are_the_default_and_the_variable_turns_them_off(tiny_lm, monkeypatch):
    """CUDA steps and heads replay from CUDA graphs unless ``CERBERUS_CUDA_GRAPHS=0`` (on a CPU the
    flag is read but nothing is captured: ``forward`` replays only CUDA tensors)."""
    monkeypatch.delenv("CERBERUS_CUDA_GRAPHS", raising=False)
    assert LeanLlama(tiny_lm.model, "float32").cuda_graphs
    monkeypatch.setenv("CERBERUS_CUDA_GRAPHS", "0")
    assert not LeanLlama(tiny_lm.model, "float32").cuda_graphs
    monkeypatch.setenv("CERBERUS_CUDA_GRAPHS", "1")
    rt = LeanLlama(tiny_lm.model, "float32")
    with torch.inference_mode():
        cache = rt.new_cache(32, "cpu")
        rt.forward(cache, torch.arange(5), torch.arange(5))
        rt.forward(cache, torch.tensor([7]), torch.tensor([5]))
    assert rt.cuda_graphs and not cache.graphs
