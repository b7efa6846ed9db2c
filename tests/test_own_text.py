"""Your own text, end to end: prepare.py --input, train.py --dataset, sample.py and eval.py on
a text with accents and non-Latin scripts."""

import os
import random
import subprocess
import sys

import eval as eval_py
import prepare
import train
from conftest import ROOT


def make_text(n_lines=300, seed=0):
    rng = random.Random(seed)
    words = ["Привет", "мир", "καλημέρα", "κόσμε", "日本語", "の", "テキスト", "ça", "va", "señor", "Ærø", "مرحبا"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 7))) + "。" for _ in range(n_lines)) + "\n"


def test_train_and_sample_a_non_latin_text(tmp_path, capsys):
    text = make_text()
    source = tmp_path / "my.txt"
    source.write_text(text, encoding="utf-8")
    data_dir, out = tmp_path / "data", tmp_path / "out"
    assert prepare.main(["--input", str(source), "--out_dir", str(data_dir / "mytext")]) == 0
    code = train.main(
        [
            os.path.join(ROOT, "config", "shakespeare_char_cpu.py"),
            "--dataset=mytext",
            f"--data_dir={data_dir}",
            f"--out_dir={out}",
            "--n_layer=2",
            "--n_head=2",
            "--n_embd=32",
            "--block_size=16",
            "--batch_size=8",
            "--time_budget=0",
            "--max_iters=20",
            "--eval_interval=10",
            "--eval_iters=2",
            "--warmup_iters=0",
            "--lr_decay_iters=20",
            "--device=cpu",
            "--dtype=float32",
            "--sample_chars=30",
            "--eval_sample_chars=30",
            "--log_interval=10",
        ]
    )
    log = capsys.readouterr().out
    assert code == 0 and "step 20: train loss" in log and "iter 20: loss" in log
    assert set((out / "samples.txt").read_text(encoding="utf-8")) <= set(text)

    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out}", "--start=καλημέρα 日本", "--max_new_tokens=40"],
        capture_output=True,
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("καλημέρα 日本") and len(result.stdout) == len("καλημέρα 日本") + 40 + 1
    assert set(result.stdout) <= set(text)

    assert eval_py.main([f"--out_dir={out}", "--device=cpu", f"--data_dir={data_dir}"]) == 0
    assert "bits per character" in capsys.readouterr().out
