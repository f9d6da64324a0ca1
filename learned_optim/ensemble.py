"""Ensembles of few-shot learners: every member adapts on the same support set on its own
(its learned init, its update rule, its T, the parameters it adapts), and each query gets the
mean of the members' class probabilities.

Two learners with different features make different mistakes: on the lake-alphabets validation
episodes (features of the 795 training characters, each net adapting its own head with the
shipped rule) the ResNet-12 and the 4-block net together scored 93.29% against the ResNet's
92.66% alone (paired +0.63 +- 0.27 points, docs/results/lake_overlap.md, session 23).
:func:`learned_optim.evaluate.evaluate` (``ensemble=``, ``learned-optim evaluate A --ensemble
B``) and :class:`~learned_optim.FewShotClassifier` (``ensemble=``) run them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from learned_optim.finetune import OptimizerSpec, finetune
from learned_optim.learners import reset_batchnorm

__all__ = ["Member", "adapted_probabilities", "ensemble_log_probabilities",
           "support_and_query_features"]


@dataclass(frozen=True)
class Member:
    """One learner of an ensemble and how it adapts: ``optimizer`` is a checkpoint (its rule),
    an ``LSTMMetaOptimizer`` rule or a ``torch.optim`` factory, as :func:`finetune` takes it."""

    learner: nn.Module
    optimizer: OptimizerSpec
    steps: int
    adapt: str = "all"


def adapted_probabilities(member: Member, support_inputs: Tensor, support_targets: Tensor,
                          query_inputs: Tensor,
                          loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy
                          ) -> Tensor:
    """Class probabilities ``[queries, ways]`` of the member adapted on the support set
    (paper's BatchNorm protocol: every query alone, support-set statistics)."""
    adapted = finetune(member.learner, support_inputs, support_targets,
                       optimizer=member.optimizer, steps=member.steps, loss_fn=loss_fn,
                       adapt=member.adapt)
    with torch.no_grad():
        return adapted(query_inputs).softmax(dim=1)


def ensemble_log_probabilities(
    members: Sequence[Member], support_inputs: Tensor, support_targets: Tensor,
    query_inputs: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> Tensor:
    """Log of the members' mean class probabilities: scores for ``argmax`` or an accuracy
    that takes logits.

    Examples
    --------
    >>> import functools
    >>> torch.manual_seed(0) is not None
    True
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> sgd = functools.partial(torch.optim.SGD, lr=0.5)
    >>> members = [Member(nn.Linear(3, 3), sgd, steps=10) for _ in range(2)]
    >>> scores = ensemble_log_probabilities(members, x, y, x)
    >>> scores.shape, bool(torch.allclose(scores.exp().sum(dim=1), torch.ones(6)))
    (torch.Size([6, 3]), True)
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    probabilities = [adapted_probabilities(m, support_inputs, support_targets, query_inputs,
                                           loss_fn) for m in members]
    return torch.stack(probabilities).mean(dim=0).log()


def support_and_query_features(learner: nn.Module, support_inputs: Tensor,
                               query_inputs: Tensor) -> tuple[Tensor, Tensor]:
    """The learner's ``features`` of a support and a query set, flattened; BatchNorm
    statistics from the support set alone, exactly (one pass), queries in eval mode. A learner
    without ``features`` gives its raw inputs."""
    features = getattr(learner, "features", None)
    if features is None:
        return support_inputs.flatten(1), query_inputs.flatten(1)
    extractor = copy.deepcopy(features)
    reset_batchnorm(extractor)
    for module in extractor.modules():  # exact support statistics in one pass
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        extractor.train()
        support = extractor(support_inputs).flatten(1)
        extractor.eval()
        return support, extractor(query_inputs).flatten(1)
