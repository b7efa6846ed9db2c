"""Nothing lost, nothing trusted: kill -9, a full disk, a diverging run, and property tests
of the tokenizer and the config parser."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train
from chargpt import checkpoint
from chargpt.checkpoint import load_checkpoint
from chargpt.config import TrainConfig, parse
from chargpt.tokenizer import CharTokenizer
from conftest import ROOT, tiny_configs
from model import GPTConfig


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    # a learning rate of 1e30 blows the weights up in one step
    config, model_config = tiny_configs(
        data_dir,
        tmp_path / "o",
        learning_rate=1e30,
        min_lr=1e30,
        warmup_iters=0,
        grad_clip=0.0,
        eval_interval=5,
        log_interval=100,
        max_iters=50,
    )
    with pytest.raises(FloatingPointError, match="not finite at step 5.*ckpt.pt holds the last good state"):
        train.train(config, model_config, log=lambda m: None)
    ckpt = load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))
    assert ckpt["iter_num"] == 0
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_full_disk_while_saving_is_a_clear_error_and_keeps_the_old_file(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    config, model_config = tiny_configs(data_dir, out, max_iters=10, eval_interval=10, sample_chars=0)
    train.train(config, model_config, log=lambda m: None)
    before = (out / "ckpt.pt").read_bytes()

    def full_disk_save(obj, f):
        f.write(b"\x00" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    flags = [
        f"--data_dir={data_dir}",
        "--dataset=tiny",
        f"--out_dir={out}",
        "--device=cpu",
        "--dtype=float32",
        "--n_layer=2",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=16",
        "--batch_size=8",
        "--max_iters=20",
        "--eval_interval=10",
        "--eval_iters=5",
        "--lr_decay_iters=40",
        "--init_from=resume",
    ]
    assert train.main(flags) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not write" in err and "No space left" in err, err
    assert (out / "ckpt.pt").read_bytes() == before
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    """Kill a real training process with SIGKILL at random moments (it saves at every step,
    so many kills land mid-write), then resume; every time ckpt.pt must load."""
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--data_dir={data_dir}",
        "--dataset=tiny",
        f"--out_dir={out}",
        "--n_layer=2",
        "--n_head=2",
        "--n_embd=128",
        "--block_size=16",
        "--device=cpu",
        "--dtype=float32",
        "--max_iters=100000",
        "--eval_interval=1",
        "--eval_iters=1",
        "--log_interval=1",
        "--eval_sample_chars=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    steps = []
    for round in range(4):
        proc = subprocess.Popen(
            cmd + (["--init_from=resume"] if round else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        seen = 0
        for line in proc.stdout:
            seen += line.startswith("step ")
            if seen == 2:  # the checkpoint of the first new step is on disk, the next being written
                break
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        steps.append(ckpt["iter_num"])
    assert all(a < b for a, b in zip(steps, steps[1:])), steps  # every round went on from the last


# -- property-based ------------------------------------------------------------------


@given(st.text(min_size=1))
def test_encode_decode_any_text(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(0 <= i < tok.vocab_size for i in ids)


@given(
    batch_size=st.integers(min_value=-(2**40), max_value=2**40),
    learning_rate=st.floats(allow_nan=False, allow_infinity=False),
    compile=st.booleans(),
    out_dir=st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1),
)
@settings(max_examples=200, deadline=None)
def test_config_flags_round_trip(batch_size, learning_rate, compile, out_dir):
    (config, _), _ = parse(
        [f"--batch_size={batch_size}", f"--learning_rate={learning_rate!r}", f"--compile={compile}", f"--out_dir={out_dir}"],
        [TrainConfig(), GPTConfig()],
        "train.py",
    )
    assert (config.batch_size, config.learning_rate, config.compile, config.out_dir) == (
        batch_size,
        learning_rate,
        compile,
        out_dir,
    )


@given(
    n_layer=st.integers(min_value=-1000, max_value=1000),
    dropout=st.one_of(st.integers(min_value=0, max_value=5), st.floats(allow_nan=False, allow_infinity=False)),
    dataset=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
)
@settings(max_examples=100, deadline=None)
def test_config_file_round_trip(tmp_path_factory, n_layer, dropout, dataset):
    path = tmp_path_factory.mktemp("cfg") / "c.py"
    path.write_text(f"n_layer = {n_layer!r}\ndropout = {dropout!r}\ndataset = {dataset!r}\n", encoding="utf-8")
    (config, model), _ = parse([str(path)], [TrainConfig(), GPTConfig()], "train.py")
    assert (model.n_layer, model.dropout, config.dataset) == (n_layer, float(dropout), dataset)
    assert isinstance(model.dropout, float)


@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_keys_are_named(key):
    known = {f for c in (TrainConfig(), GPTConfig()) for f in vars(c)}
    if key in known:
        return
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        parse([f"--{key}=1"], [TrainConfig(), GPTConfig()], "train.py")
