"""Train the lecture's GPT on a prepared character dataset.

    python prepare.py                                  # once: data/shakespeare_char/
    python train.py config/shakespeare_char_cpu.py     # small model, a laptop CPU: ~25 s, into out-cpu/
    python train.py config/shakespeare_char.py         # the lecture's GPT in a 15-minute time budget, into out/
    python train.py config/lecture/8_dropout_scaled.py # the lecture's exact model and recipe (a GPU)
    python train.py config/lecture/3_multi_head.py     # one stage of the lecture (see ladder.py)
    python train.py config/shakespeare_char.py --init_from=resume   # continue out/ckpt.pt
    python train.py config/shakespeare_char.py --time_budget=30     # as good a model as 30 minutes give here
    python train.py config/shakespeare_char_cpu.py --time_budget=0 --max_iters=20 --eval_interval=10 --out_dir=out-smoke --overwrite=True   # smoke run
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

A run is measured in steps (max_iters) or, with --time_budget=MINUTES, in wall time: then
the budget alone decides when the run stops and drives the lr schedule (max_iters and
lr_decay_iters are not used, and the run says so once). The time counts from the start of
train(), loading the data and building the model included, to the end of samples.txt: the
loop stops early enough for the final eval, checkpoint and sample, whose times it measured
at the earlier evals. warmup_iters and eval_interval stay in steps (see schedule.py for
why). A resumed budget run goes on with the time its checkpoint had spent; a different
--time_budget on resume counts the whole run, as a different max_iters does. A budget run is
not bit-for-bit reproducible: where it stops and its learning rates depend on the clock.

Before it writes anything, a run claims out_dir (rundir.py): it refuses a folder another
run is training in (an OS lock on out_dir/.lock, which kill -9 frees), and a new run
refuses a folder that holds a trained model unless --overwrite=True. It also refuses, with
both figures, a run whose estimated memory (memory.py) exceeds what the machine has free.
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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import allocator
import rundir
from checkpoint import load_checkpoint, save_checkpoint
from configurator import HelpRequested, knob, parse
from memory import check_fits, training_bytes
from metrics import Reporter
from model import GPTConfig, build_model
from muon import MuonAdamW, takes_muon
from precision import autocast_context, resolve_dtype
from schedule import SAMPLE_PROBE_CHARS, RunProgress, get_lr
from tokenizer import CharTokenizer


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = knob("out", "where checkpoints, config.json and samples.txt go")
    dataset: str = knob("shakespeare_char", "read data_dir/DATASET/{train.bin,val.bin,meta.json}")
    data_dir: str = knob("data", "folder holding the prepared datasets")
    init_from: str = knob("scratch", "'scratch' for a new model, 'resume' to continue out_dir/ckpt.pt")
    overwrite: bool = knob(False, "let a new run (init_from=scratch) start in an out_dir that holds a trained model, deleting its checkpoints; without it that run is refused")
    # evaluation and logging
    eval_interval: int = knob(250, "evaluate train and val loss, and save ckpt.pt, every this many steps (steps with a time budget too)")
    eval_iters: int = knob(200, "batches per split in each loss estimate")
    log_interval: int = knob(10, "log loss, lr, ms/iter, tokens/s, elapsed and ETA (a line, and metrics.jsonl) every this many steps")
    eval_sample_chars: int = knob(200, "characters of text generated and printed at each eval (0: none)")
    sample_chars: int = knob(500, "characters of text generated into out_dir/samples.txt at the end")
    # data and optimisation
    batch_size: int = knob(64, "sequences per micro-step")
    gradient_accumulation_steps: int = knob(1, "micro-steps whose gradients add up to one optimizer step")
    max_iters: int = knob(5000, "total optimizer steps (a resumed run stops here too); not used with a time_budget")
    time_budget: float = knob(0.0, "minutes of wall time for the whole run, evals and checkpoints included: it stops when they are spent, the lr schedule follows the time, and max_iters is not used (0: off)")
    learning_rate: float = knob(1e-3, "peak learning rate of AdamW")
    min_lr: float = knob(1e-4, "learning rate at the end of the decay")
    warmup_iters: int = knob(100, "steps of linear warmup from 0 to learning_rate (steps with a time budget too)")
    lr_schedule: str = knob("cosine", "after warmup: 'cosine' (half a cosine down to min_lr) or 'wsd' (learning_rate, then a straight line to min_lr over the last cooldown_frac of the run)")
    cooldown_frac: float = knob(0.2, "with lr_schedule='wsd': the fraction of the run (after warmup) that decays to min_lr")
    lr_decay_iters: int = knob(0, "step where the decay reaches min_lr (0: max_iters); not used with a time_budget")
    weight_decay: float = knob(0.1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.99, "AdamW beta2")
    data_order: str = knob("random", "'random': each window of a batch starts anywhere (the lecture's get_batch); 'epoch': every block_size window once per epoch, in a random order")
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: no clipping)")
    optimizer: str = knob("adamw", "'adamw', or 'muon': Muon for the Blocks' weight matrices, AdamW for the rest (muon.py)")
    muon_lr: float = knob(0.01, "peak learning rate of the Muon matrices (same warmup and decay as learning_rate)")
    # system
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, cuda:1, mps")
    dtype: str = knob("auto", "'auto' (bfloat16 autocast where it is faster: CUDA with bf16; a CPU with bf16 units where a timing of this model says so), float32 or bfloat16")
    compile: bool = knob(False, "torch.compile the model: a slow first step; pays on GPUs, not on small CPUs (see README)")
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
        for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "muon_lr", "time_budget"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{key} must be a finite number >= 0, got {value}")
        if self.learning_rate == 0:
            raise ValueError("--learning_rate must be greater than 0")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"--lr_schedule must be 'cosine' or 'wsd', got {self.lr_schedule!r}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise ValueError(f"--cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"--{key} must be in [0, 1), got {getattr(self, key)}")
        if self.init_from not in ("scratch", "resume"):
            raise ValueError(f"--init_from must be 'scratch' or 'resume', got {self.init_from!r}")
        if self.overwrite and self.init_from == "resume":
            raise ValueError("--overwrite=True is for a new run (--init_from=scratch); a resumed run goes on in its out_dir")
        if self.data_order not in ("random", "epoch"):
            raise ValueError(f"--data_order must be 'random' or 'epoch', got {self.data_order!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
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


# -----------------------------------------------------------------------------
# several processes (torchrun)


@dataclass
class Distributed:
    """This process's place among the processes torchrun started; rank 0 of 1 without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        """The one process that prints and writes files."""
        return self.rank == 0

    def sum(self, tensor):
        """tensor summed over the processes (in place)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def agree(self, error):
        """Raise on every process when any one of them failed a check; error is this process's
        exception or None. Around a check that not every process makes alike (rank 0 alone
        locks out_dir; each GPU has its own free memory), so that none goes on to wait for
        the others in a collective that never comes."""
        if self.world_size > 1:
            errors = [None] * self.world_size
            dist.all_gather_object(errors, None if error is None else str(error))
            first = next((e for e in errors if e is not None), None)
            if error is None and first is not None:
                raise ValueError(first)
        if error is not None:
            raise error
    def from_master(self, values, device):
        """values (a list of floats) as rank 0 has them, in every process."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()


