"""The generation engine: a KV cache, the flat decode step, sampling, and the decode dtype.

model.py's generate is the lecture's: every new character runs the whole context again.
Here the prompt runs once (prefill) and leaves the keys and values of every layer in a
KVCache; then each new character costs one position (Decoder). sample.py, serve.py,
eval.py (--decode_dtype) and train.py's eval samples all generate through this file.

    Decoder        the network's forward written flat, for T new positions after cache.pos;
                   built from the model's own modules (an unknown module is an error, and a
                   test runs it against GPT.forward for every GPTConfig switch)
    generate       a generator of new tokens: prefill, decode, rebuild the cache when full
    sample_next    temperature, top-k, top-p, and the seeded draw
    pick_decode_dtype   --decode_dtype=auto: the decode weights' dtype that is fastest here

Positions are learned for 0..block_size-1 only, so when the cache is full it is rebuilt
from the last block_size // 2 tokens and decoding goes on. With kv_cache=False (or the
bigram model) every step runs the last block_size tokens, as the lecture does.

A decode step does little arithmetic, so on a CPU the nn.Module calls were a quarter of its
time: the Decoder calls the functions underneath them. Its matrices may be a copy in
another dtype (float16 halves the bytes a step reads, int8 quarters them, and reading them
is most of its time); the keys and values stay in the cache's dtype. Which dtype is fastest
depends on the machine, the model and the batch, so --decode_dtype=auto measures it (see
pick_decode_dtype) and keeps the timing in ~/.cache/chargpt/decode_dtype.json.
"""

import json
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from chargpt.machine import gpu_has_bf16, machine, machine_busy, read_cache, write_cache
from model import GPT, Dropout, FeedForward

DECODE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


class KVCache:
    """Preallocated keys and values of every layer for generation, plus the position filled so far.

    k[layer] and v[layer] are (B, n_head, block_size, head_size); positions 0..pos-1 hold data."""

    def __init__(self, config, batch_size, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0


def decode_linear(weight, bias, dtype):
    """x -> F.linear(x, weight, bias) with the weight stored in dtype.

    torch.int8: one int8 per weight with a scale per output row, and the input quantized to
    8 bits on the fly at each call (PyTorch's dynamic-quantized CPU kernels, FBGEMM on x86):
    a quarter of the float32 bytes. The input and output stay float32."""
    if dtype != torch.int8:
        w, b = weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)
        return lambda x: F.linear(x, w, b)
    if weight.device.type != "cpu":
        raise ValueError(f"int8 decoding runs on the CPU only, not on {weight.device.type}")
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # one scale per output row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated in favour of torchao, not a dependency
            qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
    except (RuntimeError, AttributeError) as e:
        raise ValueError(f"int8 decoding needs PyTorch's quantized CPU kernels, which this build lacks ({e})") from None
    reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")  # 7-bit inputs keep x86's int16 sums exact
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range)


