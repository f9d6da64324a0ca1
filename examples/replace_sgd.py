"""Swap torch.optim.SGD for LSTMMetaOptimizer in an ordinary training loop.

The loop below is plain PyTorch; the three lines marked ``# <-`` are the whole change.
Run: ``python examples/replace_sgd.py`` (offline, a few seconds on a CPU).
"""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, available_pretrained


def make_data(seed: int = 0):
    """A small real-valued regression problem: y = sin(3x) + noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(64, 1, generator=generator) * 4 - 2
    y = torch.sin(3 * x) + 0.05 * torch.randn(64, 1, generator=generator)
    return x, y


def train(model, optimizer, x, y, steps, learned):
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if learned:
            optimizer.step(loss=loss)  # <- the learned rule reads the loss
        else:
            optimizer.step()
    return F.mse_loss(model(x), y).item()


def main(steps: int = 10) -> dict:
    torch.manual_seed(0)
    x, y = make_data()
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1))
    twin = copy.deepcopy(model)
    start = F.mse_loss(model(x), y).item()

    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    sgd_loss = train(model, sgd, x, y, steps, learned=False)

    if "sinusoid-10shot" in available_pretrained():  # <- a meta-trained rule, if shipped
        learned = LSTMMetaOptimizer.from_pretrained("sinusoid-10shot", twin.parameters())
    else:  # <- otherwise the paper's initial rule (close to SGD with a small step)
        learned = LSTMMetaOptimizer(twin.parameters())
    learned_loss = train(twin, learned, x, y, steps, learned=True)

    print(f"MSE at start            {start:.4f}")
    print(f"SGD (lr 0.01), {steps} steps  {sgd_loss:.4f}")
    print(f"LSTMMetaOptimizer, {steps} steps {learned_loss:.4f}")
    return {"start": start, "sgd": sgd_loss, "learned": learned_loss}


if __name__ == "__main__":
    main()
