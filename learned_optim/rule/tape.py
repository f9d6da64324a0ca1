"""The update rule on the autograd tape: which path a step takes, and its autograd nodes.

Recorded op by op, one step of the coordinate-wise LSTM keeps about 830 bytes per coordinate
on the autograd tape (layer-1 input, the 80 gate values, cell and hidden states, several
temporaries), and meta-training keeps T such steps for every coordinate of the learner. The
two nodes here keep far less, and the path is chosen once, by
:func:`update_rows_differentiable` (per step) and :func:`trajectory_applies` (first order):

- **Recomputed step** (:func:`update_rows_recomputed`): one step is a single node that saves
  only its inputs (state, gradient and parameter rows, 44 floats per coordinate at H = 20,
  and the state is the previous step's output anyway) and, in the backward, re-runs
  :func:`~learned_optim.rule.math.update_rows` on chunks of rows to get the gate values back,
  then applies the hand-written :func:`~learned_optim.rule.math.rows_backward`.
- **First-order trajectory** (:class:`RuleTrajectory`): in first-order meta-training the
  learner's gradients and losses enter the rule as constants, so the parameters after ``t``
  steps are a function of the starting state and parameters (the *anchor*) and the step
  constants alone. Step ``t`` is one node whose differentiable inputs are the anchor and the
  constants of steps ``1..t``; it saves the gradient rows (4 bytes a coordinate) and the small
  step constants. Its backward replays the chain from the anchor, one chunk of rows at a time
  (every step's forward, then the row backward from the last step to the first): one forward
  and one backward per step, as with per-step nodes. A gradient that reaches an intermediate
  step's outputs is still exact (that node replays its own prefix), only slower; a long loop
  starts a new anchor every ``segment_steps`` steps, so no backward replays more than that.

A double backward (``create_graph=True`` through the update itself) re-runs the recorded
forward instead, so higher-order gradients stay exact. Chunk sizes, the threads of the chunk
loops and which of the paths (trajectory, recomputed step, every operation recorded, or, for
float32 steps on a CPU, the node compiled by :mod:`learned_optim.rule.compiled`) a step of a
given size takes come from :mod:`learned_optim.rule.policy`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learned_optim.rule import policy
from learned_optim.rule.compiled import compiled_rule, update_rows_compiled
from learned_optim.rule.math import (
    ConstantGrads,
    StepConstants,
    row_scratch,
    rows_backward,
    update_rows,
    update_rows_chunked,
)
from learned_optim.rule.native_tape import native_tape_applies, update_rows_native
from learned_optim.rule.triton_tape import (
    replay_triton,
    trajectory_step_triton,
    triton_tape_applies,
    update_rows_triton,
)

__all__ = ["RuleTrajectory", "compiled_applies", "first_order_path", "node_path", "on_tape",
           "trajectory_applies", "update_rows_differentiable", "update_rows_recomputed"]


def on_tape(constants: StepConstants, *tensors: Tensor) -> bool:
    """Whether autograd would record an operation on these inputs.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import prepare_step
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    >>> on_tape(constants, torch.zeros(2))
    True
    >>> with torch.no_grad():
    ...     on_tape(constants, torch.zeros(2))
    False
    """
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in (*tensors, *constants[:-1]))


def compiled_applies(grad: Tensor) -> bool:
    """Whether a step on ``grad``'s rows may take the compiled node where the policy gives it:
    float32 (the graph compiled once) and a compiler that works
    (:func:`~learned_optim.rule.compiled.compiled_rule`).

    >>> compiled_applies(torch.ones(3, dtype=torch.float64))
    False
    """
    return grad.dtype == torch.float32 and compiled_rule() is not None


def node_path(grad: Tensor, hidden: int, first_order: bool) -> str:
    """The policy's path for a step on ``grad``'s rows (:func:`learned_optim.rule.policy.tape_path`)
    where it can be taken: the native node where its kernels apply
    (:func:`~learned_optim.rule.native_tape.native_tape_applies`), else the compiled node where
    it applies (:func:`compiled_applies`); the Triton node where it applies
    (:func:`~learned_optim.rule.triton_tape.triton_tape_applies`); else the trajectory (first
    order) or the recomputed step.

    >>> node_path(torch.ones(3), 20, first_order=True)
    'trajectory'
    """
    path = policy.tape_path(grad.device, grad.shape[0], first_order=first_order)
    if path == "native" and not native_tape_applies(grad, hidden):
        path = "compiled"
    if (path == "compiled" and not compiled_applies(grad)) or (
            path == "triton" and not triton_tape_applies(grad, hidden)):
        path = "trajectory" if first_order else "recomputed"
    return path


def first_order_path(grad: Tensor, loss: Tensor | None, hidden: int = 20) -> str | None:
    """The first-order path of a step on a tape whose gradient and loss are constants:
    ``"trajectory"`` (join a :class:`RuleTrajectory`; on a CUDA device its kernels are
    Triton's), ``"native"`` (:func:`~learned_optim.rule.native_tape.update_rows_native`) or
    ``"compiled"`` (:func:`~learned_optim.rule.compiled.update_rows_compiled`), as
    :func:`node_path` resolves the policy's choice for its size and the rule's ``hidden``
    size; ``None`` off the tape or for a second-order step.

    >>> first_order_path(torch.ones(3), torch.tensor(1.0))
    'trajectory'
    >>> first_order_path(torch.ones(3, requires_grad=True), torch.tensor(1.0)) is None
    True
    """
    if not torch.is_grad_enabled() or grad.requires_grad or (
            loss is not None and loss.requires_grad):
        return None
    path = node_path(grad, hidden, first_order=True)
    return path if path in ("trajectory", "compiled", "native") else None


def trajectory_applies(grad: Tensor, loss: Tensor | None, hidden: int = 20) -> bool:
    """Whether a step may join a first-order :class:`RuleTrajectory`: on a tape, with the
    gradient and the loss constants, so that only the last parameters need the tape, and the
    trajectory is the policy's path for its size (:func:`first_order_path`).

    >>> trajectory_applies(torch.ones(3), torch.tensor(1.0))
    True
    >>> trajectory_applies(torch.ones(3, requires_grad=True), torch.tensor(1.0))
    False
    """
    return first_order_path(grad, loss, hidden) == "trajectory"


def update_rows_differentiable(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor, *,
    recompute: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`~learned_optim.rule.math.update_rows`, the path chosen once for the tape.

    Off the tape (grad mode off, or nothing requires grad) the kernel runs as is. On it,
    ``recompute=True`` records the step as one node that saves only its inputs
    (:func:`update_rows_recomputed`: about 5x less tape memory and a faster backward);
    ``recompute=False`` records every operation instead; ``None`` (default) takes the
    policy's choice for the size (:func:`node_path`), which on a CPU may be the native node
    (:func:`~learned_optim.rule.native_tape.update_rows_native`) or the compiled one
    (:func:`~learned_optim.rule.compiled.update_rows_compiled`), on a CUDA device the Triton
    one (:func:`~learned_optim.rule.triton_tape.update_rows_triton`). Same gradients, to
    rounding.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> theta, _ = update_rows_differentiable(constants, initial_state(3, 20), torch.ones(3),
    ...                                       torch.zeros(3))
    >>> theta.grad_fn.name()
    '_UpdateRowsBackward'
    """
    if recompute is None:
        hidden = constants.meta_weight_h.shape[0]
        path = node_path(grad, hidden, first_order=False)
        if path == "native" and on_tape(constants, state, grad, param):
            return update_rows_native(constants, state, grad, param)
        if path == "triton" and on_tape(constants, state, grad, param):
            return update_rows_triton(constants, state, grad, param)
        if path == "compiled" and on_tape(constants, state, grad, param):
            return update_rows_compiled(constants, state, grad, param)
        recompute = path != "recorded"
    if recompute and on_tape(constants, state, grad, param):
        return update_rows_recomputed(constants, state, grad, param)
    return update_rows(constants, state, grad, param)


class _UpdateRows(torch.autograd.Function):
    """``update_rows`` as one autograd node that saves its inputs and recomputes the rest."""

    @staticmethod
    def forward(ctx, p: float, state, grad, param, *constant_tensors):
        constants = StepConstants(*constant_tensors, p=p)
        ctx.p = p
        ctx.save_for_backward(state, grad, param, *constant_tensors)
        return update_rows_chunked(constants, state, grad, param)

    @staticmethod
    def backward(ctx, d_param_out, d_state_out):
        state, grad, param, *constant_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the recorded forward
            return (None, *_recorded_backward(ctx.p, state, grad, param, constant_tensors,
                                              d_param_out, d_state_out, needs))
        constants = StepConstants(*constant_tensors, p=ctx.p)
        with policy.threads_for_chunk_loop(state.device, state.shape[0]):
            return (None, *_chunked_backward(constants, state, grad, param, d_param_out,
                                             d_state_out, needs))


def update_rows_recomputed(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
) -> tuple[Tensor, Tensor]:
    """``update_rows`` on the autograd tape as one node that saves only its inputs (module doc).

    :func:`update_rows_differentiable` calls this whenever it runs on a tape.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> meta = MetaLearnerLSTM()
    >>> constants = prepare_step(meta.weights(), torch.tensor(1.0), torch.float32)
    >>> theta = torch.zeros(3, requires_grad=True)
    >>> new_theta, state = update_rows_recomputed(constants, initial_state(3, 20),
    ...                                           torch.ones(3), theta)
    >>> new_theta.grad_fn.name()
    '_UpdateRowsBackward'
    >>> new_theta.sum().backward()
    >>> meta.meta_bias.grad.shape
    torch.Size([2])
    """
    return _UpdateRows.apply(constants.p, state, grad, param, *constants[:-1])


def _recorded_backward(p, state, grad, param, constant_tensors, d_param_out, d_state_out, needs):
    """Gradients by re-running the forward on the tape (used only for double backward)."""
    with torch.enable_grad():
        inputs = [state, grad, param, *constant_tensors]
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        constants = StepConstants(*leaves[3:], p=p)
        outputs = update_rows(constants, *leaves[:3])
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        grads = torch.autograd.grad(outputs, wanted, (d_param_out, d_state_out),
                                    create_graph=True, allow_unused=True)
    grads = iter(grads)
    return [next(grads) if need else None for need in needs]


def _chunked_backward(constants, state, grad, param, d_param_out, d_state_out, needs):
    """Gradients of (state, grad, param, *constants), chunk by chunk of rows."""
    rows, width = state.shape
    hidden = constants.meta_weight_h.shape[0]
    options = {"dtype": state.dtype, "device": state.device}
    d_state = torch.empty(rows, width, **options) if needs[0] else None
    d_grad = torch.empty(rows, **options) if needs[1] else None
    d_param = torch.empty(rows, **options) if needs[2] else None
    constant_grads = ConstantGrads(constants)
    chunk_rows = min(rows, policy.backward_chunk_rows(state.device))
    scratch = row_scratch(chunk_rows, hidden, **options)
    next_state = torch.empty(chunk_rows, width, **options)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        piece = slice(start, stop)
        n = stop - start
        new_param, new_state = update_rows(
            constants, state[piece], grad[piece], param[piece], out=next_state[:n],
            scratch=scratch)
        d_rows = rows_backward(
            constants, hidden, scratch, n, state[piece], grad[piece], param[piece], new_state,
            None if d_param_out is None else d_param_out[piece],
            None if d_state_out is None else d_state_out[piece], needs[:3])
        d_state_rows, d_grad_rows, d_param_rows, dz, d_pre, h1 = d_rows
        constant_grads.add(scratch, n, state[piece], param[piece], dz, d_pre, h1)
        for total, part in ((d_state, d_state_rows), (d_grad, d_grad_rows),
                            (d_param, d_param_rows)):
            if part is not None:
                total[piece] = part
    return [d_state, d_grad, d_param, *constant_grads.result(needs[3:])]


class RuleTrajectory:
    """A first-order chain of update-rule steps on the autograd tape, anchored at its start.

    Parameters
    ----------
    state, param:
        The anchor: ``[n, 2H + 2]`` state rows and ``[n]`` parameter rows before the first
        step (either may require grad, e.g. a learned initialisation).
    segment_steps:
        Steps per anchor (default ``learned_optim.rule.policy.SEGMENT_STEPS``); the
        outputs of the last step of a segment anchor the next one.

    Examples
    --------
    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step
    >>> meta = MetaLearnerLSTM()
    >>> init = torch.zeros(5, requires_grad=True)
    >>> chain = RuleTrajectory(initial_state(5, 20), init)
    >>> for _ in range(3):
    ...     constants = prepare_step(meta.weights(), torch.tensor(1.0), torch.float32)
    ...     theta, state = chain.step(constants, torch.ones(5))
    >>> theta.sum().backward()
    >>> init.grad.shape, meta.meta_bias.grad.shape
    (torch.Size([5]), torch.Size([2]))
    """

    def __init__(self, state: Tensor, param: Tensor, *, segment_steps: int | None = None):
        if segment_steps is None:
            segment_steps = policy.SEGMENT_STEPS
        if segment_steps < 1:
            raise ValueError(f"segment_steps must be positive, got {segment_steps}")
        if state.dim() != 2 or param.dim() != 1 or state.shape[0] != param.shape[0]:
            raise ValueError(
                f"the anchor must be state rows [n, width] and parameter rows [n], got shapes "
                f"{tuple(state.shape)} and {tuple(param.shape)}")
        self.segment_steps = int(segment_steps)
        self._anchor(state, param)

    def _anchor(self, state: Tensor, param: Tensor) -> None:
        self._anchor_state, self._anchor_param = state, param
        self._state, self._param = state, param  # the last outputs, on the tape
        self._grads: list[Tensor] = []
        self._constants: list[Tensor] = []  # six tensors per step, flattened

    def step(self, constants: StepConstants, grad: Tensor) -> tuple[Tensor, Tensor]:
        """One update of every row: ``(theta_t, state_t)``, as ``update_rows`` returns them.

        ``grad`` is a constant of first-order meta-training: it must not require grad.
        """
        if grad.requires_grad:
            raise ValueError(
                "RuleTrajectory is for first-order meta-training: the gradient input must not "
                "require grad (detach it, or use update_rows for second order)")
        if grad.shape != self._param.shape:
            raise ValueError(f"grad has shape {tuple(grad.shape)}, expected "
                             f"{tuple(self._param.shape)} (one value per row)")
        if len(self._grads) == self.segment_steps:
            self._anchor(self._state, self._param)
        self._grads.append(grad)
        self._constants.extend(constants[:-1])
        self._param, self._state = _TrajectoryStep.apply(
            len(self._grads), constants.p, self._state.detach(), self._param.detach(),
            self._anchor_state, self._anchor_param, *self._grads, *self._constants)
        return self._param, self._state


class _TrajectoryStep(torch.autograd.Function):
    """Step ``t`` of a trajectory: differentiable in the anchor and the constants 1..t."""

    @staticmethod
    def forward(ctx, steps: int, p: float, state, param, anchor_state, anchor_param, *tensors):
        grads, flat = tensors[:steps], tensors[steps:]
        ctx.steps, ctx.p = steps, p
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(anchor_state, anchor_param, *grads, *flat)
        constants = StepConstants(*flat[-6:], p=p)
        # the Triton kernels on a CUDA device (the forward and the replay), where they work
        ctx.triton = policy.trajectory_triton(param.device) and triton_tape_applies(
            grads[-1], constants.meta_weight_h.shape[0])
        if ctx.triton:
            return trajectory_step_triton(constants, state, grads[-1], param)
        return update_rows_chunked(constants, state, grads[-1], param)

    @staticmethod
    def backward(ctx, d_param_out, d_state_out):
        anchor_state, anchor_param, *tensors = ctx.saved_tensors
        steps = ctx.steps
        grads, flat = tensors[:steps], tensors[steps:]
        needs = ctx.needs_input_grad
        need_anchor, need_constants = needs[4:6], needs[6 + steps:]
        if d_param_out is None and d_state_out is None:
            return (None,) * len(needs)
        if torch.is_grad_enabled():  # create_graph=True: differentiate the recorded replay
            d_anchor, d_constants = _recorded_replay(
                ctx.p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                need_anchor, need_constants)
        elif ctx.triton:
            d_anchor, d_constants = _triton_replay(ctx.p, anchor_state, anchor_param, grads,
                                                   flat, d_param_out, d_state_out, need_anchor,
                                                   need_constants)
        else:
            with policy.threads_for_chunk_loop(anchor_param.device, anchor_param.shape[0]):
                d_anchor, d_constants = _chunked_replay(
                    ctx.p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                    need_anchor, need_constants)
        return (None, None, None, None, *d_anchor, *(None,) * steps, *d_constants)


def _step_constants(flat, p: float) -> list[StepConstants]:
    return [StepConstants(*flat[i: i + 6], p=p) for i in range(0, len(flat), 6)]


def _recorded_replay(p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                     need_anchor, need_constants):
    """Gradients by replaying the steps on the tape (used only for double backward)."""
    with torch.enable_grad():
        inputs = [anchor_state, anchor_param, *flat]
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        param, state = leaves[1], leaves[0]
        for constants, grad in zip(_step_constants(leaves[2:], p), grads):
            param, state = update_rows(constants, state, grad, param)
        pairs = [(out, d) for out, d in ((param, d_param_out), (state, d_state_out))
                 if d is not None]
        needs = [*need_anchor, *need_constants]
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [d for _, d in pairs],
                                         create_graph=True, allow_unused=True))
    result = [next(found) if need else None for need in needs]
    return result[:2], result[2:]


