"""The update rules of the optimisation-based baselines: MAML's fixed step, Meta-SGD's learned
per-coordinate step sizes, and a plain per-coordinate SGD to apply them outside ``higher``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["MetaSGDRates", "PerCoordinateSGD"]


class MetaSGDRates(nn.Module):
    """Meta-SGD's learned step sizes alpha (Li et al. 2017), one per learner coordinate.

    >>> rates = MetaSGDRates(nn.Linear(3, 2), initial=0.01)
    >>> [tuple(r.shape) for r in rates.rates]
    [(2, 3), (2,)]
    """

    def __init__(self, learner: nn.Module | dict[str, Tensor], initial: float = 0.01) -> None:
        super().__init__()
        named = (learner.named_parameters() if isinstance(learner, nn.Module)
                 else learner.items())
        names, rates = [], []
        for name, param in named:
            names.append(name)
            rates.append(nn.Parameter(torch.full_like(param.detach(), float(initial))))
        self.names = names
        self.rates = nn.ParameterList(rates)

    def as_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.rates))


class PerCoordinateSGD(torch.optim.Optimizer):
    """SGD with one fixed step size per coordinate: ``theta <- theta - alpha * g``.

    >>> p = nn.Parameter(torch.ones(2))
    >>> opt = PerCoordinateSGD([p], [torch.tensor([0.1, 0.5])])
    >>> p.sum().backward(); opt.step(); p.tolist()
    [0.8999999761581421, 0.5]
    """

    def __init__(self, params: Iterable[Tensor], rates: Iterable[Tensor]) -> None:
        params, rates = list(params), [r.detach() for r in rates]
        if len(params) != len(rates):
            raise ValueError(f"{len(params)} parameters but {len(rates)} step-size tensors")
        for index, (param, rate) in enumerate(zip(params, rates)):
            if param.shape != rate.shape:
                raise ValueError(f"step sizes {index} have shape {tuple(rate.shape)}, "
                                 f"parameter has {tuple(param.shape)}")
        super().__init__(params, defaults={})
        self._rates = rates

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        for param, rate in zip(params, self._rates):
            if param.grad is not None:
                param.addcmul_(rate.to(param.device), param.grad, value=-1.0)
        return loss
