"""How the weights learn: which parameters take which update, and one optimizer step.

    optimizer = make_optimizer(model, config, device_type)   # AdamW, or Muon + AdamW (chargpt/muon.py)
    scaler = LossScaler(device_type, log) if dtype == "float16" else None
    loss = train_step(model, optimizer, batches, config, ctx, device, scaler=scaler)

A step is the lecture's lines, get_batch, forward, zero_grad, backward, step, and train.py's
loop spells them out with the names here, which hold what a real run adds: get_batches the
gradients of several micro-batches added up before one step (gradient_accumulation_steps)
and DDP's averaging over processes on the last of them only, backward float16's loss
scaling, optimizer_step the clipping of the gradient norm, float16's skipped steps and the
health watch. train_step is the same lines in one call; bench.py times exactly this step.

Loss scaling: float16 holds numbers up to 65504, and gradients below about 6e-8 become 0
(below 6e-5 they lose precision), so small gradients of a float16 backward vanish. The loss is
multiplied by a large scale before backward, and the gradients divided by it again before
they are clipped and stepped with. A step whose gradients overflowed (inf or nan) is
skipped and the scale halved; after 2000 good steps in a row it is doubled. This is
torch.amp.GradScaler; LossScaler adds the count of skipped steps and a log line for each.
Its state (the scale, the good steps so far, the count) is in the checkpoint, so a resumed
run scales as the uninterrupted one would.
"""

import contextlib

import torch

from chargpt.machine import Distributed
from chargpt.muon import MuonAdamW, takes_muon


def make_optimizer(model, config, device_type, fused=True):
    """AdamW with weight decay on the 2-D weights (matmuls, embeddings) and not on biases or
    LayerNorm gains; fused=False gives PyTorch's default (foreach) update. With
    --optimizer=muon the weight matrices inside the Blocks take Muon's update at muon_lr.
    Each group's "lr_scale" is its learning rate over learning_rate, for the schedule."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.optimizer == "muon":
        groups = [
            {
                "params": [p for n, p in named if takes_muon(n, p)],
                "muon": True,
                "lr": config.muon_lr,
                "lr_scale": config.muon_lr / config.learning_rate,
                "weight_decay": config.weight_decay,
            },
            {
                "params": [p for n, p in named if not takes_muon(n, p) and p.dim() >= 2],
                "muon": False,
                "lr": config.learning_rate,
                "weight_decay": config.weight_decay,
            },
            {"params": [p for n, p in named if p.dim() < 2], "muon": False, "lr": config.learning_rate, "weight_decay": 0.0},
        ]
        return MuonAdamW(groups, betas=(config.beta1, config.beta2))
    groups = [
        {"params": [p for n, p in named if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates every parameter in one pass; it exists for CUDA and CPU
    fused = fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused or None)


class LossScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler for float16 training (see the module docstring), which counts the
    steps it skips and says so in log. Reading the scale back to notice a skipped step costs
    one device sync per step, on the float16 path only."""

    def __init__(self, device_type, log=None, **kwargs):
        super().__init__(device_type, **kwargs)
        self.skipped = 0
        self.log = log or (lambda message: None)

    def update(self):
        before = self.get_scale()
        super().update()
        after = self.get_scale()
        if after < before:  # the scale only falls when this step found an inf or nan gradient
            self.skipped += 1
            self.log(
                f"float16: a gradient overflowed, so the step was skipped and the loss scale lowered "
                f"from {before:g} to {after:g} ({self.skipped} skipped so far)"
            )

    def state_dict(self):
        return {**super().state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.skipped = int(state_dict.pop("skipped", 0))
        super().load_state_dict(state_dict)


def get_batches(batches, config, device, step_model, ddp=None):
    """The lecture's get_batch('train') for one optimizer step: gradient_accumulation_steps
    micro-batches (x, y), whose gradients add up. With DDP, the caller's forward and backward
    of every micro-batch but the last run inside no_sync (this generator is paused inside it
    while they do), so that the gradients are averaged over the processes once, on the last."""
    ddp = ddp or Distributed()
    for micro_step in range(config.gradient_accumulation_steps):
        x, y = batches.next(device)
        last_micro = micro_step == config.gradient_accumulation_steps - 1
        with contextlib.nullcontext() if ddp.world_size == 1 or last_micro else step_model.no_sync():
            yield x, y


def backward(loss, config, scaler=None):
    """The lecture's loss.backward(), of the mean over the micro-batches (each loss divided by
    their number), and in float16 scaled up first (see the module docstring). Returns the
    divided loss."""
    loss = loss / config.gradient_accumulation_steps
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss


def optimizer_step(optimizer, step_model, config, scaler=None, watch=None):
    """The lecture's optimizer.step(), with what a real run adds around it: float16's
    gradients unscaled, the health watch's look at the gradients and weights before and after
    (at a health step), the gradient norm clipped, and a float16 step whose gradients
    overflowed skipped (scaler.skipped counts those)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, before clipping measures them
    if watch is not None:  # the gradients as backward left them (unscaled), before clipping
        watch.before_update(1.0 if scaler is None else scaler.get_scale())
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), config.grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when a gradient is inf or nan
        scaler.update()
    if watch is not None:
        watch.after_update()


def train_step(step_model, optimizer, batches, config, ctx, device, ddp=None, scaler=None, watch=None):
    """One optimizer step, as train.py's loop takes it: zero_grad, then forward and backward
    of each micro-batch, then the step. Returns the last micro-batch's loss (divided by the
    number of micro-steps, not scaled), without a device sync. watch: at a health step,
    chargpt/health.py's Watch."""
    optimizer.zero_grad(set_to_none=True)
    for x, y in get_batches(batches, config, device, step_model, ddp):
        with ctx:
            _, loss = step_model(x, y)
        loss = backward(loss, config, scaler)
    optimizer_step(optimizer, step_model, config, scaler, watch)
    return loss
