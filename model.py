"""The character-level GPT of the lecture "Let's build GPT: from scratch, in code, spelled out".

The lecture's classes, in the order it builds them:
    Head                  one head of causal self-attention, written out (tril mask, softmax)
    MultiHeadAttention    all heads at once: one fused q/k/v projection and
                          F.scaled_dot_product_attention, the path that trains and samples
    FeedForward           the per-token MLP
    Block                 communication (attention) then computation (MLP), pre-LayerNorm,
                          each wrapped in a residual connection
    GPT                   token + position embeddings, n_layer Blocks, final LayerNorm, lm_head
    BigramLanguageModel   the lecture's baseline: the next character from the current one

The lecture reaches this Block in steps, and GPTConfig can take each one back: no
FeedForward or a narrow one (ffwd_mult), no projections back into the stream (proj), no
residual connections (residual), no LayerNorm (layer_norm). The defaults are the finished
model; config/lecture/ holds one config per step, and ladder.py trains them all. Options
from recent speed records of small GPTs (activation, position, qk_norm, bias) are off by
default too; the README says which recipe uses which.

Weights: every Linear and Embedding starts at N(0, 0.02); the two projections that write
into the residual stream are scaled down by 1/sqrt(2 * n_layer) so the stream does not
grow with depth; lm_head starts at zero so that the loss at init is exactly ln(vocab_size)
(the lecture's model starts at 4.87 instead of ln(65) = 4.17). init='pytorch' keeps
PyTorch's own initial weights instead, as the video did (the small stages learn much
faster that way). The token embedding and lm_head are NOT tied, as in the lecture.

Generation keeps a key/value cache (KVCache): the prompt is run once (GPT.prefill), then
each new token costs one position (Decoder: the same math written flat for speed, its
weights optionally in float16 or int8). Positions are learned for 0..block_size-1 only,
so when the cache is full it is rebuilt from the last block_size // 2 tokens and decoding
goes on (see GPT.generate). With kv_cache=False the lecture's loop runs instead: the whole
context, cropped to the last block_size tokens, for every new token.

This file only defines the network: no I/O, no argument parsing.
"""

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    model_type: str = field(default="gpt", metadata={"help": "'gpt' (the lecture's transformer) or 'bigram' (the baseline)"})
    block_size: int = field(default=256, metadata={"help": "context length: the most characters the model sees at once"})
    vocab_size: int = field(default=65, metadata={"help": "number of distinct characters (taken from the data)", "derived": True})
    n_layer: int = field(default=6, metadata={"help": "number of transformer Blocks"})
    n_head: int = field(default=6, metadata={"help": "attention heads per Block (n_embd must divide by it)"})
    n_embd: int = field(default=384, metadata={"help": "width of the residual stream"})
    dropout: float = field(default=0.2, metadata={"help": "dropout on the residual branches while training"})
    attn_dropout: float = field(default=0.0, metadata={"help": "dropout on the attention weights while training (the lecture: same as dropout)"})
    # The lecture builds the Block one idea at a time; these switches take its steps back
    # (config/lecture/ walks them). The defaults are the finished model.
    ffwd_mult: int = field(default=4, metadata={"help": "FeedForward's hidden width as a multiple of n_embd (0: no FeedForward)"})
    residual: bool = field(default=True, metadata={"help": "add each branch of a Block back to x (False: its output replaces x)"})
    proj: bool = field(default=True, metadata={"help": "a projection back to n_embd after the attention heads and at the end of FeedForward"})
    layer_norm: bool = field(default=True, metadata={"help": "LayerNorm before each branch of a Block and before lm_head (pre-norm)"})
    init: str = field(default="normal", metadata={"help": "'normal': N(0, 0.02) weights and a zero lm_head (see GPT._init_weights); 'pytorch': PyTorch's defaults, as in the lecture's video"})
    # Options from recent speed records, beyond the lecture; off by default (README: which recipe uses what).
    activation: str = field(default="relu", metadata={"help": "FeedForward's nonlinearity: 'relu' (the lecture) or 'relu2' (squared ReLU)"})
    position: str = field(default="learned", metadata={"help": "'learned': a position embedding table (the lecture); 'rotary': queries and keys rotated by position (RoPE), no table"})
    qk_norm: bool = field(default=False, metadata={"help": "scale each head's queries and keys to unit RMS before their dot product"})
    bias: bool = field(default=True, metadata={"help": "a bias in the Linear layers and LayerNorms (False: none, as in recent GPTs)"})

    def validate(self):
        """Raise ValueError naming the flag for a config that cannot build a model."""
        if self.model_type not in ("gpt", "bigram"):
            raise ValueError(f"--model_type must be 'gpt' or 'bigram', got {self.model_type!r}")
        for key, allowed in (("init", ("normal", "pytorch")), ("activation", ("relu", "relu2")), ("position", ("learned", "rotary"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key} must be {' or '.join(repr(a) for a in allowed)}, got {getattr(self, key)!r}")
        if self.position == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"--position=rotary needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}")
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"--n_embd={self.n_embd} must be divisible by --n_head={self.n_head}")
        for key in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"--{key} must be in [0, 1), got {getattr(self, key)}")
        if self.ffwd_mult < 0:
            raise ValueError(f"--ffwd_mult must be 0 or more, got {self.ffwd_mult}")
        if not self.proj and self.ffwd_mult > 1:
            raise ValueError(f"--ffwd_mult={self.ffwd_mult} needs --proj=True: without the projection back, "
                             "FeedForward's hidden layer is its output and must be n_embd wide (--ffwd_mult=1)")


