"""The update rule's math: pure forward and per-row backward kernels, no autograd decisions.

Per step and coordinate (``theta`` a learner parameter, ``g`` its gradient, ``L`` the loss)::

    x_t     = [pre(g_t), pre(L_t)]                                   4 inputs, p = 10
    h1, c1  = LSTMCell(x_t, (h1, c1))                                layer 1, hidden 20
    f_pre_t = W_F . [h1_t, theta_{t-1}, f_pre_{t-1}] + b_F           layer 2 (meta cell)
    i_pre_t = W_I . [h1_t, theta_{t-1}, i_pre_{t-1}] + b_I
    theta_t = sigmoid(f_pre_t) * theta_{t-1} - sigmoid(i_pre_t) * g_t

where ``pre`` is the preprocessing of Andrychowicz et al. (2016, appendix A). The update uses
the raw gradient; only the gate inputs are preprocessed.

:func:`prepare_step` folds what a step shares across coordinates into :class:`StepConstants`;
:func:`update_rows` applies the rule to any slice of rows (out of place, or into preallocated
buffers); :func:`rows_backward` is its hand-written derivative for rows whose forward
intermediates are in a :func:`row_scratch`. Which of these runs on an autograd tape is decided
in :mod:`learned_optim.rule.tape`, and every chunk size in :mod:`learned_optim.rule.policy`.

Derivatives, per row (``sigma' = s (1 - s)``, gates in the fused order i, f, o, g)::

    d pre   = d pre_out + [d theta_t * theta, -d theta_t * g] * sigma'(pre)
    d h1    = d h1_out + d pre . M_h^T
    d c1    = d c1_out + d h1 * o * (1 - tanh(c1)^2)
    d z     = [d c1 * g~ * i', d c1 * c1_prev * f', d h1 * tanh(c1) * o', d c1 * i * (1 - g~^2) / 2]
    d x     = d z . W^T                (x = [pre(g), h1_prev])
    d theta = d theta_t * F + d pre . m_theta,     d g = -d theta_t * I + d pre(g) . pre'(g)

Both tanh are computed as ``tanh(x) = 2 sigmoid(2x) - 1`` (the same value to rounding): on the
CPU torch's sigmoid is vectorised and its tanh is several times slower
(``benchmarks/rule_kernels.py``, docs/results/rule_kernels.md). For the cell gate the factor 2
is folded into the step constants (the g columns of the layer-1 weights and bias are doubled),
so one sigmoid covers all four gates; ``z`` above is then the doubled pre-activation, hence
the ``/ 2``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from learned_optim.rule import policy

__all__ = [
    "MetaWeights",
    "Normalisation",
    "RuleConstants",
    "StepConstants",
    "ConstantGrads",
    "apply_group_options",
    "fold_loss",
    "initial_state",
    "normalisation",
    "prepare_rule",
    "prepare_step",
    "preprocess",
    "preprocess_backward",
    "row_scratch",
    "rows_backward",
    "scale_gradient",
    "state_width",
    "update_rows",
    "update_rows_chunked",
]


class MetaWeights(NamedTuple):
    """The meta-learner's weights as plain tensors (a view for the pure functions).

    ``weight_ih`` [4H, 4] (columns: gradient features, loss features), ``weight_hh`` [4H, H],
    ``bias`` [4H] (PyTorch's gate order i, f, g, o), ``meta_weight`` [2, H + 2] (rows: forget,
    input; columns: h1, theta, previous pre-activation), ``meta_bias`` [2], and the
    preprocessing constant ``p``.
    """

    weight_ih: Tensor
    weight_hh: Tensor
    bias: Tensor
    meta_weight: Tensor
    meta_bias: Tensor
    p: float


class StepConstants(NamedTuple):
    """What one step shares across coordinates, computed once by :func:`prepare_step`."""

    input_weight: Tensor  # [2 + H, 4H]: gradient features and h1 -> gates (i, f, o, 2 g)
    gate_bias: Tensor  # [4H]: bias plus the loss features' contribution, gates (i, f, o, 2 g)
    meta_weight_h: Tensor  # [H, 2]: h1 -> (f_pre, i_pre)
    meta_weight_theta: Tensor  # [2]
    meta_weight_prev: Tensor  # [2]
    meta_bias: Tensor  # [2]
    p: float


def state_width(hidden_size: int) -> int:
    """Floats of state per coordinate: h1 and c1 (``hidden_size`` each), f_pre and i_pre."""
    return 2 * hidden_size + 2


def initial_state(rows: int, hidden_size: int, *, dtype=None, device=None,
                  feature_major: bool = False) -> Tensor:
    """The state of a new task: zeros, laid out as ``[h1 | c1 | f_pre | i_pre]`` per row.

    ``feature_major``: the same ``[rows, 2H + 2]`` shape as a transposed view of a contiguous
    ``[2H + 2, rows]`` tensor (each feature contiguous over the rows), the layout of the
    in-place optimizer's state buffers.

    >>> initial_state(3, 20).stride(), initial_state(3, 20, feature_major=True).stride()
    ((42, 1), (1, 3))
    """
    width = state_width(hidden_size)
    if feature_major:
        return torch.zeros(width, rows, dtype=dtype, device=device).t()
    return torch.zeros(rows, width, dtype=dtype, device=device)


def _preprocess_parts(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The two features of :func:`preprocess`, as separate tensors shaped like ``x``."""
    threshold = math.exp(-p)
    magnitude = x.abs()
    large = magnitude >= threshold
    log_part = torch.where(large, magnitude.clamp_min(threshold).log() / p, -1.0)
    sign_part = torch.where(large, x.sign(), x * math.exp(p))
    return log_part, sign_part


