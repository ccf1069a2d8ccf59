"""Draft heads: checkpoint round trip, base-model fingerprint, the Cerberus sequential link."""

from __future__ import annotations

import json

import pytest
import torch

from cerberus_decoding.heads import DraftHeads, load_heads, new_heads, random_heads, save_heads
from cerberus_decoding.methods import build_decoder
from cerberus_decoding.models import CerberusError
from cerberus_decoding.runtime.formats import w4a8_available


@pytest.mark.parametrize("head_type", ["medusa", "cerberus"])
def test_save_load_round_trip(lm_f32, tmp_path, head_type):
    heads = random_heads(lm_f32, head_type, seed=3)
    save_heads(heads, tmp_path, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_type"] == head_type and config["num_heads"] == 4
    assert config["base_model"]["name"] == lm_f32.name and config["base_model"]["vocab_size"] == 49152
    loaded = load_heads(tmp_path, lm_f32)
    h = torch.randn(3, lm_f32.model.config.hidden_size)
    torch.testing.assert_close(loaded(h), heads(h))


def test_reduced_vocabulary_round_trip(lm_f32, tmp_path):
    heads = random_heads(lm_f32, "cerberus", seed=1)
    weight = lm_f32.model.get_output_embeddings().weight
    heads.set_vocab(torch.tensor([5, 17, 300, 4000, 49000]), weight)
    save_heads(heads, tmp_path, dtype=torch.float32)
    loaded = load_heads(tmp_path, lm_f32)
    h = torch.randn(lm_f32.model.config.hidden_size)
    assert loaded(h).shape == (4, 5)
    assert set(loaded.topk(h, 2)[0].flatten().tolist()) <= {5, 17, 300, 4000, 49000}


def test_heads_for_another_model_are_refused(lm_f32, tiny_lm, tmp_path):
    save_heads(new_heads(tiny_lm, "medusa"), tmp_path)
    with pytest.raises(CerberusError, match="trained for base model 'tiny-llama'"):
        load_heads(tmp_path, lm_f32)


def test_corrupt_or_missing_heads_files_are_clear_errors(lm_f32, tmp_path):
    with pytest.raises(CerberusError, match="no config.json"):
        load_heads(tmp_path, lm_f32)
    save_heads(new_heads(lm_f32, "medusa"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CerberusError, match="corrupt"):
        load_heads(tmp_path, lm_f32)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CerberusError, match="corrupt"):
        load_heads(tmp_path, lm_f32)


def test_wrong_head_type_for_method_is_refused(lm_f32, tmp_path):
    save_heads(new_heads(lm_f32, "medusa"), tmp_path)
    with pytest.raises(CerberusError, match="needs cerberus heads"):
        build_decoder(lm_f32, "cerberus", heads=str(tmp_path))


def test_untrained_cerberus_heads_behave_like_untrained_medusa_heads(lm_f32):
    h = torch.randn(2, lm_f32.model.config.hidden_size)
    torch.testing.assert_close(new_heads(lm_f32, "cerberus")(h), new_heads(lm_f32, "medusa")(h))


def test_cerberus_link_carries_gradient_to_the_previous_head(tiny_lm):
    heads = random_heads(tiny_lm, "cerberus", seed=0, scale=0.1)
    heads.requires_grad_(True)
    h = torch.randn(2, tiny_lm.model.config.hidden_size)
    logits = heads(h)  # one call computes every head: [2, K, V]
    assert logits.shape[:2] == (2, 4)
    logits[:, 2].logsumexp(-1).sum().backward()  # a loss on head 2 only
    assert heads.blocks[1][0].linear.weight.grad.abs().sum() > 0  # reaches head 1's block
    assert heads.blocks[3][0].linear.weight.grad is None or heads.blocks[3][0].linear.weight.grad.abs().sum() == 0
    # Medusa heads are independent: head 2's loss never reaches head 1
    medusa = random_heads(tiny_lm, "medusa", seed=0, scale=0.1).requires_grad_(True)
    medusa(h)[:, 2].logsumexp(-1).sum().backward()
    assert medusa.blocks[1][0].linear.weight.grad is None or medusa.blocks[1][0].linear.weight.grad.abs().sum() == 0


def test_all_heads_share_one_lm_head_matmul(tiny_lm):
    heads = new_heads(tiny_lm, "medusa")
    calls = []
    orig = DraftHeads.logits
    DraftHeads.logits = lambda self, s: calls.append(s.shape) or orig(self, s)
    try:
        heads(torch.randn(tiny_lm.model.config.hidden_size))
    finally:
        DraftHeads.logits = orig
    assert calls == [torch.Size([4, tiny_lm.model.config.hidden_size])]


def test_root_token_heads_read_the_root_and_round_trip(lm_f32, tmp_path):
    heads = random_heads(lm_f32, "cerberus", seed=2, scale=0.1, root_token=True)
    h = torch.randn(2, lm_f32.model.config.hidden_size)
    a, b = heads(h, torch.tensor([5, 5])), heads(h, torch.tensor([5, 900]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])  # the root's embedding changes every head's guess
    with pytest.raises(CerberusError, match="root token"):
        heads(h)
    save_heads(heads, tmp_path, dtype=torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["root_token"] is True
    assert "embed_weight" not in (tmp_path / "model.safetensors").read_bytes().decode("latin-1")  # borrowed, not saved
    loaded = load_heads(tmp_path, lm_f32)
    torch.testing.assert_close(loaded(h, torch.tensor([5, 900])), b)
    assert loaded.topk(h[0], 3, torch.tensor([900]))[0].shape == (4, 3)


def test_root_token_needs_cerberus_heads(lm_f32):
    with pytest.raises(CerberusError, match="needs Cerberus heads"):
        new_heads(lm_f32, "medusa", root_token=True)


def test_root_token_decoding_is_lossless(tiny_lm):
    from cerberus_decoding.engine import Decoder, SamplingConfig
    from cerberus_decoding.tree import DEFAULT_TREE, build_tree

    from .conftest import assert_lossless

    heads = random_heads(tiny_lm, "cerberus", seed=4, scale=0.5, root_token=True)
    ids = [1, 5, 9, 14, 3, 7]
    reference = Decoder(tiny_lm).generate(ids, SamplingConfig(max_new_tokens=40)).token_ids
    result = Decoder(tiny_lm, heads, build_tree(DEFAULT_TREE)).generate(ids, SamplingConfig(max_new_tokens=40))
    assert result.speculative_steps > 0
    assert_lossless(tiny_lm, ids, reference, result.token_ids)


@pytest.mark.parametrize("own_lm_head", [False, True])
@pytest.mark.parametrize("vocab", [507, 512])
def test_heads_packed_for_a_quantized_model_rank_as_the_unpacked_ones(lm_f32, own_lm_head, vocab):
    """With int4 / w4a8 weights on a CPU every head matmul runs in 8 bits, own LM heads included
    (bfloat16 matmuls are emulated on AVX2): under w4a8 as w8a8 where a layer is whole tiles (512
    tokens), else int8 per row (507); the logits stay within 8-bit rounding and the ranking holds."""
    heads = random_heads(lm_f32, "cerberus", seed=5, scale=0.05, root_token=True, own_lm_head=own_lm_head)
    vocab_ids = torch.cat([torch.arange(0, 49152, 97), torch.arange(1, 1 + vocab - 507)])  # 507 tokens (+5)
    heads.set_vocab(vocab_ids, lm_f32.model.get_output_embeddings().weight)
    if own_lm_head:
        for k, head in enumerate(heads.lm_heads):  # each head its own rows
            head.weight.data += 0.02 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(k))
    heads = heads.to(torch.bfloat16).requires_grad_(False)
    h, root = torch.randn(576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16), torch.tensor(7)
    unpacked = heads(h, root).float()  # [K, V']
    heads.pack_for("w4a8")
    packed_layers = heads.packed_logits if own_lm_head else [heads.packed_logits]
    fmt = "w8a8" if vocab == 512 and w4a8_available() else "int8"
    assert len(packed_layers) == (4 if own_lm_head else 1) and all(p.fmt == fmt for p in packed_layers)
    blocks = [block.packed for blocks in heads.blocks for block in blocks]
    assert all(b.fmt == ("w8a8" if w4a8_available() else "int8") for b in blocks)  # 1152 -> 576: whole tiles
    for weight in [head.weight for head in heads.lm_heads] if own_lm_head else [heads.shared_weight]:
        weight.zero_()  # the packed copies must be what runs
    packed = heads(h, root).float()
    torch.testing.assert_close(packed, unpacked, atol=0.05 * float(unpacked.abs().max()), rtol=0)  # seen: 2%
    top2 = unpacked.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1 * float(unpacked.abs().max())  # no near-tie for int8 to flip
    assert clear.any()
    assert torch.equal(packed.argmax(-1)[clear], unpacked.argmax(-1)[clear])


@pytest.mark.parametrize("reads_lookup", [False, True])
def test_heads_that_read_drafts_draft_each_node_from_its_own_path(lm_f32, reads_lookup):
    """``reads_drafts``: a node's children are the top tokens of the head at its depth given the
    path to it (root, then each ancestor's token), the path the heads read in training (and, reading
    lookup, each depth's copy bonus and copy column as training adds them)."""
    from cerberus_decoding.tree import DEFAULT_TREE, build_tree

    heads = random_heads(
        lm_f32, "cerberus", seed=6, scale=0.1, root_token=True, reads_drafts=True, reads_lookup=reads_lookup
    )
    tree = build_tree(DEFAULT_TREE)
    h, root = torch.randn(576, generator=torch.Generator().manual_seed(1)), torch.tensor([42])
    found = None
    if reads_lookup:  # (n, t_1 .. t_4); a reduced vocabulary, so that t_1 and t_3 are copies from outside it
        heads.set_vocab(torch.arange(2000), lm_f32.model.get_output_embeddings().weight)
        heads.lookup_bonus.bias.data.view(4, -1)[:, 3] = 100.0  # trusted: each copy is its head's top token
        found = torch.tensor([3, 5000, 901, 6000, 903])
    tokens, confidence = heads.draft(h, root, tree, lookup=found)  # [N+1], [N+1]
    assert tokens[0] == 42 and tokens.shape == (tree.size,)
    assert confidence[0] == 1 and ((confidence >= 0) & (confidence <= 1)).all()
    for node in range(1, tree.size):
        ancestors = tree.mask[node, :node].nonzero().flatten().tolist()  # the root, ..., the parent
        path = torch.zeros(4, dtype=torch.long)
        path[: len(ancestors)] = tokens[ancestors]
        d = len(ancestors) - 1  # the head that drafts this node
        inputs = path if found is None else torch.cat([path, found])
        lookup = None if found is None else found[None]
        logits = heads(h, inputs)[None, d : d + 1].float()  # [1, 1, V' (+ 1)]
        ranked = heads.token_ids(logits.topk(tree.top_k).indices, lookup, first=d)[0, 0]
        rank = tree.choices[node - 1][-1]
        assert tokens[node] == ranked[rank], node
        # its confidence: its parent's times this head's probability of its token
        p = logits.softmax(-1)[0, 0].topk(tree.top_k).values[rank]
        assert torch.allclose(confidence[node], confidence[ancestors[-1]] * p, rtol=1e-4), node
    if reads_lookup:
        choices = [tuple(c) for c in tree.choices]
        top_path = [int(tokens[choices.index((0,) * d) + 1]) for d in range(1, 5) if (0,) * d in choices]
        assert len(top_path) >= 2 and top_path == [5000, 901, 6000, 903][: len(top_path)]  # copies, in or out
        return
    a, b = heads(h, torch.tensor([42, 7, 0, 0])), heads(h, torch.tensor([42, 900, 0, 0]))
    torch.testing.assert_close(a[0], b[0])  # head 1 reads the root only
    assert not torch.allclose(a[1], b[1])  # head 2 reads the token head 1 drafted


def test_reads_drafts_needs_root_token_heads(lm_f32):
    with pytest.raises(CerberusError, match="reads_drafts needs root_token"):
        new_heads(lm_f32, "cerberus", reads_drafts=True)


def test_heads_that_read_drafts_decode_losslessly(tiny_lm):
    from cerberus_decoding.engine import Decoder, SamplingConfig
    from cerberus_decoding.tree import DEFAULT_TREE, build_tree

    from .conftest import assert_lossless

    heads = random_heads(tiny_lm, "cerberus", seed=4, scale=0.5, root_token=True, reads_drafts=True)
    ids = [1, 5, 9, 14, 3, 7]
    reference = Decoder(tiny_lm).generate(ids, SamplingConfig(max_new_tokens=40)).token_ids
    result = Decoder(tiny_lm, heads, build_tree(DEFAULT_TREE)).generate(ids, SamplingConfig(max_new_tokens=40))
    assert result.speculative_steps > 0
    assert_lossless(tiny_lm, ids, reference, result.token_ids)


def test_reads_lookup_needs_root_token_heads(lm_f32):
    with pytest.raises(CerberusError, match="reads_lookup needs root_token"):
        new_heads(lm_f32, "cerberus", reads_lookup=True)


def test_heads_that_read_lookup_start_as_heads_that_do_not_and_then_read_it(lm_f32):
    """Untrained, the lookup weights are zero: the heads draft what the same heads without them draft.
    Trained (here: random), head 1's logits depend on the token lookup found and on the n-gram's length,
    and head k's copy bonus reads lookup's k-th token, only that one."""
    plain = random_heads(lm_f32, "cerberus", seed=3, scale=0.1, root_token=True)
    reading = new_heads(lm_f32, "cerberus", root_token=True, reads_lookup=True)
    reading.load_state_dict(plain.state_dict(), strict=False)
    h, root = torch.randn(576, generator=torch.Generator().manual_seed(2)), torch.tensor([42])
    found = torch.tensor([2, 900, 901, 902, 903])  # (n, t_1 .. t_4): one token per head
    assert reading.config.lookup_tokens == 4
    assert torch.equal(reading.topk(h, 3, root, lookup=found)[0], plain.topk(h, 3, root)[0])
    with pytest.raises(CerberusError, match="prompt lookup"):
        reading.topk(h, 3, root)[0]  # the engine must pass what lookup found
    heads = random_heads(lm_f32, "cerberus", seed=3, scale=0.1, root_token=True, reads_lookup=True)
    a, b, c = (heads(h, torch.tensor([42, n, t, 901, 902, 903])) for n, t in ((2, 900), (2, 7), (1, 900)))
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[0], c[0])
    third = heads(h, torch.tensor([42, 2, 900, 901, 7, 903]))  # another third token: head 3 alone changes
    assert not torch.allclose(a[2], third[2])
    torch.testing.assert_close(a[[0, 1, 3]], third[[0, 1, 3]], rtol=0, atol=0)
    assert a[2].argmax() != third[2].argmax() or a[2, 902] != third[2, 902]  # the bonus sits on the token read
    none = heads(h, torch.tensor([42, 0, -1, -1, -1, -1]))  # no match: the tokens are not read
    torch.testing.assert_close(none, heads(h, torch.tensor([42, 0, 5, 6, 7, 8])))


