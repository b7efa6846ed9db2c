"""How far a training run is, and the learning rate there. Used by train.py.

A run stops at max_iters steps or, with a time_budget (minutes), when the budget is spent,
whichever comes first. Either way its progress p goes from 0 to 1 and the learning rate is
a function of p, so the same schedule fits a 20-second run and a 15-minute one:

    steps         p = (it - warmup_iters) / (lr_decay_iters - warmup_iters), lr_decay_iters
                  defaulting to max_iters: the fraction of the steps after warmup
    time          p = elapsed / (time_budget - what the end of the run needs): the fraction
                  of the wall time for steps spent, counted from the start of train() and
                  across resumes, so that the last step is at the end of the schedule and
                  the final eval, checkpoint and sample come after it (warmup is a few
                  seconds of the budget, so it is not taken out)

With a budget p is the larger of the two: the schedule follows whichever limit is nearer,
so it ends where the run ends. On a quiet machine that reaches max_iters before the budget
the steps lead throughout, and the run is the same as without the budget.

lr_schedule picks the shape over p (after warmup):
    cosine  from learning_rate down to min_lr along half a cosine (the default)
    wsd     warmup-stable-decay: learning_rate until the last cooldown_frac of the run, then
            a straight line down to min_lr at p = 1

Warmup stays in steps in both kinds of run: the first updates are noisy because AdamW's
estimate of each gradient's size averages about 1 / (1 - beta2) = 100 steps, however fast
the machine takes them. A budget run that ends inside its warmup still decays: its learning
rate is the lower of the warmup's and the schedule's.

RunProgress decides when a budget run stops: before each step it asks whether one more
step, the eval due now, and the final eval, checkpoint and samples.txt still fit in the
budget, from their measured times (the eval at step 0 gives the first measurement). On a
shared machine everything can slow down at once, so when steps have become slower than
they were at the last eval, the eval and the sample are expected to be slower by as much.
"""

import math

# the final eval, checkpoint and sample are given this much more time than measured before,
# for the noise of a shared machine
SAFETY = 1.2
# characters drawn once, unseen, to time generation when evals print no sample
SAMPLE_PROBE_CHARS = 16


def step_progress(it, config):
    """p of a step run: the fraction of the steps between warmup and lr_decay_iters done."""
    decay_iters = config.lr_decay_iters or config.max_iters
    if it < config.warmup_iters:
        return 0.0
    if it >= decay_iters:
        return 1.0
    return (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters)


def schedule_lr(progress, config):
    """The learning rate at progress p in [0, 1] after warmup, for lr_schedule."""
    if progress >= 1.0:
        return config.min_lr
    if config.lr_schedule == "wsd":
        stable = 1.0 - config.cooldown_frac
        if progress < stable:
            return config.learning_rate
        return config.min_lr + (config.learning_rate - config.min_lr) * (1.0 - progress) / config.cooldown_frac
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


def get_lr(it, config, progress=None):
    """The learning rate of step it: linear warmup from 0 over warmup_iters steps, then the
    schedule at progress (p of a step run when None). Muon's groups scale it by lr_scale."""
    if progress is None:
        progress = step_progress(it, config)
    lr = schedule_lr(progress, config)
    if it < config.warmup_iters:
        # at p = 0 the schedule is learning_rate, so a step run warms up exactly as before
        return min(config.learning_rate * (it + 1) / (config.warmup_iters + 1), lr)
    return lr


class RunProgress:
    """Where a run is (p in [0, 1]) and whether it ends before the next step: at max_iters,
    or, with a time budget, when one more step would leave too little time to finish.

    The times it goes by are measured as the run goes (the mean time of a step, the last
    eval's time, the time per generated character) and stored in the checkpoint, so a
    resumed run knows them before its first eval."""

    def __init__(self, config):
        self.config = config
        self.budget = config.time_budget * 60.0  # seconds; 0: a step run
        self.step_seconds = self.eval_seconds = self.char_seconds = None
        self.eval_pace = None  # step_seconds when eval_seconds was measured (or at the first step after it)

    # -- measurements

    def measure_step(self, seconds):
        """A training step took this long (wall time, its logging included)."""
        # a moving average: steady against one slow step, quick to follow a slower machine
        self.step_seconds = seconds if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * seconds
        if self.eval_seconds is not None and self.eval_pace is None:
            self.eval_pace = self.step_seconds

    def measure_eval(self, seconds):
        """An eval took this long: the loss estimate, checkpoints, the sample, the plot."""
        self.eval_seconds, self.eval_pace = seconds, self.step_seconds

    def slowdown(self):
        """How much slower steps run now than when the last eval was measured (at least 1)."""
        if not (self.step_seconds and self.eval_pace):
            return 1.0
        return max(1.0, self.step_seconds / self.eval_pace)

    def measure_sample(self, seconds, chars):
        if chars > 0:
            self.char_seconds = seconds / chars

    def needs_sample_rate(self):
        """True while a budget run does not know yet how long samples.txt will take."""
        return self.budget > 0 and self.config.sample_chars > 0 and self.char_seconds is None

    def state_dict(self):
        return {
            "step_seconds": self.step_seconds,
            "eval_seconds": self.eval_seconds,
            "char_seconds": self.char_seconds,
            "eval_pace": self.eval_pace,
        }

    def load_state_dict(self, state):
        for key in ("step_seconds", "eval_seconds", "char_seconds", "eval_pace"):
            if state.get(key) is not None:
                setattr(self, key, float(state[key]))

    # -- decisions

    def final_seconds(self):
        """The time the run needs after its last step: the final eval and checkpoint, and samples.txt."""
        sample = self.config.sample_chars * (self.char_seconds or 0.0)
        return SAFETY * self.slowdown() * ((self.eval_seconds or 0.0) + sample)

    def at(self, it, elapsed, eval_due):
        """(p, last): the progress at step it after elapsed seconds, and whether the run ends
        here (with its final eval) instead of taking another step. eval_due: an eval is due
        at this step anyway."""
        p_steps, at_max_iters = step_progress(it, self.config), it >= self.config.max_iters
        if not self.budget:
            return p_steps, at_max_iters
        # the steps end where the time for the end of the run begins: the schedule ends there
        steps_end = self.budget - self.final_seconds()
        p_time = 1.0 if steps_end <= 0 else min(1.0, elapsed / steps_end)
        return max(p_steps, p_time), at_max_iters or self.out_of_time(elapsed, eval_due)

    def out_of_time(self, elapsed, eval_due=False):
        """With a budget: whether the eval due now, one more step and the end of the run
        would go past it. Unmeasured times count as 0 (the first eval measures them)."""
        if not self.budget:
            return False
        eval_now = SAFETY * self.slowdown() * self.eval_seconds if eval_due and self.eval_seconds else 0.0
        need = (self.step_seconds or 0.0) + eval_now
        return elapsed + need + self.final_seconds() > self.budget
