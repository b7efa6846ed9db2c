"""The network: causality, the fused attention against the lecture's Head, init, learning,
the lecture's generate, attention maps. The fast generation is tests/test_engine.py's."""

import math

import pytest
import torch

from model import GPT, BigramLanguageModel, Dropout, GPTConfig


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


def test_the_lectures_generate_continues_the_context():
    model = tiny()
    idx = torch.randint(0, 11, (2, 3))
    out = model.generate(idx, 30, generator=torch.Generator().manual_seed(0))  # past block_size: it crops
    assert out.shape == (2, 33) and torch.equal(out[:, :3], idx) and 0 <= out.min() and out.max() < 11
    again = model.generate(idx, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    bigram = BigramLanguageModel(GPTConfig(model_type="bigram", block_size=8, vocab_size=11))
    assert bigram.generate(idx, 5).shape == (2, 8)
