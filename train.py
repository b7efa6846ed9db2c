"""Train the lecture's GPT on a prepared character dataset.

    python prepare.py                                  # once: data/shakespeare_char/
    python train.py config/shakespeare_char_cpu.py     # small model, a laptop CPU: 1,000 steps, into out-cpu/
    python train.py config/shakespeare_char.py         # the lecture's quality: 2,600 steps, 13-15 minutes on 2 cores, into out/
    python train.py config/lecture/8_dropout_scaled.py # the lecture's exact model and recipe (a GPU)
    python train.py config/lecture/3_multi_head.py     # one stage of the lecture (see ladder.py)
    python train.py --out_dir=out --init_from=resume   # continue out/ckpt.pt with the settings it was trained with
    python train.py config/shakespeare_char.py --max_iters=4500 --time_budget=35   # longer, a better model
    python train.py config/shakespeare_char_cpu.py --max_iters=20 --eval_interval=10 --out_dir=out-smoke --overwrite=True   # smoke run
    python train.py --help                             # every key, its default and meaning

Settings come from the defaults (TrainConfig in chargpt/config.py, GPTConfig in model.py),
then the config file, then --key=value flags. The run writes into out_dir: config.json
(the resolved settings), ckpt.pt (the latest state, at every eval), best.pt (the best val
loss so far), metrics.jsonl and loss.png (chargpt/metrics.py), health.png (each layer's
activations, gradients and update sizes every health_interval steps: chargpt/health.py)
and, at the end, samples.txt.
Ctrl-C or SIGTERM saves ckpt.pt, prints the command that continues the run and exits;
--init_from=resume continues exactly where the run stopped, with the settings stored in
out_dir/ckpt.pt (a config file or flags given with it override them: --max_iters=N for
more steps; max_iters stays the total number of steps).

Reproducible: the same command gives the same run, bit for bit, when the number of CPU
threads is the same. --threads=0 (the default) trains on the cores other programs leave
free, 1 or 2 of 2 from run to run, and another number of threads adds the float sums in
another order: two runs then differ in the last digits and grow apart
(config/shakespeare_char_cpu.py --max_iters=100: val loss 2.2335 with --threads=1, 2.2333
with --threads=2). --threads=N fixes it: bit-identical runs, and resumes.

A run stops at max_iters steps or, with --time_budget=MINUTES, when the budget is spent,
whichever comes first; the learning rate schedule follows the nearer of the two
(chargpt/schedule.py). The budget counts from the start of train(), loading the data and
building the model included, to the end of samples.txt. A budget run is not bit-for-bit
reproducible: where it stops and its learning rates depend on the clock.

Before its first eval a run times its first passes (forward and backward, then put back:
the run is unchanged) and says in one line what the whole run will cost on this device;
on a CPU, when that is more than half an hour, it names the small recipe to try first.

Before it writes anything, a run claims out_dir (chargpt/rundir.py): it refuses a folder
another run is training in, and a new run refuses a folder that holds a trained model
unless --overwrite=True. It also refuses, with both figures, a run whose estimated memory
(chargpt/memory.py) exceeds what the machine has free.
"""

import dataclasses
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from chargpt import checkpoint as ckpt
from chargpt import machine, rundir
from chargpt.config import HelpRequested, TrainConfig, parse, with_values
from chargpt.data import BatchSampler, load_dataset
from chargpt.engine import sample_text
from chargpt.health import Health
from chargpt.memory import check_training_memory
from chargpt.metrics import Reporter, format_duration
from chargpt.optim import LossScaler, backward, get_batches, make_optimizer, optimizer_step
from chargpt.schedule import SAMPLE_PROBE_CHARS, RunProgress, get_lr
from model import GPTConfig, build_model


