"""float16 training with loss scaling (chargpt/optim.py's LossScaler), run on the CPU: it
learns, an overflowed step is skipped and lowers the scale, clipping sees the true
gradients, and a resumed run scales exactly as the uninterrupted one."""

import functools

import pytest
import torch

import train
from chargpt.checkpoint import load_checkpoint
from chargpt.config import TrainConfig
from chargpt.machine import autocast_context
from chargpt.optim import LossScaler, make_optimizer, train_step
from conftest import tiny_configs
from model import GPT, GPTConfig


class OneBatch:
    """The same batch every step, as train_step draws them."""

    def __init__(self, vocab_size=11, B=4, T=16):
        g = torch.Generator().manual_seed(0)
        window = torch.randint(vocab_size, (B, T + 1), generator=g)
        self.x, self.y = window[:, :-1], window[:, 1:]

    def next(self, device):
        return self.x, self.y


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).train()


def step(model, optimizer, scaler, config, batch=None):
    ctx = autocast_context("cpu", "float16")
    return train_step(model, optimizer, batch or OneBatch(), config, ctx, "cpu", scaler=scaler)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_float16_with_loss_scaling_overfits_one_batch(optimizer):
    model, config = tiny_model(), TrainConfig(optimizer=optimizer, learning_rate=1e-2, muon_lr=0.02, weight_decay=0.0)
    opt, scaler = make_optimizer(model, config, "cpu"), LossScaler("cpu")
    first = step(model, opt, scaler, config).item()
    for _ in range(40):
        last = step(model, opt, scaler, config).item()
    assert first > 2.0 and last < 0.1, (first, last)  # ln(11) = 2.4 at the start


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_inf_gradient_skips_the_step_and_lowers_the_scale(optimizer):
    model, config = tiny_model(), TrainConfig(optimizer=optimizer)
    lines = []
    opt, scaler = make_optimizer(model, config, "cpu"), LossScaler("cpu", lines.append)
    step(model, opt, scaler, config)  # a good step: the optimizer has its state now
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    hook = model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    step(model, opt, scaler, config)
    hook.remove()
    assert scaler.skipped == 1 and scaler.get_scale() == 2.0**15  # halved from 2**16
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v))
    assert lines == [
        "float16: a gradient overflowed, so the step was skipped and the loss scale lowered from 65536 to 32768 (1 skipped so far)"
    ]
    step(model, opt, scaler, config)  # and the next step goes on
    assert scaler.skipped == 1 and not torch.equal(weights["lm_head.weight"], model.lm_head.weight)


def test_clipping_sees_the_true_gradient_not_the_scaled_one(monkeypatch):
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(clip(params, max_norm)))
    config = TrainConfig(grad_clip=1.0)
    for scaler in (None, LossScaler("cpu")):  # the same first step, without and with the scale of 65536
        model = tiny_model()
        step(model, make_optimizer(model, config, "cpu"), scaler, config)
    assert norms[1].item() == pytest.approx(norms[0].item(), rel=1e-2)


def test_the_scaler_state_round_trips_with_its_count():
    scaler = LossScaler("cpu", init_scale=1024.0)
    scaler.skipped = 3
    again = LossScaler("cpu")
    again.load_state_dict(scaler.state_dict())
    assert again.get_scale() == 1024.0 and again.skipped == 3 and again.state_dict() == scaler.state_dict()


def test_a_float16_run_resumes_exactly_with_the_scaler_in_the_checkpoint(data_dir, tmp_path, monkeypatch):
    """A scale that starts too high and grows every 3 good steps overflows again and again, so
    the run skips steps all along: stopped at step 10 and resumed to 30, it must skip the
    same steps at the same scale as a run straight to 30, which the scaler's state in the
    checkpoint makes so (without it the resumed run starts again at the first scale)."""
    monkeypatch.setattr(train, "LossScaler", functools.partial(LossScaler, init_scale=2.0**24, growth_interval=3))
    kw = dict(
        dtype="float16", dropout=0.1, eval_interval=10, max_iters=30, lr_decay_iters=30, sample_chars=0, eval_sample_chars=0
    )
    logs = {}
    for name, overrides in (("a", {}), ("b", {"max_iters": 10}), ("b2", {"init_from": "resume"})):
        logs[name] = []
        out = tmp_path / name.rstrip("2")
        train.train(*tiny_configs(data_dir, out, **{**kw, **overrides}), log=logs[name].append)
    a, b = (load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in "ab")
    assert a["scaler"]["skipped"] > 5 and a["scaler"] == b["scaler"]
    assert any("skipped so far" in line for line in logs["b2"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