def preprocess(x: Tensor, p: float) -> Tensor:
    """Andrychowicz et al.'s input preprocessing, one value -> two features.

    ``(log|x| / p, sign x)`` if ``|x| >= e^-p``, else ``(-1, e^p x)``. The logarithm's argument
    is clamped so that neither branch produces ``-inf`` or a NaN gradient.

    >>> preprocess(torch.tensor([1.0, -0.5, 0.0]), p=10.0)
    tensor([[ 0.0000,  1.0000],
            [-0.0693, -1.0000],
            [-1.0000,  0.0000]])
    """
    return torch.stack(_preprocess_parts(x, p), dim=-1)


class RuleConstants(NamedTuple):
    """A rule's per-step constants before the loss is known (:func:`prepare_rule`)."""

    step: StepConstants  # gate_bias without the loss features' contribution
    loss_weight: Tensor  # [4H, 2]: the two loss features -> gates (i, f, o, 2 g)


def prepare_rule(weights: MetaWeights, dtype: torch.dtype,
                 device: torch.device | None = None) -> RuleConstants:
    """Everything of :func:`prepare_step` that depends on the rule's weights alone.

    The loss is the same for every coordinate, so its two input features enter layer 1 as a
    bias (:func:`fold_loss`); the gradient features and h1 share one fused matrix product. The
    gate columns of that product are reordered to (i, f, o, g), so the three sigmoid gates are
    adjacent, and the g columns are doubled: ``tanh(g) = 2 sigmoid(2 g) - 1`` then comes from
    the same sigmoid as the other gates. A shell whose rule does not change between steps
    (the drop-in ``step()``) keeps this and folds each step's loss in alone.

    >>> from learned_optim import MetaLearnerLSTM
    >>> rule = prepare_rule(MetaLearnerLSTM().weights(), torch.float32)
    >>> rule.step.input_weight.shape, rule.loss_weight.shape
    (torch.Size([22, 80]), torch.Size([80, 2]))
    """
    hidden = weights.weight_hh.shape[1]

    def cast(tensor: Tensor) -> Tensor:  # differentiable: meta-gradients flow back through it
        return tensor.to(dtype=dtype, device=device)

    def sigmoid_gates_first(rows: Tensor) -> Tensor:  # PyTorch's (i, f, g, o) -> (i, f, o, 2g)
        g = rows[2 * hidden : 3 * hidden]
        # g + g, exactly 2 g: a product by 2 would save its scalar for the backward, and the
        # twin's steps share these constants through backward passes that free what they read
        return torch.cat((rows[: 2 * hidden], rows[3 * hidden :], g + g))

    weight_ih = cast(weights.weight_ih)
    input_weight = torch.cat((weight_ih[:, :2], cast(weights.weight_hh)), dim=1)
    meta_weight = cast(weights.meta_weight)
    step = StepConstants(
        input_weight=sigmoid_gates_first(input_weight).t(),
        gate_bias=sigmoid_gates_first(cast(weights.bias)),
        meta_weight_h=meta_weight[:, :hidden].t(),
        meta_weight_theta=meta_weight[:, hidden],
        meta_weight_prev=meta_weight[:, hidden + 1],
        meta_bias=cast(weights.meta_bias),
        p=weights.p,
    )
    return RuleConstants(step, sigmoid_gates_first(weight_ih[:, 2:]))


