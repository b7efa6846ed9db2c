"""How much memory a run needs and how much the machine has, so that a run too big for it
is refused before it starts instead of being killed half-way by the kernel's OOM killer.
Used by train.py and sample.py; `python bench.py memory` measures the estimate against the
real peak.

The estimate adds up the tensors a run holds at its peak:
    training   weights, gradients and optimizer state (AdamW: two moments per weight; Muon:
               one momentum per Block matrix), plus what one micro-step's backward needs:
               the activations autograd saves in every Block (about 12 numbers per token
               and unit of n_embd; with --attn_dropout the unfused attention also keeps
               B x n_head x T x T weights), the logits, and the gradients in flight
    sampling   the KV cache (2 x n_layer x (B, n_head, block_size, head_size)), the prompt's
               pass through the model, the growing (B, T) ids, the decode-dtype copy of the
               weights and the text kept for several samples
plus a fixed allowance for what PyTorch itself takes on a first step (kernels' workspace,
thread pools). Activations are counted in the autocast dtype where one is used. The model's
weights already loaded (sampling) and the interpreter with PyTorch imported are resident
already, so they are not counted: what is compared is what the run will add.

The count of what autograd saves is checked by a test against autograd itself, for every
model variant. What the count cannot see (short-lived tensors, blocks the allocator keeps
for the next step, PyTorch's own workspace) is covered by factors measured against the peak
anonymous memory of real runs (bench.py memory, the table in the README): there the peak
of runs of 100 MiB and more was 0.81-1.25x the estimate. A test holds it within
ESTIMATE_FACTOR either way.
"""

import os

import torch

FLOAT = 4  # bytes of a float32
HALF = ("bfloat16", "float16")  # the autocast dtypes: 2 bytes
# what a run takes besides its tensors: PyTorch's kernels and thread pools on the first
# steps, matplotlib for loss.png; measured 99-105 MiB on a model of a few kB (bench.py memory)
RUNTIME_BYTES = 100 * 2**20
# the memory a step's activations take is more than their bytes: short-lived tensors in
# forward and backward, and the allocator keeping freed blocks for the next step (the peak
# settles after about 3 steps); with 1.4 the measured training peaks were 0.81-1.25x the
# estimate (bench.py memory)
ACTIVATION_SLACK = 1.4
# a forward without autograd holds at most the residual stream and FeedForward's hidden
# layer before and after its ReLU, (2 + 2 x ffwd_mult) x n_embd numbers per token, and more
# for the same reasons; with 1.5 the measured peaks of big generations were 0.90-1.24x the
# estimate (bench.py memory)
SAMPLING_SLACK = 1.5
SAMPLING_RUNTIME_BYTES = 2 * 2**20  # measured 1-6 MiB: no autograd, no matplotlib
# how far the measured peak may be from the estimate, either way (the README's table; a test checks it)
ESTIMATE_FACTOR = 2