def train(config, model_config, log=print, live=None):
    """Run the training loop; return a summary dict (iter_num, best_val_loss, ...).

    log prints a line; live is a terminal stream to redraw a progress line on, or None for
    plain log lines every log_interval steps."""
    t_start = time.time()  # a time budget counts from here: loading the data and building the model are part of the run
    config.validate()
    ddp, device = machine.init_distributed(machine.resolve_device(config.device))
    lock = None
    try:
        lock = rundir.claim_for(config, ddp)  # before anything else touches out_dir
        if not ddp.master:
            log, live = (lambda msg: None), None
        run = setup(config, model_config, ddp, device, log, live, t_start)
        if ddp.master:
            say_the_cost(run, *time_a_step(run))
        summary = training_loop(run)
        if ddp.world_size > 1:
            # Leave together: a process already shutting down while a gloo worker thread still
            # releases the last collective's tensors dies with SIGABRT.
            dist.barrier()
        return summary
    finally:
        if lock is not None:
            lock.release()
        if ddp.world_size > 1:
            dist.destroy_process_group()


def training_loop(run):
    """The lecture's loop: now and then estimate the loss (and save), otherwise take a step."""
    config, progress, report = run.config, run.progress, run.report
    with StopRequested() as stop, report:  # report: the live line is ended however the loop ends
        while True:
            resumed_here = run.iter_num == run.start_iter > 0  # its eval was the last run's
            eval_due = run.iter_num % config.eval_interval == 0 and not resumed_here
            p, last_step = run.where(eval_due)
            lr = run.set_lr(p)

            if (eval_due or last_step) and not resumed_here:
                evaluate_and_save(run, last_step)
                # an eval slower than expected may leave no time for another step: then this was the last
                if not last_step and run.where(eval_due=False)[1]:
                    last_step = True
                    run.save(run.ckpt_path, finished=True)  # mark it: a resume must not go on past the budget
            if last_step:
                break
            if stop.requested(run.ddp, run.device):
                run.save(run.ckpt_path)
                command = rundir.resume_command(config.out_dir, world_size=run.ddp.world_size)
                report.log(f"{stop.signal or 'stop'}: saved {run.ckpt_path} at step {run.iter_num}; continue with: {command}")
                return {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "stopped": stop.signal or "SIGTERM"}

            t_step = time.time()
            watch = run.health.watch(run.iter_num)  # at health steps only: hooks on the model for this step
            model, optimizer = watch.model if watch else run.step_model, run.optimizer
            # the lecture's step (chargpt/optim.py: what each name adds); zero_grad comes first,
            # before the gradients of gradient_accumulation_steps micro-batches add up
            optimizer.zero_grad(set_to_none=True)
            for xb, yb in get_batches(run.batches, config, run.device, model, run.ddp):
                with run.ctx:  # autocast in bfloat16 or float16, or nothing
                    logits, loss = model(xb, yb)
                loss = backward(loss, config, run.scaler)  # loss.backward()
            optimizer_step(optimizer, model, config, run.scaler, watch)  # optimizer.step(), the gradient clipped
            run.health.record(watch)  # the step's activations, gradients and updates, and any warning
            run.iter_num += 1
            log_step(run, loss, lr)
            progress.measure_step(time.time() - t_step)  # the logging's device sync included

    finish(run)
    return {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "elapsed": report.elapsed()}


