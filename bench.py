"""Benchmarks: what the hardware gives, measured side by side in one run.

    python bench.py train config/shakespeare_char.py     # the fast path vs a float32 eager reference
    python bench.py limit                                # each CPU recipe's step against the matmul peak, in one run
    python bench.py limit --profile=15                   # ... and the top operations of one step of each
    python bench.py steps config/shakespeare_char.py --variant=--bias=False   # what an option costs a step, in turns
    python bench.py sizes                                # ms/iter and tokens/s over model sizes
    python bench.py loss config/shakespeare_char_cpu.py --target=1.88   # wall time to a val loss (into out-bench/)
    python bench.py versus --nanogpt=../nanoGPT          # the CPU recipe against nanoGPT's README CPU command, to 1.88
    python bench.py sample                               # KV-cache vs uncached generation, each decode
                                                         # dtype, and what --decode_dtype=auto picks
    python bench.py sample --out_dir=out                 # ... with a trained checkpoint
    python bench.py memory --out_dir=out-cpu             # chargpt/memory.py's estimate against the measured peak (Linux)
    python bench.py health config/shakespeare_char_cpu.py   # what health steps cost at --health_interval (chargpt/health.py)
    python bench.py classroom --out_dir=out-cpu          # serve.py with 30 clients at once, each its own seed, against
                                                         # one alone, at --max_generations 1, 2, 4 (docs/playground.md)
    python bench.py lens --out_dir=out-cpu               # what the playground's lens and heads view cost (chargpt/lens.py)
    python bench.py gpu                                  # the GPU check: the GPU tests, stage 8 and the GPU recipe
                                                         # trained, sampling speed; one line where there is no GPU

Extra --key=value flags after a config file override it, as in train.py. Timings on a busy
or small machine are noisy: compare the figures of one run with each other.

The GPU check, `python bench.py gpu`, is one command for a machine with a CUDA GPU that
gives every figure in one run, in under 8 minutes: the GPU and the dtype --dtype=auto takes
there, the tests marked gpu (pytest -m gpu), the lecture's stage 8 and
config/shakespeare_char_gpu.py trained for real into out-bench-gpu/ (stage 8 with a time
budget of --lecture_minutes as a cap; each run's whole log beside it): when each first
reached the lecture's 1.48, its last val loss, tokens/s and the fraction of the GPU's peak
FLOP/s, then the characters per second of generation from stage 8's model. The figures end
as a table for docs/results.md. Without a GPU it says so in one line and exits with 1.
"""

import argparse
import dataclasses
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from chargpt import machine, memory
from chargpt.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chargpt.config import SampleConfig, TrainConfig, parse
from chargpt.data import load_dataset
from chargpt.engine import DECODE_DTYPES, generate, generate_tokens, pick_decode_dtype
from chargpt.health import Health, draw_health
from chargpt.lens import analyse, rank_heads, val_slice, val_split
from chargpt.machine import autocast_context, cpu_has_bf16_units, keep_freed_memory, resolve_device, resolve_dtype
from chargpt.metrics import Reporter
from chargpt.optim import LossScaler, make_optimizer, train_step
from model import GPT, Dropout, GPTConfig, build_model

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_configs(config_path, overrides):
    argv = ([config_path] if config_path else []) + list(overrides)
    (config, model_config), _ = parse(argv, [TrainConfig(), GPTConfig()], "bench.py ...")
    return config, model_config


class RandomBatches:
    """Random tokens in place of the dataset: the cost of a step does not depend on the text."""

    def __init__(self, vocab_size, block_size, batch_size):
        self.vocab_size, self.block_size, self.batch_size = vocab_size, block_size, batch_size
        self.generator = torch.Generator().manual_seed(0)

    def next(self, device):
        window = torch.randint(self.vocab_size, (self.batch_size, self.block_size + 1), generator=self.generator)
        return window[:, :-1].to(device), window[:, 1:].to(device)


def time_steps(config, model_config, iters, warmup, reference=False):
    """(ms per step, compile seconds, dtype, model) of train.py's step. The reference is what a
    plain implementation runs: float32, eager, foreach AdamW (whatever --optimizer says),
    PyTorch's nn.Dropout, and the lecture's dropout on the attention weights too (which keeps
    SDPA off its fused kernel while training)."""
    device = resolve_device(config.device)
    device_type = device.split(":")[0]
    if reference:
        model_config = dataclasses.replace(model_config, attn_dropout=model_config.dropout)
        config = dataclasses.replace(config, optimizer="adamw")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(model_config, vocab_size=65)).to(device)
    if reference:  # PyTorch's own dropout, one random number per element
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, Dropout):
                    setattr(module, name, torch.nn.Dropout(child.p))
    model.train()
    shape = (config.batch_size, model_config.block_size)
    dtype = "float32" if reference else machine.training_dtype(config.dtype, device, model, shape, machine.Distributed())
    ctx = autocast_context(device_type, dtype)
    scaler = LossScaler(device_type) if dtype == "float16" else None
    optimizer = make_optimizer(model, config, device_type, fused=not reference)
    step_model = model if reference or not config.compile else torch.compile(model)
    batches = RandomBatches(65, model_config.block_size, config.batch_size)
    t0 = time.perf_counter()
    for _ in range(warmup):  # the first steps compile and warm the allocator
        train_step(step_model, optimizer, batches, config, ctx, device, scaler=scaler)
    sync(device)
    compile_s = time.perf_counter() - t0 if config.compile and not reference else 0.0
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = train_step(step_model, optimizer, batches, config, ctx, device, scaler=scaler)
    loss.item()
    sync(device)
    return (time.perf_counter() - t0) / iters * 1000, compile_s, dtype, model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput_row(name, ms, tokens_per_iter, flops_per_iter):
    return f"| {name} | {ms:,.0f} | {tokens_per_iter / ms * 1000:,.0f} | {flops_per_iter / ms / 1e9:.3f} |"


