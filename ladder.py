"""The lecture, step by step: train every stage of the video and set its val loss beside the lecture's.

    python ladder.py                          # stages 1-7, a few minutes on a 2-core CPU
    python ladder.py --stages 2,3             # some of them
    python ladder.py --with-scaled            # and stage 8, the lecture's full recipe (a GPU: hours on a CPU)
    python ladder.py --stages 1,2 --max_iters=300 --eval_iters=20   # a quick look; flags go to every stage
    python ladder.py --help

Each stage is a config in config/lecture/ (1_bigram.py ... 8_dropout_scaled.py) that
`python train.py config/lecture/N_name.py` runs on its own; this trains them one after the
other into OUT_DIR/N_name/ (rewritten by every run of the ladder), scores each best.pt on the
whole val split (eval.py's figure) and prints a Markdown table: stage, what it adds,
parameters, the loss at step 0, the lecture's val loss, ours, the difference and the wall
time. The table also goes to OUT_DIR/ladder.md, and a plot of val loss by stage, ours
beside the lecture's, to OUT_DIR/ladder.png (needs matplotlib).
"""

import argparse
import ast
import glob
import os
import re
import sys
import time

import train
from checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from configurator import parse
from eval import evaluate
from metrics import format_duration
from model import GPTConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "lecture")

# the val loss the lecture shows at each stage (stage 5 "does not do very well": no figure)
LECTURE_VAL_LOSS = {1: 2.5, 2: 2.4, 3: 2.28, 4: 2.24, 5: None, 6: 2.08, 7: 2.06, 8: 1.48}
SCALED = 8  # the stage that needs a GPU


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
            raise ValueError(f"--stages: {part.strip()!r} is not a stage number or range like 2-4") from None
        for n in numbers:
            if n not in available:
                raise ValueError(f"--stages: there is no stage {n} (the stages are {min(available)}-{max(available)})")
            chosen.append(n)
    return sorted(set(chosen))


class Progress:
    """One line for the whole ladder, redrawn in place on a terminal; elsewhere each stage's
    evals are printed as plain lines."""

    def __init__(self, stream, total):
        self.stream, self.total = stream, total
        self.live = stream.isatty()
        self.t_start = time.time()

    def stage(self, index, number, adds, max_iters):
        self.index, self.number, self.adds, self.max_iters = index, number, adds, max_iters
        self.t_stage, self.iter, self.loss, self.val = time.time(), 0, None, None
        self._draw()

    def log(self, message):
        """train.py's log lines: 'iter N: loss ...' every log_interval, 'step N: ... val loss ...' at evals."""
        if match := re.match(r"iter (\d+): loss (\S+),", message):
            self.iter, self.loss = int(match.group(1)), float(match.group(2))
        elif match := re.match(r"step (\d+): train loss \S+, val loss (\S+)", message):
            self.iter, self.val = int(match.group(1)), float(match.group(2))
            if not self.live:
                self.stream.write(f"[{self.number} {self.adds}] {message}\n")
        elif message.startswith(("resuming", "note:")) and not self.live:
            self.stream.write(f"[{self.number}] {message}\n")
        self._draw()

    def _draw(self):
        if not self.live:
            return
        parts = [f"stage {self.number} ({self.index}/{self.total}) {self.adds}", f"iter {self.iter}/{self.max_iters}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.val is not None:
            parts.append(f"val {self.val:.3f}")
        parts.append(f"{format_duration(time.time() - self.t_stage)} (ladder {format_duration(time.time() - self.t_start)})")
        self.stream.write("\r" + " | ".join(parts) + "\x1b[K")
        self.stream.flush()

    def done(self, row):
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"stage {row['stage']} {row['adds']}: val loss {row['val']:.4f} (lecture "
                          f"{'-' if row['lecture'] is None else row['lecture']}), {format_duration(row['seconds'])}\n")
        self.stream.flush()


