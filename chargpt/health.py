"""The network's health while it trains, as the makemore lectures look at it: how the
activations, the gradients and the updates of each layer are doing, not just the loss.

    health = Health(model, config.health_interval, report)     # train.py's setup
    watch = health.watch(iter_num)          # at a health step: hooks on the model for this step; else None
    loss = train_step(watch.model if watch else step_model, ..., watch)   # chargpt/optim.py calls it twice
    health.record(watch)                    # the step's figures into metrics.jsonl, and any warning
    health.eval(iter_num, losses)           # at each eval: the overfitting check, health.png

Every health_interval steps (the first step, the one from the initial weights, included)
a health step measures, for the embeddings, each Block and lm_head (the "layers"):
    - the activations (the layer's output; the embeddings' sum for "embedding", the logits
      for "lm_head"): mean, std and a histogram over mean +- 4 std;
    - their gradient (the loss's gradient with respect to that output, what backprop hands
      down to the layer below): std and a histogram. Without residual connections each
      layer multiplies it by its own Jacobian on the way down, and it can shrink;
    - saturation: the fraction of FeedForward's ReLU (or relu²) units dead across the whole
      batch (zero at every position: they pass no gradient and so never learn), and the
      fraction of attention rows that are nearly one-hot (largest weight >= ONE_HOT);
    - the attention entropy of each head in nats: 0 when every position reads one
      character, ln(t + 1) when position t reads all of them alike (the record keeps the
      uniform figure for comparison);
(with several micro-steps, of the last micro-batch; the attention of its first
ATTENTION_SEQUENCES sequences) and for each weight matrix (2-D parameter): its gradient's std and norm as backward left
them (before clipping; with several micro-steps, their sum), and the update-to-data ratio
log10(std(update) / std(weight)), the update being what optimizer.step changed, with the
learning rate it was taken at and whether it was Muon's ("muon", "lr").

What ratio to expect depends on the update. The makemore lecture's rule of thumb, about -3,
is for updates whose size follows the gradient's (its SGD, and AdamW's, whose step per entry
is up to lr): much lower and the matrix hardly learns, much higher and the steps are too
big for it; it is a check of the learning rate. Muon's update (chargpt/muon.py) has a fixed
size: the orthogonalized matrix has every singular value about 1, so its entries have an
rms of 1/sqrt(max(rows, cols)), and scaled by sqrt(max(1, rows/cols)) it is lr/sqrt(cols)
an entry (cols = fan_in), whatever the gradient. Its ratio is therefore
log10(lr / (sqrt(fan_in) * std(weight))) by construction, which measures 0.03-0.08 below
that (the Newton-Schulz iteration leaves the singular values a little under 1 on average;
docs/results.md). For a weight of the natural scale std 1/sqrt(fan_in) that is log10(lr):
-2 at the CPU recipe's muon_lr 0.01, so a Muon matrix sits around -2 and falls with the
schedule, higher while its weights are still smaller than that scale (the init's 0.02).
health.png draws each optimizer's reference: -3 for AdamW's matrices, log10(lr) along the
schedule for Muon's. A Muon matrix far above its line has weights much smaller than its
steps (weight decay too strong?); its lr, not the gradient, sets where it sits.

Nothing is measured between health steps: the hooks are registered for that one step and
removed after it, so a run with --health_interval=0 is bit-for-bit the run without this
module, and the hooks only read, so a health step trains exactly as any other step. With
torch.compile (which does not call hooks added after compiling) a health step runs the
plain module, the same function; with compile and several processes it measures the
weight matrices only. Only rank 0 measures and writes.

A health step writes {"type": "health", "iter", "loss", "grad_norm", "layers", "matrices",
"entropy", "entropy_uniform"} into metrics.jsonl (iter is the step count after the step, as
a "train" record's: "iter": 1 holds the first step, from the initial weights). Warnings are
one line each, once per run, and a {"type": "warning", "iter", "kind", "message"} record:
    init        the loss at step 0 far above ln(vocab_size), a uniform guess's (the
                overconfident initial weights behind the "hockey stick" loss curve)
    nonfinite   a loss that is nan or inf, and the first layer whose output is not finite (at
                a health step) or the first weights that are not (when train.py stops on it)
    vanishing   a Block whose gradient is orders of magnitude below the last Block's
    dead        most of a FeedForward's units dead
    overfitting the val loss rising while the train loss falls
health.png (draw) shows the makemore pictures from the records: a histogram of the
activations and of the gradient per layer at the latest health step, the update-to-data
ratio of each matrix over the run with its optimizer's reference line, and the attention entropy of
each head. Drawing it takes a few tenths of a second, so it is redrawn at an eval at most
every REDRAW_SECONDS (when there are new health records), and at the end of the run, after
its last line (a time budget does not count it).
"""

