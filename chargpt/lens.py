"""Why this character: the prediction layer by layer, and what each head does.

Two ways of looking inside a trained GPT (sample.py --lens prints the first, serve.py's
playground shows both):

    the logit lens   the residual stream x after the embeddings and after each Block, read
                     as if it were the last: ln_f, then lm_head, then softmax. The last row
                     is the model's own prediction; the rows below it show how the guess
                     forms on the way up. A model without a final LayerNorm (the lecture's
                     stages with layer_norm=False: ln_f is an Identity) is read through
                     lm_head alone.
    ablation         a head switched off: its output is zeroed before the projection
                     (MultiHeadAttention.merge_heads' head_mask), and the loss says what the
                     model loses without it. rank_heads does that for every head on a fixed
                     slice of the val split, one batch per head.

Nothing here changes the model: which heads are off travels with the call (heads_off, a
set of (layer, head) pairs), so one served model can answer many requests at once, each
with its own heads off. The model must be in eval mode (no dropout), as a loaded
checkpoint is.
"""

import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from chargpt.data import read_vocabulary

TOP = 5  # next characters shown per layer
HEADS_BATCH = 32  # windows of block_size in rank_heads' slice of the val split


def check_heads_off(config, heads_off):
    """heads_off as a sorted list of distinct (layer, head) pairs; a pair that is not two
    integers, or names no head of this model, is a ValueError that says which."""
    pairs = set()
    for pair in heads_off:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(type(n) is not int for n in pair):
            raise ValueError(f"expected [layer, head] pairs of integers, got {str(pair)[:40]}")
        layer, head = pair
        if not 0 <= layer < config.n_layer:
            raise ValueError(
                f"[{layer}, {head}]: layer {layer} is not one of the model's {config.n_layer} (0..{config.n_layer - 1})"
            )
        if not 0 <= head < config.n_head:
            raise ValueError(f"[{layer}, {head}]: head {head} is not one of a layer's {config.n_head} (0..{config.n_head - 1})")
        pairs.add((layer, head))
    return sorted(pairs)


def head_masks(config, heads_off, device=None):
    """One (n_head,) mask of ones and zeros per layer for the pairs in heads_off, or None for
    a layer whose heads are all on: that layer then runs exactly as it does without a mask."""
    masks = [None] * config.n_layer
    for layer, head in check_heads_off(config, heads_off):
        if masks[layer] is None:
            masks[layer] = torch.ones(config.n_head, device=device)
        masks[layer][head] = 0.0
    return masks


def run_blocks(model, x, masks, start=0):
    """x (B, T, C) entering Block start, through it and the Blocks above: the residual
    stream after each, a list of (B, T, C)."""
    streams = []
    for block, mask in zip(model.blocks[start:], masks[start:]):
        x = block(x, mask)  # (B, T, C)
        streams.append(x)
    return streams


@torch.no_grad()
def residual_stream(model, idx, heads_off=()):
    """The residual stream of idx (B, T) after the embeddings and after each Block:
    n_layer + 1 tensors (B, T, C), with the heads in heads_off switched off."""
    assert not model.training, "looking inside runs the model in eval mode (no dropout)"
    model._check_length(idx.shape[1])
    x = model._embed(idx)  # (B, T, C)
    return [x] + run_blocks(model, x, head_masks(model.config, heads_off, idx.device))


def read_out(model, x):
    """The next-character logits (B, T, vocab_size) of a residual stream x (B, T, C), read as
    GPT.forward reads the last one: the final LayerNorm (an Identity without one), lm_head."""
    return model.lm_head(model.ln_f(x))  # (B, T, vocab_size)


def through(model):
    """What the lens reads each layer through, in words."""
    if isinstance(model.ln_f, nn.LayerNorm):
        return "ln_f and lm_head"
    return "lm_head alone: this model has no final LayerNorm (layer_norm=False)"


