"""A checkpoint written by the code before the move into chargpt/ (tests/data/before_the_package:
its ckpt.pt and best.pt at step 10, the dataset's meta.json, the weights the old code reached
at step 20 from the same start, and old sample.py's text) still samples, evaluates and resumes
exactly as it did."""

import json
import os
import shutil

import torch

import eval as eval_py
import sample
import train
from chargpt.checkpoint import load_checkpoint
from conftest import ROOT, make_text, tiny_configs
from prepare import prepare

OLD = os.path.join(ROOT, "tests", "data", "before_the_package")


def old_run(tmp_path):
    """The old run's folder and its dataset (the text it was prepared from is conftest's)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "best.pt"):
        shutil.copy(os.path.join(OLD, name), out / name)
    data_dir = tmp_path / "data"
    prepare(make_text(), str(data_dir / "tiny"))
    with open(os.path.join(OLD, "meta.json"), encoding="utf-8") as f:
        assert json.load(f)["chars"] == json.loads((data_dir / "tiny" / "meta.json").read_text(encoding="utf-8"))["chars"]
    return out, str(data_dir)


def test_old_checkpoint_samples_the_same_text(tmp_path, capsys):
    out, _ = old_run(tmp_path)
    flags = [f"--out_dir={out}", "--start=KING:", "--max_new_tokens=60", "--decode_dtype=float32", "--device=cpu"]
    assert sample.main(flags) == 0
    with open(os.path.join(OLD, "sample_KING_60.txt"), encoding="utf-8") as f:
        assert capsys.readouterr().out == f.read()


def test_old_checkpoint_evaluates(tmp_path, capsys):
    out, data_dir = old_run(tmp_path)
    assert eval_py.main([f"--out_dir={out}", f"--data_dir={data_dir}", "--device=cpu"]) == 0
    assert "val loss" in capsys.readouterr().out


def test_old_checkpoint_resumes_to_the_old_codes_weights(tmp_path):
    """Resumed from step 10 to 20, the weights are the ones the old code reached at step 20
    in one go: the random streams, optimizer state and schedule all came back. (Bit for bit
    on the machine that wrote the fixture; another CPU may round its sums differently.)"""
    out, data_dir = old_run(tmp_path)
    stored = load_checkpoint(str(out / "ckpt.pt"))
    train_config, model_config = tiny_configs(
        data_dir,
        out,
        init_from="resume",
        max_iters=20,
        lr_decay_iters=20,
        batch_size=4,
        eval_interval=5,
        eval_iters=2,
        log_interval=5,
        warmup_iters=2,
        sample_chars=20,
        eval_sample_chars=0,
    )
    for key in ("block_size", "n_layer", "n_head", "n_embd", "dropout", "position", "qk_norm"):
        setattr(model_config, key, stored["model_config"][key])
    summary = train.train(train_config, model_config, log=lambda m: None)
    assert summary["iter_num"] == 20
    reached = load_checkpoint(str(out / "ckpt.pt"))["model"]
    expected = torch.load(os.path.join(OLD, "step20_weights.pt"), weights_only=True)["model"]
    assert sorted(reached) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(reached[key], value, msg=key)