class Head(nn.Module):
    """One head of causal self-attention, as written in the lecture.

    It is the readable reference: training uses MultiHeadAttention, and a test checks that
    both compute the same function (see MultiHeadAttention.heads)."""

    def __init__(self, n_embd, head_size, block_size, dropout=0.0):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # lower-triangular ones: position t may look at positions 0..t only
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def attention(self, x):
        """The attention weights (B, T, T): row t says how much position t takes from each
        of positions 0..t (the row sums to 1, the entries above the diagonal are 0)."""
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        # affinities, scaled so the softmax stays diffuse at init
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # (B, T, T)
        return F.softmax(wei, dim=-1)  # (B, T, T)

    def forward(self, x):
        wei = self.dropout(self.attention(x))  # (B, T, T)
        v = self.value(x)  # (B, T, hs)
        return wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


class Dropout(nn.Module):
    """nn.Dropout with a cheaper mask on the CPU.

    PyTorch's CPU dropout draws one random number per element, and that drawing was most of
    the cost of dropout: 0.1 on the residual branches made a training step of the 30-minute
    recipe 67% slower here. This draws 64 random bits at a time and cuts them into four
    16-bit numbers, one per element, kept when at or above p * 2**16 of the range: the
    same Bernoulli(1 - p) mask, with p rounded to 1/65536, from the same seeded generator.
    On other devices (CUDA draws masks in the kernel) it is plain F.dropout."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        uniform16 = bits.view(torch.int16)[:n].view(x.shape)  # uniform in [-32768, 32767]
        keep = uniform16 >= round(self.p * 65536) - 32768  # true with probability 1 - p
        return x * keep * (1.0 / (1.0 - self.p))


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
    """x -> F.linear(x, weight, bias) with the weight stored in dtype for Decoder.

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
    """GPT's decode step: one new token per sequence through every Block, its keys and
    values appended to a KVCache that GPT.prefill started.

    The same math as Block.forward at one position, written flat: a decode step does little
    arithmetic, so on a CPU the nn.Module calls were a quarter of its time. The matrices may be a
    copy in another dtype (float16 halves the bytes a step reads, int8 quarters them, and
    reading them is most of its time); the keys and values stay in the cache's dtype. Tests
    check the logits against GPT.forward."""

    def __init__(self, model, dtype=None):
        dtype = dtype or model.lm_head.weight.dtype
        vec_dtype = torch.float32 if dtype == torch.int8 else dtype  # embeddings, LayerNorm, activations
        v = lambda t: t.detach().to(vec_dtype)  # the same tensor when the dtype matches
        # a piece that the lecture's earlier steps leave out (see GPTConfig) is None here
        lin = lambda m: None if m is None else decode_linear(m.weight, m.bias, dtype)
        norm = lambda m: (v(m.weight), None if m.bias is None else v(m.bias)) if isinstance(m, nn.LayerNorm) else None
        self.n_head, self.C, self.residual = model.config.n_head, model.config.n_embd, model.config.residual
        self.tok_emb = v(model.token_embedding_table.weight)
        self.pos_emb = None if model.position_embedding_table is None else v(model.position_embedding_table.weight)
        self.act = F.relu if model.config.activation == "relu" else lambda t: F.relu(t).square()
        self.layers = []
        for b in model.blocks:
            fc, fc2 = (None, None) if b.ffwd is None else (b.ffwd.net[0], b.ffwd.net[2] if model.config.proj else None)
            self.layers.append((norm(b.ln1), lin(b.sa.qkv), b.sa.compare_form, lin(b.sa.proj), norm(b.ln2), lin(fc), lin(fc2)))
        self.ln_f = norm(model.ln_f)
        self.lm_head = lin(model.lm_head)

    def _norm(self, x, ln):
        return x if ln is None else F.layer_norm(x, (self.C,), *ln)

    def __call__(self, idx, cache):
        """idx (B,) at position cache.pos -> logits (B, vocab_size)."""
        B, C, nh, pos = idx.shape[0], self.C, self.n_head, cache.pos
        assert pos < cache.k[0].shape[2], "the cache holds block_size positions"
        x = self.tok_emb[idx] if self.pos_emb is None else self.tok_emb[idx] + self.pos_emb[pos]  # (B, C)
        for layer, (ln1, qkv, compare_form, proj, ln2, fc, fc2) in enumerate(self.layers):
            k_cache, v_cache = cache.k[layer], cache.v[layer]  # (B, nh, block_size, hs)
            q_k_v = qkv(self._norm(x, ln1))  # (B, 3C)
            q_k_v = q_k_v.to(k_cache.dtype).view(B, 3, nh, 1, C // nh)  # q, k, v of each head
            q, k = compare_form(q_k_v[:, :2].flatten(1, 2), start=pos).split(nh, dim=1)  # (B, nh, 1, hs) each
            k_cache[:, :, pos : pos + 1] = k
            v_cache[:, :, pos : pos + 1] = q_k_v[:, 2]
            # one query sees every cached position, so no mask
            out = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])  # (B, nh, 1, hs)
            a = out.view(B, C).to(x.dtype)  # (B, C)
            a = a if proj is None else proj(a)  # (B, C)
            x = x + a if self.residual else a
            if fc is not None:
                f = self.act(fc(self._norm(x, ln2)))  # (B, hidden)
                f = f if fc2 is None else fc2(f)  # (B, C)
                x = x + f if self.residual else f
        cache.pos += 1
        return self.lm_head(self._norm(x, self.ln_f))  # (B, vocab_size)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), for GPTConfig.position='rotary'.

    Each query and key is cut into pairs of channels (2i, 2i+1), and each pair is rotated by
    an angle proportional to the position, faster for the first pairs than for the last. A
    rotation by a at one position and b at another leaves their dot product depending on
    b - a only: attention sees how far back a character is, not where it is. Nothing is
    learned; it replaces the position embedding table.

    A pair (x, y) is the complex number x + iy, and rotating it by angle a is multiplying it
    by e^(ia) = cos a + i sin a: one multiplication per call, where the same rotation
    written with real numbers takes seven operations (a step of config/shakespeare_char.py
    was 16% slower than with the position table that way, 4% slower this way, measured on
    the 2-core Xeon of the README)."""

    def __init__(self, head_size, block_size, base=10000.0):
        super().__init__()
        half = head_size // 2
        speeds = base ** (-torch.arange(half, dtype=torch.float32) / half)  # (hs/2,): radians per position
        angles = torch.arange(block_size, dtype=torch.float32)[:, None] * speeds  # (block_size, hs/2)
        # not in the state dict: they follow from the config (real buffers: module.to(dtype)
        # would drop the imaginary part of a complex one)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start=0):
        """x (..., T, hs) at positions start..start+T-1, rotated."""
        T = x.shape[-2]
        turn = torch.complex(self.cos[start : start + T].float(), self.sin[start : start + T].float())  # (T, hs/2): e^(i angle)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., T, hs/2): channel 2i + i * channel 2i+1
        return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)  # (..., T, hs)


class SquaredReLU(nn.Module):
    """relu(x)**2, for GPTConfig.activation='relu2' (So et al. 2021, "Primer")."""

    def forward(self, x):
        return F.relu(x).square()


class MultiHeadAttention(nn.Module):
    """n_head Heads side by side, computed together.

    One Linear makes the queries, keys and values of every head (rows [0, C) are the
    queries, [C, 2C) the keys, [2C, 3C) the values; head h owns rows h*hs..(h+1)*hs of
    each), and F.scaled_dot_product_attention does the masked softmax in a fused kernel."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.n_embd // config.n_head
        self.block_size = config.block_size
        self.attn_dropout = config.attn_dropout
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(self.head_size, config.block_size) if config.position == "rotary" else None
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        # the lecture first just concatenates the heads; the projection comes with the residual connections
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias) if config.proj else None
        self.dropout = Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv_by_head(x)  # (B, nh, T, hs) each
        if cache is None:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
            )  # (B, nh, T, hs)
        else:  # prefill: the prompt attends to itself, causally, and leaves its keys and values
            assert cache.pos == 0, "prefill starts an empty cache; Decoder adds one position at a time"
            cache.k[layer][:, :, :T] = k
            cache.v[layer][:, :, :T] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        out = out.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        if self.proj is not None:
            out = self.proj(out)  # (B, T, C)
        return self.dropout(out)

    def qkv_by_head(self, x):
        """The queries, keys and values of every head for x (B, T, C), (B, nh, T, hs) each; the
        queries and keys in the form attention compares them (compare_form)."""
        B, T, C = x.shape
        nh = self.n_head
        qkv = self.qkv(x).view(B, T, 3 * nh, self.head_size).transpose(1, 2)  # (B, 3nh, T, hs): 3 x nh heads
        q, k = self.compare_form(qkv[:, : 2 * nh]).split(nh, dim=1)  # (B, nh, T, hs) each
        return q, k, qkv[:, 2 * nh :]

    def compare_form(self, qk, start=0):
        """Queries and keys side by side (B, 2nh, T, hs: the queries first) at positions start..
        as attention compares them: unchanged in the lecture's model; with qk_norm at unit RMS,
        with rotary positions rotated. Both in one call each: the tensors are small, and on a
        CPU a call costs about as much as its arithmetic."""
        if self.qk_norm:  # bounded logits: no head can saturate its softmax by growing q or k
            qk = F.rms_norm(qk, (self.head_size,))
        if self.rotary is not None:
            qk = self.rotary(qk, start)
        return qk

    def attention(self, x):
        """The attention weights (B, nh, T, T) of every head, written out as in the lecture:
        q·kᵀ scaled by head_size**-0.5, the tril mask, softmax. Row t says how much position t
        takes from each of positions 0..t; forward computes the same in a fused kernel."""
        T = x.shape[1]
        q, k, _ = self.qkv_by_head(x)  # (B, nh, T, hs) each
        wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B, nh, T, T)
        tril = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return F.softmax(wei.masked_fill(~tril, float("-inf")), dim=-1)  # (B, nh, T, T)

    def heads(self):
        """The lecture's Head modules holding this layer's weights, one per head.

        torch.cat([h(x) for h in heads], -1) followed by self.proj is this module's forward
        in eval mode for the lecture's attention (without qk_norm or rotary positions, which
        Head does not have); the test suite checks it."""
        C, hs = self.n_head * self.head_size, self.head_size
        heads = []
        for h in range(self.n_head):
            head = Head(C, hs, self.block_size).to(self.qkv.weight.device, self.qkv.weight.dtype)
            with torch.no_grad():
                rows = slice(h * hs, (h + 1) * hs)
                head.query.weight.copy_(self.qkv.weight[0 * C :][rows])
                head.key.weight.copy_(self.qkv.weight[1 * C :][rows])
                head.value.weight.copy_(self.qkv.weight[2 * C :][rows])
            heads.append(head)
        return heads