@torch.no_grad()
def logit_lens(model, idx, heads_off=(), targets=None):
    """(probs, loss) of one sequence idx (1, T): probs (n_layer + 1, T, vocab_size), the
    next-character distribution read from the residual stream after the embeddings and
    after each Block; loss (n,), the cross-entropy of targets (1, n), n <= T, the real next
    characters of the first n positions, from the last row. Without targets they are
    idx's own: every position's but the last, whose next character is not in idx."""
    streams = residual_stream(model, idx, heads_off)
    # one read-out per layer, each on a (1, T, C) as GPT.forward's: the last row is then the
    # model's own distribution bit for bit
    logits = torch.cat([read_out(model, x) for x in streams]).float()  # (n_layer + 1, T, V)
    targets = idx[0, 1:] if targets is None else targets[0]  # (n,)
    loss = F.cross_entropy(logits[-1, : len(targets)], targets, reduction="none")  # (n,)
    return F.softmax(logits, dim=-1), loss


def layer_names(n_layer):
    return ["embeddings"] + [f"Block {i}" for i in range(n_layer)]


def lens_rows(probs, chars, next_ids):
    """The lens at each position as rows, one per layer: {"top5": [{"char", "prob"} x 5],
    "next": the probability of the real next character}, from probs (n_layer + 1, T, V) and
    next_ids, T ids or None where the next character is not known. Rounded to 4 decimals.
    The arithmetic in one call each, not per position: the answer's Python objects are
    most of what a long window costs."""
    top = torch.topk(probs, min(TOP, probs.shape[-1]), dim=-1)  # (n_layer + 1, T, 5) values and indices
    known = torch.tensor([0 if i is None else i for i in next_ids], device=probs.device)  # (T,)
    nexts = probs.gather(-1, known.expand(probs.shape[0], -1)[..., None])[..., 0]  # (n_layer + 1, T)
    values, indices, nexts = top.values.tolist(), top.indices.tolist(), nexts.tolist()
    return [
        [
            {
                "top5": [{"char": chars[i], "prob": round(p, 4)} for p, i in zip(values[layer][t], indices[layer][t])],
                "next": None if next_ids[t] is None else round(nexts[layer][t], 4),
            }
            for layer in range(len(values))
        ]
        for t in range(len(next_ids))
    ]


@torch.no_grad()
def analyse(model, tokenizer, ids, heads_off=()):
    """The lens at every position of ids and its per-character loss, with the heads in
    heads_off switched off and, for comparison, with every head on: a plain dict (JSON for
    serve.py's /api/lens). ids holds at most block_size + 1 tokens, as a window of
    chargpt/evaluate.py does: the model reads the first block_size, and the last is only
    the next character of the one before it."""
    heads_off = check_heads_off(model.config, heads_off)
    assert len(ids) <= model.config.block_size + 1, "a window holds block_size + 1 tokens at most"
    device = model.lm_head.weight.device
    T = min(len(ids), model.config.block_size)  # positions the model reads
    idx = torch.tensor([ids[:T]], dtype=torch.long, device=device)  # (1, T)
    targets = torch.tensor([ids[1:]], dtype=torch.long, device=device)  # (1, len(ids) - 1): T - 1 or T
    t0 = time.perf_counter()
    probs, loss = logit_lens(model, idx, heads_off, targets)  # (n_layer + 1, T, V), (len(ids) - 1,)
    loss_intact = logit_lens(model, idx, targets=targets)[1] if heads_off else loss
    seconds = time.perf_counter() - t0
    chars = tokenizer.chars
    return {
        "chars": list(tokenizer.decode(ids)),
        "layers": layer_names(model.config.n_layer),
        "through": through(model),
        "heads_off": [list(pair) for pair in heads_off],
        "lens": lens_rows(probs, chars, [ids[t + 1] if t + 1 < len(ids) else None for t in range(T)]),
        "loss": [round(v, 4) for v in loss.tolist()],
        "loss_intact": [round(v, 4) for v in loss_intact.tolist()],
        "mean_loss": round(loss.mean().item(), 4) if len(ids) > 1 else None,
        "mean_loss_intact": round(loss_intact.mean().item(), 4) if len(ids) > 1 else None,
        "seconds": round(seconds, 4),
    }