@torch.no_grad()
def estimate_loss(model, samplers, eval_iters, ctx, device, ddp=None):
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout). The batches
    come from a fresh generator per eval, so every eval of a run sees the same windows. With
    several processes each computes every world_size-th batch and the sums are added up: the
    same number as one process computes, in a fraction of the time."""
    ddp = ddp or machine.Distributed()
    out = {}
    model.eval()
    for split, sampler in samplers.items():
        sampler.reset()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for k in range(eval_iters):
            x, y = sampler.next(device)  # every process draws every batch, to stay in step
            if k % ddp.world_size == ddp.rank:
                with ctx:
                    _, loss = model(x, y)
                total += loss.double()
        out[split] = ddp.sum(total).item() / eval_iters
    model.train()
    return out


def evaluate_and_save(run, last):
    """The loss on both splits, best.pt when val improved, ckpt.pt, and a sample to watch."""
    t_eval = time.time()
    losses = estimate_loss(run.eval_model, run.eval_samplers, run.config.eval_iters, run.ctx, run.device, run.ddp)
    run.report.log(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    run.check_finite(losses.values())
    if losses["val"] < run.best_val_loss:
        run.best_val_loss = losses["val"]
        run.save(run.best_path, with_optimizer=False)
    run.save(run.ckpt_path, finished=last)
    if run.ddp.master:
        # a sample to watch the model improve, timed so that a time budget keeps enough for
        # samples.txt (a short unseen one when evals print none)
        config, progress = run.config, run.progress
        chars = config.eval_sample_chars or (SAMPLE_PROBE_CHARS if progress.needs_sample_rate() else 0)
        t_sample = time.time()
        sample = sample_text(run.model, run.tokenizer, chars, config.seed) if chars else None
        progress.measure_sample(time.time() - t_sample, chars)
        run.report.eval(run.iter_num, losses, run.best_val_loss, sample if config.eval_sample_chars else None, last)
        run.health.eval(run.iter_num, losses)  # the init and overfitting warnings, health.png
    run.progress.measure_eval(time.time() - t_eval)
    if run.threads is not None:
        run.threads.adjust()  # the cores other programs leave free, for the steps until the next eval


def log_step(run, loss, lr):
    """The live line, and every log_interval steps a logged line and metrics entry with the
    loss of every step since the last one (fetched then: one device sync per line)."""
    config, report = run.config, run.report
    run.step_losses.append(loss.detach())
    if report.live_due():  # a terminal on rank 0 only: this process's own loss
        report.show_live(run.iter_num, loss.item() * config.gradient_accumulation_steps, lr)
    if run.iter_num % config.log_interval == 0:
        # with DDP the mean over processes, which all take part
        lossf = run.ddp.sum(loss.detach() * config.gradient_accumulation_steps).item() / run.ddp.world_size
        losses = (torch.stack(run.step_losses) * config.gradient_accumulation_steps).tolist()
        run.step_losses.clear()
        run.check_finite([lossf])
        if config.compile and run.iter_num - run.start_iter == config.log_interval:
            report.log(f"compiled, the first {config.log_interval} steps took {time.time() - run.t_loop:.1f}s")
        report.train_step(run.iter_num, lossf, lr, run.flops_per_iter, losses)


def finish(run):
    """samples.txt, and the run's last line."""
    config = run.config
    if config.sample_chars > 0 and run.ddp.master:
        text = sample_text(run.model, run.tokenizer, config.sample_chars, config.seed)
        with open(os.path.join(config.out_dir, "samples.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        run.report.log(f"sample (also in {config.out_dir}/samples.txt):\n{text}")
    run.report.done(run.iter_num, run.best_val_loss)  # the steps taken (or bought) and the time
    run.health.finish()  # health.png with every health step


# -----------------------------------------------------------------------------
# what the run will cost, said before its first (possibly long) eval

clock = time.perf_counter  # a test slows it down
COST_STEPS = 4  # passes timed at most (the first warms up and is not counted), ...
COST_SECONDS = 1.0  # ... or two once they have taken this long
SMALL_RECIPE = "python train.py config/shakespeare_char_cpu.py"  # the README's main job: 1,000 steps in seconds
SUGGEST_SMALL = 30 * 60  # seconds of run on a CPU above which the line points at it


def time_a_step(run):
    """(seconds of a training step, of an eval batch): forward and backward of the first
    batches, and a forward in eval mode, timed with the plain model. The random streams are
    put back and the gradients dropped, so the run goes on exactly as without it."""
    if run.threads is not None:
        run.threads.adjust()  # the cores other programs leave free now, as the steps will have them
    rng = ckpt.rng_state(run.batches)
    times = []
    t_begin = clock()
    for _ in range(COST_STEPS):
        x, y = run.batches.next(run.device)
        t0 = clock()
        with run.ctx:
            _, loss = run.model(x, y)
        loss.backward()
        loss.item()  # waits for the device
        t1 = clock()
        run.model.eval()
        with torch.no_grad(), run.ctx:
            run.model(x, y)[1].item()
        run.model.train()
        times.append((t1 - t0, clock() - t1))
        if len(times) >= 2 and clock() - t_begin > COST_SECONDS:
            break
    run.model.zero_grad(set_to_none=True)
    ckpt.set_rng_state(rng, run.batches)
    step, batch = (min(t) for t in zip(*times[1:]))  # the first pass warms up: allocations, caches
    return step * run.config.gradient_accumulation_steps, batch


def say_the_cost(run, step_seconds, batch_seconds):
    """One line: how long the run will take here, from the timed step; and on a CPU, when
    that is long, the small recipe to try first."""
    config = run.config
    steps = config.max_iters - run.start_iter
    evals = steps // config.eval_interval + 1
    total = steps * step_seconds + evals * 2 * config.eval_iters * batch_seconds
    ends = ""
    if config.time_budget and total > config.time_budget * 60:
        bought = max(0, int((config.time_budget * 60 - evals * 2 * config.eval_iters * batch_seconds) / step_seconds))
        ends = f"; the {config.time_budget:g}-minute budget ends it first, after about {min(bought, steps):,} of them"
        total = config.time_budget * 60
    if config.time_budget and total > 0.5 * config.time_budget * 60:
        run.report.prepare_to_draw()  # the budget may end it: its evals' times must not include the import
    small = ""
    if run.device == "cpu" and total > SUGGEST_SMALL:
        small = f". Something small first (a model in about a minute): {SMALL_RECIPE}"
    run.report.log(
        f"cost: about {format_duration(total)} here ({run.device}): {steps:,} steps of {step_seconds * 1000:,.0f} ms "
        f"(the first ones, timed) and {evals} eval{'s' if evals > 1 else ''} of 2 x {config.eval_iters} batches{ends}{small}"
    )


# -----------------------------------------------------------------------------
# setting up a run


@dataclass
class Run:
    """What the loop works with: the settings, the model and optimizer, the data, and where it is."""

    config: TrainConfig
    model_config: GPTConfig
    ddp: machine.Distributed
    device: str
    tokenizer: object
    model: torch.nn.Module  # the plain module, which is saved; eval_model may be compiled,
    eval_model: torch.nn.Module  # step_model also wrapped in DDP, which averages the
    step_model: torch.nn.Module  # gradients of all processes in backward
    optimizer: object
    batches: BatchSampler
    eval_samplers: dict
    ctx: object  # autocast, or nothing
    progress: RunProgress
    scaler: LossScaler = None  # float16 only
    threads: machine.Threads = None  # a CPU run's threads
    report: Reporter = None
    health: Health = None
    iter_num: int = 0
    start_iter: int = 0
    best_val_loss: float = float("inf")
    flops_per_iter: float = 0.0
    t_loop: float = 0.0
    step_losses: list = field(default_factory=list)  # this process's loss of each step since the last log line

    @property
    def ckpt_path(self):
        return os.path.join(self.config.out_dir, "ckpt.pt")

    @property
    def best_path(self):
        return os.path.join(self.config.out_dir, "best.pt")

    def where(self, eval_due):
        """(progress, last step?) as RunProgress.at; with a time budget rank 0's clock decides for every process."""
        p, last = self.progress.at(self.iter_num, self.report.elapsed(), eval_due)
        if self.progress.budget and self.ddp.world_size > 1:
            p, last = self.ddp.from_master([p, float(last)], self.device)
        return p, bool(last)

    def set_lr(self, p):
        lr = get_lr(self.iter_num, self.config, p)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def check_finite(self, values):
        if not all(math.isfinite(v) for v in values):
            self.health.nonfinite(self.iter_num)  # a warning line: which weights went first
            raise FloatingPointError(
                f"the loss is not finite at step {self.iter_num}; {self.ckpt_path} holds the last "
                "good state (try a lower --learning_rate)"
            )

    def save(self, path, with_optimizer=True, finished=False):
        """Write a checkpoint from rank 0; with several processes every one must call this,
        since each hands over its random state. finished: the run ends here (the budget
        spent or max_iters reached), which a resume checks."""
        rng = ckpt.rng_state(self.batches) if with_optimizer else None
        rng_ranks = [None] * self.ddp.world_size
        if with_optimizer and self.ddp.world_size > 1:
            dist.all_gather_object(rng_ranks, rng)
        if not self.ddp.master:
            return
        resume = dict(
            rng=rng,
            rng_ranks=rng_ranks if self.ddp.world_size > 1 else None,
            elapsed=self.report.elapsed(),
            timings=self.progress.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            finished=finished,
        )
        state = ckpt.run_state(
            self.model,
            self.model_config,
            self.config,
            self.tokenizer,
            self.iter_num,
            self.best_val_loss,
            self.optimizer if with_optimizer else None,
            **resume,
        )
        ckpt.save_checkpoint(state, path)


def setup(config, model_config, ddp, device, log, live, t_start):
    """Everything the loop needs, checked before the first write into out_dir."""
    device_type = device.split(":")[0]
    machine.check_compile(config.compile, device)
    if device_type == "cpu":
        machine.keep_freed_memory()  # a step reuses the memory the last one freed
    (train_data, val_data), tokenizer, model_config, checkpoint = read_inputs(config, model_config, device, ddp)
    torch.manual_seed(config.seed)  # the same initial weights in every process
    model = build_model(model_config).to(device)
    dtype = machine.training_dtype(config.dtype, device, model, (config.batch_size, model_config.block_size), ddp, log)
    # each process draws its own batches and dropout masks; rank 0 is a single-process run
    for seed_stream in (torch.manual_seed, random.seed, np.random.seed):
        seed_stream(config.seed + ddp.rank)
    T, B = model_config.block_size, config.batch_size
    run = Run(
        config=config,
        model_config=model_config,
        ddp=ddp,
        device=device,
        tokenizer=tokenizer,
        model=model,
        eval_model=model,
        step_model=model,
        optimizer=make_optimizer(model, config, device_type),
        batches=BatchSampler(train_data, T, B, config.seed + ddp.rank, config.data_order),
        eval_samplers={"train": BatchSampler(train_data, T, B, seed=1), "val": BatchSampler(val_data, T, B, seed=2)},
        ctx=machine.autocast_context(device_type, dtype),
        progress=RunProgress(config),
        # float16's loss scaling; it says a skipped step through the Reporter made below
        scaler=LossScaler(device_type, lambda message: run.report.log(message)) if dtype == "float16" else None,
        threads=machine.Threads(config.threads, lambda message: run.report.log(message)) if device_type == "cpu" else None,
    )
    elapsed_before = resume(run, checkpoint, log) if checkpoint is not None else None
    del checkpoint
    tokens_per_iter = B * config.gradient_accumulation_steps * ddp.world_size * T
    run.flops_per_iter = model.flops_per_token() * tokens_per_iter
    log_start(run, dtype, tokens_per_iter, (train_data, val_data), log)
    # the first write into out_dir, after every check that could refuse the run
    if ddp.master:
        if config.overwrite:
            rundir.clear_previous_run(config.out_dir)
        settings = {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config)}
        rundir.write_run_config(config.out_dir, {**settings, "device": device, "dtype": dtype, "world_size": ddp.world_size})
    wrap_model(run, log)
    resumed = config.init_from == "resume"
    run.report = Reporter(config.out_dir, log, live, run.start_iter, config.max_iters, tokens_per_iter, resumed,
                          write_files=ddp.master, time_budget=run.progress.budget, t_start=t_start,
                          elapsed_before=elapsed_before, world_size=ddp.world_size)  # fmt: skip
    # each layer's activations, gradients and updates every health_interval steps, measured on rank 0
    interval = config.health_interval if ddp.master else 0
    run.health = Health(
        run.model, interval, run.report, run.step_model, config.compile, ddp.world_size > 1, optimizer=run.optimizer
    )
    run.t_loop = time.time()
    return run


def read_inputs(config, model_config, device, ddp):
    """(the train and val tokens, tokenizer, model config, checkpoint or None): the dataset,
    the checkpoint to resume, and the checks that the run can start from them."""
    train_data, val_data, tokenizer = load_dataset(config)
    model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    checkpoint = None
    if config.init_from == "resume":
        path = os.path.join(config.out_dir, "ckpt.pt")
        checkpoint = ckpt.load_checkpoint(path, device)
        ckpt.check_resumable(checkpoint, path, config)
        model_config = ckpt.resume_model_config(checkpoint, path, model_config, tokenizer)
    model_config.validate()
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) <= model_config.block_size:
            raise ValueError(f"--block_size={model_config.block_size} is longer than the {split} split ({len(data)} tokens)")
    # before auto has picked the dtype, the memory is checked for float32, the larger estimate
    check_training_memory(config, model_config, device, "float32" if config.dtype == "auto" else config.dtype, ddp)
    return (train_data, val_data), tokenizer, model_config, checkpoint