import math
import os
import time

import torch

from chargpt.atomic import write_atomic
from chargpt.metrics import import_matplotlib

BINS = 40  # histogram bins over mean +- HIST_STDS std
HIST_STDS = 4.0
HIST_SAMPLE = 1 << 16  # elements a histogram counts at most: a bigger tensor is sampled
ONE_HOT = 0.99  # an attention row whose largest weight is at least this is "nearly one-hot"
ATTENTION_SEQUENCES = 8  # sequences of the batch whose attention weights are written out: enough for a mean
INIT_EXCESS = 1.0  # nats above ln(vocab_size) at step 0 that make the init warning fire
VANISHING = 1e-2  # a Block's gradient std below this fraction of the last Block's: vanishing
DEAD = 0.5  # more than this fraction of a FeedForward's units dead: the dead warning
OVERFIT_MARGIN = 0.03  # nats: val above its best and train below its value there by this much
NONFINITE_ADVICE = "The learning rate is probably too high for this model: try a lower --learning_rate, or --grad_clip=1.0"
REDRAW_SECONDS = 30.0  # health.png is redrawn at an eval at most this often (a drawing takes a few tenths of a second)


def sig(x, digits=4):
    """x rounded to a few significant digits for the JSON record, or None when not finite."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


class Health:
    """Health steps every interval steps (0: never), written through report (a Reporter)."""

    def __init__(
        self, model, interval, report=None, step_model=None, compiled=False, distributed=False, log=print, optimizer=None
    ):
        """model: the plain module; step_model: what a step runs (compiled, in DDP), default model;
        optimizer: whose param groups say which matrices take Muon's update, and at what lr."""
        self.model, self.interval, self.report, self.optimizer = model, interval, report, optimizer
        self.step_model = model if step_model is None else step_model
        self.compiled, self.distributed = compiled, distributed
        self.log = report.log if report is not None else log
        # the kinds of warning already given, each once per run: a resumed run's too
        self.warned = {r["kind"] for r in report.records if r.get("type") == "warning"} if report else set()
        self.plot_path = os.path.join(os.path.dirname(report.metrics_path), "health.png") if report else None
        # when health.png was last drawn (the run's start, at first: a short run draws it at its end only), and from how many records
        self.drawn_at, self.drawn_records = time.time(), 0

    def watch(self, iter_num):
        """A Watch with its hooks on the model when iter_num (the step count before the step)
        is a health step, else None."""
        if not self.interval or iter_num % self.interval:
            return None
        # torch.compile does not call hooks added after compiling: the plain module steps
        # instead (the same function); with DDP as well, the weights alone are measured
        plain = self.compiled and not self.distributed
        step_model = self.model if plain else self.step_model
        return Watch(self.model, iter_num, step_model, activations=not self.compiled or plain, optimizer=self.optimizer)

    def record(self, watch):
        """After a health step: its figures into metrics.jsonl, and the warnings they call
        for. Removes the step's hooks. A no-op for None."""
        if watch is None:
            return None
        watch.remove()
        record = watch.summary()
        self.write(record)
        self.check_step(record, watch.nonfinite_layer)
        return record

    def write(self, record):
        if self.report is not None:
            self.report.write(record)

    # -- warnings

    def warn(self, kind, iter_num, message):
        """One line, once per run for each kind, and a "warning" record."""
        if kind in self.warned:
            return
        self.warned.add(kind)
        self.log(f"warning: {message}")
        self.write({"type": "warning", "iter": iter_num, "kind": kind, "message": message})

    def check_step(self, record, nonfinite_layer=None):
        """The warnings one health record can give: nonfinite, vanishing, dead."""
        step = record["iter"] - 1  # the step's forward ran on the weights of this iteration
        if not record["layers"]:
            return  # the weights alone were measured (torch.compile with several processes)
        if record["loss"] is None:
            where = f"; the first layer whose output is not finite is {nonfinite_layer}" if nonfinite_layer else ""
            self.warn("nonfinite", step, f"the loss is not finite at step {step}{where}. {NONFINITE_ADVICE}")
            return
        blocks = [layer for layer in record["layers"] if layer["name"].startswith("block")]
        if len(blocks) >= 2 and blocks[-1]["grad_std"]:
            last = blocks[-1]["grad_std"]
            for layer in blocks[:-1]:
                if layer["grad_std"] is not None and layer["grad_std"] < VANISHING * last:
                    self.warn(
                        "vanishing",
                        step,
                        f"vanishing gradient at step {step}: the gradient reaching {layer['name']} is "
                        f"{last / max(layer['grad_std'], 1e-30):,.0f}x smaller than the last Block's ({layer['grad_std']:.2e} "
                        f"against {last:.2e}), so the first layers hardly learn. Residual connections (--residual=True) "
                        "carry the gradient down unchanged; LayerNorm (--layer_norm=True) keeps each layer's scale in check",
                    )
                    break
        for layer in record["layers"]:
            if layer["dead"] is not None and layer["dead"] > DEAD:
                self.warn(
                    "dead",
                    step,
                    f"{layer['dead']:.0%} of the FeedForward units of {layer['name']} are dead at step {step}: "
                    "zero at every position of the batch, so no gradient reaches them and they cannot learn back. "
                    "A learning rate too high for the model (--learning_rate) kills units as it goes; at step 0 it "
                    "is the initial weights",
                )
                break

    def nonfinite(self, iter_num):
        """When train.py stops on a loss that is not finite: which weights went first."""
        if not self.interval:
            return
        params = list(self.model.named_parameters())
        bad = [name for name, p in params if not torch.isfinite(p).all()]
        where = (
            f"the first weights that are not finite are {bad[0]} ({len(bad)} of the model's {len(params)} tensors)"
            if bad
            else "every weight is still finite, so an activation overflowed"
        )
        advice = NONFINITE_ADVICE if iter_num > 0 else "At step 0 no update has happened yet: the model was built so"
        self.warn("nonfinite", iter_num, f"the loss is not finite at step {iter_num}: {where}. {advice}")

    def eval(self, iter_num, losses):
        """At an eval (after the Reporter's record of it): the init and overfitting
        warnings, and health.png when it is due."""
        if not self.interval:
            return
        vocab_size = self.model.config.vocab_size
        uniform = math.log(vocab_size)
        if iter_num == 0 and losses["train"] > uniform + INIT_EXCESS:
            self.warn(
                "init",
                0,
                f"the loss at step 0 is {losses['train']:.2f}, far above ln({vocab_size}) = {uniform:.2f}, the loss of "
                "a uniform guess: the initial weights make confident wrong guesses, and the first steps are spent "
                "undoing them (the hockey stick of the loss curve). Start the last layer's weights small "
                "(--init=normal starts lm_head at zero)",
            )
        self.check_overfitting(iter_num)
        if time.time() - self.drawn_at >= REDRAW_SECONDS:
            self.draw()

    def check_overfitting(self, iter_num):
        """The val loss well above its best while the train loss went on falling."""
        evals = [r for r in self.report.records if r.get("type") == "eval"] if self.report else []
        if len(evals) < 2:
            return
        now = evals[-1]
        best = min(evals, key=lambda r: r["val_loss"])
        if now["val_loss"] > best["val_loss"] + OVERFIT_MARGIN and now["train_loss"] < best["train_loss"] - OVERFIT_MARGIN:
            self.warn(
                "overfitting",
                iter_num,
                f"overfitting: the val loss has risen from {best['val_loss']:.4f} at step {best['iter']} to "
                f"{now['val_loss']:.4f} while the train loss fell from {best['train_loss']:.4f} to {now['train_loss']:.4f}: "
                f"the model is learning this text by heart. best.pt keeps the model of step {best['iter']}; "
                "--dropout=0.2, a smaller model (--n_layer, --n_embd) or more text would help",
            )

    # -- health.png

    def draw(self):
        """Redraw health.png if there are health records it does not show yet."""
        records = [r for r in self.report.records if r.get("type") == "health"] if self.report else []
        if self.plot_path is None or len(records) == self.drawn_records or not self.report.write_files:
            return
        if draw_health(self.report.records, self.plot_path, self.report.title):
            self.drawn_at, self.drawn_records = time.time(), len(records)

    def finish(self):
        """At the end of the run: health.png with every health record."""
        if self.interval:
            self.draw()


