"""How the weights learn: which parameters take which update, and one optimizer step.

    optimizer = make_optimizer(model, config, device_type)   # AdamW, or Muon + AdamW (chargpt/muon.py)
    loss = train_step(model, optimizer, batches, config, ctx, device)

train_step is the lecture's forward, backward and step, with what a real run adds: the
gradients of several micro-batches added up before one step (gradient_accumulation_steps),
DDP's averaging over processes on the last of them only, and the gradient norm clipped.
bench.py times exactly this step.
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


def train_step(step_model, optimizer, batches, config, ctx, device, ddp=None, watch=None):
    """One optimizer step over gradient_accumulation_steps micro-batches; returns the last
    micro-batch's loss (divided by the number of micro-steps), without a device sync.
    watch: at a health step, chargpt/health.py's Watch, which reads the gradients and the
    weights on either side of the update."""
    ddp = ddp or Distributed()
    for micro_step in range(config.gradient_accumulation_steps):
        x, y = batches.next(device)
        # with DDP, gradients are averaged across processes on the last micro-step only
        last_micro = micro_step == config.gradient_accumulation_steps - 1
        sync = contextlib.nullcontext() if ddp.world_size == 1 or last_micro else step_model.no_sync()
        with sync:
            with ctx:
                _, loss = step_model(x, y)
                loss = loss / config.gradient_accumulation_steps  # the mean over micro-steps
            loss.backward()
    if watch is not None:
        watch.before_update()  # the gradients as backward left them, before clipping
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_model.parameters(), config.grad_clip)
    optimizer.step()
    if watch is not None:
        watch.after_update()
    optimizer.zero_grad(set_to_none=True)
    return loss
