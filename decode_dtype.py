"""The dtype of the KV-cache decoder's weights (sample.py --decode_dtype): measured, not guessed.

A decode step reads every weight of the model once to do little arithmetic with it, so the
narrower the weights the fewer bytes it reads; but whether that wins depends on the machine
(its caches, whether it has AVX-512 FP16 or BF16, how good PyTorch's int8 kernels are on it),
on the model's size and on the batch. On the AMD EPYC where this project started float16
was the fastest for one sample of the lecture's model; on an Intel Xeon with AVX512-FP16 it
was slower than float32 and int8 (README, Results). So 'auto' times a few decode steps of
each candidate, on this machine, for this model and batch size, and takes the one that
generates the requested number of characters fastest: its decode steps, plus building its
decoder once per generation (int8's quantized copy of the lecture's model took 0.15 s on
that Xeon, as long as about 100 of its steps):

    CPU    float32, float16, bfloat16, int8 (int8 where PyTorch has its quantized kernels)
    CUDA   float32, float16, bfloat16 (where the GPU has it)
    other  float32, not timed

The timing is fair to every candidate: each decoder is built (timed) and warmed up with one
step first, then ROUNDS rounds time STEPS decode steps of each candidate in turn
(interleaved, so that a change in the machine's load hits all of them alike), from the same
cache position, with time.perf_counter; a candidate's step time is its best round (other
programs only ever make a round slower). A fraction of a second in all: 0.3-0.4 s for one
sample of the lecture's model on that Xeon, 0.1 s for the 30-minute model.

The times are cached in ~/.cache/chargpt/decode_dtype.json ($XDG_CACHE_HOME/chargpt if set),
one entry per machine (CPU model and a hash of its flags, or the GPU's name; the PyTorch
version; the number of threads), model shape and batch size, and the pick for any number of
characters follows from them without timing again. The cache also keeps the text of a seed
the same from one run to the next on a machine (another decode dtype rounds the logits
differently, and the draws can part), so a timing on a busy machine is kept too: delete the
file to measure again. The file is written to a temporary name and renamed; one that cannot
be read or written is ignored: sampling never fails because of it (timing_cache.py).
"""

import json
import time

import torch

from model import GPT, Decoder, KVCache
from timing_cache import machine, read_cache, write_cache

DECODE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
STEPS = 4  # decode steps per round and candidate
ROUNDS = 3


def resolve_decode_dtype(name, model, batch_size=1, new_tokens=500):
    """The torch dtype of Decoder's weights: name itself, or for 'auto' the fastest candidate
    for generating new_tokens characters with this model and batch size here."""
    if name != "auto":
        return DECODE_DTYPES[name]
    return DECODE_DTYPES[pick_decode_dtype(model, batch_size, new_tokens)[0]]


def candidates(device):
    """The dtype names auto chooses among on this device."""
    if device.type == "cpu":
        return ["float32", "float16", "bfloat16", "int8"]
    if device.type == "cuda":
        return ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
    return ["float32"]


CACHE = "decode_dtype"


def cache_key(model, batch_size, device):
    # the model's shape: every config field but dropout, which decoding does not use
    shape = {k: v for k, v in sorted(vars(model.config).items()) if "dropout" not in k}
    return f"{machine()} | {device.type} | {json.dumps(shape)} | batch {batch_size}"


def pick_decode_dtype(model, batch_size=1, new_tokens=500, use_cache=True):
    """(name, costs, where): the dtype that generates new_tokens characters per sequence the
    fastest, building its decoder included. costs is {name: (seconds to build the decoder,
    seconds per decode step)}; where says whether they were 'timed' now or came from the
    'cache' ('none' when there is nothing to choose: one candidate, no decoder, no tokens)."""
    device = next(model.parameters()).device
    names = candidates(device)
    if not isinstance(model, GPT) or len(names) == 1 or new_tokens == 0:
        return "float32", {}, "none"
    key = cache_key(model, batch_size, device)
    costs, where = (read_cache(CACHE).get(key) if use_cache else None), "cache"
    if not valid_costs(costs, names):
        timings, where = time_decoders(model, names, batch_size), "timed"
        costs = {name: (build, min(steps)) for name, (build, steps) in timings.items()}
        if use_cache:
            write_cache(CACHE, key, costs)
    best = min(costs, key=lambda name: costs[name][0] + new_tokens * costs[name][1])
    return best, costs, where


def valid_costs(costs, names):
    """Whether a cache entry is {name: (build seconds, step seconds)} for some of names."""
    try:
        return bool(costs) and all(name in names and len(c) == 2 and min(c) >= 0 for name, c in costs.items())
    except TypeError:
        return False


@torch.no_grad()
def time_decoders(model, names, batch_size):
    """{name: (seconds to build its Decoder, [seconds per decode step in each round])} for the
    dtypes among names that this machine can run."""
    device = next(model.parameters()).device
    config = model.config
    steps = min(STEPS, config.block_size - 1)
    # from the middle of the window, where generation spends its time on average
    start = max(1, min(config.block_size // 2, config.block_size - steps))
    cache = KVCache(config, batch_size, device, model.lm_head.weight.dtype)
    model.prefill(torch.zeros(batch_size, start, dtype=torch.long, device=device), cache)
    idx = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    def run(decoder, n):
        cache.pos = start
        for _ in range(n):
            decoder(idx, cache)
        if device.type == "cuda":
            torch.cuda.synchronize()

    decoders, build = {}, {}
    for name in names:
        try:
            t0 = time.perf_counter()
            decoder = Decoder(model, DECODE_DTYPES[name])
            build[name] = time.perf_counter() - t0
            run(decoder, 1)  # warm-up: the first calls allocate and pick their kernels
        except (ValueError, RuntimeError):  # int8 without PyTorch's quantized kernels, say
            continue
        decoders[name] = decoder
    rounds = {name: [] for name in decoders}
    for _ in range(ROUNDS):
        for name, decoder in decoders.items():
            t0 = time.perf_counter()
            run(decoder, steps)
            rounds[name].append((time.perf_counter() - t0) / steps)
    return {name: (build[name], rounds[name]) for name in decoders}
