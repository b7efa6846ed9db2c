"""The lecture, step by step: train every stage of the video and set its val loss beside the lecture's.

    python ladder.py                          # stages 1-7, three seeds each: about 4 minutes on a 2-core CPU
    python ladder.py --stages 2,3 --seeds 1   # some stages, one seed
    python ladder.py --with-scaled            # and stage 8, the lecture's full recipe (a GPU: hours on a CPU)
    python ladder.py --stages 1,2 --seeds 1 --max_iters=300 --eval_iters=20   # a quick look; flags go to train.py
    python ladder.py --help

Each stage is a config in config/lecture/ (1_bigram.py ... 8_dropout_scaled.py), and the
ladder runs exactly what a learner would type, `python train.py config/lecture/N_name.py`,
into OUT_DIR/N_name/ (and OUT_DIR/N_name-seedS/ for the other seeds; each run of the ladder
rewrites them). The small stages run two at a time, one thread each: a model this small
cannot keep two threads busy, so a second run in parallel nearly halves the wall time.
Stage 8 runs alone with every thread.

Each run's best.pt is scored on the whole val split (eval.py's figure). A stage's figure is
the mean over its seeds: from one seed to the next the small stages move by about 0.01-0.02,
as much as some steps of the lecture gain. The Markdown table (stage, what it adds,
parameters, val loss at step 0, the lecture's val loss, ours, the difference, wall time per
run, and the first Block's gradient over the last Block's) is printed and written to
OUT_DIR/ladder.md; val loss by stage, ours beside the lecture's, is drawn into
OUT_DIR/ladder.png (needs matplotlib).

Why a stage does better or worse than the one before is in each run's health records
(metrics.jsonl, chargpt/health.py). The ladder keeps, for the stages with several Blocks,
the std of the loss's gradient at each Block's output at every health step: the gradient
that reaches the first Block over the one at the last (1: as much; 0.01: a hundredth), at
step 0 and as the median over the run, is the table's last column, and
OUT_DIR/ladder-health.png draws it over the run and across the Blocks at step 0: stage 5
without residual connections beside stage 6 with them is the lecture's point about deep
networks.
"""

import argparse
import ast
import glob
import math
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import torch

from chargpt.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chargpt.config import TrainConfig, parse
from chargpt.data import load_dataset
from chargpt.evaluate import evaluate
from chargpt.machine import resolve_device
from chargpt.metrics import format_duration, read_records
from model import GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(ROOT, "config", "lecture")

# the val loss the lecture shows at each stage (stage 5 "does not do very well": no figure)
LECTURE_VAL_LOSS = {1: 2.5, 2: 2.4, 3: 2.28, 4: 2.24, 5: None, 6: 2.08, 7: 2.06, 8: 1.48}
SCALED = 8  # the stage that needs a GPU, run alone with every thread


def find_stages():
    """{number: (config path, what it adds)} from config/lecture/N_name.py; what the stage adds
    is the phrase its docstring starts with ("Stage 3, multi-head attention: ...")."""
    stages = {}
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "[0-9]*_*.py"))):
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        match = re.match(r"Stage \d+, ([^:]+):", doc)
        stages[int(os.path.basename(path).split("_")[0])] = (path, match.group(1) if match else "")
    return stages


