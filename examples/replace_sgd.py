"""Swap torch.optim.SGD for LSTMMetaOptimizer in an ordinary PyTorch training loop.

The two training functions below are the same loop, once with SGD and once with the learned
update rule; the line marked ``# <-`` is the whole change (plus the import). Both train the
same model from the same initial weights on the same mini-batches. With no meta-learner the
optimizer runs the shipped ``general`` rule, which needs no learning rate and no loss.

Run: ``python examples/replace_sgd.py`` (offline, a few seconds on a CPU).
"""

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from learned_optim import LSTMMetaOptimizer


def make_data(seed: int = 0) -> TensorDataset:
    """A small real-valued regression problem: y = sin(3x) + noise, 64 points."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, generator=generator) * 4 - 2
    y = torch.sin(3 * x) + 0.05 * torch.randn(64, 1, generator=generator)
    return TensorDataset(x, y)


def train_with_sgd(model, loader, epochs):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    return model


def train_with_learned_rule(model, loader, epochs):
    opt = LSTMMetaOptimizer(model.parameters())  # <- was torch.optim.SGD(..., lr=0.01)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    return model


def full_loss(model, data: TensorDataset) -> float:
    with torch.no_grad():
        return F.mse_loss(model(data.tensors[0]), data.tensors[1]).item()


def main(epochs: int = 5) -> dict:
    torch.manual_seed(0)
    data = make_data()
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1))
    twin = copy.deepcopy(model)  # the same initial weights for both
    start = full_loss(model, data)
    steps = epochs * 4  # 64 points in batches of 16

    torch.manual_seed(1)  # the same shuffling for both
    sgd_loss = full_loss(train_with_sgd(model, DataLoader(data, 16, shuffle=True), epochs), data)
    torch.manual_seed(1)
    learned_loss = full_loss(
        train_with_learned_rule(twin, DataLoader(data, 16, shuffle=True), epochs), data)

    rule = "general"
    for name, value in (("MSE at start", start), (f"SGD (lr 0.01), {steps} steps", sgd_loss),
                        (f"LSTMMetaOptimizer ({rule}), {steps} steps", learned_loss)):
        print(f"{name:45s} {value:.4f}")
    return {"start": start, "sgd": sgd_loss, "learned": learned_loss}


if __name__ == "__main__":
    main()
