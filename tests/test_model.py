"""model.py and generate.py: shapes, initial loss, generation with and without the KV cache, and every variant."""

import copy
import math

import pytest
import torch

from generate import (
    Engine,
    KVCache,
    Sequence,
    compile_decode,
    generate,
    generate_uncached,
    prefill,
    sample_next,
    step,
)
from model import GPT, PRESETS, GPTConfig, apply_rope, config_from_preset, manual_attention, rope_tables, sdpa_attention

TINY = dict(vocab_size=67, block_size=24, n_layer=2, n_head=4, n_embd=32)
VARIANTS = [dict(model_type=p) for p in PRESETS] + [
    dict(model_type="gpt", n_kv_head=2, qk_norm=True),
    dict(model_type="gpt_plus", n_kv_head=1, logit_softcap=15.0, tie_weights=False),
    dict(model_type="gpt_fast", attn_impl="manual", norm="layernorm", bias=True),
    dict(model_type="gpt", mlp="relu2", pos_emb="rope", norm_affine=False, grad_checkpoint=True),
    dict(model_type="gpt_fast", ngram_emb=3, ngram_rows=101),
    dict(model_type="gpt_plus", mlp="geglu_tanh", post_norm=True, scale_emb=True, qkv_bias=True, qk_norm=True,
         window=8, window_pattern="SL", rope_local_theta=100.0, attn_scale=0.2, grad_checkpoint=True),
]


def build(variant, seed=0, **extra):
    torch.manual_seed(seed)
    v = dict(variant)
    return GPT(config_from_preset(v.pop("model_type"), **TINY, **v, **extra))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_the_chunked_loss_equals_the_logits_loss(variant, monkeypatch):
    """return_logits=False (train.py's loss, crossentropy.py: never the whole (B, T, vocab) logits) gives the loss
    and every gradient of F.cross_entropy over the logits to 1e-5 in float32: several chunks, ignored targets, label
    smoothing, and the softcap of the variants that have one."""
    import crossentropy
    monkeypatch.setattr(crossentropy, "CHUNK_BYTES", 4 * TINY["vocab_size"] * 7)  # 7 tokens a chunk
    model = build(variant)
    x = torch.randint(0, TINY["vocab_size"], (3, 20))
    y = torch.roll(x, -1, 1)
    y[0, :5] = -1
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss = model(x, y, label_smoothing=0.1, return_logits=return_logits)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert logits is None and abs(a - b) < 1e-5
    assert all((grads_a[n] - grads_b[n]).abs().max() < 1e-5 for n in grads_a)
    assert max(g.abs().max() for g in grads_a.values()) > 1e-3  # (the gradients are not all zero)


def test_int8_weights_keep_the_model_and_sample(trained):
    """--quantize=int8 (quantize.py): every matrix int8 with a scale per row, the loss of the float model to 5e-3, its
    logits to 1% of their range on average and its likeliest token nearly everywhere, and sample.py decodes with it
    (greedy: its text, which may part from the float model's where two tokens are close)."""
    from conftest import greedy_text, load, run
    from quantize import Int8Linear, for_decoding
    model, _ = load(str(trained / "out-tiny"))
    seeded = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (4, model.config.block_size), generator=seeded)
    with torch.no_grad():
        logits, loss = model(x, x)
        q = for_decoding(model, "int8")
        q_logits, q_loss = q(x, x)
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1 and all(m.weight.dtype == torch.int8 for m in linears)
    assert abs(q_loss - loss) < 5e-3 and (q_logits - logits).abs().mean() < 0.01 * (logits.max() - logits.min())
    assert (q_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.9  # the likeliest token, nearly everywhere
    out = run("sample.py", "--out_dir=out-tiny", "--quantize=int8", "--temperature=0", "--max_new_tokens=30",
              "--prompt=The ", cwd=trained).stdout
    assert out == greedy_text(trained / "out-tiny", "The ", 30, quantize="int8") and len(out) == len("The ") + 31


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_shapes_and_initial_loss(variant):
    """The logits have the right shape and an untrained model is close to uniform: loss ~ ln(vocab)."""
    model = build(variant)
    x, y = torch.randint(0, 67, (3, 24)), torch.randint(0, 67, (3, 24))
    logits, loss = model(x, y)
    assert logits.shape == (3, 24, 67) and torch.isfinite(loss)
    assert abs(loss.item() - math.log(67)) < 0.3
    logits, loss = model(x)
    assert logits.shape == (3, 1, 67) and loss is None


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_a_model_built_on_the_meta_device_gets_the_weights_of_one_built_in_memory(variant):
    """parallel.shard's way (no memory until sharded, then init_weights): the same weights, tables and tie as a
    model built in memory from the same seed; and GPT-2's init: std 0.02, residual projections 0.02/sqrt(2*n_layer),
    zero biases, unit norm scales."""
    model = build(variant)
    with torch.device("meta"):
        empty = build(variant)
    assert empty.lm_head.weight.is_meta and empty.rope_cos is None
    empty.to_empty(device="cpu")
    empty.init_weights()
    for name, p in model.named_parameters():
        assert torch.equal(p, empty.get_parameter(name)), name
        std = 0.02 / math.sqrt(2 * 2) if name.endswith("c_proj.weight") else 0.02
        if p.dim() == 2 and p.numel() > 1000:
            assert abs(p.std().item() - std) < 0.15 * std, name
        elif p.dim() == 1:
            assert torch.equal(p, torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p)), name
    assert all(torch.equal(getattr(model, b), getattr(empty, b)) for b in ("rope_cos", "rope_sin", "rope_index"))
    assert (empty.lm_head.weight is empty.transformer.wte.weight) == model.config.tie_weights