def parse_stages(text, available):
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; a stage that does not exist is an error naming it."""
    chosen = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            numbers = range(int(first), int(last or first) + 1)
        except ValueError:
            raise ValueError(f"--stages: {part.strip()!r} is not a stage number or a range like 2-4") from None
        for n in numbers:
            if n not in available:
                raise ValueError(f"--stages: there is no stage {n} (the stages are {min(available)}-{max(available)})")
            chosen.append(n)
    return sorted(set(chosen))


class Run:
    """One `python train.py CONFIG` of the ladder: a stage with one seed, and what its log said."""

    def __init__(self, number, adds, path, seed, out_root, overrides, first_seed):
        self.number, self.adds, self.seed = number, adds, seed
        stem = os.path.basename(path)[:-3]
        out_dir = os.path.join(out_root, stem if seed == first_seed else f"{stem}-seed{seed}")
        # each run of the ladder trains its stages afresh (the folders are the ladder's own)
        self.argv = [path, f"--out_dir={out_dir}", f"--seed={seed}", "--overwrite=True", *overrides]
        # the settings train.py will use, read the way it reads them (errors name the flag)
        (self.config, _), _ = parse(self.argv, [TrainConfig(), GPTConfig()], "ladder.py")
        self.iter, self.init_val, self.val, self.seconds = 0, None, None, None
        self.gradients = []  # [(iter, [gradient std at each Block's output])] of the health steps

    def start(self, threads, events):
        """Start train.py with threads threads (None: PyTorch's default); its lines go to events."""
        self.t_start = time.time()
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), *self.argv],
            cwd=os.getcwd(),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )

        def read():  # a thread per run, so that two runs' lines arrive as they come
            for line in self.proc.stdout:
                events.put((self, line.rstrip("\n")))
            events.put((self, None))

        threading.Thread(target=read, daemon=True).start()

    def read_line(self, line):
        """train.py's plain log: 'iter N: loss ...' every log_interval, 'step N: ... val loss V' at evals."""
        if match := re.match(r"(?:iter|step) (\d+):", line):
            self.iter = int(match.group(1))
        if match := re.match(r"step (\d+): train loss \S+, val loss (\S+)", line):
            self.val = float(match.group(2))
            if self.iter == 0:
                self.init_val = self.val

    def finish(self):
        """Wait for the process; a failed run is an error that quotes train.py's own message."""
        code = self.proc.wait()
        self.seconds = time.time() - self.t_start
        self.stderr.seek(0)
        errors = [line for line in self.stderr.read().splitlines() if line.strip()]
        if code != 0:
            reason = errors[-1] if errors else f"exit code {code}"
            raise ValueError(f"stage {self.number} (seed {self.seed}) failed: python train.py {' '.join(self.argv)}: {reason}")
        self.gradients = block_gradients(os.path.join(self.config.out_dir, "metrics.jsonl"))

    def label(self):
        return f"{self.number} s{self.seed} {self.iter}/{self.config.max_iters}"


class Progress:
    """One line for the whole ladder, redrawn in place on a terminal; elsewhere a line per finished run."""

    def __init__(self, stream, total):
        self.stream, self.total, self.finished = stream, total, 0
        self.live = stream.isatty()
        self.t_start = time.time()
        self.t_drawn = 0.0

    def draw(self, running, force=False):
        if not self.live or (not force and time.time() - self.t_drawn < 0.2):
            return
        self.t_drawn = time.time()
        parts = [f"ladder: {self.finished}/{self.total} runs done"]
        parts += [f"stage {r.label()}" + ("" if r.val is None else f" val {r.val:.3f}") for r in running]
        parts.append(format_duration(time.time() - self.t_start))
        self.stream.write("\r" + " | ".join(parts) + "\x1b[K")
        self.stream.flush()

    def done(self, run, val):
        self.finished += 1
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(
            f"stage {run.number} {run.adds}, seed {run.seed}: val loss {val:.4f} (whole split), "
            f"{format_duration(run.seconds)} [{self.finished}/{self.total}]\n"
        )
        self.stream.flush()


def block_gradients(path):
    """[(iter, [gradient std at each Block's output])] of a run's health records."""
    steps = []
    for record in read_records(path):
        if record.get("type") == "health":
            blocks = [layer["grad_std"] for layer in record["layers"] if layer["name"].startswith("block")]
            if len(blocks) >= 2 and all(g for g in blocks):
                steps.append((record["iter"], blocks))
    return steps


def geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def gradient_ratios(run):
    """The first Block's gradient over the last's at each health step of a run: [(iter, ratio)]."""
    return [(it, blocks[0] / blocks[-1]) for it, blocks in run.gradients]


def score(run):
    """The whole-split val loss of a finished run's best.pt, and its parameter count."""
    device = resolve_device(run.config.device)
    model, _ = model_from_checkpoint(load_checkpoint(find_checkpoint(run.config.out_dir), device), device)
    _, val_data, _ = load_dataset(run.config)
    val, _, _ = evaluate(model, val_data, model.config.block_size, batch_size=256, device=device)
    return val, model.num_params()


