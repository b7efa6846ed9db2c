"""The generation engine: the KV cache against the uncached path, narrow decode weights,
the sampling controls, and the lecture's generate as the reference."""

import os
import re

import pytest
import torch

from chargpt import engine, machine
from chargpt.engine import Decoder, KVCache, prefill, sample_next
from chargpt.engine import generate as engine_generate
from conftest import ROOT
from model import BigramLanguageModel, GPTConfig
from test_model import tiny


def generate(model, idx, n, kv_cache, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return torch.stack(list(engine_generate(model, idx, n, generator=g, kv_cache=kv_cache, **kw)), dim=1)


def test_cached_logits_match_uncached():
    model = tiny()
    idx = torch.randint(0, 11, (2, 16))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    first = prefill(model, idx[:, :6], cache)
    assert torch.allclose(first, full[:, 5], atol=1e-5)
    decoder = Decoder(model)
    for t in range(6, 16):
        step = decoder(idx[:, t : t + 1], cache)
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
    prefill(model, idx[:, :6], cache)
    for t in range(6, 16):
        step = decoder(idx[:, t : t + 1], cache)
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


def test_uncached_engine_is_the_lectures_generate():
    """With no cache, temperature 1 and no top-k or top-p, the engine draws what the lecture's
    generate draws from the same seed."""
    model = tiny()
    idx = torch.randint(0, 11, (2, 3))
    lecture = model.generate(idx, 40, generator=torch.Generator().manual_seed(7))
    engine = generate(model, idx, 40, False, seed=7, temperature=1.0, top_k=0)
    assert torch.equal(lecture[:, 3:], engine)


def test_an_unknown_module_is_an_error_not_a_wrong_decode():
    """The decoder is built from the Blocks' modules: one it does not know is refused by name."""
    model = tiny()
    model.blocks[0].ln2 = torch.nn.GroupNorm(1, 32)
    with pytest.raises(TypeError, match="cannot run a GroupNorm"):
        Decoder(model)


def test_decode_dtype_candidates_by_device(monkeypatch):
    """auto times float32 only on MPS, and bfloat16 on a GPU only where it is not emulated."""
    assert engine.candidates(torch.device("mps")) == ["float32"]
    monkeypatch.setattr(machine, "gpu", lambda device="cuda": ("Tesla T4", (7, 5)))
    assert engine.candidates(torch.device("cuda")) == ["float32", "float16"]
    monkeypatch.setattr(machine, "gpu", lambda device="cuda": ("NVIDIA A100-SXM4-40GB", (8, 0)))
    assert engine.candidates(torch.device("cuda")) == ["float32", "float16", "bfloat16"]


def test_every_draw_is_made_on_the_cpu():
    """MPS's multinomial has drawn wrong samples (pytorch#92752, #136623): every call of it in
    the project gets CPU probabilities. (There is no MPS here to run it on: the source is read.)"""
    calls = []
    for folder in (ROOT, os.path.join(ROOT, "chargpt")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    calls += [(name, line.strip()) for line in f if "torch.multinomial(" in line]
    assert {name for name, _ in calls} == {"model.py", "engine.py"}, calls
    assert all(re.search(r"torch\.multinomial\(\w+\.cpu\(\)", line) for _, line in calls), calls
