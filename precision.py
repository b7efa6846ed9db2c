"""The training dtype (train.py --dtype=auto): bfloat16 autocast where it is faster here, measured.

    CUDA   bfloat16 where the GPU has it, else float32
    CPU    float32 where the CPU has no bfloat16 units (AVX512-BF16 or AMX): there PyTorch
           emulates bf16 matrix products, about 100x slower than float32 (measured on an
           AVX2 EPYC). Where it has them, whether autocast pays depends on the machine and
           the model: autocast casts the weights at every matrix product, and AVX512-BF16
           without AMX multiplies bf16 no faster than float32 (a 2-core Xeon here: 588
           against 340 ms per step of the 30-minute recipe). So auto times a few training
           steps of this model in both and takes the faster.
    other  float32

The timing runs forward and backward on a copy of the model, in a forked random state, so
the run itself is untouched: the run's batch shape, cut to at most MAX_ROWS tokens (enough
for the matrix products to run at full speed), one warm-up step per dtype, then ROUNDS
rounds of one step each, interleaved, best round kept (as decode_dtype.py does for
decoding). The result is cached per machine and model shape (timing_cache.py), so only the
first run of a recipe on a machine pays for it: a few seconds for the 30-minute recipe.
"""

import contextlib
import copy
import json
import time

import torch

from timing_cache import machine, read_cache, write_cache

ROUNDS = 3
MAX_ROWS = 4096  # tokens per timed step
CACHE = "train_dtype"


def cpu_has_bf16_units():
    """True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def autocast_context(device_type, dtype):
    """Mixed precision: matmuls in bf16, weights, softmax and loss in float32."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_dtype(name, device_type, model=None, batch_shape=None, log=None):
    """'float32' or 'bfloat16' for --dtype=name. For 'auto' on a CPU with bf16 units the two
    are timed on model (B, T) = batch_shape, unless the cache knows the answer; without a
    model to time, such a CPU gets float32 (the safe choice: never slower by much)."""
    if name != "auto":
        return name
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device_type != "cpu" or not cpu_has_bf16_units() or model is None:
        return "float32"
    key = f"{machine()} | {json.dumps(dict(sorted(vars(model.config).items())))} | batch {tuple(batch_shape)}"
    times = read_cache(CACHE).get(key)
    if not (isinstance(times, dict) and set(times) == {"float32", "bfloat16"}):
        times = time_dtypes(model, batch_shape)
        write_cache(CACHE, key, times)
        if log:
            log(f"dtype auto: a training step here takes {times['float32'] * 1000:.0f} ms in float32, "
                f"{times['bfloat16'] * 1000:.0f} ms with bfloat16 autocast (timed once, cached)")
    return min(times, key=times.get)


def time_dtypes(model, batch_shape):
    """{dtype: seconds per forward + backward} of a copy of model on random tokens of batch_shape."""
    T = batch_shape[1]
    B = max(1, min(batch_shape[0], MAX_ROWS // T))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trial = copy.deepcopy(model).train()
        idx = torch.randint(trial.config.vocab_size, (B, T + 1))
        x, y = idx[:, :-1], idx[:, 1:]

        def step(dtype):
            t0 = time.perf_counter()
            with autocast_context("cpu", dtype):
                _, loss = trial(x, y)
            loss.backward()
            trial.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        dtypes = ("float32", "bfloat16")
        for dtype in dtypes:  # warm-up: the first calls allocate and pick their kernels
            step(dtype)
        rounds = {dtype: [] for dtype in dtypes}
        for _ in range(ROUNDS):
            for dtype in dtypes:
                rounds[dtype].append(step(dtype))
    return {dtype: min(seconds) for dtype, seconds in rounds.items()}
