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


def takes_muon(name, param):
    """Whether train.py's --optimizer=muon gives this parameter Muon's update: the weight
    matrices inside the Blocks; embeddings, lm_head, biases and LayerNorm gains take AdamW."""
    return name.startswith("blocks.") and param.dim() == 2


def orthogonalize(G, steps=5, eps=1e-7):
    """The nearest semi-orthogonal matrix to G (U V^T of its SVD), approximately; G may be a
    stack of matrices (..., m, n)."""
    a, b, c = NS_COEFFS
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT  # (small, large): the products below are then (small, small)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # (k, m, n): a stack of k, for the batched products
    for _ in range(steps):
        A = X @ X.mT  # (k, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, in one call
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X: (k, m, n)
    X = X.reshape(shape)
    return X.mT if transposed else X


class MuonAdamW:
    """Param groups with "muon": True take the Muon update (2-D parameters only), the others
    AdamW. Weight decay is decoupled in both (p -= lr * weight_decay * p).

    It has what train.py uses of a torch.optim.Optimizer (param_groups, step, zero_grad,
    state_dict, load_state_dict, with the same state_dict layout) without subclassing it:
    building a torch.optim.Optimizer imports torch._dynamo, 1.5 s of a 15-second CPU run."""

    def __init__(self, param_groups, betas=(0.9, 0.99), momentum=0.95, eps=1e-8):
        defaults = dict(betas=betas, momentum=momentum, eps=eps, weight_decay=0.0)
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in param_groups]
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D weight matrices only")
        self.state = {}  # parameter -> its momentum (Muon) or its step and two moments (AdamW)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params and group["muon"]:
                self._muon_step(params, group)
            elif params:
                self._adamw_step(params, group)

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self):
        """{"state": {index: state}, "param_groups": [{..., "params": [index, ...]}]}: each
        parameter by its position over all groups, as torch.optim.Optimizer numbers them."""
        index = {}
        groups = [{**group, "params": [index.setdefault(p, len(index)) for p in group["params"]]} for group in self.param_groups]
        return {"state": {index[p]: state for p, state in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict):
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has other parameter groups than this model")
        params = [p for group in self.param_groups for p in group["params"]]
        for group, saved_group in zip(self.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        self.state = {}
        for i, state in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device, p.dtype, copy=True) if torch.is_tensor(v) else v for k, v in state.items()}

    def _muon_step(self, params, group):
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        # matrices of one shape, or its transpose, are orthogonalized together as a stack
        by_shape = {}
        for p in params:
            state = self.state.setdefault(p, {})
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            g = p.grad.lerp(buf, momentum)  # Nesterov: one step ahead
            tall = g.size(0) > g.size(1)
            by_shape.setdefault(tuple(sorted(g.shape)), []).append((p, g.mT if tall else g, tall))
        for triples in by_shape.values():
            updates = orthogonalize(torch.stack([g for _, g, _ in triples]))  # (n, small, large)
            for (p, _, tall), update in zip(triples, updates):
                # a tall orthogonal matrix has entries ~ 1/sqrt(rows): scale it up to match
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - lr * wd)
                p.add_(update.mT if tall else update, alpha=-lr * scale)

    def _adamw_step(self, params, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state.setdefault(p, {})
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1 = 1 - beta1 ** state["step"]
            bias2 = 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
