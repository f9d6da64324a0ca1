"""The in-place step's hand-fused CPU kernel (``learned_optim.rule.native``) against the rule.

The kernel is the rule's only hand-written copy outside ``update_rows``: these tests hold it to
``update_rows`` (and ``apply_group_options``) to float32 rounding over sizes that end inside a
vector tile, every hidden size it takes, gradients on both sides of the preprocessing
threshold, and a whole optimizer run; and check what it refuses and how a failed build falls
back.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from rule_chains import random_rule  # tests/rule_chains.py
from torch import nn

import learned_optim.optimizer as optimizer_module
from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule import compiled, native, policy
from learned_optim.rule.math import (
    apply_group_options,
    normalisation,
    prepare_step,
    scale_gradient,
    update_rows,
)
from learned_optim.truncated import general_rule

pytestmark = pytest.mark.skipif(native.native_step_kernel() is None,
                                reason="no C++ toolchain for torch.compile on this machine")


def _inputs(rows: int, hidden: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    state = torch.randn(2 * hidden + 2, rows, generator=generator).t()  # feature-major
    # gradients from 1e-9 to 1 (both sides of e^-10), some exactly zero, both signs
    grad = torch.randn(rows, generator=generator) * torch.logspace(-9, 0, rows)
    grad[::7] = 0.0
    theta = torch.randn(rows, generator=generator)
    return state, grad, theta


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 33, 1000, 5003])
@pytest.mark.parametrize("hidden", [1, 7, 20, 64])
def test_the_kernel_computes_update_rows(rows, hidden):
    rule = random_rule(hidden)
    constants = prepare_step(rule.weights(), torch.tensor(0.37), torch.float32)
    state, grad, theta = _inputs(rows, hidden)
    expected_theta, expected_state = update_rows(constants, state, grad, theta)
    native.step_rows_native(constants, state, grad, theta)
    # Another summation order over 2 + H products: float32 rounding, relative 1e-6 of the
    # gate pre-activations, which cancellation in c1 can leave on a near-zero value.
    torch.testing.assert_close(theta, expected_theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-5)


def test_saturated_infinite_and_nan_inputs_as_update_rows():
    # The kernel's own sigmoid clamps its exponent: saturated gates must still give 0 and 1
    # to rounding, infinite pre-activations no NaN, and a NaN stays NaN, as in update_rows.
    hidden = 20
    constants = prepare_step(random_rule(hidden).weights(), torch.tensor(0.37), torch.float32)
    state, grad, theta = _inputs(100, hidden)
    state.mul_(1e4)  # every gate saturated
    state[:10, 2 * hidden] = torch.tensor([float("inf"), -float("inf")] * 5)  # f_prev
    state[10:20, 2 * hidden + 1] = torch.tensor([float("inf"), -float("inf")] * 5)  # i_prev
    grad[20] = float("nan")
    expected_theta, expected_state = update_rows(constants, state, grad, theta)
    native.step_rows_native(constants, state, grad, theta)
    assert theta[20].isnan() and expected_theta[20].isnan()
    torch.testing.assert_close(theta, expected_theta, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("lr, weight_decay", [(0.3, 0.0), (0.7, 1e-2), (1.0, 0.1), (2.0, 0.0)])
def test_lr_and_weight_decay_as_apply_group_options(lr, weight_decay):
    constants = prepare_step(random_rule().weights(), None, torch.float32)
    state, grad, theta = _inputs(300, 20)
    proposed, _ = update_rows(constants, state, grad, theta)
    expected = apply_group_options(theta, proposed, lr, weight_decay)
    native.step_rows_native(constants, state, grad, theta, lr, weight_decay)
    torch.testing.assert_close(theta, expected, rtol=1e-5, atol=1e-6)


def test_a_step_of_several_parameters_runs_one_call_a_bucket_in_place(monkeypatch):
    calls = []

    def counted(constants, buffer, grads, params, *args, **kwargs):
        calls.append((buffer.data_ptr(), [p.data_ptr() for p in params],
                      [g.shape[0] for g in grads]))
        return native.step_bucket_native(constants, buffer, grads, params, *args, **kwargs)

    monkeypatch.setattr(optimizer_module, "step_bucket_native", counted)
    model = nn.Linear(30, 5)
    opt = LSTMMetaOptimizer(model.parameters(), random_rule())
    F.mse_loss(model(torch.randn(8, 30)), torch.randn(8, 5)).backward()
    opt.step(loss=torch.tensor(1.0))
    states = [opt.state[p]["lstm_state"] for p in model.parameters()]
    assert calls == [(states[0].data_ptr(), [p.data_ptr() for p in model.parameters()],
                      [p.numel() for p in model.parameters()])]


@pytest.mark.parametrize("normalised", [False, True])
def test_a_bucket_in_one_call_is_its_parameters_one_call_each(normalised):
    # Sizes that end inside a vector tile, one of them empty and one without a gradient: the
    # threads share tiles across parameters, and each tile is one parameter's, so the result
    # is the per-parameter calls' to the bit.
    hidden, sizes = 20, [1, 37, 0, 5003, 16, 250]
    constants = prepare_step(random_rule().weights(), torch.tensor(0.37), torch.float32)
    buffer, _, _ = _inputs(sum(sizes), hidden)
    params = [torch.randn(n) for n in sizes]
    grads = [_inputs(n, hidden, seed=n)[1] for n in sizes]
    grads[3] = None
    moments = [torch.rand(2, n) for n in sizes]
    start = [p.clone() for p in params]
    expected_buffer = buffer.clone().t().contiguous().t()
    expected_params, expected_moments = [p.clone() for p in params], [m.clone() for m in moments]
    offset = 0
    for n, grad, param, moment, step in zip(sizes, grads, expected_params, expected_moments,
                                            range(1, 7)):
        if grad is not None and n:
            native.step_rows_native(constants, expected_buffer[offset : offset + n], grad,
                                    param, 0.6, 1e-3, normalisation=normalisation(
                                        moment, step, 0.9, 0.99, 0.1) if normalised else None)
        offset += n
    native.step_bucket_native(constants, buffer, grads, params, 0.6, 1e-3, normalisations=[
        normalisation(m, step, 0.9, 0.99, 0.1) for m, step in zip(moments, range(1, 7))]
        if normalised else None)
    assert torch.equal(buffer, expected_buffer)
    assert all(torch.equal(a, b) for a, b in zip(params, expected_params))
    assert all(torch.equal(a, b) for a, b in zip(moments, expected_moments))
    assert not torch.equal(params[1], start[1]) and torch.equal(params[3], start[3])


def test_a_bucket_call_refuses_what_it_would_misread():
    constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    buffer = torch.zeros(42, 12).t()
    params, grads = [torch.zeros(5), torch.zeros(7)], [torch.ones(5), torch.ones(7)]
    with pytest.raises(ValueError, match=r"feature-major float32 CPU \[11, 42\] view for "
                                         r"parameters of \[5, 6\] rows"):
        native.step_bucket_native(constants, buffer, [grads[0], torch.ones(6)],
                                  [params[0], torch.zeros(6)])
    with pytest.raises(ValueError, match="grad 1 is torch.float64"):
        native.step_bucket_native(constants, buffer, [grads[0], grads[1].double()], params)
    with pytest.raises(ValueError, match="param 0 is .* not contiguous"):
        native.step_bucket_native(constants, buffer, grads, [torch.zeros(10)[::2], params[1]])
    with pytest.raises(ValueError, match="for every parameter stepped or for none"):
        native.step_bucket_native(constants, buffer, grads, params, normalisations=[
            normalisation(torch.zeros(2, 5), 1, 0.9, 0.99, 0.1), None])
    with pytest.raises(ValueError, match="got 1 gradients for 2 parameters"):
        native.step_bucket_native(constants, buffer, grads[:1], params)
    assert all(not p.any() for p in params) and not buffer.any()  # nothing written


def _drop_in_run(native_on: bool, monkeypatch):
    """Five steps on a small conv net: one group with lr and weight decay, a non-contiguous
    parameter (channels-last conv weight) and a parameter without a gradient."""
    if not native_on:
        monkeypatch.setattr(policy, "step_native", lambda device, dtype: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 26 * 26, 4))
    model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)
    unused = nn.Parameter(torch.randn(5))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 4, (16,))
    opt = LSTMMetaOptimizer([{"params": model[0].parameters(), "lr": 0.6, "weight_decay": 1e-3},
                             {"params": [*model[3].parameters(), unused]}],
                            random_rule(seed=3))
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    monkeypatch.undo()
    return [p.detach().clone() for p in [*model.parameters(), unused]], opt


def test_the_optimizer_with_the_kernel_matches_its_chunk_paths(monkeypatch):
    fused, fused_opt = _drop_in_run(True, monkeypatch)
    chunked, chunked_opt = _drop_in_run(False, monkeypatch)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 26 * 26, 4))
    for ours, theirs, initial in zip(fused, chunked, start.parameters()):
        assert not torch.equal(ours, initial)  # the steps moved it
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert torch.equal(fused[-1], chunked[-1])  # no gradient: untouched
    for ours, theirs in zip(fused_opt.state.values(), chunked_opt.state.values()):
        # Five steps of a rule with large random weights amplify rounding: compare against
        # the state's scale (about 2), not element by element (3.5e-5 of it measured).
        ours, theirs = ours["lstm_state"], theirs["lstm_state"]
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("rows", [1, 17, 1000, 5003])
@pytest.mark.parametrize("momentum, rms_decay", [(0.9, 0.99), (0.2, 0.999), (0.0, 0.4)])
def test_the_kernel_normalises_the_gradient_as_scale_gradient(rows, momentum, rms_decay):
    # (momentum, rms_decay) of 0.2 and 0.4 take torch.lerp's other form (weight >= 1/2).
    constants = prepare_step(random_rule().weights(), None, torch.float32)
    state, _, theta = _inputs(rows, 20)
    expected_state, expected_theta = state.clone().t().contiguous().t(), theta.clone()
    moments, expected_moments = torch.zeros(2, rows), None
    for step in range(1, 4):
        _, grad, _ = _inputs(rows, 20, seed=step + 1)
        scaled, expected_moments = scale_gradient(grad, expected_moments, step, momentum,
                                                  rms_decay, 0.1)
        native.step_rows_native(constants, expected_state, scaled, expected_theta)
        native.step_rows_native(constants, state, grad, theta,
                                normalisation=normalisation(moments, step, momentum, rms_decay,
                                                            0.1))
    # The moments to the bit (the same FMA as ATen's lerp); the gradient to torch.sqrt's
    # rounding (MKL's, not the exactly rounded one of the kernel), which 3 steps of the rule
    # leave at 1.2e-7 absolute here.
    assert torch.equal(moments, expected_moments)
    torch.testing.assert_close(theta, expected_theta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-6)


def test_the_kernel_refuses_moments_it_would_misread():
    constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    state, grad, theta = _inputs(10, 20)
    for moments, message in ((torch.zeros(2, 9), r"contiguous float32 \[2, 10\] tensor on cpu, "
                              r"got torch.float32 \(2, 9\)"),
                             (torch.zeros(2, 10, dtype=torch.float64), "got torch.float64"),
                             (torch.zeros(10, 2).t(), "not contiguous")):
        with pytest.raises(ValueError, match=message):
            native.step_rows_native(constants, state, grad, theta,
                                    normalisation=normalisation(moments, 1, 0.9, 0.99, 0.1))
    assert torch.equal(theta, _inputs(10, 20)[2])  # refused before anything was written


def _general_run(native_on: bool, monkeypatch):
    """Four plain steps of the default optimizer (the ``general`` rule's architecture: it
    normalises the gradient) on a small conv net, one group with lr and weight decay."""
    if not native_on:
        monkeypatch.setattr(policy, "step_native", lambda device, dtype: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 26 * 26, 4))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 4, (16,))
    torch.manual_seed(1)
    opt = LSTMMetaOptimizer([{"params": model[0].parameters(), "lr": 0.6, "weight_decay": 1e-3},
                             {"params": model[3].parameters()}], general_rule())
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    monkeypatch.undo()
    return model, opt


def test_the_kernel_normalises_inside_the_optimizer_as_its_chunk_paths(monkeypatch):
    fused_model, fused_opt = _general_run(True, monkeypatch)
    moments = [fused_opt.state[p]["grad_moments"] for p in fused_model.parameters()]
    chunked_model, chunked_opt = _general_run(False, monkeypatch)
    for ours, theirs in zip(fused_model.parameters(), chunked_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for param, chunked_param, kept in zip(fused_model.parameters(), chunked_model.parameters(),
                                          moments):
        ours, theirs = fused_opt.state[param], chunked_opt.state[chunked_param]
        assert ours["rule_step"] == theirs["rule_step"] == 4
        assert ours["grad_moments"] is kept  # updated in place: one tensor a parameter
        assert ours["grad_moments"].shape == (2, *param.shape)
        torch.testing.assert_close(ours["grad_moments"], theirs["grad_moments"], rtol=1e-5,
                                   atol=1e-9)
    # A state dict's moments, however laid out when loaded, continue the same run.
    state = fused_opt.state_dict()
    for entry in state["state"].values():
        entry["grad_moments"] = entry["grad_moments"].transpose(0, -1).contiguous().transpose(
            0, -1)
    assert not state["state"][0]["grad_moments"].is_contiguous()
    resumed = LSTMMetaOptimizer([{"params": chunked_model[0].parameters()},
                                 {"params": chunked_model[3].parameters()}],
                                fused_opt.meta_learner)
    resumed.load_state_dict(state)
    with torch.no_grad():
        for ours, theirs in zip(chunked_model.parameters(), fused_model.parameters()):
            ours.copy_(theirs)
            ours.grad, theirs.grad = torch.ones_like(ours), torch.ones_like(theirs)
    fused_opt.step()
    resumed.step()
    for ours, theirs in zip(chunked_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_kernel_refuses_what_it_would_misread():
    constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    state, grad, theta = _inputs(10, 20)
    with pytest.raises(ValueError, match="float32 CPU tensors, got grad torch.float64"):
        native.step_rows_native(constants, state, grad.double(), theta)
    with pytest.raises(ValueError, match="contiguous"):
        native.step_rows_native(constants, state, torch.randn(20)[::2], theta)
    with pytest.raises(ValueError, match=r"state must be a feature-major \[10, 42\]"):
        native.step_rows_native(constants, state[:, :40], grad, theta)
    with pytest.raises(ValueError, match="feature-major"):
        native.step_rows_native(constants, state.contiguous(), grad, theta)
    wide = prepare_step(MetaLearnerLSTM(hidden_size=65).weights(), None, torch.float32)
    with pytest.raises(ValueError, match="hidden sizes up to 64, got 65"):
        native.step_rows_native(wide, torch.zeros(132, 10).t(), grad, theta)


def test_a_failed_build_warns_once_and_step_takes_the_chunk_paths(no_cpp_compiler,
                                                                  monkeypatch):
    no_cpp_compiler(native.STEP_KERNEL)
    monkeypatch.setattr(policy, "COMPILE_RULE", True)
    failure_before = compiled._failure
    model = nn.Linear(4, 3)
    opt = LSTMMetaOptimizer(model.parameters(), MetaLearnerLSTM())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            F.mse_loss(model(torch.randn(5, 4)), torch.randn(5, 3)).backward()
            opt.step(loss=torch.tensor(1.0))
    messages = [str(w.message) for w in caught if "native step kernel" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler found" in messages[0]
    assert native.native_step_kernel() is None
    # The torch.compile paths keep their own state: this failure does not switch them off.
    assert compiled._failure is failure_before
    assert all(math.isfinite(v) for p in model.parameters() for v in p.flatten().tolist())


def test_the_build_probe_runs_in_float32_whatever_the_default_dtype(default_dtype):
    # The probe's tensors are made at the default dtype; a float64 default must not make a
    # working kernel look broken (the kernels read float).
    from learned_optim.rule.native_build import NativeKernel

    fresh = NativeKernel("a fresh step kernel", native.STEP_KERNEL.argtypes,
                         native.STEP_KERNEL.source, native.STEP_KERNEL.probe, "nothing")
    default_dtype(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh() is not None
    assert torch.get_default_dtype() == torch.float64  # restored after the probe
