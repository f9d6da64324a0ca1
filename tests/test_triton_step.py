"""The GPU's fused kernels (learned_optim.rule.triton_step, learned_optim.rule.triton_tape),
checked without a GPU: the same kernels in Triton's interpreter, in a subprocess with
``TRITON_INTERPRET=1`` (tests/triton_interpreted.py), against ``update_rows``, float64
autograd, the optimizer's chunk path and the twin's CPU tape paths; compiled ahead of time
for an H100 (their registers); their refusals and their fallback where a probe fails."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule import policy
from learned_optim.rule.math import initial_state, prepare_step
from learned_optim.rule.triton_step import (
    FP_FUSION,
    step_bucket_triton,
    step_rows_triton,
    triton_step_usable,
)
from learned_optim.rule.triton_tape import triton_tape_applies
from learned_optim.truncated import general_rule

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install triton)")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    script = Path(__file__).with_name("triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_triton
def test_the_triton_step_is_update_rows_to_float32_rounding(interpreted):
    cases = {name: case for name, case in interpreted.items() if name.startswith("H=")}
    assert len(cases) == 6
    for name, case in cases.items():
        assert case["theta"] < 1e-6, name  # relative beyond 1
        assert case["state"] < 2e-6, name
        assert case["nan_where_expected"], name
        assert case["outside_rows_unchanged"], name


@needs_triton
def test_the_optimizer_steps_through_the_triton_kernel_as_through_its_chunks(interpreted):
    for name in ("optimizer", "optimizer_general"):
        case = interpreted[name]
        # 4 parameters (156 coordinates) a step in 2 groups, 3 steps: a launch a group
        assert case["kernel_calls"] == 6 and case["rows_stepped"] == 3 * 156, name
        assert case["largest_difference"] < 1e-6, name
    # the general rule's gradient moments, updated in the kernel
    assert interpreted["optimizer_general"]["moments_relative_difference"] < 1e-6
    assert interpreted["optimizer"]["moments_relative_difference"] is None


@needs_triton
def test_a_bucket_in_one_triton_launch_is_the_cpu_kernels_bucket(interpreted):
    cases = {name: case for name, case in interpreted.items() if name.startswith("bucket")}
    assert len(cases) == 3
    for name, case in cases.items():
        assert case["theta"] < 1e-6 and case["state"] < 1e-5, name  # float32 rounding
        assert case["moments"] == 0.0, name  # the same FMAs
        assert case["untouched_without_gradient"] and case["moved"], name


@needs_triton
def test_the_triton_backward_is_float64_autograd_to_float32_rounding(interpreted):
    cases = {name: case for name, case in interpreted.items() if name.startswith("backward")}
    assert len(cases) == 4  # one with 3 programs looping over 10 blocks of rows
    for name, case in cases.items():
        assert len(case) == 9, name  # the six step constants, state, grad, param
        for gradient, difference in case.items():
            assert difference < 1e-6, (name, gradient)


@needs_triton
@pytest.mark.parametrize("first_order", [True, False])
def test_the_twins_meta_gradient_through_the_triton_kernels_is_its_cpu_paths(interpreted,
                                                                             first_order):
    case = interpreted[f"twin first_order={first_order}"]
    # first order: the trajectory, 4 steps forward and one replay; second: 4 nodes
    expected = ({"node": 0, "trajectory_step": 4, "replay": 1} if first_order
                else {"node": 4, "trajectory_step": 0, "replay": 0})
    assert {name: case[name] for name in expected} == expected
    assert case["reference_triton_calls"] == 0  # a CPU's policy takes none, interpreter or not
    assert case["all_nonzero"]
    assert case["relative_difference"] < 1e-5


@needs_triton
def test_a_trajectory_replayed_by_the_triton_kernels_in_chunks_is_the_eager_one(interpreted):
    case = interpreted["trajectory"]
    assert case["gradients"] == 7 and case["all_nonzero"]  # anchor state and theta, 5 weights
    assert case["relative_difference"] < 1e-5


def test_the_triton_step_refuses_what_it_would_misread():
    constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    state = initial_state(8, 20, feature_major=True)
    grad, theta = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="float32 cuda tensors, got state torch.float32 on cpu"):
        step_rows_triton(constants, state, grad, theta)
    with pytest.raises(ValueError, match=r"Triton step kernel takes contiguous 1-D float32 cuda "
                                         r"tensors: param 0 is torch.float32 of shape \(8,\) "
                                         r"on cpu"):
        step_bucket_triton(constants, state, [grad], [theta])
    if not torch.cuda.is_available():
        return
    state, grad, theta = state.cuda(), grad.cuda(), theta.cuda()
    with pytest.raises(ValueError, match="got grad torch.float64 on cuda"):
        step_rows_triton(constants, state, grad.double(), theta)
    with pytest.raises(ValueError, match="feature-major"):
        step_rows_triton(constants, initial_state(8, 20, device="cuda"), grad, theta)
    with pytest.raises(ValueError, match="contiguous"):
        step_rows_triton(constants, state[::2], grad[::2], theta[::2])
    with pytest.raises(ValueError, match="power of two"):
        step_rows_triton(constants, state, grad, theta, block=24)


def test_the_triton_kernels_are_taken_only_on_a_cuda_device_in_float32():
    assert not policy.step_triton(torch.device("cpu"), torch.float32)
    assert not policy.step_triton(torch.device("cuda"), torch.float64)
    assert not triton_step_usable(torch.device("meta"))
    assert not triton_tape_applies(torch.ones(3), 20)  # a CPU tensor, not interpreting
    assert not triton_tape_applies(torch.ones(3, device="meta"), 20)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
@pytest.mark.parametrize("make_rule", [MetaLearnerLSTM, general_rule])
def test_cuda_step_takes_the_triton_kernel_and_matches_the_cpu_step(make_rule):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    gpu_model = copy.deepcopy(model).cuda()
    meta = make_rule()
    x, y = torch.randn(64, 40), torch.randn(64, 5)
    for net, data in ((model, (x, y)), (gpu_model, (x.cuda(), y.cuda()))):
        opt = LSTMMetaOptimizer(net.parameters(), meta)
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(data[0]), data[1])
            loss.backward()
            opt.step(loss=loss)
    buffer = next(iter(opt._bucket_cache.values())).buffer
    assert buffer.is_cuda and opt._fused_step(buffer) is step_bucket_triton
    for a, b in zip(model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
def test_cuda_bucket_of_many_tensors_matches_the_cpu_bucket():
    # One launch for 40 tensors of assorted sizes (one empty, one without a gradient), with
    # the gradient's normalisation, against the CPU's kernel on the same inputs.
    from learned_optim.rule import native
    from learned_optim.rule.math import normalisation

    torch.manual_seed(0)
    sizes = [int(n) for n in torch.randint(1, 3000, (40,))]
    sizes[5] = 0
    constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    cuda_constants = constants._replace(**{name: getattr(constants, name).cuda()
                                           for name in constants._fields if name != "p"})
    buffer = initial_state(sum(sizes), 20, feature_major=True)
    buffer.normal_()
    params = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) * 1e-3 for n in sizes]
    grads[7] = None
    moments = [torch.rand(2, n) for n in sizes]
    cuda_buffer = buffer.t().contiguous().cuda().t()
    cuda_params = [p.cuda() for p in params]
    cuda_moments = [m.cuda() for m in moments]
    for step in (1, 2):
        native.step_bucket_native(constants, buffer, grads, params, 0.5, 1e-3, normalisations=[
            normalisation(m, step, 0.9, 0.99, 0.1) for m in moments])
        step_bucket_triton(cuda_constants, cuda_buffer,
                           [None if g is None else g.cuda() for g in grads], cuda_params, 0.5,
                           1e-3, normalisations=[normalisation(m, step, 0.9, 0.99, 0.1)
                                                 for m in cuda_moments])
    for ours, theirs in zip(cuda_params, params):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(cuda_moments, moments):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(cuda_buffer.cpu(), buffer, rtol=1e-4, atol=1e-5)


def _compiled_for_h100(kernel, floats: tuple[str, ...], constants: dict, warps: int) -> str:
    """``kernel`` compiled ahead of time for sm_90 (no GPU needed: Triton's bundled ptxas),
    and its resource usage as ``cuobjdump -res-usage`` prints it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "table_ptr" else "*fp32"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constants),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "enable_fp_fusion": FP_FUSION})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout


