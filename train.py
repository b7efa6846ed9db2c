"""Train the lecture's GPT on a prepared character dataset.

    python prepare.py                                  # once: data/shakespeare_char/
    python train.py config/shakespeare_char_cpu.py     # small model, a laptop CPU
    python train.py config/shakespeare_char.py         # the lecture's model
    python train.py config/shakespeare_char.py --init_from=resume   # continue out/ckpt.pt
    python train.py config/shakespeare_char_cpu.py --max_iters=20 --eval_interval=10 --out_dir=out-smoke   # smoke run
    python train.py --help                             # every key, its default and meaning

Settings come from the dataclass defaults below, then the config file, then --key=value
flags. The run writes into out_dir: config.json (the resolved settings), ckpt.pt (the
latest state, at every eval), best.pt (the best val loss so far), metrics.jsonl (the logged
numbers, one JSON object a line), loss.png (the loss curves, redrawn at every eval; needs
matplotlib) and, at the end, samples.txt. On a terminal the progress is one line rewritten
in place; otherwise a plain line every log_interval steps (see metrics.py). Each eval
prints a short sample (eval_sample_chars). Ctrl-C or SIGTERM saves ckpt.pt and exits;
--init_from=resume continues exactly where the run stopped, and max_iters stays the total
number of steps; metrics.jsonl is cut back to that step and appended to.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import load_checkpoint, save_checkpoint
from configurator import HelpRequested, knob, parse
from metrics import Reporter
from model import GPTConfig, build_model
from tokenizer import CharTokenizer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = knob("out", "where checkpoints, config.json and samples.txt go")
    dataset: str = knob("shakespeare_char", "read data_dir/DATASET/{train.bin,val.bin,meta.json}")
    data_dir: str = knob("data", "folder holding the prepared datasets")
    init_from: str = knob("scratch", "'scratch' for a new model, 'resume' to continue out_dir/ckpt.pt")
    # evaluation and logging
    eval_interval: int = knob(250, "evaluate train and val loss, and save ckpt.pt, every this many steps")
    eval_iters: int = knob(200, "batches per split in each loss estimate")
    log_interval: int = knob(10, "log loss, lr, ms/iter, tokens/s, elapsed and ETA (a line, and metrics.jsonl) every this many steps")
    eval_sample_chars: int = knob(200, "characters of text generated and printed at each eval (0: none)")
    sample_chars: int = knob(500, "characters of text generated into out_dir/samples.txt at the end")
    # data and optimisation
    batch_size: int = knob(64, "sequences per micro-step")
    gradient_accumulation_steps: int = knob(1, "micro-steps whose gradients add up to one optimizer step")
    max_iters: int = knob(5000, "total optimizer steps (a resumed run stops here too)")
    learning_rate: float = knob(1e-3, "peak learning rate of AdamW")
    min_lr: float = knob(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = knob(100, "steps of linear warmup from 0 to learning_rate")
    lr_decay_iters: int = knob(0, "step where the cosine decay reaches min_lr (0: max_iters)")
    weight_decay: float = knob(0.1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.99, "AdamW beta2")
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: no clipping)")
    # system
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, cuda:1, mps")
    dtype: str = knob("auto", "'auto' (bfloat16 where the device computes it fast, else float32), float32 or bfloat16")
    compile: bool = knob(False, "torch.compile the model (slow start, faster steps)")
    seed: int = knob(1337, "seed of the weights, the batches and dropout")

    def validate(self):
        """Raise ValueError naming the flag for a setting that cannot run."""
        positive = ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_chars", "eval_sample_chars"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key} must be 0 or more, got {getattr(self, key)}")
        for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{key} must be a finite number >= 0, got {value}")
        if self.learning_rate == 0:
            raise ValueError("--learning_rate must be greater than 0")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"--{key} must be in [0, 1), got {getattr(self, key)}")
        if self.init_from not in ("scratch", "resume"):
            raise ValueError(f"--init_from must be 'scratch' or 'resume', got {self.init_from!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


# -----------------------------------------------------------------------------
# device and precision


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but CUDA is not available here (try --device=cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device={name} but MPS is not available here (try --device=cpu)")
    return name


def cpu_has_fast_bf16():
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere
    bf16 is emulated and far slower than float32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def resolve_dtype(name, device_type):
    if name != "auto":
        return name
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cpu":
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    return "float32"


def autocast_context(device_type, dtype):
    """Mixed precision: matmuls in bf16, weights, softmax and loss in float32."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# data


