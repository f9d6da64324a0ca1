"""The compiled step (learned_optim.rule.compiled) against the eager rule, in both orders."""

import warnings

import pytest
import torch
from rule_chains import (  # tests/rule_chains.py
    assert_close_to_largest,
    first_order_chain,
    saved_row_tensor_sizes,
    second_order_chain,
    twin_meta_gradients,
)
from torch import nn
from torch.nn import functional as F

import learned_optim.optimizer as optimizer_module
import learned_optim.rule.tape as tape_module
from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule import compiled, policy
from learned_optim.rule.math import initial_state, prepare_step, update_rows
from learned_optim.rule.tape import (
    compiled_applies,
    first_order_path,
    update_rows_differentiable,
)


def _trained_looking_rule(seed: int = 0) -> MetaLearnerLSTM:
    """A rule whose weights are not the paper's init, so every gate matters."""
    torch.manual_seed(seed)
    rule = MetaLearnerLSTM()
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return rule


def test_the_compiled_step_gives_the_eager_rules_values_and_gradients():
    rule = _trained_looking_rule()
    eager = first_order_chain(update_rows, rule, 3000)
    fused = first_order_chain(compiled.update_rows_compiled, rule, 3000)
    names = ["theta", "state", "d state_0", "d theta_0",
             *[n for n, _ in rule.named_parameters()]]
    assert_close_to_largest(fused, eager, names)


def test_the_state_stays_feature_major_between_compiled_steps():
    rule = _trained_looking_rule()
    constants = prepare_step(rule.weights(), torch.tensor(1.0), torch.float32)
    param = torch.zeros(5000, requires_grad=True)
    theta, state = compiled.update_rows_compiled(constants, torch.zeros(5000, 42),
                                                 torch.ones(5000), param)
    assert state.shape == (5000, 42) and state.t().is_contiguous()
    _, again = compiled.update_rows_compiled(constants, state, torch.ones(5000), theta)
    assert again.t().is_contiguous()


def test_second_order_steps_and_a_double_backward_through_them_match_the_eager_rule():
    rule = _trained_looking_rule(seed=5)
    eager = second_order_chain(update_rows, rule)
    fused = second_order_chain(compiled.update_rows_compiled, rule)
    assert len(fused) == 9
    # every meta-gradient and second gradient is exercised
    assert_close_to_largest(fused, eager, exercised=True)


def test_the_compiled_node_saves_only_its_inputs():
    """Its tape holds the gradient and parameter rows and the step constants; the state it
    saves is the previous step's output, which the tape keeps anyway."""
    rows, steps = 20_000, 3
    sizes = saved_row_tensor_sizes(compiled.update_rows_compiled, _trained_looking_rule(), rows,
                                   steps)
    # per step: the incoming state (42 floats a row), the gradient and the parameter
    assert sizes == sorted([42 * rows, rows, rows] * steps)


def test_float64_steps_stay_on_the_eager_paths():
    assert compiled_applies(torch.ones(5000))
    assert not compiled_applies(torch.ones(5000, dtype=torch.float64))
    assert first_order_path(torch.ones(5000, dtype=torch.float64),
                            torch.tensor(1.0)) == "trajectory"


def _twin_meta_gradients(first_order: bool, compile_rule: bool, monkeypatch):
    """Meta-gradients after 4 twin steps on an MLP of 4,403 coordinates, and how many steps
    took the compiled path."""
    monkeypatch.setattr(policy, "COMPILE_RULE", compile_rule)
    monkeypatch.setattr(policy, "step_native", lambda device, dtype: False)  # the chunk paths
    # the compiled node, not the native one in front of it (tests/test_rule_native_tape.py)
    monkeypatch.setattr(tape_module, "native_tape_applies", lambda grad, hidden: False)
    calls = []

    def counted(*args):
        calls.append(1)
        return compiled.update_rows_compiled(*args)

    monkeypatch.setattr(tape_module, "update_rows_compiled", counted)
    return twin_meta_gradients(_trained_looking_rule(seed=3), first_order), len(calls)


def test_the_twin_takes_the_compiled_step_in_first_order_with_the_trajectorys_gradients(
        monkeypatch):
    fused, calls = _twin_meta_gradients(True, True, monkeypatch)
    assert calls == 4
    replayed, calls = _twin_meta_gradients(True, False, monkeypatch)
    assert calls == 0
    assert_close_to_largest(fused, replayed)