def fold_loss(rule: RuleConstants, loss: Tensor | None) -> StepConstants:
    """:func:`prepare_rule`'s constants with the loss's two features folded into the gate
    bias: the step's :class:`StepConstants`.

    ``loss=None`` means "no loss input": both loss features are zero, a pair that no real loss
    produces (``log|L| / p = 0`` needs ``|L| = 1``, whose sign feature is 1). Rules meta-trained
    with the loss sometimes withheld (``MetaLearnerLSTM(optional_loss=True)``) read it as such.

    >>> from learned_optim import MetaLearnerLSTM
    >>> rule = prepare_rule(MetaLearnerLSTM().weights(), torch.float32)
    >>> fold_loss(rule, None) is rule.step
    True
    """
    if loss is None:
        return rule.step
    weight = rule.loss_weight
    features = preprocess(loss.reshape(()).to(dtype=weight.dtype, device=weight.device),
                          rule.step.p)
    return rule.step._replace(gate_bias=rule.step.gate_bias + weight @ features)


def prepare_step(
    weights: MetaWeights, loss: Tensor | None, dtype: torch.dtype,
    device: torch.device | None = None,
) -> StepConstants:
    """Fold everything that does not depend on the coordinate into per-step constants:
    :func:`prepare_rule`, then :func:`fold_loss` (see both).

    >>> from learned_optim import MetaLearnerLSTM
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(2.3), torch.float32)
    >>> constants.input_weight.shape, constants.gate_bias.shape
    (torch.Size([22, 80]), torch.Size([80]))
    """
    return fold_loss(prepare_rule(weights, dtype, device), loss)


def _tanh_from_sigmoid(sigmoid_of_double: Tensor, out: Tensor | None) -> Tensor:
    """``tanh(x) = 2 sigmoid(2x) - 1`` from ``sigmoid(2x)``, contiguous (into ``out`` if given,
    else on the autograd tape)."""
    if out is None:
        return sigmoid_of_double * 2 - 1
    return torch.mul(sigmoid_of_double, 2, out=out).sub_(1)


def _tanh(x: Tensor, out: Tensor | None) -> Tensor:
    """``tanh(x)`` as ``2 sigmoid(2x) - 1`` (module doc), into ``out`` if given."""
    if out is None:
        return torch.sigmoid(x * 2) * 2 - 1
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


def row_scratch(
    rows: int, hidden_size: int, *, dtype=None, device=None
) -> dict[str, Tensor]:
    """Preallocated temporaries for :func:`update_rows` on up to ``rows`` rows (no autograd).

    A chunked loop that passes the same scratch to every call allocates nothing per chunk
    (fresh multi-megabyte temporaries per chunk make the allocator return and re-fault pages).
    Each buffer is ``[rows, width]``; a feature-major call on ``n <= rows`` rows reads the
    first ``n * width`` floats of it as ``[width, n]`` (:func:`_scratch_view`).
    """
    widths = {
        "layer1_input": hidden_size + 2,
        "gates": 4 * hidden_size,
        "cell_gate": hidden_size,
        "c1": hidden_size,
        "tanh_c1": hidden_size,  # kept apart from h1: the hand-written backward reads both
        "h1": hidden_size,
    }
    return {name: torch.empty(rows, width, dtype=dtype, device=device)
            for name, width in widths.items()}