def load_dataset(config):
    """(train, val, tokenizer): the token arrays (memory-mapped uint16) and vocabulary."""
    folder = os.path.join(config.data_dir, config.dataset)
    paths = {name: os.path.join(folder, name) for name in ("train.bin", "val.bin", "meta.json")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--dataset={config.dataset}: {path} not found (run: python prepare.py --out_dir {folder})")
    with open(paths["meta.json"], encoding="utf-8") as f:
        meta = json.load(f)
    tokenizer = CharTokenizer(meta["chars"])
    train = np.memmap(paths["train.bin"], dtype=np.uint16, mode="r")
    val = np.memmap(paths["val.bin"], dtype=np.uint16, mode="r")
    return train, val, tokenizer


class BatchSampler:
    """Random windows of block_size + 1 tokens from a token array, drawn with its own seeded
    generator so that its state can be saved and restored for an exact resume."""

    def __init__(self, data, block_size, batch_size, seed):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        self.generator = torch.Generator().manual_seed(seed)

    def reset(self):
        self.generator.manual_seed(self.seed)

    def next(self, device):
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)  # (B,)
        offsets = ix[:, None].numpy() + np.arange(self.block_size + 1)  # (B, T+1)
        window = torch.from_numpy(self.data[offsets].astype(np.int64))  # (B, T+1)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each: y is x shifted by one
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# optimisation


def get_lr(it, config):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= decay_iters:
        return config.min_lr
    progress = (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def make_optimizer(model, config, device_type):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) and not on biases or
    LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates every parameter in one pass; it exists for CUDA and CPU
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)


@torch.no_grad()
def estimate_loss(model, samplers, eval_iters, ctx, device):
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout). The batches
    come from a fresh generator per eval, so every eval of a run sees the same windows."""
    out = {}
    model.eval()
    for split, sampler in samplers.items():
        sampler.reset()
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = sampler.next(device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


# -----------------------------------------------------------------------------
# checkpoints


def rng_state(batch_sampler):
    state = {
        "torch": torch.get_rng_state(),
        "batches": batch_sampler.generator.get_state(),
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, batch_sampler):
    torch.set_rng_state(state["torch"])
    batch_sampler.generator.set_state(state["batches"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(checkpoint, path, model_config, tokenizer):
    """A checkpoint must match the model flags and the data's vocabulary to go on training."""
    stored = checkpoint["model_config"]
    for key, value in dataclasses.asdict(model_config).items():
        if stored.get(key) != value:
            raise ValueError(f"--{key}={value} does not match {stored.get(key)!r} stored in {path}")
    if checkpoint["vocab"] != tokenizer.chars:
        raise ValueError(f"the vocabulary of {path} does not match the dataset's meta.json")


class StopRequested:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks between steps, so a stop always
    lands on a whole step and is saved."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# the run