# -----------------------------------------------------------------------------
# one health step


def layers_of(model):
    """[(name, module, where)] of the layers whose output is measured: where is 'input' for
    a module whose input is the layer's output (the embeddings' sum, read where blocks[0]
    takes it), 'output' otherwise."""
    if not hasattr(model, "blocks"):  # the bigram model: one table, whose output is the logits
        return [("logits", model.token_embedding_table, "output")]
    layers = [("embedding", model.blocks[0], "input")]
    layers += [(f"block {i}", block, "output") for i, block in enumerate(model.blocks)]
    return layers + [("lm_head", model.lm_head, "output")]


def layer_of(name):
    """The layer a parameter belongs to, by its name: 'block 2', 'embedding', 'lm_head'."""
    if name.startswith("blocks."):
        return f"block {name.split('.')[1]}"
    return "lm_head" if name.startswith("lm_head") else "embedding"


class Watch:
    """The hooks of one health step on the plain module, and what they saw. model is the
    module to step with (the plain one, or what wraps it)."""

    def __init__(self, model, iter_num, step_model=None, activations=True, optimizer=None):
        self.plain, self.iter_num, self.optimizer = model, iter_num, optimizer
        self.model = model if step_model is None else step_model
        self.handles, self.seen, self.nonfinite_layer = [], {}, None
        self.matrices = [(name, p) for name, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
        self.loss = None
        if activations:
            self.hook()

    # -- the forward and backward

    def hook(self):
        """Forward hooks on every layer, FeedForward's nonlinearity and the attention."""
        model = self.plain
        for name, module, where in layers_of(model):
            if where == "input":
                self.handles.append(module.register_forward_pre_hook(self.layer_hook(name, lambda args, out: args[0])))
            else:
                self.handles.append(module.register_forward_hook(self.layer_hook(name, lambda args, out: out)))
        for i, block in enumerate(getattr(model, "blocks", [])):
            if block.ffwd is not None:
                self.handles.append(block.ffwd.net[1].register_forward_hook(self.dead_hook(f"block {i}")))
            self.handles.append(block.sa.register_forward_hook(self.attention_hook(f"block {i}")))
        self.handles.append(model.register_forward_hook(self.loss_hook))

    def layer_hook(self, name, pick):
        def hook(module, args, out=None):
            x = pick(args, out)
            self.seen.setdefault(name, {})["act"] = distribution(x.detach())
            if x.requires_grad:  # the gradient backward will hand to this output
                x.register_hook(lambda grad: self.seen[name].__setitem__("grad", distribution(grad)))

        return hook

    def dead_hook(self, name):
        def hook(module, args, out):
            units = out.detach().reshape(-1, out.shape[-1])  # (B*T, hidden)
            self.seen.setdefault(name, {})["dead"] = 1.0 - (units > 0).any(dim=0).float().mean()

        return hook

    def attention_hook(self, name):
        def hook(module, args, out):
            x = args[0].detach()[:ATTENTION_SEQUENCES]  # what the attention read: ln1(x)
            with torch.no_grad():
                wei = module.attention(x).float()[:, :, 1:]  # (b, nh, T-1, T): row 0 has one choice, skip it
                entropy = torch.special.entr(wei).sum(-1)  # (b, nh, T-1): nats per row
                seen = self.seen.setdefault(name, {})
                seen["entropy"] = entropy.mean(dim=(0, 2))  # (nh,)
                seen["one_hot"] = (wei.amax(-1) >= ONE_HOT).float().mean()
                T = x.shape[1]
                seen["uniform"] = torch.log(torch.arange(2, T + 1, dtype=torch.float32)).mean() if T > 1 else None

        return hook

    def loss_hook(self, module, args, out):
        _, loss = out
        if loss is not None:
            self.loss = loss.detach()

    # -- around optimizer.step (chargpt/optim.py's train_step calls these)

    def before_update(self, loss_scale=1.0):
        """The gradients as backward left them, and the weights before the step. loss_scale:
        float16's, by which the gradients the tensor hooks saw are too large."""
        self.loss_scale = loss_scale
        grads = [p.grad for _, p in self.matrices]
        self.grad_stats = [
            None if g is None else torch.stack((g.float().std(), torch.linalg.vector_norm(g.float()))) for g in grads
        ]
        every = [p.grad.float() for p in self.plain.parameters() if p.grad is not None]
        self.grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in every])) if every else None
        self.before = [p.detach().clone() for _, p in self.matrices]

    def after_update(self):
        """std(update) / std(weight) of each matrix, from what the step changed."""
        self.ratios = [
            torch.stack(((p.detach().float() - w.float()).std(), w.float().std()))
            for (_, p), w in zip(self.matrices, self.before)
        ]
        del self.before

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- the record

    def summary(self):
        """The health record of this step (one device sync: everything moves to the CPU at once)."""
        seen = to_cpu(self.seen, getattr(self, "loss_scale", 1.0))
        layers = []
        for name in seen:
            act, grad = seen[name].get("act"), seen[name].get("grad")
            if act is None:
                continue
            if self.nonfinite_layer is None and not math.isfinite(act["std"]):
                self.nonfinite_layer = name
            layers.append(
                {
                    "name": name,
                    "mean": sig(act["mean"]),
                    "std": sig(act["std"]),
                    "hist": act["hist"],
                    "grad_std": None if grad is None else sig(grad["std"]),
                    "grad_hist": None if grad is None else grad["hist"],
                    "dead": None if "dead" not in seen[name] else sig(seen[name]["dead"], 3),
                    "one_hot": None if "one_hot" not in seen[name] else sig(seen[name]["one_hot"], 3),
                }
            )
        matrices = []
        groups = {id(p): group for group in getattr(self.optimizer, "param_groups", []) for p in group["params"]}
        for (name, p), grad, ratio in zip(self.matrices, self.grad_stats, self.ratios):
            group = groups.get(id(p), {})
            grad = None if grad is None else grad.tolist()
            update, data = ratio.tolist()
            matrices.append(
                {
                    "name": name,
                    "layer": layer_of(name),
                    "grad_std": None if grad is None else sig(grad[0]),
                    "grad_norm": None if grad is None else sig(grad[1]),
                    "data_std": sig(data),
                    "update": round(math.log10(update / data), 3) if update > 0 and data > 0 else None,
                    # which update it took, at what learning rate: the reference its ratio is read against
                    "muon": bool(group.get("muon", False)),
                    "lr": sig(group["lr"]) if "lr" in group else None,
                }
            )
        entropy = [seen[name]["entropy"] for name in seen if "entropy" in seen[name]]
        uniform = next((seen[n]["uniform"] for n in seen if seen[n].get("uniform") is not None), None)
        return {
            "type": "health",
            "iter": self.iter_num + 1,
            "loss": None if self.loss is None else sig(self.loss.item(), 5),
            "grad_norm": None if self.grad_norm is None else sig(self.grad_norm.item()),
            "layers": layers,
            "matrices": matrices,
            "entropy": [[sig(h) for h in heads] for heads in entropy],
            "entropy_uniform": None if uniform is None else sig(uniform),
        }


