"""The update rule compiled by ``torch.compile``: one fused node a step on the CPU's tape.

Eagerly, one step of :func:`~learned_optim.rule.math.update_rows` is about 25 operators, each
a pass over ``[n, 80]`` or ``[n, 20]`` floats; inductor fuses the elementwise ones into a few
vectorised loops around the matrix products. Two functions are compiled, both from
``update_rows`` itself (feature-major), so the rule is still written once:

- the **forward**, run without autograd;
- the **backward**, ``torch.func.vjp`` of the same function: it recomputes the step's gate
  values from its inputs and pulls the output gradients back, fused.

:class:`_CompiledStep` joins them as one autograd node that saves only its inputs, like the
recomputed step of :mod:`learned_optim.rule.tape` (the state is the previous step's output
anyway, so the tape grows by the gradient and parameter rows, 8 bytes a coordinate and step).
On the 2-core Xeon at 28,485 coordinates (T = 12 steps and the backward, 2 threads) that was
as fast as letting AOTAutograd save the intermediates (183 against 210 ms, interleaved), with
none of their 606 bytes a coordinate and step.

Its backward is an ordinary function of the saved inputs, so it serves first-order steps and
second-order ones alike (the gradient input may itself be on the tape: its gradient flows on
into the learner's double backward). Only a gradient *of* the backward
(``create_graph=True`` through the update) takes the eager ``torch.func.vjp`` instead, which
autograd records, so higher-order gradients stay exact.

:func:`learned_optim.rule.policy.tape_path` gives it float32 steps on a CPU in a range of
sizes. The first use compiles once per process (about 40 s on 2 cores; shapes are dynamic,
so other sizes reuse it), through a probe on a few rows; if compilation fails (no C++
compiler, an unsupported platform) a warning says so once and every step takes the eager
paths. ``LEARNED_OPTIM_COMPILE=0`` turns it off (``policy.COMPILE_RULE``).

The state stays feature-major (``[2H + 2, n]``) between steps: the ``[n, 2H + 2]`` rows
returned are a transposed view of it, which the next step reads back without a copy.

The in-place ``LSTMMetaOptimizer.step()`` (no tape) takes a third compiled function,
:func:`step_rows_compiled`: ``update_rows`` row-major, forward only, on its chunks of rows,
compiled on first use (about 10 s) and only then.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import Tensor

from learned_optim.rule.math import MetaWeights, StepConstants, prepare_step, update_rows

__all__ = ["compiled_rule", "compiled_step_rule", "feature_major_step_vjp", "step_rows_compiled",
           "update_rows_compiled"]

log = logging.getLogger(__name__)

# The paper's hidden size, and more rows than 4,096: inductor's CPU reductions change form at
# 4,096 elements, so a graph compiled on fewer rows would be compiled again for the policy's
# sizes (policy.COMPILED_MIN_ROWS and up).
_PROBE_ROWS, _PROBE_HIDDEN = 5000, 20
# Without inductor's pattern matcher: it rewrites the gate product and its bias add into addmm,
# whose broadcast copy of the bias into the output is a scalar loop on the CPU (2.6 ms of a
# 3.7 ms step forward at 28,485 rows, profiled in a meta-training episode); unfused, the add
# joins the sigmoid's loop. The episode was 5-10% faster (5-way 1-shot and 20-way 5-shot,
# 7 interleaved rounds, 2 threads, the Xeon).
_INDUCTOR_OPTIONS = {"pattern_matcher": False}
_compiled = None  # (forward, backward) once compiled and probed
_step_compiled = None  # the row-major forward of step(), once compiled and probed
_failure: str | None = None  # why compiling failed, once it has


def _step(feature_major: bool, input_weight, gate_bias, meta_weight_h, meta_weight_theta,
          meta_weight_prev, meta_bias, p, state, grad, param):
    constants = StepConstants(input_weight, gate_bias, meta_weight_h, meta_weight_theta,
                              meta_weight_prev, meta_bias, p=p)
    return update_rows(constants, state, grad, param, feature_major=feature_major)


# The tape's node keeps the state feature-major; the in-place step() keeps it row-major.
_feature_major_step = functools.partial(_step, True)
_row_major_step = functools.partial(_step, False)


def feature_major_step_vjp(p, d_param, d_state, *inputs):
    """Gradients of :func:`_feature_major_step` w.r.t. its 9 tensor ``inputs`` (the six
    constants, state, grad, param), given those of its outputs."""
    def step(*tensors):
        return _feature_major_step(*tensors[:6], p, *tensors[6:])

    _, pull_back = torch.func.vjp(step, *inputs)
    return pull_back((d_param, d_state))


def _with_gate_weight_layout(constant_tensors) -> tuple[Tensor, ...]:
    """The step constants, the gate weight (``input_weight``, ``[2 + H, 4H]``) laid out for
    the backward's weight-gradient product on more than one thread.

    ``update_rows`` multiplies by ``input_weight.t()``; autograd then takes that product's
    weight gradient in the orientation of the operand's layout. With ``input_weight``
    contiguous it is ``[2 + H, n] x [n, 4H]``, which MKL splits across threads, instead of
    ``[4H, n] x [n, 2 + H]``, which it does not (2 threads, 28,485 rows: forward and backward of
    the product 2.1 ms against 3.2; an episode about 5% faster). On one thread the other
    layout is the faster (6.0 against 7.4 ms), so it is kept there.
    """
    input_weight, *rest = constant_tensors
    if torch.get_num_threads() > 1:
        input_weight = input_weight.contiguous()
    return (input_weight, *rest)


class _CompiledStep(torch.autograd.Function):
    """One step as one node: compiled forward, compiled recomputing backward."""

    @staticmethod
    def forward(ctx, p: float, state, grad, param, *constant_tensors):
        forward, _ = _compiled
        ctx.p = p
        ctx.save_for_backward(*constant_tensors, state, grad, param)
        # Detached inputs, so that one graph serves every pattern of requires_grad flags.
        laid_out = _with_gate_weight_layout(constant_tensors)
        return forward(*(t.detach() for t in laid_out), p, state.detach(), grad.detach(),
                       param.detach())

    @staticmethod
    def backward(ctx, d_param, d_state):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the eager vjp, which autograd records
            grads = feature_major_step_vjp(ctx.p, d_param, d_state, *inputs)
        else:  # detached, as in the forward: one graph whatever requires grad
            _, backward = _compiled
            laid_out = (*_with_gate_weight_layout(inputs[:6]), *inputs[6:])
            grads = backward(ctx.p, d_param.contiguous(), d_state.contiguous(),
                             *(t.detach() for t in laid_out))
        *constant_grads, d_state_in, d_grad, d_param_in = grads
        return (None, d_state_in, d_grad, d_param_in, *constant_grads)


def _probe(forward, backward) -> None:
    """Compile both functions by running them on a few rows (raises on failure), with inputs
    laid out as :func:`~learned_optim.rule.math.prepare_step` lays out a step's: a graph is
    specialised to its inputs' strides."""
    hidden, rows = _PROBE_HIDDEN, _PROBE_ROWS
    tensors = list(_with_gate_weight_layout(_probe_constants()))
    inputs = [*tensors, torch.randn(2 * hidden + 2, rows), torch.randn(rows),
              torch.randn(rows)]
    with torch.no_grad():
        forward(*tensors, 10.0, *inputs[6:])
        backward(10.0, torch.randn(rows), torch.randn(2 * hidden + 2, rows), *inputs)


