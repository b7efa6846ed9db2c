"""The lecture's steps as GPTConfig switches (ffwd_mult, residual, proj, layer_norm, init):
each changes the parameters and the forward exactly as it says, the defaults are the model
as it was before the switches, and every stage's model samples, decodes and draws attention."""

import dataclasses
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from chargpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from chargpt.engine import Decoder, KVCache, prefill
from conftest import ROOT
from model import GPT, GPTConfig

V, T, C, NH, L = 11, 16, 32, 4, 2  # vocab, block_size, n_embd, n_head, n_layer


def build(seed=0, **switches):
    config = GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=NH, n_embd=C, dropout=0.0, **switches)
    torch.manual_seed(seed)
    model = GPT(config)
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)  # lm_head starts at zero: make every path show
    return model.eval()


def expected_params(ffwd_mult=4, residual=True, proj=True, layer_norm=True):
    """The parameter count, added up by hand from the lecture's pieces."""
    hidden = ffwd_mult * C
    embeddings = V * C + T * C  # token and position tables
    attention = 3 * C * C + (C * C + C if proj else 0)  # q, k, v (no bias), then the projection back
    ffwd = (C * hidden + hidden + (hidden * C + C if proj else 0)) if ffwd_mult else 0
    norms = (2 * C + (2 * C if ffwd_mult else 0)) if layer_norm else 0  # ln1, ln2: a gain and a bias each
    final = (2 * C if layer_norm else 0) + C * V + V  # ln_f, lm_head
    return embeddings + L * (attention + ffwd + norms) + final


# Every GPTConfig field, with a value other than its default that still builds a model. A
# new switch must be added here (a test checks the list is whole), and then the KV-cache
# decoder and the memory estimate (tests/test_memory.py) are held to it: neither can miss it.
SWITCHES = {
    "model_type": {"model_type": "bigram"},
    "block_size": {"block_size": 8},
    "vocab_size": {"vocab_size": 7},
    "n_layer": {"n_layer": 3},
    "n_head": {"n_head": 2},
    "n_embd": {"n_embd": 48},
    "dropout": {"dropout": 0.1},
    "attn_dropout": {"attn_dropout": 0.1},
    "ffwd_mult": {"ffwd_mult": 1},
    "residual": {"residual": False},
    "proj": {"proj": False, "ffwd_mult": 1},
    "layer_norm": {"layer_norm": False},
    "init": {"init": "pytorch"},
    "activation": {"activation": "relu2"},
    "position": {"position": "rotary"},
    "qk_norm": {"qk_norm": True},
    "bias": {"bias": False},
    "zero_proj": {"zero_proj": True},
}


def test_every_config_field_is_in_the_switch_list():
    assert set(SWITCHES) == {f.name for f in dataclasses.fields(GPTConfig)}


@pytest.mark.parametrize("switch", [k for k in SWITCHES if k != "model_type"])
def test_kv_cache_decoder_follows_every_switch(switch):
    config = {"block_size": T, "vocab_size": V, "n_layer": L, "n_head": NH, "n_embd": C, "dropout": 0.0, **SWITCHES[switch]}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    model.eval()
    T_ = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (2, T_), generator=torch.Generator().manual_seed(3))
    assert_decoder_matches_forward(model, idx, prompt=3)


# every valid combination: without the projection back FeedForward is at most n_embd wide
COMBINATIONS = [
    dict(ffwd_mult=m, residual=r, proj=p, layer_norm=n)
    for m, r, p, n in itertools.product((0, 1, 4), (True, False), (True, False), (True, False))
    if p or m <= 1
]
name = lambda s: "-".join(f"{k}={v}" for k, v in s.items())


@pytest.mark.parametrize("switches", COMBINATIONS, ids=name)
def test_parameter_count_is_the_sum_of_the_pieces_the_switches_keep(switches):
    assert build(**switches).num_params() == expected_params(**switches)


