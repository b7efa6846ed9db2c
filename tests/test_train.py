"""The training loop: it learns, checkpoints round-trip, resume is exact, bad input is a clear error."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import train
from chargpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from chargpt.data import BatchSampler
from conftest import ROOT, tiny_configs, tiny_flags
from model import GPT, GPTConfig


def run(data_dir, out_dir, **overrides):
    lines = []
    summary = train.train(*tiny_configs(data_dir, out_dir, **overrides), log=lines.append)
    return summary, "\n".join(lines)


def val_losses(log):
    return [float(v) for v in re.findall(r"step \d+: train loss \S+, val loss (\d+\.\d+)", log)]


def test_short_run_lowers_val_loss_and_writes_outputs(data_dir, tmp_path):
    out = tmp_path / "out"
    summary, log = run(data_dir, out)
    losses = val_losses(log)
    assert len(losses) == 3  # steps 0, 20, 40
    assert losses[-1] < losses[0] - 0.5, log
    assert re.search(r"iter 10: loss \d+\.\d+, lr .*ms/iter.*tokens/s", log)
    for name in ("ckpt.pt", "best.pt", "config.json", "samples.txt"):
        assert (out / name).exists(), name
    assert len((out / "samples.txt").read_text(encoding="utf-8")) == 51  # the start newline + 50
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] == 40 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert ckpt["best_val_loss"] == pytest.approx(min(losses), abs=1e-4)


def test_muon_run_learns_and_uses_muon_for_the_block_matrices_only(data_dir, tmp_path):
    summary, log = run(data_dir, tmp_path / "out", optimizer="muon", muon_lr=0.02, sample_chars=0)
    losses = val_losses(log)
    assert losses[-1] < losses[0] - 0.5, log
    state = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["optimizer"]
    muon_group, *adamw_groups = state["param_groups"]
    assert muon_group["muon"] and not any(g["muon"] for g in adamw_groups)
    # 2 layers x (qkv, proj, fc1, fc2) matrices; embeddings and lm_head go to AdamW
    assert len(muon_group["params"]) == 8 and len(adamw_groups[0]["params"]) == 3


def test_a_muon_run_does_not_import_torch_dynamo(data_dir, tmp_path):
    """torch._dynamo takes 1.5 s to import, a tenth of the CPU recipe's run: neither the
    memory check nor the optimizer may pull it in (only --compile needs it)."""
    flags = tiny_flags(
        data_dir,
        tmp_path / "o",
        dtype="auto",
        n_layer=1,
        n_embd=16,
        block_size=8,
        max_iters=2,
        eval_iters=1,
        optimizer="muon",
        sample_chars=0,
    )
    code = f"import sys, train; assert train.main({flags!r}) == 0; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout


def test_best_val_loss_is_never_replaced_by_a_worse_one(data_dir, tmp_path):
    # a learning rate this high makes the val loss bounce: best.pt must keep the best
    out = tmp_path / "out"
    _, log = run(data_dir, out, learning_rate=0.05, min_lr=0.05, max_iters=60, eval_interval=10, grad_clip=0.0)
    losses = val_losses(log)
    best = load_checkpoint(str(out / "best.pt"))
    latest = load_checkpoint(str(out / "ckpt.pt"))
    assert best["best_val_loss"] == latest["best_val_loss"] == pytest.approx(min(losses), abs=1e-4)
    assert best["iter_num"] == 10 * losses.index(min(losses))


def test_save_load_gives_identical_logits(tmp_path):
    config = GPTConfig(block_size=16, vocab_size=7, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config).eval()
    torch.nn.init.normal_(model.lm_head.weight)
    path = str(tmp_path / "m.pt")
    save_checkpoint({"model": model.state_dict(), "model_config": vars(config), "vocab": "abcdefg", "iter_num": 0}, path)
    loaded, tokenizer = model_from_checkpoint(load_checkpoint(path))
    idx = torch.randint(0, 7, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert tokenizer.chars == "abcdefg"


# the CPU recipe's model options (config/shakespeare_char_cpu.py), on the tiny model
RECIPE_OPTIONS = dict(position="rotary", qk_norm=True, bias=False, zero_proj=True)


@pytest.mark.parametrize("optimizer, options", [("adamw", {}), ("muon", {}), ("muon", RECIPE_OPTIONS)])
def test_resume_is_exact(data_dir, tmp_path, optimizer, options):
    """Stopped at step 10 and resumed to 30, the weights equal a run straight to 30, bit for bit,
    with dropout on (so the RNG state must come back too), with either optimizer and with
    the CPU recipe's model options."""
    # the schedule must not depend on where the run stops, so lr_decay_iters is pinned
    kw = dict(dropout=0.1, eval_interval=10, max_iters=30, lr_decay_iters=30, sample_chars=0, optimizer=optimizer, **options)
    run(data_dir, tmp_path / "a", **kw)
    run(data_dir, tmp_path / "b", **{**kw, "max_iters": 10})
    summary, log = run(data_dir, tmp_path / "b", **{**kw, "init_from": "resume"})
    assert "resuming from" in log and summary["iter_num"] == 30
    a = load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["best_val_loss"] == b["best_val_loss"]