def bench_train(args, overrides):
    config, model_config = load_configs(args.config, overrides)
    tokens = config.batch_size * config.gradient_accumulation_steps * model_config.block_size
    print(
        f"{args.config}: {model_config.n_layer} layers, n_embd {model_config.n_embd}, block {model_config.block_size}, "
        f"batch {config.batch_size} x {config.gradient_accumulation_steps}, dropout {model_config.dropout}, "
        f"{args.iters} timed steps after {args.warmup} warm-up steps, {torch.get_num_threads()} threads"
    )
    fast_ms, compile_s, dtype, model = time_steps(config, model_config, args.iters, args.warmup)
    ref_ms, _, _, _ = time_steps(config, model_config, args.iters, args.warmup, reference=True)
    flops = model.flops_per_token() * tokens
    print("| path | ms/iter | tokens/s | TFLOP/s |\n|---|---|---|---|")
    kernels = f"{dtype}{', compiled' if config.compile else ''}"
    muon = config.optimizer == "muon"
    print(throughput_row(f"fast ({kernels}, {'Muon + ' if muon else ''}fused AdamW)", fast_ms, tokens, flops))
    if muon:  # Muon's own cost, apart from the kernels'
        adamw_ms, _, _, _ = time_steps(dataclasses.replace(config, optimizer="adamw"), model_config, args.iters, args.warmup)
        print(throughput_row(f"fast ({kernels}, fused AdamW)", adamw_ms, tokens, flops))
    print(
        throughput_row(
            "reference (float32, eager, foreach AdamW, nn.Dropout, lecture's attention dropout)", ref_ms, tokens, flops
        )
    )
    speedup = f"speed-up {ref_ms / fast_ms:.2f}x"
    if muon:
        speedup += f" with Muon's extra work per step, {ref_ms / adamw_ms:.2f}x with AdamW"
    print(speedup + (f"; compile and warm-up took {compile_s:.1f}s" if compile_s else ""))
    if config.dtype == "auto":
        check_dtype_auto(config, model_config, args, dtype)