def resume(run, checkpoint, log):
    """Put the checkpoint's weights, optimizer, step and random streams into run; return the
    seconds the run had spent (a time budget goes on from there)."""
    config, ddp, path = run.config, run.ddp, run.ckpt_path
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.iter_num = run.start_iter = checkpoint["iter_num"]
    run.best_val_loss = checkpoint["best_val_loss"]
    if run.scaler is not None and "scaler" in checkpoint:
        run.scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("rng_ranks", [checkpoint["rng"]])
    if len(states) == ddp.world_size:
        ckpt.set_rng_state(states[ddp.rank], run.batches)
    else:  # a different number of processes: fresh streams, so not bit-for-bit the same run
        run.batches.generator.manual_seed(config.seed + ddp.rank + 1000 * run.iter_num)
        torch.manual_seed(config.seed + ddp.rank + 1000 * run.iter_num)
        log(f"note: {path} was written by {len(states)} process(es), this run has {ddp.world_size}: new random streams")
    log(f"resuming from {path} at step {run.iter_num} (best val loss {run.best_val_loss:.4f})")
    run.progress.load_state_dict(checkpoint.get("timings", {}))  # what its steps and evals took
    ckpt.check_budget_left(checkpoint, run.progress, path, config)
    note = ckpt.budget_change_note(checkpoint, path, config)
    if note:
        log(note)
    return checkpoint.get("elapsed")