def run_stage(number, path, adds, out_dir, overrides, progress, index):
    """Train one stage and score it; its row of the table as a dict."""
    (config, model_config), _ = parse([path, f"--out_dir={os.path.join(out_dir, os.path.basename(path)[:-3])}",
                                      *overrides], [train.TrainConfig(), GPTConfig()], "ladder.py")
    progress.stage(index, number, adds, config.max_iters)
    t0 = time.time()
    first_val = []

    def log(message):
        if message.startswith("step 0:"):  # the loss before any training
            first_val.append(float(message.rsplit(" ", 1)[1]))
        progress.log(message)

    train.train(config, model_config, log=log)
    device = train.resolve_device(config.device)
    model, _ = model_from_checkpoint(load_checkpoint(find_checkpoint(config.out_dir), device), device)
    _, val_data, _ = train.load_dataset(config)
    val, _, _ = evaluate(model, val_data, model.config.block_size, batch_size=256, device=device)
    seconds = time.time() - t0  # training and the whole-split score
    lecture = LECTURE_VAL_LOSS.get(number)
    return {"stage": number, "adds": adds, "params": model.num_params(), "init": first_val[0] if first_val else None,
            "lecture": lecture, "val": val, "diff": None if lecture is None else val - lecture, "seconds": seconds,
            "config": os.path.relpath(path, os.path.dirname(CONFIG_DIR))}


def table(rows):
    lines = ["| stage | what it adds | parameters | val loss at step 0 | lecture's val loss | ours | difference | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lecture = "-" if r["lecture"] is None else f"{r['lecture']:.2f}"
        diff = "-" if r["diff"] is None else f"{r['diff']:+.2f}"
        init = "-" if r["init"] is None else f"{r['init']:.2f}"
        lines.append(f"| {r['stage']} | {r['adds']} | {r['params']:,} | {init} | {lecture} | {r['val']:.4f} | {diff} | "
                     f"{format_duration(r['seconds'])} |")
    return "\n".join(lines)


def plot(rows, path):
    """Val loss by stage, ours beside the lecture's; False when matplotlib is absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    x = range(len(rows))
    width = 0.38
    ours = ax.bar([i + width / 2 for i in x], [r["val"] for r in rows], width, label="ours (whole val split)", color="tab:blue")
    lecture = [(i - width / 2, r["lecture"]) for i, r in zip(x, rows) if r["lecture"] is not None]
    ax.bar([i for i, _ in lecture], [v for _, v in lecture], width, label="the lecture", color="tab:gray")
    ax.bar_label(ours, fmt="%.2f", fontsize=8)
    ax.set_xticks(list(x), [f"{r['stage']}\n{r['adds']}" for r in rows], fontsize=7)
    low = min(min(r["val"] for r in rows), min((v for _, v in lecture), default=9.9))
    ax.set_ylim(max(0.0, low - 0.3), max(r["val"] for r in rows) + 0.15)
    ax.set_ylabel("val loss (nats per character)")
    ax.set_title("The lecture, step by step")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--stages", default="1-7", help="which stages: '1-7' (the default), '2,3', '1,4-6'")
    parser.add_argument("--with-scaled", "--with_scaled", dest="with_scaled", action="store_true",
                        help="add stage 8, the lecture's full recipe (hours on a CPU; ~15 minutes on an A100)")
    parser.add_argument("--out_dir", default="out-ladder", help="where each stage's run goes (OUT_DIR/N_name), and the table and plot")
    args, overrides = parser.parse_known_args(argv)
    try:
        stages = find_stages()
        chosen = parse_stages(args.stages, stages)
        if args.with_scaled and SCALED not in chosen:
            chosen.append(SCALED)
        os.makedirs(args.out_dir, exist_ok=True)
        progress = Progress(sys.stdout, len(chosen))
        rows = []
        for index, number in enumerate(chosen, 1):
            path, adds = stages[number]
            rows.append(run_stage(number, path, adds, args.out_dir, overrides, progress, index))
            progress.done(rows[-1])
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"ladder.py: error: {e}", file=sys.stderr)
        return 1
    text = table(rows)
    with open(os.path.join(args.out_dir, "ladder.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("\n" + text)
    total = sum(r["seconds"] for r in rows)
    print(f"\n{len(rows)} stages in {format_duration(total)} of training; the table is in {args.out_dir}/ladder.md")
    png = os.path.join(args.out_dir, "ladder.png")
    print(f"the plot: {png}" if plot(rows, png) else "note: matplotlib is not installed, so there is no ladder.png (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
