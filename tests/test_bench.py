"""bench.py runs end to end on a tiny model (it reports timings; nothing here asserts one)."""

import os
import subprocess
import sys

import train
from conftest import ROOT, tiny_configs


def bench(*args):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_train_compares_fast_and_reference(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\nbatch_size = 4\ndropout = 0.1\ndevice = 'cpu'\n")
    out = bench("train", str(cfg), "--iters=2", "--warmup=1", "--n_embd=64")
    assert "| fast (" in out and "| reference (" in out and "speed-up" in out
    assert "n_embd 64" in out  # flags after the config override it


def test_bench_health_times_health_steps(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\nbatch_size = 4\ndevice = 'cpu'\n")
    out = bench("health", str(cfg), "--pairs=3", "--rounds=2", "--warmup=1", "--health_interval=4")
    assert "| a health step's extra time (median of 3) |" in out and "overhead at --health_interval=4:" in out
    assert "the blocks' total times, with health against without:" in out
    assert "drawing health.png from 5 health records took" in out  # 3, and one per round


def test_bench_sample_and_loss(data_dir, tmp_path):
    out_dir = tmp_path / "o"
    train.train(*tiny_configs(data_dir, out_dir, max_iters=10, sample_chars=0, eval_sample_chars=0), log=lambda m: None)
    out = bench("sample", f"--out_dir={out_dir}", "--new_tokens=40")
    assert "KV cache" in out and "uncached" in out and "--num_samples 10" in out
    assert "one sample: auto's pick" in out and "10 samples: auto's pick" in out and "of the best row" in out
    out = bench(
        "loss",
        "--target=3.5",
        f"--out_dir={tmp_path / 'b'}",
        f"--data_dir={data_dir}",
        "--dataset=tiny",
        "--n_layer=1",
        "--n_head=2",
        "--n_embd=32",
        "--block_size=16",
        "--batch_size=8",
        "--max_iters=30",
        "--eval_interval=10",
        "--eval_iters=2",
        "--device=cpu",
        "--eval_sample_chars=0",
        "--sample_chars=0",
        "--learning_rate=0.01",
    )
    assert "val loss <= 3.5 first at step" in out
    # a folder named with --out_dir is protected as train.py protects it; out-bench is not
    again = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench.py"),
            "loss",
            "--target=3.5",
            f"--out_dir={tmp_path / 'b'}",
            f"--data_dir={data_dir}",
            "--dataset=tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and again.stderr.startswith("bench.py: error: --out_dir"), again.stderr
    assert "--overwrite=True" in again.stderr