class FeedForward(nn.Module):
    """A linear layer, a ReLU and a projection back: each token thinks on its own."""

    def __init__(self, config):
        super().__init__()
        hidden = config.ffwd_mult * config.n_embd
        layers = [nn.Linear(config.n_embd, hidden, bias=config.bias), nn.ReLU() if config.activation == "relu" else SquaredReLU()]
        # the lecture's first FeedForward stops at the ReLU; the projection back (and 4x the
        # width inside) comes with the residual connections
        if config.proj:
            layers.append(nn.Linear(hidden, config.n_embd, bias=config.bias))
        layers.append(Dropout(config.dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Communication followed by computation, each on a LayerNormed copy added back to x."""

    def __init__(self, config):
        super().__init__()
        self.residual = config.residual
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config) if config.ffwd_mult > 0 else None
        # pre-norm, the lecture's last step: each branch reads a normalised copy of x
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm else nn.Identity()
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm and self.ffwd else nn.Identity()

    def forward(self, x, cache=None, layer=0):
        a = self.sa(self.ln1(x), cache, layer)  # (B, T, C): communication
        # residual connections: a branch adds to x instead of replacing it, so the gradient
        # reaches the first layers unchanged through the sums
        x = x + a if self.residual else a
        if self.ffwd is not None:
            f = self.ffwd(self.ln2(x))  # (B, T, C): computation
            x = x + f if self.residual else f
        return x

    def projections(self):
        """The Linear layers that write back into the stream: attention's and FeedForward's
        projections (none with proj=False)."""
        if self.sa.proj is None:
            return []
        return [self.sa.proj] + ([self.ffwd.net[2]] if self.ffwd is not None else [])


class LanguageModel(nn.Module):
    """What GPT and BigramLanguageModel share: the loss, and generation."""

    def _loss(self, logits, targets):
        B, T, V = logits.shape
        return F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))

    def _check_length(self, T):
        if T > self.config.block_size:
            raise ValueError(f"input has {T} tokens, longer than block_size {self.config.block_size}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, kv_cache=True,
                 decode_dtype=None):
        """Yield max_new_tokens next tokens, a (B,) tensor each, continuing idx (B, T).

        temperature 0 picks the most likely token; top_k > 0 keeps the k most likely
        (clamped to the vocabulary); top_p < 1 keeps the smallest set whose probability
        reaches top_p. A seeded torch.Generator makes the draw reproducible.

        With kv_cache the context window is rebuilt from the last block_size // 2 tokens
        whenever it is full; without it, every step runs the last block_size tokens.

        decode_dtype (with kv_cache): run the one-token decode steps on a copy of the weights
        in this dtype: torch.float16, torch.bfloat16 or torch.int8 (see Decoder). A decode
        step reads every weight once to do little arithmetic with it, so fewer bytes is less
        time; prefills, which are matrix products, and the cached keys and values stay in
        the model's own dtype."""
        if idx.shape[1] == 0:
            raise ValueError("generation needs at least one token of context")
        use_cache = kv_cache and isinstance(self, GPT)
        decoder = Decoder(self, decode_dtype) if use_cache else None
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -self.config.block_size :])[0][:, -1, :]  # (B, V)
            elif cache is None or cache.pos == self.config.block_size:
                # (re)fill the cache from the last half window (the whole prompt at first,
                # if it fits), so positions stay inside the learned 0..block_size-1
                keep = self.config.block_size if cache is None else self.config.block_size // 2
                context = idx[:, -keep:]
                cache = KVCache(self.config, idx.shape[0], idx.device, self.lm_head.weight.dtype)
                logits = self.prefill(context, cache)  # (B, V)
            else:
                logits = decoder(idx[:, -1], cache)  # (B, V)
            idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            idx = torch.cat((idx, idx_next[:, None]), dim=1)  # (B, T+1)
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
    # multinomial draws on the CPU from the seeded generator: same seed, same text on any device
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)  # (B,)