def init_distributed(device):
    """(Distributed, device): join torchrun's process group when it started us (RANK is set),
    with NCCL on CUDA, one GPU per process, and gloo on the CPU."""
    if "RANK" not in os.environ:
        return Distributed(), device
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        device = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return ddp, device


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
    """Windows of block_size + 1 tokens from a token array, drawn with its own seeded
    generator so that its state can be saved and restored for an exact resume.

    order 'random': every window starts anywhere, independently of the others (the lecture's
    get_batch): some characters are seen twice before others once. order 'epoch': the array is
    cut into consecutive windows from a random offset, and an epoch visits each of them once,
    in a random order, so every character is a target once per epoch; the next epoch cuts
    at another offset."""

    def __init__(self, data, block_size, batch_size, seed, order="random"):
        self.data, self.block_size, self.batch_size, self.seed = data, block_size, batch_size, seed
        self.order = order
        self.generator = torch.Generator().manual_seed(seed)
        self.starts, self.used = None, 0  # this epoch's window starts, and how many are taken

    def reset(self):
        self.generator.manual_seed(self.seed)
        self.starts, self.used = None, 0

    def _window_starts(self, n):
        """(n,) start positions of the next windows."""
        if self.order == "random":
            return torch.randint(len(self.data) - self.block_size, (n,), generator=self.generator)  # (n,)
        if self.starts is None or self.used + n > len(self.starts):  # a new epoch
            offset = int(torch.randint(self.block_size, (1,), generator=self.generator))
            count = (len(self.data) - 1 - offset) // self.block_size
            self.starts = offset + self.block_size * torch.randperm(count, generator=self.generator)  # (count,)
            self.used = 0
        self.used += n
        return self.starts[self.used - n : self.used]  # (n,)

    def state_dict(self):
        state = {"generator": self.generator.get_state()}
        if self.starts is not None:
            state["starts"], state["used"] = self.starts.clone(), self.used
        return state

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.starts, self.used = state.get("starts"), state.get("used", 0)

    def next(self, device):
        ix = self._window_starts(self.batch_size)  # (B,)
        offsets = ix[:, None].numpy() + np.arange(self.block_size + 1)  # (B, T+1)
        window = torch.from_numpy(self.data[offsets].astype(np.int64))  # (B, T+1)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each: y is x shifted by one
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# optimisation


