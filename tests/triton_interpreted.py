"""The Triton kernels (the step's and the tape's) in Triton's interpreter, on CPU tensors: run by
``tests/test_triton_step.py`` in a subprocess whose environment sets ``TRITON_INTERPRET=1``
(Triton reads it when imported, so the test process itself cannot switch).

Prints one JSON object: for each case, the largest differences from the reference paths.
"""

from __future__ import annotations

import json
import sys

import torch


def random_constants(hidden: int, seed: int):
    """A step's constants (detached) from a rule of ``hidden`` units with N(0, 0.5) weights."""
    from learned_optim import MetaLearnerLSTM
    from learned_optim.rule.math import prepare_step

    torch.manual_seed(seed)
    meta = MetaLearnerLSTM(hidden_size=hidden)
    with torch.no_grad():
        for weight in meta.parameters():
            weight.normal_(0.0, 0.5)
    constants = prepare_step(meta.weights(), torch.tensor(1.7), torch.float32)
    return constants._replace(**{name: getattr(constants, name).detach()
                                 for name in constants._fields if name != "p"})


def kernel_cases() -> dict:
    """``step_rows_triton`` against ``update_rows`` (+ ``apply_group_options``), in place on a
    slice of a wider feature-major buffer, for several hidden sizes, lengths, launch shapes
    and group options; gradients spanning zero, the preprocessing's threshold, huge values
    and NaN."""
    from learned_optim.rule.math import (
        apply_group_options,
        initial_state,
        update_rows,
    )
    from learned_optim.rule.triton_step import step_rows_triton

    results = {}
    for hidden, rows, block, lr, decay in ((20, 1, 64, 1.0, 0.0), (20, 200, 64, 1.0, 0.0),
                                           (20, 200, 16, 0.3, 0.01), (20, 77, 128, 0.7, 0.0),
                                           (5, 50, 32, 1.0, 0.1), (33, 40, 16, 1.0, 0.0)):
        constants = random_constants(hidden, seed=hidden * 1000 + rows)
        buffer = initial_state(rows + 7, hidden, feature_major=True)
        buffer.normal_()
        state = buffer[3 : 3 + rows]
        grad = torch.randn(rows) * torch.logspace(-7, 2, rows)
        grad[0] = 0.0
        if rows > 3:
            grad[1], grad[2] = float("nan"), 1e30
        theta = torch.randn(rows)
        expected_theta, expected_state = update_rows(constants, state.clone(), grad, theta)
        expected_theta = apply_group_options(theta, expected_theta, lr, decay)
        before = buffer.clone()
        step_rows_triton(constants, state, grad, theta, lr, decay, block=block)
        finite = ~torch.isnan(expected_theta)
        outside = torch.cat((buffer[:3], buffer[3 + rows :]))
        results[f"H={hidden} n={rows} block={block} lr={lr} decay={decay}"] = {
            # relative beyond 1: the 1e30 gradient's update is about 1e30
            "theta": float(((theta - expected_theta).abs()
                            / (1 + expected_theta.abs()))[finite].max()),
            "state": float((state - expected_state)[finite].abs().max()),
            "nan_where_expected": bool(torch.equal(torch.isnan(theta), ~finite)),
            "outside_rows_unchanged": bool(torch.equal(
                outside, torch.cat((before[:3], before[3 + rows :])))),
        }
    return results


def optimizer_case() -> dict:
    """``LSTMMetaOptimizer.step()`` through the Triton kernel (the policy patched to take it
    on the CPU) against the same optimizer on its chunk path: three steps of a small MLP with
    two param groups (one with ``lr`` and ``weight_decay``), for the paper's rule and for the
    ``general`` rule's architecture (which normalises the gradient, in the kernel)."""
    from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
    from learned_optim import optimizer as optimizer_module
    from learned_optim.rule import policy
    from learned_optim.truncated import general_rule

    calls = []
    kernel = optimizer_module.step_bucket_triton

    def counted(*args, **kwargs):
        calls.append(sum(g.numel() for g in args[2]))
        return kernel(*args, **kwargs)

    optimizer_module.step_bucket_triton = counted

    def run(triton: bool, meta) -> tuple[list[torch.Tensor], list]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(13, 9), torch.nn.Tanh(),
                                    torch.nn.Linear(9, 3))
        inputs, targets = torch.randn(32, 13), torch.randn(32, 3)
        opt = LSTMMetaOptimizer([{"params": model[0].parameters()},
                                 {"params": model[2].parameters(), "lr": 0.5,
                                  "weight_decay": 0.01}], meta)
        policy.step_native = lambda device, dtype: False
        policy.step_triton = lambda device, dtype: triton
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            opt.step(loss=loss)
        return ([p.detach().clone() for p in model.parameters()],
                [opt.state[p].get("grad_moments") for p in model.parameters()])

    results = {}
    for name, make_rule in (("optimizer", MetaLearnerLSTM), ("optimizer_general", general_rule)):
        calls.clear()
        torch.manual_seed(1)
        rule = make_rule()
        (chunks, chunk_moments), (fused, moments) = run(False, rule), run(True, rule)
        results[name] = {
            "largest_difference": max(float((a - b).abs().max()) for a, b in zip(chunks, fused)),
            "kernel_calls": len(calls), "rows_stepped": sum(calls),
            "moments_relative_difference": None if moments[0] is None else max(
                float((a - b).abs().amax(dim=tuple(range(1, a.dim())))
                      .div(b.abs().amax(dim=tuple(range(1, b.dim())))).max())
                for a, b in zip(moments, chunk_moments))}  # of each moment's largest
    return results


