"""Chains of rule steps that the tests of the tape's nodes share (compiled and native).

Each runs a given step function (``update_rows``, ``update_rows_compiled``,
``update_rows_native``) the way meta-training does and returns what the tests compare.
Also the rule change that the tests of the shells' constant caches make between two steps.
"""

from __future__ import annotations

import copy

import higher
import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule.math import initial_state, prepare_step


def changed_rule(rule: MetaLearnerLSTM, in_place: bool) -> MetaLearnerLSTM:
    """``rule`` with its layer-1 input weights times 50 and its gate bias plus 0.3: changed in
    place, or a new module with those values (a shell that keeps the rule's constants between
    steps must give the same next step for both)."""
    changed = rule if in_place else copy.deepcopy(rule)
    with torch.no_grad():
        changed.weight_ih.mul_(50.0)
        changed.bias.add_(0.3)
    return changed


def two_steps_with_a_rule_change(in_place: bool, twin: bool) -> list[torch.Tensor]:
    """A linear model's parameters after two steps of the drop-in optimizer (or, ``twin``, of
    its ``higher`` twin in one inner loop), the rule changed between them by
    :func:`changed_rule`."""
    torch.manual_seed(0)
    rule = MetaLearnerLSTM()
    with torch.no_grad():
        rule.meta_bias.copy_(torch.tensor([5.0, -1.0]))  # steps large enough to tell apart
    model = nn.Linear(6, 3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = LSTMMetaOptimizer(model.parameters(), rule)
    if twin:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for step in range(2):
                if step == 1:
                    diffopt.meta_learner = changed_rule(rule, in_place)
                diffopt.step(F.cross_entropy(fmodel(x), y))
            return [p.detach().clone() for p in fmodel.parameters()]
    for step in range(2):
        if step == 1:
            opt.meta_learner = changed_rule(rule, in_place)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    return [p.detach().clone() for p in model.parameters()]


def random_rule(hidden: int = 20, seed: int = 0) -> MetaLearnerLSTM:
    """A rule whose weights are far from the paper's init (gates away from saturation)."""
    torch.manual_seed(seed)
    rule = MetaLearnerLSTM(hidden_size=hidden)
    with torch.no_grad():
        for param in rule.parameters():
            param.normal_(0, 0.5)
    return rule


def first_order_chain(step, rule, rows: int, steps: int = 6, dtype=None) -> list[torch.Tensor]:
    """``steps`` first-order updates from a random state, then a backward: values and grads
    (the inputs at ``dtype``, by default torch's default dtype)."""
    generator = torch.Generator().manual_seed(1)
    state0 = torch.randn(rows, 42, generator=generator, dtype=dtype)
    param0 = torch.randn(rows, generator=generator, dtype=dtype).requires_grad_()
    grads = [torch.randn(rows, generator=generator, dtype=dtype) * 0.05 for _ in range(steps)]
    rule.zero_grad()
    state, param = state0.clone().requires_grad_(), param0
    start = state
    for grad in grads:
        constants = prepare_step(rule.weights(), torch.tensor(0.8), torch.float32)
        param, state = step(constants, state, grad, param)
    weights = torch.randn(rows, 42, generator=generator, dtype=dtype)
    ((param * grads[0]).sum() + (state * weights).sum()).backward()
    return [param.detach(), state.detach(), start.grad, param0.grad,
            *[p.grad.clone() for p in rule.parameters()]]


def second_order_chain(step, rule, rows: int = 3000, steps: int = 4) -> list[torch.Tensor]:
    """``steps`` second-order updates of a quadratic's parameters (the gradient and the loss
    on the tape), then the meta-gradients with ``create_graph=True`` and a gradient of those:
    what a hypergradient of a hypergradient needs."""
    generator = torch.Generator().manual_seed(2)
    theta0 = torch.randn(rows, generator=generator).requires_grad_()
    target = torch.randn(rows, generator=generator)
    state, theta = initial_state(rows, rule.hidden_size), theta0
    for _ in range(steps):
        loss = ((theta - target) ** 2).mean() * 3
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta, state = step(prepare_step(rule.weights(), loss, torch.float32), state, grad, theta)
    meta = torch.autograd.grad((theta ** 3).sum() + state.sum(),
                               [theta0, *rule.parameters()], create_graph=True)
    again = torch.autograd.grad(meta[0].sum() + meta[1].sum(), [theta0, rule.weight_ih])
    return [theta.detach(), *(g.detach() for g in meta), *again]


def saved_row_tensor_sizes(step, rule, rows: int, steps: int = 3) -> list[int]:
    """Sizes of the tensors of at least ``rows`` elements that ``steps`` steps save for the
    backward (what the tape holds per coordinate)."""
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    state, theta = initial_state(rows, 20), torch.zeros(rows, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for _ in range(steps):
            constants = prepare_step(rule.weights(), torch.tensor(1.0), torch.float32)
            theta, state = step(constants, state, torch.ones(rows), theta)
    return sorted(t.numel() for t in saved if t.numel() >= rows)


def twin_meta_gradients(rule, first_order: bool, width: int = 100) -> list[torch.Tensor]:
    """Meta-gradients (rule, then initial weights) after 4 steps of the higher twin on an MLP
    40-``width``-3 (4,403 coordinates at the default, inside the policy's one-node range)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, width), nn.Tanh(), nn.Linear(width, 3))
    x, y = torch.randn(24, 40), torch.randint(0, 3, (24,))
    rule.zero_grad()
    opt = LSTMMetaOptimizer(model.parameters(), rule, first_order=first_order)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(4):
            diffopt.step(F.cross_entropy(fmodel(x[:16]), y[:16]))
        F.cross_entropy(fmodel(x[16:]), y[16:]).backward()
    return [p.grad.clone() for p in (*rule.parameters(), *model.parameters())]


def assert_close_to_largest(ours, theirs, names=None, exercised: bool = False) -> None:
    """Each of ``ours`` equals its ``theirs`` to float32 rounding: relative 1e-4, absolute
    1e-5 of the largest value (or 1e-5 below 1). ``exercised``: also every ``theirs`` is
    nonzero somewhere, so that no gradient is compared as zeros against zeros."""
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    names = names or [f"output {index}" for index in range(len(theirs))]
    for name, mine, reference in zip(names, ours, theirs):
        scale = reference.abs().max().item()
        if exercised:
            assert scale > 0, name
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                   msg=name)
