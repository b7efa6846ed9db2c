"""eval.py: the loss over a whole split, window by window, the same every time; bad input is one line."""

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_py
import train
from chargpt.checkpoint import load_checkpoint
from chargpt.evaluate import evaluate
from conftest import tiny_configs
from prepare import prepare


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("eval")
    prepare(text, str(root / "data" / "tiny"))
    train.train(
        *tiny_configs(str(root / "data"), root / "out", max_iters=20, sample_chars=0, eval_sample_chars=0), log=lambda m: None
    )
    return root


def run_eval(capsys, *flags):
    code = eval_py.main(list(flags))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_eval_is_deterministic_and_covers_the_split(trained, capsys):
    flags = [f"--out_dir={trained / 'out'}", f"--data_dir={trained / 'data'}", "--device=cpu"]
    code, out, err = run_eval(capsys, *flags)
    assert code == 0, err
    assert run_eval(capsys, *flags)[1] == out
    val = np.memmap(trained / "data" / "tiny" / "val.bin", dtype=np.uint16, mode="r")
    assert f"{len(val) - 1:,} predictions in {math.ceil((len(val) - 1) / 16):,} windows" in out
    loss, bits = map(float, re.search(r"val loss (\S+), (\S+) bits per character", out).groups())
    assert bits == pytest.approx(loss / math.log(2), abs=2e-4)
    # the dataset and data_dir default to the ones the checkpoint was trained with
    assert run_eval(capsys, f"--out_dir={trained / 'out'}", "--device=cpu")[1] == out
    code, out_train, _ = run_eval(capsys, *flags, "--split=train")
    assert code == 0 and "train.bin" in out_train and "train loss" in out_train
    # beside training's estimate, why the two differ; the train split has no such figure
    best = load_checkpoint(str(trained / "out" / "best.pt"))["best_val_loss"]
    assert out.splitlines()[-1] == (
        f"training's best val loss, {best:.4f}, is an estimate: the mean over eval_iters=5 batches of 8 random "
        f"windows (640 predictions, some twice, some never); this figure scores all {len(val) - 1:,} once, "
        "so the two differ (by more, the fewer the batches)"
    )
    assert "estimate" not in out_train


@pytest.mark.parametrize("length", [50, 49, 17, 2])  # a short last window, none, one window, one target
def test_eval_equals_a_hand_computation_over_windows(trained, length):
    from chargpt.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(str(trained / "out" / "ckpt.pt")))
    torch.manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (length,)).numpy().astype(np.uint16)
    total, count = 0.0, 0
    for start in range(0, length - 1, 16):  # by hand: one window at a time, inputs and next characters
        x = torch.tensor(data[start : start + 16].astype(np.int64))[None]
        y = torch.tensor(data[start + 1 : start + 17].astype(np.int64))[None]
        x = x[:, : y.shape[1]]
        logits, _ = model(x)
        total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        count += y.shape[1]
    assert count == length - 1
    for batch_size in (1, 2, 64):
        loss, n, windows = evaluate(model, data, 16, batch_size)
        assert n == length - 1 and windows == math.ceil((length - 1) / 16)
        assert loss == pytest.approx(total / count, rel=1e-6)


def test_eval_through_the_decoder(trained, capsys):
    """float32 through the KV-cache decoder scores the same windows as the full forward;
    narrower decoders stay close."""
    flags = [f"--out_dir={trained / 'out'}", f"--data_dir={trained / 'data'}", "--device=cpu"]
    loss = lambda out: float(re.search(r"val loss.* (\d+\.\d+), ", out).group(1))
    full = loss(run_eval(capsys, *flags)[1])
    code, out, err = run_eval(capsys, *flags, "--decode_dtype=float32")
    assert code == 0 and "through the KV-cache decoder in float32" in out, err
    assert loss(out) == pytest.approx(full, abs=1e-4)
    for dtype, tolerance in (("float16", 0.01), ("int8", 0.05)):
        code, out, err = run_eval(capsys, *flags, f"--decode_dtype={dtype}")
        assert code == 0 and loss(out) == pytest.approx(full, abs=tolerance), (dtype, out)


def test_eval_rejects_a_dataset_with_another_vocabulary(trained, capsys):
    prepare("Ωμέγα, ça va? " * 40, str(trained / "data" / "other"))
    code, out, err = run_eval(capsys, f"--out_dir={trained / 'out'}", f"--data_dir={trained / 'data'}", "--dataset=other")
    meta = os.path.join(str(trained / "data"), "other", "meta.json")
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert "differs" in err and meta in err and str(trained / "out" / "best.pt") in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--split=test"], "--split must be 'train' or 'val'"),
        (["--batch_size=0"], "--batch_size must be at least 1"),
        (["--batch_size=x"], "--batch_size expects an integer"),
        (["--decode_dtype=int4"], "--decode_dtype must be"),
        (["--dataset=nothere"], "nothere/train.bin not found"),
        (["--device=tpu"], "--device"),
        (["--colour=red"], "unknown config key 'colour'"),
        (["extra"], "unexpected argument 'extra'"),
    ],
)
def test_eval_bad_input_is_one_line(trained, capsys, flags, message):
    code, out, err = run_eval(capsys, f"--out_dir={trained / 'out'}", f"--data_dir={trained / 'data'}", *flags)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err


def test_eval_missing_checkpoint_names_the_path(tmp_path, capsys):
    code, _, err = run_eval(capsys, f"--out_dir={tmp_path / 'nowhere'}")
    assert code == 1 and str(tmp_path / "nowhere") in err and len(err.splitlines()) == 1


def test_eval_help_lists_every_option(capsys):
    code, out, _ = run_eval(capsys, "--help")
    assert code == 0
    for key in ("out_dir", "split", "dataset", "data_dir", "batch_size", "device"):
        assert re.search(rf"^  --{key}=\S*\s+\S", out, re.M), key


def test_eval_without_out_dir_names_the_run_folders(tmp_path, monkeypatch, capsys):
    (tmp_path / "out-cpu").mkdir()
    (tmp_path / "out-cpu" / "best.pt").write_text("not read")
    monkeypatch.chdir(tmp_path)
    assert eval_py.main([]) == 1
    assert capsys.readouterr().err.strip() == (
        "eval.py: error: --out_dir out does not exist; the run folders here: out-cpu (pass one with --out_dir)"
    )
