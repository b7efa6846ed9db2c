"""bench.py runs end to end on a tiny model (it reports timings; nothing here asserts one)."""

import os
import subprocess
import sys

import pytest
import torch

import bench as bench_py
import train
from conftest import ROOT, tiny_configs, tiny_flags


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_gpu_without_a_gpu_says_so_in_one_line():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "gpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("bench.py: error: no CUDA GPU here: PyTorch "), (
        result.stderr
    )


def test_the_peak_flops_of_a_gpu_by_its_name():
    assert bench_py.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench_py.peak_tflops("NVIDIA H100 80GB HBM3") == 989 and bench_py.peak_tflops("NVIDIA H100 PCIe") == 756
    assert (
        bench_py.peak_tflops("Tesla T4") == 65
        and bench_py.peak_tflops("NVIDIA L40S") == 362
        and bench_py.peak_tflops("NVIDIA L4") == 121
    )
    assert bench_py.peak_tflops("NVIDIA A10G") is None and bench_py.peak_tflops("Some New GPU") is None


FAKE_TRAIN = """
import signal, sys, time
def stop(signum, frame):
    print("SIGTERM: saved out/ckpt.pt at step 7; continue with --init_from=resume", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("step 0: train loss 4.17, val loss 4.1744", flush=True)
print("iter 5: loss 2.1, lr 1e-3, 9.9 ms/iter, 103,063 tokens/s, 0.069 TFLOP/s, elapsed 1s, ETA 1s", flush=True)
print("step 5: train loss 1.40, val loss 1.4700", flush=True)
time.sleep(60)
"""


def test_watch_train_reads_the_figures_and_stops_a_run_at_its_cap(tmp_path, capsys):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    run = bench_py.watch_train([sys.executable, str(script)], lambda line: line.startswith("step "), 3, str(tmp_path / "log"))
    assert run.stopped and run.steps == 7 and [e[1:] for e in run.evals] == [(0, 4.1744), (5, 1.47)]
    assert run.first_at(1.48)[1] == 5 and run.first_at(1.4) is None and run.rates == [(103063.0, 0.069)]
    assert "iter 5" not in capsys.readouterr().out and "iter 5" in (tmp_path / "log").read_text()


def test_the_gpu_checks_figures_on_the_cpu(data_dir, tmp_path):
    """What bench.py gpu reports of a run, taken from a tiny run on the CPU."""
    out = tmp_path / "o"
    flags = [*tiny_flags(data_dir, out, max_iters=20, eval_interval=10, sample_chars=0, eval_sample_chars=0)]
    rows = dict(bench_py.train_figures("tiny", flags, 300, peak=0.001))
    assert rows["tiny: the whole command"].endswith("s, 20 steps")
    last, whole = rows["tiny: last val (train.py's estimate / eval.py, whole val split)"].split(" / ")
    assert 1.0 < float(last) < 4.0 and 1.0 < float(whole) < 4.0
    assert (
        "tokens/s" in rows["tiny: speed (median of the logged lines)"]
        and "% of 0.001 TFLOP/s" in rows["tiny: speed (median of the logged lines)"]
    )
    assert rows["tiny: val <= 1.48 first"] == "not reached"
    sampling = dict(bench_py.sampling_figures(str(out), "cpu", n=30))
    assert len(sampling) == 3 and all(figure.endswith(" chars/s") for figure in sampling.values())


def test_bench_limit_sets_each_recipe_beside_the_matmul_peak(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\nbatch_size = 4\ndevice = 'cpu'\n")
    out = bench("limit", str(cfg), "--rounds=2", "--iters=1", "--warmup=1", "--profile=5")
    assert "| recipe | dtype | ms/step | achieved TFLOP/s | matmul peak TFLOP/s | of the peak |" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {cfg} | float32 |"))
    achieved, peak = (float(cell) for cell in row.split("|")[4:6])
    assert 0 < achieved and 0 < peak  # both measured, in TFLOP/s
    assert "the top 5 operations of one step" in out and "aten::mm" in out  # the profile names the matmuls


def test_bench_steps_times_each_variant_against_the_recipe(tmp_path):
    cfg = tmp_path / "tiny.py"
    cfg.write_text("n_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\nbatch_size = 4\ndevice = 'cpu'\n")
    out = bench(
        "steps",
        str(cfg),
        "--variant=--bias=False",
        "--variant=--batch_size=8 --n_embd=64",
        "--rounds=2",
        "--iters=1",
        "--warmup=1",
    )
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row[0].strip() for row in rows] == ["(the recipe)", "--bias=False", "--batch_size=8 --n_embd=64"]
    assert rows[0][3].strip() == "1.00x"  # the recipe against itself
    assert all(float(row[1].replace(",", "")) > 0 for row in rows)


def test_bench_steps_names_a_variants_unknown_flag(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "steps", "config/shakespeare_char_cpu.py", "--variant=--bais=False"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "bench.py: error: unknown config key 'bais' (did you mean --bias?) (see --help for the list)"


def test_matmul_peak_counts_the_flops_of_one_product():
    flops = bench_py.matmul_peak("float32", n=64, seconds=0.01)
    assert 1e6 < flops < 1e14  # 2 n^3 over a positive time: a plausible rate, whatever the machine


def test_bench_versus_times_both_commands_to_the_target(data_dir, tmp_path):
    # a stand-in for a nanoGPT checkout: its train.py prints nanoGPT's eval lines
    fake = tmp_path / "nanoGPT"
    (fake / "data" / "shakespeare_char").mkdir(parents=True)
    (fake / "data" / "shakespeare_char" / "train.bin").write_bytes(b"\0\0")
    (fake / "train.py").write_text(
        "import sys\nassert '--device=cpu' in sys.argv and '--n_layer=4' in sys.argv\n"
        "print('step 0: train loss 4.2000, val loss 4.2000')\nprint('step 250: train loss 3.0000, val loss 3.1000')\n"
    )
    flags = tiny_flags(data_dir, tmp_path / "ours", max_iters=30, eval_interval=10, sample_chars=0, eval_sample_chars=0)
    out = bench("versus", "--nanogpt", str(fake), "--target=3.5", "--rounds=2", *flags)
    assert out.count("round ") == 4 and "round 2, nanoGPT: val <= 3.5 at step 250" in out
    assert "time to val <= 3.5, the best of 2 rounds: ours " in out and "x as fast" in out and "at least" not in out


def test_bench_versus_needs_a_prepared_nanogpt_checkout(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "versus", f"--nanogpt={tmp_path}"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "no train.py there" in result.stderr


def test_bench_lens_times_the_playgrounds_lens_and_heads(data_dir, tmp_path):
    out_dir = tmp_path / "o"
    train.train(*tiny_configs(data_dir, out_dir, max_iters=5, sample_chars=0, eval_sample_chars=0), log=lambda m: None)
    out = bench("lens", f"--out_dir={out_dir}", "--chars=40", "--repeats=1")
    assert "a text of 40 characters from" in out and "one window (17 characters)" in out
    assert "each of its 40 characters (25 windows)" in out and "4 heads in turn, 32 windows of 16" in out
