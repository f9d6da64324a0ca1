"""The update rule of the Meta-Learner LSTM, written once, below everything else.

Its modules, imports pointing one way (``tape -> compiled -> math -> policy``, and the
kernels' modules below ``tape``):

- :mod:`learned_optim.rule.math`: the pure forward and per-row backward kernels
  (:func:`~learned_optim.rule.math.prepare_step`, :func:`~learned_optim.rule.math.update_rows`,
  :func:`~learned_optim.rule.math.rows_backward`), no autograd decisions;
- :mod:`learned_optim.rule.tape`: the ``autograd.Function`` nodes (recomputed step,
  first-order trajectory) and the one place that chooses which path a step takes;
- :mod:`learned_optim.rule.compiled`: ``update_rows`` and its vjp through ``torch.compile``,
  one node a step, the path of float32 steps on a CPU (``tape -> compiled -> math``);
- :mod:`learned_optim.rule.native`, :mod:`learned_optim.rule.native_tape`: the in-place step
  and the tape's node as hand-fused C++ kernels (CPU, float32), built by
  :mod:`learned_optim.rule.native_build`;
- :mod:`learned_optim.rule.triton_step`, :mod:`learned_optim.rule.triton_tape`: the same as
  Triton kernels (CUDA, float32, where Triton imports);
- :mod:`learned_optim.rule.policy`: every chunk and replay size, per device.

Nothing here knows of modules, optimizers, files or datasets.
"""

from learned_optim.rule.math import (
    MetaWeights,
    StepConstants,
    apply_group_options,
    initial_state,
    prepare_step,
    preprocess,
    scale_gradient,
    state_width,
    update_rows,
)
from learned_optim.rule.tape import RuleTrajectory, update_rows_differentiable

__all__ = [
    "MetaWeights",
    "RuleTrajectory",
    "StepConstants",
    "apply_group_options",
    "initial_state",
    "prepare_step",
    "preprocess",
    "scale_gradient",
    "state_width",
    "update_rows",
    "update_rows_differentiable",
]