def distribution(x):
    """Mean, std and a histogram (in std units, over mean +- HIST_STDS std) of a tensor, as
    tensors: no device sync. The histogram counts at most HIST_SAMPLE elements, every k-th
    with k prime to the last dimension, so that every channel is in the sample."""
    x = x.float()
    std, mean = torch.std_mean(x)
    flat = x.flatten()
    if flat.numel() > HIST_SAMPLE:
        k = flat.numel() // HIST_SAMPLE
        while math.gcd(k, x.shape[-1]) != 1:
            k += 1
        flat = flat[::k]
    counts = torch.histc((flat - mean) / std, BINS, min=-HIST_STDS, max=HIST_STDS)
    return {"mean": mean, "std": std, "counts": counts}


def to_cpu(seen, loss_scale=1.0):
    """seen's tensors as Python numbers and lists; histograms as [lo, hi, counts]; the
    gradients divided by float16's loss scale."""
    out = {}
    for name, entry in seen.items():
        out[name] = {}
        for key, value in entry.items():
            if isinstance(value, dict):  # a distribution
                d = {k: v.tolist() for k, v in value.items()}
                if key == "grad":
                    d["mean"], d["std"] = d["mean"] / loss_scale, d["std"] / loss_scale
                lo, hi = d["mean"] - HIST_STDS * d["std"], d["mean"] + HIST_STDS * d["std"]
                hist = [sig(lo), sig(hi), [int(c) for c in d["counts"]]] if math.isfinite(hi - lo) else None
                out[name][key] = {"mean": d["mean"], "std": d["std"], "hist": hist}
            elif isinstance(value, torch.Tensor):
                out[name][key] = value.tolist()
            else:
                out[name][key] = value
    return out