def test_a_frozen_head_gets_no_gradient_and_the_rest_the_gradients_of_the_logits_loss(monkeypatch):
    """LoRA's frozen head: the chunked loss computes no (vocab, C) gradient for it (nor keeps one), and the hidden
    states' gradients are those of F.cross_entropy over the logits."""
    import crossentropy
    monkeypatch.setattr(crossentropy, "CHUNK_BYTES", 4 * TINY["vocab_size"] * 7)
    model = build(dict(model_type="gpt_plus", tie_weights=False))
    model.lm_head.weight.requires_grad_(False)
    x = torch.randint(0, TINY["vocab_size"], (2, 20))
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        model(x, torch.roll(x, -1, 1), return_logits=return_logits)[1].backward()
        assert model.lm_head.weight.grad is None
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all((grads[0][n] - grads[1][n]).abs().max() < 1e-5 for n in grads[0])


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=str)
def test_a_model_on_the_meta_device_adopts_its_weights_without_a_copy(variant):
    """warmstart.adopt (every script's load, train.py's warm start): the model's parameters are the given tensors
    themselves, tied where the config ties, with the rotary tables, computing the original's logits."""
    from warmstart import adopt
    model = build(variant)
    clones = {}  # (a tied head and embedding: one tensor)
    weights = {k: clones.setdefault(v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        empty = build(variant)
    adopt(empty, weights, "cpu")
    assert all(p.data_ptr() == weights[n].data_ptr() for n, p in empty.named_parameters())
    assert (empty.lm_head.weight is empty.transformer.wte.weight) == model.config.tie_weights
    x = torch.randint(0, TINY["vocab_size"], (2, 12))
    assert torch.equal(model(x, x)[0], empty(x, x)[0])


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_one_step_changes_every_parameter(variant):
    model = build(variant)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, loss = model(torch.randint(0, 67, (2, 24)), torch.randint(0, 67, (2, 24)))
    loss.backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_kv_cached_greedy_generation_equals_uncached(variant):
    model = build(variant)
    prompt = torch.randint(0, 67, (2, 5))
    cached = generate(model, prompt, 19, temperature=0)
    uncached = generate_uncached(model, prompt, 19, temperature=0)  # nanoGPT's loop: the whole context every token
    assert [len(row) for row in cached] == [19, 19] and cached == uncached


def test_generation_past_block_size_slides_the_window():
    model = build(VARIANTS[0])
    out = generate(model, torch.zeros(1, 3, dtype=torch.long), 60, temperature=1.0, top_k=10, top_p=0.9)[0]
    assert len(out) == 60 and max(out) < 67


def test_sampling_options():
    """Seeds reproduce; top_k=1 and a tiny top_p are greedy; generation stops at EOS."""
    model = build(VARIANTS[0])
    prompt = torch.randint(0, 67, (1, 4))
    gen = lambda s, **kw: generate(model, prompt, 15, generator=torch.Generator().manual_seed(s), **kw)
    assert gen(1) == gen(1) and gen(1) != gen(2)
    greedy = generate(model, prompt, 15, temperature=0)
    assert gen(3, top_k=1) == greedy and gen(4, top_p=1e-6) == greedy
    eos = greedy[0][2]
    stopped = generate(model, prompt, 15, temperature=0, stop_ids=[eos])
    assert stopped[0] == greedy[0][:greedy[0].index(eos) + 1]  # up to its first stop id, kept


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_sdpa_equals_manual_attention(n_kv_head):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8)
    k, v = torch.randn(2, n_kv_head, 10, 8), torch.randn(2, n_kv_head, 10, 8)
    assert torch.allclose(sdpa_attention(q, k, v, None, 0.0), manual_attention(q, k, v, None, 0.0), atol=1e-5)
    mask = torch.ones(3, 10, dtype=torch.bool).tril(diagonal=7)  # 3 new queries after 7 cached keys
    assert torch.allclose(sdpa_attention(q[:, :, 7:], k, v, mask, 0.0), manual_attention(q[:, :, 7:], k, v, mask, 0.0),
                          atol=1e-5)
    rows = torch.tensor([[True] * 6 + [False] * 4, [True] * 10])[:, None, None]  # a KV cache's (B, 1, 1, Tk): one query
    one = q[:, :, :1]
    assert torch.allclose(sdpa_attention(one, k, v, rows, 0.0), manual_attention(one, k, v, rows, 0.0), atol=1e-5)


def test_whole_model_sdpa_equals_manual():
    sdpa = build(dict(model_type="gpt_plus", n_kv_head=2))
    manual = build(dict(model_type="gpt_plus", n_kv_head=2, attn_impl="manual"))
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 67, (2, 24))
    assert torch.allclose(sdpa(x, x)[0], manual(x, x)[0], atol=1e-5)


