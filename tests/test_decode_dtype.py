"""--decode_dtype=auto: it picks the fastest candidate from timings (fixed numbers here: the
tests never assert a real timing), keeps the pick in a cache, and a broken cache never gets
in the way of sampling."""

import json
import os

import pytest
import torch

from chargpt import engine as decode_dtype
from chargpt.engine import CACHE, DECODE_DTYPES, pick_decode_dtype, resolve_decode_dtype
from chargpt.machine import cache_path
from model import GPT, BigramLanguageModel, GPTConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A cache of this test's own, on a machine that counts as quiet (the suite itself keeps
    the cores busy; tests about a busy machine say so)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(decode_dtype, "machine_busy", lambda: False)
    return tmp_path / "cache"


def fixed_timings(monkeypatch, seconds, build=None):
    """time_decoders replaced by fixed numbers: seconds per step (the best of three rounds),
    and seconds to build each decoder (0 unless given)."""
    calls = []

    def timed(model, names, batch_size):
        calls.append(batch_size)
        return {
            name: ((build or {}).get(name, 0.0), [seconds[name] * 1.2, seconds[name], seconds[name] * 1.1])
            for name in names
            if name in seconds
        }

    monkeypatch.setattr(decode_dtype, "time_decoders", timed)
    return calls


def test_auto_times_the_candidates_and_returns_one(model):
    name, costs, where = pick_decode_dtype(model, 2, new_tokens=100, use_cache=False)
    assert where == "timed" and name in decode_dtype.candidates(torch.device("cpu"))
    assert {"float32", "float16", "bfloat16"} <= set(costs) and all(step > 0 and build >= 0 for build, step in costs.values())
    total = {n: build + 100 * step for n, (build, step) in costs.items()}
    # the simplest candidate within MARGIN of the fastest (timings this close are common)
    within = [n for n in decode_dtype.SIMPLEST_FIRST if n in total and total[n] <= decode_dtype.MARGIN * min(total.values())]
    assert name == within[0]
    timings = decode_dtype.time_decoders(model, ["float32", "int8"], 1)
    assert all(len(steps) == decode_dtype.ROUNDS and min(steps) > 0 for _, steps in timings.values())
    assert resolve_decode_dtype("auto", model) in DECODE_DTYPES.values()


def test_auto_takes_the_fastest(model, monkeypatch):
    fixed_timings(monkeypatch, {"float32": 3e-3, "float16": 1e-3, "bfloat16": 2e-3, "int8": 4e-3})
    name, costs, where = pick_decode_dtype(model, 1)
    assert (name, where) == ("float16", "timed") and costs["float16"] == (0.0, 1e-3)
    assert resolve_decode_dtype("auto", model, batch_size=3) == torch.float16
    fixed_timings(monkeypatch, {"float32": 3e-3, "float16": 5e-3, "bfloat16": 6e-3, "int8": 1e-3})
    assert resolve_decode_dtype("auto", model, batch_size=4) == torch.int8  # a new batch size is a new key


def test_building_the_decoder_counts_for_short_samples(model, monkeypatch):
    # int8 steps are twice as fast, but its quantized copy takes as long as 100 float32 steps
    calls = fixed_timings(monkeypatch, {"float32": 2e-3, "int8": 1e-3}, build={"int8": 0.2})
    assert pick_decode_dtype(model, 1, new_tokens=150)[0] == "float32"
    assert pick_decode_dtype(model, 1, new_tokens=1000)[0] == "int8"  # from the cache: timed once
    assert calls == [1]


def test_a_named_dtype_and_a_bigram_model_are_not_timed(monkeypatch):
    calls = fixed_timings(monkeypatch, {})
    bigram = BigramLanguageModel(GPTConfig(model_type="bigram", vocab_size=11))
    assert resolve_decode_dtype("int8", bigram) == torch.int8
    assert pick_decode_dtype(bigram, 1) == ("float32", {}, "none") and calls == []


def test_the_best_round_counts(model, monkeypatch):
    # other programs only ever slow a round down: float32's one slow round does not count
    monkeypatch.setattr(
        decode_dtype, "time_decoders", lambda model, names, batch: {"float32": (0, [1e-3, 9e-3]), "int8": (0, [2e-3, 2e-3])}
    )
    assert pick_decode_dtype(model, 1) == ("float32", {"float32": (0, 1e-3), "int8": (0, 2e-3)}, "timed")


