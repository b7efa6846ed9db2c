"""Damaged, foreign or hostile files get one line that names the file, never a traceback:
meta.json, token files, metrics.jsonl, checkpoints that are unsafe or do not fit, a disk
that fills up in the middle of a checkpoint, and a PyTorch too old to load safely."""

import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_py
import sample
import train
from chargpt import checkpoint
from chargpt.checkpoint import load_checkpoint, save_checkpoint
from chargpt.metrics import read_records
from conftest import ROOT, tiny_configs


@pytest.fixture
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    train.train(
        *tiny_configs(data_dir, out, max_iters=6, eval_interval=3, sample_chars=0, eval_sample_chars=0), log=lambda m: None
    )
    return out


def train_main(data_dir, out, *flags):
    return train.main(
        [
            f"--data_dir={data_dir}",
            "--dataset=tiny",
            f"--out_dir={out}",
            "--device=cpu",
            "--n_layer=1",
            "--n_head=2",
            "--n_embd=16",
            "--block_size=8",
            "--max_iters=2",
            "--eval_iters=1",
            "--sample_chars=0",
            *flags,
        ]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("{}", "holds no vocabulary"),
        ("[]", "holds no vocabulary"),
        ('{"chars": "ab', "is not valid JSON"),
        ('{"chars": "aab"}', "repeated characters"),
        ('{"chars": "ab"}', "holds token id"),
        (b"\xff\xfe", "is not valid JSON"),
    ],
)
def test_a_damaged_meta_json_is_named(data_dir, tmp_path, capsys, content, message):
    meta = os.path.join(data_dir, "tiny", "meta.json")
    with open(meta, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    assert train_main(data_dir, tmp_path / "o") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and meta in err and message in err and len(err.splitlines()) == 1, err
    assert "prepare it again: python prepare.py --input YOUR_TEXT.txt --out_dir" in err


def test_a_token_file_of_odd_length_is_named(data_dir, tmp_path, capsys):
    path = os.path.join(data_dir, "tiny", "val.bin")
    with open(path, "ab") as f:
        f.write(b"\x00")
    assert train_main(data_dir, tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert path in err and "uint16" in err


def test_the_hint_for_a_missing_dataset_prepares_your_own_text(data_dir, tmp_path, capsys):
    assert train.main([f"--data_dir={data_dir}", "--dataset=mytext", f"--out_dir={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert f"run: python prepare.py --input YOUR_TEXT.txt --out_dir {os.path.join(data_dir, 'mytext')}" in err
    assert train.main([f"--data_dir={tmp_path / 'none'}", f"--out_dir={tmp_path / 'o'}"]) == 1
    assert "run: python prepare.py --out_dir" in capsys.readouterr().err  # tiny Shakespeare: prepare.py downloads it


def test_a_checkpoint_whose_vocab_is_shorter_than_its_model_is_named(trained, capsys):
    path = trained / "best.pt"
    state = load_checkpoint(str(path))
    state["vocab"] = state["vocab"][:-3]
    save_checkpoint(state, str(path))
    assert sample.main([f"--out_dir={trained}", "--device=cpu", "--start=K", "--max_new_tokens=5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sample.py: error: {path}: its vocab has") and len(err.splitlines()) == 1, err


def test_a_checkpoint_with_other_objects_is_refused_plainly(tmp_path):
    """A pickle that would run code: refused by weights_only, and the message says what the
    file holds, without suggesting to turn weights_only off."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "model_config": {}, "vocab": "ab", "iter_num": 0}, str(path))
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(path))
    message = str(e.value)
    assert "holds objects other than tensors and plain data" in message and str(path) in message
    assert "weights_only=False" not in message and "\n" not in message


def test_a_truncated_checkpoint_is_named(trained):
    path = trained / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="is not a readable checkpoint \\(truncated or corrupt\\?\\)"):
        load_checkpoint(str(path))


def test_a_pytorch_without_the_weights_only_fixes_is_refused(trained, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "__version__", "2.9.1+cpu")
    with pytest.raises(ValueError, match=r"PyTorch 2.9.1\+cpu can be made to run code .* install torch 2.10 or newer"):
        load_checkpoint(str(trained / "ckpt.pt"))
    monkeypatch.setattr(checkpoint.torch, "__version__", "2.10.0")
    load_checkpoint(str(trained / "ckpt.pt"))


def test_the_requirements_ask_for_a_safe_pytorch():
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        floor = next(line.split(">=")[1].split()[0] for line in f if line.startswith("torch>="))
    assert tuple(int(p) for p in floor.split(".")[:2]) >= checkpoint.SAFE_TORCH


def test_metrics_cut_inside_a_character_are_read_and_resumed(data_dir, tmp_path):
    """A kill or a full disk in the middle of an append leaves half a line, maybe half a
    character: the reader skips it, and the run resumes."""
    out = tmp_path / "o"
    train.train(*tiny_configs(data_dir, out, max_iters=6, eval_interval=3, sample_chars=0), log=lambda m: None)
    metrics = out / "metrics.jsonl"
    whole = read_records(str(metrics))
    with open(metrics, "ab") as f:
        f.write('{"type": "eval", "sample": "καλη'.encode()[:-1])  # cut inside the last character
    assert read_records(str(metrics)) == whole
    assert all(line.isascii() for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines()[:-1])
    summary = train.train(
        *tiny_configs(data_dir, out, max_iters=9, eval_interval=3, sample_chars=0, init_from="resume"), log=lambda m: None
    )
    assert summary["iter_num"] == 9 and read_records(str(metrics))[-1]["type"] == "done"


TMPFS = "/tmp/chargpt-full-disk"


@pytest.fixture
def small_disk():
    """A 256 KiB tmpfs: a real full disk. Mounting needs root (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a real full disk needs root")
    os.makedirs(TMPFS, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", TMPFS], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"could not mount a tmpfs here: {mounted.stderr.strip()}")
    yield TMPFS
    subprocess.run(["umount", TMPFS], check=False)


def test_a_real_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_old_file(small_disk):
    small = {"model": {"w": torch.zeros(1000)}, "model_config": {}, "vocab": "ab", "iter_num": 1}
    path = os.path.join(small_disk, "ckpt.pt")
    save_checkpoint(small, path)
    before = open(path, "rb").read()
    for _ in range(4):  # torch's own writer used to fail with a RuntimeError some of the time
        with pytest.raises(
            OSError, match=rf"^could not write {path} \(No space left on device\); the previous file is untouched$"
        ):
            save_checkpoint({**small, "model": {"w": torch.zeros(200_000)}}, path)
    assert open(path, "rb").read() == before and os.listdir(small_disk) == ["ckpt.pt"]


def test_eval_names_a_damaged_meta_json_too(trained, data_dir, capsys):
    meta = os.path.join(data_dir, "tiny", "meta.json")
    with open(meta, "w", encoding="utf-8") as f:
        json.dump([], f)
    assert eval_py.main([f"--out_dir={trained}", f"--data_dir={data_dir}", "--device=cpu"]) == 1
    assert meta in capsys.readouterr().err


def test_a_second_ctrl_c_is_one_line_not_a_traceback(data_dir, tmp_path):
    """Two Ctrl-C in the middle of a checkpoint write: the run stops at once, with one line."""
    flags = [
        f"--data_dir={data_dir}",
        "--dataset=tiny",
        f"--out_dir={tmp_path / 'o'}",
        "--device=cpu",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=8",
        "--max_iters=4",
        "--eval_interval=2",
        "--eval_iters=1",
        "--sample_chars=0",
    ]
    code = (
        "import os, signal, train\n"
        "real = train.ckpt.save_checkpoint\n"
        "def interrupted_save(state, path):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    real(state, path)\n"
        "train.ckpt.save_checkpoint = interrupted_save\n"
        f"raise SystemExit(train.main({flags!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr, result.stderr
    assert not [name for name in os.listdir(tmp_path / "o") if name.startswith(".tmp-")]