def test_full_kv_heads_is_plain_multi_head():
    """n_kv_head == n_head is ordinary multi-head attention: torch's nn.MultiheadAttention with the same
    weights gives the same output."""
    model = build(dict(model_type="gpt", n_kv_head=4))
    attn = model.transformer.h[0].attn
    mha = torch.nn.MultiheadAttention(32, 4, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.c_attn.weight)
        mha.in_proj_bias.copy_(attn.c_attn.bias)
        mha.out_proj.weight.copy_(attn.c_proj.weight)
        mha.out_proj.bias.copy_(attn.c_proj.bias)
    x = torch.randn(2, 10, 32)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True = masked
    expected, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    assert torch.allclose(attn(x, [(model.rope_cos, model.rope_sin, None)]), expected, atol=1e-5)


def test_sliding_window_sees_only_its_window_in_training_and_in_the_kv_cache():
    """One windowed layer: the last logits ignore a token `window` or more positions back (and see one inside it);
    decoding token by token through the KV cache, past the window, gives the full forward's logits; a window as
    long as the block is full attention."""
    one = dict(TINY, n_layer=1)
    make = lambda **f: GPT(config_from_preset("gpt_plus", **one, **f))
    torch.manual_seed(0)
    model = make(window=4)
    x = torch.randint(0, 20, (1, 12))
    moved = lambda i: x.index_put((torch.tensor([0]), torch.tensor([i])), (x[0, i] + 1) % 20)
    with torch.no_grad():
        last = model(x)[0]
        assert torch.equal(model(moved(7))[0], last)  # 11 - 7 = 4: outside the window
        assert not torch.allclose(model(moved(8))[0], last)  # 3 back: inside
        full = model(x, x)[0]
        cache = KVCache(model.config, 1, "cpu")
        steps = torch.cat([model(x[:, t:t + 1], cache=cache)[0] for t in range(12)], dim=1)
        assert torch.allclose(steps, full, atol=1e-5)
        wide = make(window=24, window_pattern="SL")
        wide.load_state_dict(model.state_dict())
        plain = make()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(wide(x, x)[0], plain(x, x)[0], atol=1e-6)