def test_a_cache_hit_skips_the_timing(model, monkeypatch, cache_dir):
    calls = fixed_timings(monkeypatch, {"float32": 2e-3, "float16": 3e-3, "bfloat16": 4e-3, "int8": 1e-3})
    assert pick_decode_dtype(model, 1)[0] == "int8" and calls == [1]
    assert pick_decode_dtype(model, 1)[::2] == ("int8", "cache") and calls == [1]
    cached = json.loads((cache_dir / "chargpt" / "decode_dtype.json").read_text(encoding="utf-8"))
    ((key, value),) = cached.items()
    assert value["costs"]["int8"] == [0.0, 1e-3] and "torch " + torch.__version__ in key and "batch 1" in key
    # another model shape is another entry
    other = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=32)).eval()
    assert pick_decode_dtype(other, 1)[2] == "timed" and calls == [1, 1]
    assert not [name for name in os.listdir(cache_dir / "chargpt") if name.startswith(".tmp-")]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"key": 3', b"\xff\xfe", "entries"])
def test_a_corrupt_cache_is_ignored_and_replaced(model, monkeypatch, content):
    path = cache_path(CACHE)
    os.makedirs(os.path.dirname(path))
    if content == "entries":  # a readable file whose entry for this model is nonsense
        key = decode_dtype.cache_key(model, 1, torch.device("cpu"))
        content = json.dumps({key: {"float32": "fast", "int8": [1]}}).encode()
    with open(path, "wb") as f:
        f.write(content)
    calls = fixed_timings(monkeypatch, {"float32": 1e-3, "float16": 3e-3, "bfloat16": 4e-3, "int8": 2e-3})
    assert pick_decode_dtype(model, 1)[0] == "float32" and calls == [1]
    (entry,) = json.loads(open(path, encoding="utf-8").read()).values()
    assert entry["costs"]["float32"] == [0.0, 1e-3]


def test_an_unwritable_cache_never_breaks_sampling(model, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # ~/.cache/chargpt cannot be created
    calls = fixed_timings(monkeypatch, {"float32": 2e-3, "float16": 1e-3, "bfloat16": 4e-3, "int8": 3e-3})
    assert pick_decode_dtype(model, 1)[0] == "float16"
    assert pick_decode_dtype(model, 1)[0] == "float16" and calls == [1, 1]  # timed again: nothing was kept
    assert blocker.read_text() == "not a folder"


def test_within_the_margin_the_simpler_dtype_stays(model, monkeypatch):
    """int8 5% faster than float32 in a timing is noise: float32 stays; 20% faster, int8 wins.
    And between two narrow ones within the margin, the simpler (float16 before int8)."""
    monkeypatch.setattr(decode_dtype, "machine_busy", lambda: False)
    fixed_timings(monkeypatch, {"float32": 1.00e-3, "float16": 1.30e-3, "int8": 0.95e-3})
    assert pick_decode_dtype(model, 1, new_tokens=500, use_cache=False)[0] == "float32"
    fixed_timings(monkeypatch, {"float32": 1.00e-3, "float16": 1.30e-3, "int8": 0.80e-3})
    assert pick_decode_dtype(model, 1, new_tokens=500, use_cache=False)[0] == "int8"
    fixed_timings(monkeypatch, {"float32": 1.00e-3, "float16": 0.62e-3, "int8": 0.60e-3})
    assert pick_decode_dtype(model, 1, new_tokens=500, use_cache=False)[0] == "float16"


def test_a_timing_from_a_busy_machine_is_taken_again_when_quiet(model, monkeypatch):
    calls = fixed_timings(monkeypatch, {"float32": 2e-3, "int8": 1e-3})
    monkeypatch.setattr(decode_dtype, "machine_busy", lambda: True)
    assert pick_decode_dtype(model, 1)[::2] == ("int8", "timed")
    assert pick_decode_dtype(model, 1)[::2] == ("int8", "cache") and len(calls) == 1  # still busy: the entry stands
    fixed_timings(monkeypatch, {"float32": 1e-3, "int8": 2e-3})
    monkeypatch.setattr(decode_dtype, "machine_busy", lambda: False)
    assert pick_decode_dtype(model, 1)[::2] == ("float32", "timed")
    assert pick_decode_dtype(model, 1)[::2] == ("float32", "cache")


def test_an_entry_from_before_the_busy_mark_is_read(model):
    key = decode_dtype.cache_key(model, 1, torch.device("cpu"))
    path = cache_path(CACHE)
    os.makedirs(os.path.dirname(path))
    with open(path, "w", encoding="utf-8") as f:
        json.dump({key: {"float32": [0.0, 2e-3], "int8": [0.0, 1e-3]}}, f)
    assert pick_decode_dtype(model, 1)[::2] == ("int8", "cache")
