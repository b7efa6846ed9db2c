"""The learning-rate schedule by progress, and runs with a time budget: they stop within it,
their steps are in metrics.jsonl, and a resumed run spends only what is left."""

import io
import itertools
import json
import math
import re

import pytest
import torch

import train
from chargpt import health, metrics
from chargpt.checkpoint import budget_change_note, load_checkpoint
from chargpt.config import TrainConfig
from chargpt.schedule import SAFETY, RunProgress, get_lr, schedule_lr, step_progress
from conftest import tiny_configs

# what the budget runs below may go past their budget: the process's own hiccups on a shared
# machine, not the run's decisions (those are tested with fixed numbers)
SLACK_SECONDS = 1.0


def old_get_lr(it, config):
    """train.get_lr before the schedule went by progress: step runs must keep it bit for bit."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= decay_iters:
        return config.min_lr
    progress = (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(max_iters=4500, learning_rate=2e-3, min_lr=2e-4),
        dict(max_iters=40, warmup_iters=5, lr_decay_iters=60),
        dict(max_iters=3000, warmup_iters=0, learning_rate=1e-2, min_lr=1e-3),
        dict(max_iters=4, warmup_iters=5),  # warmup longer than the run
        dict(max_iters=5000, learning_rate=3e-4, min_lr=3e-4, warmup_iters=0),
    ],
)
def test_cosine_step_schedule_is_unchanged_bit_for_bit(kw):
    config = TrainConfig(**kw)
    for it in range(0, config.max_iters + 20, max(1, config.max_iters // 997)):
        assert get_lr(it, config) == old_get_lr(it, config), it


def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr():
    config = TrainConfig(max_iters=1100, warmup_iters=100, learning_rate=1e-2, min_lr=1e-3, lr_schedule="wsd", cooldown_frac=0.2)
    lrs = [get_lr(it, config) for it in range(config.max_iters + 1)]
    assert lrs[0] == pytest.approx(1e-2 / 101) and lrs[99] == pytest.approx(1e-2 * 100 / 101)  # warmup in steps
    assert all(lr == 1e-2 for lr in lrs[100:900])  # stable: p < 0.8 of the 1000 steps after warmup
    cooldown = lrs[900:]
    assert cooldown[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))
    assert lrs[1000] == pytest.approx(1e-3 + 9e-3 * 0.5)  # halfway down the straight line
    assert lrs[1100] == 1e-3 and get_lr(5000, config) == 1e-3
    # the schedule over progress, as a budget run uses it
    assert schedule_lr(0.0, config) == schedule_lr(0.79, config) == 1e-2
    assert schedule_lr(0.9, config) == pytest.approx(5.5e-3) and schedule_lr(1.0, config) == 1e-3
    assert schedule_lr(0.5, TrainConfig(lr_schedule="wsd", cooldown_frac=0.0)) == TrainConfig().learning_rate


def test_budget_progress_drives_the_lr_and_warmup_stays_in_steps():
    config = TrainConfig(time_budget=10.0, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100)
    assert get_lr(10, config, progress=0.0) == pytest.approx(1e-3 * 11 / 101)  # warming up, whatever the time
    assert get_lr(500, config, progress=0.5) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine at half the budget
    assert get_lr(500, config, progress=1.0) == 1e-4
    # a budget that ends inside the warmup still decays: the lower of the two
    assert get_lr(10, config, progress=0.99) == schedule_lr(0.99, config) < 1e-3 * 11 / 101
    assert step_progress(0, config) == 0.0 and step_progress(config.max_iters, config) == 1.0


def test_run_progress_stops_a_budget_run_in_time_from_measured_costs():
    config = TrainConfig(time_budget=1.0, sample_chars=100)  # 60 s
    progress = RunProgress(config)
    # nothing measured yet: only the budget itself stops the run
    assert progress.at(0, 59.0, eval_due=True) == (59.0 / 60, False)
    assert progress.at(0, 61.0, eval_due=True) == (1.0, True)
    progress.measure_eval(5.0)
    progress.measure_step(1.0)  # the pace of the machine at that eval
    progress.measure_sample(0.5, 50)  # 10 ms a character: samples.txt takes 1 s
    final = SAFETY * (5.0 + 1.0)
    assert progress.final_seconds() == pytest.approx(final)
    # the schedule ends with the last step, before the final eval and sample
    assert progress.at(120, 30.0, eval_due=False)[0] == pytest.approx(30.0 / (60 - final))
    p_last = progress.at(120, 60 - 1.0 - final - 0.01, eval_due=False)[0]
    assert 0.97 < p_last < 1.0
    assert not progress.at(120, 60 - 1.0 - final - 0.01, eval_due=False)[1]
    assert progress.at(120, 60 - 1.0 - final + 0.01, eval_due=False)[1]
    # an eval due now costs its time too
    assert progress.at(100, 60 - 1.0 - final - 0.01, eval_due=True)[1]
    assert not progress.at(100, 60 - 1.0 - final - SAFETY * 5.0 - 0.01, eval_due=True)[1]
    # steps three times slower than at the eval: the end will be too
    for _ in range(200):
        progress.measure_step(3.0)
    assert progress.slowdown() == pytest.approx(3.0) and progress.final_seconds() == pytest.approx(3 * final)
    # the measurements go into the checkpoint and come back
    again = RunProgress(config)
    again.load_state_dict(json.loads(json.dumps(progress.state_dict())))
    assert again.state_dict() == progress.state_dict()


def test_a_step_run_ends_at_max_iters_whatever_the_time():
    progress = RunProgress(TrainConfig(max_iters=50, warmup_iters=10))
    progress.measure_eval(1e6)
    assert progress.at(49, 1e9, eval_due=True) == (step_progress(49, progress.config), False)
    assert progress.at(50, 0.0, eval_due=False) == (1.0, True)
    assert not progress.needs_sample_rate()


def test_budget_change_on_resume_is_a_note():
    ckpt = {"train_config": {"time_budget": 15.0}}
    assert budget_change_note(ckpt, "o/ckpt.pt", TrainConfig(time_budget=15.0)) is None
    note = budget_change_note(ckpt, "o/ckpt.pt", TrainConfig(time_budget=20.0))
    assert "a time budget of 15 min" in note and "--time_budget=20" in note
    note = budget_change_note({"train_config": {"max_iters": 100}}, "o/ckpt.pt", TrainConfig(time_budget=1.5))
    assert "max_iters (no time budget)" in note and "--time_budget=1.5" in note


def test_budget_progress_line_shows_the_time_left(tmp_path, monkeypatch):
    """The time left: the budget's, or the steps' to max_iters when they will end the run first."""
    lines, terminal = [], io.StringIO()
    # a clock that moves a millisecond a reading, whatever the machine does: "elapsed 5s" stays 5s
    ticks = itertools.count()
    now = metrics.time.time()
    monkeypatch.setattr(metrics.time, "time", lambda: now + next(ticks) * 1e-3)
    start = now - 5.0
    report = metrics.Reporter(str(tmp_path), lines.append, terminal, 0, 5000, 128, resume=False, time_budget=60.0, t_start=start)
    report.t_loop -= 5.0  # 10 steps in 5 s: 5,000 would take 40 minutes, so the budget ends first
    report.show_live(10, 2.5, 1e-3)
    assert re.search(
        r"^\riter 10/5000 \| loss 2\.5000 \| lr 1\.00e-03 \| \S+ tokens/s \| elapsed 5s \| 5\ds left", terminal.getvalue()
    )
    plain = metrics.Reporter(str(tmp_path), lines.append, None, 0, 5000, 128, resume=False, time_budget=60.0, t_start=start)
    plain.t_loop -= 5.0
    plain.train_step(20, 2.5, 1e-3, 1e6)
    assert re.search(r"elapsed 5s, 5\ds left$", lines[-1])
    plain.train_step(4990, 2.5, 1e-3, 1e6)  # 10 steps from max_iters at 1 ms a step: they end first
    assert re.search(r"elapsed 5s, [0-2]s left$", lines[-1])
    plain.done(20, 2.4)
    assert lines[-2].startswith("done: budget of 1 min spent: 20 steps in 5.")
    assert lines[-1].startswith("note: the 1-minute budget bought 20 of the 5,000 steps this run plans")


@pytest.fixture(scope="module", autouse=True)
def steady():
    """One thread: on a busy 2-core machine two threads wait for each other at every operation
    and a tiny step takes anywhere from 5 to 300 ms. And a process's first optimizer imports
    torch._dynamo, a second or more: a real part of a fresh run's time, but not what the
    budget runs here are about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    yield
    torch.set_num_threads(threads)