def test_mqa_cache_is_n_head_times_smaller():
    sizes = {}
    for kv in (4, 1):
        model = build(dict(model_type="gpt", n_kv_head=kv))
        cache = KVCache(model.config, 1, "cpu")
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
        sizes[kv] = cache.nbytes()
    assert sizes[4] == 4 * sizes[1]


def test_rope_is_relative():
    """Shifting the positions of q and k together leaves their dot products unchanged."""
    cos, sin = rope_tables(8, 40, 10000.0)
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    rotate = lambda x, s: apply_rope(x, cos[s:s + 5], sin[s:s + 5])
    scores = lambda s: rotate(q, s) @ rotate(k, s).transpose(-1, -2)
    assert torch.allclose(scores(0), scores(17), atol=1e-5)
    assert not torch.allclose(apply_rope(q, cos[:5], sin[:5]), apply_rope(q, cos[17:22], sin[17:22]))


def test_ngram_ids_are_exact_bigrams_and_hashed_longer_grams():
    """Bigram ids are token + V * (previous + 1), distinct for every pair while V * (V + 1) <= ngram_rows;
    before the start the previous token is -1; longer n-grams add the earlier tokens and wrap at ngram_rows."""
    model = build(VARIANTS[0], ngram_emb=3, ngram_rows=10**6)
    idx = torch.tensor([[5, 7, 9]])
    bigram, trigram = model.ngram_ids(idx, torch.full((1, 2), -1))
    V = 67
    assert bigram.tolist() == [[5, 7 + V * 6, 9 + V * 8]]
    assert trigram.tolist() == [[5, 7 + V * 6, 9 + V * 8 + V * (V + 1) * 6]]
    prev = torch.arange(-1, V).repeat_interleave(V)[:, None]  # every (previous, token) pair, "before the start" too
    bigrams = model.ngram_ids(torch.arange(V).repeat(V + 1)[:, None], torch.cat([prev, prev], dim=1))[0]  # ((V+1)*V, 1)
    assert bigrams.unique().numel() == (V + 1) * V
    small = build(VARIANTS[0], ngram_emb=3, ngram_rows=97)
    assert all(ids.max() < 97 for ids in small.ngram_ids(torch.randint(0, V, (4, 24)), torch.full((4, 2), -1)))


def test_ngram_history_carries_across_cached_chunks():
    """With a KV cache, a chunk's first tokens take their n-gram context from the previous chunk, so
    prefill-then-step gives the logits of one full forward pass."""
    model = build(dict(model_type="gpt_fast", ngram_emb=4, ngram_rows=211)).eval()
    idx = torch.randint(0, 67, (2, 12))
    full, _ = model(idx, idx)  # (2, 12, 67): logits at every position
    cache = KVCache(model.config, 2, "cpu")
    step, _ = model(idx[:, :5], cache=cache)
    for t in range(5, 12):
        step, _ = model(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(step[:, -1], full[:, t], rtol=1e-4, atol=1e-4)
    assert cache.history.tolist() == idx[:, -3:].tolist()


def test_nanogpt_parameter_names():
    names = set(build(VARIANTS[0]).state_dict())
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight",
              "transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.bias",
              "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight",
              "lm_head.weight"]:
        assert n in names, n


@pytest.mark.parametrize("bad,word", [(dict(n_head=5), "n_head"), (dict(n_kv_head=3), "n_kv_head"),
                                      (dict(norm="batchnorm"), "norm"), (dict(mlp="tanh"), "mlp"),
                                      (dict(pos_emb="alibi"), "pos_emb"), (dict(dropout=1.5), "dropout"),
                                      (dict(ngram_emb=1), "ngram_emb"),
                                      (dict(ngram_emb=6, vocab_size=50304), "ngram_emb")])