@pytest.mark.parametrize("reads_drafts", [False, True])
def test_heads_that_read_lookup_decode_losslessly_and_read_what_training_reads(tiny_lm, reads_drafts):
    """The engine keeps its n-gram index in step with the context (prompt, then every accepted token),
    so at each root the heads read ``lookup_matches`` of the answer so far: what they were trained on."""
    from cerberus_decoding.engine import Decoder, SamplingConfig
    from cerberus_decoding.lookup import lookup_matches
    from cerberus_decoding.tree import DEFAULT_TREE, build_tree

    from .conftest import assert_lossless

    heads = random_heads(
        tiny_lm, "cerberus", seed=4, scale=0.5, root_token=True, reads_drafts=reads_drafts, reads_lookup=True
    )
    ids = [1, 5, 9, 14, 3, 7, 5, 9, 14, 3]  # repeats: lookup finds n-grams from the first step
    reference = Decoder(tiny_lm).generate(ids, SamplingConfig(max_new_tokens=40)).token_ids
    decoder = Decoder(tiny_lm, heads, build_tree(DEFAULT_TREE))
    seen = []  # (answer position of the root, what the heads read there)
    draft = heads.draft

    def spy(h, root, tree, graphs=False, lookup=None):
        seen.append((len(decoder.cached_ids) - len(ids), tuple(lookup.tolist())))
        return draft(h, root, tree, graphs, lookup)

    heads.draft = spy
    result = decoder.generate(ids, SamplingConfig(max_new_tokens=40))
    assert result.speculative_steps > 0
    assert_lossless(tiny_lm, ids, reference, result.token_ids)
    expected = lookup_matches(ids, result.token_ids, heads.config.lookup_tokens, heads.config.lookup_max_ngram)
    assert [list(found) for _, found in seen] == [expected[t] for t, _ in seen]
    assert all(len(found) == 1 + heads.config.num_heads for _, found in seen)
    assert any(found[0] > 0 for _, found in seen)


