"""The differentiable twin inside higher.innerloop_ctx (the meta-training path)."""

import copy

import higher
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from learned_optim import DifferentiableLSTMMetaOptimizer, LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.metalearner import initial_state, meta_update


def unroll(model, meta, x, y, steps, first_order=True, track=True):
    """Inner loop through higher; returns the query loss and the final fast weights."""
    opt = LSTMMetaOptimizer(model.parameters(), meta, first_order=first_order)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                              track_higher_grads=track) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(x), y))
        return F.cross_entropy(fmodel(x), y), list(fmodel.parameters()), diffopt


def test_higher_looks_up_the_registered_twin():
    model = nn.Linear(2, 2)
    with higher.innerloop_ctx(model, LSTMMetaOptimizer(model.parameters())) as (_, diffopt):
        assert type(diffopt) is DifferentiableLSTMMetaOptimizer


def test_meta_gradients_reach_the_meta_learner_and_the_learned_init(digits):
    inputs, labels = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    meta = MetaLearnerLSTM()
    query_loss, _, _ = unroll(model, meta, inputs[:50], labels[:50], steps=3)
    query_loss.backward()
    for name, param in list(meta.named_parameters()) + list(model.named_parameters()):
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("first_order", [True, False])
def test_drop_in_and_twin_give_the_same_parameters(digits, first_order):
    inputs, labels = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    twin_model = copy.deepcopy(model)
    meta = MetaLearnerLSTM()
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(inputs[:40]), labels[:40])
        loss.backward()
        opt.step(loss=loss)
    _, fast, diffopt = unroll(twin_model, meta, inputs[:40], labels[:40], 4, first_order)
    for ours, theirs in zip(model.parameters(), fast):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-6)
    twin_state = torch.cat(list(diffopt._buckets[0].values()))
    drop_in_state = torch.cat([opt.state[p]["lstm_state"] for p in model.parameters()])
    # The drop-in's native kernel sums in another order than the twin's kernels: float32
    # rounding of the larger pre-activations (about 4), hence the relative tolerance.
    torch.testing.assert_close(drop_in_state, twin_state.detach(), rtol=1e-6, atol=1e-6)


def test_twin_continues_from_the_drop_in_state():
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    model = nn.Linear(3, 2)
    meta = MetaLearnerLSTM()
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    twin_model = copy.deepcopy(model)
    twin_opt = LSTMMetaOptimizer(twin_model.parameters(), meta)
    twin_opt.load_state_dict(opt.state_dict())
    with higher.innerloop_ctx(twin_model, twin_opt) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(x), y))
        twin_weight = fmodel.weight.detach()
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss=loss)
    torch.testing.assert_close(model.weight, twin_weight, rtol=0, atol=1e-6)


def _reachable(root, target) -> bool:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


@pytest.mark.parametrize("first_order", [True, False])
def test_first_order_builds_no_double_backward_graph(first_order):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    opt = LSTMMetaOptimizer(model.parameters(), MetaLearnerLSTM(), first_order=first_order)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        support_loss = F.cross_entropy(fmodel(x), y)
        new_params = diffopt.step(support_loss)
    # The support forward graph enters the update only through create_graph gradients
    # and a non-detached loss: both exist in second order only.
    reached = any(_reachable(p.grad_fn, support_loss.grad_fn) for p in new_params)
    assert reached is (not first_order)


def test_track_higher_grads_false_runs_without_a_tape():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    model = nn.Linear(4, 2)
    query_loss, fast, _ = unroll(model, MetaLearnerLSTM(), x, y, 2, track=False)
    assert all(p.grad_fn is None for p in fast)
    assert query_loss.requires_grad  # fresh leaves, usable for a new inner loop


def _tiny_problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    meta = MetaLearnerLSTM(hidden_size=5).double()
    with torch.no_grad():  # larger steps make the meta-gradient less trivial
        meta.meta_bias.copy_(torch.tensor([3.0, -1.5]))
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)),
            torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    return model, meta, data


def _meta_loss(model, meta, data, meta_values, init_values, recorded=None, steps=3):
    """Query loss after `steps` pure updates; gradients recomputed, or taken from `recorded`."""
    support_x, support_y, query_x, query_y = data
    names = [n for n, _ in model.named_parameters()]
    meta_names = [n for n, _ in meta.named_parameters()]
    weights = meta.weights()._replace(**dict(zip(meta_names, meta_values)))
    theta = list(init_values)
    sizes = [t.numel() for t in theta]
    state = initial_state(sum(sizes), meta.hidden_size, dtype=torch.float64)
    for step in range(steps):
        if recorded is None:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in theta]
                loss = F.cross_entropy(
                    functional_call(model, dict(zip(names, leaves)), (support_x,)), support_y)
                grads = torch.autograd.grad(loss, leaves)
        else:
            loss, grads = recorded[step]
        flat, state = meta_update(weights, state, torch.cat([g.reshape(-1) for g in grads]),
                                  loss.detach(), torch.cat([t.reshape(-1) for t in theta]))
        theta = [piece.view_as(t) for piece, t in zip(flat.split(sizes), theta)]
    return F.cross_entropy(functional_call(model, dict(zip(names, theta)), (query_x,)), query_y)


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_gradient_matches_finite_differences(first_order):
    model, meta, data = _tiny_problem()
    support_x, support_y, query_x, query_y = data
    opt = LSTMMetaOptimizer(model.parameters(), meta, first_order=first_order)
    recorded = []
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            loss = F.cross_entropy(fmodel(support_x), support_y)
            grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
            recorded.append((loss.detach(), [g.detach() for g in grads]))
            diffopt.step(loss)
        F.cross_entropy(fmodel(query_x), query_y).backward()
    analytic = [p.grad for p in list(meta.parameters()) + list(model.parameters())]

    # First order is defined as the derivative with the learner's gradients and losses held
    # at their recorded values; second order recomputes them at every perturbed point.
    fixed = recorded if first_order else None
    meta_values = [p.detach() for p in meta.parameters()]
    init_values = [p.detach() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    directions = [torch.randn(t.shape, generator=generator, dtype=torch.float64)
                  for t in meta_values + init_values]
    eps = 1e-6

    def shifted(sign):
        moved = [t + sign * eps * d for t, d in zip(meta_values + init_values, directions)]
        return _meta_loss(model, meta, data, moved[:len(meta_values)], moved[len(meta_values):],
                          fixed).item()

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    predicted = sum((g * d).sum() for g, d in zip(analytic, directions)).item()
    assert predicted == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_first_and_second_order_meta_gradients_differ():
    model, meta, data = _tiny_problem()
    grads = []
    for first_order in (True, False):
        meta.zero_grad()
        learner = copy.deepcopy(model)
        loss, _, _ = unroll(learner, meta, data[0], data[1], 3, first_order)
        loss.backward()
        grads.append(meta.meta_bias.grad.clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x))


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(2, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class TiedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight  # one parameter used twice
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class PartlyFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.frozen(x)))