def test_bad_config_names_the_field(bad, word):
    with pytest.raises(ValueError, match=word):
        GPTConfig(**{**TINY, **bad})
    with pytest.raises(ValueError, match="model_type"):
        config_from_preset("gpt_huge")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_static_cache_decode_equals_a_full_forward_at_every_step(variant):
    """Prefill, then one token at a time through the fixed-shape cache (and again after the context slides, from
    a fresh half-block prefill): each step's logits are those of a full forward over the same tokens."""
    model = build(variant).eval()
    L = model.config.block_size
    idx = torch.randint(0, 67, (2, L + L // 2))
    with torch.no_grad():
        for begin in (0, L // 2):  # the first window, then the slid one
            cache = KVCache(model.config, 2, "cpu")
            step(model, idx[:, begin:begin + 4], cache)
            for t in range(begin + 4, begin + L):
                logits = step(model, idx[:, t:t + 1], cache)
                full, _ = model(idx[:, begin:t + 1], idx[:, begin:t + 1])
                torch.testing.assert_close(logits, full[:, -1], rtol=1e-4, atol=1e-4)


def test_batched_greedy_equals_separate_runs_and_eos_stops_only_its_row():
    model = build(dict(model_type="gpt_plus", n_kv_head=2, ngram_emb=3)).eval()
    prompts = torch.randint(0, 67, (3, 4))
    batched = generate(model, prompts, 40, temperature=0)
    for i in range(3):
        assert batched[i] == generate(model, prompts[i:i + 1], 40, temperature=0)[0]
    eos = batched[0][2]  # row 0 says it early; the others go on to the end (or to their own eos)
    stopped = generate(model, prompts, 40, temperature=0, stop_ids=[eos])
    assert stopped[0] == batched[0][:batched[0].index(eos) + 1]
    assert [row[:len(s)] for row, s in zip(batched, stopped, strict=True)] == stopped and max(map(len, stopped)) > 3


def test_sampling_controls_on_hand_made_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    seen = torch.tensor([[0, 3]])
    penalised = sample_next(logits, temperature=0, repetition_penalty=4.0, seen=seen)
    assert penalised.item() == 1  # token 0's 2.0 became 0.5, below token 1's 1.0 (token 3's -1 became -4)
    ban = sample_next(logits, temperature=0, no_repeat_ngram_size=2, seen=torch.tensor([[2, 0, 2]]))
    assert ban.item() == 1  # "2 0" was seen and the text ends in 2: token 0 (the likeliest) would repeat it
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, min_p=0.3, generator=gen).item() for _ in range(200)}
    assert draws == {0, 1}  # p(1)/p(0) = e^-1 = 0.37 >= 0.3; p(2)/p(0) = 0.14 < 0.3
    unigram = sample_next(logits, temperature=0, no_repeat_ngram_size=1, seen=torch.tensor([[0, 1]]))
    assert unigram.item() == 2  # n=1 bans every token already in the text


def test_compiled_decode_gives_the_eager_greedy_tokens():
    """The compiled step (C++ wrapper; attention in explicit form over grouped query heads) on the decoding layout
    (quantize.py: the wider-out matrices stored transposed) gives the greedy tokens of the eager step on the model as
    built, past block_size (the cache full, then refilled) with two graphs, no more; the layout keeps every value, the
    tie and the shapes."""
    from quantize import for_decoding
    model = build(dict(model_type="gpt_fast", n_kv_head=2)).eval()  # grouped-query attention in the compiled form
    prompt = torch.randint(0, 67, (2, 5))
    eager = generate(model, prompt, 30, temperature=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_decoding(model, "")
    head = fast.lm_head.weight
    assert head.stride() == (1, head.size(0)) and fast.transformer.wte.weight is head  # (in, out) in memory, tied
    for m in fast.modules():
        if isinstance(m, torch.nn.Linear):  # wider out than in: (in, out) in memory; the others as built
            assert m.weight.stride() == ((1, m.out_features) if m.out_features > m.in_features else (m.in_features, 1))
    assert all(torch.equal(v, before[k]) for k, v in fast.state_dict().items())
    assert generate(fast, prompt, 30, temperature=0) == eager
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        assert generate(fast, prompt, 30, temperature=0, decode=compile_decode(fast)) == eager


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[1], VARIANTS[-1]], ids=str)
def test_prompts_of_different_lengths_share_a_batch_and_give_their_alone_tokens(variant):
    """The cache keeps a position per row: prompts of lengths 1, 7 and 30 (past block_size 24, so rows slide at
    different steps) decode in one batch, and each row's greedy tokens are those it gives alone."""
    model = build(variant).eval()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 67, (n,)).tolist() for n in (1, 7, 30)]
    batched = generate(model, prompts, 40, temperature=0)  # one engine, a row each
    for i, p in enumerate(prompts):
        assert batched[i] == generate(model, [p], 40, temperature=0)[0], i