def train(config, model_config, log=print, live=None):
    """Run the training loop; return a summary dict (iter_num, best_val_loss, ...).

    log prints a line; live is a terminal stream to redraw a progress line on, or None for
    plain log lines every log_interval steps."""
    config.validate()
    device = resolve_device(config.device)
    device_type = device.split(":")[0]
    dtype = resolve_dtype(config.dtype, device_type)
    if dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype=bfloat16 but this GPU has no bfloat16 (use --dtype=float32)")
    ctx = autocast_context(device_type, dtype)

    train_data, val_data, tokenizer = load_dataset(config)
    model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    model_config.validate()
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) <= model_config.block_size:
            raise ValueError(f"--block_size={model_config.block_size} is longer than the {split} split ({len(data)} tokens)")

    os.makedirs(config.out_dir, exist_ok=True)
    if not os.access(config.out_dir, os.W_OK):
        raise PermissionError(f"--out_dir {config.out_dir} is not writable")
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    best_path = os.path.join(config.out_dir, "best.pt")

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(model_config).to(device)
    optimizer = make_optimizer(model, config, device_type)
    batches = BatchSampler(train_data, model_config.block_size, config.batch_size, config.seed)
    eval_samplers = {
        "train": BatchSampler(train_data, model_config.block_size, config.batch_size, seed=1),
        "val": BatchSampler(val_data, model_config.block_size, config.batch_size, seed=2),
    }
    iter_num, best_val_loss = 0, float("inf")
    if config.init_from == "resume":
        checkpoint = load_checkpoint(ckpt_path, device)
        check_resumable(checkpoint, ckpt_path, model_config, tokenizer)
        if "optimizer" not in checkpoint:
            raise ValueError(f"{ckpt_path} holds no optimizer state, so it cannot be resumed")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        set_rng_state(checkpoint["rng"], batches)
        log(f"resuming from {ckpt_path} at step {iter_num} (best val loss {best_val_loss:.4f})")
        del checkpoint

    tokens_per_iter = config.batch_size * config.gradient_accumulation_steps * model_config.block_size
    log(f"config: {json.dumps({**dataclasses.asdict(model_config), **dataclasses.asdict(config)})}")
    log(
        f"device {device}, dtype {dtype}, {model.num_params() / 1e6:.2f}M parameters, "
        f"{tokens_per_iter:,} tokens per step"
    )
    with open(os.path.join(config.out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config), "device": device, "dtype": dtype}, f, indent=1)

    def checkpoint_dict(with_optimizer=True):
        state = {
            "model": model.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "model_config": dataclasses.asdict(model_config),
            "train_config": dataclasses.asdict(config),
            "vocab": tokenizer.chars,
        }
        if with_optimizer:
            state["optimizer"] = optimizer.state_dict()
            state["rng"] = rng_state(batches)
        return state

    step_model = model
    if config.compile:
        t0 = time.time()
        step_model = torch.compile(model)
        log("compiling the model (the first steps are slow)...")
    flops_per_iter = model.flops_per_token() * tokens_per_iter

    model.train()
    start_iter, t_start = iter_num, time.time()
    t_last, iters_since_log = time.time(), 0
    report = Reporter(config.out_dir, log, live, start_iter, config.max_iters, tokens_per_iter, resume=config.init_from == "resume")
    log = report.log  # so that no message lands on top of the live line
    with StopRequested() as stop, report:  # report: the live line is ended however the loop ends
        while True:
            lr = get_lr(iter_num, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            last_step = iter_num == config.max_iters
            if (iter_num % config.eval_interval == 0 or last_step) and not (iter_num == start_iter and iter_num > 0):
                losses = estimate_loss(step_model, eval_samplers, config.eval_iters, ctx, device)
                log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if not all(math.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"the loss is not finite at step {iter_num}; {ckpt_path} holds the last good state (try a lower --learning_rate)")
                if losses["val"] < best_val_loss:
                    best_val_loss = losses["val"]
                    save_checkpoint(checkpoint_dict(with_optimizer=False), best_path)
                save_checkpoint(checkpoint_dict(), ckpt_path)
                # a sample to watch the model improve; its own seeded generator leaves the
                # training RNG streams untouched, so a resumed run stays exact
                sample = sample_text(model, tokenizer, config.eval_sample_chars, device, config.seed) if config.eval_sample_chars else None
                report.eval(iter_num, losses, best_val_loss, sample)
                t_last, iters_since_log = time.time(), 0  # eval time is not step time
            if last_step:
                break
            if stop.signal:
                save_checkpoint(checkpoint_dict(), ckpt_path)
                log(f"{stop.signal}: saved {ckpt_path} at step {iter_num}; continue with --init_from=resume")
                return {"iter_num": iter_num, "best_val_loss": best_val_loss, "stopped": stop.signal}

            for micro_step in range(config.gradient_accumulation_steps):
                x, y = batches.next(device)
                with ctx:
                    _, loss = step_model(x, y)
                    loss = loss / config.gradient_accumulation_steps  # the mean over micro-steps
                loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            iters_since_log += 1

            log_step = iter_num % config.log_interval == 0
            if log_step or report.live_due():
                lossf = loss.item() * config.gradient_accumulation_steps  # a sync point: only here
                if not math.isfinite(lossf):
                    raise FloatingPointError(f"the loss is not finite at step {iter_num}; {ckpt_path} holds the last good state (try a lower --learning_rate)")
                if report.live_due():
                    report.show_live(iter_num, lossf, lr)
            if log_step:
                if config.compile and iter_num - start_iter == config.log_interval:
                    log(f"compiled, first {config.log_interval} steps took {time.time() - t0:.1f}s")
                dt = (time.time() - t_last) / iters_since_log
                report.train_step(iter_num, lossf, lr, dt, flops_per_iter)
                t_last, iters_since_log = time.time(), 0

    elapsed = time.time() - t_start
    log(f"done: {iter_num} steps in {elapsed:.1f}s, best val loss {best_val_loss:.4f}")
    if config.sample_chars > 0:
        text = sample_text(model, tokenizer, config.sample_chars, device, config.seed)
        with open(os.path.join(config.out_dir, "samples.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        log(f"sample (also in {config.out_dir}/samples.txt):\n{text}")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "elapsed": elapsed}


def sample_text(model, tokenizer, num_chars, device, seed):
    """num_chars characters generated from a newline (or the first character of the vocabulary)."""
    model.eval()
    start = "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]
    idx = torch.tensor([tokenizer.encode(start)], dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed)
    tokens = [t.item() for t in model.generate(idx, num_chars, generator=generator)]
    model.train()
    return start + tokenizer.decode(tokens)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        (config, model_config), _ = parse(argv, [TrainConfig(), GPTConfig()], "train.py [CONFIG_FILE] [--key=value ...]")
        live = sys.stdout if sys.stdout.isatty() else None
        summary = train(config, model_config, log=lambda msg: print(msg, flush=True), live=live)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    # a run stopped by a signal exits as the shell expects: 128 + the signal's number
    return 128 + signal.Signals[summary["stopped"]].value if "stopped" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
