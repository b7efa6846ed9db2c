"""The Muon optimizer: its orthogonalization, and its update rules."""

import pytest
import torch

from chargpt.muon import MuonAdamW, orthogonalize


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # a badly conditioned matrix: singular values from 0.05 to 10 (5 steps lift any ratio up to ~1000)
    U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    S = torch.logspace(-1.3, 1, k)
    G = U[:, :k] @ torch.diag(S) @ V[:, :k].T
    X = orthogonalize(G)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3, s
    # the same singular vectors: X is close to U V^T
    assert torch.nn.functional.cosine_similarity(X.flatten(), (U[:, :k] @ V[:, :k].T).flatten(), dim=0) > 0.9


def test_muon_steps_along_the_orthogonalized_momentum_and_adamw_as_adamw():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(torch.randn(8))
    b_ref = torch.nn.Parameter(b.detach().clone())
    opt = MuonAdamW(
        [
            {"params": [w], "muon": True, "lr": 0.1, "weight_decay": 0.0},
            {"params": [b], "muon": False, "lr": 0.01, "weight_decay": 0.1},
        ],
        betas=(0.9, 0.99),
    )
    ref = torch.optim.AdamW([b_ref], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
    w0 = w.detach().clone()
    for _ in range(3):
        g = torch.randn(8)
        w.grad, b.grad, b_ref.grad = torch.randn(16, 8), g.clone(), g.clone()
        if _ == 0:
            first_update = orthogonalize(w.grad * (1 - 0.95) * (1 + 0.95))  # Nesterov on a zero buffer
        opt.step()
        ref.step()
        if _ == 0:
            # tall (16, 8): the orthogonal update is scaled by sqrt(16 / 8)
            assert torch.allclose(w.detach(), w0 - 0.1 * 2**0.5 * first_update, atol=1e-5)
    assert torch.allclose(b, b_ref, atol=1e-6)


def test_muon_rejects_a_vector():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True, "lr": 0.1, "weight_decay": 0.0}])


def test_a_stack_is_orthogonalized_matrix_by_matrix():
    torch.manual_seed(0)
    G = torch.randn(3, 24, 8)
    stacked = orthogonalize(G)
    for i in range(3):
        assert torch.allclose(stacked[i], orthogonalize(G[i]), atol=1e-5)


def test_state_dict_has_the_torch_optimizer_layout_and_round_trips():
    """Parameters are numbered by position over all groups, as torch.optim.Optimizer does (so
    checkpoints of the earlier torch.optim-based class load), and loading the state into a
    fresh optimizer continues the same trajectory."""
    torch.manual_seed(0)
    make = lambda: [
        torch.nn.Parameter(torch.randn(8, 4)),
        torch.nn.Parameter(torch.randn(4, 8)),
        torch.nn.Parameter(torch.randn(4)),
    ]
    groups = lambda ps: [
        {"params": ps[:2], "muon": True, "lr": 0.05, "weight_decay": 0.1},
        {"params": ps[2:], "muon": False, "lr": 0.01, "weight_decay": 0.0},
    ]
    a, b = make(), make()
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    opt_a = MuonAdamW(groups(a))
    grads = [[torch.randn_like(p) for p in a] for _ in range(4)]
    for step in range(2):
        for p, g in zip(a, grads[step]):
            p.grad = g.clone()
        opt_a.step()
    state = opt_a.state_dict()
    torch_layout = torch.optim.SGD([{"params": a[:2]}, {"params": a[2:]}], lr=0.1).state_dict()
    assert [g["params"] for g in state["param_groups"]] == [g["params"] for g in torch_layout["param_groups"]] == [[0, 1], [2]]
    assert sorted(state["state"]) == [0, 1, 2] and state["state"][2]["step"] == 2

    opt_b = MuonAdamW(groups(b))
    opt_b.load_state_dict(state)
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    for step in range(2, 4):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and all(p.grad is None for p in a)


def test_load_state_dict_refuses_other_groups():
    p = torch.nn.Parameter(torch.randn(4, 4))
    state = MuonAdamW([{"params": [p], "muon": True, "lr": 0.1}]).state_dict()
    other = MuonAdamW([{"params": [p, torch.nn.Parameter(torch.randn(4, 4))], "muon": True, "lr": 0.1}])
    with pytest.raises(ValueError, match="other parameter groups"):
        other.load_state_dict(state)
