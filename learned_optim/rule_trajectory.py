"""First-order inner loops whose tape grows by a gradient, not a state, per step.

In first-order meta-training the learner's gradients and losses enter the update rule as
constants, so the parameters after ``t`` steps are a function of the starting state and
parameters (the *anchor*) and the step constants alone; an intermediate parameter reaches the
meta-loss only through the next step. A :class:`RuleTrajectory` therefore records step ``t`` as
one autograd node whose differentiable inputs are the anchor and the constants of steps
``1..t``. It saves the gradient rows (4 bytes a coordinate) and the small step constants;
per-step nodes (:mod:`learned_optim.rule_backward`) save the whole state, 176 bytes a
coordinate and step at H = 20.

The backward of the last step replays the chain from the anchor, one chunk of rows at a time:
every step's forward (``update_rows`` itself, its intermediates kept in per-step scratch for
that chunk only), then the hand-written row backward of ``rule_backward`` from the last step
to the first. That is one forward and one backward per step, as with per-step nodes.

A gradient that reaches an intermediate step's outputs is still exact (that node replays its
own prefix), only slower; a long loop starts a new anchor every ``segment_steps`` steps, so no
backward replays more than that. Double backward replays the recorded forward instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learned_optim import metalearner
from learned_optim.rule_backward import ConstantGrads, _rows_backward

__all__ = ["RuleTrajectory", "SEGMENT_STEPS", "REPLAY_CHUNK_BYTES",
           "ACCELERATOR_REPLAY_CHUNK_BYTES", "replay_chunk_bytes"]

# Steps recorded against one anchor: bounds the replay's per-chunk memory and the cost of a
# gradient that reaches an intermediate step.
SEGMENT_STEPS = 32
# Per-chunk memory of the replay (every step's state, parameter and intermediates, about
# 900 bytes a row and step at H = 20): 24 MB is about 2,200 rows at T = 12, cache-sized.
REPLAY_CHUNK_BYTES = 24 * 2**20
# On a GPU the replay is bound by kernel launches, not by cache: every chunk launches every
# step's kernels again, so the chunks are as large as this memory allows (one chunk for the
# paper's learner: about 310 MB at T = 12).
ACCELERATOR_REPLAY_CHUNK_BYTES = 2**30
_MIN_CHUNK_ROWS = 256


def replay_chunk_bytes(device: torch.device) -> int:
    """Memory one replay chunk may take on ``device`` (see the constants above).

    >>> replay_chunk_bytes(torch.device("cpu")) // 2**20, replay_chunk_bytes(torch.device("cuda"))
    (24, 1073741824)
    """
    return REPLAY_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_REPLAY_CHUNK_BYTES


class RuleTrajectory:
    """A first-order chain of update-rule steps on the autograd tape, anchored at its start.

    Parameters
    ----------
    state, param:
        The anchor: ``[n, 2H + 2]`` state rows and ``[n]`` parameter rows before the first
        step (either may require grad, e.g. a learned initialisation).
    segment_steps:
        Steps per anchor; the outputs of the last step of a segment anchor the next one.

    Examples
    --------
    >>> from learned_optim.metalearner import MetaLearnerLSTM, initial_state, prepare_step
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

    def __init__(self, state: Tensor, param: Tensor, *, segment_steps: int = SEGMENT_STEPS):
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

    def step(self, constants: metalearner.StepConstants, grad: Tensor) -> tuple[Tensor, Tensor]:
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
        constants = metalearner.StepConstants(*flat[-6:], p=p)
        return metalearner.update_rows_chunked(constants, state, grads[-1], param)

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
        else:
            d_anchor, d_constants = _chunked_replay(
                ctx.p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                need_anchor, need_constants)
        return (None, None, None, None, *d_anchor, *(None,) * steps, *d_constants)


def _step_constants(flat, p: float) -> list[metalearner.StepConstants]:
    return [metalearner.StepConstants(*flat[i: i + 6], p=p) for i in range(0, len(flat), 6)]


def _recorded_replay(p, anchor_state, anchor_param, grads, flat, d_param_out, d_state_out,
                     need_anchor, need_constants):
    """Gradients by replaying the steps on the tape (used only for double backward)."""
    with torch.enable_grad():
        inputs = [anchor_state, anchor_param, *flat]
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        param, state = leaves[1], leaves[0]
        for constants, grad in zip(_step_constants(leaves[2:], p), grads):
            param, state = metalearner.update_rows(constants, state, grad, param,
                                                   recompute=False)
        pairs = [(out, d) for out, d in ((param, d_param_out), (state, d_state_out))
                 if d is not None]
        needs = [*need_anchor, *need_constants]
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [d for _, d in pairs],
                                         create_graph=True, allow_unused=True))
    result = [next(found) if need else None for need in needs]
    return result[:2], result[2:]


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
    # intermediates that the row backward reads.
    per_row_step = 4 * (width + 1 + sum(t.shape[1] for t in
                                        metalearner.row_scratch(1, hidden).values()))
    budget = replay_chunk_bytes(anchor_param.device)
    chunk_rows = min(rows, max(_MIN_CHUNK_ROWS, budget // (per_row_step * steps)))
    states = torch.empty(steps + 1, chunk_rows, width, **options)
    params = torch.empty(steps + 1, chunk_rows, **options)
    scratches = [metalearner.row_scratch(chunk_rows, hidden, **options) for _ in range(steps)]
    for start in range(0, rows, chunk_rows):
        piece = slice(start, min(start + chunk_rows, rows))
        n = piece.stop - start
        states[0, :n] = anchor_state[piece]
        params[0, :n] = anchor_param[piece]
        for t in range(steps):
            new_param, _ = metalearner.update_rows(
                constants[t], states[t, :n], grads[t][piece], params[t, :n],
                out=states[t + 1, :n], scratch=scratches[t])
            params[t + 1, :n] = new_param
        d_param = None if d_param_out is None else d_param_out[piece]
        d_state = None if d_state_out is None else d_state_out[piece]
        for t in reversed(range(steps)):
            # Every earlier step needs both gradients; the anchor only those asked for.
            needs = (True, False, True) if t else (need_anchor[0], False, need_anchor[1])
            d_state_in, _, d_param_in, dz, d_pre, h1 = _rows_backward(
                constants[t], hidden, scratches[t], n, states[t, :n], grads[t][piece],
                params[t, :n], states[t + 1, :n], d_param, d_state, needs)
            accumulators[t].add(scratches[t]["layer1_input"][:n], states[t, :n],
                                params[t, :n], dz, d_pre, h1)
            d_param, d_state = d_param_in, d_state_in
        if d_anchor_state is not None:
            d_anchor_state[piece] = d_state
        if d_anchor_param is not None:
            d_anchor_param[piece] = d_param
    d_constants = []
    for t, accumulator in enumerate(accumulators):
        d_constants += accumulator.result(need_constants[6 * t: 6 * t + 6])
    return [d_anchor_state, d_anchor_param], d_constants