def _scratch_view(buffer: Tensor, rows: int, feature_major: bool) -> Tensor:
    """The first ``rows`` rows of a :func:`row_scratch` buffer: ``[rows, width]``, or its
    first ``rows * width`` floats as a contiguous ``[width, rows]`` when ``feature_major``."""
    if not feature_major:
        return buffer[:rows]
    width = buffer.shape[1]
    return buffer.view(-1)[: width * rows].view(width, rows)


def update_rows(
    constants: StepConstants,
    state: Tensor,
    grad: Tensor,
    param: Tensor,
    *,
    out: Tensor | None = None,
    scratch: dict[str, Tensor] | None = None,
    feature_major: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply the update rule to a batch of coordinates (rows are independent).

    Parameters
    ----------
    constants:
        From :func:`prepare_step`.
    state:
        ``[n, 2H + 2]`` rows ``[h1 | c1 | f_pre | i_pre]``.
    grad, param:
        ``[n]`` raw gradient and current value theta_{t-1} of each coordinate.
    out:
        Optional ``[n, 2H + 2]`` tensor (it may be ``state`` itself) that receives the next
        state, without autograd; by default a new tensor is returned.
    scratch:
        Optional temporaries from :func:`row_scratch` for at least ``n`` rows, without
        autograd; by default temporaries are allocated.
    feature_major:
        Lay every per-coordinate tensor out transposed: ``state`` and ``out`` are
        ``[2H + 2, n]`` (one column per coordinate), and so are the intermediates in
        ``scratch``. The same numbers; every gate block is then a contiguous ``[H, n]`` slab,
        so the elementwise passes run over contiguous memory where ``[n, H]`` column slices are
        strided (one CPU thread: forward and backward 1.2-1.5x as fast at 2,200-28,485 rows).
        A chunk loop that keeps its rows feature-major across several steps gains (the
        first-order replay); transposing the state in and out at every call costs about what
        it saves (docs/results/rule_layout.md).
    Returns
    -------
    (new_param, new_state): theta_t ``[n]`` and the next state ``[n, 2H + 2]`` (``[2H + 2, n]``
    if ``feature_major``). Out of place
    (unless ``out`` or ``scratch`` is given), so autograd can record it op by op; the tape's
    cheaper recomputing node is :func:`learned_optim.rule.tape.update_rows_differentiable`.
    """
    hidden = constants.meta_weight_h.shape[0]
    rows = grad.shape[0]
    features = 0 if feature_major else 1  # the dimension that indexes a coordinate's features

    def buffer(name: str) -> Tensor | None:  # ``out=None`` allocates, as without ``out``
        return None if scratch is None else _scratch_view(scratch[name], rows, feature_major)

    h1, c1, previous = state.split((hidden, hidden, 2), dim=features)
    # Layer 1: one fused product over [gradient features | h1]; gate columns (i, f, o, g).
    log_part, sign_part = _preprocess_parts(grad, constants.p)
    layer1_input = torch.cat((log_part.unsqueeze(features), sign_part.unsqueeze(features), h1),
                             dim=features, out=buffer("layer1_input"))
    if feature_major:  # [4H, 2 + H] x [2 + H, n], then the bias: addmm would first copy the
        # bias broadcast along n into the output, a strided pass slower than the product itself
        # (9.6 ms against 7.4 ms at 28,485 rows, one thread); compiled, the add fuses with the
        # sigmoid below.
        gates = torch.mm(constants.input_weight.t(), layer1_input, out=buffer("gates"))
        gates = gates.add_(constants.gate_bias.unsqueeze(1))
    else:  # [n, 2 + H] x [2 + H, 4H]
        gates = torch.addmm(constants.gate_bias, layer1_input, constants.input_weight,
                            out=buffer("gates"))
    # One sigmoid over the whole product, in place (addmm saves nothing for backward), then
    # tanh(g) = 2 sigmoid(2g) - 1 into a contiguous block (the g columns are doubled by
    # prepare_step): elementwise kernels vectorise only over contiguous runs, and torch's
    # sigmoid is much faster than its tanh on the CPU.
    gates = gates.sigmoid_()
    cell_gate = _tanh_from_sigmoid(gates.narrow(features, 3 * hidden, hidden),
                                   out=buffer("cell_gate"))
    in_gate, forget_gate, out_gate = gates.narrow(features, 0, 3 * hidden).split(
        hidden, dim=features)
    # Feature-major, the new h1 and c1 are contiguous slabs of ``out``: computed in place
    # there (``state``'s h1 is already copied into the layer-1 input, and c1 is read at the
    # index it is written, so ``out`` may still be ``state``).
    direct = feature_major and out is not None
    c1 = torch.mul(forget_gate, c1, out=out[hidden: 2 * hidden] if direct else buffer("c1"))
    c1 = c1.addcmul_(in_gate, cell_gate) if direct else torch.addcmul(
        c1, in_gate, cell_gate, out=buffer("c1"))
    h1 = torch.mul(out_gate, _tanh(c1, out=buffer("tanh_c1")),
                   out=out[:hidden] if direct else buffer("h1"))
    # Layer 2, both gates at once, transposed: rows (f_pre, i_pre) of [2, n], so that the
    # product has a long output dimension and every later operand is contiguous.
    h1_columns, previous_columns = (h1, previous) if feature_major else (h1.t(), previous.t())
    gate_pre = torch.addmm(constants.meta_bias.unsqueeze(1), constants.meta_weight_h.t(),
                           h1_columns)
    gate_pre = gate_pre.addcmul_(param.unsqueeze(0), constants.meta_weight_theta.unsqueeze(1))
    gate_pre = gate_pre.addcmul_(previous_columns, constants.meta_weight_prev.unsqueeze(1))
    # Indexed, not unbind(): torch.compile (2.13, CPU inductor) differentiates the outputs of
    # unbind() of a sigmoid wrongly (tests/test_rule_compiled.py); the same values in eager.
    forget_lr = gate_pre.sigmoid()
    forget, learning_rate = forget_lr[0], forget_lr[1]
    # theta_t = f_t theta_{t-1} - i_t g_t
    new_param = torch.addcmul(forget * param, learning_rate, grad, value=-1)
    if direct:
        out[2 * hidden:] = gate_pre
        return new_param, out
    return new_param, torch.cat((h1, c1, gate_pre if feature_major else gate_pre.t()),
                                dim=features, out=out)


def update_rows_chunked(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
) -> tuple[Tensor, Tensor]:
    """``update_rows`` without autograd, chunk by chunk of rows through one reused scratch.

    The same numbers (to rounding) in new tensors, about 1.8x faster on a CPU at 28k rows than
    one call over all rows (whose multi-megabyte temporaries fall out of cache). The autograd
    nodes of the tape run their forward with it.

    >>> from learned_optim import MetaLearnerLSTM
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> state, grad, theta = initial_state(3, 20), torch.ones(3), torch.zeros(3)
    >>> chunked = update_rows_chunked(constants, state, grad, theta)
    >>> all(torch.equal(a, b) for a, b in zip(chunked, update_rows(constants, state, grad, theta)))
    True
    """
    rows = grad.shape[0]
    new_state = torch.empty_like(state, memory_format=torch.contiguous_format)
    new_param = torch.empty_like(param, memory_format=torch.contiguous_format)
    chunk = max(1, min(rows, policy.forward_chunk_rows(state.device)))
    scratch = row_scratch(chunk, constants.meta_weight_h.shape[0], dtype=state.dtype,
                          device=state.device)
    with torch.no_grad(), policy.threads_for_chunk_loop(state.device, rows):
        for start in range(0, rows, chunk):
            piece = slice(start, start + chunk)
            new_param[piece], _ = update_rows(constants, state[piece], grad[piece],
                                              param[piece], out=new_state[piece],
                                              scratch=scratch)
    return new_param, new_state


def apply_group_options(
    param: Tensor, rule_param: Tensor, lr: float = 1.0, weight_decay: float = 0.0
) -> Tensor:
    """Scale the rule's update by ``lr`` and add decoupled weight decay (per param group).

    ``theta_t = theta_{t-1} + lr * (rule(theta_{t-1}) - theta_{t-1}) - lr * weight_decay *
    theta_{t-1}``: ``lr`` multiplies the learned update (as a scheduler expects) and the decay
    is decoupled from it, as in AdamW. ``lr = 1, weight_decay = 0`` returns ``rule_param``
    itself, so the paper's rule stays bit-exact. Out of place (differentiable).

    >>> theta, proposed = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -1.0])
    >>> apply_group_options(theta, proposed, lr=0.5)
    tensor([ 0.7500, -1.5000])
    >>> apply_group_options(theta, proposed, lr=1.0, weight_decay=0.1)
    tensor([ 0.4000, -0.8000])
    """
    if lr == 1.0 and weight_decay == 0.0:
        return rule_param
    new_param = torch.lerp(param, rule_param, lr) if lr != 1.0 else rule_param
    if weight_decay != 0.0:
        new_param = new_param - (lr * weight_decay) * param
    return new_param


def scale_gradient(
    grad: Tensor, moments: Tensor | None, step: int, momentum: float, rms_decay: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The normalised gradient a rule with ``gradient_scale`` reads and applies instead of ``g``.

    Adam's direction, in units of each coordinate's own recent gradient size::

        m_t = momentum m_{t-1} + (1 - momentum) g_t
        v_t = rms_decay v_{t-1} + (1 - rms_decay) g_t^2
        g~_t = scale * (m_t / (1 - momentum^t)) / (sqrt(v_t / (1 - rms_decay^t)) + 1e-12)

    The input gate (at most 1) then bounds a step at ``scale`` instead of at one raw gradient,
    which for small gradients is far below what a fresh model needs. ``moments`` stacks
    ``(m, v)`` as ``[2, *grad.shape]`` (``None``: zeros); ``step`` is ``t`` (from 1).
    Returns ``(g~_t, moments_t)``; out of place.

    >>> scaled, moments = scale_gradient(torch.tensor([4.0, -0.001]), None, 1, 0.9, 0.99, 0.1)
    >>> scaled, moments.shape
    (tensor([ 0.1000, -0.1000]), torch.Size([2, 2]))
    """
    if moments is None:
        moments = torch.zeros((2, *grad.shape), dtype=grad.dtype, device=grad.device)
    n = normalisation(moments, step, momentum, rms_decay, scale)
    mean = torch.lerp(moments[0], grad, n.mean_weight)
    square = torch.lerp(moments[1], grad * grad, n.square_weight)
    rms = (square / n.square_debias).sqrt()
    scaled = mean * n.mean_scale / (rms + 1e-12)
    return scaled, torch.stack((mean, square))