def _probe_constants() -> list[Tensor]:
    """Step constants laid out as :func:`~learned_optim.rule.math.prepare_step` lays them out
    (a graph is specialised to its inputs' strides), at the paper's hidden size."""
    hidden = _PROBE_HIDDEN
    weights = MetaWeights(torch.randn(4 * hidden, 4), torch.randn(4 * hidden, hidden),
                          torch.randn(4 * hidden), torch.randn(2, hidden + 2), torch.randn(2),
                          10.0)
    constants = prepare_step(weights, torch.tensor(1.0), torch.float32)
    return [t.detach() for t in constants[:-1]]


def _compile_or_warn(build):
    """``build()`` (compile and probe), or ``None`` after warning once that compiling failed."""
    global _failure
    if _failure is not None:
        return None
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - any compiler failure means: stay eager
        _failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"learned_optim: torch.compile of the update rule failed ({_failure}); "
            "steps take the eager paths (set LEARNED_OPTIM_COMPILE=0 to skip the attempt)",
            RuntimeWarning, stacklevel=4)
        return None


def compiled_rule():
    """The compiled ``(forward, backward)`` pair, or ``None`` where compilation failed (warned
    once).

    The first call compiles (about 40 s on 2 CPU cores); later calls return the same pair.
    """
    global _compiled

    def build():
        pair = (torch.compile(_feature_major_step, dynamic=True, options=_INDUCTOR_OPTIONS),
                torch.compile(feature_major_step_vjp, dynamic=True, options=_INDUCTOR_OPTIONS))
        _probe(*pair)
        log.info("compiled the update rule for the CPU's tape")
        return pair

    if _compiled is None:
        _compiled = _compile_or_warn(build)
    return _compiled


