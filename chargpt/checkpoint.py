"""The checkpoint format: what a run saves, how it is written and read back, and resuming.

A checkpoint is a dict of tensors and plain data, loadable with torch.load(weights_only=True):
    model           state_dict of the unwrapped, uncompiled model
    optimizer       the optimizer's state_dict (absent in best.pt, which is for sampling)
    iter_num        optimizer steps taken
    best_val_loss   the lowest val loss seen at an eval so far
    model_config    GPTConfig as a dict: enough to rebuild the model alone
    train_config    TrainConfig as a dict
    vocab           the characters, in token-id order, as one string
    rng             random states (torch, numpy, Python, the batch sampler) for an exact resume;
                    rng_ranks: one per process of a torchrun run
    finished        whether the run ended with this checkpoint (its budget spent or max_iters reached)
    elapsed         seconds the run had spent when it was written (a time budget goes on from it)
    timings         the measured seconds of a step, an eval and a generated character, with
                    which a resumed run with a time budget plans its end before its first eval
    scaler          float16 runs only: the loss scaler's state (chargpt/optim.py's LossScaler),
                    so that a resumed run scales and skips as the uninterrupted one would
    version         format version

out_dir/ckpt.pt is the latest state (written at every eval); out_dir/best.pt the one with
the best val loss. Both are written whole or not at all (chargpt/atomic.py), so a crash at
any moment leaves the previous file whole. Checkpoints written before the package existed
load unchanged (tests/data/ keeps one).
"""

import dataclasses
import os
import pickle
import random

import numpy as np
import torch

from chargpt.atomic import write_atomic
from chargpt.rundir import missing_run_hint
from chargpt.tokenizer import CharTokenizer
from model import GPTConfig, build_model

VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "vocab", "iter_num")
# torch.load(weights_only=True) could still run code from a crafted file before 2.6
# (CVE-2025-32434) and, through its unpickler, before 2.10 (CVE-2026-24747)
SAFE_TORCH = (2, 10)


def save_checkpoint(checkpoint, path):
    """Write checkpoint to path atomically: the old file stays until the new one is whole."""
    write_atomic(path, lambda f: torch.save({**checkpoint, "version": VERSION}, f))


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at path; a missing, truncated, unsafe or foreign file is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if torch_version() < SAFE_TORCH:
        raise ValueError(
            f"PyTorch {torch.__version__} can be made to run code by a crafted checkpoint (CVE-2026-24747), "
            f"so {path} is not loaded: install torch 2.10 or newer (pip install -r requirements.txt)"
        )
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: say so, and nothing about turning it off
        raise ValueError(
            f"{path} holds objects other than tensors and plain data, which this tool does not load "
            f"(loading them could run code): use a checkpoint written by train.py ({_first_line(e)[:80]})"
        ) from None
    except Exception as e:  # torch raises many types for a damaged file
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a checkpoint of this project (missing keys)")
    return checkpoint


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())


def find_checkpoint(out_dir):
    """out_dir/best.pt if present, else out_dir/ckpt.pt; a clear error if neither exists."""
    if not os.path.isdir(out_dir):
        hint = missing_run_hint(out_dir) or " (train a model first: python train.py config/shakespeare_char_cpu.py)"
        raise FileNotFoundError(f"--out_dir {out_dir} does not exist{hint}")
    for name in ("best.pt", "ckpt.pt"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no checkpoint in {out_dir} (expected best.pt or ckpt.pt){missing_run_hint(out_dir)}")


def describe(path, checkpoint, model):
    """'out/best.pt: gpt, 112,193 parameters, step 1500, best val loss 1.7410': what was loaded."""
    best = checkpoint.get("best_val_loss")
    loss = f", best val loss {best:.4f}" if isinstance(best, float) and best != float("inf") else ""
    kind = checkpoint["model_config"].get("model_type", "gpt")
    return f"{path}: {kind}, {model.num_params():,} parameters, step {checkpoint['iter_num']}{loss}"


def model_from_checkpoint(checkpoint, device="cpu", path="the checkpoint"):
    """(model, tokenizer) rebuilt from the stored model config and vocabulary alone, in eval mode."""
    try:
        config = GPTConfig(**checkpoint["model_config"])
        model = build_model(config)
        model.load_state_dict(checkpoint["model"])
        tokenizer = CharTokenizer(checkpoint["vocab"])
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"{path}: its weights, model_config and vocab do not fit together: {_first_line(e)}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{path}: its vocab has {tokenizer.vocab_size} characters, its model {config.vocab_size}")
    model.to(device)
    model.eval()
    return model, tokenizer