def bucket_cases() -> dict:
    """``step_bucket_triton`` (one launch for several tensors) against the CPU's
    ``step_bucket_native``: sizes that end inside a block, an empty tensor, one without a
    gradient, lr and decay, with and without the gradient's normalisation."""
    from learned_optim.rule import native
    from learned_optim.rule.math import initial_state, normalisation
    from learned_optim.rule.triton_step import step_bucket_triton

    constants = random_constants(20, seed=7)
    results = {}
    for normalise, block in ((False, 16), (True, 16), (True, 64)):
        torch.manual_seed(block)
        sizes = [1, 37, 0, 300, 16, 70]
        buffer = initial_state(sum(sizes), 20, feature_major=True)
        buffer.normal_()
        expected_buffer = buffer.clone().t().contiguous().t()
        params = [torch.randn(n) for n in sizes]
        start = [p.clone() for p in params]
        expected_params = [p.clone() for p in params]
        grads = [torch.randn(n) * torch.logspace(-7, 1, n) for n in sizes]
        grads[3] = None
        moments = [torch.rand(2, n) for n in sizes]
        expected_moments = [m.clone() for m in moments]

        expected_normalisations, normalisations = (
            [normalisation(m, step, 0.9, 0.99, 0.1) for m, step in zip(tensors, range(1, 7))]
            if normalise else None for tensors in (expected_moments, moments))
        native.step_bucket_native(constants, expected_buffer, grads, expected_params, 0.6,
                                  1e-3, normalisations=expected_normalisations)
        step_bucket_triton(constants, buffer, grads, params, 0.6, 1e-3,
                           normalisations=normalisations, block=block)
        results[f"bucket normalise={normalise} block={block}"] = {
            "theta": max(float((a - b).abs().max()) for a, b in zip(params, expected_params)
                         if a.numel()),
            "state": float((buffer - expected_buffer).abs().max()),
            "moments": max(float((a - b).abs().max()) for a, b in zip(moments, expected_moments)
                           if a.numel()),
            "untouched_without_gradient": bool(torch.equal(params[3], start[3])),
            "moved": all(not torch.equal(a, b) for a, b, g in zip(params, start, grads)
                         if g is not None and a.numel()),
        }
    return results


def backward_cases() -> dict:
    """``step_rows_backward_triton`` against float64 autograd through ``update_rows``: the
    largest difference of each gradient relative to (1 + its largest value). One case with
    the programs capped at 3, so that each loops over several blocks."""
    from learned_optim.rule import triton_tape
    from learned_optim.rule.math import update_rows
    from learned_optim.rule.native import native_constants

    results = {}
    for hidden, rows, programs in ((20, 300, None), (20, 300, 3), (5, 40, None), (20, 1, None)):
        constants = random_constants(hidden, seed=hidden + rows)
        columns = torch.randn(2 * hidden + 2, rows)
        grad = torch.randn(rows) * torch.logspace(-6, 1, rows)
        grad[0] = 0.0
        theta = torch.randn(rows)
        d_theta, d_columns = torch.randn(rows), torch.randn(2 * hidden + 2, rows)
        if programs is not None:
            triton_tape.MAX_PROGRAMS = programs
        ours = triton_tape.step_rows_backward_triton(native_constants(constants), constants.p,
                                                     columns, grad, theta, d_theta, d_columns)
        triton_tape.MAX_PROGRAMS = 512
        leaves = [t.double().requires_grad_() for t in constants[:-1]]
        inputs = [t.double().requires_grad_() for t in (columns, grad, theta)]
        outputs = update_rows(constants._make((*leaves, constants.p)), *inputs,
                              feature_major=True)
        expected = torch.autograd.grad(outputs, [*leaves, *inputs],
                                       (d_theta.double(), d_columns.double()))
        names = [*constants._fields[:-1], "state", "grad", "param"]
        results[f"backward H={hidden} n={rows} programs={programs}"] = {
            name: float((mine.double() - reference).abs().max() / (1 + reference.abs().max()))
            for name, mine, reference in zip(names, ours, expected)}
    return results