def compiled_step_rule():
    """The compiled row-major forward of the in-place step, or ``None`` where compilation
    failed (warned once, with :func:`compiled_rule`'s failure).

    The first call compiles (about 10 s on 2 CPU cores).
    """
    global _step_compiled

    def build():
        step = torch.compile(_row_major_step, dynamic=True, options=_INDUCTOR_OPTIONS)
        rows = _PROBE_ROWS
        with torch.no_grad():
            step(*_probe_constants(), 10.0, torch.randn(rows, 2 * _PROBE_HIDDEN + 2),
                 torch.randn(rows), torch.randn(rows))
        log.info("compiled the update rule for the in-place step on the CPU")
        return step

    if _step_compiled is None:
        _step_compiled = _compile_or_warn(build)
    return _step_compiled


def step_rows_compiled(constants: StepConstants, state: Tensor, grad: Tensor,
                       param: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~learned_optim.rule.math.update_rows` without autograd, through the compiled
    row-major forward: ``(theta_t, state_t)``, new tensors (the caller copies them into
    place); the eager kernel where compilation failed.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> theta, state = step_rows_compiled(constants, initial_state(3, 20), torch.ones(3),
    ...                                   torch.zeros(3))
    >>> theta.shape, state.shape
    (torch.Size([3]), torch.Size([3, 42]))
    """
    step = compiled_step_rule()
    with torch.no_grad():
        if step is None:
            return update_rows(constants, state, grad, param)
        return step(*(t.detach() for t in constants[:-1]), constants.p, state, grad, param)


def update_rows_compiled(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`~learned_optim.rule.math.update_rows` on the tape, as one compiled node.

    First or second order: ``grad`` (and the loss folded into ``constants``) may be on the
    tape. Returns ``(theta_t, state_t)`` as ``update_rows`` does, ``state_t`` a
    ``[n, 2H + 2]`` transposed view of a feature-major tensor. Falls back to the eager
    ``update_rows`` where compilation failed.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> theta, state = update_rows_compiled(constants, initial_state(3, 20), torch.ones(3),
    ...                                     torch.zeros(3, requires_grad=True))
    >>> theta.shape, state.shape, theta.grad_fn.name()
    (torch.Size([3]), torch.Size([3, 42]), '_CompiledStepBackward')
    """
    if compiled_rule() is None:
        return update_rows(constants, state, grad, param)
    columns = state.t()  # free when ``state`` is a previous step's transposed output
    if not columns.is_contiguous():
        columns = columns.contiguous()
    new_param, new_columns = _CompiledStep.apply(constants.p, columns, grad, param,
                                                 *constants[:-1])
    return new_param, new_columns.t()
