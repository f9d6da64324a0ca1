"""The tape's native node (learned_optim.rule.native_tape) against the eager rule.

Its backward is the rule's only hand-written gradient in C++: these tests hold the node's
values and every gradient (state, gradient input, parameter, all rule weights) to float64
``update_rows`` over sizes that end inside a vector tile and every hidden size the kernels
take, through chains of steps in both orders and a double backward, inside ``higher``; and
check what it saves, where the tape sends a step, and how a failed build falls back.
"""

import math
import warnings

import pytest
import torch
from rule_chains import (  # tests/rule_chains.py
    assert_close_to_largest,
    first_order_chain,
    random_rule,
    saved_row_tensor_sizes,
    second_order_chain,
    twin_meta_gradients,
)

import learned_optim.rule.tape as tape_module
from learned_optim import MetaLearnerLSTM
from learned_optim.rule import compiled, native_tape, policy
from learned_optim.rule.math import initial_state, prepare_step, update_rows
from learned_optim.rule.tape import node_path, update_rows_differentiable

pytestmark = pytest.mark.skipif(not native_tape.native_tape_applies(torch.ones(1), 20),
                                reason="no C++ toolchain for the native kernels here")


def _one_step_gradients(step, rule, rows: int, dtype: torch.dtype):
    """One step's outputs and the gradients of a fixed random function of them w.r.t. the
    state, the gradient input, the parameter and every rule weight."""
    hidden = rule.hidden_size
    generator = torch.Generator().manual_seed(1)
    state = torch.randn(2 * hidden + 2, rows, generator=generator).t().to(dtype)
    # gradients from 1e-9 to 1 (both sides of e^-10), some exactly zero, both signs
    grad = torch.randn(rows, generator=generator) * torch.logspace(-9, 0, rows)
    grad[::7] = 0.0
    theta = torch.randn(rows, generator=generator)
    out_theta = torch.randn(rows, generator=generator).to(dtype)
    out_state = torch.randn(rows, 2 * hidden + 2, generator=generator).to(dtype)
    state, grad, theta = (t.to(dtype).requires_grad_() for t in (state, grad, theta))
    rule.zero_grad()
    constants = prepare_step(rule.weights(), torch.tensor(0.37), dtype)
    new_theta, new_state = step(constants, state, grad, theta)
    ((new_theta * out_theta).sum() + (new_state * out_state).sum()).backward()
    return [new_theta.detach(), new_state.detach(), state.grad, grad.grad, theta.grad,
            *[p.grad.clone() for p in rule.parameters()]]


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 1000, 5003])
@pytest.mark.parametrize("hidden", [1, 7, 20, 64])
def test_one_step_gives_update_rows_values_and_gradients(rows, hidden):
    rule = random_rule(hidden)
    exact = _one_step_gradients(update_rows, rule, rows, torch.float64)
    ours = _one_step_gradients(native_tape.update_rows_native, rule, rows, torch.float32)
    eager = _one_step_gradients(update_rows, rule, rows, torch.float32)
    assert len(ours) == 10
    for index, (mine, theirs, truth) in enumerate(zip(ours, eager, exact)):
        scale = truth.abs().max().item()
        assert scale > 0, index  # every gradient is exercised
        # float32 rounding: no further from float64 than the eager float32 rule, or 2e-6 of
        # the largest value (another summation order)
        error = (mine.double() - truth).abs().max().item()
        eager_error = (theirs.double() - truth).abs().max().item()
        assert error <= max(4 * eager_error, 2e-6 * scale), (index, error, eager_error)


def test_a_chain_of_steps_matches_the_eager_rule_and_keeps_the_state_feature_major():
    rule = random_rule()
    ours = first_order_chain(native_tape.update_rows_native, rule, 28_485)
    theirs = first_order_chain(update_rows, rule, 28_485)
    assert_close_to_largest(ours, theirs)
    constants = prepare_step(rule.weights(), torch.tensor(1.0), torch.float32)
    theta, state = native_tape.update_rows_native(constants, torch.zeros(500, 42),
                                                  torch.ones(500), torch.zeros(500))
    # feature-major, each feature contiguous and starting on a cache line (500 -> 512 floats)
    assert state.shape == (500, 42) and state.stride() == (1, 512)