# -----------------------------------------------------------------------------
# what train.py saves


def run_state(model, model_config, config, tokenizer, iter_num, best_val_loss, optimizer=None, **resume):
    """The checkpoint dict of a training run. With the optimizer it is a full state to
    resume from (resume: rng, rng_ranks, elapsed, timings, scaler); without, weights for sampling."""
    state = {
        "model": model.state_dict(),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(config),
        "vocab": tokenizer.chars,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state.update({key: value for key, value in resume.items() if value is not None})
    return state


def rng_state(batch_sampler):
    """Every random stream a training process draws from, for an exact resume."""
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


# -----------------------------------------------------------------------------
# resuming: what a checkpoint allows


def stored_settings(path):
    """(train_config, model_config) dicts a checkpoint was trained with, read without
    loading its tensors; None when there is no readable checkpoint at path (resuming from it
    then fails with the error that names it) or it predates stored training settings."""
    if not os.path.isfile(path) or torch_version() < SAFE_TORCH:
        return None
    try:
        # mmap: only the small entries are read, however big the model
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(checkpoint, dict) or "train_config" not in checkpoint or "model_config" not in checkpoint:
        return None
    return checkpoint["train_config"], checkpoint["model_config"]


def check_resumable(checkpoint, path, config):
    """Refuse, naming the flag, a resume that cannot go on from this checkpoint."""
    if "optimizer" not in checkpoint:
        raise ValueError(f"{path} holds no optimizer state, so it cannot be resumed")
    saved = checkpoint.get("train_config", {}).get("optimizer", "adamw")
    if saved != config.optimizer:
        raise ValueError(f"--optimizer={config.optimizer} differs from the {saved!r} that {path} was trained with")
    # the loop stops when the step reaches max_iters: one already past it would never stop,
    # and would go on rewriting the trained model; one at it has nothing left to do
    done = checkpoint["iter_num"]
    if config.max_iters <= done:
        where = "already past it, at step" if config.max_iters < done else "there already: the run finished at step"
        raise ValueError(
            f"--max_iters={config.max_iters}: {path} is {where} {done}; pass a --max_iters above {done} "
            "to train on (max_iters counts the whole run)"
        )


def check_budget_left(checkpoint, progress, path, config):
    """Refuse to resume a run whose time budget is spent: it would train nothing. A run marks
    the checkpoint it ends with (finished); one from before the mark is judged by its times."""
    saved = checkpoint.get("train_config", {}).get("time_budget", 0.0)
    elapsed = checkpoint.get("elapsed") or 0.0
    if "finished" in checkpoint:
        spent = checkpoint["finished"] and 0 < config.time_budget <= saved and checkpoint["iter_num"] < config.max_iters
    else:
        spent = progress.budget and progress.out_of_time(elapsed)
    if spent:
        raise ValueError(
            f"--time_budget={config.time_budget:g}: {path} has spent it ({elapsed:.1f}s of the run so far); "
            "pass a larger --time_budget to train on (it counts the whole run), or --time_budget=0 to go on to --max_iters"
        )


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


def budget_change_note(checkpoint, path, config):
    """A note when a resumed run's time_budget differs from its checkpoint's, else None. The
    new setting wins, as a new max_iters does: it counts the whole run, the time spent
    before included, and the lr schedule follows it from here (so the learning rate jumps)."""
    saved = checkpoint.get("train_config", {}).get("time_budget", 0.0)
    if saved == config.time_budget:
        return None
    was = f"a time budget of {saved:g} min" if saved else "max_iters (no time budget)"
    now = f"--time_budget={config.time_budget:g}" if config.time_budget else f"max_iters={config.max_iters}"
    return (
        f"note: {path} was trained with {was}; the run goes on with {now} for the whole run, "
        "and the learning rate jumps to that schedule"
    )
