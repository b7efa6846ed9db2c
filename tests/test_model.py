"""The network: causality, the fused attention against the lecture's Head, init, learning,
and generation (KV cache against the uncached path, sampling controls)."""

import math

import pytest
import torch

from model import GPT, BigramLanguageModel, Decoder, Dropout, GPTConfig, KVCache, sample_next


def tiny(**overrides):
    config = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = GPT(config)
    # lm_head starts at zero; give it weights so the tests see every path
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    return model.eval()


def test_a_token_never_sees_the_future():
    model = tiny()
    idx = torch.randint(0, 11, (2, 16))
    logits, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        logits2, _ = model(changed)
        assert torch.allclose(logits[:, :t], logits2[:, :t], atol=1e-6), f"positions before {t} moved"
        assert not torch.allclose(logits[:, t:], logits2[:, t:]), "the changed token had no effect"


def test_multihead_attention_is_the_lectures_heads():
    torch.manual_seed(0)
    mha = tiny().blocks[0].sa
    x = torch.randn(3, 16, 32)
    heads = mha.heads()
    assert len(heads) == 4
    reference = mha.proj(torch.cat([h(x) for h in heads], dim=-1))  # the lecture's MultiHeadAttention
    assert torch.allclose(mha(x), reference, atol=1e-5)
    # and shorter sequences use the top-left corner of the tril mask
    assert torch.allclose(mha(x[:, :5]), mha.proj(torch.cat([h(x[:, :5]) for h in heads], dim=-1)), atol=1e-5)


def test_loss_at_init_is_ln_vocab_size():
    config = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    for model in (GPT(config), BigramLanguageModel(config)):
        idx = torch.randint(0, 65, (4, 32))
        _, loss = model(idx, idx)
        assert abs(loss.item() - math.log(65)) < 0.01


def test_overfits_one_batch():
    model = tiny()
    model.train()
    torch.manual_seed(1)
    idx = torch.randint(0, 11, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_input_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="17 tokens.*block_size 16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, flag", [({"n_head": 5}, "--n_head"), ({"n_layer": 0}, "--n_layer"), ({"dropout": 1.5}, "--dropout")]
)
def test_bad_model_config_names_the_flag(overrides, flag):
    config = GPTConfig(vocab_size=11, **overrides)
    with pytest.raises(ValueError, match=flag):
        GPT(config)


# -- generation ----------------------------------------------------------------------


def generate(model, idx, n, kv_cache, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.stack(list(model.generate(idx, n, generator=g, kv_cache=kv_cache, **kw)), dim=1)


def test_cached_logits_match_uncached():
    model = tiny()
    idx = torch.randint(0, 11, (2, 16))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    prefill = model.prefill(idx[:, :6], cache)
    assert torch.allclose(prefill, full[:, 5], atol=1e-5)
    decoder = Decoder(model)
    for t in range(6, 16):
        step = decoder(idx[:, t], cache)
        assert torch.allclose(step, full[:, t], atol=1e-5)
    assert cache.pos == 16


def test_cached_and_uncached_generation_agree_within_block_size():
    model = tiny()
    prompt = torch.randint(0, 11, (3, 4))
    n = model.config.block_size - 4  # stays inside one window
    assert torch.equal(generate(model, prompt, n, True), generate(model, prompt, n, False))


def test_cached_generation_past_block_size_follows_its_window():
    """Past block_size the cache restarts from the last block_size // 2 tokens; an uncached
    reference that sees exactly those windows must give the same tokens."""
    model = tiny()
    bs, half = model.config.block_size, model.config.block_size // 2
    prompt = torch.randint(0, 11, (2, 3))
    n = 3 * bs
    cached = generate(model, prompt, n, True, seed=5)
    # reference: the window starts at 0 and, whenever it would hold more than block_size
    # tokens, jumps forward to hold the last half of them
    g = torch.Generator().manual_seed(5)
    idx, start = prompt, 0
    for _ in range(n):
        if idx.shape[1] - start > bs:
            start = idx.shape[1] - half
        logits, _ = model(idx[:, start:])
        idx = torch.cat([idx, sample_next(logits[:, -1], generator=g)[:, None]], dim=1)
    assert torch.equal(cached, idx[:, prompt.shape[1] :])


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 0.01), (torch.bfloat16, 0.03), (torch.int8, 0.1)])
def test_narrow_decode_stays_close_to_float32(dtype, atol):
    """The float32 model prefills; a float16, bfloat16 or int8 copy decodes into the same
    float32 cache, and its logits stay near the float32 ones (which span about +-1 here)."""
    model = tiny()
    idx = torch.randint(0, 11, (2, 16))
    full, _ = model(idx)
    decoder = Decoder(model, dtype)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    model.prefill(idx[:, :6], cache)
    for t in range(6, 16):
        step = decoder(idx[:, t], cache)
        assert step.dtype == (torch.float32 if dtype == torch.int8 else dtype)
        assert torch.allclose(step.float(), full[:, t], atol=atol), (t, (step.float() - full[:, t]).abs().max())