# -----------------------------------------------------------------------------
# health.png


def layer_colours(names, cmap):
    """A colour per layer, dark for the first and light for the last (yellow is too pale to read)."""
    return {name: cmap(0.85 * i / max(1, len(names) - 1)) for i, name in enumerate(names)}


def draw_health(records, path, title=""):
    """The makemore pictures of a run's health records into path (PNG); False when
    matplotlib is absent or there is no health record."""
    Figure = import_matplotlib()
    health = [r for r in records if r.get("type") == "health"]
    if Figure is None or not health:
        return False
    last = health[-1]
    fig = Figure(figsize=(13, 8.5))
    fig.subplots_adjust(left=0.06, right=0.98, top=0.9, bottom=0.07, hspace=0.38, wspace=0.2)
    (ax_act, ax_grad), (ax_ratio, ax_ent) = fig.subplots(2, 2)
    names = [layer["name"] for layer in last["layers"]]
    import matplotlib

    colours = layer_colours(names, matplotlib.colormaps["viridis"])
    # the hidden layers, as the makemore lecture draws them: the logits live on another scale
    hidden = [layer for layer in last["layers"] if layer["name"] != "lm_head"]
    for layer in hidden:
        saturation = []
        if layer["dead"] is not None:
            saturation.append(f"dead {layer['dead']:.0%}")
        if layer["one_hot"] is not None:
            saturation.append(f"one-hot rows {layer['one_hot']:.0%}")
        label = f"{layer['name']}: mean {layer['mean']:+.2f}, std {layer['std']:.2f}" + "".join(", " + s for s in saturation)
        histogram(ax_act, layer["hist"], colours[layer["name"]], label)
        if layer["grad_std"] is not None:
            histogram(ax_grad, layer["grad_hist"], colours[layer["name"]], f"{layer['name']}: std {layer['grad_std']:.2e}")
    ax_act.set_title(f"activation distribution by layer (step {last['iter']})", fontsize=10)
    ax_act.set_xlabel("activation")
    ax_grad.set_title(f"gradient distribution by layer (step {last['iter']}): the loss's gradient at each output", fontsize=10)
    ax_grad.set_xlabel("gradient")
    for ax in (ax_act, ax_grad):
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper right")
        else:  # torch.compile with several processes measures the weights alone; float16 may overflow
            message = "not finite (float16's loss scale overflowed?)" if hidden else "not measured"
            ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    draw_ratios(ax_ratio, health, colours)
    draw_entropy(ax_ent, last)
    loss = f", loss {last['loss']:.4f}" if last["loss"] is not None else ", loss not finite"
    warnings = [r for r in records if r.get("type") == "warning"]
    heading = f"{title}: network health at step {last['iter']}{loss}"
    if warnings:
        heading += "\nwarnings: " + "; ".join(f"{w['kind']} (step {w['iter']})" for w in warnings)
    fig.suptitle(heading, fontsize=11, color="tab:red" if warnings else "black")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=80), durable=False)
    return True