@pytest.mark.parametrize(
    "model_class, input_shape",
    [(ConvBN, (9, 1, 6, 6)), (GRUClassifier, (9, 4, 2)), (TiedLayers, (9, 4)),
     (PartlyFrozen, (9, 5))],
)
def test_inner_loop_works_across_architectures(model_class, input_shape):
    torch.manual_seed(0)
    model = model_class()
    meta = MetaLearnerLSTM()
    x, y = torch.randn(*input_shape), torch.randint(0, 3, (9,))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    loss, fast, _ = unroll(model, meta, x, y, steps=3)
    start = F.cross_entropy(model(x), y)
    assert len(fast) == len(list(model.parameters()))
    loss.backward()
    assert loss.item() < start.item()
    assert meta.meta_bias.grad is not None and torch.isfinite(meta.meta_bias.grad).all()
    assert meta.meta_bias.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert param.grad is None and torch.equal(param, frozen_before[name])
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


# What DifferentiableLSTMMetaOptimizer.step relies on in higher (protected attributes of
# higher.optim.DifferentiableOptimizer): if a higher release changes any of it, these fail first.


def test_higher_step_has_the_signature_the_twin_overrides():
    import inspect

    from higher.optim import DifferentiableOptimizer

    theirs = list(inspect.signature(DifferentiableOptimizer.step).parameters)
    ours = list(inspect.signature(DifferentiableLSTMMetaOptimizer.step).parameters)
    assert theirs == ours == ["self", "loss", "params", "override", "grad_callback", "kwargs"]


def test_higher_keeps_the_protected_attributes_the_twin_reads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    groups = [{"params": [model[2].weight, model[0].bias]},
              {"params": [model[0].weight, model[2].bias], "lr": 0.5}]
    opt = LSTMMetaOptimizer(groups, MetaLearnerLSTM())
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss=loss)  # so that higher copies a state
    callback = list
    with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, _):
        diffopt = higher.optim.get_diff_optim(opt, model.parameters(), fmodel=fmodel,
                                              track_higher_grads=False, grad_callback=callback)
        assert isinstance(diffopt, DifferentiableLSTMMetaOptimizer)
        assert diffopt._fmodel is fmodel and len(fmodel.fast_params) == 4
        assert callable(fmodel.update_params)
        assert diffopt._track_higher_grads is False
        assert diffopt._grad_callback is callback
        # group slot -> index into the model's parameters (reference order)
        assert diffopt._group_to_param_list == [[2, 1], [0, 3]]
        # the drop-in's state, copied per group and slot
        copied = diffopt.state[1][0]["lstm_state"]
        assert torch.equal(copied, opt.state[model[0].weight]["lstm_state"])
        diffopt._apply_override({"lr": [torch.tensor(0.25)]})
        assert [float(g["lr"]) for g in diffopt.param_groups] == [0.25, 0.25]


def test_the_twins_shared_rule_constants_take_one_backward_per_step():
    # An episode's steps share one recorded prepare_rule. Its operations save no tensors, so
    # backward passes through two steps' constants, one after the other and without
    # retain_graph, both work, and give the meta-gradients of constants built per step.
    from learned_optim.rule.math import prepare_step

    torch.manual_seed(0)
    rule = MetaLearnerLSTM()
    model = nn.Linear(4, 2)
    with higher.innerloop_ctx(model, LSTMMetaOptimizer(model.parameters(), rule)) as (_, diffopt):
        cache = diffopt._rule_cache
    losses = (torch.tensor(0.7), torch.tensor(2.5))

    def objective(constants):
        return (constants.gate_bias.sin().sum() + constants.input_weight.square().sum()
                + constants.meta_weight_h.sum() * constants.meta_bias.sum())

    shared = []
    for loss in losses:
        rule.zero_grad()
        objective(cache.constants(rule.weights(), loss, torch.float32,
                                  torch.device("cpu"))).backward()
        shared.append([p.grad.clone() for p in rule.parameters()])
    assert len(cache.rules) == 1  # both steps read the same recorded constants
    for loss, grads in zip(losses, shared):
        rule.zero_grad()
        objective(prepare_step(rule.weights(), loss, torch.float32)).backward()
        for ours, theirs in zip(grads, (p.grad for p in rule.parameters())):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
