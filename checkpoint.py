"""The checkpoint format, shared by train.py, sample.py and bench.py.

A checkpoint is a dict of tensors and plain data, loadable with torch.load(weights_only=True):
    model           state_dict of the unwrapped, uncompiled model
    optimizer       AdamW state_dict (absent in a weights-only export)
    iter_num        optimizer steps taken
    best_val_loss   the lowest val loss seen at an eval so far
    model_config    GPTConfig as a dict: enough to rebuild the model alone
    train_config    TrainConfig as a dict
    vocab           the characters, in token-id order, as one string
    rng             generator states (torch, batch sampler), for exact resume
    elapsed         seconds the run had spent when it was written (a time budget goes on from it)
    timings         the measured seconds of a step, an eval and a generated character, with
                    which a resumed run with a time budget plans its end before its first eval
    version         format version

out_dir/ckpt.pt is the latest state (written at every eval); out_dir/best.pt the one with
the best val loss. Both are written to a temporary file, fsync'ed and renamed over the old
one, so a crash at any moment leaves the previous file whole.
"""

import os
import tempfile

import torch

from model import GPTConfig, build_model
from tokenizer import CharTokenizer

VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "vocab", "iter_num")


def save_checkpoint(checkpoint, path):
    """Write checkpoint to path atomically: the old file stays until the new one is whole."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**checkpoint, "version": VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk, say: name the file, keep the old one
            raise OSError(f"could not write {path} ({e.strerror or e}); the previous file is untouched") from None
        raise
    # make the rename itself durable
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict at path; a missing, truncated or foreign file is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a checkpoint of this project (missing keys)")
    return checkpoint


def find_checkpoint(out_dir):
    """out_dir/best.pt if present, else out_dir/ckpt.pt; a clear error if neither exists."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out_dir {out_dir} does not exist (train a model first: python train.py ...)")
    for name in ("best.pt", "ckpt.pt"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no checkpoint in {out_dir} (expected best.pt or ckpt.pt)")


def model_from_checkpoint(checkpoint, device="cpu"):
    """(model, tokenizer) rebuilt from the stored model config and vocabulary alone."""
    try:
        model = build_model(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"the checkpoint's weights do not fit its model_config: {str(e).splitlines()[0]}") from None
    model.to(device)
    model.eval()
    return model, CharTokenizer(checkpoint["vocab"])