class Decoder:
    """GPT's forward for T new positions after cache.pos, appending their keys and values to
    the cache; returns the logits of the last one, (B, vocab_size). A prefill is T prompt
    tokens into an empty cache, a decode step one token.

    Built from the model's modules: each Linear, LayerNorm and activation the Blocks hold
    becomes the function underneath it (see _op), so a Block built differently by a
    GPTConfig switch is decoded as built. The attention is MultiHeadAttention's own
    queries, keys and values (qkv, compare_form) against the cache."""

    def __init__(self, model, dtype=None):
        self.dtype = dtype or model.lm_head.weight.dtype
        # embeddings, LayerNorms and the residual stream: int8 keeps them in float32
        self.vec_dtype = torch.float32 if self.dtype == torch.int8 else self.dtype
        self.n_head, self.C = model.config.n_head, model.config.n_embd
        self.tok_emb = self._vec(model.token_embedding_table.weight)
        table = model.position_embedding_table
        self.pos_emb = None if table is None else self._vec(table.weight)
        self.layers = [
            (
                self._op(b.ln1),
                self._op(b.sa.qkv),
                b.sa.compare_form,
                self._op(b.sa.proj),
                self._op(b.ln2),
                self._op(b.ffwd),
                b.residual,
            )
            for b in model.blocks
        ]
        self.ln_f, self.lm_head = self._op(model.ln_f), self._op(model.lm_head)

    def _vec(self, t):
        return None if t is None else t.detach().to(self.vec_dtype)  # the same tensor when the dtype matches

    def _op(self, module):
        """module as a plain function of x, or None where it does nothing when decoding."""
        if module is None or isinstance(module, (nn.Identity, nn.Dropout, Dropout)):
            return None  # dropout is off when generating
        if isinstance(module, nn.Linear):
            return decode_linear(module.weight, module.bias, self.dtype)
        if isinstance(module, nn.LayerNorm):
            shape, weight, bias, eps = module.normalized_shape, self._vec(module.weight), self._vec(module.bias), module.eps
            return lambda x: F.layer_norm(x, shape, weight, bias, eps)
        if isinstance(module, FeedForward):
            return self._op(module.net)  # what its forward runs
        if isinstance(module, nn.Sequential):
            ops = [op for op in map(self._op, module) if op is not None]
            return lambda x: _chain(ops, x)
        if not list(module.children()) and not list(module.parameters()):
            return module.forward  # an activation: ReLU, SquaredReLU
        raise TypeError(f"the KV-cache decoder cannot run a {type(module).__name__}: teach chargpt/engine.py's Decoder._op it")

    @torch.no_grad()
    def __call__(self, idx, cache):
        B, T = idx.shape
        C, nh, pos = self.C, self.n_head, cache.pos
        assert pos + T <= cache.k[0].shape[2], "the cache holds block_size positions"
        assert T == 1 or pos == 0, "several positions at once only into an empty cache (a prefill)"
        x = self.tok_emb[idx]  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb[pos : pos + T]  # (T, C), the same for every row
        for layer, (ln1, qkv, compare_form, proj, ln2, ffwd, residual) in enumerate(self.layers):
            k_cache, v_cache = cache.k[layer], cache.v[layer]  # (B, nh, block_size, hs)
            q_k_v = qkv(_run(ln1, x)).to(k_cache.dtype)  # (B, T, 3C)
            q_k_v = q_k_v.view(B, T, 3 * nh, C // nh).transpose(1, 2)  # (B, 3nh, T, hs): q, k, v of each head
            q, k = compare_form(q_k_v[:, : 2 * nh], start=pos).split(nh, dim=1)  # (B, nh, T, hs) each
            k_cache[:, :, pos : pos + T] = k
            v_cache[:, :, pos : pos + T] = q_k_v[:, 2 * nh :]
            # a prefill is causal; one new position sees every cached one, so no mask
            keys, values = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]  # (B, nh, pos+T, hs)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1)  # (B, nh, T, hs)
            a = _run(proj, out.transpose(1, 2).reshape(B, T, C).to(x.dtype))  # (B, T, C)
            x = x + a if residual else a
            if ffwd is not None:
                f = ffwd(_run(ln2, x))  # (B, T, C)
                x = x + f if residual else f
        cache.pos += T
        return self.lm_head(_run(self.ln_f, x[:, -1]))  # (B, vocab_size)


def _run(op, x):
    return x if op is None else op(x)


def _chain(ops, x):
    for op in ops:
        x = op(x)
    return x


