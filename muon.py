"""Muon for the weight matrices inside the Blocks, AdamW for everything else, in one optimizer.

Muon (Keller Jordan, 2024) keeps a Nesterov momentum of each matrix's gradient and steps
along its orthogonalized version: the same singular vectors with every singular value
pushed to about 1, so that rare directions get as much step as the dominant ones. A few
Newton-Schulz iterations compute it with matrix products only. train.py uses it with
--optimizer=muon; the embeddings, lm_head, biases and LayerNorm gains take the AdamW update.

    opt = MuonAdamW([{"params": matrices, "muon": True, "lr": 0.02, "weight_decay": 0.1},
                     {"params": others, "muon": False, "lr": 2e-3, "weight_decay": 0.0}],
                    betas=(0.9, 0.99))
"""
import torch

# the quintic iteration's coefficients from the Muon write-up: they drive small singular
# values up fast and leave all of them in about [0.7, 1.2] after 5 steps, which is enough
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, eps=1e-7):
    """The nearest semi-orthogonal matrix to G (U V^T of its SVD), approximately."""
    a, b, c = NS_COEFFS
    X = G / (G.norm() + eps)  # singular values <= 1
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T  # (small, large): the products below are then (small, small)
    for _ in range(steps):
        A = X @ X.T  # (m, m)
        X = a * X + (b * A + c * A @ A) @ X  # (m, n)
    return X.T if transposed else X


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with "muon": True take the Muon update (2-D parameters only), the others
    AdamW. Weight decay is decoupled in both (p -= lr * weight_decay * p)."""

    def __init__(self, param_groups, betas=(0.9, 0.99), momentum=0.95, eps=1e-8):
        for group in param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D weight matrices only")
        super().__init__(param_groups, dict(betas=betas, momentum=momentum, eps=eps, weight_decay=0.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    g = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead
                    update = orthogonalize(g)
                    # tall matrices: an orthogonal (m, n) update has entries ~ 1/sqrt(m), scale up
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr * scale)
                else:
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    beta1, beta2 = group["betas"]
                    state["step"] += 1
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    bias1 = 1 - beta1 ** state["step"]
                    bias2 = 1 - beta2 ** state["step"]
                    denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