def test_heads_draft_copies_from_outside_their_vocabulary_losslessly(tiny_lm):
    """A copy lookup found outside the head vocabulary gets the copy column (its base LM-head logit
    plus the bonus), so heads draft rare copied tokens too: ``columns`` and ``token_ids`` map it both
    ways, and decoding that drafts such copies still gives the model's own greedy tokens."""
    from cerberus_decoding.engine import Decoder, SamplingConfig
    from cerberus_decoding.tree import DEFAULT_TREE, build_tree

    from .conftest import assert_lossless

    heads = random_heads(tiny_lm, "cerberus", seed=4, scale=0.5, root_token=True, reads_lookup=True)
    ids = [1, 300, 301, 302, 5, 1, 300, 301, 302, 5]
    reference = Decoder(tiny_lm).generate(ids, SamplingConfig(max_new_tokens=40)).token_ids
    copyable = sorted(set(ids) | set(reference))  # left out of the head vocabulary: every copy is from outside
    vocab = torch.tensor([t for t in range(heads.config.vocab_size) if t not in copyable])
    heads.set_vocab(vocab, tiny_lm.model.get_output_embeddings().weight)
    heads.lookup_bonus.bias.data.view(heads.config.lookup_tokens, -1)[:, 1:] = 50.0  # every match trusted
    out, other, inside = copyable[0], copyable[1], int(vocab[3])
    found = torch.tensor([2, out, inside, out, -1])  # head 4 reads none (past the chain)
    cols = heads.columns(torch.tensor([out, inside, other, out]), found)
    assert cols.tolist() == [len(vocab), 3, -1, -1]  # the copy column; in the vocabulary; not the copy; none read
    assert heads.token_ids(cols[:2, None], found).flatten().tolist() == [out, inside]
    top = heads.topk(torch.zeros(heads.config.hidden_size), 2, torch.tensor([5]), lookup=found)[0]
    assert top[:3, 0].tolist() == [out, inside, out]
    decoder = Decoder(tiny_lm, heads, build_tree(DEFAULT_TREE))
    drafted, draft = [], heads.draft

    def spy(*args, **kwargs):
        drafted.append(draft(*args, **kwargs))
        return drafted[-1]

    heads.draft = spy
    result = decoder.generate(ids, SamplingConfig(max_new_tokens=40))
    assert_lossless(tiny_lm, ids, reference, result.token_ids)
    assert any(bool(torch.isin(tokens[1:], torch.tensor(copyable)).any()) for tokens, _ in drafted)  # copies drafted


