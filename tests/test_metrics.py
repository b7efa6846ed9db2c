"""What a run reports: the plain log line, the live terminal line, metrics.jsonl, loss.png,
the sample at each eval, and what a resume does to the metrics."""

import io
import json
import re
import sys

import train
from chargpt import metrics
from conftest import tiny_configs


def run(data_dir, out_dir, live=None, **overrides):
    lines = []
    summary = train.train(*tiny_configs(data_dir, out_dir, **overrides), log=lines.append, live=live)
    return summary, "\n".join(lines)


def records(out_dir, kind):
    entries = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [e for e in entries if e["type"] == kind]


def test_log_lines_metrics_and_plot(data_dir, tmp_path):
    out = tmp_path / "out"
    _, log = run(data_dir, out, eval_sample_chars=30)
    # the plain line keeps its old fields, in order, and ends with elapsed and ETA
    assert re.search(
        r"^iter 30: loss \d+\.\d+, lr \S+, \S+ ms/iter, \S+ tokens/s, \S+ TFLOP/s, elapsed \d+s, ETA \d+s$", log, re.M
    ), log
    evals, steps = records(out, "eval"), records(out, "train")
    assert [e["iter"] for e in evals] == [0, 20, 40] and [s["iter"] for s in steps] == [10, 20, 30, 40]
    logged_val = [float(v) for v in re.findall(r"step \d+: train loss \S+, val loss (\d+\.\d+)", log)]
    assert [round(e["val_loss"], 4) for e in evals] == logged_val
    assert evals[-1]["best_val_loss"] == min(e["val_loss"] for e in evals)
    assert steps[-1]["eta"] == 0 and all(s["loss"] > 0 and s["tokens_per_s"] > 0 for s in steps)
    # each eval prints its sample (indented) and stores it; the seed is fixed, so the text changes
    # only because the model does
    assert all(len(e["sample"]) == 31 for e in evals) and evals[0]["sample"] != evals[-1]["sample"]
    assert "  " + evals[-1]["sample"].lstrip("\n").splitlines()[0] in log
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_sample_can_be_switched_off(data_dir, tmp_path):
    out = tmp_path / "out"
    run(data_dir, out, eval_sample_chars=0, max_iters=10, eval_interval=10)
    assert [e["sample"] for e in records(out, "eval")] == [None, None]


def test_without_matplotlib_the_plot_is_skipped_with_one_note(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "out"
    _, log = run(data_dir, out)
    assert log.count("matplotlib is not installed") == 1
    assert not (out / "loss.png").exists() and len(records(out, "eval")) == 3


def test_live_line_on_a_terminal(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "LIVE_UPDATE_SECONDS", 0.0)  # redraw at every step
    terminal = io.StringIO()
    out = tmp_path / "out"
    _, log = run(data_dir, out, live=terminal)
    shown = terminal.getvalue()
    assert re.search(r"\riter 7/40 \| loss \d+\.\d+ \| lr \S+ \| \S+ tokens/s \| elapsed \d+s \| ETA \d+s\x1b\[K", shown), shown
    assert "iter 10: loss" not in log  # no plain lines on a terminal ...
    assert [s["iter"] for s in records(out, "train")] == [10, 20, 30, 40]  # ... but the metrics are kept
    assert shown.endswith("\n")  # the last live line is ended before anything else prints


def test_resume_cuts_metrics_back_and_appends(data_dir, tmp_path):
    out = tmp_path / "out"
    kw = dict(max_iters=10, eval_interval=10, log_interval=5, eval_sample_chars=0, sample_chars=0)
    run(data_dir, out, **kw)
    # a run that went on past the checkpoint and died leaves entries the resume must drop
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": "train", "iter": 15, "loss": 9.0, "elapsed": 1e6}) + "\n")
        f.write('{"type": "train", "iter": 1')  # and a half-written line
    run(data_dir, out, **{**kw, "max_iters": 20, "init_from": "resume"})
    assert [e["iter"] for e in records(out, "eval")] == [0, 10, 20]
    steps = records(out, "train")
    assert [s["iter"] for s in steps] == [5, 10, 15, 20] and steps[2]["loss"] != 9.0
    assert steps[-1]["elapsed"] >= steps[1]["elapsed"] and steps[-1]["elapsed"] < 1e6


def test_format_duration():
    assert [metrics.format_duration(s) for s in (0, 59.6, 61, 3599, 3600, 7322)] == [
        "0s",
        "1m00s",
        "1m01s",
        "59m59s",
        "1h00m",
        "2h02m",
    ]