def log_start(run, dtype, tokens_per_iter, data, log):
    """A few lines that say what runs: the model, the data, the machine, and how long."""
    config, mc, ddp = run.config, run.model_config, run.ddp
    switches = [f"{k}={getattr(mc, k)}" for k in ARCHITECTURE if getattr(mc, k) != getattr(GPTConfig, k)]
    shape = f"{mc.n_layer} Blocks x {mc.n_head} heads, n_embd {mc.n_embd}" if mc.model_type == "gpt" else "the bigram table"
    log(
        f"model: {shape}, block_size {mc.block_size}, {run.model.num_params() / 1e6:.2f}M parameters"
        f"{' (' + ', '.join(switches) + ')' if switches else ''}; every setting in {config.out_dir}/config.json"
    )
    folder = os.path.join(config.data_dir, config.dataset)
    log(f"data: {folder}: {len(data[0]):,} characters to train on, {len(data[1]):,} to validate, {mc.vocab_size} distinct")
    global_batch = config.batch_size * config.gradient_accumulation_steps * ddp.world_size
    log(
        f"device {run.device}, {dtype}; global batch {config.batch_size} x {config.gradient_accumulation_steps} accumulation "
        f"x {ddp.world_size} processes = {global_batch} sequences, {tokens_per_iter:,} tokens per step"
    )
    length = f"{config.max_iters:,} steps"
    if config.time_budget:
        length = f"{length} or {config.time_budget:g} minutes, whichever comes first (the lr schedule follows the nearer)"
    lr = (
        f"Muon lr {config.muon_lr:g} + AdamW lr {config.learning_rate:g}"
        if config.optimizer == "muon"
        else f"AdamW lr {config.learning_rate:g}"
    )
    if config.min_lr == config.learning_rate and config.warmup_iters == 0:
        schedule = "constant (min_lr = learning_rate, no warmup), as the lecture's loop"
    else:
        schedule = f"{config.lr_schedule} schedule after {config.warmup_iters} warmup steps"
    log(f"run: {length}; {lr}, {schedule}")
    # the two loss lines a run prints, which differ: say once what each is
    log(
        f"log: 'step N: train loss, val loss' is the estimate, the mean over eval_iters={config.eval_iters} batches of "
        "each split; 'iter N: loss' is the loss of step N's batch alone, noisier"
    )