def format_bytes(n):
    """12.3 GiB, 456 MiB, 2.0 TiB: as `free -h` counts (powers of 1024)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def count_params(model_config):
    """(all parameters, those that take Muon's update) of the model a GPTConfig describes,
    counted from its shapes (a test holds this to the model itself, for every switch): no
    model is built, so nothing is allocated however big the config, and nothing imported
    (initialising a model on the meta device imports torch._dynamo, 1.5 s)."""
    c, C = model_config, model_config.n_embd
    if c.model_type == "bigram":
        return c.vocab_size**2, 0
    bias = 1 if c.bias else 0
    norm = (1 + bias) * C if c.layer_norm else 0  # a LayerNorm's gain and bias
    hidden = c.ffwd_mult * C
    matrices = 3 * C * C + (C * C if c.proj else 0)  # qkv, and the attention's projection
    biases = C if c.proj else 0
    block = norm
    if hidden:
        matrices += C * hidden + (hidden * C if c.proj else 0)  # FeedForward's Linear, and its projection
        biases += hidden + (C if c.proj else 0)
        block += norm
    embeddings = (c.vocab_size + (c.block_size if c.position == "learned" else 0)) * C
    head = C * c.vocab_size + bias * c.vocab_size + norm  # lm_head and the final LayerNorm
    return c.n_layer * (block + matrices + bias * biases) + embeddings + head, c.n_layer * matrices


def block_bytes_per_token(model_config, dtype="float32"):
    """Bytes that autograd saves per token in one Block for its backward (see the module
    docstring); a test counts them against what autograd really keeps."""
    c, C, m = model_config, model_config.n_embd, model_config.ffwd_mult
    act = 2 if dtype in HALF else FLOAT  # the bytes of what the matrix products save
    branches = 2 if m else 1  # attention, and FeedForward unless ffwd_mult is 0
    # each branch's LayerNorm keeps its input, the residual stream (float32; without residual
    # connections the stream is the last branch's output, in the compute dtype), and a mean
    # and 1/std per token
    stream = FLOAT if c.residual else act
    saved = branches * (C * stream + 2 * FLOAT) if c.layer_norm else 0
    # and in the compute dtype: the input of qkv (C), the attention's q, k, v (3C) and output
    # (C), the input of FeedForward (C) and its hidden layer after the ReLU (ffwd_mult x C)
    saved += (5 + (1 + m if m else 0)) * C * act
    if c.activation == "relu2":
        saved += m * C * act  # the ReLU's output as well as its square
    if c.position == "rotary":
        saved += 3 * C * act  # the rotated queries and keys and their halves
    if c.qk_norm:
        saved += 3 * C * FLOAT  # queries and keys at unit RMS, in float32
    if c.dropout > 0:
        saved += branches * C  # a boolean mask per branch
    if c.attn_dropout > 0:
        saved += 3 * C * (FLOAT - act)  # the unfused attention keeps q, k, v in float32 (see training_bytes)
    return saved


def training_bytes(model_config, batch_size, optimizer="adamw", dtype="float32", world_size=1):
    """{part: bytes} of one training process at its peak (see the module docstring)."""
    c = model_config
    params, muon_params = count_params(c)
    state = params * FLOAT * 2  # weights and their gradients
    if optimizer == "muon":
        # one momentum per matrix; its update orthogonalizes a stack of a shape's gradients, a
        # few copies of them at once
        state += muon_params * FLOAT * 4 + (params - muon_params) * FLOAT * 2
    else:
        state += params * FLOAT * 2  # AdamW's two moments
    if world_size > 1:
        state += params * FLOAT  # DDP's gradient buckets
    if dtype in HALF:
        state += params * 2  # autocast keeps a 16-bit copy of each weight for the step

    tokens, C, V = batch_size * c.block_size, c.n_embd, c.vocab_size
    if c.model_type == "bigram":
        activations = tokens * V * FLOAT * 4  # logits, log-softmax and their gradients
    else:
        # the embeddings' sum and the final LayerNorm (C each), the logits and their
        # log-softmax (float32), and in backward the gradients of the widest layer (twice)
        head = 3 * C * FLOAT + 3 * V * FLOAT
        in_flight = 2 * max(c.ffwd_mult, 1) * C * FLOAT
        activations = tokens * (c.n_layer * block_bytes_per_token(c, dtype) + head + in_flight)
        if c.attn_dropout > 0:
            # SDPA's unfused path (dropout on the attention weights) saves three (B, n_head, T, T)
            # tensors per Block (the softmax weights, the mask, the dropped weights), in float32
            # even under autocast; backward adds two more at a time
            weights = batch_size * c.n_head * c.block_size**2 * FLOAT
            activations += c.n_layer * 3 * weights + 2 * weights
    return {
        "weights, gradients and optimizer state": state,
        "activations": int(activations * ACTIVATION_SLACK),
        "PyTorch": RUNTIME_BYTES,
    }


def sampling_bytes(model_config, num_samples, prompt_len, max_new_tokens, kv_cache=True, decode_bytes=0):
    """{part: bytes} that generation adds to a loaded model; decode_bytes is the size of the
    decode-dtype copy of the weights (0 when the decode steps use the model's own)."""
    c, N = model_config, num_samples
    # bytes per token of a forward pass without autograd (none for the bigram, just a lookup)
    width = (2 + 2 * max(c.ffwd_mult, 1)) * c.n_embd * FLOAT * SAMPLING_SLACK if c.model_type == "gpt" else 0
    parts = {}
    if c.model_type == "gpt" and kv_cache:
        cache = 2 * c.n_layer * N * c.block_size * c.n_embd * FLOAT  # (N, nh, block_size, hs), keys and values, per layer
        prefilled = min(prompt_len, c.block_size)
        # once the cache is full it is rebuilt from the last block_size // 2 tokens: the new
        # cache is allocated while the old one still exists, then filled by a prefill
        rebuild = prefilled + max_new_tokens > c.block_size + 1
        T = max(prefilled, c.block_size // 2 if rebuild else 0)  # the longest prefill
        parts["KV cache"] = cache
        parts["decode weights"] = decode_bytes
        forward = int(N * T * width) + N * c.vocab_size * FLOAT  # the last position's logits only
        parts["forward pass"] = max(forward, cache if rebuild else 0)
    else:
        T = min(prompt_len + max(max_new_tokens - 1, 0), c.block_size)  # the last step's context
        parts["forward pass"] = int(N * T * (width + c.vocab_size * FLOAT))  # logits at every position
    # the ids grow by torch.cat (old and new copy at once, int64); several samples are also
    # kept as Python lists of ids and then strings until printed
    parts["generated ids"] = N * (prompt_len + max_new_tokens) * 8 * 2 + (N * max_new_tokens * 24 if N > 1 else 0)
    parts["PyTorch"] = SAMPLING_RUNTIME_BYTES
    return parts


# -----------------------------------------------------------------------------
# what the machine has


def _meminfo_available():
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path):
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_room():
    """Bytes left under a container's memory limit (cgroup v2, else v1), or None without one.
    MemAvailable shows the whole machine's memory, but the limit is what the OOM killer enforces."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes "no limit" as a huge number
            return max(0, limit - usage)
    return None


def available_bytes(device):
    """(bytes, what they are) this process can still allocate on device, or None when the
    system does not say. CUDA: the device's free memory; elsewhere (CPU, and MPS, which
    shares it) what the OS reports as available, or the container's room if smaller."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"free on {device}"
    figures = []
    available = _meminfo_available()
    if available is not None:
        figures.append((available, "available"))
    room = _cgroup_room()
    if room is not None:
        figures.append((room, "left under the container's memory limit"))
    if not figures:
        try:
            import psutil  # not a dependency; used where installed (macOS, Windows)

            figures.append((psutil.virtual_memory().available, "available"))
        except ImportError:
            try:  # macOS without psutil: the RAM there is, an upper bound of what is free
                figures.append((os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of RAM in all"))
            except (ValueError, OSError, AttributeError):
                return None
    return min(figures)


def check_fits(parts, device, what, suggestions):
    """Raise ValueError when the estimate parts ({name: bytes}) exceed what device has. The
    message gives both figures, the biggest part, and the suggestion for it ({part: text},
    a missing part taking the first one)."""
    have = available_bytes(device)
    need = sum(parts.values())
    if have is None or need <= have[0]:
        return
    biggest = max(parts, key=parts.get)
    suggestion = suggestions.get(biggest, next(iter(suggestions.values())))
    raise ValueError(
        f"{what} needs about {format_bytes(need)} of memory ({biggest} {format_bytes(parts[biggest])}) "
        f"but only {format_bytes(have[0])} is {have[1]}: {suggestion}"
    )


# -----------------------------------------------------------------------------
# the checks train.py and sample.py make before they start


def check_training_memory(config, model_config, device, dtype, ddp):
    """Refuse, on every process, a training run whose estimated peak exceeds the memory there
    is, instead of being killed by the OOM killer half-way. CPU processes that torchrun
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


# bytes per weight of the decode steps' copy of the weights; float32 decodes with the model's
# own, and auto (which times the candidates only once the check has passed) is counted as the
# biggest copy it may pick
DECODE_COPY_BYTES = {"float32": 0, "float16": 2, "bfloat16": 2, "int8": 1, "auto": 2}


def generation_bytes(settings, model, prompt_len):
    """{part: bytes} that generating with settings (a SampleConfig) adds to the loaded model."""
    decode_bytes = model.num_params() * DECODE_COPY_BYTES[settings.decode_dtype]
    return sampling_bytes(
        model.config, settings.num_samples, prompt_len, settings.max_new_tokens, settings.kv_cache, decode_bytes
    )


def check_sampling_memory(settings, model, prompt_len, device):
    """Refuse a generation whose estimate exceeds the memory there is, before it starts
    (before decode dtype auto times anything, too)."""
    what = f"generating --num_samples={settings.num_samples} x --max_new_tokens={settings.max_new_tokens} characters"
    fewer = "use fewer --num_samples (run sample.py several times with other --seed values)"
    check_fits(
        generation_bytes(settings, model, prompt_len),
        device,
        what,
        {"generated ids": "use a smaller --max_new_tokens, or fewer --num_samples", "KV cache": fewer, "forward pass": fewer},
    )
