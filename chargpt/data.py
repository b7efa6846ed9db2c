"""The prepared dataset, read back: the token files prepare.py writes, and batches from them.

    train, val, tokenizer = load_dataset(config)     # config.data_dir/config.dataset/...
    batches = BatchSampler(train, block_size, batch_size, seed)
    x, y = batches.next(device)                      # (B, T) inputs and the targets, shifted by one

A dataset is a folder with train.bin and val.bin (the token ids as uint16, the first 90%
of the text and the rest) and meta.json (the vocabulary, the sorted distinct characters,
as a JSON string). A missing, damaged or mismatched file is an error that names it and
says how to prepare it again.
"""

import json
import os

import numpy as np
import torch

from chargpt.tokenizer import CharTokenizer


def prepare_hint(config, folder):
    """The prepare.py command that makes the dataset config names."""
    if config.dataset == "shakespeare_char":
        return f"python prepare.py --out_dir {folder}"
    return f"python prepare.py --input YOUR_TEXT.txt --out_dir {folder}"


def load_dataset(config):
    """(train, val, tokenizer): the token arrays (memory-mapped uint16) and vocabulary of
    config.data_dir/config.dataset."""
    folder = os.path.join(config.data_dir, config.dataset)
    paths = {name: os.path.join(folder, name) for name in ("train.bin", "val.bin", "meta.json")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--dataset={config.dataset}: {path} not found (run: {prepare_hint(config, folder)})")
    again = f"prepare it again: {prepare_hint(config, folder)}"
    tokenizer = read_vocabulary(paths["meta.json"], again)
    splits = []
    for name in ("train.bin", "val.bin"):
        path = paths[name]
        if os.path.getsize(path) % 2 or os.path.getsize(path) == 0:
            raise ValueError(f"{path} is not a file of uint16 tokens (empty, or an odd number of bytes); {again}")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        top = int(data.max())
        if top >= tokenizer.vocab_size:
            raise ValueError(
                f"{path} holds token id {top}, but the vocabulary of {paths['meta.json']} has "
                f"{tokenizer.vocab_size} characters; {again}"
            )
        splits.append(data)
    return splits[0], splits[1], tokenizer


def read_vocabulary(path, again):
    """The CharTokenizer of a meta.json; a file that is not one is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # truncated, or not JSON at all
        raise ValueError(f"{path} is not valid JSON ({str(e)[:80]}); {again}") from None
    chars = meta.get("chars") if isinstance(meta, dict) else None
    if not isinstance(chars, str) or not chars:
        raise ValueError(f'{path} holds no vocabulary (a non-empty string "chars"); {again}')
    try:
        return CharTokenizer(chars)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; {again}") from None


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
