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


# -----------------------------------------------------------------------------
# the rule for each kind of device, with the device's properties faked

GPUS = {
    "Tesla T4": ((7, 5), "float16"),
    "Tesla V100-SXM2-16GB": ((7, 0), "float16"),
    "NVIDIA A100-SXM4-40GB": ((8, 0), "bfloat16"),
    "NVIDIA H100 80GB HBM3": ((9, 0), "bfloat16"),
    "Tesla P100-PCIE-16GB": ((6, 0), "float32"),
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name) makes chargpt/machine.py see that GPU; TF32 requests are recorded, not made."""
    tf32 = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", tf32.append)
    # what PyTorch answers on a T4 too: bfloat16 is emulated there (pytorch PR #148322)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def fake(name):
        monkeypatch.setattr(precision, "gpu", lambda device="cuda": (name, GPUS[name][0]))
        return tf32

    return fake


@pytest.mark.parametrize("name", GPUS)
def test_auto_on_a_gpu_follows_its_compute_capability_and_says_why(fake_gpu, name):
    tf32 = fake_gpu(name)
    lines = []
    capability, expected = GPUS[name]
    assert precision.training_dtype("auto", "cuda", None, (4, 16), precision.Distributed(), lines.append) == expected
    assert lines == [
        f"dtype auto: {name} (compute capability {capability[0]}.{capability[1]}): {precision.cuda_dtype(capability)[1]}"
    ]
    # TF32 for the float32 matrix products where the GPU has bfloat16 (Ampere and later)
    assert tf32 == (["high"] if expected == "bfloat16" else [])


def test_float32_asked_for_on_an_a100_is_ieee_float32(fake_gpu):
    tf32 = fake_gpu("NVIDIA A100-SXM4-40GB")
    assert precision.training_dtype("float32", "cuda", None, (4, 16), precision.Distributed()) == "float32"
    assert tf32 == []
    assert precision.training_dtype("float16", "cuda", None, (4, 16), precision.Distributed()) == "float16"
    assert tf32 == ["high"]


def test_bfloat16_on_a_t4_is_refused_though_pytorch_would_emulate_it(fake_gpu):
    fake_gpu("Tesla T4")
    with pytest.raises(ValueError, match=r"--dtype=bfloat16 but Tesla T4 \(compute capability 7.5\) has no bfloat16 units"):
        precision.training_dtype("bfloat16", "cuda", None, (4, 16), precision.Distributed())
    assert precision.training_dtype("float16", "cuda", None, (4, 16), precision.Distributed()) == "float16"


def test_every_process_takes_rank_0s_dtype():
    class TwoProcesses(precision.Distributed):
        def from_master(self, values, device):
            return [float(precision.DTYPES.index("float16"))]  # what rank 0 chose

    assert precision.training_dtype("float32", "cpu", None, (4, 16), TwoProcesses(world_size=2)) == "float16"


def test_mps_trains_in_float32_refuses_float16_and_compile(monkeypatch):
    lines = []
    assert precision.resolve_dtype("auto", "mps", tiny_model(), (4, 16), lines.append) == "float32"
    assert "float32 on MPS" in lines[0]
    with pytest.raises(ValueError, match="--dtype=float16 is not offered on MPS"):
        precision.training_dtype("float16", "mps", None, (4, 16), precision.Distributed())
    with pytest.raises(ValueError, match="--compile=True on MPS"):
        precision.check_compile(True, "mps")
    precision.check_compile(False, "mps")
    precision.check_compile(True, "cpu")
    # auto picks MPS where there is no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert precision.resolve_device("auto") == "mps"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_runs_the_matrix_products_in_the_dtype_asked(dtype):
    with precision.autocast_context("cpu", dtype):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == getattr(torch, dtype)