def budget_run(data_dir, out_dir, monkeypatch, **overrides):
    # the plots' first drawing costs matplotlib's import, a second on a busy machine: not what these tests are
    # about (health.png is drawn after the run's last record, outside the time it counts)
    monkeypatch.setattr(metrics, "plot_losses", lambda *args: True)
    monkeypatch.setattr(health, "draw_health", lambda *args: True)
    lines = []
    # max_iters far away: the budget ends these runs
    kw = dict(time_budget=0.05, max_iters=100_000, eval_interval=50, eval_iters=2, sample_chars=50, eval_sample_chars=0)
    summary = train.train(*tiny_configs(data_dir, out_dir, **{**kw, **overrides}), log=lines.append)
    return summary, lines


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_time_budget_run_stops_within_its_budget(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    summary, lines = budget_run(data_dir, out, monkeypatch)
    assert "100,000 steps or 0.05 minutes, whichever comes first" in "\n".join(lines)
    done = records(out)[-1]
    assert done["type"] == "done" and done["time_budget"] == 0.05
    assert done["iter"] == summary["iter_num"] > 2  # the budget ended it
    assert done["elapsed"] <= 3.0 + SLACK_SECONDS
    assert re.fullmatch(
        rf"done: budget of 0\.05 min spent: {summary['iter_num']:,} steps in \d+\.\ds.*, best val loss \d\.\d+", lines[-2]
    )
    # far fewer steps than the run planned: the last line says so, and how to get them
    assert re.fullmatch(
        rf"note: the 0\.05-minute budget bought {summary['iter_num']:,} of the 100,000 steps this run plans at [\d,]+ ms a "
        r"step here, so the model is undertrained .*: for all of them, --time_budget=\S+ or --time_budget=0 \(about .*",
        lines[-1],
    )
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] == summary["iter_num"] and 0 < ckpt["elapsed"] <= done["elapsed"]
    assert (out / "samples.txt").exists()
    steps = [r for r in records(out) if r["type"] == "train"]
    assert all(r["eta"] <= 3.0 for r in steps)  # the time left in the budget


