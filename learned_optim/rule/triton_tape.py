"""The meta-training tape's step as one node of two Triton kernels on a CUDA device.

Eager on a GPU, a step on the tape is some twenty kernels forward and twice as many backward
(docs/results/meta_train_cuda.md: the rule's tape was 34 of a 77 ms first-order meta-step on an
H200, 8 ms of it GPU work: the rest waiting on launches). Here, as on the CPU
(:mod:`learned_optim.rule.native_tape`), a step is one node: the forward is the step kernel of
:mod:`learned_optim.rule.triton_step` out of place, and the backward one more kernel that
recomputes a block's gates, pulls the output gradients back through the meta-gates, the cell
and the gate sigmoids in registers, and takes layer 1's products (the recomputed gates, the
input and the weight gradients) as ``tl.dot`` products, float32, no TF32: the recomputed gates
are the step kernel's to float32 rounding (its products are outer products in the CPU kernel's
order; as ``tl.dot`` here the backward compiles in seconds, where the unrolled outer products
took 70 s and spilled registers). The rule's weight gradients are summed in each program over
a fixed share of the rows, one row of partial sums a program, added in float64 in program
order afterwards: the number of programs depends on the size alone, so the sums are
deterministic. The node saves only its inputs; a gradient *of* its backward
(``create_graph=True`` through the update) takes the eager ``torch.func.vjp`` of
``update_rows``, which autograd records.

:func:`learned_optim.rule.policy.tape_path` gives the node second-order float32 steps on a
CUDA device where Triton works (:func:`triton_tape_applies`; else the recomputed step); first
order's trajectory (:class:`learned_optim.rule.tape.RuleTrajectory`) runs its steps and its
replay on the same kernels there (:func:`trajectory_step_triton`, :func:`replay_triton`). With
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors in Triton's interpreter (the tests).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from learned_optim.rule import policy
from learned_optim.rule.math import StepConstants
from learned_optim.rule.native import MAX_HIDDEN, native_constants, rule_scalars
from learned_optim.rule.native_tape import node_backward, node_forward, partial_width, unit_rows
from learned_optim.rule.triton_step import (
    FP_FUSION,
    cell_and_meta_gates,
    hidden_lanes,
    jit,
    load_meta_weights,
    preprocess_gradient,
    probed,
    step_rows_triton_out,
    triton_available,
    triton_step_usable,
)

try:  # optional, as in learned_optim.rule.triton_step: the kernels' language
    import triton.language as tl
except Exception:  # noqa: BLE001 - missing, or broken beside this torch: the eager paths serve
    tl = None

__all__ = ["BACKWARD_BLOCK_ROWS", "BACKWARD_WARPS", "MAX_PROGRAMS", "backward_programs",
           "replay_triton", "step_rows_backward_triton", "trajectory_step_triton",
           "triton_tape_applies", "update_rows_triton"]

# Rows a program of the backward takes at once, its warps, and at most this many programs a
# call (each then loops over its share of blocks): the partial sums stay a few MB whatever
# the size. Compiled for an H100 (sm_90) here without a GPU (triton.compile to a cubin): 16
# rows on 8 warps took 155 registers a thread and spilled nothing; 32 rows on 4 or 8 warps
# and 16 on 4 spilled (255 registers). Untimed on a card.
BACKWARD_BLOCK_ROWS = 16
BACKWARD_WARPS = 8
MAX_PROGRAMS = 512


@jit(do_not_specialize=("n", "stride", "d_stride", "d_in_stride"))
def _rule_step_backward(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_ptr, grad_ptr,
                        theta_ptr, d_theta_ptr, d_state_ptr, d_state_in_ptr, d_theta_in_ptr,
                        d_grad_ptr, partial_ptr, n, stride, d_stride, d_in_stride, p, threshold,
                        exp_p, H: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr,
                        BLOCK: tl.constexpr, PARTIAL: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    stride = stride.to(tl.int64)
    d_stride = d_stride.to(tl.int64)
    d_in_stride = d_in_stride.to(tl.int64)
    K = H + 2
    units = tl.arange(0, HP)
    in_units = units < H
    inputs = tl.arange(0, KP)
    in_inputs = inputs < K
    is_h = (inputs >= 2) & in_inputs
    # Layer 1's weight as [KP, HP] tiles, a gate each: wt_q[k, j] = weight[(q H + j) K + k].
    tile = inputs[:, None] + units[None, :] * K
    tile_mask = in_inputs[:, None] & in_units[None, :]
    wt_i = tl.load(weight_ptr + tile, mask=tile_mask, other=0.0)
    wt_f = tl.load(weight_ptr + H * K + tile, mask=tile_mask, other=0.0)
    wt_o = tl.load(weight_ptr + 2 * H * K + tile, mask=tile_mask, other=0.0)
    wt_g = tl.load(weight_ptr + 3 * H * K + tile, mask=tile_mask, other=0.0)
    b_i = tl.load(bias_ptr + units, mask=in_units, other=0.0)
    b_f = tl.load(bias_ptr + H + units, mask=in_units, other=0.0)
    b_o = tl.load(bias_ptr + 2 * H + units, mask=in_units, other=0.0)
    b_g = tl.load(bias_ptr + 3 * H + units, mask=in_units, other=0.0)
    meta = load_meta_weights(meta_h_ptr, meta_small_ptr, H, HP)
    meta_f, meta_i, m_theta_f, m_theta_i, m_prev_f, m_prev_i = meta[:6]
    # This program's sums: the weight's as [KP, HP] (input, gate unit), the rest per unit or
    # per row, reduced at the end.
    d_w_i = tl.zeros([KP, HP], dtype=tl.float32)
    d_w_f = tl.zeros([KP, HP], dtype=tl.float32)
    d_w_o = tl.zeros([KP, HP], dtype=tl.float32)
    d_w_g = tl.zeros([KP, HP], dtype=tl.float32)
    d_b_i = tl.zeros([HP], dtype=tl.float32)
    d_b_f = tl.zeros([HP], dtype=tl.float32)
    d_b_o = tl.zeros([HP], dtype=tl.float32)
    d_b_g = tl.zeros([HP], dtype=tl.float32)
    d_meta_f = tl.zeros([HP], dtype=tl.float32)
    d_meta_i = tl.zeros([HP], dtype=tl.float32)
    d_small_0 = tl.zeros([BLOCK], dtype=tl.float32)
    d_small_1 = tl.zeros([BLOCK], dtype=tl.float32)
    d_small_2 = tl.zeros([BLOCK], dtype=tl.float32)
    d_small_3 = tl.zeros([BLOCK], dtype=tl.float32)
    d_small_4 = tl.zeros([BLOCK], dtype=tl.float32)
    d_small_5 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        rows = (start + tl.arange(0, BLOCK)).to(tl.int64)  # n < 2^31 rows on the tape
        in_rows = rows < n
        slab = in_rows[:, None] & in_units[None, :]
        # The forward again, layer 1 as products of the input x = [log part, sign part, h1
        # before] ([BLOCK, KP]) with the weight tiles: the same values as the step kernel's
        # outer products, to float32 rounding.
        g = tl.load(grad_ptr + rows, mask=in_rows, other=0.0)
        theta = tl.load(theta_ptr + rows, mask=in_rows, other=0.0)
        large, log_part, sign_part = preprocess_gradient(g, p, threshold, exp_p)
        h_before = tl.load(state_ptr + (inputs - 2)[None, :] * stride + rows[:, None],
                           mask=in_rows[:, None] & is_h[None, :], other=0.0)
        x = tl.where(inputs[None, :] == 0, log_part[:, None],
                     tl.where(inputs[None, :] == 1, sign_part[:, None], h_before))
        in_gate = tl.sigmoid(tl.dot(x, wt_i, input_precision="ieee") + b_i[None, :])
        forget_gate = tl.sigmoid(tl.dot(x, wt_f, input_precision="ieee") + b_f[None, :])
        out_gate = tl.sigmoid(tl.dot(x, wt_o, input_precision="ieee") + b_o[None, :])
        g_sigmoid = tl.sigmoid(tl.dot(x, wt_g, input_precision="ieee") + b_g[None, :])
        c_prev = tl.load(state_ptr + (H + units)[None, :] * stride + rows[:, None], mask=slab,
                         other=0.0)
        f_prev = tl.load(state_ptr + (2 * H) * stride + rows, mask=in_rows, other=0.0)
        i_prev = tl.load(state_ptr + (2 * H + 1) * stride + rows, mask=in_rows, other=0.0)
        c, tanh_c, h1, f_pre, i_pre = cell_and_meta_gates(
            in_gate, forget_gate, out_gate, g_sigmoid, c_prev, slab, theta, f_prev, i_prev,
            *meta)
        # The output gradients (zeros past the end, so those rows add nothing).
        d_theta = tl.load(d_theta_ptr + rows, mask=in_rows, other=0.0)
        d_h = tl.load(d_state_ptr + units[None, :] * d_stride + rows[:, None], mask=slab,
                      other=0.0)
        d_c = tl.load(d_state_ptr + (H + units)[None, :] * d_stride + rows[:, None], mask=slab,
                      other=0.0)
        d_f_pre = tl.load(d_state_ptr + (2 * H) * d_stride + rows, mask=in_rows, other=0.0)
        d_i_pre = tl.load(d_state_ptr + (2 * H + 1) * d_stride + rows, mask=in_rows,
                          other=0.0)
        # theta_t = F theta - I g, F = sigmoid(f_pre), I = sigmoid(i_pre).
        forget = tl.sigmoid(f_pre)
        learning_rate = tl.sigmoid(i_pre)
        d_f_pre += d_theta * theta * forget * (1.0 - forget)
        d_i_pre -= d_theta * g * learning_rate * (1.0 - learning_rate)
        d_theta_in = d_theta * forget + d_f_pre * m_theta_f + d_i_pre * m_theta_i
        d_small_0 += d_f_pre * theta
        d_small_1 += d_i_pre * theta
        d_small_2 += d_f_pre * f_prev
        d_small_3 += d_i_pre * i_prev
        d_small_4 += d_f_pre
        d_small_5 += d_i_pre
        d_meta_f += tl.sum(d_f_pre[:, None] * h1, axis=0)
        d_meta_i += tl.sum(d_i_pre[:, None] * h1, axis=0)
        # h1 = o tanh(c), c = f c_prev + i (2 s_g - 1); the gates' pre-activations.
        d_h += d_f_pre[:, None] * meta_f[None, :] + d_i_pre[:, None] * meta_i[None, :]
        d_c += d_h * out_gate * (1.0 - tanh_c * tanh_c)
        d_a_i = tl.where(slab, d_c * (g_sigmoid * 2.0 - 1.0) * in_gate * (1.0 - in_gate), 0.0)
        d_a_f = tl.where(slab, d_c * c_prev * forget_gate * (1.0 - forget_gate), 0.0)
        d_a_o = tl.where(slab, d_h * tanh_c * out_gate * (1.0 - out_gate), 0.0)
        d_a_g = tl.where(slab, d_c * in_gate * 2.0 * g_sigmoid * (1.0 - g_sigmoid), 0.0)
        d_b_i += tl.sum(d_a_i, axis=0)
        d_b_f += tl.sum(d_a_f, axis=0)
        d_b_o += tl.sum(d_a_o, axis=0)
        d_b_g += tl.sum(d_a_g, axis=0)
        # Layer 1's weight and input gradients.
        x_t = tl.trans(x)
        d_w_i += tl.dot(x_t, d_a_i, input_precision="ieee")
        d_w_f += tl.dot(x_t, d_a_f, input_precision="ieee")
        d_w_o += tl.dot(x_t, d_a_o, input_precision="ieee")
        d_w_g += tl.dot(x_t, d_a_g, input_precision="ieee")
        d_x = (tl.dot(d_a_i, tl.trans(wt_i), input_precision="ieee")
               + tl.dot(d_a_f, tl.trans(wt_f), input_precision="ieee")
               + tl.dot(d_a_o, tl.trans(wt_o), input_precision="ieee")
               + tl.dot(d_a_g, tl.trans(wt_g), input_precision="ieee"))
        d_log = tl.sum(tl.where(inputs[None, :] == 0, d_x, 0.0), axis=1)
        d_sign = tl.sum(tl.where(inputs[None, :] == 1, d_x, 0.0), axis=1)
        # Through the preprocessing: (log|g| / p)' = 1 / (p g) and sign' = 0 where |g| >= e^-p,
        # else (0, e^p); and the update's own -I.
        d_grad = -d_theta * learning_rate + tl.where(
            large, d_log / (p * tl.where(large, g, 1.0)), d_sign * exp_p)
        tl.store(d_state_in_ptr + (inputs - 2)[None, :] * d_in_stride + rows[:, None], d_x,
                 mask=in_rows[:, None] & is_h[None, :])
        tl.store(d_state_in_ptr + (H + units)[None, :] * d_in_stride + rows[:, None],
                 d_c * forget_gate, mask=slab)
        tl.store(d_state_in_ptr + (2 * H) * d_in_stride + rows, d_f_pre * m_prev_f,
                 mask=in_rows)
        tl.store(d_state_in_ptr + (2 * H + 1) * d_in_stride + rows, d_i_pre * m_prev_i,
                 mask=in_rows)
        tl.store(d_theta_in_ptr + rows, d_theta_in, mask=in_rows)
        tl.store(d_grad_ptr + rows, d_grad, mask=in_rows)
    # This program's row of sums: bias (4H), meta_h (2H), meta_small (6), weight (4H x K).
    base = partial_ptr + pid.to(tl.int64) * PARTIAL
    tl.store(base + units, d_b_i, mask=in_units)
    tl.store(base + H + units, d_b_f, mask=in_units)
    tl.store(base + 2 * H + units, d_b_o, mask=in_units)
    tl.store(base + 3 * H + units, d_b_g, mask=in_units)
    tl.store(base + 4 * H + units, d_meta_f, mask=in_units)
    tl.store(base + 5 * H + units, d_meta_i, mask=in_units)
    tl.store(base + 6 * H + 0, tl.sum(d_small_0, axis=0))
    tl.store(base + 6 * H + 1, tl.sum(d_small_1, axis=0))
    tl.store(base + 6 * H + 2, tl.sum(d_small_2, axis=0))
    tl.store(base + 6 * H + 3, tl.sum(d_small_3, axis=0))
    tl.store(base + 6 * H + 4, tl.sum(d_small_4, axis=0))
    tl.store(base + 6 * H + 5, tl.sum(d_small_5, axis=0))
    weight_base = base + 6 * H + 6
    sums_tile = units[None, :] * K + inputs[:, None]  # [KP, HP]: gate unit j, input k
    sums_mask = in_inputs[:, None] & in_units[None, :]
    tl.store(weight_base + sums_tile, d_w_i, mask=sums_mask)
    tl.store(weight_base + H * K + sums_tile, d_w_f, mask=sums_mask)
    tl.store(weight_base + 2 * H * K + sums_tile, d_w_o, mask=sums_mask)
    tl.store(weight_base + 3 * H * K + sums_tile, d_w_g, mask=sums_mask)


def backward_programs(rows: int) -> int:
    """Programs of the backward kernel for ``rows`` rows: one a block of
    :data:`BACKWARD_BLOCK_ROWS`, at most :data:`MAX_PROGRAMS` (chosen by the size alone, so
    the sums do not depend on the device).

    >>> backward_programs(100), backward_programs(28_485)
    (7, 512)
    """
    return max(1, min(MAX_PROGRAMS, -(-rows // BACKWARD_BLOCK_ROWS)))


def step_rows_backward_triton(kernel_constants: tuple, p: float, columns: Tensor, grad: Tensor,
                              param: Tensor, d_param: Tensor, d_columns: Tensor
                              ) -> tuple[Tensor, ...]:
    """Gradients of :func:`~learned_optim.rule.triton_step.step_rows_triton_out`, without
    autograd; the contract of
    :func:`~learned_optim.rule.native_tape.step_rows_backward_native`: the gradients of the
    six step constants (``input_weight`` ``[2 + H, 4H]`` ... ``meta_bias``), then of
    ``columns``, ``grad`` and ``param``."""
    rows = grad.shape[0]
    hidden = kernel_constants[2].shape[1]
    gates, inputs = 4 * hidden, 2 + hidden
    d_param, d_columns = d_param.contiguous(), unit_rows(d_columns)
    d_state_in = torch.empty(2 * hidden + 2, rows, dtype=grad.dtype, device=grad.device)
    d_theta_in, d_grad = torch.empty_like(param), torch.empty_like(grad)
    programs = backward_programs(rows)
    width = partial_width(hidden)
    partials = torch.empty(programs, width, dtype=torch.float32, device=grad.device)
    _rule_step_backward[(programs,)](
        *kernel_constants, columns, grad, param, d_param, d_columns, d_state_in, d_theta_in,
        d_grad, partials, rows, columns.stride(0), d_columns.stride(0), d_state_in.stride(0),
        *rule_scalars(p), H=hidden, HP=hidden_lanes(hidden),
        KP=hidden_lanes(inputs), BLOCK=BACKWARD_BLOCK_ROWS, PARTIAL=width,
        num_warps=BACKWARD_WARPS, enable_fp_fusion=FP_FUSION)
    sums = partials.sum(0, dtype=torch.float64).float()
    d_bias, d_meta_h, d_small, d_weight = sums.split((gates, 2 * hidden, 6, gates * inputs))
    return (d_weight.view(gates, inputs).t(), d_bias, d_meta_h.view(2, hidden).t(),
            d_small[0:2], d_small[2:4], d_small[4:6], d_state_in, d_grad, d_theta_in)


class _TritonStep(torch.autograd.Function):
    """One step as one node: Triton forward, Triton recomputing backward."""

    @staticmethod
    def forward(ctx, p: float, columns, grad, param, *constant_tensors):
        return node_forward(ctx, step_rows_triton_out, p, columns, grad, param,
                            constant_tensors)

    @staticmethod
    def backward(ctx, d_param, d_columns):
        return node_backward(ctx, step_rows_backward_triton, d_param, d_columns)


def triton_tape_applies(grad: Tensor, hidden: int) -> bool:
    """Whether a tape step on ``grad``'s rows may take the Triton node: float32 on a device
    where both Triton kernels work (the step's,
    :func:`~learned_optim.rule.triton_step.triton_step_usable`, and the backward's, probed on
    first use; each warns once if not), hidden size within the kernels' bound.

    >>> triton_tape_applies(torch.ones(3), 20)  # a CPU tensor, outside Triton's interpreter
    False
    """
    return (triton_available() and grad.dtype == torch.float32 and hidden <= MAX_HIDDEN
            and triton_step_usable(grad.device) and _backward_usable(grad.device))


_usable: dict[str, bool] = {}  # per device, once probed


def _backward_usable(device: torch.device) -> bool:
    """Whether the backward kernel compiles on ``device`` and gets a probe right (warns once
    if not)."""
    return probed(_usable, device, _probe, "the Triton backward kernel",
                  "the tape takes the eager steps")


def _probe(device: torch.device) -> None:
    """The backward of a step of three coordinates at the paper's hidden size and zero
    weights: both meta-gates are 1/2, so d theta_t / d theta = 1/2 and d theta_t / d g =
    -1/2."""
    rows, hidden = 3, 20
    zeros = functools.partial(torch.zeros, device=device)
    laid_out = (zeros(4 * hidden, 2 + hidden), zeros(4 * hidden), zeros(2, hidden), zeros(6))
    *constant_grads, _, d_grad, d_theta = step_rows_backward_triton(
        laid_out, 10.0, zeros(2 * hidden + 2, rows), torch.ones(rows, device=device),
        zeros(rows), torch.ones(rows, device=device), zeros(2 * hidden + 2, rows))
    if not (torch.equal(d_theta.cpu(), torch.full((rows,), 0.5))
            and torch.equal(d_grad.cpu(), torch.full((rows,), -0.5))):
        raise RuntimeError(f"the probe's gradients were {d_theta.tolist()} and "
                           f"{d_grad.tolist()} (expected 0.5 and -0.5 each)")


def update_rows_triton(constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """:func:`~learned_optim.rule.math.update_rows` on the tape, as one Triton node.

    First or second order, as :func:`~learned_optim.rule.native_tape.update_rows_native`:
    returns ``(theta_t, state_t)``, ``state_t`` a ``[n, 2H + 2]`` transposed view of a
    feature-major tensor. The caller checks :func:`triton_tape_applies`.
    """
    columns = unit_rows(state.t())  # free when ``state`` is a previous step's output
    new_param, new_columns = _TritonStep.apply(constants.p, columns, grad.contiguous(),
                                               param.contiguous(), *constants[:-1])
    return new_param, new_columns.t()


def trajectory_step_triton(constants: StepConstants, state: Tensor, grad: Tensor,
                           param: Tensor) -> tuple[Tensor, Tensor]:
    """A first-order trajectory's step without autograd (its node records the tape): the step
    kernel out of place; ``(theta_t, state_t)``, ``state_t`` a ``[n, 2H + 2]`` transposed view
    of a feature-major tensor."""
    new_param, new_columns = step_rows_triton_out(native_constants(constants), constants.p,
                                                  unit_rows(state.t()), grad.contiguous(),
                                                  param.contiguous())
    return new_param, new_columns.t()


def replay_triton(constants: list[StepConstants], anchor_state: Tensor, anchor_param: Tensor,
                  grads: list[Tensor], d_param_out: Tensor | None, d_state_out: Tensor | None
                  ) -> tuple[Tensor, Tensor, list[tuple[Tensor, ...]]]:
    """A first-order trajectory's backward with the Triton kernels: the steps from the anchor
    replayed chunk by chunk of rows (states kept per step, as many rows at once as the
    device's replay budget holds), then pulled back step by step. Returns the gradients of
    the anchor's state (``[n, 2H + 2]``) and parameter, and per step those of its six
    constants."""
    rows, width = anchor_state.shape
    steps = len(constants)
    laid_out = [native_constants(c) for c in constants]
    p = constants[0].p
    chunk = policy.replay_chunk_rows(anchor_param.device, rows, steps, 4 * (width + 1))
    d_anchor_state = torch.empty(width, rows, dtype=anchor_param.dtype,
                                 device=anchor_param.device)
    d_anchor_param = torch.empty_like(anchor_param)
    d_constants: list[list[Tensor] | None] = [None] * steps
    for start in range(0, rows, chunk):
        piece = slice(start, min(start + chunk, rows))
        n = piece.stop - start
        columns = [anchor_state[piece].t().contiguous()]
        params = [anchor_param[piece].contiguous()]
        for t in range(steps):
            new_param, new_columns = step_rows_triton_out(laid_out[t], p, columns[t],
                                                          grads[t][piece], params[t])
            columns.append(new_columns)
            params.append(new_param)
        d_param = (torch.zeros(n, dtype=anchor_param.dtype, device=anchor_param.device)
                   if d_param_out is None else d_param_out[piece])
        d_state = (torch.zeros_like(columns[0]) if d_state_out is None
                   else d_state_out[piece].t())
        for t in reversed(range(steps)):
            *constant_grads, d_state, _, d_param = step_rows_backward_triton(
                laid_out[t], p, columns[t], grads[t][piece], params[t], d_param, d_state)
            if d_constants[t] is None:
                d_constants[t] = constant_grads
            else:
                d_constants[t] = [a + b for a, b in zip(d_constants[t], constant_grads)]
        d_anchor_state[:, piece] = d_state
        d_anchor_param[piece] = d_param
    return d_anchor_state.t(), d_anchor_param, [tuple(c) for c in d_constants]
