"""The lecture's small facts, as worked examples: read them top to bottom beside the video.

1. "The mathematical trick in self-attention": four ways for each position to take the mean
   of the positions up to it, and self-attention, the same machinery with learned weights.
2. Why attention's affinities are scaled by head_size**-0.5.
3. Why that matters: softmax of large logits tends to one-hot.
4. The loss at initialisation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, BigramLanguageModel, GPTConfig, Head

B, T, C = 4, 8, 2  # batch, time, channels: the lecture's toy sizes


@pytest.fixture
def x():
    torch.manual_seed(1337)
    return torch.randn(B, T, C)


# 1. the mathematical trick ----------------------------------------------------------------


def running_mean_loop(x):
    """Version 1: for every t, the mean of x[b, 0..t], with two for-loops ("bag of words")."""
    xbow = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xprev = x[b, : t + 1]  # (t+1, C)
            xbow[b, t] = torch.mean(xprev, 0)
    return xbow


def test_version_2_a_normalised_lower_triangular_matrix_product_is_the_running_mean(x):
    wei = torch.tril(torch.ones(T, T))
    wei = wei / wei.sum(1, keepdim=True)  # row t: 1/(t+1) on positions 0..t, 0 after
    xbow2 = wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)
    torch.testing.assert_close(xbow2, running_mean_loop(x))


def test_version_3_softmax_over_a_minus_infinity_mask_gives_the_same_weights(x):
    tril = torch.tril(torch.ones(T, T))
    wei = torch.zeros((T, T))  # affinities: all equal for now
    wei = wei.masked_fill(tril == 0, float("-inf"))  # the future may not talk to the past
    wei = F.softmax(wei, dim=-1)  # exp(-inf) = 0, the rest share the row evenly
    averaging = tril / tril.sum(1, keepdim=True)
    torch.testing.assert_close(wei, averaging)
    torch.testing.assert_close(wei @ x, running_mean_loop(x))


def test_version_4_self_attention_is_a_data_dependent_weighted_mean_of_the_past():
    torch.manual_seed(1337)
    B, T, C, head_size = 4, 8, 32, 16
    x = torch.randn(B, T, C)
    head = Head(C, head_size, block_size=T)
    wei = head.attention(x)  # (B, T, T): softmax(q k^T / sqrt(hs)) under the tril mask
    # still a weighted mean of the past: every row sums to 1, nothing above the diagonal ...
    torch.testing.assert_close(wei.sum(-1), torch.ones(B, T))
    assert (wei.triu(diagonal=1) == 0).all()
    # ... but no longer uniform (version 3), and different for each sequence of the batch
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert not torch.allclose(wei[0], uniform, atol=1e-2)
    assert not torch.allclose(wei[0], wei[1], atol=1e-2)
    # the output is that mean over the values v, and position t never sees the future
    torch.testing.assert_close(head(x), wei @ head.value(x))
    changed = x.clone()
    changed[:, 5:] = torch.randn(B, T - 5, C)
    torch.testing.assert_close(head(changed)[:, :5], head(x)[:, :5])
    assert not torch.allclose(head(changed)[:, 5:], head(x)[:, 5:])


# 2. scaled attention -----------------------------------------------------------------------


@pytest.mark.parametrize("head_size", [16, 64, 256])
def test_without_the_scale_the_variance_of_q_dot_k_grows_with_head_size(head_size):
    torch.manual_seed(0)
    k = torch.randn(B, 64, head_size)  # unit-variance keys and queries, as at initialisation
    q = torch.randn(B, 64, head_size)
    unscaled = q @ k.transpose(-2, -1)  # (B, T, T): a sum of head_size unit-variance products
    scaled = unscaled * head_size**-0.5
    assert unscaled.var().item() == pytest.approx(head_size, rel=0.15)
    assert scaled.var().item() == pytest.approx(1.0, rel=0.15)


# 3. softmax sharpens -----------------------------------------------------------------------


def test_softmax_of_scaled_up_logits_tends_to_one_hot():
    logits = torch.tensor([0.1, -0.2, 0.3, -0.2, 0.5])
    diffuse = F.softmax(logits, dim=-1)
    assert diffuse.max() < 0.3  # every position gets a say
    peaks = [F.softmax(logits * scale, dim=-1).max().item() for scale in (1, 8, 32, 100)]
    assert peaks == sorted(peaks)  # the larger the logits, the more the biggest one takes
    assert peaks[-1] > 0.999  # ... until one position takes everything
    assert F.softmax(logits * 100, dim=-1).argmax() == logits.argmax()


# 4. the loss at initialisation -------------------------------------------------------------


def test_a_zero_initialised_lm_head_starts_at_ln_vocab_size():
    # a uniform guess among 65 characters costs -ln(1/65) = ln(65) = 4.17 nats per character
    config = GPTConfig(block_size=8, vocab_size=65, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    idx = torch.randint(0, 65, (4, 8))
    _, loss = GPT(config)(idx, idx)
    assert loss.item() == pytest.approx(math.log(65), abs=1e-5)  # float32 rounding
    _, loss = BigramLanguageModel(GPTConfig(model_type="bigram", block_size=8, vocab_size=65))(idx, idx)
    assert loss.item() == pytest.approx(math.log(65), abs=1e-5)  # float32 rounding


def test_pytorchs_default_initialisation_starts_higher_as_in_the_lecture():
    # the lecture's bigram starts at 4.87: random N(0, 1) logits are confidently wrong
    config = GPTConfig(model_type="bigram", block_size=8, vocab_size=65, init="pytorch")
    torch.manual_seed(0)
    idx = torch.randint(0, 65, (32, 8))
    _, loss = BigramLanguageModel(config)(idx, idx)
    assert 4.6 < loss.item() < 5.2
