"""A hand-written backward for :func:`~learned_optim.metalearner.update_rows`.

Recorded op by op, one step of the coordinate-wise LSTM keeps about 830 bytes per coordinate
on the autograd tape (layer-1 input, the 80 gate values, cell and hidden states, several
temporaries), and meta-training keeps T such steps for every coordinate of the learner. Here
one step is a single autograd node that saves only its inputs (the state, gradient and
parameter rows, 44 floats per coordinate at H = 20, and the state is the previous step's
output anyway) and, in the backward, re-runs the forward math of ``update_rows`` on chunks of
rows to get the gate values back. Nothing else is written twice: the recomputation *is*
``update_rows`` (its scratch buffers hold the intermediates); only the derivatives are new.

Derivatives, per row (``sigma' = s (1 - s)``, gates in the fused order i, f, o, g)::

    d pre   = d pre_out + [d theta_t * theta, -d theta_t * g] * sigma'(pre)
    d h1    = d h1_out + d pre . M_h^T
    d c1    = d c1_out + d h1 * o * (1 - tanh(c1)^2)
    d z     = [d c1 * g~ * i', d c1 * c1_prev * f', d h1 * tanh(c1) * o', d c1 * i * (1 - g~^2)]
    d x     = d z . W^T                (x = [pre(g), h1_prev])
    d theta = d theta_t * F + d pre . m_theta,     d g = -d theta_t * I + d pre(g) . pre'(g)

A double backward (``create_graph=True`` through the update itself) re-runs the recorded
forward instead, so higher-order gradients stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from learned_optim import metalearner

__all__ = ["update_rows_recomputed", "BACKWARD_CHUNK_ROWS"]

# Rows recomputed at once in the backward: bounds its temporaries (about 1.5 KB a row at
# H = 20, so 12 MB) whatever the learner's size, and keeps them in cache on CPUs (accelerators
# take metalearner.ACCELERATOR_CHUNK_ROWS).
BACKWARD_CHUNK_ROWS = 8192


class _UpdateRows(torch.autograd.Function):
    """``update_rows`` as one autograd node that saves its inputs and recomputes the rest."""

    @staticmethod
    def forward(ctx, p: float, state, grad, param, *constant_tensors):
        constants = metalearner.StepConstants(*constant_tensors, p=p)
        ctx.p = p
        ctx.save_for_backward(state, grad, param, *constant_tensors)
        return metalearner.update_rows_chunked(constants, state, grad, param)

    @staticmethod
    def backward(ctx, d_param_out, d_state_out):
        state, grad, param, *constant_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the recorded forward
            return (None, *_recorded_backward(ctx.p, state, grad, param, constant_tensors,
                                              d_param_out, d_state_out, needs))
        constants = metalearner.StepConstants(*constant_tensors, p=ctx.p)
        return (None, *_chunked_backward(constants, state, grad, param, d_param_out,
                                         d_state_out, needs))


def update_rows_recomputed(
    constants: metalearner.StepConstants, state: Tensor, grad: Tensor, param: Tensor
) -> tuple[Tensor, Tensor]:
    """``update_rows`` on the autograd tape, saving only its inputs (see the module doc).

    :func:`~learned_optim.metalearner.update_rows` calls this whenever it runs on a tape.

    >>> from learned_optim.metalearner import MetaLearnerLSTM, initial_state, prepare_step
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
        constants = metalearner.StepConstants(*leaves[3:], p=p)
        outputs = metalearner.update_rows(constants, *leaves[:3], recompute=False)
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
    chunk_rows = min(rows, metalearner.chunk_rows(state.device, BACKWARD_CHUNK_ROWS))
    scratch = metalearner.row_scratch(chunk_rows, hidden, **options)
    next_state = torch.empty(chunk_rows, width, **options)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        piece = slice(start, stop)
        n = stop - start
        new_param, new_state = metalearner.update_rows(
            constants, state[piece], grad[piece], param[piece], out=next_state[:n],
            scratch=scratch)
        d_rows = _rows_backward(
            constants, hidden, scratch, n, state[piece], grad[piece], param[piece], new_state,
            None if d_param_out is None else d_param_out[piece],
            None if d_state_out is None else d_state_out[piece], needs[:3])
        d_state_rows, d_grad_rows, d_param_rows, dz, d_pre, h1 = d_rows
        constant_grads.add(scratch["layer1_input"][:n], state[piece], param[piece], dz, d_pre,
                           h1)
        for total, part in ((d_state, d_state_rows), (d_grad, d_grad_rows),
                            (d_param, d_param_rows)):
            if part is not None:
                total[piece] = part
    return [d_state, d_grad, d_param, *constant_grads.result(needs[3:])]