def lens_table(model, tokenizer, ids, t=None):
    """The lens at position t of ids (default: the last) as lines of text for a terminal:
    one row per layer, the five likeliest next characters, and the real next character's
    probability where ids holds it. The model reads the block_size characters that end at t."""
    t = len(ids) - 1 if t is None else t
    window = ids[max(0, t + 1 - model.config.block_size) : t + 1]
    idx = torch.tensor([window], dtype=torch.long, device=model.lm_head.weight.device)  # (1, T)
    probs, _ = logit_lens(model, idx)
    next_id = ids[t + 1] if t + 1 < len(ids) else None
    rows = lens_rows(probs[:, -1:], tokenizer.chars, [next_id])[0]
    shown = lambda ch: {"\n": "\\n", " ": "␣", "\t": "\\t"}.get(ch, ch)  # noqa: E731
    text = tokenizer.decode(ids[: t + 1])
    context = ("..." if len(text) > 24 else "") + "".join(map(shown, text[-24:]))
    lines = [f"the next character after '{context}' (position {t}), read after each layer through {through(model)}:"]
    head = f"{'':>12}  " + "  ".join(f"{'top ' + str(k + 1):<9}" for k in range(len(rows[0]["top5"])))
    if next_id is not None:
        head += f"  p('{shown(tokenizer.chars[next_id])}', the real next)"
    lines.append(head)
    for name, row in zip(layer_names(model.config.n_layer), rows):
        cells = "  ".join(f"{shown(g['char']):<2} {g['prob'] * 100:5.1f}%" for g in row["top5"])
        lines.append(f"{name:>12}  {cells}" + ("" if row["next"] is None else f"  {row['next'] * 100:5.1f}%"))
    return [line.rstrip() for line in lines]


# -----------------------------------------------------------------------------
# every head, ranked by what the loss loses without it


def val_slice(data, block_size, batch_size=HEADS_BATCH):
    """(x, y), (B, T) each: batch_size windows of block_size spread evenly over the token
    array data, the first at its start: the same slice every time."""
    T = min(block_size, len(data) - 1)
    if T < 1:
        raise ValueError(f"the split has {len(data)} token(s): nothing to predict")
    starts = np.linspace(0, len(data) - 1 - T, batch_size).round().astype(np.int64)
    windows = np.stack([np.asarray(data[s : s + T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]


def val_split(train_config, vocab):
    """(the val token array, its path) of the dataset a checkpoint was trained on, from its
    train_config: a FileNotFoundError or ValueError that names the file where it is missing,
    damaged, or of another vocabulary than the checkpoint's."""
    folder = os.path.join(train_config.get("data_dir", "data"), train_config.get("dataset", ""))
    path, meta = os.path.join(folder, "val.bin"), os.path.join(folder, "meta.json")
    for name in (path, meta):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name} not found (the dataset the checkpoint was trained on: prepare.py makes it)")
    if read_vocabulary(meta, "prepare it again").chars != vocab:
        raise ValueError(f"the vocabulary of {meta} is not the checkpoint's")
    if os.path.getsize(path) % 2 or os.path.getsize(path) < 4:
        raise ValueError(f"{path} is not a file of uint16 tokens with at least two in it")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if int(data.max()) >= len(vocab):
        raise ValueError(f"{path} holds token id {int(data.max())}, outside the checkpoint's {len(vocab)} characters")
    return data, path


@torch.no_grad()
def rank_heads(model, x, y):
    """Every head switched off in turn, on the batch x, y (B, T): a dict with the loss with
    every head on, and "heads", [{"layer", "head", "loss", "rise"}] with the head that
    costs the most first, and the seconds it took.

    The Blocks below a head do not change when it is switched off, so each head's pass
    starts from the stream entering its own Block."""
    t0 = time.perf_counter()
    device = model.lm_head.weight.device
    x, y = x.to(device), y.to(device)
    streams = residual_stream(model, x)  # n_layer + 1 of (B, T, C)

    def loss_of(top):
        logits = read_out(model, top).float()  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    base = loss_of(streams[-1])
    heads = []
    for layer in range(model.config.n_layer):
        for head in range(model.config.n_head):
            masks = head_masks(model.config, [(layer, head)], device)
            loss = loss_of(run_blocks(model, streams[layer], masks, start=layer)[-1])
            heads.append({"layer": layer, "head": head, "loss": loss, "rise": loss - base})
    heads.sort(key=lambda h: -h["rise"] if math.isfinite(h["rise"]) else math.inf)  # a NaN last
    return {
        "loss": base,
        "heads": heads,
        "batch": list(x.shape),
        "passes": len(heads) + 1,
        "seconds": time.perf_counter() - t0,
    }