def histogram(ax, hist, colour, label):
    """A histogram [lo, hi, counts] as a line of densities over the bin centres."""
    if hist is None:
        return
    lo, hi, counts = hist
    width = (hi - lo) / len(counts)
    total = max(1, sum(counts)) * max(width, 1e-30)
    centres = [lo + (i + 0.5) * width for i in range(len(counts))]
    ax.plot(centres, [c / total for c in counts], color=colour, lw=1.3, label=label)


def draw_ratios(ax, health, colours):
    """log10 of update std / weight std of each matrix over the run, with the reference of the
    update it takes: -3 (makemore's rule) for AdamW's, log10(lr) for Muon's (the module docstring says why)."""
    steps = [r["iter"] for r in health]
    names = [m["name"] for m in health[-1]["matrices"]]
    muon = {m["name"] for m in health[-1]["matrices"] if m.get("muon")}
    mixed = 0 < len(muon) < len(names)
    labelled = set()
    for name in names:
        values = []
        for r in health:
            found = next((m for m in r["matrices"] if m["name"] == name), None)
            values.append(float("nan") if found is None or found["update"] is None else found["update"])
        layer = layer_of(name)
        colour = colours.get(layer, colours.get("logits", "gray"))
        label = f"{layer} ({'Muon' if name in muon else 'AdamW'})" if mixed else layer
        ax.plot(steps, values, color=colour, lw=1, alpha=0.85, label=None if label in labelled else label)
        labelled.add(label)
    if len(muon) < len(names):
        ax.axhline(-3, color="black", ls="--", lw=1, label="AdamW: -3, the makemore rule of thumb")
    if muon:
        # the learning rate of a Muon matrix at each health step (it follows the schedule)
        lrs = [next((m.get("lr") for m in r["matrices"] if m["name"] in muon), None) for r in health]
        line = [math.log10(lr) if lr else float("nan") for lr in lrs]
        label = "Muon: log10(lr), its fixed-size step on a weight of std 1/sqrt(fan_in)"
        ax.plot(steps, line, color="tab:red", ls="--", lw=1.2, label=label)
    ax.set_title("update / data ratio of each weight matrix: log10(std of the step's update / std of the weight)", fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel("log10 ratio")
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.grid(alpha=0.3)


def draw_entropy(ax, last):
    """Each head's attention entropy at the latest health step, beside the uniform figure."""
    entropy = last["entropy"]
    if not entropy:
        ax.text(0.5, 0.5, "no attention in this model", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    n_layer, n_head = len(entropy), len(entropy[0])
    width = 0.8 / n_head
    for h in range(n_head):
        xs = [i - 0.4 + (h + 0.5) * width for i in range(n_layer)]
        ax.bar(xs, [e[h] if e[h] is not None else 0.0 for e in entropy], width * 0.9, label=f"head {h}")
    if last["entropy_uniform"] is not None:
        ax.axhline(last["entropy_uniform"], color="black", ls="--", lw=1, label="every earlier character alike")
    ax.set_xticks(range(n_layer), [f"block {i}" for i in range(n_layer)])
    ax.set_ylabel("nats (0: one character)")
    ax.set_title(f"attention entropy of each head (step {last['iter']})", fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
