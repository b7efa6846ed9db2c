"""The loss of a trained checkpoint over a whole split: every character, once.

    python eval.py --out_dir out                    # the val split of the dataset it was trained on
    python eval.py --out_dir out --split=train
    python eval.py --out_dir out --decode_dtype=int8   # through sample.py's KV-cache decoder
    python eval.py --out_dir out-smoke --dataset=shakespeare_char --data_dir=data --device=cpu
    python eval.py --help

train.py's estimate_loss is a quick estimate from eval_iters random batches; this is the
full figure. The split is cut into non-overlapping windows of block_size tokens, the last
one shorter if the split does not divide evenly, and each window predicts every one of its
positions: all len(split) - 1 next characters are scored exactly once. The price of not
overlapping: the first position of each window sees one character of context, the second
two, and so on, so the figure is a little worse than a model with a sliding full-length
context would get. Eval mode (no dropout), float32, a fixed order: the same checkpoint
gives the same number every time.

--decode_dtype=float32|float16|bfloat16|int8 scores the same windows through sampling's
path instead: the first character prefilled into a KV cache, then model.Decoder one
position at a time with its weights in that dtype. It measures what a narrower decode
costs in quality (float32 gives the full forward's number).

Prints the mean cross-entropy in nats per character and in bits per character (loss / ln 2).
Loads out_dir/best.pt if present, else out_dir/ckpt.pt, like sample.py.
"""

import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from configurator import HelpRequested, knob, parse
from decode_dtype import DECODE_DTYPES
from model import GPT, Decoder, KVCache
from train import load_dataset, resolve_device


@dataclass
class EvalConfig:
    out_dir: str = knob("out", "folder with best.pt or ckpt.pt")
    split: str = knob("val", "'val' or 'train': which token file to score")
    dataset: str = knob("", "read data_dir/DATASET/{train.bin,val.bin,meta.json} ('': the dataset the checkpoint was trained on)")
    data_dir: str = knob("", "folder holding the prepared datasets ('': the checkpoint's, else 'data')")
    batch_size: int = knob(64, "windows per forward pass (changes the speed, not the result)")
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, mps")
    decode_dtype: str = knob("", "'' scores with the full forward; float32, float16, bfloat16 or int8 score through the KV-cache decoder with its weights in that dtype")

    def validate(self):
        if self.split not in ("train", "val"):
            raise ValueError(f"--split must be 'train' or 'val', got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.decode_dtype not in ("", *DECODE_DTYPES):
            raise ValueError(f"--decode_dtype must be '', float32, float16, bfloat16 or int8, got {self.decode_dtype!r}")


@torch.no_grad()
def evaluate(model, data, block_size, batch_size, device="cpu", decode_dtype=None):
    """(mean loss in nats, tokens scored, windows) of model over the token array data.

    Window w holds inputs data[w*T : w*T + T] and targets shifted by one; the last window
    is shorter when len(data) - 1 is not a multiple of T. The loss is a sum over every
    target divided by their number, so windows of different lengths weigh by their size.
    With decode_dtype the logits come from the KV-cache decoder instead (see the docstring)."""
    model.eval()
    score = _summed_loss if decode_dtype is None else _decoded_loss(model, decode_dtype)
    n = len(data) - 1  # every token but the first is a target
    if n < 1:
        raise ValueError(f"the split has {len(data)} token(s): nothing to predict")
    data = torch.from_numpy(np.asarray(data, dtype=np.int64))
    n_full = n // block_size
    total = 0.0  # summed in float64, so the order of additions hardly matters
    for start in range(0, n_full, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_full))  # window numbers
        offsets = rows[:, None] * block_size + torch.arange(block_size + 1)  # (B, T+1)
        window = data[offsets].to(device)  # (B, T+1)
        total += score(model, window[:, :-1], window[:, 1:])
    rest = n - n_full * block_size
    if rest:
        window = data[n_full * block_size :].to(device)[None]  # (1, rest+1)
        total += score(model, window[:, :-1], window[:, 1:])
    return total / n, n, n_full + (1 if rest else 0)


def _summed_loss(model, x, y):
    logits, _ = model(x)  # (B, T, V)
    return _cross_entropy_sum(logits, y)


def _cross_entropy_sum(logits, y):
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), y.reshape(B * T), reduction="sum").double().item()


def _decoded_loss(model, decode_dtype):
    """A scorer that runs each window as generation does: prefill, then one position at a time."""
    if not isinstance(model, GPT):
        raise ValueError(f"--decode_dtype: a {model.config.model_type} model has no KV-cache decoder")
    decoder = Decoder(model, decode_dtype)

    def score(model, x, y):
        B, T = x.shape
        cache = KVCache(model.config, B, x.device, model.lm_head.weight.dtype)
        logits = [model.prefill(x[:, :1], cache)]  # (B, V) each
        logits += [decoder(x[:, t], cache) for t in range(1, T)]
        return _cross_entropy_sum(torch.stack(logits, dim=1), y)  # (B, T, V)

    return score


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        (config,), _ = parse(argv, [EvalConfig()], "eval.py [--key=value ...]", config_file=False)
        config.validate()
        device = resolve_device(config.device)
        path = find_checkpoint(config.out_dir)
        checkpoint = load_checkpoint(path, device)
        trained_on = checkpoint.get("train_config", {})
        config.dataset = config.dataset or trained_on.get("dataset", "shakespeare_char")
        config.data_dir = config.data_dir or trained_on.get("data_dir", "data")
        train_data, val_data, tokenizer = load_dataset(config)
        if checkpoint["vocab"] != tokenizer.chars:
            meta = os.path.join(config.data_dir, config.dataset, "meta.json")
            raise ValueError(
                f"--dataset={config.dataset}: the vocabulary of {meta} ({tokenizer.vocab_size} characters) "
                f"differs from that of {path} ({len(checkpoint['vocab'])}): evaluate on the dataset the model was trained on"
            )
        model, _ = model_from_checkpoint(checkpoint, device)
        data = val_data if config.split == "val" else train_data
        block_size = model.config.block_size
        decode_dtype = DECODE_DTYPES[config.decode_dtype] if config.decode_dtype else None
        loss, n_tokens, n_windows = evaluate(model, data, block_size, config.batch_size, device, decode_dtype)
    except HelpRequested as e:
        print(e)
        return 0
    except (ValueError, OSError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1
    split_path = os.path.join(config.data_dir, config.dataset, f"{config.split}.bin")
    print(f"{path} (step {checkpoint['iter_num']}) on {split_path}: {n_tokens:,} predictions in {n_windows:,} windows of up to {block_size}")
    how = f" through the KV-cache decoder in {config.decode_dtype}" if config.decode_dtype else ""
    print(f"{config.split} loss{how} {loss:.4f}, {loss / math.log(2):.4f} bits per character")
    return 0


if __name__ == "__main__":
    sys.exit(main())