def run_all(runs, jobs, threads, progress):
    """Run the runs, jobs at a time; score each as it ends. {run: (val, params)}."""
    events, pending, running, results = queue.Queue(), list(runs), [], {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                running.append(pending.pop(0))
                running[-1].start(threads, events)
            try:
                run, line = events.get(timeout=0.5)
            except queue.Empty:
                progress.draw(running)
                continue
            if line is not None:
                run.read_line(line)
                progress.draw(running)
                continue
            running.remove(run)
            run.finish()
            results[run] = score(run)
            progress.done(run, results[run][0])
            progress.draw(running, force=True)
    finally:
        for run in running:  # an error or Ctrl-C: no orphan trainings
            run.proc.terminate()
            run.proc.wait()
    return results


def rows_of(stages, runs, results):
    """One row per stage: the mean over its seeds."""
    rows = []
    for number in stages:
        mine = [r for r in runs if r.number == number]
        vals = [results[r][0] for r in mine]
        lecture = LECTURE_VAL_LOSS.get(number)
        mean = sum(vals) / len(vals)
        inits = [r.init_val for r in mine if r.init_val is not None]
        ratios = [gradient_ratios(r) for r in mine if r.gradients]
        rows.append(
            {
                "stage": number,
                "adds": mine[0].adds,
                "params": results[mine[0]][1],
                "vals": vals,
                "val": mean,
                "init": sum(inits) / len(inits) if inits else None,
                "lecture": lecture,
                "diff": None if lecture is None else mean - lecture,
                "seconds": sum(r.seconds for r in mine) / len(mine),
                # the first Block's gradient over the last's: at the first step, and the median
                # over the run; each the geometric mean over seeds (they are ratios)
                "grad_init": geometric_mean([r[0][1] for r in ratios]),
                "grad_run": geometric_mean([statistics.median(v for _, v in r) for r in ratios]),
            }
        )
    return rows


def table(rows):
    lines = [
        "| stage | what it adds | parameters | val loss at step 0 | the lecture's val loss | ours | difference | wall time per run "
        "| gradient: first Block / last Block (step 0; median of the run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = f"{r['val']:.4f}" + (f" ({min(r['vals']):.4f}-{max(r['vals']):.4f})" if len(r["vals"]) > 1 else "")
        lecture = "-" if r["lecture"] is None else f"{r['lecture']:.2f}"
        diff = "-" if r["diff"] is None else f"{r['diff']:+.3f}"
        init = "-" if r["init"] is None else f"{r['init']:.2f}"
        gradient = "-" if r["grad_init"] is None else f"{r['grad_init']:.3g}; {r['grad_run']:.3g}"
        lines.append(
            f"| {r['stage']} | {r['adds']} | {r['params']:,} | {init} | {lecture} | {ours} | {diff} | "
            f"{format_duration(r['seconds'])} | {gradient} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    """Val loss by stage, ours beside the lecture's; False when matplotlib is absent."""
    try:
        from matplotlib.figure import Figure  # the object API: no GUI backend needed
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    x = list(range(len(rows)))
    lecture = [(i, r["lecture"]) for i, r in zip(x, rows) if r["lecture"] is not None]
    bars = ax.bar([i - width / 2 for i, _ in lecture], [v for _, v in lecture], width, label="the lecture", color="tab:gray")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    bars = ax.bar(
        [i + width / 2 for i in x],
        [r["val"] for r in rows],
        width,
        label="ours (whole val split, mean over seeds)",
        color="tab:blue",
    )
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=8)
    for i, r in zip(x, rows):  # each seed's figure, to show the spread
        ax.plot([i + width / 2] * len(r["vals"]), r["vals"], ".", color="black", ms=4)
    ax.set_xticks(x, [f"{r['stage']}\n" + textwrap.fill(r["adds"], 16) for r in rows], fontsize=8)
    values = [r["val"] for r in rows] + [v for _, v in lecture]
    ax.set_ylim(max(0.0, min(values) - 0.3), max(values) + 0.15)
    ax.set_ylabel("val loss (nats per character)")
    ax.set_title("The lecture, step by step")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def plot_health(stages, runs, path):
    """The gradient that reaches each Block, for the stages with several: the first Block's
    over the last's along the run (a line per seed), and across the Blocks at step 0 (the
    first seed). False when matplotlib is absent or no stage has several Blocks."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    deep = [n for n in stages if any(r.gradients for r in runs if r.number == n)]
    if not deep:
        return False
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_run, ax_depth = fig.subplots(1, 2)
    for k, number in enumerate(deep):
        colour = f"C{k}"
        mine = [r for r in runs if r.number == number and r.gradients]
        for i, run in enumerate(mine):
            ratios = gradient_ratios(run)
            label = f"stage {number}: {run.adds}" if i == 0 else None
            ax_run.plot([it - 1 for it, _ in ratios], [v for _, v in ratios], color=colour, lw=1.2, alpha=0.8, label=label)
        blocks = mine[0].gradients[0][1]
        ax_depth.plot(range(len(blocks)), blocks, "o-", color=colour, label=f"stage {number}: {mine[0].adds}")
    ax_run.axhline(1.0, color="black", ls="--", lw=1)
    ax_run.set_yscale("log")
    ax_run.set_xlabel("step")
    ax_run.set_ylabel("first Block's gradient / last Block's")
    ax_run.set_title("the gradient that reaches the first Block, over the run", fontsize=10)
    ax_depth.set_yscale("log")
    ax_depth.set_xticks(range(len(blocks)), [f"block {i}" for i in range(len(blocks))])
    ax_depth.set_ylabel("std of the loss's gradient at the Block's output")
    ax_depth.set_title("the gradient at each Block at step 0", fontsize=10)
    for ax in (ax_run, ax_depth):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--stages", default="1-7", help="which stages: '1-7' (the default), '2,3', '1,4-6'")
    parser.add_argument(
        "--with-scaled",
        "--with_scaled",
        dest="with_scaled",
        action="store_true",
        help="add stage 8, the lecture's full recipe (hours on a CPU; about 15 minutes on an A100)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="runs per stage, seeded 1337, 1338, ...; the table shows their mean")
    parser.add_argument("--jobs", type=int, default=2, help="small-stage runs at once, one thread each")
    parser.add_argument(
        "--out_dir", default="out-ladder", help="where the runs go (OUT_DIR/N_name), and ladder.md and ladder.png"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.seeds < 1 or args.jobs < 1:
            raise ValueError(f"--{'seeds' if args.seeds < 1 else 'jobs'} must be at least 1")
        stages = find_stages()
        chosen = parse_stages(args.stages, stages)
        if args.with_scaled and SCALED not in chosen:
            chosen.append(SCALED)
        first_seed = TrainConfig().seed
        runs = [
            Run(n, stages[n][1], stages[n][0], first_seed + s, args.out_dir, overrides, first_seed)
            for n in chosen
            for s in range(args.seeds)
        ]
        os.makedirs(args.out_dir, exist_ok=True)
        progress = Progress(sys.stdout, len(runs))
        all_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this process only scores the runs, beside the ones training
        try:
            results = run_all([r for r in runs if r.number != SCALED], args.jobs, 1, progress)
        finally:
            torch.set_num_threads(all_threads)
        results.update(run_all([r for r in runs if r.number == SCALED], 1, None, progress))
    except (ValueError, OSError) as e:
        if sys.stdout.isatty():
            print()  # below the progress line
        print(f"ladder.py: error: {e}", file=sys.stderr)
        return 1
    rows = rows_of(chosen, runs, results)
    text = table(rows)
    with open(os.path.join(args.out_dir, "ladder.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("\n" + text)
    print(
        f"\n{len(runs)} runs in {format_duration(time.time() - progress.t_start)}; the table is in "
        f"{os.path.join(args.out_dir, 'ladder.md')}"
    )
    png = os.path.join(args.out_dir, "ladder.png")
    print(
        f"the plot: {png}"
        if plot(rows, png)
        else "note: matplotlib is not installed, so there is no ladder.png (pip install matplotlib)"
    )
    png = os.path.join(args.out_dir, "ladder-health.png")
    if plot_health(chosen, runs, png):
        print(f"the gradient that reaches each Block: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