def prefill(model, idx, cache):
    """Run the prompt idx (B, T) into the empty cache; the logits of its last position (B, vocab_size)."""
    model._check_length(idx.shape[1])
    return Decoder(model)(idx, cache)  # in the model's own dtype: no copy of the weights


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True, decode_dtype=None):
    """Yield max_new_tokens next tokens, a (B,) tensor each, continuing idx (B, T).

    temperature 0 picks the most likely token; top_k > 0 keeps the k most likely (clamped
    to the vocabulary); top_p < 1 keeps the smallest set whose probability reaches top_p. A
    seeded torch.Generator makes the draw reproducible.

    decode_dtype (with kv_cache): the dtype of the decode steps' weights, torch.float16,
    torch.bfloat16 or torch.int8; prefills, which are matrix products, and the cached keys
    and values stay in the model's own dtype."""
    if idx.shape[1] == 0:
        raise ValueError("generation needs at least one token of context")
    use_cache = kv_cache and isinstance(model, GPT)
    decoder = Decoder(model, decode_dtype) if use_cache else None
    block_size, cache = model.config.block_size, None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx[:, -block_size:])[0][:, -1, :]  # (B, V)
        elif cache is None or cache.pos == block_size:
            # (re)fill the cache from the last half window (the whole prompt at first, if it
            # fits), so that positions stay inside the learned 0..block_size-1
            context = idx[:, -(block_size if cache is None else block_size // 2) :]
            cache = KVCache(model.config, idx.shape[0], idx.device, model.lm_head.weight.dtype)
            logits = prefill(model, context, cache)  # (B, V)
        else:
            logits = decoder(idx[:, -1:], cache)  # (B, V)
        idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        # the context the next step can use: the last block_size tokens and the new one, not a
        # copy of the whole text that grows with every character
        idx = torch.cat((idx[:, -block_size:], idx_next[:, None]), dim=1)  # (B, <= block_size + 1)
        yield idx_next


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (B, V), as a (B,) tensor."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    # subtract the largest logit before dividing: it stays exactly 0 at any temperature, so a
    # tiny one gives near-argmax instead of inf - inf = NaN; a temperature under float32's
    # smallest normal number counts as that number (1e-310 is 0 in float32, and 0 / 0 is NaN)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)  # (B, V)
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
        # ties with the k-th value stay in: which of equal tokens to drop is arbitrary
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V)
        # drop a token when the tokens before it already reach top_p; the first always stays
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # (B, V)
        drop[:, 0] = False  # a top_p under 1.4e-45 is 0 in float32, and 0 >= 0 would drop it too
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)  # (B, V)
    # multinomial draws on the CPU from the seeded generator: same seed, same text on any
    # device, and never MPS's multinomial, which has drawn wrong samples (pytorch#92752, #136623)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)  # (B,)