def test_second_order_takes_the_compiled_node_with_the_recomputed_paths_gradients(
        monkeypatch):
    fused, calls = _twin_meta_gradients(False, True, monkeypatch)
    assert calls == 4
    recomputed, calls = _twin_meta_gradients(False, False, monkeypatch)
    assert calls == 0
    assert_close_to_largest(fused, recomputed)


def test_a_failed_compilation_warns_once_and_steps_stay_eager(monkeypatch):
    def no_compiler(fn, **options):
        def fails(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return fails

    monkeypatch.setattr(compiled, "_compiled", None)
    monkeypatch.setattr(compiled, "_failure", None)
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    monkeypatch.setattr(tape_module, "native_tape_applies", lambda grad, hidden: False)
    grad = torch.randn(5000)
    with pytest.warns(RuntimeWarning, match="torch.compile of the update rule failed "
                                            r"\(RuntimeError: no C\+\+ compiler found\); "
                                            "steps take the eager paths"):
        assert first_order_path(grad, torch.tensor(1.0)) == "trajectory"
    with warnings.catch_warnings():  # once: later steps do not try again
        warnings.simplefilter("error")
        assert first_order_path(grad, torch.tensor(1.0)) == "trajectory"
        constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
        param = torch.randn(5000, requires_grad=True)
        theta, _ = compiled.update_rows_compiled(constants, torch.zeros(5000, 42), grad, param)
        on_tape = grad.clone().requires_grad_()  # a second-order step: the recomputed node
        node = update_rows_differentiable(constants, torch.zeros(5000, 42), on_tape, param)[0]
        assert node.grad_fn.name() == "_UpdateRowsBackward"
    expected, _ = update_rows(constants, torch.zeros(5000, 42), grad, param)
    torch.testing.assert_close(theta, expected, rtol=0, atol=0)



def test_one_compiled_graph_serves_every_size_of_the_range_in_both_orders():
    """A graph compiled again costs 20-40 s: the probe's must cover the policy's sizes, the
    layouts prepare_step gives and inputs whether or not they require grad."""
    from torch._dynamo.utils import counters

    assert compiled.compiled_rule() is not None
    rule = _trained_looking_rule()
    before = counters["stats"]["unique_graphs"]
    for rows in (policy.COMPILED_MIN_ROWS, 28_485, policy.COMPILED_MAX_ROWS):
        for second_order in (False, True):
            theta = torch.zeros(rows, requires_grad=True)
            grad = torch.randn(rows, requires_grad=second_order)
            constants = prepare_step(rule.weights(), torch.tensor(1.0), torch.float32)
            theta, state = compiled.update_rows_compiled(constants, initial_state(rows, 20),
                                                         grad, theta)
            theta, state = compiled.update_rows_compiled(constants, state, grad * 2, theta)
            (theta.sum() + state.sum()).backward()
    assert counters["stats"]["unique_graphs"] == before


def _drop_in_run(compile_rule: bool, monkeypatch):
    """Four in-place steps on an MLP of 9,754 coordinates (chunks of 6,000 rows: some take
    the compiled forward, the rest the eager kernel), one group with lr and weight decay."""
    monkeypatch.setattr(policy, "COMPILE_RULE", compile_rule)
    monkeypatch.setattr(policy, "step_native", lambda device, dtype: False)  # the chunk paths
    calls = []

    def counted(*args):
        calls.append(args[1].shape[0])
        return compiled.step_rows_compiled(*args)

    monkeypatch.setattr(optimizer_module, "step_rows_compiled", counted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 150), nn.Tanh(), nn.Linear(150, 4))
    x, y = torch.randn(32, 60), torch.randint(0, 4, (32,))
    opt = LSTMMetaOptimizer([{"params": model[0].parameters(), "lr": 0.7, "weight_decay": 1e-3},
                             {"params": model[2].parameters()}],
                            _trained_looking_rule(seed=4), chunk_size=6000)
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    return [p.detach().clone() for p in model.parameters()], calls


def test_the_in_place_step_through_the_compiled_forward_matches_the_eager_step(monkeypatch):
    fused, calls = _drop_in_run(True, monkeypatch)
    assert calls == [6000] * 4  # the 3,150-row chunk and the small group stay eager
    eager, calls = _drop_in_run(False, monkeypatch)
    assert calls == []
    for ours, theirs in zip(fused, eager):
        assert not torch.equal(ours, _drop_in_start(ours.shape))  # the steps moved it
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def _drop_in_start(shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 150), nn.Tanh(), nn.Linear(150, 4))
    return next(p.detach() for p in model.parameters() if p.shape == shape)