class Normalisation(NamedTuple):
    """One parameter's :func:`scale_gradient` at one step, for the fused step kernels, which
    update ``moments`` (``[2, *shape]``: m, then v) in place: the lerp weights of m and v, m's
    factor ``scale / (1 - momentum^t)`` and v's bias correction ``1 - rms_decay^t``."""

    moments: Tensor
    mean_weight: float
    square_weight: float
    mean_scale: float
    square_debias: float


def normalisation(moments: Tensor, step: int, momentum: float, rms_decay: float,
                  scale: float) -> Normalisation:
    """:func:`scale_gradient`'s numbers at ``step`` (from 1), computed once for its eager form
    and the fused kernels alike.

    >>> normalisation(torch.zeros(2, 3), 1, 0.9, 0.99, 0.1)[1:]
    (0.09999999999999998, 0.010000000000000009, 1.0000000000000002, 0.010000000000000009)
    """
    return Normalisation(moments, 1.0 - momentum, 1.0 - rms_decay,
                         scale / (1.0 - momentum**step), 1.0 - rms_decay**step)


class ConstantGrads:
    """Gradients of one step's :class:`StepConstants`: sums over rows, added chunk by chunk."""

    def __init__(self, constants: StepConstants) -> None:
        self.hidden = constants.meta_weight_h.shape[0]
        self.input_weight = torch.zeros_like(constants.input_weight)
        self.gate_bias = torch.zeros_like(constants.gate_bias)
        self.meta_h = torch.zeros_like(constants.meta_weight_h)
        self.meta_small = constants.meta_bias.new_zeros(3, 2)  # rows: theta, previous, bias

    def add(self, scratch, n, state, param, dz, d_pre, h1, feature_major=False) -> None:
        """Add one chunk of ``n`` rows: its inputs, ``dz``, ``d_pre`` and h1 from
        :func:`rows_backward`, and the layer-1 input its forward left in ``scratch`` (all laid
        out as the forward ran: ``[features, n]`` if ``feature_major``)."""
        layer1_input = _scratch_view(scratch["layer1_input"], n, feature_major)
        if feature_major:
            self.input_weight.addmm_(layer1_input, dz.t())
            self.meta_h.addmm_(h1, d_pre.t())
            self.meta_small[0].add_(d_pre @ param)
        else:
            self.input_weight.addmm_(layer1_input.t(), dz)
            self.meta_h.addmm_(h1.t(), d_pre)
            self.meta_small[0].add_(param @ d_pre)
        row_dim = 1 if feature_major else 0  # sums over the chunk's rows
        self.gate_bias.add_(dz.sum(dim=row_dim))
        previous = state.narrow(1 - row_dim, 2 * self.hidden, 2)
        self.meta_small[1].add_((previous * d_pre).sum(dim=row_dim))
        self.meta_small[2].add_(d_pre.sum(dim=row_dim))

    def result(self, needs) -> list[Tensor | None]:
        """The six gradients in :class:`StepConstants` order, ``None`` where not needed."""
        grads = (self.input_weight, self.gate_bias, self.meta_h, *self.meta_small)
        return [g if need else None for g, need in zip(grads, needs)]


