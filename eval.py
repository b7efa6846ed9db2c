"""The loss of a trained checkpoint over a whole split: every character, once.

    python eval.py --out_dir out                    # the val split of the dataset it was trained on
    python eval.py --out_dir out --split=train
    python eval.py --out_dir out --decode_dtype=int8   # through sample.py's KV-cache decoder
    python eval.py --out_dir out-smoke --dataset=shakespeare_char --data_dir=data --device=cpu
    python eval.py --help

train.py's estimate_loss is a quick estimate from eval_iters random batches (the printout
says so beside training's figure, and why the two differ); this is the full figure: every next character of the split scored once, in windows of block_size that
do not overlap (chargpt/evaluate.py says what that costs). Eval mode, float32, a fixed
order: the same checkpoint gives the same number every time.

--decode_dtype=float32|float16|bfloat16|int8 scores the same windows through sampling's
path instead: a KV cache filled one position at a time, the decode weights in that dtype.
It measures what a narrower decode costs in quality (float32 gives the full forward's
number).

Prints the mean cross-entropy in nats per character and in bits per character (loss / ln 2).
Loads out_dir/best.pt if present, else out_dir/ckpt.pt, like sample.py.
"""

import math
import os
import sys
from dataclasses import dataclass

from chargpt.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chargpt.config import HelpRequested, check_choice, knob, parse
from chargpt.data import load_dataset
from chargpt.engine import DECODE_DTYPES
from chargpt.evaluate import evaluate
from chargpt.machine import resolve_device


@dataclass
class EvalConfig:
    out_dir: str = knob("out", "folder with best.pt or ckpt.pt")
    split: str = knob("val", "'val' or 'train': which token file to score")
    dataset: str = knob("", "read data_dir/DATASET/{train.bin,val.bin,meta.json} ('': the dataset the checkpoint was trained on)")
    data_dir: str = knob("", "folder holding the prepared datasets ('': the checkpoint's, else 'data')")
    batch_size: int = knob(64, "windows per forward pass (changes the speed, not the result)")
    device: str = knob("auto", "'auto' (cuda, else mps, else cpu), or cpu, cuda, mps")
    decode_dtype: str = knob(
        "",
        "'' scores with the full forward; float32, float16, bfloat16 or int8 score through the KV-cache decoder with its weights in that dtype",
    )

    def validate(self):
        check_choice("split", self.split, ("train", "val"))
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        check_choice("decode_dtype", self.decode_dtype, ("", *DECODE_DTYPES))


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
        model, _ = model_from_checkpoint(checkpoint, device, path)
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
    print(
        f"{path} (step {checkpoint['iter_num']}) on {split_path}: {n_tokens:,} predictions in {n_windows:,} windows of up to {block_size}"
    )
    how = f" through the KV-cache decoder in {config.decode_dtype}" if config.decode_dtype else ""
    print(f"{config.split} loss{how} {loss:.4f}, {loss / math.log(2):.4f} bits per character")
    note = beside_training(checkpoint, config.split, n_tokens)
    if note:
        print(note)
    return 0


def beside_training(checkpoint, split, n_tokens):
    """Why training's val loss for this checkpoint is another number: an estimate from a
    sample of random windows, where this scores every character once. None for the train
    split, or when the checkpoint has no eval."""
    best, trained = checkpoint.get("best_val_loss"), checkpoint.get("train_config", {})
    if split != "val" or not isinstance(best, float) or best == float("inf") or "eval_iters" not in trained:
        return None
    block = checkpoint["model_config"]["block_size"]
    sampled = trained["eval_iters"] * trained["batch_size"] * block
    return (
        f"training's best val loss, {best:.4f}, is an estimate: the mean over eval_iters={trained['eval_iters']} "
        f"batches of {trained['batch_size']} random windows ({sampled:,} predictions, some twice, some never); "
        f"this figure scores all {n_tokens:,} once, so the two differ (by more, the fewer the batches)"
    )


if __name__ == "__main__":
    sys.exit(main())
