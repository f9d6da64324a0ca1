"""Few-shot fine-tuning of any model through an update rule, with the paper's BN protocol."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learned_optim.baselines import PerCoordinateSGD
from learned_optim.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_learned_init
from learned_optim.learners import reset_batchnorm
from learned_optim.metalearner import MetaLearnerLSTM
from learned_optim.optimizer import LSTMMetaOptimizer

__all__ = ["adapted_parameters", "finetune", "make_optimizer", "FinetuneStep"]

OptimizerSpec = (
    MetaLearnerLSTM | str | os.PathLike | Checkpoint | Callable[..., torch.optim.Optimizer]
)


def adapted_parameters(model: nn.Module, adapt: str = "all") -> list[tuple[str, nn.Parameter]]:
    """The named parameters that few-shot adaptation updates: all of ``model``'s that require
    grad (``adapt="all"``), or those of its submodule called ``adapt`` (``"head"``: the
    features stay as initialised, and no gradient needs to flow through them).

    Examples
    --------
    >>> model = nn.Sequential()
    >>> model.add_module("features", nn.Linear(4, 3))
    >>> model.add_module("head", nn.Linear(3, 2))
    >>> [name for name, _ in adapted_parameters(model, "head")]
    ['head.weight', 'head.bias']
    >>> len(adapted_parameters(model))
    4
    """
    if adapt == "all":
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        part = model.get_submodule(adapt)
    except AttributeError:
        children = [name for name, _ in model.named_children()]
        raise ValueError(f"adapt={adapt!r}: {type(model).__name__} has no submodule {adapt!r} "
                         f"(its submodules: {children}); adapt 'all' or one of them") from None
    named = [(f"{adapt}.{n}", p) for n, p in part.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"adapt={adapt!r}: {type(model).__name__}.{adapt} has no parameter "
                         "that requires grad: nothing would be adapted")
    return named


def make_optimizer(spec: OptimizerSpec, model: nn.Module, adapt: str = "all"
                   ) -> torch.optim.Optimizer:
    """Build the optimizer that adapts ``model``'s parameters from an update-rule spec.

    ``spec`` is a :class:`MetaLearnerLSTM`, a checkpoint (loaded, or a shipped name or path:
    the Meta-Learner LSTM, or a MAML / Meta-SGD baseline), or a factory called with the
    parameters (e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``). ``adapt`` chooses the
    parameters (:func:`adapted_parameters`).
    """
    named = adapted_parameters(model, adapt)
    params = [p for _, p in named]
    if isinstance(spec, MetaLearnerLSTM):
        return LSTMMetaOptimizer(params, spec)
    if isinstance(spec, (str, os.PathLike)):
        spec = load_checkpoint(spec)
    if isinstance(spec, Checkpoint):
        if spec.method == "lstm":
            return LSTMMetaOptimizer(params, spec.meta_learner)
        if spec.method == "maml":
            return torch.optim.SGD(params, lr=spec.inner_lr)
        missing = [n for n, p in named
                   if n not in spec.learning_rates or spec.learning_rates[n].shape != p.shape]
        if missing:
            raise CheckpointError(f"{spec.path}: Meta-SGD step sizes do not match the model's "
                                  f"parameters {missing}")
        return PerCoordinateSGD([p for _, p in named], [spec.learning_rates[n] for n, _ in named])
    if callable(spec):
        return spec(params)
    raise TypeError(f"optimizer must be a MetaLearnerLSTM, a checkpoint or a factory, got {spec!r}")


class FinetuneStep(NamedTuple):
    """What :func:`finetune`'s ``on_step`` hook is given after each update."""

    step: int  # the update just taken, 1 for the first (t)
    model: nn.Module  # the adapted copy, in train mode; a hook that scores it restores that
    optimizer: torch.optim.Optimizer  # e.g. for the gates: learned_optim.plots.gate_values
    loss: Tensor  # the support loss the update was computed from (L_t)


def finetune(
    model: nn.Module,
    support_inputs: Tensor,
    support_targets: Tensor,
    *,
    optimizer: OptimizerSpec,
    steps: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    learned_init: str | os.PathLike | Checkpoint | None = None,
    on_step: Callable[[FinetuneStep], None] | None = None,
    adapt: str = "all",
) -> nn.Module:
    """Adapt a copy of ``model`` on a support set and return it, in eval mode.

    The whole support set is the batch of every step. BatchNorm follows the paper's protocol:
    running statistics are reset, accumulated over the support steps (train mode), and the
    returned model uses them in eval mode, so query predictions depend on this support set
    only, never on other query examples. ``model`` itself is not modified.

    Parameters
    ----------
    model:
        Any ``nn.Module``.
    support_inputs, support_targets:
        The few-shot training set D_train.
    optimizer:
        The update rule (see :func:`make_optimizer`).
    steps:
        Number of updates (T).
    loss_fn:
        Training loss (default cross-entropy).
    learned_init:
        A checkpoint whose learned initial weights are loaded into the copy first.
    on_step:
        Called with a :class:`FinetuneStep` after every update, to watch the adaptation
        (query scores, gates, weight norms after each step) without writing the loop again.
        It must leave the model in train mode and its parameters as they are.
    adapt:
        ``"all"`` parameters, or the name of the submodule whose parameters alone are adapted
        (``"head"`` for the package's learners; ``"fc"`` for a torchvision ResNet): the rest
        keep their values and the backward pass stops at that submodule's inputs
        (:func:`adapted_parameters`).

    Examples
    --------
    >>> import functools
    >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x, y = torch.randn(10, 2), torch.randint(0, 2, (10,))
    >>> adapted = finetune(model, x, y, optimizer=MetaLearnerLSTM(), steps=5)
    >>> adapted is model, adapted.training
    (False, False)
    >>> sgd = finetune(model, x, y, optimizer=functools.partial(torch.optim.SGD, lr=0.1), steps=5)
    >>> losses = []
    >>> _ = finetune(model, x, y, optimizer=MetaLearnerLSTM(), steps=3,
    ...              on_step=lambda s: losses.append((s.step, round(s.loss.item(), 1) > 0)))
    >>> losses
    [(1, True), (2, True), (3, True)]
    >>> last = finetune(model, x, y, optimizer=MetaLearnerLSTM(), steps=2, adapt="2")
    >>> torch.equal(last[0].weight, model[0].weight), torch.equal(last[2].weight, model[2].weight)
    (True, False)
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if len(support_inputs) != len(support_targets):
        raise ValueError(f"support set has {len(support_inputs)} inputs but "
                         f"{len(support_targets)} targets")
    adapted = copy.deepcopy(model)
    if learned_init is not None:
        load_learned_init(adapted, learned_init)
    reset_batchnorm(adapted)  # a new episode: no statistics from earlier ones
    opt = make_optimizer(optimizer, adapted, adapt)
    # Parameters left as they are need no gradient: backward stops where the adapted ones start.
    adapting = {id(p) for group in opt.param_groups for p in group["params"]}
    held = [p for p in adapted.parameters() if p.requires_grad and id(p) not in adapting]
    for param in held:
        param.requires_grad_(False)
    learned = isinstance(opt, LSTMMetaOptimizer)
    adapted.train()
    with torch.enable_grad():
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(adapted(support_inputs), support_targets)
            loss.backward()
            if learned:
                opt.step(loss=loss)
            else:
                opt.step()
            if on_step is not None:
                on_step(FinetuneStep(step, adapted, opt, loss))
    adapted.eval()  # queries use this support set's running statistics
    for param in adapted.parameters():
        param.grad = None
    for param in held:  # the copy's flags as the model's
        param.requires_grad_(True)
    return adapted
