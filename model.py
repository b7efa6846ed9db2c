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
and, after them, the few pieces beyond the lecture that the options below need (Rotary,
SquaredReLU, and a Dropout that is cheaper on the CPU).

The lecture reaches this Block in steps, and GPTConfig can take each one back: no
FeedForward or a narrow one (ffwd_mult), no projections back into the stream (proj), no
residual connections (residual), no LayerNorm (layer_norm). The defaults are the finished
model; config/lecture/ holds one config per step, and ladder.py trains them all. Options
from recent speed records of small GPTs (activation, position, qk_norm, bias, zero_proj)
are off by default too; the README says which recipe uses which.

Weights: every Linear and Embedding starts at N(0, 0.02); the two projections that write
into the residual stream are scaled down by 1/sqrt(2 * n_layer) so the stream does not
grow with depth; lm_head starts at zero so that the loss at init is exactly ln(vocab_size)
(the lecture's model starts at 4.87 instead of ln(65) = 4.17). With zero_proj those two
projections start at zero instead: every Block starts as the identity, and its branches
grow from nothing as the projections learn. init='pytorch' keeps PyTorch's own initial
weights instead, as the video did (the small stages learn much faster that way). The
token embedding and lm_head are NOT tied, as in the lecture.

generate is the lecture's: the whole context again for every new character. The fast
generation that sample.py and serve.py use (a KV cache, temperature, top-k, top-p) is
chargpt/engine.py, built from these modules. This file only defines the network: no I/O,
no argument parsing, no cache.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def knob(default, help, derived=False):
    """A config field with its meaning, which train.py --help shows (derived: set from the data, not a flag)."""
    return field(default=default, metadata={"help": help, "derived": derived})


@dataclass
class GPTConfig:
    model_type: str = knob("gpt", "'gpt' (the lecture's transformer) or 'bigram' (the baseline)")
    block_size: int = knob(256, "context length: the most characters the model sees at once")
    vocab_size: int = knob(65, "number of distinct characters (taken from the data)", derived=True)
    n_layer: int = knob(6, "number of transformer Blocks")
    n_head: int = knob(6, "attention heads per Block (n_embd must divide by it)")
    n_embd: int = knob(384, "width of the residual stream")
    dropout: float = knob(0.2, "dropout on the residual branches while training")
    attn_dropout: float = knob(0.0, "dropout on the attention weights while training (the lecture: same as dropout)")
    # The lecture builds the Block one idea at a time; these switches take its steps back
    # (config/lecture/ walks them). The defaults are the finished model.
    ffwd_mult: int = knob(4, "FeedForward's hidden width as a multiple of n_embd (0: no FeedForward)")
    residual: bool = knob(True, "add each branch of a Block back to x (False: its output replaces x)")
    proj: bool = knob(True, "a projection back to n_embd after the attention heads and at the end of FeedForward")
    layer_norm: bool = knob(True, "LayerNorm before each branch of a Block and before lm_head (pre-norm)")
    init: str = knob("normal", "'normal': N(0, 0.02), lm_head zero (GPT._init_weights); 'pytorch': PyTorch's own, as the video")
    # Options from recent speed records, beyond the lecture; off by default (README: which recipe uses what).
    activation: str = knob("relu", "FeedForward's nonlinearity: 'relu' (the lecture) or 'relu2' (squared ReLU)")
    position: str = knob("learned", "'learned': a position table (the lecture); 'rotary': q and k rotated by position (RoPE)")
    qk_norm: bool = knob(False, "scale each head's queries and keys to unit RMS before their dot product")
    bias: bool = knob(True, "a bias in the Linear layers and LayerNorms (False: none, as in recent GPTs)")
    zero_proj: bool = knob(False, "the projections into the residual stream start at zero: each Block starts as the identity")

    def validate(self):
        """Raise ValueError naming the flag for a config that cannot build a model."""
        if self.model_type not in ("gpt", "bigram"):
            raise ValueError(f"--model_type must be 'gpt' or 'bigram', got {self.model_type!r}")
        for key, allowed in (
            ("init", ("normal", "pytorch")),
            ("activation", ("relu", "relu2")),
            ("position", ("learned", "rotary")),
        ):
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
        if self.zero_proj and self.init != "normal":
            raise ValueError(f"--zero_proj=True sets initial weights: not with --init={self.init}, which keeps PyTorch's own")
        if self.zero_proj and not self.proj:
            raise ValueError("--zero_proj=True zeroes the projections into the residual stream: there are none with --proj=False")
        if not self.proj and self.ffwd_mult > 1:
            raise ValueError(
                f"--ffwd_mult={self.ffwd_mult} needs --proj=True: without the projection back, "
                "FeedForward's hidden layer is its output and must be n_embd wide (--ffwd_mult=1)"
            )


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


class MultiHeadAttention(nn.Module):
    """The lecture's MultiHeadAttention: the same function as its
    nn.ModuleList([Head(head_size) for _ in range(n_head)]) with the heads' outputs
    concatenated (then projected), computed for all heads at once. heads() gives those Head
    modules with this layer's weights, and test_multihead_attention_is_the_lectures_heads in
    tests/test_model.py proves the two agree (the lecture's attention: no qk_norm or rotary
    positions, which Head does not have).

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

    def forward(self, x, head_mask=None):
        B, T, C = x.shape
        q, k, v = self.qkv_by_head(x)  # (B, nh, T, hs) each
        # the lecture's masked softmax(q·kᵀ / sqrt(hs)) · v for every head, in one fused kernel
        dropout_p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        return self.merge_heads(out, head_mask)  # (B, T, C)

    def merge_heads(self, out, head_mask=None):
        """The heads' outputs (B, nh, T, hs) side by side again, projected back into the
        residual stream: (B, T, C).

        head_mask (nh,), for looking inside a trained model (chargpt/lens.py): head h's output
        is multiplied by head_mask[h] before the projection, so 0 switches the head off. None,
        the default, touches nothing."""
        B, nh, T, hs = out.shape
        if head_mask is not None:
            out = out * head_mask.to(out.dtype).view(1, nh, 1, 1)  # (B, nh, T, hs)
        out = out.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, C)
        if self.proj is not None:
            out = self.proj(out)  # (B, T, C)
        return self.dropout(out)

    def qkv_by_head(self, x, start=0):
        """The queries, keys and values of every head for x (B, T, C) at positions
        start..start+T-1, (B, nh, T, hs) each; the queries and keys in the form attention
        compares them (compare_form)."""
        B, T, C = x.shape
        nh = self.n_head
        qkv = self.qkv(x).view(B, T, 3 * nh, self.head_size).transpose(1, 2)  # (B, 3nh, T, hs): 3 x nh heads
        q, k = self.compare_form(qkv[:, : 2 * nh], start).split(nh, dim=1)  # (B, nh, T, hs) each
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

    def projection(self):
        """The Linear that writes back into the residual stream, or None (proj=False)."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        return linears[-1] if len(linears) == 2 else None


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

    def forward(self, x, head_mask=None):
        a = self.sa(self.ln1(x), head_mask)  # (B, T, C): communication (head_mask: MultiHeadAttention.merge_heads)
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
        return [self.sa.proj] + ([self.ffwd.projection()] if self.ffwd is not None else [])


class LanguageModel(nn.Module):
    """What GPT and BigramLanguageModel share: the loss, and the lecture's generate."""

    def _loss(self, logits, targets):
        B, T, V = logits.shape
        return F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))

    def _check_length(self, T):
        if T > self.config.block_size:
            raise ValueError(f"input has {T} tokens, longer than block_size {self.config.block_size}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, generator=None):
        """The lecture's generate: idx (B, T) continued by max_new_tokens tokens drawn from the
        model's distribution, (B, T + max_new_tokens). Every new token runs the whole context
        again, cropped to the last block_size tokens. chargpt/engine.py generates the same text
        faster (a KV cache), with temperature, top-k and top-p, one token at a time."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, T): what the positions can hold
            logits, _ = self(idx_cond)  # (B, T, vocab_size)
            logits = logits[:, -1, :]  # (B, vocab_size): the prediction after the last token
            probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
            # drawn on the CPU, as chargpt/engine.py draws: MPS's multinomial has drawn wrong samples (pytorch#92752)
            idx_next = torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(idx.device)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        return idx


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
                # std 0 for zero_proj: it still draws, so every other weight is as without it
                std = 0.0 if self.config.zero_proj else 0.02 / math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(residual_proj.weight, mean=0.0, std=std)
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
        matmul_params = (
            self.num_params() - self.token_embedding_table.weight.numel() - (0 if table is None else table.weight.numel())
        )
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


# -----------------------------------------------------------------------------
# beyond the lecture: the pieces the options need


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
