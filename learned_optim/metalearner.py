"""The coordinate-wise meta-learner LSTM of Ravi & Larochelle (2017) and its update rule.

Every scalar parameter of the learner is one row of a batch; all rows share the meta-learner's
weights, so one meta-learner serves a model of any size or shape.

Per step and coordinate (``theta`` a learner parameter, ``g`` its gradient, ``L`` the loss)::

    x_t     = [pre(g_t), pre(L_t)]                                   4 inputs, p = 10
    h1, c1  = LSTMCell(x_t, (h1, c1))                                layer 1, hidden 20
    f_pre_t = W_F . [h1_t, theta_{t-1}, f_pre_{t-1}] + b_F           layer 2 (meta cell)
    i_pre_t = W_I . [h1_t, theta_{t-1}, i_pre_{t-1}] + b_I
    theta_t = sigmoid(f_pre_t) * theta_{t-1} - sigmoid(i_pre_t) * g_t

where ``pre`` is the preprocessing of Andrychowicz et al. (2016, appendix A). The update uses
the raw gradient; only the gate inputs are preprocessed.

The math lives in two pure functions, :func:`prepare_step` (per step, independent of the
coordinates) and :func:`update_rows` (per coordinate, any slice of rows), joined by
:func:`meta_update`. Both optimizer shells call exactly these.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "MetaLearnerLSTM",
    "MetaWeights",
    "StepConstants",
    "meta_update",
    "prepare_step",
    "preprocess",
    "update_rows",
    "update_rows_chunked",
    "apply_group_options",
    "scale_gradient",
    "initial_state",
    "row_scratch",
    "state_width",
    "chunk_rows",
    "ACCELERATOR_CHUNK_ROWS",
    "rule_fingerprint",
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

    input_weight: Tensor  # [2 + H, 4H]: gradient features and h1 -> gates (i, f, o, g)
    gate_bias: Tensor  # [4H]: bias plus the loss features' contribution, gates (i, f, o, g)
    meta_weight_h: Tensor  # [H, 2]: h1 -> (f_pre, i_pre)
    meta_weight_theta: Tensor  # [2]
    meta_weight_prev: Tensor  # [2]
    meta_bias: Tensor  # [2]
    p: float


def state_width(hidden_size: int) -> int:
    """Floats of state per coordinate: h1 and c1 (``hidden_size`` each), f_pre and i_pre."""
    return 2 * hidden_size + 2


def initial_state(rows: int, hidden_size: int, *, dtype=None, device=None) -> Tensor:
    """The state of a new task: zeros, laid out as ``[h1 | c1 | f_pre | i_pre]`` per row."""
    return torch.zeros(rows, state_width(hidden_size), dtype=dtype, device=device)


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


def prepare_step(
    weights: MetaWeights, loss: Tensor | None, dtype: torch.dtype,
    device: torch.device | None = None,
) -> StepConstants:
    """Fold everything that does not depend on the coordinate into per-step constants.

    The loss is the same for every coordinate, so its two input features enter layer 1 as a
    bias; the gradient features and h1 share one fused matrix product. The gate columns of
    that product are reordered to (i, f, o, g), so the three sigmoid gates are adjacent.

    ``loss=None`` means "no loss input": both loss features are zero, a pair that no real loss
    produces (``log|L| / p = 0`` needs ``|L| = 1``, whose sign feature is 1). Rules meta-trained
    with the loss sometimes withheld (``MetaLearnerLSTM(optional_loss=True)``) read it as such.
    """
    hidden = weights.weight_hh.shape[1]

    def cast(tensor: Tensor) -> Tensor:  # differentiable: meta-gradients flow back through it
        return tensor.to(dtype=dtype, device=device)

    def sigmoid_gates_first(rows: Tensor) -> Tensor:  # PyTorch's (i, f, g, o) -> (i, f, o, g)
        return torch.cat((rows[: 2 * hidden], rows[3 * hidden :], rows[2 * hidden : 3 * hidden]))

    weight_ih = cast(weights.weight_ih)
    if loss is None:
        gate_bias = cast(weights.bias)
    else:
        loss_features = preprocess(cast(loss.reshape(())), weights.p)
        gate_bias = cast(weights.bias) + weight_ih[:, 2:] @ loss_features
    input_weight = torch.cat((weight_ih[:, :2], cast(weights.weight_hh)), dim=1)
    meta_weight = cast(weights.meta_weight)
    return StepConstants(
        input_weight=sigmoid_gates_first(input_weight).t(),
        gate_bias=sigmoid_gates_first(gate_bias),
        meta_weight_h=meta_weight[:, :hidden].t(),
        meta_weight_theta=meta_weight[:, hidden],
        meta_weight_prev=meta_weight[:, hidden + 1],
        meta_bias=cast(weights.meta_bias),
        p=weights.p,
    )


def _contiguous(tensor: Tensor, out: Tensor | None) -> Tensor:
    """A contiguous copy of ``tensor`` (into ``out`` if given), on the autograd tape if not."""
    return tensor.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(tensor)


def row_scratch(
    rows: int, hidden_size: int, *, dtype=None, device=None
) -> dict[str, Tensor]:
    """Preallocated temporaries for :func:`update_rows` on up to ``rows`` rows (no autograd).

    A chunked loop that passes the same scratch to every call allocates nothing per chunk
    (fresh multi-megabyte temporaries per chunk make the allocator return and re-fault pages).
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