def test_resume_spends_only_the_rest_of_the_budget(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    calls = []

    def stop_after_5_steps(self, ddp, device):  # as if Ctrl-C came at step 5
        calls.append(1)
        return len(calls) > 5

    budget = dict(time_budget=0.1, log_interval=1)  # 6 s, for room after the stop
    with monkeypatch.context() as m:
        m.setattr(train.StopRequested, "requested", stop_after_5_steps)
        summary, _ = budget_run(data_dir, out, monkeypatch, **budget)
    assert summary["stopped"] and summary["iter_num"] == 5
    spent = load_checkpoint(str(out / "ckpt.pt"))["elapsed"]
    assert 0 < spent < 6.0
    t0 = metrics.time.time()
    summary, lines = budget_run(data_dir, out, monkeypatch, init_from="resume", **budget)
    wall = metrics.time.time() - t0
    assert summary["iter_num"] > 5 and not any("was trained with" in line for line in lines)
    assert wall <= 6.0 - spent + SLACK_SECONDS  # only what was left
    rows = records(out)
    assert [r["type"] for r in rows].count("done") == 1
    done = rows[-1]
    assert done["iter"] == summary["iter_num"] and spent < done["elapsed"] <= 6.0 + SLACK_SECONDS
    resumed = [r for r in rows if r["type"] == "train" and r["iter"] > 5]
    assert resumed and resumed[0]["elapsed"] > spent  # the clock went on from the checkpoint's time


def test_max_iters_ends_a_budget_run_when_it_comes_first(data_dir, tmp_path, monkeypatch):
    """A flag's max_iters on a recipe with a time budget is obeyed: the run stops at
    whichever comes first, and the schedule follows the nearer (here the steps, exactly)."""
    summary, lines = budget_run(data_dir, tmp_path / "o", monkeypatch, time_budget=5.0, max_iters=12, log_interval=1)
    assert summary["iter_num"] == 12
    assert lines[-1].startswith("done: 12 steps in ")  # not "budget spent", and no note
    config, _ = tiny_configs(data_dir, tmp_path / "o", max_iters=12)
    lrs = [r["lr"] for r in records(tmp_path / "o") if r["type"] == "train"]
    assert lrs == pytest.approx([get_lr(it, config) for it in range(12)], rel=1e-4)


def test_resuming_a_spent_budget_is_refused_with_the_way_on(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    budget_run(data_dir, out, monkeypatch)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--time_budget=0\.05: .*ckpt.pt has spent it .*pass a larger --time_budget"):
        budget_run(data_dir, out, monkeypatch, init_from="resume")
    assert (out / "ckpt.pt").read_bytes() == before
    steps = load_checkpoint(str(out / "ckpt.pt"))["iter_num"]
    summary, _ = budget_run(data_dir, out, monkeypatch, init_from="resume", time_budget=0.0, max_iters=steps + 3)
    assert summary["iter_num"] == steps + 3  # without the budget it goes on to max_iters
