"""torchrun with 2 processes on the CPU (gloo): the same step as one process over the same
global batch, a run that learns, and checkpoints that resume and sample anywhere."""

import os
import re
import subprocess
import sys

import torch

import train
from chargpt.checkpoint import load_checkpoint
from chargpt.data import BatchSampler, load_dataset
from chargpt.optim import make_optimizer
from conftest import ROOT, tiny_configs, tiny_flags
from model import build_model


def flags(data_dir, out_dir, **extra):
    return tiny_flags(
        data_dir, out_dir, **{"batch_size": 8, "warmup_iters": 5, "eval_iters": 4, "log_interval": 5, "sample_chars": 0, **extra}
    )


def torchrun(args, nproc=2, check=True):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if not check:
        return result
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_one_step_on_two_processes_equals_one_process_on_the_global_batch(data_dir, tmp_path):
    out = tmp_path / "ddp"
    stdout = torchrun(flags(data_dir, out, max_iters=1, eval_interval=100))
    assert "global batch 8 x 1 accumulation x 2 processes = 16 sequences" in stdout
    ddp_weights = load_checkpoint(str(out / "ckpt.pt"))["model"]

    # the same step by hand in one process: rank r draws its batches with seed + r
    config, model_config = tiny_configs(data_dir, tmp_path / "ref")
    train_data, _, tokenizer = load_dataset(config)
    model_config.vocab_size = tokenizer.vocab_size
    batches = [BatchSampler(train_data, 16, 8, config.seed + rank).next("cpu") for rank in (0, 1)]

    def one_step(xs, ys):
        torch.manual_seed(config.seed)
        model = build_model(model_config)
        optimizer = make_optimizer(model, config, "cpu")
        for group in optimizer.param_groups:
            group["lr"] = train.get_lr(0, config)
        _, loss = model(torch.cat(xs), torch.cat(ys))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        return model.state_dict()

    reference = one_step([b[0] for b in batches], [b[1] for b in batches])
    for key, value in reference.items():
        assert torch.allclose(ddp_weights[key], value, atol=1e-6), key
    # and the check can tell: rank 0's half of the batch alone gives other weights
    half = one_step([batches[0][0]], [batches[0][1]])
    assert any(not torch.allclose(ddp_weights[k], half[k], atol=1e-6) for k in half)


def test_two_process_run_learns_resumes_and_samples(data_dir, tmp_path):
    out = tmp_path / "ddp"
    stdout = torchrun(flags(data_dir, out, max_iters=40, eval_interval=20, lr_decay_iters=60))
    losses = [float(v) for v in re.findall(r"step \d+: train loss \S+, val loss (\d+\.\d+)", stdout)]
    assert len(losses) == 3, stdout  # steps 0, 20, 40, printed by rank 0 only
    assert losses[-1] < losses[0] - 0.5

    # resume under torchrun: 40 -> 60 equals a straight run to 60, bit for bit
    straight = tmp_path / "straight"
    torchrun(flags(data_dir, straight, max_iters=60, eval_interval=20, lr_decay_iters=60))
    stdout = torchrun(flags(data_dir, out, max_iters=60, eval_interval=20, lr_decay_iters=60, init_from="resume"))
    assert "resuming from" in stdout
    a = load_checkpoint(str(out / "ckpt.pt"))
    b = load_checkpoint(str(straight / "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 60
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    # the DDP checkpoint goes on in a single process and samples
    lines = []
    config, model_config = tiny_configs(data_dir, out, init_from="resume", max_iters=65, lr_decay_iters=60, sample_chars=0)
    assert train.train(config, model_config, log=lines.append)["iter_num"] == 65
    assert any("written by 2 process(es)" in line for line in lines)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out}", "--max_new_tokens=40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and len(result.stdout) == 42, result.stderr


def test_two_process_budget_run_stops_together(data_dir, tmp_path):
    """With a time budget rank 0's clock decides for both processes: they stop at the same
    step (a process that went on alone would hang the other in its next collective)."""
    out = tmp_path / "ddp"
    stdout = torchrun(flags(data_dir, out, time_budget=0.15, max_iters=100_000, eval_interval=50, sample_chars=20))
    steps = int(re.search(r"done: budget of 0\.15 min spent: ([\d,]+) steps", stdout).group(1).replace(",", ""))
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == steps


def test_a_run_refused_by_rank_0_stops_every_process(data_dir, tmp_path):
    """Only rank 0 locks out_dir and looks for a trained model in it; when it refuses, the
    other process must stop too instead of waiting for it in a collective."""
    out = tmp_path / "o"
    train.train(
        *tiny_configs(data_dir, out, max_iters=2, eval_interval=2, sample_chars=0, eval_sample_chars=0), log=lambda m: None
    )
    before = (out / "ckpt.pt").read_bytes()
    result = torchrun(flags(data_dir, out, max_iters=4, eval_interval=2), check=False)
    assert result.returncode != 0
    assert result.stderr.count("train.py: error: --out_dir") == 1, result.stderr[-3000:]  # said once, by rank 0
    assert "already holds a trained model (ckpt.pt at step 2" in result.stderr
    assert (out / "ckpt.pt").read_bytes() == before
