"""The update rule compiled by ``torch.compile`` for first-order meta-training on a CPU.

Eagerly, one step of :func:`~learned_optim.rule.math.update_rows` is about 25 operators, each
a pass over ``[n, 80]`` or ``[n, 20]`` floats; inductor fuses the elementwise ones into a few
vectorised loops around the two matrix products, forward and backward. The compiled function
*is* ``update_rows`` (feature-major), so the rule is still written once; autograd records one
node per step, whose backward inductor compiles too. On the 2-core Xeon (one thread, T = 12
steps and the backward, 5,000 to 28,485 coordinates) that is about 2x as fast as the
first-order trajectory's replay (``benchmarks/meta_train.py``, "rule:" rows).

It is used only where its backward is an ordinary one: first-order steps (the gradient and the
loss are constants; inductor's graphs have no double backward), on a CPU, for the sizes that
:func:`learned_optim.rule.policy.tape_path` gives it. The first use compiles once per process
(about 30 s; shapes are dynamic, so other sizes reuse it), after a probe on a few rows; if
compilation fails (no C++ compiler, an unsupported platform) a warning says so and every step
takes the eager path. ``LEARNED_OPTIM_COMPILE=0`` turns it off (``policy.COMPILE_RULE``).

The state stays feature-major (``[2H + 2, n]``) between steps: the ``[n, 2H + 2]`` rows
returned are a transposed view of it, which the next step reads back without a copy.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor

from learned_optim.rule.math import StepConstants, update_rows

__all__ = ["compiled_rule", "update_rows_compiled"]

log = logging.getLogger(__name__)

_PROBE_ROWS, _PROBE_HIDDEN = 16, 20  # the paper's hidden size: the usual graph
_compiled = None  # the compiled step, once built and probed
_failure: str | None = None  # why compiling failed, once it has


def _feature_major_step(input_weight, gate_bias, meta_weight_h, meta_weight_theta,
                        meta_weight_prev, meta_bias, p, state, grad, param):
    constants = StepConstants(input_weight, gate_bias, meta_weight_h, meta_weight_theta,
                              meta_weight_prev, meta_bias, p=p)
    return update_rows(constants, state, grad, param, feature_major=True)


def _on_tape(tensor: Tensor) -> Tensor:
    # Every differentiable input requires grad, so that one compiled graph (and not one per
    # pattern of requires_grad flags, about 30 s each) serves every step.
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()


def _probe(step) -> None:
    """Compile ``step`` by running it forward and backward on a few rows (raises on failure)."""
    hidden, rows = _PROBE_HIDDEN, _PROBE_ROWS
    shapes = ((2 + hidden, 4 * hidden), (4 * hidden,), (hidden, 2), (2,), (2,), (2,))
    weights = [torch.randn(shape, requires_grad=True) for shape in shapes]
    state = torch.randn(2 * hidden + 2, rows, requires_grad=True)
    param = torch.randn(rows, requires_grad=True)
    new_param, new_state = step(*weights, 10.0, state, torch.randn(rows), param)
    (new_param.sum() + new_state.sum()).backward()


def compiled_rule():
    """The compiled feature-major step, or ``None`` where compilation failed (warned once).

    The first call compiles (about 30 s on 2 CPU cores); later calls return the same function.
    """
    global _compiled, _failure
    if _compiled is None and _failure is None:
        step = torch.compile(_feature_major_step, dynamic=True)
        try:
            _probe(step)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: stay eager
            _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(
                f"learned_optim: torch.compile of the update rule failed ({_failure}); "
                "first-order steps take the eager path (set LEARNED_OPTIM_COMPILE=0 to skip "
                "the attempt)", RuntimeWarning, stacklevel=3)
        else:
            _compiled = step
            log.info("compiled the update rule for first-order steps on the CPU")
    return _compiled


def update_rows_compiled(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`~learned_optim.rule.math.update_rows` on the tape, through the compiled step.

    For first-order steps only: ``grad`` (and the loss folded into ``constants``) must not
    require grad. Returns ``(theta_t, state_t)`` as ``update_rows`` does, ``state_t`` a
    ``[n, 2H + 2]`` transposed view of a feature-major tensor. Falls back to the eager
    ``update_rows`` where compilation failed.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> theta, state = update_rows_compiled(constants, initial_state(3, 20), torch.ones(3),
    ...                                     torch.zeros(3, requires_grad=True))
    >>> theta.shape, state.shape, theta.requires_grad
    (torch.Size([3]), torch.Size([3, 42]), True)
    """
    if grad.requires_grad:
        raise ValueError("update_rows_compiled is for first-order steps: the gradient input "
                         "must not require grad (the compiled graph has no double backward)")
    step = compiled_rule()
    if step is None:
        return update_rows(constants, state, grad, param)
    columns = state.t()  # free when ``state`` is a previous step's transposed output
    if not columns.is_contiguous():
        columns = columns.contiguous()
    new_param, new_columns = step(*map(_on_tape, constants[:-1]), constants.p,
                                  _on_tape(columns), grad, _on_tape(param))
    return new_param, new_columns.t()