def make_optimizer(model, config, device_type, fused=True):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) and not on biases or
    LayerNorm gains; fused=False gives PyTorch's default (foreach) update. With
    --optimizer=muon the weight matrices inside the Blocks take Muon's update at muon_lr.
    Each group's "lr_scale" is its learning rate over learning_rate, for the schedule."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.optimizer == "muon":
        groups = [
            {"params": [p for n, p in named if takes_muon(n, p)], "muon": True, "lr": config.muon_lr,
             "lr_scale": config.muon_lr / config.learning_rate, "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if not takes_muon(n, p) and p.dim() >= 2], "muon": False,
             "lr": config.learning_rate, "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if p.dim() < 2], "muon": False, "lr": config.learning_rate, "weight_decay": 0.0},
        ]
        return MuonAdamW(groups, betas=(config.beta1, config.beta2))
    groups = [
        {"params": [p for n, p in named if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates every parameter in one pass; it exists for CUDA and CPU
    fused = fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused or None)


@torch.no_grad()
def estimate_loss(model, samplers, eval_iters, ctx, device, ddp=Distributed()):
    """Mean loss over eval_iters batches of each split, in eval mode (no dropout). The batches
    come from a fresh generator per eval, so every eval of a run sees the same windows. With
    several processes each computes every world_size-th batch and the sums are added up: the
    same number as one process computes, in a fraction of the time."""
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


def train_step(step_model, optimizer, batches, config, ctx, device, ddp=Distributed()):
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the last
    micro-batch's loss (divided by the number of micro-steps), without a device sync."""
    for micro_step in range(config.gradient_accumulation_steps):
        x, y = batches.next(device)
        # with DDP, gradients are averaged across processes on the last micro-step only
        last_micro = micro_step == config.gradient_accumulation_steps - 1
        sync = contextlib.nullcontext() if ddp.world_size == 1 or last_micro else step_model.no_sync()
        with sync:
            with ctx:
                _, loss = step_model(x, y)
                loss = loss / config.gradient_accumulation_steps  # the mean over micro-steps
            loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# -----------------------------------------------------------------------------
# checkpoints


def rng_state(batch_sampler):
    state = {
        "torch": torch.get_rng_state(),
        "batches": batch_sampler.state_dict(),
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, batch_sampler):
    torch.set_rng_state(state["torch"])
    batches = state["batches"]  # a checkpoint from before data_order kept the generator's state alone
    batch_sampler.load_state_dict(batches if isinstance(batches, dict) else {"generator": batches})
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_model_config(checkpoint, path, model_config, tokenizer):
    """The model config to go on training with: the checkpoint's, where the flags and config
    file left a key at its default; a key set to a different shape is an error (a new
    dropout is allowed). The vocabulary must be the dataset's."""
    if checkpoint["vocab"] != tokenizer.chars:
        raise ValueError(f"the vocabulary of {path} does not match the dataset's meta.json (--dataset?)")
    defaults, resolved = GPTConfig(), dataclasses.replace(model_config)
    for key, stored in checkpoint["model_config"].items():
        value = getattr(model_config, key)
        if value == stored or value == getattr(defaults, key):
            setattr(resolved, key, stored)
        elif key not in ("dropout", "attn_dropout"):
            raise ValueError(f"--{key}={value} does not match {key}={stored!r} stored in {path}")
    return resolved


def claim_out_dir(config, ddp):
    """out_dir's RunLock, taken by rank 0 (None elsewhere), before anything is written: a
    folder in use by another run, or a new run over a trained model without --overwrite, is
    refused on every process (rundir.py)."""
    lock, error = None, None
    if ddp.master:
        try:
            lock = rundir.claim(config.out_dir, fresh=config.init_from == "scratch", overwrite=config.overwrite)
        except (ValueError, OSError) as e:
            error = e
    ddp.agree(error)
    return lock


def check_memory(config, model_config, device, dtype, ddp):
    """Refuse, on every process, a run whose estimated peak (memory.py) exceeds the memory
    there is, instead of being killed by the OOM killer half-way. CPU processes that torchrun
    started on one machine share its memory, so their estimates add up."""
    parts = training_bytes(model_config, config.batch_size, config.optimizer, dtype, ddp.world_size)
    sharing = 1 if device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    parts = {name: size * sharing for name, size in parts.items()}
    what = f"training with --batch_size={config.batch_size} and --block_size={model_config.block_size}"
    if sharing > 1:
        what += f" in {sharing} processes"
    suggestions = {
        "activations": "use a smaller --batch_size (a larger --gradient_accumulation_steps keeps the global batch) "
                       "or a smaller --block_size",
        "weights, gradients and optimizer state": "the model is too big for this machine: use a smaller --n_layer or --n_embd",
    }
    error = None
    try:
        check_fits(parts, device, what, suggestions)
    except ValueError as e:
        error = e
    ddp.agree(error)
def check_resume_steps(checkpoint, path, config):
    """A step run resumed with --max_iters below the checkpoint's step would never reach it
    (the loop stops when the step equals max_iters) and would go on rewriting the trained
    model: refuse it, naming both numbers."""
    done = checkpoint["iter_num"]
    if not config.time_budget and config.max_iters < done:
        raise ValueError(f"--max_iters={config.max_iters} is below step {done}, where {path} already is: "
                         f"pass a --max_iters above {done} to train on (max_iters counts the whole run)")


def budget_change_note(checkpoint, path, config):
    """A note when a resumed run's time_budget differs from its checkpoint's, else None. The
    new setting wins, as a new max_iters does: it counts the whole run, the time spent
    before included, and the lr schedule follows it from here (so the learning rate jumps)."""
    saved = checkpoint.get("train_config", {}).get("time_budget", 0.0)
    if saved == config.time_budget:
        return None
    was = f"a time budget of {saved:g} min" if saved else "max_iters (no time budget)"
    now = f"--time_budget={config.time_budget:g}" if config.time_budget else f"max_iters={config.max_iters}"
    return (f"note: {path} was trained with {was}; the run goes on with {now} for the whole run, "
            "and the learning rate jumps to that schedule")


def write_run_config(out_dir, resolved):
    """Create out_dir with config.json in it, and clear temporary files of a run killed mid-save."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(resolved, f, indent=1)
        for name in os.listdir(out_dir):
            if name.startswith(".tmp-"):
                os.remove(os.path.join(out_dir, name))
    except OSError as e:
        raise OSError(f"--out_dir {out_dir} is not writable ({e.strerror or e})") from None


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


# -----------------------------------------------------------------------------
# the run


def train(config, model_config, log=print, live=None):
    """Run the training loop; return a summary dict (iter_num, best_val_loss, ...).

    log prints a line; live is a terminal stream to redraw a progress line on, or None for
    plain log lines every log_interval steps."""
    t_start = time.time()  # a time budget counts from here: loading the data and building the model are part of the run
    config.validate()
    ddp, device = init_distributed(resolve_device(config.device))
    lock = None
    try:
        lock = claim_out_dir(config, ddp)  # before anything else touches out_dir
        if not ddp.master:
            log, live = (lambda msg: None), None
        summary = _train(config, model_config, log, live, ddp, device, t_start)
        if ddp.world_size > 1:
            # Leave together. The last collective (the final checkpoint's all_gather) holds
            # Python tensors that a gloo worker thread releases a moment after wait() returns;
            # a process already shutting down its interpreter then dies with SIGABRT. The
            # barrier keeps every process here until rank 0 has written its checkpoint.
            dist.barrier()
        return summary
    finally:
        if lock is not None:
            lock.release()
        if ddp.world_size > 1:
            dist.destroy_process_group()


def _train(config, model_config, log, live, ddp, device, t_start):
    device_type = device.split(":")[0]
    if device_type == "cpu":
        allocator.keep_freed_memory()  # a step reuses the memory the last one freed (allocator.py)
    if config.dtype == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype=bfloat16 but this GPU has no bfloat16 (use --dtype=float32)")

    train_data, val_data, tokenizer = load_dataset(config)
    model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    best_path = os.path.join(config.out_dir, "best.pt")
    checkpoint = None
    if config.init_from == "resume":
        checkpoint = load_checkpoint(ckpt_path, device)
        if "optimizer" not in checkpoint:
            raise ValueError(f"{ckpt_path} holds no optimizer state, so it cannot be resumed")
        saved = checkpoint.get("train_config", {}).get("optimizer", "adamw")
        if saved != config.optimizer:
            raise ValueError(f"--optimizer={config.optimizer} differs from the {saved!r} that {ckpt_path} was trained with")
        model_config = resume_model_config(checkpoint, ckpt_path, model_config, tokenizer)
        check_resume_steps(checkpoint, ckpt_path, config)
    model_config.validate()
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) <= model_config.block_size:
            raise ValueError(f"--block_size={model_config.block_size} is longer than the {split} split ({len(data)} tokens)")
    # before auto has picked the dtype, the memory is checked for float32, the larger estimate
    check_memory(config, model_config, device, "float32" if config.dtype == "auto" else config.dtype, ddp)

    torch.manual_seed(config.seed)  # the same initial weights in every process
    model = build_model(model_config).to(device)
    # auto: bfloat16 autocast where it is faster for this model here (timed on a CPU, precision.py)
    dtype = resolve_dtype(config.dtype, device_type, model, (config.batch_size, model_config.block_size), log)
    if ddp.world_size > 1:  # every process must compute alike: rank 0's timing decides
        dtype = ("float32", "bfloat16")[int(ddp.from_master([float(dtype == "bfloat16")], device)[0])]
    ctx = autocast_context(device_type, dtype)
    optimizer = make_optimizer(model, config, device_type)
    # each process draws its own batches and dropout masks; rank 0 is a single-process run
    torch.manual_seed(config.seed + ddp.rank)
    random.seed(config.seed + ddp.rank)
    np.random.seed(config.seed + ddp.rank)
    batches = BatchSampler(train_data, model_config.block_size, config.batch_size, config.seed + ddp.rank, config.data_order)
    eval_samplers = {
        "train": BatchSampler(train_data, model_config.block_size, config.batch_size, seed=1),
        "val": BatchSampler(val_data, model_config.block_size, config.batch_size, seed=2),
    }
    iter_num, best_val_loss = 0, float("inf")
    progress, elapsed_before = RunProgress(config), None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        states = checkpoint.get("rng_ranks", [checkpoint["rng"]])
        if len(states) == ddp.world_size:
            set_rng_state(states[ddp.rank], batches)
        else:  # a different number of processes: fresh streams, so not bit-for-bit the same run
            batches.generator.manual_seed(config.seed + ddp.rank + 1000 * iter_num)
            torch.manual_seed(config.seed + ddp.rank + 1000 * iter_num)
            log(f"note: {ckpt_path} was written by {len(states)} process(es), this run has {ddp.world_size}: new random streams")
        log(f"resuming from {ckpt_path} at step {iter_num} (best val loss {best_val_loss:.4f})")
        # the time the run has spent so far, and what its steps and evals took (a budget goes on from there)
        elapsed_before = checkpoint.get("elapsed")
        progress.load_state_dict(checkpoint.get("timings", {}))
        note = budget_change_note(checkpoint, ckpt_path, config)
        if note:
            log(note)
        del checkpoint

    global_batch = config.batch_size * config.gradient_accumulation_steps * ddp.world_size
    tokens_per_iter = global_batch * model_config.block_size
    log(f"config: {json.dumps({**dataclasses.asdict(model_config), **dataclasses.asdict(config)})}")
    log(
        f"device {device}, dtype {dtype}, {model.num_params() / 1e6:.2f}M parameters; global batch "
        f"{config.batch_size} x {config.gradient_accumulation_steps} accumulation x {ddp.world_size} processes "
        f"= {global_batch} sequences, {tokens_per_iter:,} tokens per step"
    )
    # the first write into out_dir, after every check that could refuse the run
    resolved = {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config), "device": device,
                "dtype": dtype, "world_size": ddp.world_size}
    if ddp.master:
        if config.overwrite:
            rundir.clear_previous_run(config.out_dir)
        write_run_config(config.out_dir, resolved)
    if config.time_budget:
        log(f"time budget {config.time_budget:g} min: the run stops when it is spent, evals and checkpoints included, "
            f"and the lr schedule follows the time; max_iters={config.max_iters} is not used")

    def save(path, with_optimizer=True):
        """Write a checkpoint from rank 0; with several processes every one must call this,
        since each hands over its random state."""
        rng = rng_state(batches) if with_optimizer else None
        rng_ranks = [None] * ddp.world_size
        if with_optimizer and ddp.world_size > 1:
            dist.all_gather_object(rng_ranks, rng)
        if not ddp.master:
            return
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
            state["elapsed"], state["timings"] = report.elapsed(), progress.state_dict()
            state["rng"] = rng
            if ddp.world_size > 1:
                state["rng_ranks"] = rng_ranks
        save_checkpoint(state, path)

    # model is the plain module that is saved; eval_model may be compiled; step_model may
    # also be wrapped in DDP, which averages the gradients of all processes in backward
    eval_model = model
    if config.compile:
        t0 = time.time()
        eval_model = torch.compile(model)
        log("compiling the model (the first steps are slow)...")
    step_model = eval_model
    if ddp.world_size > 1:
        step_model = DDP(eval_model, device_ids=[ddp.local_rank] if device_type == "cuda" else None)
    flops_per_iter = model.flops_per_token() * tokens_per_iter

    model.train()
    start_iter = iter_num
    t_last, iters_since_log = time.time(), 0
    report = Reporter(config.out_dir, log, live, start_iter, config.max_iters, tokens_per_iter,
                      resume=config.init_from == "resume", write_files=ddp.master, time_budget=progress.budget,
                      t_start=t_start, elapsed_before=elapsed_before)
    log = report.log  # so that no message lands on top of the live line

    def where(eval_due):
        """(progress, last step?) as RunProgress.at; with a time budget rank 0's clock decides for every process."""
        p, last = progress.at(iter_num, report.elapsed(), eval_due)
        if progress.budget and ddp.world_size > 1:
            p, last = ddp.from_master([p, float(last)], device)
        return p, bool(last)

    with StopRequested() as stop, report:  # report: the live line is ended however the loop ends
        while True:
            resumed_here = iter_num == start_iter and iter_num > 0  # its eval was the last run's
            eval_due = iter_num % config.eval_interval == 0 and not resumed_here
            p, last_step = where(eval_due)
            lr = get_lr(iter_num, config, p)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

            if (eval_due or last_step) and not resumed_here:
                t_eval = time.time()
                losses = estimate_loss(eval_model, eval_samplers, config.eval_iters, ctx, device, ddp)
                log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if not all(math.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"the loss is not finite at step {iter_num}; {ckpt_path} holds the last good state (try a lower --learning_rate)")
                if losses["val"] < best_val_loss:
                    best_val_loss = losses["val"]
                    save(best_path, with_optimizer=False)
                save(ckpt_path)
                if ddp.master:
                    # a sample to watch the model improve; its own seeded generator leaves the
                    # training RNG streams untouched, so a resumed run stays exact. It is timed,
                    # so that a time budget keeps enough for samples.txt (a short unseen sample
                    # when evals show none)
                    chars = config.eval_sample_chars or (SAMPLE_PROBE_CHARS if progress.needs_sample_rate() else 0)
                    t_sample = time.time()
                    sample = sample_text(model, tokenizer, chars, device, config.seed) if chars else None
                    progress.measure_sample(time.time() - t_sample, chars)
                    report.eval(iter_num, losses, best_val_loss, sample if config.eval_sample_chars else None)
                progress.measure_eval(time.time() - t_eval)
                t_last, iters_since_log = time.time(), 0  # eval time is not step time
                # an eval slower than expected may leave no time for another step: then this one was the last
                last_step = last_step or where(eval_due=False)[1]
            if last_step:
                break
            if stop.requested(ddp, device):
                save(ckpt_path)
                log(f"{stop.signal or 'stop'}: saved {ckpt_path} at step {iter_num}; continue with --init_from=resume")
                return {"iter_num": iter_num, "best_val_loss": best_val_loss, "stopped": stop.signal or "SIGTERM"}

            t_step = time.time()
            loss = train_step(step_model, optimizer, batches, config, ctx, device, ddp)
            iter_num += 1
            iters_since_log += 1

            if report.live_due():  # a terminal on rank 0 only: this process's own loss
                report.show_live(iter_num, loss.item() * config.gradient_accumulation_steps, lr)
            if iter_num % config.log_interval == 0:
                # a sync point, so only here; with DDP the mean over processes, which all take part
                lossf = ddp.sum(loss.detach() * config.gradient_accumulation_steps).item() / ddp.world_size
                if not math.isfinite(lossf):
                    raise FloatingPointError(f"the loss is not finite at step {iter_num}; {ckpt_path} holds the last good state (try a lower --learning_rate)")
                if config.compile and iter_num - start_iter == config.log_interval:
                    log(f"compiled, first {config.log_interval} steps took {time.time() - t0:.1f}s")
                dt = (time.time() - t_last) / iters_since_log
                report.train_step(iter_num, lossf, lr, dt, flops_per_iter)
                t_last, iters_since_log = time.time(), 0
            progress.measure_step(time.time() - t_step)  # the logging's device sync included

    if config.sample_chars > 0 and ddp.master:
        text = sample_text(model, tokenizer, config.sample_chars, device, config.seed)
        with open(os.path.join(config.out_dir, "samples.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        log(f"sample (also in {config.out_dir}/samples.txt):\n{text}")
    report.done(iter_num, best_val_loss)  # the last line: the steps taken (or bought) and the time
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "elapsed": report.elapsed()}


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
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    # a run stopped by a signal exits as the shell expects: 128 + the signal's number
    return 128 + signal.Signals[summary["stopped"]].value if "stopped" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