def test_heads_that_read_lookup_pack_what_reads_it_too(lm_f32):
    """pack_for packs the lookup token's matmul like the blocks' (a bfloat16 matmul of one row costs a
    CPU step ~0.1 ms), and the packed copy is what runs; the logits stay within 8-bit rounding."""
    heads = random_heads(lm_f32, "cerberus", seed=7, scale=0.05, root_token=True, reads_lookup=True)
    heads = heads.to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    inputs = torch.tensor([7, 3, 900, 901, 902, 903])  # root, then lookup's (n, t_1 .. t_4)
    unpacked = heads(h, inputs).float()  # [K, V']
    heads.pack_for("w4a8")
    assert heads.packed_lookup_token.fmt == ("w8a8" if w4a8_available() else "int8")
    heads.lookup_token.weight.zero_()  # the packed copy must be what runs
    packed = heads(h, inputs).float()
    torch.testing.assert_close(packed, unpacked, atol=0.05 * float(unpacked.abs().max()), rtol=0)
    assert not torch.allclose(packed, heads(h, torch.tensor([7, 3, 5, 901, 902, 903])).float())  # it reads t_1


@pytest.mark.parametrize("kind", ["cerberus", "medusa"])
def test_kernel_draft_breaks_ties_as_torch_topk_does(lm_f32, kind):
    """Exact ties at the top of a head's logits (equal LM-head rows): each head drafts the first tied
    column, and the kernel's draft picks the tokens torch.topk picks, for one token a head (its own
    first-maximum scan) and for two to eight (its heap skips blocks no larger than the heap's top),
    also where the LM-head rows sit on a coarse grid and ties fill every head's top k. Where the w4a8
    kernels are not built, the Python draft (the one that runs there) is held to the first rule and
    w4a8 packing is refused."""
    from cerberus_decoding.runtime import cpu_kernels

    heads = random_heads(lm_f32, kind, seed=8, scale=0.1).to(torch.bfloat16).requires_grad_(False)
    heads.shared_weight.zero_()
    heads.shared_weight[[3, 7]] = 0.5  # logits z . 0.5: a tie at the top, or one among the zeros below
    heads.shared_weight[[11, 13]] = -0.5  # ... and the other sign: the top is a tie either way
    kernels = cpu_kernels.load()
    built = kernels is not None and w4a8_available()
    if built:
        heads.pack_for("w4a8")
        assert heads.kernel_draft is not None
    else:
        with pytest.raises(CerberusError, match="use --weights int4"):
            heads.pack_for("w4a8")
    g = torch.Generator().manual_seed(2)
    ks = (1, 2, 3, 8)
    for trial in range(12):
        if trial == 6:  # LM-head rows on a coarse grid: ties everywhere, in and below every head's top k
            heads.shared_weight.copy_(torch.randint(-2, 3, heads.shared_weight.shape, generator=g) * 0.25)
            if built:
                heads.pack_for("w4a8")
        h, root = torch.randn(576, generator=g).to(torch.bfloat16), torch.randint(0, 49152, (1,), generator=g)
        kernel = heads.kernel_draft
        heads.kernel_draft = None  # the Python ops: torch.topk
        slow = [heads.topk(h, k, root)[0] for k in ks]
        heads.kernel_draft = kernel
        if trial < 6:
            assert set(slow[0][:, 0].tolist()) <= {0, 3, 11}, trial  # each head's first tied column
        if built:
            fast = [heads.topk(h, k, root)[0] for k in ks]
            assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True)), trial