class ConstantGrads:
    """Gradients of one step's :class:`StepConstants`: sums over rows, added chunk by chunk."""

    def __init__(self, constants: metalearner.StepConstants) -> None:
        self.hidden = constants.meta_weight_h.shape[0]
        self.input_weight = torch.zeros_like(constants.input_weight)
        self.gate_bias = torch.zeros_like(constants.gate_bias)
        self.meta_h = torch.zeros_like(constants.meta_weight_h)
        self.meta_small = constants.meta_bias.new_zeros(3, 2)  # rows: theta, previous, bias

    def add(self, layer1_input, state, param, dz, d_pre, h1) -> None:
        """Add the rows of one chunk (its inputs, layer-1 input, ``dz``, ``d_pre`` and h1)."""
        self.input_weight.addmm_(layer1_input.t(), dz)
        self.gate_bias.add_(dz.sum(dim=0))
        self.meta_h.addmm_(h1.t(), d_pre)
        self.meta_small[0].add_(param @ d_pre)
        self.meta_small[1].add_((state[:, 2 * self.hidden:] * d_pre).sum(dim=0))
        self.meta_small[2].add_(d_pre.sum(dim=0))

    def result(self, needs) -> list[Tensor | None]:
        """The six gradients in :class:`StepConstants` order, ``None`` where not needed."""
        grads = (self.input_weight, self.gate_bias, self.meta_h, *self.meta_small)
        return [g if need else None for g, need in zip(grads, needs)]


def _rows_backward(constants, hidden, scratch, n, state, grad, param, new_state, d_param_out,
                   d_state_out, needs):
    """Derivatives for one chunk whose forward intermediates are in ``scratch``.

    ``needs`` says which of (state, grad, param) want a gradient; the others come back as
    ``None`` without being computed (first order never needs the gradient's, the first step
    never the state's). The gate derivatives ``dz`` and ``d_pre`` are always returned: the
    meta-learner's weights need them.
    """
    needs_state, needs_grad, needs_param = needs
    gates = scratch["gates"][:n]  # sigmoid applied; columns i, f, o (the g block is unused)
    in_gate, forget_gate, out_gate = gates[:, : 3 * hidden].split(hidden, dim=1)
    cell_gate = scratch["cell_gate"][:n]  # tanh(g)
    tanh_c1 = scratch["tanh_c1"][:n]
    h1 = scratch["h1"][:n]
    c1_prev = state[:, hidden: 2 * hidden]
    gate_pre = new_state[:, 2 * hidden:]  # [n, 2]: f_pre, i_pre of the learner's update
    forget_lr = gate_pre.sigmoid()

    # Layer 2: theta_t = F theta - I g, with (F, I) = sigmoid(pre).
    d_pre = torch.zeros_like(gate_pre) if d_state_out is None else d_state_out[:, 2 * hidden:]
    if d_param_out is not None:
        d_gates2 = torch.stack((d_param_out * param, -d_param_out * grad), dim=1)
        d_pre = torch.addcmul(d_pre, d_gates2, forget_lr * (1 - forget_lr))
    if d_state_out is None:
        d_h1 = d_pre @ constants.meta_weight_h.t()
    else:
        d_h1 = torch.addmm(d_state_out[:, :hidden], d_pre, constants.meta_weight_h.t())

    # Layer 1: h1 = o tanh(c1), c1 = f c1_prev + i g~.
    d_c1 = (d_h1 * out_gate).mul_(1 - tanh_c1 * tanh_c1)
    if d_state_out is not None:
        d_c1 += d_state_out[:, hidden: 2 * hidden]
    dz = torch.empty(n, 4 * hidden, dtype=state.dtype, device=state.device)
    dz_i, dz_f, dz_o, dz_g = dz.split(hidden, dim=1)
    torch.mul(d_c1, cell_gate, out=dz_i)
    torch.mul(d_c1, c1_prev, out=dz_f)
    torch.mul(d_h1, tanh_c1, out=dz_o)
    # sigmoid' = s (1 - s) on the three sigmoid blocks at once, tanh' = 1 - g~^2 on the last.
    sig = gates[:, : 3 * hidden]
    dz[:, : 3 * hidden].mul_(sig - sig * sig)
    torch.mul(d_c1, in_gate, out=dz_g).mul_(1 - cell_gate * cell_gate)

    d_state_rows = d_grad_rows = d_param_rows = None
    if needs_state or needs_grad:
        d_layer1_input = dz @ constants.input_weight.t()  # [n, 2 + H]
    if needs_state:
        d_state_rows = torch.cat((d_layer1_input[:, 2:], d_c1 * forget_gate,
                                  d_pre * constants.meta_weight_prev), dim=1)
    if needs_param:
        d_param_rows = d_pre @ constants.meta_weight_theta
        if d_param_out is not None:
            d_param_rows.addcmul_(d_param_out, forget_lr[:, 0])
    if needs_grad:
        d_grad_rows = _preprocess_backward(grad, constants.p, d_layer1_input[:, 0],
                                           d_layer1_input[:, 1])
        if d_param_out is not None:
            d_grad_rows.addcmul_(d_param_out, forget_lr[:, 1], value=-1)
    return d_state_rows, d_grad_rows, d_param_rows, dz, d_pre, h1


def _preprocess_backward(x: Tensor, p: float, d_log: Tensor, d_sign: Tensor) -> Tensor:
    """Gradient through ``preprocess``: (log|x|/p)' = 1/(p x) and sign' = 0 when
    ``|x| >= e^-p``; otherwise the features are (-1, e^p x), with derivatives (0, e^p)."""
    large = x.abs() >= math.exp(-p)
    safe = torch.where(large, x, 1.0)
    return torch.where(large, d_log / (p * safe), d_sign * math.exp(p))
