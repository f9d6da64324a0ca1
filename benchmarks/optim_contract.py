"""torch.optim's generic optimizer checks, run against LSTMMetaOptimizer (CPU).

PyTorch checks every built-in optimizer with the generic tests of ``test/test_optim.py``
(``TestOptimRenewed``, driven by an ``OptimizerInfo``). That file is not part of the torch
wheel, so this script is a harness of the same checks, named after them, run over the same
kind of optimizer inputs (default options, ``lr``, ``weight_decay``, a tensor ``lr``, a trained
shipped rule, param groups). Checks that do not apply are skipped with the reason: a learned
rule reads the loss, is not a guaranteed descent method, and has one implementation.

Usage::

    python benchmarks/optim_contract.py          # prints every check and the counts

``tests/test_optim_contract_harness.py`` runs it in the test suite.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.checkpoint import load_update_rule


class Skip(Exception):  # noqa: N818 (a result, not an error)
    """A check that does not apply, with the reason."""


@dataclass
class OptimInput:
    """One configuration of the optimizer under test (torch's ``OptimizerInput``)."""

    desc: str
    kwargs: dict
    rule: Callable[[], MetaLearnerLSTM]


def _fixed_rule(seed: int = 0, **kwargs) -> Callable[[], MetaLearnerLSTM]:
    torch.manual_seed(seed)
    template = MetaLearnerLSTM(**kwargs)
    return lambda: copy.deepcopy(template)


def optim_inputs() -> list[OptimInput]:
    """The configurations every check runs over."""
    shipped = load_update_rule("omniglot-5w1s")
    return [
        OptimInput("default", {}, _fixed_rule()),
        OptimInput("lr=0.5", {"lr": 0.5}, _fixed_rule()),
        OptimInput("weight_decay=0.1", {"weight_decay": 0.1}, _fixed_rule()),
        OptimInput("lr=0.5, weight_decay=0.01", {"lr": 0.5, "weight_decay": 0.01},
                   _fixed_rule()),
        OptimInput("RMS-scaled rule (gradient_scale=0.1)", {}, _fixed_rule(gradient_scale=0.1)),
        OptimInput("shipped rule omniglot-5w1s", {}, lambda: copy.deepcopy(shipped)),
    ]


def _make(optim_input: OptimInput, params, **extra) -> LSTMMetaOptimizer:
    return LSTMMetaOptimizer(params, optim_input.rule(), **{**optim_input.kwargs, **extra})


def _weight_bias(contiguous: bool = True, dtype=torch.float32):
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    return (Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0]),
            Parameter(torch.randn(10, 2, dtype=dtype)[..., 0]))


def _closure(opt, weight, bias, inputs):
    def closure():
        opt.zero_grad()
        loss = (weight.mv(inputs) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


def _train(opt, weight, bias, inputs, steps=20, schedulers=()):
    closure = _closure(opt, weight, bias, inputs)
    first = closure().item()
    for _ in range(steps):
        loss = opt.step(closure)
        for scheduler in schedulers:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss.item())
            else:
                scheduler.step()
    return first, closure().item()