def test_a_row_is_reset_and_refilled_while_the_others_go_on():
    """Continuous batching's move: row 1 is emptied and refilled with a new prompt mid-way; row 0's next logits are
    those of an uninterrupted run, row 1's those of the new prompt alone."""
    model = build(dict(model_type="gpt_plus", n_kv_head=2, ngram_emb=3)).eval()
    a, b, new = torch.randint(0, 67, (9,)), torch.randint(0, 67, (5,)), torch.randint(0, 67, (6,))
    with torch.no_grad():
        cache = KVCache(model.config, 2, "cpu")
        prefill(model, cache, 0, a[:-1])
        prefill(model, cache, 1, b[:-1])
        step(model, torch.stack([a[-1:], b[-1:]]), cache)
        prefill(model, cache, 1, new[:-1])  # row 1 starts over; row 0 keeps its 9 tokens
        nxt = torch.tensor([[3], [new[-1].item()]])
        logits = step(model, nxt, cache)
        torch.testing.assert_close(logits[0], model(torch.cat([a, nxt[0]])[None])[0][0, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[1], model(new[None])[0][0, -1], rtol=1e-4, atol=1e-4)
    assert cache.pos.tolist() == [10, 6]


def test_padding_in_seen_changes_no_sampling_control():
    """A shorter row's -1 padding is not a token: the repetition penalty and the n-gram ban ignore it."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    for controls in (dict(repetition_penalty=4.0), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3)):
        for seen in ([[2, 0, 2]], [[0, 3]], [[1]]):
            plain = sample_next(logits, temperature=0, seen=torch.tensor(seen), **controls)
            pad = sample_next(logits, temperature=0, seen=torch.tensor([[-1, -1] + seen[0]]), **controls)
            assert plain.item() == pad.item(), (controls, seen)


def test_sequences_joining_a_running_engine_get_their_alone_tokens():
    """Continuous batching as the server drives it: four sequences on two rows, each admitted when a row frees (its
    row reused, the last live row moved into a freed one), run 15 to 40 tokens into a 24-token context (rows refilled
    with their newest half block); each gets the greedy tokens it gets alone, and the ones that wait wait."""
    model = build(dict(model_type="gpt_plus", n_kv_head=2, ngram_emb=3)).eval()
    torch.manual_seed(2)
    prompts = [torch.randint(0, 67, (n,)).tolist() for n in (3, 10, 5, 20)]
    sequences = [Sequence(p, n, dict(temperature=0)) for p, n in zip(prompts, (40, 15, 30, 25), strict=True)]
    engine, waiting, most = Engine(model, 2), list(sequences), 0
    while waiting or engine.live:
        if waiting and len(engine.live) < engine.max_rows:
            engine.admit([waiting.pop(0)])
        most = max(most, len(engine.live))
        engine.step()
    assert most == 2
    for s, p in zip(sequences, prompts, strict=True):
        assert s.tokens == generate(model, [p], s.max_new_tokens, temperature=0)[0] and s.finish == "length"


def test_int4_weights_keep_the_logits_close_and_refuse_shapes_the_kernel_cannot_take():
    """--quantize=int4: every matrix 4-bit in groups of 32 inputs (torch's CPU int4 kernel): the logits within a few
    percent of their range and the likeliest token mostly kept; a matrix whose outputs are not in 16s is one line."""
    from quantize import Int4Linear, for_decoding
    torch.manual_seed(0)
    model = GPT(config_from_preset("gpt_plus", n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=96)).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randint(0, 96, (4, 32))
    with torch.no_grad():
        logits = model(x, x)[0]
        q = for_decoding(copy.deepcopy(model), "int4")
        q_logits = q(x, x)[0]
    assert sum(isinstance(m, Int4Linear) for m in q.modules()) == 4 * 2 + 1
    error = (q_logits - logits).abs().mean() / (logits.max() - logits.min())
    assert 0 < error < 0.05 and (q_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.6
    odd = GPT(config_from_preset("gpt_plus", n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=67))
    with pytest.raises(SystemExit, match="outputs in 16s"):
        for_decoding(odd, "int4")
