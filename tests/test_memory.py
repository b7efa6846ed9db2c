"""Runs too big for the machine are refused before they start, with both figures; the
estimate behind it is checked against the peak memory of real train.py and sample.py runs."""

import sys

import pytest
import torch

import bench
import sample
import train
from chargpt import memory
from chargpt.checkpoint import save_checkpoint
from chargpt.muon import takes_muon
from conftest import tiny_flags
from model import GPT, GPTConfig, build_model
from test_switches import SWITCHES


@pytest.fixture
def random_model(tmp_path):
    """An out_dir with the checkpoint of an untrained 2 x 64 model (generation costs the same)."""
    config = GPTConfig(block_size=64, vocab_size=20, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config)
    out = tmp_path / "model"
    out.mkdir()
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": vars(config),
            "vocab": "\nabcdefghijklmnopqrs",
            "iter_num": 0,
            "best_val_loss": 3.0,
        },
        str(out / "best.pt"),
    )
    return out


def run_main(capsys, module, argv):
    code = module.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def train_flags(data_dir, out_dir, **extra):
    return tiny_flags(data_dir, out_dir, **{"max_iters": 2, **extra})


def test_train_refuses_a_batch_that_cannot_fit(data_dir, tmp_path, capsys):
    # a billion sequences a step: terabytes of activations, refused before anything is allocated
    code, out, err = run_main(capsys, train, train_flags(data_dir, tmp_path / "o", batch_size=10**9))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "--batch_size=1000000000" in err and "needs about" in err and "TiB of memory (activations" in err, err
    assert "is available" in err or "left under the container's memory limit" in err, err
    assert "smaller --batch_size" in err and "--gradient_accumulation_steps" in err
    assert not (tmp_path / "o").exists()  # nothing left behind


def test_train_refuses_a_model_that_cannot_fit(data_dir, tmp_path, capsys):
    code, out, err = run_main(capsys, train, train_flags(data_dir, tmp_path / "o", n_layer=100, n_head=64, n_embd=16384))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "(weights, gradients and optimizer state" in err and "a smaller --n_layer or --n_embd" in err, err


@pytest.mark.parametrize(
    "flags, part, advice",
    [
        (["--num_samples=1000000000", "--max_new_tokens=10"], "KV cache", "fewer --num_samples"),
        (["--max_new_tokens=10000000000000"], "generated ids", "a smaller --max_new_tokens"),
    ],
)
def test_sample_refuses_a_generation_that_cannot_fit(random_model, capsys, flags, part, advice):
    code, out, err = run_main(capsys, sample, [f"--out_dir={random_model}", "--device=cpu", *flags])
    assert code == 1 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("sample.py: error: generating") and "TiB of memory" in err and "is available" in err, err
    assert f"({part} " in err and advice in err, err


def test_what_fits_is_not_refused(monkeypatch):
    parts = {"activations": 3 * 2**30, "PyTorch": 2**20}
    monkeypatch.setattr(memory, "available_bytes", lambda device: (4 * 2**30, "available"))
    memory.check_fits(parts, "cpu", "this", {"activations": "less"})
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2 * 2**30, "available"))
    with pytest.raises(
        ValueError, match=r"this needs about 3.0 GiB of memory \(activations 3.0 GiB\) but only 2.0 GiB is available: less"
    ):
        memory.check_fits(parts, "cpu", "this", {"activations": "less"})
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # a system that does not say: no check
    memory.check_fits(parts, "cpu", "this", {"activations": "less"})


def saved_bytes(model_config, dtype):
    """Bytes autograd keeps for backward in one training forward of a batch of 3, counted
    once per storage, without the parameters and their 16-bit copies (the transposed
    weights autocast saves; 3 x block_size is no weight's dimension)."""
    torch.manual_seed(0)
    model = GPT(model_config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape)[::-1] for p in model.parameters() if p.dim() == 2}
    seen = {}

    def pack(t):
        copy_of_weight = t.dtype in (torch.bfloat16, torch.float16) and tuple(t.shape) in weight_shapes
        if t.untyped_storage().data_ptr() not in params and not copy_of_weight:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(model_config.vocab_size, (3, model_config.block_size))
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(idx, idx)
    return sum(seen.values())


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"ffwd_mult": 2},
        {"ffwd_mult": 0},
        {"proj": False, "ffwd_mult": 0},
        {"residual": False, "init": "pytorch"},
        {"bias": False, "proj": False, "ffwd_mult": 1},
        *SWITCHES.values(),
    ],
)
def test_the_parameter_count_is_the_models(variant):
    """memory.count_params, worked out from the config, against the model that config builds."""
    config = GPTConfig(**{"block_size": 16, "vocab_size": 11, "n_layer": 3, "n_head": 4, "n_embd": 32, **variant})
    named = list(build_model(config).named_parameters())
    assert memory.count_params(config) == (sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if takes_muon(n, p)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    "variant", [{}, {"ffwd_mult": 2}, {"ffwd_mult": 0}, *(v for v in SWITCHES.values() if not {"model_type", "n_layer"} & set(v))]
)
def test_the_activation_count_is_what_autograd_saves(variant, dtype):
    """memory.block_bytes_per_token against what a second Block adds to the tensors autograd
    saves, per token, for each model variant."""
    config = {"block_size": 32, "vocab_size": 11, "n_head": 4, "n_embd": 64, "dropout": 0.0, **variant}
    tokens = 3 * config["block_size"]
    measured = (saved_bytes(GPTConfig(n_layer=2, **config), dtype) - saved_bytes(GPTConfig(n_layer=1, **config), dtype)) / tokens
    expected = memory.block_bytes_per_token(GPTConfig(**config), dtype)
    if variant.get("attn_dropout"):
        expected += 3 * config["n_head"] * config["block_size"] * memory.FLOAT  # three (B, n_head, T, T) float32 tensors
    assert measured == pytest.approx(expected, rel=0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_the_estimate_is_within_its_factor_of_the_measured_peak(data_dir, tmp_path, random_model):
    """Peak anonymous memory of real runs in fresh processes, minus that of the imports and a
    loaded model, against chargpt/memory.py's estimate: a training run (3 steps, two evals and their
    checkpoints) and a generation long enough to rebuild its KV cache, a few hundred MiB
    each. (The unfused attention of --attn_dropout is measured by bench.py memory: too slow
    for a test.)"""
    training = [
        "--n_layer=2",
        "--n_head=4",
        "--n_embd=64",
        "--block_size=128",
        "--batch_size=128",
        "--dropout=0.1",
        "--dtype=float32",
    ]
    sampling = ["--num_samples=2000", "--max_new_tokens=70", "--decode_dtype=float32"]
    baseline, *peaks = bench.peak_memory(
        [
            [sys.executable, "-c", bench.SAMPLE_BASELINE, str(random_model)],
            bench.train_command(training, tmp_path / "o", data_dir, "tiny", steps=3),
            bench.sample_command(str(random_model), sampling),
        ]
    )
    estimates = [bench.train_estimate(training, data_dir, "tiny"), bench.sample_estimate(str(random_model), sampling)]
    for peak, estimate in zip(peaks, estimates):
        measured = peak - baseline
        assert 1 / memory.ESTIMATE_FACTOR <= measured / estimate <= memory.ESTIMATE_FACTOR, (
            memory.format_bytes(measured),
            memory.format_bytes(estimate),
            memory.format_bytes(baseline),
        )