def reference_forward(model, idx):
    """The forward written out the lecture's way, one switch per line: the lecture's Head
    modules for attention (tril mask, softmax), then the pieces each switch keeps."""
    c = model.config
    x = model.token_embedding_table(idx) + model.position_embedding_table.weight[: idx.shape[1]]  # (B, T, C)
    for block in model.blocks:
        h = F.layer_norm(x, (C,), block.ln1.weight, block.ln1.bias) if c.layer_norm else x
        a = torch.cat([head(h) for head in block.sa.heads()], dim=-1)  # (B, T, C): the heads side by side
        if c.proj:
            a = block.sa.proj(a)
        x = x + a if c.residual else a
        if c.ffwd_mult:
            h = F.layer_norm(x, (C,), block.ln2.weight, block.ln2.bias) if c.layer_norm else x
            fc = block.ffwd.net[0]  # the lecture's nn.Sequential: Linear, ReLU, Linear, Dropout
            f = F.relu(fc(h))  # (B, T, ffwd_mult * C)
            if c.proj:
                f = block.ffwd.net[2](f)  # (B, T, C)
            x = x + f if c.residual else f
    if c.layer_norm:
        x = F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias)
    return model.lm_head(x)  # (B, T, V)


@pytest.mark.parametrize("switches", COMBINATIONS, ids=name)
def test_forward_does_what_the_switches_say(switches):
    model = build(**switches)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_forward(model, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "switch, value", [("ffwd_mult", 0), ("ffwd_mult", 1), ("residual", False), ("proj", False), ("layer_norm", False)]
)
def test_each_switch_alone_changes_the_function(switch, value):
    """Flipped alone (proj=False with the 1x FeedForward it needs), a switch changes the logits
    of a model whose shared weights are the same."""
    base = {"ffwd_mult": 1} if switch == "proj" else {}
    full, changed = build(**base), build(**base, **{switch: value})
    shared = {
        k: v for k, v in full.state_dict().items() if k in changed.state_dict() and v.shape == changed.state_dict()[k].shape
    }
    changed.load_state_dict(shared, strict=False)  # the weights they share
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(full(idx)[0], changed(idx)[0], atol=1e-4)


def test_the_defaults_are_the_model_from_before_the_switches():
    """tests/data/default_model_before_switches.pt was written by model.py before the switches
    existed: the same parameter names, the same initial weights from the same seed, the same
    logits from the same weights (old checkpoints load and mean the same)."""
    ref = torch.load(os.path.join(ROOT, "tests", "data", "default_model_before_switches.pt"), weights_only=True)
    config = GPTConfig(**ref["config"])
    assert (config.ffwd_mult, config.residual, config.proj, config.layer_norm, config.init) == (4, True, True, True, "normal")
    torch.manual_seed(0)
    model = GPT(config).eval()
    state = model.state_dict()
    assert sorted(state) == sorted(ref["init_state"])
    for key, value in ref["init_state"].items():
        torch.testing.assert_close(state[key], value, atol=1e-7, rtol=0, msg=key)
    with torch.no_grad():
        model.lm_head.weight.copy_(ref["lm_head"])
    torch.testing.assert_close(model(ref["idx"])[0], ref["logits"], atol=1e-5, rtol=1e-5)


def test_pytorch_init_keeps_pytorchs_own_weights():
    """init='pytorch' is PyTorch's defaults: nn.Embedding N(0, 1), nn.Linear uniform in
    +-1/sqrt(fan_in), biases too; 'normal' is N(0, 0.02) and a zero lm_head."""
    lecture, ours = build(init="pytorch"), GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=NH, n_embd=C))
    assert lecture.token_embedding_table.weight.std().item() == pytest.approx(1.0, rel=0.2)
    assert ours.token_embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)
    bound = C**-0.5
    qkv = lecture.blocks[0].sa.qkv.weight
    assert qkv.abs().max().item() <= bound and qkv.abs().max().item() > 0.9 * bound
    assert (ours.lm_head.weight == 0).all() and (lecture.lm_head.bias != 0).any()


def test_proj_false_needs_a_feed_forward_of_n_embd():
    with pytest.raises(ValueError, match=r"--ffwd_mult=4 needs --proj=True.*--ffwd_mult=1"):
        GPT(GPTConfig(vocab_size=V, proj=False))
    with pytest.raises(ValueError, match="--ffwd_mult must be 0 or more"):
        GPT(GPTConfig(vocab_size=V, ffwd_mult=-1))
    with pytest.raises(ValueError, match="--init must be 'normal' or 'pytorch'"):
        GPT(GPTConfig(vocab_size=V, init="xavier"))


