"""What is protected in out_dir: a trained model from a new run (unless --overwrite=True), a
running training from a second one (an OS lock that kill -9 frees), and readers (sample.py,
eval.py) from a run that saves while they read."""

import errno
import os
import signal
import subprocess
import sys

import pytest

import eval as eval_py
import sample
import train
from chargpt import rundir
from chargpt.checkpoint import load_checkpoint, model_from_checkpoint
from conftest import ROOT, tiny_configs, tiny_flags


def flags(data_dir, out_dir, **extra):
    return tiny_flags(
        data_dir,
        out_dir,
        **{"max_iters": 10, "eval_interval": 5, "eval_iters": 2, "sample_chars": 0, "eval_sample_chars": 0, **extra},
    )


def main_error(capsys, module, argv):
    """Run a script's main in-process; return its exit code and stderr."""
    code = module.main(argv)
    return code, capsys.readouterr().err.strip()


def snapshot(folder):
    """{name: bytes} of every file in folder, hidden ones included."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def start_training(data_dir, out_dir, **extra):
    """A real train.py process that trains for long; returns once it has saved a checkpoint
    and is taking steps."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags(data_dir, out_dir, max_iters=100000, log_interval=1, **extra)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    for line in proc.stdout:
        if line.startswith("iter 2:"):  # the step-0 checkpoint is on disk
            return proc
    raise AssertionError(f"train.py did not start: {proc.communicate()[1]}")


def test_a_new_run_refuses_an_out_dir_with_a_trained_model(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    summary = train.train(
        *tiny_configs(data_dir, out, max_iters=10, eval_interval=5, sample_chars=20, eval_sample_chars=0), log=lambda m: None
    )
    before = snapshot(out)
    assert "best.pt" in before and "ckpt.pt" in before

    # the most common mistake: the same command again, or another experiment into the same folder
    code, err = main_error(capsys, train, flags(data_dir, out, max_iters=3))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(
        f"train.py: error: --out_dir {out} already holds a trained model (ckpt.pt at step 10, "
        f"best val loss {summary['best_val_loss']:.4f})"
    ), err
    for way in ("--init_from=resume", "another --out_dir", "--overwrite=True"):
        assert way in err
    assert snapshot(out) == before  # every file byte for byte, the lock file too

    # with best.pt alone there is nothing to resume: the message does not offer it
    os.remove(out / "ckpt.pt")
    code, err = main_error(capsys, train, flags(data_dir, out, max_iters=3))
    assert code == 1 and "(best.pt at step" in err and "--init_from=resume" not in err, err

    # resuming is what the folder is for: it goes on from the checkpoint
    (out / "ckpt.pt").write_bytes(before["ckpt.pt"])
    lines = []
    config, model_config = tiny_configs(
        data_dir, out, init_from="resume", max_iters=15, eval_interval=5, sample_chars=0, eval_sample_chars=0
    )
    assert train.train(config, model_config, log=lines.append)["iter_num"] == 15
    assert any("resuming from" in line and "at step 10" in line for line in lines)


def test_a_run_that_died_before_its_first_checkpoint_is_not_protected(data_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"type": "train", "iter": 10, "loss": 3.0}\n')
    (out / ".tmp-ckpt.ptabc").write_bytes(b"half a checkpoint")
    train.train(
        *tiny_configs(data_dir, out, max_iters=5, eval_interval=5, sample_chars=0, eval_sample_chars=0), log=lambda m: None
    )
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 5
    assert not (out / ".tmp-ckpt.ptabc").exists()
    assert '"iter": 10' not in (out / "metrics.jsonl").read_text()


def test_overwrite_starts_afresh(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    train.train(
        *tiny_configs(data_dir, out, max_iters=10, eval_interval=5, sample_chars=20, eval_sample_chars=0), log=lambda m: None
    )
    old_best = (out / "best.pt").read_bytes()
    assert train.main(flags(data_dir, out, max_iters=0, overwrite=True)) == 0
    # the new run's step-0 model, and nothing left of the old run
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 0
    assert load_checkpoint(str(out / "best.pt"))["iter_num"] == 0 and (out / "best.pt").read_bytes() != old_best
    assert not (out / "samples.txt").exists()

    code, err = main_error(capsys, train, flags(data_dir, out, init_from="resume", overwrite=True))
    assert code == 1 and err == (
        "train.py: error: --overwrite=True is for a new run (--init_from=scratch); a resumed run goes on in its out_dir"
    ), err


def test_a_refused_run_leaves_no_folder_behind(data_dir, tmp_path, capsys):
    out = tmp_path / "new" / "o"
    code, err = main_error(capsys, train, flags(data_dir, out, batch_size=10**9))
    assert code == 1 and "needs about" in err, err
    assert not (tmp_path / "new").exists()


def test_a_folder_that_cannot_be_locked_is_a_clear_error(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with pytest.raises(ValueError, match=r"cannot lock .*\.lock \(No locks available\).*local disk"):
        rundir.claim(str(tmp_path / "new" / "o"), fresh=True, overwrite=False)
    assert not (tmp_path / "new").exists()


def test_one_run_per_out_dir_and_kill_9_frees_it(data_dir, tmp_path, capsys):
    """A second run into the folder of a live one is refused, naming its pid, whether it
    starts afresh or resumes; once the first is killed with SIGKILL, a resume starts."""
    out = tmp_path / "o"
    proc = start_training(data_dir, out)
    try:
        for extra in ({}, {"overwrite": True}, {"init_from": "resume"}):
            code, err = main_error(capsys, train, flags(data_dir, out, **extra))
            assert code == 1 and len(err.splitlines()) == 1, err
            assert f"--out_dir {out} is in use by another training run (pid {proc.pid})" in err, err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    killed_at = load_checkpoint(str(out / "ckpt.pt"))["iter_num"]
    config, model_config = tiny_configs(
        data_dir, out, init_from="resume", max_iters=killed_at + 2, eval_interval=100000, sample_chars=0, eval_sample_chars=0
    )
    assert train.train(config, model_config, log=lambda m: None)["iter_num"] == killed_at + 2


def test_sample_and_eval_read_while_a_run_saves(data_dir, tmp_path, capsys):
    """sample.py and eval.py load the checkpoints while a real train.py replaces them at every
    step: every read gets a whole checkpoint."""
    out = tmp_path / "o"
    proc = start_training(data_dir, out, n_embd=128, eval_interval=1, eval_iters=1)  # saves at every step
    try:
        # read until the run has replaced the checkpoint under us several times (however fast
        # this machine trains), and at least 10 times
        steps_seen, reads = set(), 0
        while len(steps_seen) < 5 or reads < 10:
            assert proc.poll() is None, proc.communicate()[1]
            assert sample.main([f"--out_dir={out}", "--max_new_tokens=20", "--device=cpu"]) == 0
            out_text = capsys.readouterr().out
            assert len(out_text) == 1 + 20 + 1  # the start newline, 20 characters, a newline
            checkpoint = load_checkpoint(str(out / "ckpt.pt"))
            model_from_checkpoint(checkpoint)  # the weights fit the config: not half of one
            steps_seen.add(checkpoint["iter_num"])
            if reads % 4 == 0:
                assert eval_py.main([f"--out_dir={out}", f"--data_dir={data_dir}", "--device=cpu"]) == 0
                assert "val loss" in capsys.readouterr().out
            reads += 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
