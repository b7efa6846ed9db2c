"""chargpt/lens.py: the logit lens and head ablation, checked against answers known in advance."""

import threading

import numpy as np
import pytest
import torch

from chargpt.evaluate import evaluate
from chargpt.lens import analyse, check_heads_off, lens_table, logit_lens, rank_heads, residual_stream, val_slice
from chargpt.tokenizer import CharTokenizer
from model import GPT, GPTConfig

CHARS = "\n :ABCDEFGHIKLMNOR"


def tiny(**overrides):
    """A random 2-layer model with every weight non-zero (lm_head included), in eval mode."""
    config = GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def ids_of(text):
    return CharTokenizer(CHARS).encode(text)


VARIANTS = {
    "lecture": {},
    "no biases": {"bias": False},
    "speed records": {"position": "rotary", "qk_norm": True, "activation": "relu2"},
    "no LayerNorm": {"layer_norm": False},
    "no projections": {"proj": False, "ffwd_mult": 1},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_lens_at_the_last_layer_is_the_models_own_distribution(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.tensor([ids_of("ROMEO:\nA KING OR")])  # (1, T)
    probs, loss = logit_lens(model, idx)
    assert probs.shape == (3, idx.shape[1], len(CHARS))
    logits = model(idx)[0]  # (1, T, V)
    assert torch.equal(probs[-1], torch.softmax(logits[0], dim=-1))  # bit for bit
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits[0, :-1], idx[0, 1:], reduction="none"))
    # the rows below differ: each Block changes the guess
    assert not torch.allclose(probs[0], probs[-1], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_head_off_changes_nothing_bit_for_bit(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.tensor([ids_of("ROMEO:\nA KING OR"), ids_of("KING:\nA ROMEO AN")])  # (2, T)
    streams = residual_stream(model, idx, heads_off=[])
    x = model._embed(idx)
    assert torch.equal(streams[0], x)
    for block, after in zip(model.blocks, streams[1:]):
        ones = torch.ones(model.config.n_head)  # every head on, explicitly
        assert torch.equal(block(x, ones), block(x)) and torch.equal(block(x), after)
        x = after
    assert torch.equal(model.lm_head(model.ln_f(streams[-1])), model(idx)[0])
    answer = analyse(model, CharTokenizer(CHARS), ids_of("ROMEO:\nA KING OR"), heads_off=[])
    assert answer["loss"] == answer["loss_intact"] and answer["heads_off"] == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_head_of_a_layer_off_is_the_block_without_its_attention_branch(variant):
    """With every head off, the attention branch adds only the projection's bias (a constant
    vector; nothing at all without biases or projections), so the Block is x + bias, then its
    FeedForward on that."""
    model = tiny(**VARIANTS[variant])
    x = torch.randn(2, 12, 32)
    for block in model.blocks:
        got = block(x, torch.zeros(model.config.n_head))
        bias = block.sa.proj.bias if block.sa.proj is not None and block.sa.proj.bias is not None else None
        a = torch.zeros_like(x) if bias is None else bias.expand_as(x)  # the branch: nothing, or the bias alone
        expected = x + a if block.residual else a
        if block.ffwd is not None:
            f = block.ffwd(block.ln2(expected))
            expected = expected + f if block.residual else f
        assert torch.equal(got, expected)
    # and through the whole model: layer 1's heads all off
    idx = torch.tensor([ids_of("ROMEO:\nA KING OR")])
    streams = residual_stream(model, idx, heads_off=[(1, h) for h in range(4)])
    assert torch.equal(streams[1], residual_stream(model, idx)[1])  # the layer below does not change
    assert not torch.equal(streams[2], residual_stream(model, idx)[2])


def test_a_head_off_is_the_lectures_heads_with_that_one_silenced():
    """Switching off head h in the fused path is the lecture's torch.cat([h(x) for h in heads])
    with head h's output zeroed, then the projection."""
    model = tiny()
    sa, x = model.blocks[0].sa, torch.randn(2, 12, 32)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    outs = [head(x) for head in sa.heads()]  # (B, T, hs) each
    outs[1] = torch.zeros_like(outs[1])
    torch.testing.assert_close(sa(x, mask), sa.proj(torch.cat(outs, dim=-1)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sa(x, mask), sa(x), atol=1e-4)


@pytest.mark.parametrize("length", [17, 16, 9, 2])  # block_size + 1: the model reads 16, the 17th is a target
def test_the_per_character_losses_average_to_evals_loss_on_the_same_text(length):
    model = tiny()
    ids = ids_of("ROMEO:\nA KING OR AN")[:length]
    answer = analyse(model, CharTokenizer(CHARS), ids)
    assert len(answer["loss"]) == length - 1 and answer["chars"] == list("ROMEO:\nA KING OR AN"[:length])
    loss, n, _ = evaluate(model, np.array(ids, dtype=np.uint16), model.config.block_size, batch_size=4)
    assert n == length - 1
    assert sum(answer["loss"]) / len(answer["loss"]) == pytest.approx(loss, abs=1e-4)  # the rounding to 4 decimals
    assert answer["mean_loss"] == pytest.approx(loss, abs=1e-4)


def test_the_answer_names_each_layer_and_the_real_next_character():
    model, tokenizer = tiny(), CharTokenizer(CHARS)
    ids = ids_of("KING:\nA ROMEO")
    answer = analyse(model, tokenizer, ids)
    assert answer["layers"] == ["embeddings", "Block 0", "Block 1"] and answer["through"] == "ln_f and lm_head"
    probs = torch.softmax(model(torch.tensor([ids]))[0][0], dim=-1)  # (T, V)
    for t, rows in enumerate(answer["lens"]):
        assert len(rows) == 3 and all(len(row["top5"]) == 5 for row in rows)
        last = rows[-1]
        assert last["top5"][0]["char"] == CHARS[probs[t].argmax()]
        if t + 1 < len(ids):
            assert last["next"] == pytest.approx(probs[t, ids[t + 1]].item(), abs=1e-4)
            assert last["next"] == pytest.approx(np.exp(-answer["loss"][t]), abs=2e-4)
        else:
            assert last["next"] is None  # the character after the text is not known
    assert "lm_head alone" in analyse(tiny(layer_norm=False), tokenizer, ids)["through"]


def test_switching_heads_off_changes_the_loss_and_says_which():
    model, tokenizer = tiny(), CharTokenizer(CHARS)
    ids = ids_of("ROMEO:\nA KING OR")
    answer = analyse(model, tokenizer, ids, heads_off=[[0, 1], (0, 1), [1, 3]])
    assert answer["heads_off"] == [[0, 1], [1, 3]]
    assert answer["loss"] != answer["loss_intact"] and answer["loss_intact"] == analyse(model, tokenizer, ids)["loss"]


@pytest.mark.parametrize(
    "heads_off, message",
    [
        ([[2, 0]], "layer 2 is not one of the model's 2 (0..1)"),
        ([[0, 4]], "head 4 is not one of a layer's 4 (0..3)"),
        ([[0, -1]], "head -1"),
        ([[0]], "expected [layer, head] pairs of integers"),
        ([[0, True]], "expected [layer, head] pairs"),
        ([[0, 1.0]], "expected [layer, head] pairs"),
        (["01"], "expected [layer, head] pairs"),
    ],
)
def test_a_head_that_is_not_there_is_an_error_that_names_it(heads_off, message):
    with pytest.raises(ValueError) as e:
        check_heads_off(tiny().config, heads_off)
    assert message in str(e.value)


def test_the_model_is_never_changed_and_requests_at_once_do_not_mix():
    """Threads each with their own heads off get what they would alone: the ablation travels
    with the call, not in the model."""
    model, tokenizer = tiny(), CharTokenizer(CHARS)
    ids = ids_of("ROMEO:\nA KING OR")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choices = [[], [[0, 0]], [[1, 2], [0, 3]], [[1, h] for h in range(4)]]
    alone = [analyse(model, tokenizer, ids, h)["lens"] for h in choices]
    results = {}

    def work(k):
        for _ in range(5):
            results.setdefault(k, []).append(analyse(model, tokenizer, ids, choices[k % 4])["lens"])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got == alone[k % 4] for k, runs in results.items() for got in runs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rank_heads_is_each_head_switched_off_in_the_whole_forward():
    model = tiny()
    data = np.array(ids_of("ROMEO:\nA KING OR AN EARL\nKING:\nA ROMEO AN OLD ERR") * 3, dtype=np.uint16)
    x, y = val_slice(data, model.config.block_size, batch_size=4)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(val_slice(data, 16, 4)[0], x)  # the same slice every time
    ranked = rank_heads(model, x, y)
    assert ranked["passes"] == 9 and len(ranked["heads"]) == 8 and ranked["batch"] == [4, 16]
    rises = [h["rise"] for h in ranked["heads"]]
    assert rises == sorted(rises, reverse=True)

    def loss(heads_off):
        logits = model.lm_head(model.ln_f(residual_stream(model, x, heads_off)[-1]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    assert ranked["loss"] == pytest.approx(loss([]), abs=1e-6)
    for h in ranked["heads"]:
        assert h["loss"] == pytest.approx(loss([(h["layer"], h["head"])]), abs=1e-5)
        assert h["rise"] == pytest.approx(h["loss"] - ranked["loss"], abs=1e-9)


def test_the_terminal_table_has_a_row_per_layer():
    model, tokenizer = tiny(), CharTokenizer(CHARS)
    lines = lens_table(model, tokenizer, ids_of("ROMEO:"))
    assert "after 'ROMEO:'" in lines[0] and "ln_f and lm_head" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["embeddings", "Block", "Block"]
    probs = logit_lens(model, torch.tensor([ids_of("ROMEO:")]))[0][:, -1]  # (3, V)
    for line, p in zip(lines[2:], probs):
        assert f"{p.max().item() * 100:5.1f}%" in line
    # a position inside the text: the real next character's probability too
    lines = lens_table(model, tokenizer, ids_of("ROMEO:"), t=2)
    assert "'E', the real next" in lines[1]


def test_the_val_split_is_the_checkpoints_own_or_an_error_naming_the_file(data_dir):
    from chargpt.data import read_vocabulary
    from chargpt.lens import val_split

    where = {"data_dir": data_dir, "dataset": "tiny"}
    vocab = read_vocabulary(f"{data_dir}/tiny/meta.json", "").chars
    data, path = val_split(where, vocab)
    assert path.endswith("tiny/val.bin") and len(data) > 16
    with pytest.raises(ValueError, match="meta.json is not the checkpoint's"):
        val_split(where, vocab[:-1])
    with pytest.raises(FileNotFoundError, match="other/val.bin not found"):
        val_split({**where, "dataset": "other"}, vocab)