def assert_decoder_matches_forward(model, idx, prompt):
    """A prompt of `prompt` tokens prefilled, the rest of idx decoded one at a time through
    the KV cache: the logits are the full forward's at the same positions."""
    full, _ = model(idx)
    cache = KVCache(model.config, idx.shape[0], "cpu", torch.float32)
    steps = [prefill(model, idx[:, :prompt], cache)]
    decoder = Decoder(model)
    steps += [decoder(idx[:, t : t + 1], cache) for t in range(prompt, idx.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, prompt - 1 :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switches", COMBINATIONS, ids=name)
def test_kv_cache_decoder_follows_the_switches(switches):
    model = build(**switches)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    assert_decoder_matches_forward(model, idx, prompt=3)


def test_attention_maps_rebuild_a_stage_without_residuals_or_layer_norm():
    """With neither residual connections nor LayerNorm (the lecture's stage 3), the first
    layer's attention maps times its values are exactly what the model's first layer outputs."""
    model = build(ffwd_mult=0, residual=False, proj=False, layer_norm=False)
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(4))
    maps = model.attention_maps(idx)  # (n_layer, nh, T, T)
    assert maps.shape == (L, NH, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(L, NH, T))
    x = model.token_embedding_table(idx) + model.position_embedding_table.weight[:T]  # (1, T, C)
    qkv = model.blocks[0].sa.qkv(x)  # (1, T, 3C): the values are its last third
    v = qkv[..., 2 * C :].view(1, T, NH, C // NH).transpose(1, 2)  # (1, nh, T, hs)
    out = (maps[0][None] @ v).transpose(1, 2).reshape(1, T, C)  # (1, T, C)
    torch.testing.assert_close(out, model.blocks[0](x), atol=1e-5, rtol=1e-5)


def test_a_checkpoint_records_the_switches_and_rebuilds_the_stage(tmp_path):
    model = build(ffwd_mult=1, residual=False, proj=False, layer_norm=False, init="pytorch")
    path = str(tmp_path / "stage.pt")
    save_checkpoint(
        {"model": model.state_dict(), "model_config": vars(model.config), "vocab": "abcdefghijk", "iter_num": 0}, path
    )
    loaded, _ = model_from_checkpoint(load_checkpoint(path))
    assert (loaded.config.ffwd_mult, loaded.config.residual, loaded.config.proj, loaded.config.layer_norm) == (
        1,
        False,
        False,
        False,
    )
    idx = torch.randint(0, V, (2, T))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


# -- options beyond the lecture: squared ReLU, rotary positions, QK-norm ---------------------

OPTIONS = [
    dict(activation="relu2"),
    dict(position="rotary"),
    dict(qk_norm=True),
    dict(bias=False),
    dict(activation="relu2", position="rotary", qk_norm=True, bias=False),
]


def test_rotary_positions_replace_the_table_and_keep_only_relative_distance():
    from model import Rotary

    assert build(position="rotary").num_params() == expected_params() - T * C
    rotary = Rotary(head_size=8, block_size=T)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    at = lambda x, pos: rotary(x.expand(T, 8))[pos]  # x placed at position pos
    for i, j, shift in ((3, 1, 4), (10, 2, 5), (0, 0, 9)):
        torch.testing.assert_close(at(q, i) @ at(k, j), at(q, i + shift) @ at(k, j + shift))
    assert not torch.allclose(at(q, 3) @ at(k, 1), at(q, 3) @ at(k, 0))  # the distance itself matters
    torch.testing.assert_close(at(q, 0), q)  # position 0 is not rotated
    torch.testing.assert_close(at(q, 7).norm(), q.norm())  # a rotation keeps lengths


def test_rotary_multiplies_by_e_to_the_i_angle_as_a_real_rotation_of_each_pair_would():
    from model import Rotary

    rotary = Rotary(head_size=8, block_size=T)
    x = torch.randn(2, NH, T, 8, requires_grad=True)
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    angle = pos * 10000.0 ** (-torch.arange(4) / 4)  # (T, 4): pair i turns this far at each position
    a, b = x[..., 0::2], x[..., 1::2]  # the two channels of each pair
    by_hand = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), dim=-1).flatten(-2)
    torch.testing.assert_close(rotary(x), by_hand)
    g = torch.randn_like(by_hand)  # and the gradient flows back the same way
    torch.testing.assert_close(torch.autograd.grad(rotary(x), x, g)[0], torch.autograd.grad(by_hand, x, g)[0])
    torch.testing.assert_close(rotary(x[:, :, 3:5], start=3), rotary(x)[:, :, 3:5])  # a decode step at position 3