def rows_backward(constants, hidden, scratch, n, state, grad, param, new_state, d_param_out,
                   d_state_out, needs, feature_major=False):
    """The derivatives of :func:`update_rows` for ``n`` rows whose forward intermediates are
    in ``scratch`` (the forward ran with ``scratch`` and wrote ``new_state``).

    ``needs`` says which of (state, grad, param) want a gradient; the others come back as
    ``None`` without being computed (first order never needs the gradient's, the first step
    never the state's). The gate derivatives ``dz`` and ``d_pre`` are always returned: the
    meta-learner's weights need them (:meth:`ConstantGrads.add`, with the new h1, a view of
    ``new_state``). ``feature_major`` as in the forward: ``state``, ``new_state``,
    ``d_state_out``, the returned state gradient, ``dz``, ``d_pre`` and h1 are then
    ``[features, n]``.
    """
    needs_state, needs_grad, needs_param = needs
    features = 0 if feature_major else 1

    def saved(name: str) -> Tensor:
        return _scratch_view(scratch[name], n, feature_major)

    gates = saved("gates")  # sigmoid applied; blocks i, f, o (the g block is unused)
    in_gate, forget_gate, out_gate = gates.narrow(features, 0, 3 * hidden).split(
        hidden, dim=features)
    cell_gate = saved("cell_gate")  # tanh(g)
    tanh_c1 = saved("tanh_c1")
    c1_prev = state.narrow(features, hidden, hidden)
    gate_pre = new_state.narrow(features, 2 * hidden, 2)  # f_pre, i_pre of the learner's update
    forget_lr = gate_pre.sigmoid()

    # Layer 2: theta_t = F theta - I g, with (F, I) = sigmoid(pre).
    d_pre = (torch.zeros_like(gate_pre) if d_state_out is None
             else d_state_out.narrow(features, 2 * hidden, 2))
    if d_param_out is not None:
        d_gates2 = torch.stack((d_param_out * param, -d_param_out * grad), dim=features)
        d_pre = torch.addcmul(d_pre, d_gates2, forget_lr * (1 - forget_lr))
    d_h1_out = None if d_state_out is None else d_state_out.narrow(features, 0, hidden)
    if feature_major:  # [H, 2] x [2, n]
        d_h1 = (constants.meta_weight_h @ d_pre if d_h1_out is None
                else torch.addmm(d_h1_out, constants.meta_weight_h, d_pre))
    else:  # [n, 2] x [2, H]
        d_h1 = (d_pre @ constants.meta_weight_h.t() if d_h1_out is None
                else torch.addmm(d_h1_out, d_pre, constants.meta_weight_h.t()))

    # Layer 1: h1 = o tanh(c1), c1 = f c1_prev + i g~.
    d_c1 = (d_h1 * out_gate).mul_(1 - tanh_c1 * tanh_c1)
    if d_state_out is not None:
        d_c1 += d_state_out.narrow(features, hidden, hidden)
    dz = torch.empty(gates.shape, dtype=state.dtype, device=state.device)
    dz_i, dz_f, dz_o, dz_g = dz.split(hidden, dim=features)
    torch.mul(d_c1, cell_gate, out=dz_i)
    torch.mul(d_c1, c1_prev, out=dz_f)
    torch.mul(d_h1, tanh_c1, out=dz_o)
    # sigmoid' = s (1 - s) on the three sigmoid blocks at once, tanh' = 1 - g~^2 on the last.
    sig = gates.narrow(features, 0, 3 * hidden)
    dz.narrow(features, 0, 3 * hidden).mul_(sig - sig * sig)
    # The g columns are doubled (prepare_step): d/dz of tanh(z / 2) is (1 - g~^2) / 2.
    torch.mul(d_c1, in_gate, out=dz_g).mul_(0.5 - 0.5 * cell_gate * cell_gate)

    d_state_rows = d_grad_rows = d_param_rows = None
    if needs_state or needs_grad:  # [2 + H] features of each row
        d_layer1_input = (constants.input_weight @ dz if feature_major
                          else dz @ constants.input_weight.t())
    if needs_state:
        meta_weight_prev = (constants.meta_weight_prev.unsqueeze(1) if feature_major
                            else constants.meta_weight_prev)
        d_state_rows = torch.cat((d_layer1_input.narrow(features, 2, hidden),
                                  d_c1 * forget_gate, d_pre * meta_weight_prev), dim=features)
    forget, learning_rate = forget_lr.unbind(dim=features)
    if needs_param:
        d_param_rows = (constants.meta_weight_theta @ d_pre if feature_major
                        else d_pre @ constants.meta_weight_theta)
        if d_param_out is not None:
            d_param_rows.addcmul_(d_param_out, forget)
    if needs_grad:
        d_grad_rows = preprocess_backward(grad, constants.p,
                                          d_layer1_input.select(features, 0),
                                          d_layer1_input.select(features, 1))
        if d_param_out is not None:
            d_grad_rows.addcmul_(d_param_out, learning_rate, value=-1)
    h1 = new_state.narrow(features, 0, hidden)
    return d_state_rows, d_grad_rows, d_param_rows, dz, d_pre, h1


def preprocess_backward(x: Tensor, p: float, d_log: Tensor, d_sign: Tensor) -> Tensor:
    """Gradient through ``preprocess``: (log|x|/p)' = 1/(p x) and sign' = 0 when
    ``|x| >= e^-p``; otherwise the features are (-1, e^p x), with derivatives (0, e^p)."""
    large = x.abs() >= math.exp(-p)
    safe = torch.where(large, x, 1.0)
    return torch.where(large, d_log / (p * safe), d_sign * math.exp(p))