def twin_case() -> dict:
    """Meta-gradients (rule, then init) of 4 steps of the ``higher`` twin on an MLP 40-8-3
    through the Triton kernels as a CUDA device takes them (second order: one node a step;
    first order: the trajectory, whose forward, replay and backward are the kernels), against
    the CPU's paths (the eager trajectory, the recomputed step: the CPU's policy, which takes
    no Triton kernel with the interpreter on), both orders. Counts the Triton calls: steps
    forward, replays and nodes."""
    from rule_chains import twin_meta_gradients  # tests/, this script's folder

    from learned_optim import MetaLearnerLSTM
    from learned_optim.rule import policy, tape

    original_path, original_applies = policy.tape_path, tape.triton_tape_applies
    original_trajectory = policy.trajectory_triton
    calls = {"node": 0, "trajectory_step": 0, "replay": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    tape.update_rows_triton = counted("node", tape.update_rows_triton)
    tape.trajectory_step_triton = counted("trajectory_step", tape.trajectory_step_triton)
    tape.replay_triton = counted("replay", tape.replay_triton)

    def meta_gradients(first_order: bool, triton: bool) -> list[torch.Tensor]:
        if triton:  # what a CUDA device's policy answers
            policy.tape_path = lambda device, rows, first_order: (
                "trajectory" if first_order else "triton")
            policy.trajectory_triton = lambda device: True
            tape.triton_tape_applies = original_applies
        else:  # the CPU's own policy: no Triton, though the interpreter is on
            policy.tape_path = original_path
            policy.trajectory_triton = original_trajectory
            tape.triton_tape_applies = original_applies
        torch.manual_seed(1)  # the same rule for both paths
        return twin_meta_gradients(MetaLearnerLSTM(), first_order, width=8)

    results = {}
    for first_order in (True, False):
        before = dict(calls)
        ours = meta_gradients(first_order, triton=True)
        counts = {name: calls[name] - before[name] for name in calls}
        before = dict(calls)
        reference = meta_gradients(first_order, triton=False)
        counts["reference_triton_calls"] = sum(calls[name] - before[name] for name in calls)
        results[f"twin first_order={first_order}"] = {
            **counts,
            "relative_difference": max(float((a - b).abs().max() / (1e-6 + b.abs().max()))
                                       for a, b in zip(ours, reference)),
            "all_nonzero": all(bool(b.abs().max() > 0) for b in reference),
        }
    policy.tape_path, tape.triton_tape_applies = original_path, original_applies
    policy.trajectory_triton = original_trajectory
    return results


def trajectory_case() -> dict:
    """A first-order ``RuleTrajectory`` of 5 steps on 700 rows through the Triton kernels,
    replayed in 3 chunks of rows (the replay budget set low), against the eager one: the
    gradients of the anchor and of every step's constants."""
    from learned_optim import MetaLearnerLSTM
    from learned_optim.rule import policy, tape
    from learned_optim.rule.math import prepare_step

    def gradients(triton: bool) -> list[torch.Tensor]:
        policy.trajectory_triton = lambda device: triton  # as on a CUDA device, or not
        torch.manual_seed(2)
        rule = MetaLearnerLSTM()
        rows = 700
        state = (torch.randn(rows, 42) * 0.5).requires_grad_()
        theta = torch.randn(rows, requires_grad=True)
        chain = tape.RuleTrajectory(state, theta)
        for step in range(5):
            grad = torch.randn(rows) * 10.0 ** -(step % 4)
            constants = prepare_step(rule.weights(), torch.tensor(1.0 + step), torch.float32)
            param, new_state = chain.step(constants, grad)
        ((param ** 2).sum() + new_state.sum()).backward()
        return [state.grad, theta.grad, *(p.grad for p in rule.parameters())]

    gate = policy.trajectory_triton
    budget, floor = policy.REPLAY_CHUNK_BYTES, policy.MIN_REPLAY_CHUNK_ROWS
    policy.REPLAY_CHUNK_BYTES, policy.MIN_REPLAY_CHUNK_ROWS = 5 * 172 * 256, 16  # 256 rows
    ours = gradients(True)
    policy.REPLAY_CHUNK_BYTES, policy.MIN_REPLAY_CHUNK_ROWS = budget, floor
    reference = gradients(False)
    policy.trajectory_triton = gate
    return {"trajectory": {
        "relative_difference": max(float((a - b).abs().max() / (1e-6 + b.abs().max()))
                                   for a, b in zip(ours, reference)),
        "gradients": len(reference),
        "all_nonzero": all(bool(b.abs().max() > 0) for b in reference)}}


if __name__ == "__main__":
    print(json.dumps({**kernel_cases(), **optimizer_case(), **bucket_cases(), **backward_cases(),
                      **twin_case(), **trajectory_case()}))
    sys.exit(0)