def test_qk_norm_compares_unit_rms_queries_and_keys():
    sa = build(qk_norm=True).blocks[0].sa
    q, k = torch.randn(2, NH, T, C // NH) * 5, torch.randn(2, NH, T, C // NH) * 0.1
    qn, kn = sa.compare_form(torch.cat([q, k], dim=1)).split(NH, dim=1)  # queries and keys side by side
    for t in (qn, kn):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(2, NH, T), atol=1e-4, rtol=0)


def test_squared_relu():
    model = build(activation="relu2")
    ffwd = model.blocks[0].ffwd
    x = torch.randn(2, T, C)
    fc, fc2 = ffwd.net[0], ffwd.net[2]
    torch.testing.assert_close(ffwd(x), fc2(F.relu(fc(x)) ** 2))
    assert model.num_params() == expected_params()


def test_zero_proj_starts_every_block_as_the_identity_and_changes_nothing_else():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=NH, n_embd=C, bias=False))
    torch.manual_seed(0)
    zeroed = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=NH, n_embd=C, bias=False, zero_proj=True))
    projections = {n for n, p in zeroed.named_parameters() if any(p is q.weight for b in zeroed.blocks for q in b.projections())}
    assert len(projections) == 2 * L
    for n, p in zeroed.named_parameters():  # the same random draws: only the projections differ
        if n in projections:
            assert not p.any() and plain.get_parameter(n).any()
        else:
            assert torch.equal(p, plain.get_parameter(n)), n
    x = torch.randn(2, T, C)
    for b_zeroed, b_plain in zip(zeroed.blocks, plain.blocks):
        assert torch.equal(b_zeroed(x), x) and not torch.allclose(b_plain(x), x)


def test_zero_proj_learns_its_way_off_zero():
    """lm_head starts at zero too, so the first step's gradient reaches lm_head only; from
    the second the projections learn."""
    model = build(zero_proj=True, bias=False).train()
    torch.nn.init.zeros_(model.lm_head.weight)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(q.weight.abs().max() > 1e-3 for b in model.blocks for q in b.projections())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "switches, message",
    [(dict(init="pytorch"), "not with --init=pytorch"), (dict(proj=False, ffwd_mult=1), "none with --proj=False")],
)
def test_zero_proj_needs_the_projections_and_the_normal_init(switches, message):
    with pytest.raises(ValueError, match=f"--zero_proj=True .*{message}"):
        GPT(GPTConfig(vocab_size=V, zero_proj=True, **switches))


def test_without_bias_the_model_is_the_one_with_zero_biases():
    with_bias = build()
    no_bias = build(bias=False)
    biases = [n for n, _ in with_bias.named_parameters() if n.endswith(".bias")]
    assert biases and not any(n.endswith(".bias") for n, _ in no_bias.named_parameters())
    assert no_bias.num_params() == expected_params() - sum(with_bias.get_parameter(n).numel() for n in biases)
    state = with_bias.state_dict()
    no_bias.load_state_dict({k: v for k, v in state.items() if k not in biases})  # strict: nothing else differs
    with torch.no_grad():
        for n in biases:
            with_bias.get_parameter(n).zero_()
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(no_bias(idx)[0], with_bias(idx)[0])


@pytest.mark.parametrize("options", OPTIONS, ids=name)
def test_options_cache_decode_and_attention_maps_agree_with_the_forward(options):
    model = build(**options)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))
    assert_decoder_matches_forward(model, idx, prompt=4)
    # the attention maps are what the fused attention uses: maps @ values, projected, is its output
    block = model.blocks[0]
    x = model._embed(idx[:1])  # (1, T, C)
    h = block.ln1(x)
    maps = model.attention_maps(idx[:1])[0]  # (nh, T, T) of the first layer
    v = block.sa.qkv(h)[..., 2 * C :].view(1, T, NH, C // NH).transpose(1, 2)  # (1, nh, T, hs)
    out = block.sa.proj((maps[None] @ v).transpose(1, 2).reshape(1, T, C))  # (1, T, C)
    torch.testing.assert_close(out, block.sa(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("activation", "gelu", "--activation must be 'relu' or 'relu2'"),
        ("position", "alibi", "--position must be 'learned' or 'rotary'"),
    ],
)
def test_bad_option_names_the_flag(key, value, message):
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(vocab_size=V, **{key: value}))
    with pytest.raises(ValueError, match="--position=rotary needs an even head size"):
        GPT(GPTConfig(vocab_size=V, n_embd=30, n_head=2, position="rotary"))