def test_second_order_steps_and_a_double_backward_through_them_match_the_eager_rule():
    rule = random_rule(seed=5)
    eager = second_order_chain(update_rows, rule)
    ours = second_order_chain(native_tape.update_rows_native, rule)
    assert len(ours) == 9
    assert_close_to_largest(ours, eager, exercised=True)


def test_the_node_saves_only_its_inputs():
    rows, steps = 5000, 3
    sizes = saved_row_tensor_sizes(native_tape.update_rows_native, random_rule(), rows, steps)
    # per step: the incoming state (42 floats a row), the gradient and the parameter
    assert sizes == sorted([42 * rows, rows, rows] * steps)


def test_the_backward_gives_the_same_sums_on_one_and_two_threads():
    # Its blocks go to whichever thread is free, and their sums are added in block order, so
    # the gradients are bit for bit the same run to run and for any number of threads.
    rule = random_rule()
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            runs.append(_one_step_gradients(native_tape.update_rows_native, rule, 28_485,
                                            torch.float32))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def _twin_meta_gradients(first_order: bool, native_on: bool, monkeypatch):
    """Meta-gradients after 4 twin steps on an MLP of 4,403 coordinates, and how many steps
    took the native node (the trajectory or the recomputed step otherwise)."""
    monkeypatch.setattr(policy, "COMPILE_RULE", native_on)
    monkeypatch.setattr(policy, "step_native", lambda device, dtype: False)
    calls = []

    def counted(*args):
        calls.append(1)
        return native_tape.update_rows_native(*args)

    monkeypatch.setattr(tape_module, "update_rows_native", counted)
    grads = twin_meta_gradients(random_rule(seed=3), first_order)
    monkeypatch.undo()
    return grads, len(calls)


@pytest.mark.parametrize("first_order", [True, False])
def test_the_twin_takes_the_native_node_with_the_eager_paths_meta_gradients(first_order,
                                                                             monkeypatch):
    ours, calls = _twin_meta_gradients(first_order, True, monkeypatch)
    assert calls == 4
    theirs, calls = _twin_meta_gradients(first_order, False, monkeypatch)
    assert calls == 0
    assert_close_to_largest(ours, theirs)


def test_where_the_tape_sends_a_step(monkeypatch):
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    grad = torch.randn(5000)
    assert node_path(grad, 20, first_order=True) == "native"
    assert node_path(grad, 20, first_order=False) == "native"
    # past the kernels' hidden size, float64, below the range: the other paths
    assert node_path(grad, 65, first_order=False) == "compiled"
    assert node_path(grad.double(), 20, first_order=True) == "trajectory"
    assert node_path(torch.randn(100), 20, first_order=False) == "recomputed"
    constants = prepare_step(random_rule().weights(), None, torch.float32)
    theta, _ = update_rows_differentiable(constants, initial_state(5000, 20), grad,
                                          torch.zeros(5000, requires_grad=True))
    assert theta.grad_fn.name() == "_NativeStepBackward"


def test_a_failed_build_warns_once_and_the_tape_takes_the_compiled_node(no_cpp_compiler,
                                                                        monkeypatch):
    no_cpp_compiler(native_tape.BACKWARD_KERNEL)
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    assert compiled.compiled_rule() is not None  # built before the patch: unaffected
    grad = torch.randn(5000)
    with pytest.warns(RuntimeWarning, match=r"building the native rule backward kernel failed "
                                            r"\(RuntimeError: no C\+\+ compiler found\); the "
                                            "tape takes the compiled or eager steps"):
        assert node_path(grad, 20, first_order=True) == "compiled"
    with warnings.catch_warnings():  # once: later steps do not try again
        warnings.simplefilter("error")
        assert node_path(grad, 20, first_order=False) == "compiled"
        constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
        theta, _ = update_rows_differentiable(constants, initial_state(5000, 20), grad,
                                              torch.zeros(5000, requires_grad=True))
    assert theta.grad_fn.name() == "_CompiledStepBackward"
    assert all(math.isfinite(v) for v in theta.tolist()[:10])


def test_a_float64_default_dtype_changes_nothing_for_float32_steps(default_dtype):
    # The node allocates its outputs itself: float32 whatever the default dtype, as a
    # float32 learner's steps are (before, its second step refused a float64 state).
    rule = random_rule()
    expected = first_order_chain(native_tape.update_rows_native, rule, 5000)
    default_dtype(torch.float64)
    assert_close_to_largest(first_order_chain(native_tape.update_rows_native, rule, 5000,
                                              dtype=torch.float32), expected)