# the GPTConfig switches that change the architecture, named in the opening lines when not the default
ARCHITECTURE = ("ffwd_mult", "residual", "proj", "layer_norm", "init", "activation", "position", "qk_norm", "bias")


def wrap_model(run, log):
    """torch.compile (--compile) and DDP (several processes) around the plain model."""
    if run.config.compile:
        run.eval_model = run.step_model = torch.compile(run.model)
        log("compiling the model (the first steps are slow)...")
    if run.ddp.world_size > 1:
        device_ids = [run.ddp.local_rank] if run.device.startswith("cuda") else None
        run.step_model = DDP(run.eval_model, device_ids=device_ids)
    run.model.train()


class StopRequested:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks between steps, so a stop always
    lands on a whole step and is saved."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def requested(self, ddp, device):
        """Whether to stop now: with several processes, when any of them got a signal, so
        that all stop at the same step."""
        if ddp.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def read_settings(argv):
    """(TrainConfig, GPTConfig): the defaults, then the config file, then the flags. A resume
    starts from the settings its checkpoint was trained with instead of the defaults, so that
    `--out_dir=DIR --init_from=resume` alone continues the run as it was; a config file and
    flags still override them (a longer --max_iters, another --time_budget), and one that
    cannot change (the model's shape, the optimizer) is refused by the resume's checks."""
    usage = "train.py [CONFIG_FILE] [--key=value ...]"
    (config, model_config), _ = parse(argv, [TrainConfig(), GPTConfig()], usage)
    if config.init_from != "resume":
        return config, model_config
    path = os.path.join(config.out_dir, "ckpt.pt")
    if not os.path.isfile(path):  # before the run claims (and so creates) the folder
        raise FileNotFoundError(f"--init_from=resume: no checkpoint at {path}{rundir.missing_run_hint(config.out_dir)}")
    stored = ckpt.stored_settings(path)
    if stored is None:  # a checkpoint from before the settings were stored: the defaults, as then
        return config, model_config
    # the folder it is in now, and a resume never overwrites: whatever the first run said
    train_values = {**stored[0], "out_dir": config.out_dir, "overwrite": False}
    base = [with_values(TrainConfig(), train_values), with_values(GPTConfig(), stored[1])]
    (config, model_config), _ = parse(argv, base, usage)
    return config, model_config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, model_config = read_settings(argv)
        live = sys.stdout if sys.stdout.isatty() else None
        summary = train(config, model_config, log=lambda msg: print(msg, flush=True), live=live)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, no traceback
        print(
            "\ntrain.py: interrupted twice: stopped without saving this step; ckpt.pt holds the last eval's state",
            file=sys.stderr,
        )
        return 130
    # a run stopped by a signal exits as the shell expects: 128 + the signal's number
    return 128 + signal.Signals[summary["stopped"]].value if "stopped" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