def generate_tokens(model, prompt_ids, settings):
    """The new tokens for settings (sample.py's SampleConfig), one (num_samples,) tensor at a
    time: the seeded draw that sample.py prints and serve.py streams, so the same settings
    give the same text in both."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * settings.num_samples, dtype=torch.long, device=device)  # (N, T)
    return generate(
        model,
        idx,
        settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=torch.Generator().manual_seed(settings.seed),
        kv_cache=settings.kv_cache,
        decode_dtype=resolve_decode_dtype(settings.decode_dtype, model, settings.num_samples, settings.max_new_tokens),
    )


def sample_text(model, tokenizer, num_chars, seed):
    """num_chars characters from a newline (or the vocabulary's first character), at
    temperature 1: what train.py prints at its evals and writes into samples.txt. Its own
    seeded generator leaves the training's random streams untouched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]
    idx = torch.tensor([tokenizer.encode(start)], dtype=torch.long, device=device)
    tokens = [t.item() for t in generate(model, idx, num_chars, generator=torch.Generator().manual_seed(seed))]
    model.train(was_training)
    return start + tokenizer.decode(tokens)


# -----------------------------------------------------------------------------
# --decode_dtype=auto: measured, not guessed
#
# A decode step reads every weight once to do little arithmetic with it, so the narrower
# the weights the fewer bytes it reads; whether that wins depends on the machine (its
# caches, AVX-512 FP16 or BF16, how good PyTorch's int8 kernels are on it), the model's
# size and the batch. So auto times the candidates here, for this model and batch, the way
# generation runs them (consecutive positions of one cache, after a warm-up), in rounds
# that take turns so that a change in the machine's load hits all alike, and takes the one
# that generates the requested characters fastest: its steps plus building its decoder once
# (int8's quantized copy of the lecture's model took as long as ~100 of its steps on a
# Xeon). Within MARGIN of the fastest, the simpler choice stays (float32, then float16,
# bfloat16, int8): one noisy timing cannot make generation less exact for nothing. The
# times are kept per machine, model shape and batch in ~/.cache/chargpt/decode_dtype.json
# (delete it to time again); a timing taken while the machine was busy is taken again by
# the first run on a quiet one.

STEPS = 16  # consecutive decode steps per round and candidate
WARMUP = 4  # steps of each candidate before the rounds
ROUNDS = 3
MARGIN = 1.1  # a narrower dtype must generate faster than float32 (or a simpler one) by more than this
CACHE = "decode_dtype"
SIMPLEST_FIRST = ("float32", "float16", "bfloat16", "int8")


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
    if device.type == "cuda":  # bfloat16 where the GPU has it, not where PyTorch emulates it (a T4)
        return ["float32", "float16"] + (["bfloat16"] if gpu_has_bf16(device) else [])
    return ["float32"]  # MPS: the other dtypes are unmeasured there


def cache_key(model, batch_size, device):
    # the model's shape: every config field but dropout, which decoding does not use
    shape = {k: v for k, v in sorted(vars(model.config).items()) if "dropout" not in k}
    return f"{machine()} | {device.type} | {json.dumps(shape)} | batch {batch_size}"


def pick_decode_dtype(model, batch_size=1, new_tokens=500, use_cache=True):
    """(name, costs, where): the dtype that generates new_tokens characters per sequence the
    fastest, building its decoder included, with the simpler choice kept within MARGIN.
    costs is {name: (seconds to build the decoder, seconds per decode step)}; where says
    whether they were 'timed' now or came from the 'cache' ('none' when there is nothing to
    choose: one candidate, no decoder, no tokens)."""
    device = next(model.parameters()).device
    names = candidates(device)
    if not isinstance(model, GPT) or len(names) == 1 or new_tokens == 0:
        return "float32", {}, "none"
    key = cache_key(model, batch_size, device)
    entry, where = (read_cache(CACHE).get(key) if use_cache else None), "cache"
    costs, busy = cached_costs(entry, names)
    if costs is None or (busy and not machine_busy()):
        busy = machine_busy()
        timings, where = time_decoders(model, names, batch_size), "timed"
        costs = {name: (build, min(steps)) for name, (build, steps) in timings.items()}
        if use_cache:
            write_cache(CACHE, key, {"costs": costs, "busy": busy, "when": round(time.time())})
    total = {name: build + new_tokens * step for name, (build, step) in costs.items()}
    fastest = min(total.values())
    simplest = next(name for name in SIMPLEST_FIRST if name in total and total[name] <= MARGIN * fastest)
    return simplest, costs, where


def cached_costs(entry, names):
    """(costs, busy) of a cache entry, or (None, False) for one that is missing or damaged.
    An entry is {"costs": {name: (build seconds, step seconds)}, "busy": bool}; one written
    before timings were marked busy is the costs alone."""
    costs = entry.get("costs") if isinstance(entry, dict) and "costs" in entry else entry
    try:
        valid = bool(costs) and all(name in names and len(c) == 2 and min(c) >= 0 for name, c in costs.items())
    except (TypeError, AttributeError):
        valid = False
    return (costs, bool(entry.get("busy"))) if valid else (None, False)


@torch.no_grad()
def time_decoders(model, names, batch_size):
    """{name: (seconds to build its Decoder, [seconds per decode step in each round])} for the
    dtypes among names that this machine can run. Each decoder is built (timed) and warmed
    up, then ROUNDS rounds time STEPS consecutive steps of each candidate in turn, from the
    same cache position: where generation spends its time on average, the middle of the
    window."""
    device = next(model.parameters()).device
    config = model.config
    steps = min(STEPS, config.block_size - 1)
    start = max(1, min(config.block_size // 2, config.block_size - steps))
    cache = KVCache(config, batch_size, device, model.lm_head.weight.dtype)
    prefill(model, torch.zeros(batch_size, start, dtype=torch.long, device=device), cache)
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)

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
            run(decoder, min(WARMUP, steps))  # the first calls allocate and pick their kernels
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