def check_dtype_auto(config, model_config, args, picked):
    """--dtype=auto against each explicit dtype this machine has, in rounds that take turns:
    auto's pick should be within 10% of the fastest."""
    device = resolve_device(config.device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        dtypes = ["float32", "float16"] + (["bfloat16"] if machine.gpu_has_bf16(device) else [])
    else:
        dtypes = ["float32"] + (["bfloat16"] if device_type == "cpu" and cpu_has_bf16_units() else [])
    if len(dtypes) == 1:
        print(f"--dtype=auto: float32, the only dtype this {device_type} trains in at full speed")
        return
    ms = {dtype: [] for dtype in dtypes}
    for _ in range(3):
        for dtype in dtypes:
            step = time_steps(dataclasses.replace(config, dtype=dtype), model_config, args.iters, args.warmup)[0]
            ms[dtype].append(step)
    best = min(dtypes, key=lambda d: min(ms[d]))
    rows = ", ".join(f"{d} {min(ms[d]):,.0f} ms" for d in dtypes)
    ok = min(ms[picked]) <= 1.1 * min(ms[best])
    verdict = "within 10% of the fastest, as it should be" if ok else "MORE THAN 10% SLOWER THAN THE FASTEST"
    print(f"--dtype=auto picked {picked}; explicit dtypes, best of 3 interleaved rounds: {rows}: {verdict}")


class HealthSteps:
    """train.py's step on a config's model, with or without a health step's hooks (chargpt/health.py)."""

    def __init__(self, config, model_config, out_dir):
        self.config, self.device = config, resolve_device(config.device)
        device_type = self.device.split(":")[0]
        if device_type == "cpu":
            keep_freed_memory()  # as train.py does: a step reuses the memory the last one freed
        torch.manual_seed(0)
        self.model = build_model(dataclasses.replace(model_config, vocab_size=65)).to(self.device)
        self.model.train()
        shape = (config.batch_size, model_config.block_size)
        self.dtype = resolve_dtype(config.dtype, device_type, self.model, shape)
        self.ctx = autocast_context(device_type, self.dtype)
        self.optimizer = make_optimizer(self.model, config, device_type)
        self.batches = RandomBatches(65, model_config.block_size, config.batch_size)
        tokens = config.batch_size * config.gradient_accumulation_steps * model_config.block_size
        self.report = Reporter(out_dir, lambda m: None, None, 0, config.max_iters, tokens, resume=False)
        self.health = Health(self.model, 1, self.report, log=lambda m: None)

    def step(self, on):
        """The seconds of one step, a health step when on (its record written, as train.py does)."""
        t0 = time.perf_counter()
        watch = self.health.watch(0) if on else None
        loss = train_step(self.model, self.optimizer, self.batches, self.config, self.ctx, self.device, watch=watch)
        self.health.record(watch)
        loss.item()  # train.py syncs at its log steps; here every step, to time each
        sync(self.device)
        return time.perf_counter() - t0


def bench_health(args, overrides):
    """What health steps cost. Each health step against the plain steps on either side of it
    (a machine whose speed drifts moves them alike): the extra time of one, over interval
    steps, is the overhead. Then, as a check, interleaved blocks of health_interval steps
    without and with a health step, as a run takes them (noisier: a busy machine moves a
    block by more than the overhead)."""
    config, model_config = load_configs(args.config, overrides)
    interval = config.health_interval
    if interval < 1:
        raise ValueError("--health_interval must be at least 1 to measure what it costs")
    with tempfile.TemporaryDirectory() as out_dir:
        bench = HealthSteps(config, model_config, out_dir)
        print(
            f"{args.config}: {model_config.n_layer} layers, n_embd {model_config.n_embd}, block {model_config.block_size}, "
            f"batch {config.batch_size}, {bench.dtype}, {config.optimizer}, {torch.get_num_threads()} threads; "
            f"{args.pairs} health steps between 3 plain steps on either side; {args.rounds} rounds of {interval} "
            f"steps without and with one health step"
        )
        for _ in range(args.warmup):
            bench.step(False)
        plain, extras = [], []
        for _ in range(args.pairs):
            times = [bench.step(on) for on in (False, False, False, True, False, False, False)]
            around = times[:3] + times[4:]
            plain += around
            extras.append(times[3] - statistics.median(around))
        totals = {False: 0.0, True: 0.0}
        for r in range(args.rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):  # alternate the order: drift hits both
                totals[on] += sum(bench.step(on and i == 0) for i in range(interval))
        t0 = time.perf_counter()
        drawn = draw_health(bench.report.records, os.path.join(out_dir, "health.png"), "bench")
        draw_s = time.perf_counter() - t0
    step, extra = statistics.median(plain), statistics.median(extras)
    print("| | ms |\n|---|---|")
    print(f"| a step (median of {len(plain)}) | {step * 1000:.1f} |")
    print(f"| a health step's extra time (median of {len(extras)}) | {extra * 1000:.1f} ({extra / step:.2f} steps) |")
    print(f"overhead at --health_interval={interval}: {extra / (interval * step):.2%} (the extra time over {interval} steps)")
    print("at other intervals: " + ", ".join(f"{n}: {extra / (n * step):.2%}" for n in (10, 25, 50, 100, 250, 500)))
    if args.rounds:
        print(f"the blocks' total times, with health against without: {totals[True] / totals[False] - 1:+.2%}")
    if drawn:
        n = len(bench.report.records)
        print(f"drawing health.png from {n} health records took {draw_s:.2f}s (at evals, and at the end of a run)")


def bench_sizes(args, overrides):
    config, _ = load_configs(None, ["--device=cpu" if not torch.cuda.is_available() else "--device=auto", *overrides])
    print(f"block_size 256, batch {args.batch_size}, dropout 0, {torch.get_num_threads()} threads; fast path")
    print("| n_layer x n_embd | params | ms/iter | tokens/s | TFLOP/s |\n|---|---|---|---|---|")
    for n_layer, n_embd in ((2, 128), (4, 192), (4, 256), (6, 256), (6, 384)):
        model_config = GPTConfig(n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd, block_size=256, dropout=0.0)
        config = dataclasses.replace(config, batch_size=args.batch_size)
        ms, _, _, model = time_steps(config, model_config, args.iters, args.warmup)
        tokens = args.batch_size * 256
        print(
            f"| {n_layer} x {n_embd} | {model.num_params() / 1e6:.1f}M | {ms:,.0f} | {tokens / ms * 1000:,.0f} | "
            f"{model.flops_per_token() * tokens / ms / 1e9:.3f} |"
        )


def matmul_peak(dtype, device="cpu", n=2048, seconds=0.5):
    """The FLOP/s of one large square matrix product (n x n times n x n) in dtype on device,
    the best of the calls made in about `seconds`: what the matmul kernels give at this
    moment, threads and dtype, the ceiling a training step is measured against."""
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    torch.mm(a, b)  # the first call may pick kernels and allocate
    sync(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bench_limit(args, overrides):
    """Each recipe's training step against the matmul peak, measured in one run: rounds
    that take turns (a few steps of each recipe, then the peak in the dtype each one trains
    in), each figure the best of its rounds, so that a machine whose speed drifts is
    compared with itself. The step's FLOPs are train.py's own count (model.flops_per_token:
    6 per weight that multiplies, plus attention; Muon's Newton-Schulz products not counted)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = []
    for path in args.configs:
        config, model_config = load_configs(path, overrides)
        recipes.append((path, config, model_config))
    steps = {path: [] for path, _, _ in recipes}
    peaks, dtypes = {}, {}
    for _ in range(args.rounds):
        for path, config, model_config in recipes:
            ms, _, dtype, model = time_steps(config, model_config, args.iters, args.warmup)
            steps[path].append((ms, model))
            dtypes[path] = dtype
            peaks.setdefault(dtype, []).append(matmul_peak(dtype, resolve_device(config.device)))  # right after, same threads
    units = "with bf16 units" if cpu_has_bf16_units() else "without bf16 units"
    device = resolve_device(recipes[0][1].device)
    where = f"CPU {units}" if device == "cpu" else device
    print(f"{where}, {torch.get_num_threads()} threads, best of {args.rounds} rounds taking turns")
    print("| recipe | dtype | ms/step | achieved TFLOP/s | matmul peak TFLOP/s | of the peak |\n|---|---|---|---|---|---|")
    for path, config, model_config in recipes:
        ms, model = min(steps[path], key=lambda s: s[0])
        flops = model.flops_per_token() * config.batch_size * config.gradient_accumulation_steps * model_config.block_size
        achieved, peak = flops / ms / 1e9, max(peaks[dtypes[path]]) / 1e12
        print(f"| {path} | {dtypes[path]} | {ms:,.1f} | {achieved:.3f} | {peak:.3f} | {achieved / peak:.0%} |")
    if args.profile:
        for path, config, model_config in recipes:
            print(f"\n{path}: the top {args.profile} operations of one step, by their own time")
            print(profile_step(config, model_config, args.profile))


def bench_steps(args, overrides):
    """What options cost a step: one recipe and variants of it (each --variant a string of
    flags added to the recipe's), their training steps timed in rounds that take turns, each
    figure the best of its rounds and its ratio to the recipe's, so that a machine whose speed
    drifts is compared with itself. Set beside what each option buys a step (the loss at a
    fixed step count), it says whether the option wins per second (docs/results.md)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [""] + list(args.variant or [])
    setups = [(variant, *load_configs(args.config, overrides + shlex.split(variant))) for variant in variants]
    times = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant, config, model_config in setups:
            times[variant].append(time_steps(config, model_config, args.iters, args.warmup)[0])
    print(f"{args.config}, {torch.get_num_threads()} threads, {args.rounds} rounds taking turns of {args.iters} steps")
    print("| variant | best ms/step | median ms/step | best against the recipe's |\n|---|---|---|---|")
    base = min(times[""])
    for variant in variants:
        best, median = min(times[variant]), statistics.median(times[variant])
        print(f"| {variant or '(the recipe)'} | {best:,.1f} | {median:,.1f} | {best / base:.2f}x |")


def profile_step(config, model_config, top):
    """torch.profiler's table of one warmed-up training step: where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    device = resolve_device(config.device)
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(model_config, vocab_size=65)).to(device)
    model.train()
    dtype = machine.training_dtype(
        config.dtype, device, model, (config.batch_size, model_config.block_size), machine.Distributed()
    )
    ctx = autocast_context(device_type, dtype)
    optimizer = make_optimizer(model, config, device_type)
    batches = RandomBatches(65, model_config.block_size, config.batch_size)
    for _ in range(3):
        train_step(model, optimizer, batches, config, ctx, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, batches, config, ctx, device).item()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)


LOSS_OUT_DIR = "out-bench"


@dataclasses.dataclass
class TrainedRun:
    """What watch_train read from a train.py command's output."""

    wall: float = 0.0  # seconds of the whole command
    evals: list = dataclasses.field(default_factory=list)  # (seconds since the start, step, val loss)
    rates: list = dataclasses.field(default_factory=list)  # (tokens/s, TFLOP/s) of each logged line
    steps: int = None
    best: float = None
    stopped: bool = False  # by stop_after

    def first_at(self, target):
        """(seconds, step) of the first eval with a val loss <= target, or None."""
        return next(((t, step) for t, step, val in self.evals if val <= target), None)


def watch_train(command, echo=lambda line: True, stop_after=None, log_path=None, cwd=None):
    """Run a train.py command to its end, or SIGTERM it after stop_after seconds (it saves
    and stops at the step it is on); its lines go to stdout where echo(line) says so, and all
    of them to log_path. A failed command is a ValueError with train.py's own one-line error."""
    run, tail, t_start = TrainedRun(), [], time.time()
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd) as proc:
        timer = threading.Timer(stop_after, proc.send_signal, [signal.SIGTERM]) if stop_after else None
        if timer:
            timer.start()
        for line in proc.stdout:
            if echo(line):
                print(line, end="", flush=True)
            if log:
                log.write(line)
            tail = (tail + [line])[-5:]
            if found := re.match(r"step (\d+): train loss \S+, val loss (\d+\.\d+)", line):
                run.evals.append((time.time() - t_start, int(found[1]), float(found[2])))
            if found := re.search(r"([\d,]+) tokens/s, (\d+\.\d+) TFLOP/s", line):
                run.rates.append((float(found[1].replace(",", "")), float(found[2])))
            if done := re.match(r"done: .*?([\d,]+) steps in .*best val loss (\d+\.\d+)", line):
                run.steps, run.best = int(done[1].replace(",", "")), float(done[2])
            if stop := re.match(r"SIGTERM: saved .* at step (\d+)", line):
                run.steps, run.stopped = int(stop[1]), True
    if timer:
        timer.cancel()
    if log:
        log.close()
    run.wall = time.time() - t_start
    if proc.returncode != 0 and not run.stopped:
        # train.py's own one-line error says what went wrong
        raise ValueError(tail[-1].strip().removeprefix("train.py: error: ") if tail else f"{' '.join(command)} failed")
    return run


def bench_loss(args, overrides):
    """Train the recipe for real (python train.py, as a user would) and report when the val
    loss first reached the target."""
    # out-bench is this benchmark's own scratch folder, trained afresh by every run; a folder
    # given with --out_dir is protected as train.py protects it (add --overwrite=True to reuse it)
    scratch = ["--overwrite=True"] if args.out_dir == LOSS_OUT_DIR else []
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *([args.config] if args.config else []),
        f"--out_dir={args.out_dir}",
        *scratch,
        *overrides,
    ]
    run = watch_train(command)
    print(f"best val loss {run.best:.4f}, {run.steps} steps, {run.wall:.1f}s wall time in all (the whole command)")
    reached = run.first_at(args.target)
    if reached:
        print(f"val loss <= {args.target} first at step {reached[1]}, {reached[0]:.1f}s after the start")
    else:
        print(f"val loss never reached {args.target}")


# nanoGPT's README command for a CPU ("I only have a macbook"), run in a nanoGPT checkout
NANOGPT_CPU = (
    "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 "
    "--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
).split()


def bench_versus(args, overrides):
    """Our recipe against nanoGPT's README CPU command, side by side in one run: rounds that
    take turns (ours, then nanoGPT's), each the whole command from its start, and for each
    the time at which its printed val loss first reached the target. Both print the same
    'step N: train loss X, val loss Y' line; each estimates the val loss on its own batches
    (nanoGPT 20 of 12 x 64 characters every 250 steps, ours as its recipe says)."""
    checkout = os.path.abspath(args.nanogpt)
    if not os.path.isfile(os.path.join(checkout, "train.py")):
        raise ValueError(f"--nanogpt={args.nanogpt}: no train.py there (a clone of github.com/karpathy/nanoGPT)")
    if not os.path.isfile(os.path.join(checkout, "data", "shakespeare_char", "train.bin")):
        raise ValueError(f"--nanogpt={args.nanogpt}: prepare its data first (python data/shakespeare_char/prepare.py there)")
    ours = [sys.executable, os.path.join(ROOT, "train.py"), args.config, "--out_dir=out-bench-versus", "--overwrite=True"]
    ours += overrides
    out_dir = tempfile.mkdtemp(prefix="nanogpt-")
    theirs = [sys.executable, "train.py", *NANOGPT_CPU, f"--out_dir={out_dir}"]
    times = {"ours": [], "nanoGPT": []}
    for r in range(args.rounds):
        for name, command, cwd in (("ours", ours, None), ("nanoGPT", theirs, checkout)):
            run = watch_train(command, echo=lambda line: False, cwd=cwd)
            reached = run.first_at(args.target)
            # a command that never printed the target counts its whole time, and the ratio is a bound
            times[name].append((reached[0], True) if reached else (run.wall, False))
            at = f"step {reached[1]}, {reached[0]:.1f}s" if reached else "never"
            last = f"{run.evals[-1][2]:.4f}" if run.evals else "none printed"
            print(f"round {r + 1}, {name}: val <= {args.target} at {at}; last val {last}, whole command {run.wall:.1f}s")
    best = {name: min(t) for name, t in times.items()}
    said = {name: f"{t:.1f}s" if hit else f"never (its whole command {t:.1f}s)" for name, (t, hit) in best.items()}
    print(f"time to val <= {args.target}, the best of {args.rounds} rounds: ours {said['ours']}, nanoGPT {said['nanoGPT']}")
    if best["ours"][1]:
        bound = "" if best["nanoGPT"][1] else "at least "
        print(
            f"ours is {bound}{best['nanoGPT'][0] / best['ours'][0]:.1f}x as fast ({torch.get_num_threads()} threads for this process)"
        )


def bench_sample(args, overrides):
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.out_dir:
        model, _ = model_from_checkpoint(load_checkpoint(find_checkpoint(args.out_dir)))
        where = find_checkpoint(args.out_dir)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65)).eval()  # the lecture's model; random weights cost the same
        where = "the lecture's model (6 x 384, block 256), random weights"
    # what sample.py's --decode_dtype=auto picks, timed afresh here rather than read from its cache
    t0 = time.perf_counter()
    if args.decode_dtype == "auto":
        auto = {batch: pick_decode_dtype(model, batch, args.new_tokens, use_cache=False)[0] for batch in (1, 10)}
    else:
        auto = {1: args.decode_dtype, 10: args.decode_dtype}
    picked_in = time.perf_counter() - t0
    print(
        f"{where}; {torch.get_num_threads()} threads; decode dtype {auto[1]} for one sample, {auto[10]} for 10"
        + (f" (auto: {picked_in:.2f}s of timing for both)" if args.decode_dtype == "auto" else "")
    )

    def seconds(n, kv_cache, batch=1, dtype=auto[1]):
        return generation_seconds(model, n, kv_cache, batch, dtype)

    seconds(20, True)  # warm up
    n = args.new_tokens
    uncached = n / seconds(n, False)
    dtypes = ("float32", "float16", "bfloat16", "int8")
    rates = {(dtype, batch): [] for dtype in dtypes for batch in (1, 10)}
    for _ in range(args.repeats):  # interleaved passes: a change in the machine's load hits every row alike
        for dtype in dtypes:
            for batch in (1, 10):
                rates[dtype, batch].append(batch * n / seconds(n, True, batch, dtype))
    spread = max((max(r) - min(r)) / max(r) for r in rates.values())
    print(f"{n} new characters from one, best of {args.repeats} passes; chars/s (for 10 samples: all of them)")
    print("| path | batch 1 | vs uncached | --num_samples 10 |\n|---|---|---|---|")
    print(f"| uncached (the lecture's loop, float32) | {uncached:,.0f} | 1.0x | - |")
    for dtype in dtypes:
        one, ten = max(rates[dtype, 1]), max(rates[dtype, 10])
        print(f"| KV cache, {dtype} decode steps | {one:,.0f} | {one / uncached:.1f}x | {ten:,.0f} |")
    for batch, what in ((1, "one sample"), (10, "10 samples")):
        best = max(dtypes, key=lambda dtype: max(rates[dtype, batch]))
        rate, best_rate = max(rates[auto[batch], batch]), max(rates[best, batch])
        print(
            f"{what}: {'auto' if args.decode_dtype == 'auto' else '--decode_dtype'}'s pick {auto[batch]} runs at "
            f"{rate:,.0f} chars/s, {rate / best_rate:.0%} of the best row ({best}, {best_rate:,.0f}): "
            + ("within 10% of the best, as it should be" if rate >= 0.9 * best_rate else "MORE THAN 10% BELOW THE BEST")
        )
    if args.repeats > 1:
        print(f"(a row's passes differ by up to {spread:.0%}: that much is noise)")
    lengths = sorted({max(1, n // 10), max(1, n // 3), n})
    print(f"| new characters | KV cache ({auto[1]}) s | uncached s |\n|---|---|---|")
    for m in lengths:
        print(f"| {m} | {seconds(m, True):.2f} | {seconds(m, False):.2f} |")


def generation_seconds(model, n, kv_cache, batch=1, dtype="float32"):
    """Seconds to generate n new characters for each of batch sequences from one character
    each, as sample.py does (decode steps in dtype, every draw on the CPU)."""
    device = next(model.parameters()).device
    idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in generate(model, idx, n, generator=generator, kv_cache=kv_cache, decode_dtype=DECODE_DTYPES[dtype]):
        pass
    sync(str(device))
    return time.perf_counter() - t0


# what train.py and sample.py have resident when they check the memory: Python, PyTorch and
# the project's modules imported, and for sampling the model loaded
TRAIN_BASELINE = "import train"
SAMPLE_BASELINE = (
    "import sys, sample; from chargpt.checkpoint import *; model_from_checkpoint(load_checkpoint(find_checkpoint(sys.argv[1])))"
)


def peak_memory(commands, interval=0.005):
    """The peak anonymous memory in bytes (RssAnon in /proc/PID/status, read every interval
    seconds) of each command (an argv list), run side by side to their end in ROOT; a
    command that fails is a ValueError with its stderr. Linux only.

    Anonymous memory (the heap: tensors, Python objects) is what the OOM killer reclaims
    nothing from. The peak RSS (ru_maxrss) also counts the pages of the libraries, which
    the kernel may drop and read again at any moment: on a busy machine that moved it by
    200 MiB between two runs of the same command."""
    if not os.path.isfile("/proc/self/status"):
        raise ValueError("measuring memory reads /proc/PID/status, which only Linux has")
    errs = [tempfile.TemporaryFile() for _ in commands]  # files, not pipes: a full pipe would stall its process
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err) for cmd, err in zip(commands, errs)]
    peaks = [0] * len(procs)
    while any(proc.poll() is None for proc in procs):
        for i, proc in enumerate(procs):
            try:
                with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
                    anon = next((line for line in f if line.startswith("RssAnon:")), None)
            except OSError:  # ended between poll() and open()
                continue
            if anon:  # a zombie has none
                peaks[i] = max(peaks[i], int(anon.split()[1]) * 1024)
        time.sleep(interval)
    for cmd, proc, err in zip(commands, procs, errs):
        err.seek(0)
        message = err.read().decode(errors="replace").strip()
        err.close()
        if proc.returncode != 0:
            raise ValueError(f"{' '.join(map(str, cmd))} failed: {message.splitlines()[-1] if message else 'no message'}")
    return peaks


def train_command(flags, out_dir, data_dir="data", dataset="shakespeare_char", steps=5):
    """train.py with flags for a few steps (the allocator's peak settles after about 3) and
    two evals with their checkpoints, on the CPU; a step run even for a config with a time budget."""
    return [
        sys.executable,
        "train.py",
        *flags,
        f"--data_dir={data_dir}",
        f"--dataset={dataset}",
        f"--out_dir={out_dir}",
        "--device=cpu",
        "--time_budget=0",
        f"--max_iters={steps}",
        f"--eval_interval={steps}",
        "--eval_iters=1",
        "--log_interval=1",
        "--sample_chars=0",
        "--eval_sample_chars=0",
        "--compile=False",
    ]


def train_estimate(flags, data_dir="data", dataset="shakespeare_char"):
    """chargpt/memory.py's estimate in bytes for train.py with flags (a config file first, or not)."""
    config_path = flags[0] if flags and flags[0].endswith(".py") else None
    config, model_config = load_configs(config_path, flags[1:] if config_path else flags)
    _, _, tokenizer = load_dataset(dataclasses.replace(config, data_dir=data_dir, dataset=dataset))
    model_config.vocab_size = tokenizer.vocab_size
    dtype = resolve_dtype(config.dtype, "cpu")  # auto: float32, the larger estimate
    return sum(memory.training_bytes(model_config, config.batch_size, config.optimizer, dtype).values())


def sample_command(out_dir, flags):
    return [sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu", *flags]


def sample_estimate(out_dir, flags):
    """chargpt/memory.py's estimate in bytes for sample.py with flags on the checkpoint in out_dir."""
    (config,), _ = parse(flags, [SampleConfig()], "sample.py", config_file=False)
    model, _ = model_from_checkpoint(load_checkpoint(find_checkpoint(out_dir)))
    return sum(memory.generation_bytes(config, model, len(config.prompt())).values())


# config/shakespeare_char.py without its architecture options: the lecture's Blocks
LECTURE_ARCHITECTURE = ["--position=learned", "--qk_norm=False", "--activation=relu"]


def bench_lens(args, overrides):
    """What the playground's lens costs for a text of --chars characters: one /api/lens answer
    (its last window of block_size + 1), the same with a head off, and every window of the
    text (pointing at each of its characters once); then /api/heads' ranking."""
    if args.repeats < 1 or args.chars < 2:
        raise ValueError(f"--repeats must be at least 1 and --chars at least 2, got {args.repeats} and {args.chars}")
    path = find_checkpoint(args.out_dir)
    checkpoint = load_checkpoint(path)
    model, tokenizer = model_from_checkpoint(checkpoint, "cpu", path)
    if not hasattr(model, "blocks"):
        raise ValueError(f"--out_dir: {path} holds a {model.config.model_type} model, which has no layers to look through")
    torch.set_num_threads(1)  # as serve.py answers a request: its threads compute with one (chargpt/machine.py)
    val, split = val_split(checkpoint.get("train_config", {}), tokenizer.chars)
    ids = [int(t) for t in val[: args.chars]]  # the first characters of the val split (any text costs the same)
    B, c = model.config.block_size, model.config
    print(
        f"{path}: {c.n_layer} layers x {c.n_head} heads, n_embd {c.n_embd}, block_size {B}; {machine.machine()}; "
        f"as serve.py answers a request; a text of {len(ids)} characters from {split}"
    )

    def best(work):
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        return min(times[1:]) * 1000

    window = ids[-(B + 1) :]
    one = best(lambda: analyse(model, tokenizer, window))
    off = best(lambda: analyse(model, tokenizer, window, [(0, 0)]))
    starts = sorted({max(0, i + 1 - B) for i in range(len(ids))})  # the windows the page asks for, one per start
    every = best(lambda: [analyse(model, tokenizer, ids[s : s + B + 1]) for s in starts])
    x, y = val_slice(val, B)
    heads = best(lambda: rank_heads(model, x, y))
    print(f"| what | ms (best of {args.repeats}) |\n|---|---|")
    print(f"| /api/lens: one window ({len(window)} characters), every head on | {one:.1f} |")
    print(f"| /api/lens: the same with a head off (and every head on, for the loss it rose by) | {off:.1f} |")
    print(f"| every window of the text: pointing at each of its {len(ids)} characters ({len(starts)} windows) | {every:.0f} |")
    print(f"| /api/heads: {c.n_layer * c.n_head} heads in turn, {x.shape[0]} windows of {x.shape[1]} | {heads:.0f} |")


def bench_memory(args, overrides):
    runs = [
        ["config/shakespeare_char_cpu.py", "--dtype=float32"],
        ["config/shakespeare_char.py", "--dtype=float32", *LECTURE_ARCHITECTURE],
        ["config/shakespeare_char.py", "--dtype=bfloat16", *LECTURE_ARCHITECTURE],
        ["config/shakespeare_char.py", "--dtype=float32", "--attn_dropout=0.1", *LECTURE_ARCHITECTURE],
        ["config/shakespeare_char.py", "--dtype=float32"],  # its options: squared ReLU, rotary positions, QK-norm
        ["config/lecture/8_dropout_scaled.py", "--dtype=float32", "--batch_size=16"],
        ["config/lecture/8_dropout_scaled.py", "--dtype=bfloat16", "--batch_size=16"],
        ["config/lecture/8_dropout_scaled.py", "--dtype=float32"],
    ]
    row = lambda flags, estimate, measured: (
        f"| {' '.join(flags)} | {memory.format_bytes(estimate)} | {memory.format_bytes(measured)} | {measured / estimate:.2f} |"
    )
    baseline = peak_memory([[sys.executable, "-c", TRAIN_BASELINE]])[0]
    print(
        f"train.py, 5 steps in a fresh process: its peak anonymous memory minus the {memory.format_bytes(baseline)} of "
        f"`{TRAIN_BASELINE}`"
    )
    print("| run | estimate | measured | measured / estimate |\n|---|---|---|---|")
    for flags in runs:
        flags = flags + list(overrides)
        with tempfile.TemporaryDirectory() as out_dir:
            measured = peak_memory([train_command(flags, out_dir)])[0] - baseline
        print(row(flags, train_estimate(flags), measured), flush=True)
    if args.out_dir:
        baseline = peak_memory([[sys.executable, "-c", SAMPLE_BASELINE, args.out_dir]])[0]
        print(
            f"sample.py on {args.out_dir}: its peak anonymous memory minus the {memory.format_bytes(baseline)} of "
            "the imports and the loaded model"
        )
        print("| run | estimate | measured | measured / estimate |\n|---|---|---|---|")
        for flags in (
            ["--num_samples=1", "--max_new_tokens=500"],
            ["--num_samples=1000", "--max_new_tokens=200"],
            ["--num_samples=1000", "--max_new_tokens=50", "--kv_cache=False"],
            ["--num_samples=4000", "--max_new_tokens=100"],
            ["--num_samples=2", "--max_new_tokens=20000"],
        ):
            measured = peak_memory([sample_command(args.out_dir, flags)])[0] - baseline
            print(row(flags, sample_estimate(args.out_dir, flags), measured), flush=True)


# -----------------------------------------------------------------------------
# python bench.py gpu: the prepared check of the GPU path, every figure in one run

GPU_OUT_DIR = "out-bench-gpu"
LECTURE = "config/lecture/8_dropout_scaled.py"
GPU_RECIPE = "config/shakespeare_char_gpu.py"
TARGET = 1.48  # the lecture's val loss
TESTS_SECONDS = 150  # caps that keep the whole check within 8 minutes (a run that overruns its budget is stopped)
RECIPE_SECONDS = 90
# dense 16-bit tensor-core peaks in TFLOP/s (no sparsity), from NVIDIA's datasheets, by a
# part of torch.cuda.get_device_name(); the first match counts, so longer names come first
PEAK_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H200 NVL", 835),
    ("H100", 989),
    ("H200", 989),
    ("A100", 312),
    ("A10G", None),  # AWS's variant of the A10: no datasheet figure
    ("A10", 125),
    ("L40S", 362),
    ("L40", 181),
    ("L4", 121),
    ("RTX 4090", 165),
    ("V100-PCIE", 112),
    ("V100", 125),
    ("T4", 65),
)


def peak_tflops(name):
    """The GPU's dense float16/bfloat16 tensor-core peak in TFLOP/s, or None when unknown."""
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


def no_gpu_reason():
    """Why there is no CUDA GPU here, or None when there is one."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is built without CUDA"
    return f"PyTorch {torch.__version__}, built for CUDA {torch.version.cuda}, sees no CUDA device"


def bench_gpu(args, overrides):
    """The GPU check: the device and its dtype, the GPU tests, the lecture's stage 8 and the
    GPU recipe trained for real, generation's speed; the figures as a table at the end."""
    if overrides:
        raise ValueError(f"bench.py gpu takes no train.py flags, got {' '.join(overrides)}")
    why = no_gpu_reason()
    if why:
        raise ValueError(f"no CUDA GPU here: {why}; the GPU check needs one (the GPU path is tested on the CPU only)")
    t_start = time.time()
    name, capability = machine.gpu()
    dtype, reason = machine.cuda_dtype(capability)
    peak = args.peak_tflops or peak_tflops(name)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    rows = [("GPU", f"{machine.describe_gpu()}, {memory_gib:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")]
    rows.append(("--dtype=auto", f"{dtype}: {reason}"))
    rows.append(("peak 16-bit tensor FLOP/s (datasheet, dense)", f"{peak} TFLOP/s" if peak else "unknown (--peak_tflops)"))
    for what, figure in rows:
        print(f"{what}: {figure}", flush=True)
    tests_ok, tests = gpu_tests()
    rows.append(("GPU tests (pytest -m gpu)", tests))
    failed = [] if tests_ok else ["the GPU tests"]
    os.makedirs(GPU_OUT_DIR, exist_ok=True)
    ensure_dataset()
    lecture_dir, recipe_dir = os.path.join(GPU_OUT_DIR, "lecture8"), os.path.join(GPU_OUT_DIR, "recipe")
    # stage 8's learning rate is constant, so a time budget only caps it: where it ends, not how it learns
    lecture = [LECTURE, f"--out_dir={lecture_dir}", f"--time_budget={args.lecture_minutes:g}"]
    parts = (
        ("stage 8", lambda: train_figures("stage 8", lecture, args.lecture_minutes * 60 + 60, peak)),
        ("GPU recipe", lambda: train_figures("GPU recipe", [GPU_RECIPE, f"--out_dir={recipe_dir}"], RECIPE_SECONDS, peak)),
        ("sampling", lambda: sampling_figures(lecture_dir, "cuda")),
    )
    for label, part in parts:  # one that fails is a row, and the others still run
        try:
            rows += part()
        except (ValueError, OSError) as e:
            rows.append((label, f"failed: {e}"))
            failed.append(label)
    rows.append(("the whole check", f"{time.time() - t_start:.0f} s"))
    print("\n| what | figure |\n|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")
    if failed:
        raise ValueError(f"the GPU check failed: {', '.join(failed)} (see above)")


def gpu_tests():
    """(passed?, pytest's summary) of the tests marked gpu, run here in a fresh process."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", os.path.join(ROOT, "tests")]
    print(f"$ {' '.join(command[1:])}", flush=True)
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_SECONDS)
    except subprocess.TimeoutExpired:
        return False, f"not done in {TESTS_SECONDS} s"
    lines = (result.stdout + result.stderr).strip().splitlines()
    print("\n".join(lines[-40:] if result.returncode else lines[-1:]), flush=True)
    return result.returncode == 0, lines[-1].strip("= ") if lines else f"pytest exited with {result.returncode}"


def ensure_dataset():
    """data/shakespeare_char prepared, by prepare.py if it is not (which downloads, or reads input.txt there)."""
    if not os.path.isfile(os.path.join(ROOT, "data", "shakespeare_char", "train.bin")):
        result = subprocess.run([sys.executable, "prepare.py"], cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"python prepare.py failed: {result.stderr.strip().splitlines()[-1]}")


def train_figures(label, flags, stop_after, peak):
    """[(what, figure)] of a train.py run with flags, SIGTERMed after stop_after seconds:
    when it first reached TARGET, its last val loss and eval.py's over the whole val split,
    its wall time, tokens/s and the fraction of the GPU's peak FLOP/s it ran at."""
    out_dir = next(flag.split("=", 1)[1] for flag in flags if flag.startswith("--out_dir="))
    command = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--overwrite=True"]
    print(f"$ {' '.join(command[1:])}", flush=True)
    keep = ("step ", "device ", "dtype ", "done:", "float16:", "SIGTERM", "compiled", "time budget")
    run = watch_train(command, lambda line: line.startswith(keep), stop_after, f"{out_dir}.log")
    reached = run.first_at(TARGET)
    steps = f"{run.steps:,} steps" + (f", stopped by the check at {stop_after:.0f} s" if run.stopped else "")
    rows = [
        (f"{label}: val <= {TARGET} first", f"step {reached[1]:,}, {reached[0]:.0f} s" if reached else "not reached"),
        (f"{label}: last val (train.py's estimate / eval.py, whole val split)", f"{run.evals[-1][2]:.4f} / {whole_val(out_dir)}"),
        (f"{label}: the whole command", f"{run.wall:.1f} s, {steps}"),
    ]
    if run.rates:
        rates = run.rates[1:] or run.rates  # the first line counts the warm-up steps
        tokens, tflops = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
        of_peak = f", {tflops / peak:.1%} of {peak} TFLOP/s" if peak else ""
        rows.append((f"{label}: speed (median of the logged lines)", f"{tokens:,.0f} tokens/s, {tflops:.1f} TFLOP/s{of_peak}"))
    return rows


def whole_val(out_dir):
    """eval.py's val loss of out_dir's best checkpoint, as text."""
    result = subprocess.run([sys.executable, "eval.py", f"--out_dir={out_dir}"], cwd=ROOT, capture_output=True, text=True)
    found = re.search(r"val loss (\d+\.\d+)", result.stdout)
    return found[1] if found else f"eval.py failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}"


def sampling_figures(out_dir, device, n=1000):
    """[(what, figure)]: characters per second generating from out_dir's checkpoint as sample.py does."""
    model, _ = model_from_checkpoint(load_checkpoint(find_checkpoint(out_dir)), device)
    generation_seconds(model, 20, True)  # warm-up
    rows = []
    for batch in (1, 10):
        dtype = pick_decode_dtype(model, batch, n, use_cache=False)[0]
        rate = batch * n / generation_seconds(model, n, True, batch, dtype)
        rows.append((f"sampling, {batch} x {n} characters, KV cache ({dtype} decode)", f"{rate:,.0f} chars/s"))
    rate = n / generation_seconds(model, n, False)
    rows.append((f"sampling, 1 x {n} characters, uncached (the lecture's loop)", f"{rate:,.0f} chars/s"))
    return rows


def bench_classroom(args, overrides):
    """serve.py, started afresh at each --max_generations, with args.clients clients asking
    args.chars characters at once, each its own seed: when each saw its first and last
    character, the characters per second of all of them together, and one client alone
    beside; and each text checked against what generate_tokens gives for its seed alone."""
    loaded = load_checkpoint(find_checkpoint(args.out_dir))
    model, tokenizer = model_from_checkpoint(loaded)
    seeds = range(1, args.clients + 1)
    alone = {}
    for seed in seeds:  # sample.py's text for each seed, as serve.py's defaults make it
        config = SampleConfig(start="\n", max_new_tokens=args.chars, seed=seed)
        alone[seed] = tokenizer.decode([t.item() for t in generate_tokens(model, tokenizer.encode("\n"), config)])
    print(f"{find_checkpoint(args.out_dir)}; {args.clients} clients x {args.chars} characters; {os.cpu_count()} CPUs")
    print(
        "| --max_generations | clients | first character (median / last client) | last character (median / last client) "
        "| chars/s, all together | texts as alone |\n|---|---|---|---|---|---|"
    )
    idle_lines = []
    for slots in args.generations:
        flags = [f"--out_dir={args.out_dir}", f"--max_generations={slots}", f"--max_queue={args.clients}", "--timeout=60"]
        command = [sys.executable, os.path.join(ROOT, "serve.py"), *flags]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            port = int(process.stdout.readline().split()[2].rstrip("/").rsplit(":", 1)[1])
            classroom_round(port, [0], 50)  # warm-up: a fresh process's first generation pays for more than itself
            if slots == args.generations[0] and args.idle:
                idle_lines.append(beside_idle(port, process.pid, args.idle))
            for label, clients in (("1 alone", [seeds[0]]), (str(args.clients), list(seeds))):
                results = classroom_round(port, clients, args.chars)
                firsts = sorted(first for first, _, _ in results.values())
                lasts = sorted(last for _, last, _ in results.values())
                same = sum(text == alone[seed] for seed, (_, _, text) in results.items())
                print(
                    f"| {slots} | {label} | {statistics.median(firsts):.2f} s / {firsts[-1]:.2f} s "
                    f"| {statistics.median(lasts):.2f} s / {lasts[-1]:.2f} s | {len(clients) * args.chars / lasts[-1]:,.0f} "
                    f"| {same} of {len(clients)} |"
                )
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    print(*idle_lines, sep="\n")


def beside_idle(port, pid, n):
    """A line: how long /api/info and a 20-character generation take beside n connections that
    never complete a request, and the CPU seconds the server spends over 5 s with them open."""
    import http.client
    import socket

    def cpu_seconds():  # utime + stime of the server's process (Linux)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for sock in idle[: n // 2]:
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half of them send half a request
    time.sleep(0.5)
    times = []
    for method, path, body in (("GET", "/api/info", None), ("POST", "/api/generate", '{"max_new_tokens": 20}')):
        t0 = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        times.append((time.perf_counter() - t0, response.status))
        connection.close()
    before = cpu_seconds()
    time.sleep(5)
    spent = cpu_seconds() - before
    for sock in idle:
        sock.close()
    (info, info_status), (generate, generate_status) = times
    return (
        f"beside {n} connections that never complete a request: /api/info {info_status} in {info * 1000:.0f} ms, "
        f"a 20-character generation {generate_status} in {generate * 1000:.0f} ms; the server's CPU over 5 s "
        f"with them open: {spent:.2f} s"
    )


def classroom_round(port, seeds, chars):
    """{seed: (seconds to its first character, to its last, its text)}, every client started at once."""
    import http.client
    import json

    results, start = {}, threading.Barrier(len(seeds))
    t0 = [None]

    def client(seed):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"prompt": "\n", "max_new_tokens": chars, "seed": seed})
        start.wait()
        t0[0] = t0[0] or time.perf_counter()
        connection.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
        response, text, first = connection.getresponse(), [], None
        event = None
        for line in response:  # Server-Sent Events, a line at a time
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event is None:
                text.append(json.loads(line[6:])["char"])
                first = first or time.perf_counter()
            elif line == "":
                event = None
        results[seed] = (first - t0[0], time.perf_counter() - t0[0], "".join(text))
        connection.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("train", help="fast path vs float32 eager reference")
    p.add_argument("config")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p = sub.add_parser("health", help="what health steps cost, at --health_interval")
    p.add_argument("config")
    p.add_argument("--pairs", type=int, default=10, help="health steps timed against the plain steps around them")
    p.add_argument("--rounds", type=int, default=2, help="pairs of blocks of health_interval steps, without and with (0: none)")
    p.add_argument("--warmup", type=int, default=5)
    p = sub.add_parser("sizes", help="a table over model sizes")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16)
    p = sub.add_parser("limit", help="each recipe's step against the matmul peak, in one run")
    p.add_argument("configs", nargs="*", default=["config/shakespeare_char_cpu.py", "config/shakespeare_char.py"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch's threads (0: as torch starts)")
    p.add_argument("--profile", type=int, default=0, help="then print the top N operations of one step of each recipe")
    p = sub.add_parser("steps", help="what options cost a step: a recipe and variants of it, timed in turns")
    p.add_argument("config")
    p.add_argument("--variant", action="append", help='flags added to the recipe\'s, as one string: --variant="--bias=False"')
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch's threads (0: as torch starts)")
    p = sub.add_parser("loss", help="wall time to a target val loss")
    p.add_argument("config", nargs="?")
    p.add_argument("--target", type=float, required=True)
    p.add_argument(
        "--out_dir", default=LOSS_OUT_DIR, help=f"where train.py writes (default {LOSS_OUT_DIR}, trained afresh by every run)"
    )
    p = sub.add_parser("versus", help="our recipe against nanoGPT's README CPU command, time to a val loss")
    p.add_argument("config", nargs="?", default="config/shakespeare_char_cpu.py")
    p.add_argument("--nanogpt", required=True, help="a nanoGPT checkout with its data/shakespeare_char prepared")
    p.add_argument("--target", type=float, default=1.88)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.add_parser("memory", help="chargpt/memory.py's estimate against the measured peak")
    p.add_argument("--out_dir", default=None, help="a trained checkpoint to measure sample.py's estimate on too")
    p = sub.add_parser("sample", help="generation speed")
    p.add_argument("--out_dir", default=None)
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2, help="passes over the rows, interleaved; each row keeps its best")
    p.add_argument(
        "--decode_dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "int8"],
        help="sample.py's --decode_dtype: the pick compared with the rows, and the dtype of the lengths table",
    )
    p = sub.add_parser("classroom", help="serve.py with many clients at once, against one alone")
    p.add_argument("--out_dir", default="out-cpu")
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--generations", type=lambda v: [int(n) for n in v.split(",")], default=[1, 2, 4])
    p.add_argument("--idle", type=int, default=300, help="connections that never complete a request, beside which to time one")
    p = sub.add_parser("lens", help="what the playground's logit lens and heads view cost")
    p.add_argument("--out_dir", required=True, help="a trained checkpoint, with the dataset it was trained on")
    p.add_argument("--chars", type=int, default=256, help="the text's length: its first characters of the val split")
    p.add_argument("--repeats", type=int, default=5, help="timed passes of each row after a warm-up; each keeps its best")
    p = sub.add_parser("gpu", help="the prepared check of the GPU path: every figure in one run (under 8 minutes)")
    p.add_argument(
        "--lecture_minutes", type=float, default=3.0, help="stage 8's time budget: a cap, should its 5,000 steps take longer"
    )
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's 16-bit peak, where bench.py does not know it")
    args, overrides = parser.parse_known_args()
    try:
        commands = {"train": bench_train, "sizes": bench_sizes, "loss": bench_loss, "sample": bench_sample, "limit": bench_limit}
        commands.update(memory=bench_memory, gpu=bench_gpu, health=bench_health, versus=bench_versus)
        commands.update(classroom=bench_classroom, lens=bench_lens, steps=bench_steps)
        commands[args.what](args, overrides)
    except (ValueError, OSError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
