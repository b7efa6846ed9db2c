"""sample.py end to end: it needs nothing but the checkpoint, and every bad input is one line."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import sample as sample_py
import train
from conftest import ROOT, tiny_configs, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text):
    from prepare import prepare

    root = tmp_path_factory.mktemp("sample")
    prepare(text, str(root / "data" / "tiny"))
    train.train(*tiny_configs(str(root / "data"), root / "out", max_iters=60, sample_chars=0), log=lambda m: None)
    shutil.rmtree(root / "data")  # sampling must not need the dataset
    return root / "out"


def sample(*args, cwd=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_sample_says_what_it_loaded_on_stderr_and_keeps_stdout_for_the_text(trained):
    from chargpt.checkpoint import load_checkpoint, model_from_checkpoint

    best = load_checkpoint(str(trained / "best.pt"))
    params = model_from_checkpoint(best)[0].num_params()
    result = sample(f"--out_dir={trained}", "--start=ROMEO:", "--max_new_tokens=20", "--threads=1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"{trained / 'best.pt'}: gpt, {params:,} parameters, step {best['iter_num']}, best val loss {best['best_val_loss']:.4f}"
    ]
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) == len("ROMEO:") + 20 + 1


def test_sample_prints_text(trained):
    result = sample("--out_dir", str(trained), "--start", "ROMEO:", "--max_new_tokens", "80", "--seed=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout) == len("ROMEO:") + 80 + 1
    again = sample(f"--out_dir={trained}", "--start=ROMEO:", "--max_new_tokens=80", "--seed=3")
    assert again.stdout == result.stdout  # same seed, same text


def test_sample_decode_dtypes(trained):
    """Each --decode_dtype streams the same amount of text; float32 is the model as trained,
    so its text equals the uncached loop's for the same seed while the text fits in
    block_size (16 here; past it the two paths keep different windows)."""
    flags = ["--start=ROMEO:", "--max_new_tokens=10", "--seed=5"]
    uncached = sample(f"--out_dir={trained}", *flags, "--kv_cache=False")
    for dtype in ("float32", "float16", "int8"):
        result = sample(f"--out_dir={trained}", *flags, f"--decode_dtype={dtype}")
        assert result.returncode == 0, result.stderr
        assert len(result.stdout) == len("ROMEO:") + 10 + 1
        if dtype == "float32":
            assert result.stdout == uncached.stdout


def test_sample_with_a_temperature_and_top_p_that_underflow_is_greedy(trained):
    """1e-310 and 5e-324 pass --temperature's and --top_p's checks and are 0 in float32: the
    text is the greedy one, not a traceback."""
    flags = [f"--out_dir={trained}", "--start=ROMEO:", "--max_new_tokens=30", "--decode_dtype=float32"]
    tiny = sample(*flags, "--temperature=1e-310", "--top_p=5e-324")
    assert tiny.returncode == 0 and tiny.stderr.startswith(f"{trained / 'best.pt'}: gpt, "), tiny.stderr
    assert tiny.stdout == sample(*flags, "--temperature=0").stdout


def test_sample_batch_and_file_prompt(trained, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("KING:\n", encoding="utf-8")
    result = sample(f"--out_dir={trained}", f"--start=FILE:{prompt}", "--num_samples=3", "--max_new_tokens=30")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 3 and all(s.startswith("KING:\n") for s in samples)


def test_sample_prefers_best_then_ckpt(trained, tmp_path):
    only_ckpt = tmp_path / "o"
    only_ckpt.mkdir()
    shutil.copy(trained / "ckpt.pt", only_ckpt / "ckpt.pt")
    assert sample(f"--out_dir={only_ckpt}", "--max_new_tokens=5").returncode == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--start=ROMEO ✓ §"], "not in the vocabulary: '§' '✓'"),
        (["--start=FILE:/no/such/prompt.txt"], "/no/such/prompt.txt"),
        (["--start="], "--start is empty"),
        (["--temperature=-0.5"], "--temperature must be 0 or more"),
        (["--top_p=0"], "--top_p must be in (0, 1]"),
        (["--top_p=1.5"], "--top_p must be in (0, 1]"),
        (["--top_k=-1"], "--top_k must be 0 or more"),
        (["--num_samples=0"], "--num_samples must be at least 1"),
        (["--num_samples=2.5"], "--num_samples expects an integer"),
        (["--max_new_tokens=-3"], "--max_new_tokens must be 0 or more"),
        (["--colour=red"], "unknown config key 'colour'"),
        (["--decode_dtype=int4"], "--decode_dtype must be 'auto', 'float32', 'float16', 'bfloat16' or 'int8'"),
    ],
)
def test_sample_bad_input(trained, flags, message):
    result = sample(f"--out_dir={trained}", *flags)
    assert result.returncode == 1
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert result.stdout == ""


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_sample_on_mps_without_it_is_one_line(trained):
    result = sample(f"--out_dir={trained}", "--device=mps")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == "sample.py: error: --device=mps but MPS is not available here (try --device=cpu)"


def test_sample_missing_or_broken_checkpoint(trained, tmp_path):
    result = sample("--out_dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and str(tmp_path / "nowhere") in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = sample("--out_dir", str(empty))
    assert result.returncode == 1 and "no checkpoint in" in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (trained / "best.pt").read_bytes()
    (broken / "best.pt").write_bytes(data[: len(data) // 2])
    result = sample("--out_dir", str(broken))
    assert result.returncode == 1 and "best.pt is not a readable checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_attention_picture(trained, tmp_path):
    picture = tmp_path / "attn.png"
    result = sample(f"--out_dir={trained}", "--start=ROMEO:", f"--attention={picture}", "--max_new_tokens=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ROMEO:\n" and "2 layers x 2 heads over 6 characters" in result.stderr
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_main(capsys, *flags):
    import sample as sample_py

    code = sample_py.main(list(flags))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_attention_of_a_long_prompt_shows_its_last_block(trained, tmp_path, capsys):
    picture = tmp_path / "attn.png"
    code, out, err = run_main(
        capsys,
        f"--out_dir={trained}",
        "--start=" + "KING:\nthe king and queen",
        f"--attention={picture}",
        "--max_new_tokens=0",
        "--device=cpu",
    )
    assert code == 0 and "over 16 characters (the last block_size of the prompt)" in err and picture.exists()


def test_attention_errors_are_one_line(trained, tmp_path, capsys, monkeypatch):
    code, out, err = run_main(capsys, f"--out_dir={trained}", f"--attention={tmp_path / 'no' / 'attn.png'}")
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and str(tmp_path / "no") in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, out, err = run_main(capsys, f"--out_dir={trained}", f"--attention={tmp_path / 'attn.png'}")
    assert (
        code == 1
        and out == ""
        and err == "sample.py: error: --attention needs matplotlib, which is not installed (pip install matplotlib)"
    )


def test_attention_of_a_bigram_model_is_an_error(tmp_path, capsys, data_dir):
    train_tiny(data_dir, tmp_path / "out", model_type="bigram", max_iters=1, eval_interval=1, eval_iters=1)
    code, out, err = run_main(capsys, f"--out_dir={tmp_path / 'out'}", f"--attention={tmp_path / 'attn.png'}")
    assert code == 1 and "bigram model, which has no attention" in err and len(err.splitlines()) == 1


def test_lens_prints_a_row_per_layer_ending_with_the_models_own_guess(trained, capsys, tmp_path):
    from chargpt.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint

    code, out, err = run_main(capsys, f"--out_dir={trained}", "--lens=KING:", "--device=cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("the next character after 'KING:' (position 4)") and "ln_f and lm_head" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["embeddings", "Block", "Block"]  # no sample after it
    path = find_checkpoint(str(trained))
    model, tokenizer = model_from_checkpoint(load_checkpoint(path), "cpu", path)
    probs = torch.softmax(model(torch.tensor([tokenizer.encode("KING:")]))[0][0, -1], dim=-1)  # (V,)
    best = probs.argmax().item()
    shown = {"\n": "\\n", " ": "␣"}.get(tokenizer.chars[best], tokenizer.chars[best])
    assert lines[-1].split()[2:4] == [shown, f"{probs[best].item() * 100:.1f}%"]
    # inside the text (and from a file): the real next character's probability as a last column
    (tmp_path / "text.txt").write_text("KING:\nthe king")
    code, out, err = run_main(capsys, f"--out_dir={trained}", f"--lens=FILE:{tmp_path / 'text.txt'}", "--lens_at=1")
    assert code == 0 and "after 'KI' (position 1)" in out and "p('N', the real next)" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lens=KING §"], "--lens: 1 character(s) not in the vocabulary: '§'"),
        (["--lens=KING", "--lens_at=4"], "--lens_at=4: the text has 4 characters (0..3, or -1 for the last)"),
        (["--lens=FILE:/no/such.txt"], "--lens=FILE:/no/such.txt: no such file"),
    ],
)
def test_lens_errors_are_one_line(trained, capsys, flags, message):
    code, out, err = run_main(capsys, f"--out_dir={trained}", *flags)
    assert code == 1 and out == "" and err == f"sample.py: error: {message}"


def test_lens_of_a_bigram_model_is_an_error(tmp_path, capsys, data_dir):
    train_tiny(data_dir, tmp_path / "out", model_type="bigram", max_iters=1, eval_interval=1, eval_iters=1)
    code, out, err = run_main(capsys, f"--out_dir={tmp_path / 'out'}", "--lens=KING")
    assert code == 1 and "bigram model, which has no layers to look through" in err and len(err.splitlines()) == 1


def test_help_lists_every_option_with_its_meaning(capsys):
    import dataclasses

    import sample as sample_py

    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for f in dataclasses.fields(sample_py.SampleConfig):
        line = next(l for l in out.splitlines() if l.strip().startswith(f"--{f.name}="))
        assert f.metadata["help"] in line


def test_the_attention_picture_labels_every_character_and_leaves_the_future_blank(tmp_path):
    T = 70
    maps = torch.softmax(torch.randn(2, 2, T, T).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), dim=-1)
    chars = ("ROMEO: what say you, my lord? " * 3)[:T]
    fig = sample_py.draw_attention(maps, chars, str(tmp_path / "a.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [{" ": "␣"}.get(c, c) for c in chars]
    image = ax.get_images()[0].get_array()
    assert image.mask[0, 1] and image.mask[5, 69] and not image.mask[69, 0] and not image.mask[3, 3]
    # a prompt longer than can be labelled one by one: every k-th, and the title says so
    fig = sample_py.draw_attention(torch.ones(1, 1, 200, 200) / 200, "x" * 200, str(tmp_path / "b.png"))
    assert len(fig.axes[0].get_xticklabels()) == 67 and fig.get_suptitle() == "200 characters, one label every 3"


class BusyElsewhere:
    """chargpt.machine.CpuShare as it reads while another program keeps one core busy."""

    def since_last_look(self):
        return 1.0

    def others(self):
        return 1.0


def test_a_busy_core_is_left_to_the_program_on_it(trained, capsys, monkeypatch):
    from chargpt import machine

    flags = [f"--out_dir={trained}", "--start=ROMEO:", "--max_new_tokens=40", "--seed=3"]
    code, alone, err = run_main(capsys, *flags, "--threads=1")
    loaded = f"{trained / 'best.pt'}: gpt, "  # the line that says what was loaded
    assert code == 0 and err.startswith(loaded) and len(err.splitlines()) == 1
    monkeypatch.setattr(machine, "CpuShare", BusyElsewhere)
    monkeypatch.setattr(machine.torch, "get_num_threads", lambda: 2)  # a 2-core machine, whatever this one is
    code, out, err = run_main(capsys, *flags)
    assert code == 0 and out == alone  # the same text, on the core left free
    assert err.splitlines()[1:] == ["threads: 1 of 2 (other programs keep 1.0 cores busy; --threads=N fixes it)"]


def test_a_negative_number_of_threads_is_an_error(trained, capsys):
    code, out, err = run_main(capsys, f"--out_dir={trained}", "--threads=-1")
    assert code == 1 and err == "sample.py: error: --threads must be 0 (automatic) or more, got -1"


def test_without_out_dir_the_error_names_the_run_folders_there_are(tmp_path):
    """`python sample.py` alone looks for out/; when only other run folders exist it names
    them (one level down too), and a mistyped --out_dir gets the close one."""
    for folder, name in (("out-cpu", "best.pt"), ("out-lecture/3_multi_head", "ckpt.pt"), ("notes", "x.txt")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / name).write_text("not read")
    result = sample(cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        "sample.py: error: --out_dir out does not exist; the run folders here: out-cpu, out-lecture/3_multi_head "
        "(pass one with --out_dir)"
    )
    result = sample("--out_dir=out-cpy", cwd=tmp_path)
    assert result.stderr.strip() == "sample.py: error: --out_dir out-cpy does not exist (did you mean --out_dir=out-cpu?)"