@pytest.mark.parametrize("fmt", ["w4a8", "int4"])
@pytest.mark.parametrize("kind", ["cerberus-lookup", "cerberus", "medusa"])
def test_kernel_draft_drafts_the_tokens_the_python_ops_draft(lm_f32, fmt, kind):
    """Packed for a quantized model, heads draft one position with the CPU kernels' ``draft_topk``
    (one op instead of ~60): bitwise the same ops, so the same tokens as the Python path, at every
    head count and rank, with and without a lookup match, copies from outside the vocabulary included."""
    from cerberus_decoding.runtime import cpu_kernels
    from cerberus_decoding.tree import DEFAULT_TREE, build_tree

    reads_lookup = kind == "cerberus-lookup"
    extra = {"root_token": True, "reads_lookup": reads_lookup} if kind != "medusa" else {}
    heads = random_heads(lm_f32, kind.split("-")[0], seed=8, scale=0.1, **extra)
    if reads_lookup:  # a reduced vocabulary (copies from outside it), and matches trusted or distrusted by a lot
        heads.set_vocab(torch.arange(0, 49152, 6), lm_f32.model.get_output_embeddings().weight)
        heads.lookup_bonus.bias.data.normal_(0, 20, generator=torch.Generator().manual_seed(0))
    heads = heads.to(torch.bfloat16).requires_grad_(False)
    kernels = cpu_kernels.load()
    if kernels is None or not (w4a8_available() if fmt == "w4a8" else kernels.quantized_matmuls()):
        # where our kernels do not run the format: w4a8 is refused (it has no other kernel), and int4's
        # heads (int8, torch's kernel) draft from Python
        if fmt == "w4a8":
            with pytest.raises(CerberusError, match="use --weights int4"):
                heads.pack_for(fmt)
            return
        heads.pack_for(fmt)
        assert heads.kernel_draft is None
        h, lookup = torch.zeros(576, dtype=torch.bfloat16), torch.tensor([2, 12, 13, 600, 7]) if reads_lookup else None
        assert heads.topk(h, 3, torch.tensor([5]), lookup=lookup)[0].shape == (4, 3)
        return
    heads.pack_for(fmt)
    assert heads.kernel_draft is not None
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        h = torch.randn(576, generator=g).to(torch.bfloat16)
        root = torch.randint(0, 49152, (1,), generator=g)
        n = trial % 4 * 2  # 0: no match
        found = torch.tensor([n, 12, 13, 600, 7]) if n else torch.tensor([0, -1, -1, -1, -1])  # 13, 7: outside
        lookup = found if reads_lookup else None
        kernel = heads.kernel_draft
        fast = [heads.topk(h, k, root, n_heads, lookup=lookup) for n_heads in (1, 2, 4) for k in (1, 3)]
        fast_tree = heads.draft(h, root, build_tree(DEFAULT_TREE), lookup=lookup)
        heads.kernel_draft = None  # the Python ops
        slow = [heads.topk(h, k, root, n_heads, lookup=lookup) for n_heads in (1, 2, 4) for k in (1, 3)]
        slow_tree = heads.draft(h, root, build_tree(DEFAULT_TREE), lookup=lookup)
        heads.kernel_draft = kernel
        assert all(torch.equal(a[0], b[0]) for a, b in zip(fast, slow, strict=True)), trial
        assert torch.equal(fast_tree[0], slow_tree[0])
        # the probabilities: each head's softmax (its own summation order, so to rounding)
        assert all(torch.allclose(a[1], b[1], rtol=1e-4, atol=1e-7) for a, b in zip(fast, slow, strict=True)), trial
        assert torch.allclose(fast_tree[1], slow_tree[1], rtol=1e-4, atol=1e-7)
    if reads_lookup:
        with pytest.raises(CerberusError, match="pass it"):
            heads.topk(h, 1, root)[0]
