"""train.py --dtype=auto: bfloat16 autocast only where a timing of the model says it is faster."""

import os

import pytest
import torch

import train
from chargpt import machine as precision
from chargpt.machine import cache_path
from conftest import tiny_configs
from model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own: what one test timed must not answer the next; and a
    machine that counts as quiet (the suite itself keeps the cores busy)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "machine_busy", lambda: False)


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16, dropout=0.1))


def test_explicit_dtypes_pass_through():
    assert precision.resolve_dtype("float32", "cpu", tiny_model(), (4, 16)) == "float32"
    assert precision.resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_a_cpu_without_bf16_units_gets_float32_without_timing(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(precision, "time_dtypes", lambda *a: pytest.fail("timed on a CPU that emulates bf16"))
    assert precision.resolve_dtype("auto", "cpu", tiny_model(), (4, 16)) == "float32"


@pytest.mark.parametrize(
    "times, expected", [({"float32": 0.3, "bfloat16": 0.5}, "float32"), ({"float32": 0.5, "bfloat16": 0.3}, "bfloat16")]
)
def test_auto_takes_the_faster_and_caches_it(monkeypatch, times, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "machine_busy", lambda: False)
    calls, lines = [], []
    monkeypatch.setattr(precision, "time_dtypes", lambda model, shape: calls.append(shape) or dict(times))
    model = tiny_model()
    assert precision.resolve_dtype("auto", "cpu", model, (4, 16), log=lines.append) == expected
    assert calls == [(4, 16)] and f"kept in {cache_path(precision.DTYPE_CACHE)} (delete it to time again)" in lines[0]
    # the second time the cache answers
    assert precision.resolve_dtype("auto", "cpu", model, (4, 16), log=lines.append) == expected
    assert len(calls) == 1 and len(lines) == 1
    # another batch shape is another question
    precision.resolve_dtype("auto", "cpu", model, (8, 16))
    assert calls == [(4, 16), (8, 16)]


def test_within_the_margin_the_simpler_float32_stays(monkeypatch):
    """bfloat16 5% faster in one timing is noise, not a reason to train in a narrower dtype."""
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "machine_busy", lambda: False)
    monkeypatch.setattr(precision, "time_dtypes", lambda model, shape: {"float32": 0.100, "bfloat16": 0.095})
    assert precision.resolve_dtype("auto", "cpu", tiny_model(), (4, 16)) == "float32"
    monkeypatch.setattr(precision, "time_dtypes", lambda model, shape: {"float32": 0.100, "bfloat16": 0.085})
    assert precision.resolve_dtype("auto", "cpu", tiny_model(), (8, 16)) == "bfloat16"


def test_a_timing_taken_on_a_busy_machine_is_taken_again_when_it_is_quiet(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    timings = iter([{"float32": 0.2, "bfloat16": 0.1}, {"float32": 0.1, "bfloat16": 0.2}])  # under load, then quiet
    calls, lines = [], []
    monkeypatch.setattr(precision, "time_dtypes", lambda model, shape: calls.append(1) or next(timings))
    model = tiny_model()
    monkeypatch.setattr(precision, "machine_busy", lambda: True)
    assert precision.resolve_dtype("auto", "cpu", model, (4, 16), log=lines.append) == "bfloat16"
    assert "timed on a busy machine" in lines[0]
    assert precision.resolve_dtype("auto", "cpu", model, (4, 16)) == "bfloat16" and len(calls) == 1  # still busy: kept
    monkeypatch.setattr(precision, "machine_busy", lambda: False)
    assert precision.resolve_dtype("auto", "cpu", model, (4, 16)) == "float32" and len(calls) == 2  # quiet: again
    assert precision.resolve_dtype("auto", "cpu", model, (4, 16)) == "float32" and len(calls) == 2  # and kept


def test_a_corrupt_cache_is_timed_again(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "time_dtypes", lambda model, shape: {"float32": 0.1, "bfloat16": 0.2})
    path = cache_path(precision.DTYPE_CACHE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("{not json")
    assert precision.resolve_dtype("auto", "cpu", tiny_model(), (2, 16)) == "float32"


def test_timing_leaves_the_model_and_the_random_streams_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    times = precision.time_dtypes(model, (4, 16))
    assert set(times) == {"float32", "bfloat16"} and all(t > 0 for t in times.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_run_with_dtype_auto_says_what_it_chose(data_dir, tmp_path):
    lines = []
    train.train(
        *tiny_configs(data_dir, tmp_path / "o", dtype="auto", max_iters=2, eval_interval=2, sample_chars=0), log=lines.append
    )
    chosen = [line for line in lines if line.startswith("device cpu, ")]
    assert chosen and chosen[0].split(", ")[1].split(";")[0] in ("float32", "bfloat16")
