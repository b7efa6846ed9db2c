"""What a training run reports while it runs: the progress line, out_dir/metrics.jsonl and
out_dir/loss.png. Used by train.py, and read back by serve.py.

Progress: on a terminal, one line rewritten in place (\\r) a few times a second with the
step, loss, lr, tokens/s, elapsed time and ETA; anywhere else (a log file, CI) the plain
line below every log_interval steps, so logs stay readable and greppable:

    iter 100: loss 2.4811, lr 1.00e-03, 48.2 ms/iter, 15,933 tokens/s, 0.031 TFLOP/s, elapsed 5s, ETA 1m31s

A run with a time budget shows the time left in the budget instead of an ETA to max_iters:

    iter 100: loss 2.4811, lr 1.00e-03, 48.2 ms/iter, 15,933 tokens/s, 0.031 TFLOP/s, elapsed 5s, 14m55s left

metrics.jsonl holds one JSON object per line:
    {"type": "train", "iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "tflops_per_s", "elapsed", "eta", "time"}
        every log_interval steps; loss is that step's batch loss, elapsed and eta are seconds
    {"type": "eval", "iter", "train_loss", "val_loss", "best_val_loss", "elapsed", "time", "sample"}
        at every eval; the losses are estimate_loss's, sample the text printed with it (or null)
    {"type": "health", ...} and {"type": "warning", ...}
        at health steps, and when a warning fires: chargpt/health.py says what they hold
    {"type": "done", "iter", "best_val_loss", "time_budget", "elapsed", "time"}
        last, when the run has finished: iter is the steps it took in all (with a time
        budget, the steps the budget bought), time_budget its minutes (null for a step run)
elapsed counts from the start of train() and goes on across resumes (the checkpoint keeps
it); with a time budget eta is the time left in it. A new run (init_from=scratch) starts
the file afresh. A resumed run keeps the entries up to the step it resumes from, drops any
later ones (written after that checkpoint, by a run that then died) and the "done" entry
of a run it extends, and appends, so the file reads as one run.

loss.png plots train and val loss against the step, with the best val loss marked; it is
redrawn at an eval at most every PLOT_SECONDS (30 s, as health.png) and at the last one.
matplotlib is optional: without it the plot is skipped with a one-time note.
"""

import json
import os
import time

from chargpt.atomic import write_atomic
from chargpt.rundir import resume_command

LIVE_UPDATE_SECONDS = 0.2  # how often the terminal line is redrawn, at most
# how often loss.png is redrawn before the last eval, at most: a drawing takes 0.3-0.4 s on a
# 2-core CPU, so a half-minute run draws it once, at its end
PLOT_SECONDS = 30.0
FEW_STEPS = 0.75  # a budget that buys fewer than this fraction of max_iters says so at the end


def format_duration(seconds):
    """12s, 3m05s, 2h07m: short enough for a status line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def read_records(path, up_to_iter=None):
    """The entries of a metrics.jsonl, those with iter <= up_to_iter if given. A line that does
    not parse (the half-written last line of a killed run or a full disk, even one cut inside
    a character) is skipped."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict) and (up_to_iter is None or record.get("iter", 0) <= up_to_iter):
                records.append(record)
    return records


def import_matplotlib():
    """matplotlib's Figure (a first import takes about 0.4 s), or None where it is absent."""
    try:
        # the object API, not pyplot: no GUI backend, no global figure state
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def step_losses(records):
    """(steps, losses) of every training step the records hold: each "train" record carries
    the losses of the steps since the one before ("losses"); older files kept only the
    logged step's ("loss")."""
    steps, losses = [], []
    for r in records:
        if r.get("type") != "train":
            continue
        batch = r.get("losses") or [r["loss"]]
        steps += range(r["iter"] - len(batch) + 1, r["iter"] + 1)
        losses += batch
    return steps, losses