def _triton_replay(p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                   need_anchor, need_constants):
    """:func:`_chunked_replay`'s gradients from the Triton kernels
    (:func:`~learned_optim.rule.triton_tape.replay_triton`), ``None`` where not needed."""
    d_state, d_param, per_step = replay_triton(_step_constants(flat, p), anchor_state,
                                               anchor_param, list(grads), d_param_out,
                                               d_state_out)
    d_constants = [grad if need else None
                   for grad, need in zip((g for step in per_step for g in step), need_constants)]
    return ([d_state if need_anchor[0] else None, d_param if need_anchor[1] else None],
            d_constants)


def _chunked_replay(p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                    need_anchor, need_constants):
    """Gradients of the anchor and of every step's constants, chunk by chunk of rows."""
    constants = _step_constants(flat, p)
    steps = len(constants)
    rows, width = anchor_state.shape
    hidden = constants[0].meta_weight_h.shape[0]
    options = {"dtype": anchor_param.dtype, "device": anchor_param.device}
    accumulators = [ConstantGrads(c) for c in constants]
    d_anchor_state = torch.empty(rows, width, **options) if need_anchor[0] else None
    d_anchor_param = torch.empty(rows, **options) if need_anchor[1] else None

    # Per step and chunk: state and parameter (inputs of the next step) and the scratch
    # intermediates that the row backward reads. Within a chunk everything is feature-major
    # (``[features, n]``, contiguous gate blocks; math.update_rows): the anchor's rows and
    # the incoming state gradient are transposed once per chunk, not once per step.
    per_row_step = 4 * (width + 1 + sum(t.shape[1] for t in
                                        row_scratch(1, hidden).values()))
    chunk_rows = policy.replay_chunk_rows(anchor_param.device, rows, steps, per_row_step)
    states = torch.empty(steps + 1, width * chunk_rows, **options)
    params = torch.empty(steps + 1, chunk_rows, **options)
    scratches = [row_scratch(chunk_rows, hidden, **options) for _ in range(steps)]
    for start in range(0, rows, chunk_rows):
        piece = slice(start, min(start + chunk_rows, rows))
        n = piece.stop - start
        columns = [flat[: width * n].view(width, n) for flat in states]  # state t, [width, n]
        columns[0].copy_(anchor_state[piece].t())
        params[0, :n] = anchor_param[piece]
        for t in range(steps):
            new_param, _ = update_rows(
                constants[t], columns[t], grads[t][piece], params[t, :n],
                out=columns[t + 1], scratch=scratches[t], feature_major=True)
            params[t + 1, :n] = new_param
        d_param = None if d_param_out is None else d_param_out[piece]
        d_state = None if d_state_out is None else d_state_out[piece].t().contiguous()
        for t in reversed(range(steps)):
            # Every earlier step needs both gradients; the anchor only those asked for.
            needs = (True, False, True) if t else (need_anchor[0], False, need_anchor[1])
            d_state_in, _, d_param_in, dz, d_pre, h1 = rows_backward(
                constants[t], hidden, scratches[t], n, columns[t], grads[t][piece],
                params[t, :n], columns[t + 1], d_param, d_state, needs, feature_major=True)
            accumulators[t].add(scratches[t], n, columns[t], params[t, :n], dz, d_pre, h1,
                                feature_major=True)
            d_param, d_state = d_param_in, d_state_in
        if d_anchor_state is not None:
            d_anchor_state[piece] = d_state.t()
        if d_anchor_param is not None:
            d_anchor_param[piece] = d_param
    d_constants = []
    for t, accumulator in enumerate(accumulators):
        d_constants += accumulator.result(need_constants[6 * t: 6 * t + 6])
    return [d_anchor_state, d_anchor_param], d_constants