def _assert_equal(a, b, where="state_dict"):
    """Exact equality of nested dicts, lists, tensors and plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} != {set(b)}"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{index}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- the checks ------------------------------------------------------------------------------

def check_forloop_goes_right_direction(optim_input, contiguous, with_lrsched):
    torch.manual_seed(1)
    weight, bias = _weight_bias(contiguous)
    opt = _make(optim_input, [weight, bias])
    schedulers = [StepLR(opt, gamma=0.9, step_size=10), ReduceLROnPlateau(opt)] if (
        with_lrsched) else []
    first, last = _train(opt, weight, bias, torch.randn(5), schedulers=schedulers)
    assert last < first, f"loss {first} -> {last}"


def check_param_group_with_lrscheduler_goes_right_direction(optim_input):
    torch.manual_seed(1)
    weight, bias = _weight_bias()
    opt = _make(optim_input, [{"params": [weight]}, {"params": [bias], "lr": 0.01}])
    first, last = _train(opt, weight, bias, torch.randn(5),
                         schedulers=[StepLR(opt, gamma=0.9, step_size=10), ReduceLROnPlateau(opt)])
    assert last < first, f"loss {first} -> {last}"


def check_tensor_lr(optim_input):
    torch.manual_seed(1)
    weight, bias = _weight_bias()
    weight_c, bias_c = (Parameter(p.detach().clone()) for p in (weight, bias))
    inputs = torch.randn(5)
    lr = optim_input.kwargs.get("lr", 1.0)
    opt = _make(optim_input, [weight, bias])
    opt_c = _make(optim_input, [weight_c, bias_c], lr=torch.tensor(lr))
    _train(opt, weight, bias, inputs, steps=5)
    _train(opt_c, weight_c, bias_c, inputs, steps=5)
    torch.testing.assert_close(weight, weight_c)
    torch.testing.assert_close(bias, bias_c)


def check_step_is_noop_when_params_have_no_grad(optim_input):
    weight, bias = _weight_bias()
    before = [p.detach().clone() for p in (weight, bias)]
    opt = _make(optim_input, [weight, bias])
    opt.step(loss=1.0)  # the rule reads the loss: passed, as a training loop does
    assert all(torch.equal(p, b) for p, b in zip((weight, bias), before))


def check_optimizer_can_be_printed(optim_input):
    text = repr(_make(optim_input, list(_weight_bias())))
    assert "LSTMMetaOptimizer" in text and "lr" in text


def check_state_dict_deterministic(optim_input):
    torch.manual_seed(1)
    weight, bias = _weight_bias()
    inputs = torch.randn(5)
    opt = _make(optim_input, [weight, bias])
    _train(opt, weight, bias, inputs)
    weight_c, bias_c = (Parameter(p.detach().clone()) for p in (weight, bias))
    opt_c = _make(optim_input, [weight_c, bias_c])
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict_c = copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(state_dict_c)
    for _ in range(20):
        opt.step(_closure(opt, weight, bias, inputs))
        opt_c.step(_closure(opt_c, weight_c, bias_c, inputs))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    _assert_equal(state_dict, state_dict_c)  # loading did not modify it
    _assert_equal(opt.state_dict(), opt_c.state_dict())


def check_can_load_older_state_dict(optim_input):
    """A state dict of a version without the rule entry or the group options loads."""
    torch.manual_seed(1)
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    _train(opt, weight, bias, torch.randn(5), steps=3)
    old = copy.deepcopy(opt.state_dict())
    del old["rule"]
    for group in old["param_groups"]:
        del group["lr"], group["weight_decay"]
    other = _make(optim_input, [Parameter(p.detach().clone()) for p in (weight, bias)])
    other.load_state_dict(old)
    assert other.param_groups[0]["lr"] == opt.defaults["lr"]
    closure_params = other.param_groups[0]["params"]
    other.step(_closure(other, *closure_params, torch.randn(5)))


def check_save_load_equality_with_weights_only(optim_input):
    torch.manual_seed(1)
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    _train(opt, weight, bias, torch.randn(5), steps=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_equal(loaded, opt.state_dict())


def check_deepcopy_copies_all_public_attrs(optim_input):
    opt = _make(optim_input, list(_weight_bias()))
    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}
    assert public(opt) == public(copy.deepcopy(opt)) == public(pickle.loads(pickle.dumps(opt)))


def check_step_hooks_fire_in_order(optim_input):
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    calls = []
    global_pre = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre"))
    global_post = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))
    try:
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.step(_closure(opt, weight, bias, torch.randn(5)))
    finally:
        global_pre.remove()
        global_post.remove()
    assert calls == ["global pre", "pre", "post", "global post"], calls


def check_state_dict_hooks(optim_input):
    opt = _make(optim_input, list(_weight_bias()))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "post": "rule" in sd})
    assert opt.state_dict()["post"] is True and calls == ["pre"]


def check_load_state_dict_pre_hook_and_prepend(optim_input):
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    _train(opt, weight, bias, torch.randn(5), steps=2)
    saved = opt.state_dict()
    other = _make(optim_input, [Parameter(p.detach().clone()) for p in (weight, bias)])
    calls = []
    other.register_load_state_dict_pre_hook(lambda o, sd: calls.append("second"))
    other.register_load_state_dict_pre_hook(lambda o, sd: calls.append("first"), prepend=True)
    other.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    other.load_state_dict(saved)
    assert calls == ["first", "second", "post"], calls


def check_non_empty_state(optim_input):
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    opt.step(_closure(opt, weight, bias, torch.randn(5)))
    assert all(opt.state[p]["lstm_state"].abs().sum() > 0 for p in (weight, bias))


def check_grads_are_never_inplaced_into(optim_input):
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    closure = _closure(opt, weight, bias, torch.randn(5))
    loss = closure()
    grads = [p.grad.clone() for p in (weight, bias)]
    opt.step(loss=loss)
    assert all(torch.equal(p.grad, g) for p, g in zip((weight, bias), grads))


def check_mixed_dtypes(optim_input):
    params = [Parameter(torch.randn(3, 2, dtype=dtype)) for dtype in
              (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    opt = _make(optim_input, params)
    loss = sum(p.float().pow(2).sum() for p in params)
    loss.backward()
    opt.step(loss=loss)
    assert [opt.state[p]["lstm_state"].dtype for p in params] == [p.dtype for p in params]


def check_empty_and_scalar_params(optim_input):
    params = [Parameter(torch.randn(0, 3)), Parameter(torch.tensor(2.0)), Parameter(torch.ones(3))]
    opt = _make(optim_input, params)
    loss = sum(p.pow(2).sum() for p in params)
    loss.backward()
    opt.step(loss=loss)
    assert params[1].abs() < 2.0


def check_errors(optim_input):
    weight, bias = _weight_bias()
    for kwargs, error in (({"lr": -1.0}, ValueError), ({"weight_decay": float("nan")}, ValueError),
                          ({"chunk_size": 0}, ValueError)):
        try:
            _make(optim_input, [weight, bias], **kwargs)
        except error:
            continue
        raise AssertionError(f"{kwargs} did not raise {error.__name__}")


def check_param_groups_are_equivalent_to_separate_optimizers(optim_input):
    torch.manual_seed(1)
    weight, bias = _weight_bias()
    copies = [Parameter(p.detach().clone()) for p in (weight, bias)]
    grouped = _make(optim_input, [{"params": [weight]}, {"params": [bias]}])
    separate = [_make(optim_input, [p]) for p in copies]
    inputs = torch.randn(5)
    for _ in range(5):
        loss = _closure(grouped, weight, bias, inputs)()
        grouped.step(loss=loss)
        for opt in separate:
            opt.zero_grad()
        loss_c = (copies[0].mv(inputs) + copies[1]).pow(2).sum()
        loss_c.backward()
        for opt in separate:
            opt.step(loss=loss_c)
    assert torch.equal(weight, copies[0]) and torch.equal(bias, copies[1])


def check_non_param_state_entry_round_trips(optim_input):
    opt = _make(optim_input, list(_weight_bias()))
    opt.state["extra"] = 1
    other = _make(optim_input, list(_weight_bias()))
    other.load_state_dict(opt.state_dict())
    assert other.state["extra"] == 1


def check_step_returns_the_closure_value(optim_input):
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    closure = _closure(opt, weight, bias, torch.randn(5))
    assert isinstance(opt.step(closure), torch.Tensor)


def check_zero_grad_set_to_none(optim_input):
    weight, bias = _weight_bias()
    opt = _make(optim_input, [weight, bias])
    _closure(opt, weight, bias, torch.randn(5))()
    opt.zero_grad()
    assert weight.grad is None and bias.grad is None


# Checks of TestOptimRenewed that do not apply, and why.
SKIPPED = {
    "test_step_is_noop_for_zero_grads": "a zero gradient still moves the parameter through the "
        "forget gate (theta <- f * theta, documented); the rule is not a descent method whose "
        "step vanishes with the gradient",
    "test_foreach_matches_forloop": "one implementation (chunked, no foreach/fused flags)",
    "test_fused_matches_forloop": "one implementation (chunked, no foreach/fused flags)",
    "test_fused_large_tensor / test_fused_cpu_matches_cuda / test_cuda_graph_*": "no fused or "
        "capturable implementation",
    "test_peak_memory_foreach": "no foreach implementation",
    "test_set_default_dtype_works_with_foreach / test_defaults_changed_to_foreach": "no "
        "foreach implementation",
    "test_complex / test_complex_2d": "complex parameters are refused (TypeError)",
    "test_rosenbrock_sparse": "sparse gradients are refused (RuntimeError)",
    "test_differentiable": "the differentiable form is the higher twin "
        "(tests/test_higher_twin.py), not torch's differentiable=True flag",
    "test_load_nontensor_step": "no step counter in the state",
    "test_state_dict_with_cuda_params / test_forloop_goes_right_direction_multigpu": "CPU run "
        "(tests/test_optimizer.py::test_cuda_step_matches_cpu_step covers CUDA)",
    "test_errors (maximize, capturable, foreach flags)": "those options do not exist",
}


def cases():
    """(name, function, arguments) of every check over every optimizer input."""
    for optim_input in optim_inputs():
        for contiguous in (True, False):
            for with_lrsched in (True, False):
                yield (f"test_forloop_goes_right_direction[{optim_input.desc}, contiguous="
                       f"{contiguous}, with_lrsched={with_lrsched}]",
                       check_forloop_goes_right_direction, (optim_input, contiguous,
                                                            with_lrsched))
        for name, check in CHECKS.items():
            yield f"{name}[{optim_input.desc}]", check, (optim_input,)


CHECKS = {
    "test_param_group_with_lrscheduler_goes_right_direction":
        check_param_group_with_lrscheduler_goes_right_direction,
    "test_tensor_lr": check_tensor_lr,
    "test_step_is_noop_when_params_have_no_grad": check_step_is_noop_when_params_have_no_grad,
    "test_optimizer_can_be_printed": check_optimizer_can_be_printed,
    "test_state_dict_deterministic": check_state_dict_deterministic,
    "test_can_load_older_state_dict": check_can_load_older_state_dict,
    "test_save_load_equality_with_weights_only": check_save_load_equality_with_weights_only,
    "test_deepcopy_copies_all_public_attrs": check_deepcopy_copies_all_public_attrs,
    "test_step_all_hooks": check_step_hooks_fire_in_order,
    "test_state_dict_pre_hook / post_hook": check_state_dict_hooks,
    "test_load_state_dict_pre_hook_and_prepend / post_hook": (
        check_load_state_dict_pre_hook_and_prepend),
    "test_non_empty_state": check_non_empty_state,
    "test_grads_are_never_inplaced_into": check_grads_are_never_inplaced_into,
    "test_mixed_device_dtype (CPU dtypes)": check_mixed_dtypes,
    "test_empty_and_scalar_params": check_empty_and_scalar_params,
    "test_errors": check_errors,
    "test_param_groups_are_equivalent_to_separate_optimizers":
        check_param_groups_are_equivalent_to_separate_optimizers,
    "test_non_param_state_entry_round_trips": check_non_param_state_entry_round_trips,
    "test_step_returns_the_closure_value": check_step_returns_the_closure_value,
    "test_zero_grad_set_to_none": check_zero_grad_set_to_none,
}


# A trained rule is not a descent method outside what it was meta-trained on: the shipped
# few-shot rule, on this quadratic with gradients of size ~10, may raise the loss. Its outcome
# is reported, not counted as a failure.
NOT_A_DESCENT_METHOD = ("test_forloop_goes_right_direction[shipped rule",)


def run_checks() -> dict[str, str]:
    """Run every case; name -> "passed", "expected failure: ..." or "failed: <error>"."""
    results = {}
    for name, check, args in cases():
        try:
            check(*args)
            results[name] = "passed"
        except Exception as error:  # noqa: BLE001 (reported, not hidden)
            outcome = "expected failure" if name.startswith(NOT_A_DESCENT_METHOD) else "failed"
            results[name] = f"{outcome}: {type(error).__name__}: {error}"
    return results


def main() -> int:
    torch.set_num_threads(1)
    results = run_checks()
    for name, outcome in results.items():
        print(f"{outcome.split(':')[0]:7s} {name}" + (f"  ({outcome})" if outcome != "passed"
                                                       else ""))
    for name, reason in SKIPPED.items():
        print(f"skipped {name}: {reason}")
    failed = sum(o.startswith("failed") for o in results.values())
    expected = sum(o.startswith("expected failure") for o in results.values())
    print(f"\n{len(results) - failed - expected} passed, {failed} failed, {expected} expected "
          f"failures (not a descent method), {len(SKIPPED)} skipped (torch {torch.__version__}, "
          "CPU)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