def smooth(values, span):
    """The mean of each value's neighbourhood, about span values wide, centred on it and
    narrower near the ends (at the first and last value, the value itself): the curve a
    learner reads through the noise of one-batch losses, without the lag of a running
    average where the loss falls fast."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    n, half = len(values), span // 2
    out = []
    for i in range(n):
        w = min(half, i, n - 1 - i)
        out.append((sums[i + w + 1] - sums[i - w]) / (2 * w + 1))
    return out


def plot_losses(records, path, title=""):
    """Draw the loss curves into path (PNG): the train loss at every step, smoothed over the
    noise of single batches, and the eval estimates of train and val loss with the best
    val marked. False when matplotlib is absent."""
    Figure = import_matplotlib()
    if Figure is None:
        return False
    steps, losses = step_losses(records)
    evals = [r for r in records if r.get("type") == "eval"]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.2, lw=0.8, label="train loss, one batch a step")
        span = max(5, len(losses) // 25)
        ax.plot(steps, smooth(losses, span), color="tab:blue", lw=1.8, label=f"train loss, mean of ~{span} steps")
    if evals:
        at = [r["iter"] for r in evals]
        ax.plot(at, [r["train_loss"] for r in evals], "o", color="tab:blue", ms=4, label="train loss (eval)")
        ax.plot(at, [r["val_loss"] for r in evals], "o-", color="tab:orange", ms=4, label="val loss (eval)")
        best = min(evals, key=lambda r: r["val_loss"])
        label = f"best val {best['val_loss']:.4f} at {best['iter']}"
        ax.plot([best["iter"]], [best["val_loss"]], "*", color="tab:red", ms=14, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if steps or evals:
        ax.legend(loc="upper right")  # "best" searches the curves and warns that it is slow
    # whole or not at all, so a viewer never sees half a PNG
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), durable=False)
    return True


class Reporter:
    """Progress for a person and metrics for a program, from one training run.

    log prints a finished line; live is a terminal stream for the in-place line, or None for
    plain lines. Messages must go through self.log so that they never land on top of the
    live line."""

    def __init__(
        self,
        out_dir,
        log,
        live,
        start_iter,
        max_iters,
        tokens_per_iter,
        resume,
        write_files=True,
        time_budget=0.0,
        t_start=None,
        elapsed_before=None,
        world_size=1,
    ):
        """time_budget: seconds, for a run that stops when they are spent (0: a step run, which
        stops at max_iters); t_start: when the run's clock started (default: now);
        elapsed_before: seconds spent by the earlier parts of a resumed run (default: the last
        elapsed kept in metrics.jsonl)."""
        self._log, self.live = log, live
        self.start_iter, self.max_iters, self.tokens_per_iter = start_iter, max_iters, tokens_per_iter
        self.time_budget = time_budget
        self.out_dir, self.world_size = out_dir, world_size  # for the command that continues the run
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.plot_path = os.path.join(out_dir, "loss.png")
        self.title = os.path.basename(os.path.abspath(out_dir))
        self.write_files = write_files  # False in all but one of several processes
        kept = read_records(self.metrics_path, up_to_iter=start_iter) if resume else []
        self.records = [r for r in kept if r.get("type") != "done"]  # a resumed run ends anew
        if write_files:
            with open(self.metrics_path, "w", encoding="utf-8") as f:  # afresh, or cut at the resume point
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        if elapsed_before is None:
            elapsed_before = self.records[-1].get("elapsed", 0.0) if self.records else 0.0
        self.elapsed_before = elapsed_before
        self.t_start = time.time() if t_start is None else t_start  # elapsed counts from here
        self.t_loop = time.time()  # the pace of the steps (ETA, tokens/s) counts from here, after the start-up
        self.live_showing, self.plot_note_given = False, False
        self.t_plot = self.t_loop  # the first drawing waits PLOT_SECONDS, or the last eval
        self.t_mark, self.iter_mark = self.t_loop, start_iter  # where the live line's tokens/s counts from
        self.t_last, self.iter_last = self.t_loop, start_iter  # where the logged ms/iter counts from

    def prepare_to_draw(self):
        """Import matplotlib now (about a second on a 2-core CPU) rather than at the first
        drawing: for a run that a time budget may end, which plans its end with the time its
        last eval took, and an eval that imported would make it stop early (a 12-s run
        reserved 0.9 s too much). Other runs pay it at their first drawing, which for a short
        run is its last: its losses are printed a second sooner."""
        if self.write_files:
            import_matplotlib()

    # -- time

    def elapsed(self):
        """Seconds since the run started (train(), loading included), counting the earlier parts of a resumed one."""
        return self.elapsed_before + time.time() - self.t_start

    def eta(self, iter_num):
        """Seconds to the end of the run at its pace so far (eval time included): to max_iters,
        or with a time budget to whichever of it and the budget's end comes first. None
        before the first step of a run without a budget."""
        done = iter_num - self.start_iter
        to_max_iters = (time.time() - self.t_loop) / done * (self.max_iters - iter_num) if done > 0 else None
        if not self.time_budget:
            return to_max_iters
        left = max(0.0, self.time_budget - self.elapsed())
        return left if to_max_iters is None else min(left, to_max_iters)

    def _times(self, iter_num):
        eta = self.eta(iter_num)
        if self.time_budget:
            return f"elapsed {format_duration(self.elapsed())}, {format_duration(eta)} left"
        return f"elapsed {format_duration(self.elapsed())}, ETA {'?' if eta is None else format_duration(eta)}"

    # -- output

    def log(self, message):
        if self.live_showing:
            self.live.write("\n")  # keep the last live line, start a fresh one below it
            self.live_showing = False
        self._log(message)

    def _write(self, record):
        record = {**record, "elapsed": round(self.elapsed(), 3), "time": round(time.time(), 3)}
        self.records.append(record)
        if self.write_files:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")  # ASCII only: a line cut short never splits a character
        return record

    def write(self, record):
        """Another module's record (chargpt/health.py's "health" and "warning") into metrics.jsonl."""
        return self._write(record)

    def live_due(self):
        """True when the terminal line is worth redrawing now (never without a terminal)."""
        return self.live is not None and time.time() - self.t_mark >= LIVE_UPDATE_SECONDS

    def show_live(self, iter_num, loss, lr):
        now = time.time()
        tokens_per_s = self.tokens_per_iter * (iter_num - self.iter_mark) / max(now - self.t_mark, 1e-9)
        self.t_mark, self.iter_mark = now, iter_num
        line = (
            f"iter {iter_num}/{self.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tokens/s | {self._times(iter_num).replace(', ', ' | ')}"
        )
        self.live.write("\r" + line + "\x1b[K")  # \x1b[K clears what a longer line left behind
        self.live.flush()
        self.live_showing = True

    def train_step(self, iter_num, loss, lr, flops_per_iter, losses=()):
        """Every log_interval steps: a metrics entry, and the plain line where there is no
        terminal. losses: this process's loss at every step since the last entry."""
        now = time.time()
        dt = (now - self.t_last) / max(1, iter_num - self.iter_last)  # per step since the last line or eval
        self.t_last, self.iter_last = now, iter_num
        tokens_per_s = self.tokens_per_iter / dt
        eta = self.eta(iter_num)
        self._write(
            {
                "type": "train",
                "iter": iter_num,
                "loss": loss,
                "losses": [round(v, 4) for v in losses],
                "lr": lr,
                "ms_per_iter": dt * 1000,
                "tokens_per_s": tokens_per_s,
                "tflops_per_s": flops_per_iter / dt / 1e12,
                "eta": None if eta is None else round(eta, 3),
            }
        )
        if self.live is None:
            self.log(
                f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, "
                f"{tokens_per_s:,.0f} tokens/s, {flops_per_iter / dt / 1e12:.3f} TFLOP/s, {self._times(iter_num)}"
            )

    def eval(self, iter_num, losses, best_val_loss, sample=None, last=False):
        """After an eval: its metrics entry, the sample printed below it, and loss.png: redrawn
        at the last eval, and before it at most every PLOT_SECONDS."""
        self._write(
            {
                "type": "eval",
                "iter": iter_num,
                "train_loss": losses["train"],
                "val_loss": losses["val"],
                "best_val_loss": best_val_loss,
                "sample": sample,
            }
        )
        if sample:
            self.log("\n".join("  " + line for line in sample.lstrip("\n").splitlines()))
        if last or time.time() - self.t_plot >= PLOT_SECONDS:
            self.t_plot = time.time()
            if not plot_losses(self.records, self.plot_path, self.title) and not self.plot_note_given:
                self.log("note: matplotlib is not installed, so there is no loss.png (pip install matplotlib)")
                self.plot_note_given = True
        # the time of the eval is not step time: tokens/s and ms/iter count from here
        self.t_mark = self.t_last = time.time()
        self.iter_mark = self.iter_last = iter_num

    def done(self, iter_num, best_val_loss):
        """The run's last line and metrics entry: the steps it took (or its time budget
        bought) and the time, from the start of the first part of a resumed run. A budget
        that bought far fewer steps than the run's max_iters says so, with the way on."""
        minutes = self.time_budget / 60 if self.time_budget else None
        record = self._write({"type": "done", "iter": iter_num, "best_val_loss": best_val_loss, "time_budget": minutes})
        elapsed = record["elapsed"]
        by_budget = minutes is not None and iter_num < self.max_iters
        spent = f"budget of {minutes:g} min spent: " if by_budget else ""
        over = f" ({elapsed - self.time_budget:.1f}s over it)" if by_budget and elapsed > self.time_budget + 0.05 else ""
        self.log(f"done: {spent}{iter_num:,} steps in {elapsed:.1f}s{over}, best val loss {best_val_loss:.4f}")
        if by_budget and iter_num < FEW_STEPS * self.max_iters:
            self.log(self.few_steps_note(iter_num, minutes, elapsed))

    def few_steps_note(self, iter_num, minutes, elapsed):
        steps = iter_num - self.start_iter
        pace = (time.time() - self.t_loop) / steps if steps > 0 else None
        at = f" at {pace * 1000:,.0f} ms a step here" if pace else ""
        need = f" (about {format_duration(elapsed + pace * (self.max_iters - iter_num))} here)" if pace else ""
        more = max(minutes * 2, (elapsed + pace * (self.max_iters - iter_num)) / 60 * 1.1) if pace else minutes * 4
        command = resume_command(self.out_dir, f"--time_budget={more:.2g}", world_size=self.world_size)
        return (
            f"note: the {minutes:g}-minute budget bought {iter_num:,} of the {self.max_iters:,} steps this run plans{at}, "
            f"so the model is undertrained (a busy or slow machine?): for all of them, --time_budget={more:.2g} "
            f"or --time_budget=0{need}; to go on from here: {command}"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.live_showing:
            self.live.write("\n")
            self.live.flush()
            self.live_showing = False