def test_resume_rejects_another_optimizer(data_dir, tmp_path):
    run(data_dir, tmp_path / "o", max_iters=4, eval_interval=2, sample_chars=0, optimizer="muon")
    with pytest.raises(ValueError, match="--optimizer=adamw differs from the 'muon'"):
        run(data_dir, tmp_path / "o", init_from="resume", max_iters=8, optimizer="adamw")


def test_resume_rejects_a_different_model(data_dir, tmp_path):
    run(data_dir, tmp_path / "o", max_iters=5, eval_interval=5, sample_chars=0)
    with pytest.raises(ValueError, match="--n_layer=3 does not match n_layer=2"):
        run(data_dir, tmp_path / "o", init_from="resume", n_layer=3)


def main_error(capsys, argv):
    """Run train.py's main in-process; return its exit code and stderr."""
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset=nothere"], "data/nothere/train.bin not found"),
        (["--block_size=5000"], "--block_size=5000 is longer than the val split"),
        (["--batch_size=0"], "--batch_size must be at least 1"),
        (["--max_iters=-1"], "--max_iters must be 0 or more"),
        (["--eval_sample_chars=-1"], "--eval_sample_chars must be 0 or more"),
        (["--init_from=resume"], "no checkpoint at"),
        (["--init_from=maybe"], "--init_from must be"),
        (["--dtype=float64"], "--dtype must be"),
        (["--optimizer=sgd"], "--optimizer must be 'adamw' or 'muon'"),
        (["--muon_lr=-1"], "--muon_lr must be a finite number >= 0"),
        (["--time_budget=-1"], "--time_budget must be a finite number >= 0, got -1.0"),
        (["--time_budget=nan"], "--time_budget must be a finite number >= 0"),
        (["--time_budget=15m"], "--time_budget expects a number, got '15m'"),
        (["--lr_schedule=linear"], "--lr_schedule must be 'cosine' or 'wsd'"),
        (["--cooldown_frac=1.5"], "--cooldown_frac must be in [0, 1], got 1.5"),
        (["--device=tpu"], "--device"),
        (["--n_head=3"], "--n_embd=32 must be divisible by --n_head=3"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(data_dir, tmp_path, capsys, flags, message):
    base = [
        f"--data_dir={data_dir}",
        "--dataset=tiny",
        f"--out_dir={tmp_path / 'o'}",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=16",
        "--device=cpu",
        "--max_iters=2",
    ]
    code, err = main_error(capsys, base + flags)
    assert code == 1
    assert len(err.splitlines()) == 1 and message.replace("data/", os.path.join(data_dir, "")) in err or message in err, err
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_device_mps_on_a_machine_without_it_is_one_line(data_dir, tmp_path, capsys):
    code, err = main_error(capsys, [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={tmp_path / 'o'}", "--device=mps"])
    assert code == 1 and err == "train.py: error: --device=mps but MPS is not available here (try --device=cpu)"
    assert not os.path.exists(tmp_path / "o")


def test_out_dir_that_is_a_file(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = main_error(capsys, [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={blocker}", "--device=cpu"])
    assert code == 1 and str(blocker) in err
    assert blocker.read_text() == "not a folder"


def test_sigterm_saves_and_resumes(data_dir, tmp_path):
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--data_dir={data_dir}",
        "--dataset=tiny",
        f"--out_dir={out}",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=16",
        "--device=cpu",
        "--dtype=float32",
        "--max_iters=100000",
        "--eval_interval=100000",
        "--eval_iters=2",
        "--log_interval=1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    for line in proc.stdout:  # wait until it is really training
        if line.startswith("iter 5:"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saved" in stdout and "Traceback" not in stderr
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] >= 5


def test_resume_without_the_model_flags_takes_the_checkpoints(data_dir, tmp_path):
    run(data_dir, tmp_path / "o", max_iters=5, eval_interval=5, sample_chars=0)
    config, _ = tiny_configs(data_dir, tmp_path / "o", init_from="resume", max_iters=8, sample_chars=0)
    summary = train.train(config, GPTConfig(), log=lambda m: None)  # every model key at its default
    assert summary["iter_num"] == 8
    assert load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))["model_config"]["n_embd"] == 32


def test_epoch_order_visits_every_window_once_per_epoch():
    import numpy as np

    # token i is i, so a window's first token is where it starts
    sampler = BatchSampler(np.arange(1000, dtype=np.int64), block_size=10, batch_size=7, seed=0, order="epoch")
    starts = []
    for _ in range(14):  # 98 of the first epoch's 99 windows
        x, y = sampler.next("cpu")
        assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        starts += x[:, 0].tolist()
    offset = starts[0] % 10
    assert all(s % 10 == offset for s in starts)  # one cut of the array ...
    assert len(set(starts)) == len(starts)  # ... no window twice within the epoch


@pytest.mark.parametrize("order", ["random", "epoch"])
def test_resume_is_exact_with_either_data_order(data_dir, tmp_path, order):
    kw = dict(eval_interval=10, max_iters=30, lr_decay_iters=30, sample_chars=0, data_order=order, batch_size=16)
    run(data_dir, tmp_path / "a", **kw)
    run(data_dir, tmp_path / "b", **{**kw, "max_iters": 10})
    run(data_dir, tmp_path / "b", **{**kw, "init_from": "resume"})
    a = load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_max_iters_below_the_checkpoint_is_refused(data_dir, tmp_path):
    """Resuming a run at step 10 with --max_iters=5 would never stop (the loop ends when the
    step equals max_iters), and with --max_iters=10 it has nothing to do: both are refused in
    one line, and the checkpoint stays as it was."""
    run(data_dir, tmp_path / "o", max_iters=10, eval_interval=5, sample_chars=0)
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--max_iters=5: .*ckpt.pt is already past it, at step 10; pass a --max_iters above 10"):
        run(data_dir, tmp_path / "o", init_from="resume", max_iters=5)
    with pytest.raises(ValueError, match=r"--max_iters=10: .*ckpt.pt is there already: the run finished at step 10"):
        run(data_dir, tmp_path / "o", init_from="resume", max_iters=10)
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before
    summary, _ = run(data_dir, tmp_path / "o", init_from="resume", max_iters=12, sample_chars=0)
    assert summary["iter_num"] == 12


def test_files_a_run_writes_get_the_users_permissions(data_dir, tmp_path):
    """Checkpoints, loss.png and the token files are written to a temporary file and renamed;
    they still get the permissions of any file the user makes (0666 less the umask), as
    config.json always did, not a temporary file's 0600."""
    from prepare import prepare

    old = os.umask(0o027)
    try:
        prepare("hello world, hello there\n" * 50, str(tmp_path / "data" / "t"))
        run(data_dir, tmp_path / "o", max_iters=4, eval_interval=2, sample_chars=5)
    finally:
        os.umask(old)
    written = [tmp_path / "data" / "t" / n for n in ("train.bin", "val.bin", "meta.json")]
    written += [tmp_path / "o" / n for n in ("ckpt.pt", "best.pt", "loss.png", "config.json", "metrics.jsonl", "samples.txt")]
    for path in written:
        assert oct(path.stat().st_mode & 0o777) == oct(0o640), path


def test_ctrl_c_prints_a_command_that_resumes_from_the_folder_alone(data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 7 prints the whole command that continues the run; run as printed, with
    nothing repeated (no config file, no model or optimizer flags), it takes the settings
    from the checkpoint and ends with the weights of a run that was never stopped."""
    import shlex

    kw = dict(optimizer="muon", dropout=0.1, eval_interval=10, max_iters=30, sample_chars=0, eval_sample_chars=0)
    train.main(tiny_flags(data_dir, tmp_path / "a", **kw))
    logged = train.log_step

    def ctrl_c_at_step_7(run, loss, lr):
        logged(run, loss, lr)
        if run.iter_num == 7:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the loop saves at the next step boundary

    monkeypatch.setattr(train, "log_step", ctrl_c_at_step_7)
    assert train.main(tiny_flags(data_dir, tmp_path / "b", **kw)) == 128 + signal.SIGINT
    monkeypatch.setattr(train, "log_step", logged)
    said = capsys.readouterr().out
    command = re.search(r"SIGINT: saved \S+ at step 7; continue with: (.*)", said).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train.py"] and argv[2:] == [f"--out_dir={tmp_path / 'b'}", "--init_from=resume"]
    assert train.main(argv[2:]) == 0
    assert "resuming from" in capsys.readouterr().out
    a = load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert b["iter_num"] == 30 and b["train_config"]["optimizer"] == "muon"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_resume_takes_the_runs_settings_and_flags_override_them(data_dir, tmp_path):
    """The stored settings are the base of a resume: a flag still wins where a resume allows a
    change (a longer max_iters), and is refused, naming it, where it does not (another shape)."""
    train.main(tiny_flags(data_dir, tmp_path / "o", max_iters=10, eval_interval=5, sample_chars=0, overwrite=True))
    out = f"--out_dir={tmp_path / 'o'}"
    config, model_config = train.read_settings([out, "--init_from=resume", "--max_iters=16"])
    assert (config.max_iters, config.eval_interval, config.batch_size, config.dataset) == (16, 5, 8, "tiny")
    assert (model_config.n_embd, model_config.n_layer, config.overwrite) == (32, 2, False)
    assert train.main([out, "--init_from=resume", "--max_iters=16"]) == 0
    assert load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))["iter_num"] == 16
    with pytest.raises(ValueError, match="--n_embd=64 does not match n_embd=32"):
        train.train(*train.read_settings([out, "--init_from=resume", "--max_iters=20", "--n_embd=64"]), log=lambda m: None)


def test_the_start_says_what_the_run_costs_and_a_long_cpu_run_points_at_the_small_recipe(data_dir, tmp_path, monkeypatch):
    """With a clock slowed to 30 s between its readings, a step and an eval batch time at
    30 s: 40 steps and 3 evals of 2 x 5 batches are 35 minutes, so the line says so and names
    the CPU recipe; with the true clock the same run is quick and says nothing more."""
    import itertools

    _, log = run(data_dir, tmp_path / "quick", sample_chars=0)
    cost = [line for line in log.splitlines() if line.startswith("cost: ")]
    assert len(cost) == 1 and "40 steps of" in cost[0] and "3 evals of 2 x 5 batches" in cost[0]
    assert "shakespeare_char_cpu" not in cost[0]
    ticks = itertools.count(0.0, 30.0)
    monkeypatch.setattr(train, "clock", lambda: next(ticks))
    _, log = run(data_dir, tmp_path / "slow", sample_chars=0)
    cost = next(line for line in log.splitlines() if line.startswith("cost: "))
    assert cost.startswith("cost: about 35m00s here (cpu): 40 steps of 30,000 ms (the first ones, timed)"), cost
    assert cost.endswith("Something small first (a model in about a minute): python train.py config/shakespeare_char_cpu.py")
    # with a 10-minute budget the budget ends it first: (600 s - 3 evals of 300 s) buys no step at 30 s
    _, log = run(data_dir, tmp_path / "budget", sample_chars=0, time_budget=10.0)
    cost = next(line for line in log.splitlines() if line.startswith("cost: "))
    assert cost.startswith("cost: about 10m00s here") and "the 10-minute budget ends it first, after about 0 of them" in cost


def test_timing_the_first_steps_changes_nothing_in_the_run(data_dir, tmp_path, monkeypatch):
    """The cost line's timed passes put the random streams back and drop their gradients:
    the run ends with the weights of a run without them, bit for bit (dropout on)."""
    kw = dict(dropout=0.1, max_iters=20, eval_interval=10, sample_chars=0)
    run(data_dir, tmp_path / "timed", **kw)
    monkeypatch.setattr(train, "time_a_step", lambda run: (0.001, 0.001))
    run(data_dir, tmp_path / "untimed", **kw)
    a = load_checkpoint(str(tmp_path / "timed" / "ckpt.pt"))
    b = load_checkpoint(str(tmp_path / "untimed" / "ckpt.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_opening_lines_name_a_constant_learning_rate_and_what_each_loss_line_is(data_dir, tmp_path):
    """The lecture's stages keep the learning rate constant (min_lr = learning_rate, no
    warmup): the log says so, not 'cosine schedule after 0 warmup steps'; and it says once
    which loss line is the estimate and which one batch."""
    _, log = run(data_dir, tmp_path / "c", max_iters=4, eval_interval=2, sample_chars=0, min_lr=3e-3, warmup_iters=0)
    assert "AdamW lr 0.003, constant (min_lr = learning_rate, no warmup)" in log and "cosine" not in log
    assert "log: 'step N: train loss, val loss' is the estimate, the mean over eval_iters=5 batches" in log
    _, log = run(data_dir, tmp_path / "s", max_iters=4, eval_interval=2, sample_chars=0)
    assert "cosine schedule after 5 warmup steps" in log
