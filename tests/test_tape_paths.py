"""The tape paths the policy chooses between give the same meta-gradients (float64)."""

import higher
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule import policy


def _meta_gradients(first_order: bool, steps: int = 3):
    """Meta-gradients of the rule and of the learned init after ``steps`` twin updates, and
    how many first-order trajectories the twin kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    meta = MetaLearnerLSTM().double()
    opt = LSTMMetaOptimizer(model.parameters(), meta, first_order=first_order)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x), y))
        F.mse_loss(fmodel(x), y).backward()
        chains = sum(len(c) for c in diffopt._chains)
    grads = [p.grad.clone() for p in (*meta.parameters(), *model.parameters())]
    return grads, chains


@pytest.mark.parametrize("first_order", [True, False])
def test_recorded_path_gives_the_hand_written_paths_meta_gradients(monkeypatch, first_order):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    hand_written, chains = _meta_gradients(first_order)
    assert chains == (1 if first_order else 0)  # first order: the anchored trajectory
    monkeypatch.setattr(policy, "RECORDED_MAX_ROWS", 10**6)
    recorded, chains = _meta_gradients(first_order)
    assert chains == 0  # every operation on the tape instead
    for ours, theirs in zip(hand_written, recorded):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