def test_half_precision_generation_runs_past_block_size_and_leaves_the_model_alone():
    model = tiny()
    prompt = torch.randint(0, 11, (2, 3))
    n = 3 * model.config.block_size  # two rebuilds of the cache
    tokens = generate(model, prompt, n, True, decode_dtype=torch.float16)
    assert tokens.shape == (2, n) and 0 <= tokens.min() and tokens.max() < 11
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # float32 decode_dtype is the model itself: the same tokens as no decode_dtype
    assert torch.equal(generate(model, prompt, n, True, decode_dtype=torch.float32), generate(model, prompt, n, True))


def test_same_seed_same_text_and_different_seed_differs():
    model = tiny()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a, b = generate(model, prompt, 40, True, seed=3), generate(model, prompt, 40, True, seed=3)
    c = generate(model, prompt, 40, True, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


def test_top_k_keeps_the_k_most_likely_and_ties():
    logits = torch.tensor([[5.0, 1.0, 5.0, 0.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 2}
    # ties at the k-th value stay in; k larger than the vocabulary is clamped
    draws = {sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(200)}
    assert draws == {0, 2}
    assert {sample_next(logits, 100.0, top_k=99, generator=g).item() for _ in range(500)} == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(probs.log(), 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert draws == {0, 1}
    draws = {sample_next(probs.log(), 1.0, top_p=0.1, generator=g).item() for _ in range(50)}
    assert draws == {0}


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-310, 5e-324])
def test_a_tiny_temperature_is_near_argmax(temperature):
    """A temperature that underflows float32 (or makes logits / temperature overflow) still
    draws the most likely token, not inf - inf = NaN; equal best logits stay a draw."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9999], [30.0, -50.0, 29.0, 0.0], [1.0, 3.0, 3.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, temperature, generator=g).tolist() for _ in range(100)]
    assert {tuple(d[:2]) for d in draws} == {(1, 0)} and {d[2] for d in draws} == {1, 2}
    assert sample_next(logits, temperature, top_k=2, top_p=0.5, generator=g).tolist()[:2] == [1, 0]


@pytest.mark.parametrize("top_p", [1e-30, 1e-45, 5e-324])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    """top_p under float32's smallest number is 0 there: the most likely token still stays."""
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    g = torch.Generator().manual_seed(0)
    assert {tuple(sample_next(probs.log(), 1.0, top_p=top_p, generator=g).tolist()) for _ in range(50)} == {(1, 0)}


def test_bigram_generates():
    config = GPTConfig(model_type="bigram", block_size=8, vocab_size=11)
    model = BigramLanguageModel(config)
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 20, True)
    assert out.shape == (2, 20)


def test_attention_maps_are_causal_distributions_that_the_forward_uses():
    model = tiny()
    model.train()  # attention_maps must switch dropout off by itself, then restore the mode
    idx = torch.randint(0, 11, (1, 12))
    maps = model.attention_maps(idx)
    assert model.training
    model.eval()
    assert maps.shape == (2, 4, 12, 12)  # (n_layer, n_head, T, T)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 12), atol=1e-6)
    assert torch.all(maps.triu(diagonal=1) == 0) and torch.all(maps.diagonal(dim1=-2, dim2=-1) > 0)
    # rebuild each layer's attention output from these weights and the values alone
    x = model.token_embedding_table(idx) + model.position_embedding_table(torch.arange(12))  # (1, T, C)
    for layer, block in enumerate(model.blocks):
        h = block.ln1(x)
        v = block.sa.qkv(h).split(32, dim=2)[2].view(1, 12, 4, 8).transpose(1, 2)  # (1, nh, T, hs)
        out = (maps[layer] @ v[0]).transpose(0, 1).reshape(1, 12, 32)  # (nh, T, hs) -> (1, T, C)
        assert torch.allclose(block.sa.proj(out), block.sa(h), atol=1e-5), f"layer {layer}"
        x = block(x)
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model.attention_maps(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_drops_a_fraction_p_and_keeps_the_mean():
    torch.manual_seed(0)
    dropout = Dropout(0.1).train()
    x = torch.ones(400, 1000, requires_grad=True)
    y = dropout(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.003
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()  # the gradient passes through the kept elements only, scaled alike
    assert torch.equal(x.grad, y.detach())
    # a shape whose size does not divide by 4; masks differ between calls, repeat with the seed
    torch.manual_seed(1)
    a, b = dropout(torch.ones(3, 5, 7)), dropout(torch.ones(3, 5, 7))
    torch.manual_seed(1)
    assert torch.equal(a, dropout(torch.ones(3, 5, 7))) and not torch.equal(a, b)
    dropout.eval()
    assert dropout(x) is x