class GPT(LanguageModel):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        # with rotary positions the attention itself knows how far apart characters are
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias) if config.layer_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        self._init_weights()

    def _init_weights(self):
        # the one place where initial weights are chosen (see the module docstring)
        if self.config.init == "pytorch":
            return  # each module keeps the initial weights PyTorch gave it, as in the lecture's video
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for residual_proj in block.projections():
                nn.init.normal_(residual_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        nn.init.zeros_(self.lm_head.weight)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        self._check_length(T)
        x = self._embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None if targets is None else self._loss(logits, targets)
        return logits, loss

    def _embed(self, idx):
        """(B, T) token ids -> (B, T, C): token embeddings, plus position embeddings unless
        the positions are rotary."""
        x = self.token_embedding_table(idx)  # (B, T, C)
        if self.position_embedding_table is not None:
            x = x + self.position_embedding_table.weight[: idx.shape[1]]  # (T, C), the same for every row
        return x

    def prefill(self, idx, cache):
        """Run the prompt idx (B, T) through the model into an empty cache; return the logits
        of its last position, (B, vocab_size). Decoder then adds one position at a time."""
        B, T = idx.shape
        self._check_length(T)
        x = self._embed(idx)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)  # (B, T, C)
        cache.pos = T
        return self.lm_head(self.ln_f(x[:, -1, :]))  # (B, vocab_size)

    @torch.no_grad()
    def attention_maps(self, idx):
        """The attention weights of every layer and head for one sequence idx (1, T), as a
        (n_layer, n_head, T, T) tensor, computed with the lecture's Head math (q·k^T scaled by
        head_size**-0.5, tril mask, softmax) on each layer's own weights. For pictures and
        teaching; dropout is off while it runs, as in generation."""
        B, T = idx.shape
        assert B == 1, "attention_maps takes one sequence"
        self._check_length(T)
        was_training = self.training
        self.eval()
        x = self._embed(idx)  # (1, T, C)
        maps = []
        for block in self.blocks:
            maps.append(block.sa.attention(block.ln1(x))[0])  # (nh, T, T): from what this block's attention reads
            x = block(x)  # (1, T, C)
        self.train(was_training)
        return torch.stack(maps)  # (n_layer, nh, T, T)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 per weight that multiplies, plus
        attention's scores and weighted sum over the block (PaLM appendix B)."""
        c = self.config
        table = self.position_embedding_table
        matmul_params = self.num_params() - self.token_embedding_table.weight.numel() - (0 if table is None else table.weight.numel())
        return 6 * matmul_params + 6 * c.n_layer * c.n_embd * c.block_size


class BigramLanguageModel(LanguageModel):
    """The lecture's baseline: a table of next-character logits, one row per character."""

    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)
        if config.init == "normal":
            nn.init.zeros_(self.token_embedding_table.weight)  # uniform at init: loss = ln(vocab_size)

    def forward(self, idx, targets=None):
        self._check_length(idx.shape[1])
        logits = self.token_embedding_table(idx)  # (B, T, vocab_size)
        loss = None if targets is None else self._loss(logits, targets)
        return logits, loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        return 6 * self.token_embedding_table.weight.shape[1]


def build_model(config):
    """The network a GPTConfig describes."""
    return BigramLanguageModel(config) if config.model_type == "bigram" else GPT(config)