@needs_triton
def test_the_kernels_compile_for_an_h100_without_spilling_registers():
    from learned_optim.rule import triton_step, triton_tape

    step_floats = ("p", "threshold", "exp_p", "lr", "decay", "mean_weight", "square_weight",
                   "mean_scale", "square_debias")
    steps = {normalise: _compiled_for_h100(
        triton_step._rule_step, step_floats, {"H": 20, "HP": 32, "BLOCK": triton_step.BLOCK_ROWS,
                                              "NORMALISE": normalise}, triton_step.NUM_WARPS)
        for normalise in (False, True)}
    bucket = _compiled_for_h100(
        triton_step._rule_step_bucket, step_floats, {"H": 20, "HP": 32, "NORMALISE": True,
                                                     "BLOCK": triton_step.BLOCK_ROWS},
        triton_step.NUM_WARPS)
    backward = _compiled_for_h100(
        triton_tape._rule_step_backward, ("p", "threshold", "exp_p"),
        {"H": 20, "HP": 32, "KP": 32, "BLOCK": triton_tape.BACKWARD_BLOCK_ROWS,
         "PARTIAL": 1886}, triton_tape.BACKWARD_WARPS)
    for name, usage in (("step", steps[False]), ("normalising step", steps[True]),
                        ("bucket step", bucket), ("backward", backward)):
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        spilled = int(re.search(r"STACK:(\d+)", usage).group(1))
        assert spilled == 0 and registers < 255, (name, usage)


def test_a_kernel_that_fails_its_probe_is_reported_once_and_not_taken():
    from learned_optim.rule.triton_step import probed

    calls = []

    def failing(device):
        calls.append(device)
        raise RuntimeError("ptxas fatal: unsupported target\nmore detail")

    results: dict = {}
    with pytest.warns(RuntimeWarning, match=r"the Triton step kernel failed on cuda:0 "
                      r"\(RuntimeError: ptxas fatal: unsupported target\); step\(\) takes the "
                      r"chunk path"):
        assert not probed(results, torch.device("cuda:0"), failing, "the Triton step kernel",
                          "step() takes the chunk path")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second ask neither probes nor warns again
        assert not probed(results, torch.device("cuda:0"), failing, "the Triton step kernel",
                          "step() takes the chunk path")
    assert calls == [torch.device("cuda:0")]
    assert probed(results, torch.device("cuda:1"), lambda device: None, "k", "f")
