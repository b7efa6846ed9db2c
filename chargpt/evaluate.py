"""The loss of a model over a whole split: every character, once. eval.py prints it,
ladder.py scores each stage with it.

train.py's estimate_loss is a quick estimate from eval_iters random batches; this is the
full figure. The split is cut into non-overlapping windows of block_size tokens, the last
one shorter if the split does not divide evenly, and each window predicts every one of its
positions: all len(split) - 1 next characters are scored exactly once. The price of not
overlapping: the first position of each window sees one character of context, the second
two, and so on, so the figure is a little worse than a model with a sliding full-length
context would get. Eval mode (no dropout), float32, a fixed order: the same checkpoint
gives the same number every time.

With a decode_dtype the same windows are scored through generation's path instead
(chargpt/engine.py): the first character prefilled into a KV cache, then the Decoder one
position at a time with its weights in that dtype; it measures what a narrower decode
costs in quality.
"""

import numpy as np
import torch
import torch.nn.functional as F

from chargpt.engine import Decoder, KVCache, prefill
from model import GPT


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
        logits = [prefill(model, x[:, :1], cache)]  # (B, V) each
        logits += [decoder(x[:, t : t + 1], cache) for t in range(1, T)]
        return _cross_entropy_sum(torch.stack(logits, dim=1), y)  # (B, T, V)

    return score
