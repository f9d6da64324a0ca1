"""The coordinate-wise meta-learner LSTM of Ravi & Larochelle (2017): the module that holds the
update rule's weights.

Every scalar parameter of the learner is one row of a batch; all rows share the meta-learner's
weights, so one meta-learner serves a model of any size or shape. The rule's math (stated in
:mod:`learned_optim.rule.math`) lives in :mod:`learned_optim.rule`; :func:`meta_update` joins
its two halves, :func:`~learned_optim.rule.math.prepare_step` (per step) and
:func:`~learned_optim.rule.math.update_rows` (per coordinate), as one pure function.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from learned_optim.rule import math as rule_math

# Re-exported: the pure functions were public names of this module before learned_optim.rule.
from learned_optim.rule.math import (
    MetaWeights,
    StepConstants,
    apply_group_options,
    initial_state,
    prepare_step,
    preprocess,
    scale_gradient,
    state_width,
)
from learned_optim.rule.tape import update_rows_differentiable

__all__ = [
    "MetaLearnerLSTM",
    "MetaWeights",
    "StepConstants",
    "apply_group_options",
    "initial_state",
    "meta_update",
    "prepare_step",
    "preprocess",
    "rule_fingerprint",
    "scale_gradient",
    "state_width",
]


def update_rows(
    constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor, *,
    out: Tensor | None = None, scratch: dict[str, Tensor] | None = None, recompute: bool = True,
) -> tuple[Tensor, Tensor]:
    """This module's ``update_rows`` before :mod:`learned_optim.rule`, kept for code written
    against it: :func:`learned_optim.rule.math.update_rows` with ``out`` or ``scratch``,
    :func:`learned_optim.rule.tape.update_rows_differentiable` without. New code calls those.
    """
    if out is None and scratch is None:
        return update_rows_differentiable(constants, state, grad, param, recompute=recompute)
    return rule_math.update_rows(constants, state, grad, param, out=out, scratch=scratch)


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
    return update_rows_differentiable(constants, state, grad, param)


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
    step_decay:
        ``None`` (the paper): the optimizer shells apply the rule's update as it is. A number
        ``tau``: from optimizer step ``t > tau`` on, they scale the update by
        ``sqrt(tau / t)`` (:meth:`update_multiplier`), as a group's ``lr`` would. An extension
        for long training from scratch, where a rule meta-trained on short horizons keeps
        steps that suit the start of training; the shipped ``general`` rule sets it (its model
        card says how it was chosen). Meta-training ignores it.

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
                 rms_decay: float = 0.99, step_decay: float | None = None) -> None:
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
        if step_decay is not None and not 0 < step_decay < math.inf:
            raise ValueError(f"step_decay must be None or a positive number of steps, "
                             f"got {step_decay!r}")
        self.step_decay = None if step_decay is None else float(step_decay)
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
                "momentum": self.momentum, "rms_decay": self.rms_decay,
                # Only when set: the fingerprints of rules without it stay as they were.
                **({} if self.step_decay is None else {"step_decay": self.step_decay})}

    @property
    def counts_steps(self) -> bool:
        """Whether the shells count each parameter's steps (:meth:`rule_gradient` and
        :meth:`update_multiplier` depend on them)."""
        return self.gradient_scale is not None or self.step_decay is not None

    def update_multiplier(self, step: int) -> float:
        """The factor the shells apply to the rule's update at optimizer step ``step`` (from
        1): 1 without ``step_decay``, else ``min(1, sqrt(step_decay / step))``.

        >>> rule = MetaLearnerLSTM(step_decay=100)
        >>> rule.update_multiplier(50), rule.update_multiplier(400)
        (1.0, 0.5)
        >>> MetaLearnerLSTM().update_multiplier(10**6)
        1.0
        """
        if self.step_decay is None or step <= self.step_decay:
            return 1.0
        return math.sqrt(self.step_decay / step)

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
                f"optional_loss={self.optional_loss}, gradient_scale={self.gradient_scale}"
                + ("" if self.step_decay is None else f", step_decay={self.step_decay:g}"))


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