def update_rows(
    constants: StepConstants,
    state: Tensor,
    grad: Tensor,
    param: Tensor,
    *,
    out: Tensor | None = None,
    scratch: dict[str, Tensor] | None = None,
    recompute: bool = True,
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
    recompute:
        On an autograd tape (grad mode on, some input requiring grad, no ``out``/``scratch``):
        record the step as one node that saves only its inputs and recomputes the rest in a
        hand-written backward (:mod:`learned_optim.rule_backward`, about 5x less tape memory
        and a faster backward); ``False`` records every operation instead. Same gradients.

    Returns
    -------
    (new_param, new_state): theta_t ``[n]`` and the next state ``[n, 2H + 2]``. Out of place
    (unless ``out`` or ``scratch`` is given), so it can run on an autograd tape.
    """
    if recompute and out is None and scratch is None and _on_tape(constants, state, grad, param):
        from learned_optim.rule_backward import update_rows_recomputed  # imports this module

        return update_rows_recomputed(constants, state, grad, param)
    hidden = constants.meta_weight_h.shape[0]
    rows = grad.shape[0]

    def buffer(name: str) -> Tensor | None:  # ``out=None`` allocates, as without ``out``
        return None if scratch is None else scratch[name][:rows]

    h1, c1, previous = state.split((hidden, hidden, 2), dim=1)
    # Layer 1: one fused product over [gradient features | h1]; gate columns (i, f, o, g).
    log_part, sign_part = _preprocess_parts(grad, constants.p)
    layer1_input = torch.cat((log_part.unsqueeze(1), sign_part.unsqueeze(1), h1), dim=1,
                             out=buffer("layer1_input"))
    gates = torch.addmm(constants.gate_bias, layer1_input, constants.input_weight,
                        out=buffer("gates"))
    # Elementwise kernels vectorise only over contiguous runs: tanh on a contiguous copy of
    # the g columns, then one sigmoid over the whole product, in place (neither addmm nor the
    # copy saves it for backward; the g columns it also covers are not used afterwards), are
    # much faster than strided tanh and sigmoids on [n, H] slices.
    cell_gate = _contiguous(gates[:, 3 * hidden :], out=buffer("cell_gate")).tanh_()
    gates = gates.sigmoid_()
    in_gate, forget_gate, out_gate = gates[:, : 3 * hidden].split(hidden, dim=1)
    c1 = torch.mul(forget_gate, c1, out=buffer("c1"))
    c1 = torch.addcmul(c1, in_gate, cell_gate, out=buffer("c1"))
    h1 = torch.mul(out_gate, torch.tanh(c1, out=buffer("tanh_c1")), out=buffer("h1"))
    # Layer 2, both gates at once, transposed: rows (f_pre, i_pre) of [2, n], so that the
    # product has a long output dimension and every later operand is contiguous.
    gate_pre = torch.addmm(constants.meta_bias.unsqueeze(1), constants.meta_weight_h.t(), h1.t())
    gate_pre = gate_pre.addcmul_(param.unsqueeze(0), constants.meta_weight_theta.unsqueeze(1))
    gate_pre = gate_pre.addcmul_(previous.t(), constants.meta_weight_prev.unsqueeze(1))
    forget, learning_rate = gate_pre.sigmoid().unbind(dim=0)
    # theta_t = f_t theta_{t-1} - i_t g_t
    new_param = torch.addcmul(forget * param, learning_rate, grad, value=-1)
    return new_param, torch.cat((h1, c1, gate_pre.t()), dim=1, out=out)


# Rows per call of the chunked forward: its scratch (182 floats a row at H = 20) stays in cache.
FORWARD_CHUNK_ROWS = 8192
# Rows per call on an accelerator, where a call costs the launches of its kernels more than
# their work, so cache-sized chunks only multiply launches: 2**18 rows bound one call's scratch
# to about 190 MB at H = 20 (the per-step backward's temporaries to about 390 MB).
ACCELERATOR_CHUNK_ROWS = 2**18


def chunk_rows(device: torch.device, cpu_rows: int) -> int:
    """Rows a chunked loop takes at once on ``device``: ``cpu_rows`` on the CPU (cache-sized),
    :data:`ACCELERATOR_CHUNK_ROWS` elsewhere.

    >>> chunk_rows(torch.device("cpu"), 8192), chunk_rows(torch.device("cuda"), 8192)
    (8192, 262144)
    """
    return cpu_rows if device.type == "cpu" else ACCELERATOR_CHUNK_ROWS


def update_rows_chunked(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor
) -> tuple[Tensor, Tensor]:
    """``update_rows`` without autograd, chunk by chunk of rows through one reused scratch.

    The same numbers (to rounding) in new tensors, about 1.8x faster on a CPU at 28k rows than
    one call over all rows (whose multi-megabyte temporaries fall out of cache). The autograd
    nodes of the tape run their forward with it.

    >>> meta = MetaLearnerLSTM()
    >>> constants = prepare_step(meta.weights(), torch.tensor(1.0), torch.float32)
    >>> state, grad, theta = initial_state(3, 20), torch.ones(3), torch.zeros(3)
    >>> chunked = update_rows_chunked(constants, state, grad, theta)
    >>> all(torch.equal(a, b) for a, b in zip(chunked, update_rows(constants, state, grad, theta)))
    True
    """
    rows = grad.shape[0]
    new_state = torch.empty_like(state, memory_format=torch.contiguous_format)
    new_param = torch.empty_like(param, memory_format=torch.contiguous_format)
    chunk = max(1, min(rows, chunk_rows(state.device, FORWARD_CHUNK_ROWS)))
    scratch = row_scratch(chunk, constants.meta_weight_h.shape[0], dtype=state.dtype,
                          device=state.device)
    with torch.no_grad():
        for start in range(0, rows, chunk):
            piece = slice(start, start + chunk)
            new_param[piece], _ = update_rows(constants, state[piece], grad[piece],
                                              param[piece], out=new_state[piece],
                                              scratch=scratch)
    return new_param, new_state


def _on_tape(constants: StepConstants, *tensors: Tensor) -> bool:
    """Whether autograd would record an operation on these inputs."""
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in (*tensors, *constants[:-1]))


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
    mean = torch.lerp(moments[0], grad, 1.0 - momentum)
    square = torch.lerp(moments[1], grad * grad, 1.0 - rms_decay)
    rms = (square / (1.0 - rms_decay**step)).sqrt()
    scaled = mean * (scale / (1.0 - momentum**step)) / (rms + 1e-12)
    return scaled, torch.stack((mean, square))


def meta_update(
    weights: MetaWeights, state: Tensor, grad: Tensor, loss: Tensor | None, param: Tensor
) -> tuple[Tensor, Tensor]:
    """The update rule as one pure function of (weights, state, grad, loss, param).

    >>> meta = MetaLearnerLSTM()
    >>> theta = torch.tensor([0.5, -1.0])
    >>> state = initial_state(2, meta.hidden_size)
    >>> new_theta, new_state = meta_update(meta.weights(), state, torch.tensor([1.0, 0.0]),
    ...                                    torch.tensor(2.3), theta)
    >>> bool(new_theta[0] < 0.5), new_state.shape
    (True, torch.Size([2, 42]))
    """
    constants = prepare_step(weights, loss, param.dtype, param.device)
    return update_rows(constants, state, grad, param)


class MetaLearnerLSTM(nn.Module):
    """Coordinate-wise two-layer meta-learner (Ravi & Larochelle 2017).

    Layer 1 is an LSTM cell with 4 inputs (preprocessed gradient and loss) and ``hidden_size``
    units; layer 2 computes the forget and input gates of the learner's update from
    ``[h1, theta, previous pre-activation]``. Initialised as in the paper: weights
    U(-0.01, 0.01), forget bias U(4, 6), input bias U(-5, -4), so a fresh meta-learner is close to
    gradient descent with a small step (f ~ 0.99, i ~ 0.01).

    Parameters
    ----------
    hidden_size:
        Units of layer 1 (paper: 20).
    p:
        Preprocessing constant (paper: 10).
    optional_loss:
        Whether the rule may be stepped without the loss (``prepare_step(loss=None)``): true
        for rules meta-trained with the loss input sometimes withheld, such as the shipped
        ``general`` rule. The paper's rule reads the loss at every step (False).
    gradient_scale:
        ``None`` (the paper): the rule reads and applies the raw gradient, so a step is at
        most one raw gradient. A number: it reads and applies the RMS-scaled gradient of
        :func:`scale_gradient` (Adam's normalised direction) instead, a step being at most
        ``gradient_scale`` (an extension for rules that train fresh models of any scale; the
        optimizer shells keep the moments).
    momentum, rms_decay:
        Decays of the gradient's and the squared gradient's averages of :func:`scale_gradient`.

    Examples
    --------
    >>> meta = MetaLearnerLSTM()
    >>> sum(t.numel() for t in meta.parameters())
    2046
    >>> f, i = torch.sigmoid(meta.meta_bias.detach())
    >>> bool(0.98 < f < 0.999), bool(0.006 < i < 0.02)
    (True, True)
    """

    def __init__(self, hidden_size: int = 20, p: float = 10.0, optional_loss: bool = False,
                 gradient_scale: float | None = None, momentum: float = 0.9,
                 rms_decay: float = 0.99) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not p > 0:
            raise ValueError(f"p must be positive, got {p!r}")
        self.hidden_size = int(hidden_size)
        self.p = float(p)
        self.optional_loss = bool(optional_loss)
        if gradient_scale is not None and not 0 < gradient_scale < math.inf:
            raise ValueError(f"gradient_scale must be None or positive, got {gradient_scale!r}")
        if not 0 < rms_decay < 1:
            raise ValueError(f"rms_decay must lie in (0, 1), got {rms_decay!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.gradient_scale = None if gradient_scale is None else float(gradient_scale)
        self.rms_decay = float(rms_decay)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, 4))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self.meta_weight = nn.Parameter(torch.empty(2, hidden_size + 2))
        self.meta_bias = nn.Parameter(torch.empty(2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation."""
        with torch.no_grad():
            for weight in (self.weight_ih, self.weight_hh, self.bias, self.meta_weight):
                weight.uniform_(-0.01, 0.01)
            self.meta_bias[0].uniform_(4.0, 6.0)  # forget gate starts near 1
            self.meta_bias[1].uniform_(-5.0, -4.0)  # input gate (step size) starts near 0.01

    @property
    def state_width(self) -> int:
        """Floats of per-coordinate state (``2 * hidden_size + 2``)."""
        return state_width(self.hidden_size)

    def weights(self) -> MetaWeights:
        """The weights as a :class:`MetaWeights` tuple, on the autograd tape."""
        return MetaWeights(
            self.weight_ih, self.weight_hh, self.bias, self.meta_weight, self.meta_bias, self.p
        )

    def hyperparameters(self) -> dict:
        """What is needed to rebuild this module (stored in checkpoints)."""
        return {"hidden_size": self.hidden_size, "p": self.p,
                "optional_loss": self.optional_loss, "gradient_scale": self.gradient_scale,
                "momentum": self.momentum, "rms_decay": self.rms_decay}

    def rule_gradient(self, grad: Tensor, moments: Tensor | None, step: int
                      ) -> tuple[Tensor, Tensor | None]:
        """The gradient this rule reads and applies at ``step`` (from 1), and the new moments:
        the raw gradient for the paper's rule, :func:`scale_gradient`'s with
        ``gradient_scale``. ``moments`` None starts from zeros.

        >>> MetaLearnerLSTM().rule_gradient(torch.ones(2), None, 1)
        (tensor([1., 1.]), None)
        """
        if self.gradient_scale is None:
            return grad, None
        return scale_gradient(grad, moments, step, self.momentum, self.rms_decay,
                              self.gradient_scale)

    def forward(
        self, state: Tensor, grad: Tensor, loss: Tensor | None, param: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Apply :func:`meta_update` with this module's weights."""
        return meta_update(self.weights(), state, grad, loss, param)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, p={self.p}, "
                f"optional_loss={self.optional_loss}, gradient_scale={self.gradient_scale}")


def rule_fingerprint(meta_learner: MetaLearnerLSTM) -> str:
    """A digest that identifies an update rule: its hyper-parameters and exact weights.

    Two rules share a fingerprint only if they compute the same updates bit for bit (same
    hyper-parameters, same weight values, dtypes and shapes); the device does not count.

    >>> a, b = MetaLearnerLSTM(), MetaLearnerLSTM()
    >>> rule_fingerprint(a) == rule_fingerprint(a), rule_fingerprint(a) == rule_fingerprint(b)
    (True, False)
    >>> rule_fingerprint(a)[:7]
    'sha256:'
    """
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(meta_learner.hyperparameters(), sort_keys=True).encode())
    for name, tensor in meta_learner.named_parameters():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
