"""``LSTMMetaOptimizer`` (a ``torch.optim`` drop-in) and its differentiable twin for ``higher``.

Both are thin shells over :func:`learned_optim.rule.math.prepare_step` (its loss-free half
kept while the rule does not change) and :func:`learned_optim.rule.math.update_rows` (the twin
through :mod:`learned_optim.rule.tape`, which chooses its autograd path); the twin is
registered with ``higher`` on import, so ``higher.innerloop_ctx(model, LSTMMetaOptimizer(...))``
works unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import higher
import torch
from higher.optim import DifferentiableOptimizer
from torch import Tensor

from learned_optim.checkpoint import load_update_rule, shipped_path
from learned_optim.metalearner import MetaLearnerLSTM, rule_fingerprint
from learned_optim.native_finite import first_nonfinite, nonfinite_applies
from learned_optim.rule import policy
from learned_optim.rule.compiled import step_rows_compiled
from learned_optim.rule.math import (
    MetaWeights,
    Normalisation,
    RuleConstants,
    StepConstants,
    apply_group_options,
    fold_loss,
    initial_state,
    normalisation,
    prepare_rule,
    row_scratch,
    update_rows,
)
from learned_optim.rule.native import MAX_HIDDEN as NATIVE_MAX_HIDDEN
from learned_optim.rule.native import native_constants, native_step_kernel, step_bucket_native
from learned_optim.rule.tape import RuleTrajectory, first_order_path, update_rows_differentiable
from learned_optim.rule.triton_step import step_bucket_triton, triton_step_usable

__all__ = ["LSTMMetaOptimizer", "DifferentiableLSTMMetaOptimizer", "DEFAULT_RULE",
           "default_rule", "GROUP_DEFAULTS"]

# Per-group options and their defaults: ``lr`` multiplies the rule's update, ``weight_decay``
# is decoupled (see rule.math.apply_group_options). The defaults leave the rule bit-exact.
GROUP_DEFAULTS = {"lr": 1.0, "weight_decay": 0.0}

_LOSS_HELP = (
    "LSTMMetaOptimizer.step() needs the training loss, an input of this meta-learner "
    "(optional_loss=False): call opt.step(loss=loss) after loss.backward(), or "
    "opt.step(closure) with a closure that computes the loss, calls backward() and returns "
    "the loss. Only rules meta-trained to do without the loss (MetaLearnerLSTM(..., "
    "optional_loss=True), such as the shipped 'general' rule) accept opt.step() without one"
)


def _group_option(group: dict, name: str, group_index: int) -> Any:
    """A group's ``lr`` or ``weight_decay``, checked: a finite, non-negative number."""
    value = group.get(name, GROUP_DEFAULTS[name])
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} of param group {group_index} must be a scalar, got a "
                             f"tensor of shape {tuple(value.shape)}")
        if value.device.type == "meta" or value.requires_grad:
            return value  # no data-dependent check on meta tensors or on a tape (higher)
        number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{name} of param group {group_index} must be a number, got "
                         f"{value!r}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} of param group {group_index} must be finite and "
                         f"non-negative, got {number!r}")
    return value


def _plain_number(value: Any) -> Any:
    """A tensor option as a Python float (the in-place step needs no graph through it)."""
    if isinstance(value, Tensor) and value.device.type != "meta":
        return float(value)
    return value


def _like(value: Any, tensor: Tensor) -> Any:
    """A tensor option in ``tensor``'s dtype and device (differentiably); numbers as they are."""
    return value.to(dtype=tensor.dtype, device=tensor.device) if isinstance(value, Tensor) else (
        value)


def _is_default(lr: Any, weight_decay: Any) -> bool:
    """Whether a group's options leave the rule's update untouched (no extra arithmetic)."""
    return (not isinstance(lr, Tensor) and not isinstance(weight_decay, Tensor)
            and lr == 1.0 and weight_decay == 0.0)


def _bucket_by_device_and_dtype(params: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by (device, dtype): each group shares one state buffer."""
    buckets: dict[tuple, list[int]] = {}
    for index, param in enumerate(params):
        buckets.setdefault((param.device, param.dtype), []).append(index)
    return buckets


def _loss_tensor(loss: Any) -> Tensor:
    """The loss as a detached scalar tensor, or a clear error."""
    loss = torch.as_tensor(loss.detach() if isinstance(loss, Tensor) else loss)
    if loss.numel() != 1:
        raise ValueError(
            f"the loss passed to LSTMMetaOptimizer.step must be a scalar, got shape "
            f"{tuple(loss.shape)}"
        )
    if loss.device.type == "meta":  # no data to check (as torch.optim.SGD on meta tensors)
        return loss.reshape(())
    if not math.isfinite(loss.item()):  # one call, where isfinite().all() took three
        raise FloatingPointError(
            f"the loss is {loss.item()}: parameters were left untouched (a learned optimizer "
            "cannot take a step from a non-finite loss)"
        )
    return loss.reshape(())


class _RuleCache:
    """The rule's loss-free step constants (:func:`prepare_rule`) per (dtype, device), and
    their layout for the native kernel, kept while the rule's weights stay the same tensors
    with the same values (version counters), and grad mode and ``requires_grad`` stay as they
    were: the drop-in ``step()`` then folds in each step's loss alone (a few small tensor
    operations instead of about 40; at 55k parameters on 2 cores, 0.4 ms of a 7 ms step).
    Holding the weights keeps their ids from being reused.

    The ``higher`` twin keeps one too, so an episode's steps share one recorded
    :func:`prepare_rule`: its operations (slices, ``cat``, transposes, ``g + g``) save no
    tensors, so a backward through them frees nothing and a later backward through the
    same constants (truncated windows of one episode) still works.
    """

    def __init__(self) -> None:
        self.rules: dict[tuple, tuple[tuple, RuleConstants]] = {}
        self.layout: tuple[Tensor, tuple] | None = None  # (input_weight, native layout)

    def constants(self, weights: MetaWeights, loss: Tensor | None, dtype: torch.dtype,
                  device: torch.device) -> StepConstants:
        """``prepare_step(weights, loss, dtype, device)``."""
        tensors = tuple(weights[:5])
        key = (weights.p, tensors, tuple((t.data_ptr(), t._version) for t in tensors),
               torch.is_grad_enabled(), tuple(t.requires_grad for t in tensors))
        cached = self.rules.get((dtype, device))
        if cached is None or not _same_key(cached[0], key):
            cached = (key, prepare_rule(weights, dtype, device))
            self.rules[(dtype, device)] = cached
        return fold_loss(cached[1], loss)

    def native_layout(self, constants: StepConstants) -> tuple:
        """``native_constants(constants)``, laying out again only the loss's gate bias when
        ``constants`` shares the cached step's weights."""
        if self.layout is None or self.layout[0] is not constants.input_weight:
            self.layout = (constants.input_weight, native_constants(constants))
            return self.layout[1]
        weight, _, meta_h, meta_small = self.layout[1]
        return weight, constants.gate_bias.contiguous(), meta_h, meta_small


def _same_key(a: tuple, b: tuple) -> bool:
    """Whether two :class:`_RuleCache` keys name the same weight tensors and values."""
    return (a[0] == b[0] and all(x is y for x, y in zip(a[1], b[1])) and a[2:] == b[2:])


class _Segment(NamedTuple):
    """Rows ``[start, stop)`` of parameter ``index`` (flattened)."""

    index: int
    start: int
    stop: int


def _plan_chunks(
    sizes: list[int], active: list[bool], chunk_size: int
) -> Iterator[tuple[int, list[_Segment]]]:
    """Split the flat coordinate range of a bucket into chunks of at most ``chunk_size`` rows.

    Yields ``(first_row, segments)``; a chunk never spans an inactive parameter, so its rows
    are contiguous in the bucket's state buffer. Large parameters are split across chunks, small
    ones share a chunk.
    """
    segments: list[_Segment] = []
    first_row = rows = offset = 0
    for index, (size, is_active) in enumerate(zip(sizes, active)):
        if not is_active:
            if segments:
                yield first_row, segments
                segments, rows = [], 0
            offset += size
            continue
        start = 0
        while start < size:
            if not segments:
                first_row = offset + start
            stop = min(size, start + chunk_size - rows)
            segments.append(_Segment(index, start, stop))
            rows += stop - start
            start = stop
            if rows == chunk_size:
                yield first_row, segments
                segments, rows = [], 0
        offset += size
    if segments:
        yield first_row, segments


def _device_for_threads(params: list[Tensor]) -> torch.device:
    """The device whose thread policy a step follows: the CPU only if every parameter is
    there (any parameter elsewhere leaves torch's threads alone)."""
    return next((p.device for p in params if p.device.type != "cpu"), torch.device("cpu"))


def _check_finite_grads(grads: dict[int, Tensor], group_index: int, params: list[Tensor]) -> None:
    """Raise before any parameter changes if a gradient holds NaN or Inf."""
    grads = {i: g for i, g in grads.items() if g.numel()}  # (min, max) of nothing is undefined
    if not grads or next(iter(grads.values())).device.type == "meta":
        return
    index = _first_nonfinite(grads)
    if index is not None:
        raise FloatingPointError(
            f"the gradient of parameter {index} of param group {group_index} "
            f"(shape {tuple(params[index].shape)}) contains NaN or Inf: parameters were "
            "left untouched"
        )


def _first_nonfinite(grads: dict[int, Tensor]) -> int | None:
    """The key of the first of ``grads`` (non-empty tensors) that holds NaN or Inf."""
    keys, tensors = list(grads), list(grads.values())
    if nonfinite_applies(tensors):  # one kernel call for them all (CPU float32)
        bad = first_nonfinite(tensors)
        return None if bad is None else keys[bad]
    # Each gradient's (min, max): NaN propagates into both and an infinity shows in one. One
    # vectorised pass: at 55k parameters on the CPU about 10x faster than an inf-norm.
    extremes = torch.stack([extreme for g in tensors for extreme in torch.aminmax(g.reshape(-1))])
    if bool(torch.isfinite(extremes).all()):
        return None
    return next(key for key, pair in zip(keys, extremes.view(-1, 2))
                if not bool(torch.isfinite(pair).all()))


class _BucketCache(NamedTuple):
    """A bucket's contiguous state buffer and the views of it that ``opt.state`` holds."""

    params: tuple[Tensor, ...]
    buffer: Tensor
    views: tuple[Tensor, ...]


DEFAULT_RULE = "general"


def default_rule() -> MetaLearnerLSTM:
    """A new copy of the rule ``LSTMMetaOptimizer`` runs when given no meta-learner: the
    shipped :data:`DEFAULT_RULE` (``general``).

    >>> rule = default_rule()
    >>> rule.optional_loss, rule.gradient_scale is not None, rule is default_rule()
    (True, True, False)
    """
    return load_update_rule(DEFAULT_RULE)


class LSTMMetaOptimizer(torch.optim.Optimizer):
    r"""The Meta-Learner LSTM update rule as a ``torch.optim`` optimizer.

    For every scalar parameter :math:`\theta` with gradient :math:`g` and loss :math:`L`:

    .. math::
        \tilde\theta_t = f_t \odot \theta_{t-1} - i_t \odot g_t, \qquad
        (f_t, i_t) = \mathrm{MetaLearnerLSTM}(g_t, L_t, \theta_{t-1}, \text{state}_{t-1})

    .. math::
        \theta_t = \theta_{t-1} + \mathrm{lr}\,(\tilde\theta_t - \theta_{t-1})
                   - \mathrm{lr}\cdot\mathrm{weight\_decay}\cdot\theta_{t-1}

    with the param group's ``lr`` (default 1: the rule's own step) and decoupled
    ``weight_decay`` (default 0), which learning-rate schedulers change like any optimizer's.
    A rule with ``step_decay`` :math:`\tau` (see :class:`MetaLearnerLSTM`) multiplies ``lr``
    by :math:`\min(1, \sqrt{\tau / t})` at the parameter's step :math:`t`, on top of any
    scheduler.

    The meta-learner reads the loss, so :meth:`step` needs it (from the closure's return value
    or the ``loss=`` keyword), unless the rule was meta-trained to do without it
    (``meta_learner.optional_loss``). Per-coordinate state (42 floats at the default hidden
    size) lives in ``opt.state[p]["lstm_state"]`` and nowhere else; :meth:`reset_state` (or
    ``opt.state.clear()``) starts a new task.

    Every parameter that has a gradient moves through the forget gate, even where the gradient
    is exactly zero: :math:`\theta_t = f_t\,\theta_{t-1}` with :math:`f_t` slightly below 1
    for the paper's rule (a learned shrinkage, like weight decay). Parameters whose ``.grad``
    is ``None`` are left untouched; freeze a parameter with ``requires_grad_(False)``, not by
    zeroing its gradient.

    Parameters
    ----------
    params:
        Parameters or param groups, as for any ``torch.optim`` optimizer. Groups may set
        ``lr`` (a non-negative multiplier on the rule's update) and ``weight_decay``.
    meta_learner:
        The update rule; if omitted, the shipped rule ``general`` (:func:`default_rule`:
        meta-trained over many fresh models and tasks, no learning rate, the loss optional).
        ``MetaLearnerLSTM()`` is the paper's freshly initialised rule (close to SGD with a
        small step), the start of meta-training. Kept by reference, never copied, so
        meta-gradients reach it.
    lr, weight_decay:
        Defaults of the param groups' options (1.0 and 0.0).
    first_order:
        For the ``higher`` twin: treat the learner's gradients and loss as constants (the
        paper's default). ``False`` gives full second-order meta-gradients.
    chunk_size:
        Coordinates updated at once; bounds the scratch memory of :meth:`step` (182 floats a
        coordinate at H = 20). Default: :func:`learned_optim.rule.policy.step_chunk_rows`
        (8192, cache-sized, for parameters on the CPU; 262,144 on a GPU: fewer kernel
        launches).

    Notes
    -----
    :meth:`state_dict` carries the rule's identity (``"rule"``: hyper-parameters, fingerprint,
    and its weights, or only the name of a shipped rule loaded unchanged), so that
    ``LSTMMetaOptimizer(params).load_state_dict(sd)`` continues exactly; loading the state of
    another rule into an optimizer given an explicit ``meta_learner`` is refused unless
    ``rule="load"`` or ``rule="keep"`` is passed to :meth:`load_state_dict`. Parameters on the
    ``meta`` device are stepped like ``torch.optim.SGD`` steps them (shapes only, no checks).

    Examples
    --------
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = LSTMMetaOptimizer(model.parameters())
    >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
    >>> loss = torch.nn.functional.mse_loss(model(x), y)
    >>> opt.zero_grad(); loss.backward(); opt.step(loss=loss)
    >>> opt.state[model.weight]["lstm_state"].shape
    torch.Size([4, 42])
    >>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    >>> loss = torch.nn.functional.mse_loss(model(x), y)
    >>> opt.zero_grad(); loss.backward(); opt.step(loss=loss); scheduler.step()
    >>> opt.param_groups[0]["lr"]  # the next step takes half the rule's update
    0.5
    """

    def __init__(
        self,
        params: Iterable,
        meta_learner: MetaLearnerLSTM | None = None,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        first_order: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        if meta_learner is not None and not isinstance(meta_learner, MetaLearnerLSTM):
            raise TypeError(
                f"meta_learner must be a MetaLearnerLSTM, got {type(meta_learner).__name__}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        defaults = {"lr": lr, "weight_decay": weight_decay}
        for name in defaults:
            _group_option(defaults, name, 0)
        # Set before Optimizer.__init__, which calls add_param_group.
        self._bucket_cache: dict[tuple, _BucketCache] = {}
        self._rule_cache = _RuleCache()
        self.meta_learner = meta_learner if meta_learner is not None else default_rule()
        # A default rule gives way to the rule of a loaded state_dict; an explicit one does not.
        self._rule_is_default = meta_learner is None
        self.first_order = bool(first_order)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        super().__init__(params, defaults=defaults)

    # --- the object contract: copies, pickles, state dicts ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups: add the rule.
        # The bucket cache is not kept: the next step rebuilds it from ``state``.
        return {**super().__getstate__(), "meta_learner": self.meta_learner,
                "first_order": self.first_order, "chunk_size": self.chunk_size,
                "_rule_is_default": self._rule_is_default}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._bucket_cache = {}
        self._rule_cache = _RuleCache()
        self.__dict__.setdefault("_rule_is_default", False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, params: Iterable, **kwargs) -> LSTMMetaOptimizer:
        """An optimizer whose update rule is loaded from a checkpoint (shipped name or path).

        Only the update rule is used; see :func:`learned_optim.load_learned_init` for the
        learned initial weights.
        """
        return cls(params, load_update_rule(name_or_path), **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (its ``lr`` and ``weight_decay`` default to the optimizer's)."""
        group_index = len(self.param_groups)
        if isinstance(param_group, dict):
            for name in GROUP_DEFAULTS:
                if name in param_group:
                    _group_option(param_group, name, group_index)
        super().add_param_group(param_group)
        for index, param in enumerate(self.param_groups[-1]["params"]):
            if param.is_complex():
                raise TypeError(
                    f"parameter {index} of param group {group_index} is complex "
                    f"({param.dtype}): LSTMMetaOptimizer supports real floating-point parameters"
                )
            if not param.is_floating_point():
                raise TypeError(
                    f"parameter {index} of param group {group_index} has dtype "
                    f"{param.dtype}: LSTMMetaOptimizer supports floating-point parameters"
                )

    def reset_state(self) -> None:
        """Forget all per-coordinate state: the next step starts a new task."""
        self.state.clear()
        self._bucket_cache = {}

    def rule_identity(self, *, with_weights: bool | None = None) -> dict:
        """What :meth:`state_dict` stores under ``"rule"``: the rule's class, hyper-parameters,
        fingerprint (:func:`learned_optim.metalearner.rule_fingerprint`), the name of the shipped
        rule it was loaded from (or ``None``) and its weights.

        The weights are left out (``None``) for a shipped rule whose weights are unchanged since
        it was loaded: its name and fingerprint identify it. ``with_weights`` forces either way.

        >>> identity = LSTMMetaOptimizer(torch.nn.Linear(2, 1).parameters()).rule_identity()
        >>> identity["name"], identity["weights"]  # the shipped default, unchanged
        ('general', None)
        >>> fresh = LSTMMetaOptimizer(torch.nn.Linear(2, 1).parameters(), MetaLearnerLSTM())
        >>> fresh.rule_identity()["name"], sorted(fresh.rule_identity()["weights"])[:2]
        (None, ['bias', 'meta_bias'])
        """
        rule = self.meta_learner
        fingerprint = rule_fingerprint(rule)
        name = getattr(rule, "pretrained_name", None)
        shipped_unchanged = name is not None and fingerprint == getattr(
            rule, "pretrained_fingerprint", None)
        if with_weights is None:
            with_weights = not shipped_unchanged
        weights = ({n: t.detach().clone() for n, t in rule.named_parameters()}
                   if with_weights else None)
        return {"class": type(rule).__name__, "hyperparameters": rule.hyperparameters(),
                "fingerprint": fingerprint, "name": name if shipped_unchanged else None,
                "weights": weights}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (``state``, ``param_groups``) plus ``"rule"``, the identity of
        its update rule (see :meth:`rule_identity`). Hooks run in ``torch.optim``'s order."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        state_dict["rule"] = self.rule_identity()
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict, *, rule: str = "check") -> None:
        """Load a state dict from :meth:`state_dict`, including, where needed, its rule.

        Load-state-dict pre-hooks run first (in ``torch.optim``'s order), then the checks:
        the state dict's rule (``state_dict["rule"]``, if present) against this optimizer's.

        Parameters
        ----------
        state_dict:
            As returned by :meth:`state_dict` (a plain ``torch.optim`` state dict without
            ``"rule"`` is accepted as is).
        rule:
            ``"check"`` (default): the same rule continues; an optimizer built without a
            ``meta_learner`` adopts the saved rule; one built with another rule refuses it
            (``ValueError`` naming what differs). ``"load"``: adopt the saved rule
            (``self.meta_learner`` becomes a new module). ``"keep"``: keep this optimizer's
            rule and load only the state.
        """
        if rule not in ("check", "load", "keep"):
            raise ValueError(f"rule must be 'check', 'load' or 'keep', got {rule!r}")
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        identity = state_dict.pop("rule", None)
        meta_learner = self.meta_learner
        if identity is not None and rule != "keep":
            adopt = rule == "load" or self._rule_is_default
            meta_learner = self._rule_from_identity(identity, adopt)
        self._check_loaded_state(state_dict, meta_learner)
        hooks = (self._optimizer_load_state_dict_pre_hooks,
                 self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # they have run
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # they run last
        try:
            super().load_state_dict(state_dict)
        finally:
            (self._optimizer_load_state_dict_pre_hooks,
             self._optimizer_load_state_dict_post_hooks) = hooks
        for group_index, group in enumerate(self.param_groups):
            for name in GROUP_DEFAULTS:
                group.setdefault(name, self.defaults[name])
                _group_option(group, name, group_index)
        self.meta_learner = meta_learner
        self._bucket_cache = {}
        # Copy the loaded state into this optimizer's own buffers now: torch.optim would keep
        # references to the given tensors, which the optimizer that saved them may still step.
        for group_index, group in enumerate(self.param_groups):
            params = group["params"]
            for (device, dtype), indices in _bucket_by_device_and_dtype(params).items():
                bucket = [params[i] for i in indices]
                if any("lstm_state" in self.state.get(p, {}) for p in bucket):
                    self._bucket_state(group_index, bucket, device, dtype)
        # And the gradient moments, which the fused kernels update in place (contiguous).
        for entry in self.state.values():
            if isinstance(entry, dict) and isinstance(entry.get("grad_moments"), Tensor):
                entry["grad_moments"] = entry["grad_moments"].clone(
                    memory_format=torch.contiguous_format)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _rule_from_identity(self, identity: Any, adopt: bool) -> MetaLearnerLSTM:
        """This optimizer's rule if the saved identity matches it; else the saved rule (when
        ``adopt``) or a ValueError naming the mismatch."""
        if not isinstance(identity, dict):
            raise ValueError(f"state_dict['rule'] must be a dict, got {type(identity).__name__}")
        mine = rule_fingerprint(self.meta_learner)
        theirs = identity.get("fingerprint")
        if theirs == mine:
            return self.meta_learner
        hyper = self.meta_learner.hyperparameters()
        saved_hyper = identity.get("hyperparameters")
        if not adopt:
            what = (f"hyper-parameters {saved_hyper} vs this optimizer's {hyper}"
                    if saved_hyper != hyper else
                    f"weights (fingerprint {str(theirs)[:19]}... vs {mine[:19]}...)")
            named = f" (shipped rule {identity['name']!r})" if identity.get("name") else ""
            raise ValueError(
                f"the state_dict was saved with another update rule{named}: it differs in "
                f"{what}. Pass rule='load' to continue with the saved rule, or rule='keep' to "
                "apply its state to this optimizer's rule")
        return _rule_from_saved(identity)

    def _check_loaded_state(self, state_dict: dict, meta_learner: MetaLearnerLSTM) -> None:
        """Each ``lstm_state`` fits its parameter and the rule's hidden size, and each
        ``grad_moments`` its parameter."""
        width = meta_learner.state_width
        groups = state_dict.get("param_groups", [])
        ids = [pid for group in groups for pid in group.get("params", [])]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(ids, params))
        for pid, entry in state_dict.get("state", {}).items():
            param = by_id.get(pid)
            if param is None or not isinstance(entry, dict):
                continue  # a non-parameter entry: kept as is, as torch.optim does
            moments = entry.get("grad_moments")
            if moments is not None and (not isinstance(moments, Tensor)
                                        or tuple(moments.shape) != (2, *param.shape)):
                raise ValueError(
                    f"optimizer state of parameter {pid} has grad_moments of shape "
                    f"{tuple(getattr(moments, 'shape', ()))}, expected {(2, *param.shape)} "
                    f"for a parameter of shape {tuple(param.shape)}")
            lstm_state = entry.get("lstm_state")
            if lstm_state is None:
                continue
            if tuple(lstm_state.shape) != (param.numel(), width):
                raise ValueError(
                    f"optimizer state of parameter {pid} has shape {tuple(lstm_state.shape)}, "
                    f"expected ({param.numel()}, {width}) for a parameter of shape "
                    f"{tuple(param.shape)} and a meta-learner with hidden size "
                    f"{meta_learner.hidden_size}"
                )

    # --- the step ------------------------------------------------------------------------
    def _bucket_state(self, group_index: int, params: list[Tensor], device, dtype) -> Tensor:
        """The contiguous state buffer of one bucket, whose views ``opt.state[p]`` holds.

        The cached buffer is reused only if every ``opt.state[p]["lstm_state"]`` is still the
        view this optimizer put there; otherwise (state cleared, replaced or loaded) a new
        buffer is assembled from ``opt.state``, zeros where a parameter has no state.
        """
        key = (device, dtype, tuple(id(p) for p in params))
        cached = self._bucket_cache.get(key)
        if cached is not None and all(a is b for a, b in zip(cached.params, params)):
            for param, view in zip(params, cached.views):
                entry = self.state.get(param)
                if entry is None or entry.get("lstm_state") is not view:
                    break
            else:
                return cached.buffer
        width = self.meta_learner.state_width
        rows = sum(p.numel() for p in params)
        # Feature-major (each state feature contiguous over the coordinates): the native
        # kernel then loads whole vectors instead of transposing rows (5.6 against 6.7 ms a
        # step at 55,050 coordinates), and the chunk paths run update_rows feature-major.
        buffer = initial_state(rows, self.meta_learner.hidden_size, dtype=dtype, device=device,
                               feature_major=True)
        views, offset = [], 0
        for param in params:
            size = param.numel()
            view = buffer[offset : offset + size]
            previous = self.state[param].get("lstm_state")
            if previous is not None:
                if not isinstance(previous, Tensor) or tuple(previous.shape) != (size, width):
                    raise ValueError(
                        f"opt.state[p]['lstm_state'] of a parameter of shape "
                        f"{tuple(param.shape)} in param group {group_index} must be a tensor "
                        f"of shape ({size}, {width}), got "
                        f"{tuple(previous.shape) if isinstance(previous, Tensor) else previous!r}")
                view.copy_(previous)
            self.state[param]["lstm_state"] = view
            views.append(view)
            offset += size
        self._bucket_cache[key] = _BucketCache(tuple(params), buffer, tuple(views))
        return buffer

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Take one step of the learned update rule.

        Parameters
        ----------
        closure:
            Re-evaluates the model, calls ``backward()`` and returns the loss.
        loss:
            The loss whose gradients are in ``.grad`` (used when there is no closure, or in
            preference to the closure's value). May be omitted for a rule with
            ``optional_loss=True``.

        Returns
        -------
        The closure's return value, or ``None``.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if loss is None:
            loss = closure_loss
        if loss is None and not self.meta_learner.optional_loss:
            raise ValueError(_LOSS_HELP)
        loss = None if loss is None else _loss_tensor(loss)

        weights = self.meta_learner.weights()
        # Buckets of parameters no longer in any group (a removed group) leave the cache.
        live = {id(p) for group in self.param_groups for p in group["params"]}
        self._bucket_cache = {key: entry for key, entry in self._bucket_cache.items()
                              if all(id(p) in live for p in entry.params)}
        params = [p for group in self.param_groups for p in group["params"]]
        device = _device_for_threads(params)
        dtype = params[0].dtype if params else torch.float32
        with policy.threads_for_step(device, dtype, sum(p.numel() for p in params),
                                     self.chunk_size_for(device)):
            return self._step(weights, loss, closure_loss)

    def _step(self, weights, loss: Tensor | None, closure_loss: Any) -> Any:
        """:meth:`step` after the loss is known, under the threads the policy chose."""
        work = []
        # Validate everything before touching any parameter.
        for group_index, group in enumerate(self.param_groups):
            lr = _group_option(group, "lr", group_index)
            weight_decay = _group_option(group, "weight_decay", group_index)
            params = group["params"]
            for (device, dtype), indices in _bucket_by_device_and_dtype(params).items():
                grads = {}
                for i in indices:
                    grad = params[i].grad
                    if grad is None:
                        continue
                    if grad.is_sparse:
                        raise RuntimeError(
                            f"parameter {i} of param group {group_index} has a sparse gradient: "
                            "LSTMMetaOptimizer does not support sparse gradients"
                        )
                    grads[i] = grad
                _check_finite_grads(grads, group_index, params)
                if grads:
                    work.append((params, indices, grads, self._bucket_state(
                        group_index, [params[i] for i in indices], device, dtype),
                        (_plain_number(lr), _plain_number(weight_decay))))
        for params, indices, grads, buffer, options in work:
            fused = self._fused_step(buffer)
            normalisations = {}
            if fused is not None and self.meta_learner.gradient_scale is not None:
                normalisations = self._normalisations(params, grads)  # done in the kernel
            else:
                grads = self._rule_gradients(params, grads)
            options = self._with_step_decay(options, [self.state[params[i]] for i in grads])
            self._update_bucket([params[i] for i in indices], [grads.get(i) for i in indices],
                                buffer, self._rule_cache.constants(weights, loss, buffer.dtype,
                                                                   buffer.device),
                                options, fused, [normalisations.get(i) for i in indices])
        return closure_loss

    def _normalisations(self, params: list[Tensor], grads: dict[int, Tensor]
                        ) -> dict[int, Normalisation]:
        """:meth:`_rule_gradients` for the fused kernels, which normalise each gradient as
        they read it: each parameter's step counted, and its moments (contiguous, made at
        its first step) for the kernel to update in place."""
        rule = self.meta_learner
        normalisations = {}
        for i, grad in grads.items():
            state = self.state[params[i]]
            state["rule_step"] = state.get("rule_step", 0) + 1
            moments = state.get("grad_moments")
            if moments is None:
                moments = torch.zeros((2, *grad.shape), dtype=grad.dtype, device=grad.device)
            elif not moments.is_contiguous():  # (set by hand: load_state_dict copies them)
                moments = moments.contiguous()
            state["grad_moments"] = moments
            normalisations[i] = normalisation(moments, state["rule_step"], rule.momentum,
                                              rule.rms_decay, rule.gradient_scale)
        return normalisations

    def _rule_gradients(self, params: list[Tensor], grads: dict[int, Tensor]
                        ) -> dict[int, Tensor]:
        """The gradients the rule reads and applies: raw for the paper's rule, normalised
        (moments kept in ``state[p]["grad_moments"]``) for a rule with ``gradient_scale``."""
        if not self.meta_learner.counts_steps:
            return grads
        scaled = {}
        for i, grad in grads.items():
            state = self.state[params[i]]
            state["rule_step"] = state.get("rule_step", 0) + 1
            scaled[i], moments = self.meta_learner.rule_gradient(
                grad, state.get("grad_moments"), state["rule_step"])
            if moments is not None:
                state["grad_moments"] = moments
        return scaled

    def _with_step_decay(self, options: tuple[Any, Any], states: list[dict]) -> tuple[Any, Any]:
        """A bucket's ``(lr, weight_decay)`` with the rule's ``step_decay`` multiplier of its
        most advanced parameter applied to ``lr`` (as a scheduler would)."""
        if self.meta_learner.step_decay is None or not states:
            return options
        multiplier = self.meta_learner.update_multiplier(max(s["rule_step"] for s in states))
        return (options[0] if multiplier == 1.0 else options[0] * multiplier), options[1]

    def chunk_size_for(self, device: torch.device) -> int:
        """Coordinates that :meth:`step` updates at once on ``device``: ``chunk_size`` if it
        was given, else the device's default.

        >>> opt = LSTMMetaOptimizer(torch.nn.Linear(2, 1).parameters())
        >>> opt.chunk_size_for(torch.device("cpu")), opt.chunk_size_for(torch.device("cuda"))
        (8192, 262144)
        """
        return self.chunk_size or policy.step_chunk_rows(device)

    def _update_bucket(
        self, params: list[Tensor], grads: list[Tensor | None], buffer: Tensor, constants,
        options: tuple[Any, Any], fused: Callable | None,
        normalisations: list[Normalisation | None],
    ) -> None:
        """Step one bucket: through ``fused`` (:meth:`_fused_step`'s kernel, which applies
        ``normalisations``, one or ``None`` a parameter) if there is one, else by chunks."""
        lr, weight_decay = options
        # Flat views in the parameters' own memory; non-contiguous ones work on a contiguous
        # copy (reshape alone may return a strided view, e.g. of a 1-D slice with a step).
        flat_params = [p.view(-1) if p.is_contiguous() else p.reshape(-1).contiguous()
                       for p in params]
        flat_grads = [None if g is None else g.reshape(-1) for g in grads]
        if fused is not None:  # one call for the bucket, in place (no temporaries, no chunks)
            fused(constants, buffer, [None if g is None else g.contiguous() for g in flat_grads],
                  flat_params, float(lr), float(weight_decay),
                  kernel_constants=self._rule_cache.native_layout(constants),
                  normalisations=normalisations)
        else:
            self._update_chunks(flat_params, flat_grads, buffer, constants, lr, weight_decay)
        for param, flat, grad in zip(params, flat_params, grads):
            if grad is not None and not param.is_contiguous():
                param.copy_(flat.view(param.shape))

    def _fused_step(self, buffer: Tensor) -> Callable | None:
        """The kernel that steps this bucket, if any: the CPU's hand-fused one (one call for
        the bucket) or the GPU's Triton one (one launch for the bucket), each built on first
        use; else ``None``."""
        if self.meta_learner.hidden_size > NATIVE_MAX_HIDDEN:
            return None
        if policy.step_native(buffer.device, buffer.dtype) and native_step_kernel() is not None:
            return step_bucket_native
        if policy.step_triton(buffer.device, buffer.dtype) and triton_step_usable(
                buffer.device):
            return step_bucket_triton
        return None

    def _update_chunks(self, flat_params, flat_grads, buffer: Tensor, constants, lr,
                       weight_decay) -> None:
        """The rule chunk by chunk of ``chunk_size`` rows: compiled or eager kernels."""
        plain = _is_default(lr, weight_decay)
        sizes = [p.numel() for p in flat_params]
        active = [g is not None for g in flat_grads]
        chunk_size = self.chunk_size_for(buffer.device)
        # Temporaries for one chunk of the eager kernel, reused by every such chunk of this
        # step; allocated only if a chunk takes it (the compiled forward allocates its own).
        scratch = None
        for first_row, segments in _plan_chunks(sizes, active, chunk_size):
            if len(segments) == 1:
                index, start, stop = segments[0]
                param_rows = flat_params[index][start:stop]
                grad_rows = flat_grads[index][start:stop]
            else:
                param_rows = torch.cat([flat_params[s.index][s.start : s.stop] for s in segments])
                grad_rows = torch.cat([flat_grads[s.index][s.start : s.stop] for s in segments])
            state_rows = buffer[first_row : first_row + param_rows.numel()]
            if policy.step_compiles(buffer.device, buffer.dtype, param_rows.numel()):
                # (where the native kernel could not be built: its graph is row-major)
                new_param, new_state = step_rows_compiled(constants, state_rows.contiguous(),
                                                          grad_rows, param_rows)
                state_rows.copy_(new_state)
            else:
                if scratch is None:
                    scratch = row_scratch(min(chunk_size, buffer.shape[0]),
                                          self.meta_learner.hidden_size, dtype=buffer.dtype,
                                          device=buffer.device)
                columns = state_rows.t()  # [2H + 2, n], each feature contiguous
                new_param, _ = update_rows(constants, columns, grad_rows, param_rows,
                                           out=columns, scratch=scratch, feature_major=True)
            if not plain:
                new_param = apply_group_options(param_rows, new_param, lr, weight_decay)
            if len(segments) == 1:
                param_rows.copy_(new_param)
            else:
                pieces = new_param.split([s.stop - s.start for s in segments])
                for segment, piece in zip(segments, pieces):
                    flat_params[segment.index][segment.start : segment.stop].copy_(piece)


def _rule_from_saved(identity: dict) -> MetaLearnerLSTM:
    """The update rule a state dict's ``"rule"`` entry describes: its weights, or the shipped
    rule it names (whose fingerprint must match)."""
    if identity.get("class") != "MetaLearnerLSTM":
        raise ValueError(f"state_dict['rule'] has unknown class {identity.get('class')!r}")
    weights = identity.get("weights")
    if weights is None:
        name = identity.get("name")
        if not isinstance(name, str):
            raise ValueError("state_dict['rule'] has neither weights nor a shipped rule's name")
        rule = load_update_rule(shipped_path(name))
        if rule_fingerprint(rule) != identity.get("fingerprint"):
            raise ValueError(
                f"the shipped rule {name!r} of this version of learned_optim differs from the "
                "one the state_dict was saved with (fingerprints differ)")
        return rule
    hyper = identity.get("hyperparameters")
    if not isinstance(hyper, dict):
        raise ValueError("state_dict['rule'] has no hyperparameters")
    try:
        rule = MetaLearnerLSTM(**hyper)
        rule.load_state_dict(weights)
    except (TypeError, RuntimeError, ValueError) as error:
        raise ValueError(f"state_dict['rule'] does not describe a valid rule: {error}") from None
    return rule


class DifferentiableLSTMMetaOptimizer(DifferentiableOptimizer):
    """The differentiable twin of :class:`LSTMMetaOptimizer`, used by ``higher.innerloop_ctx``.

    Updates are out of place, on the autograd tape, so a query loss after the inner loop
    back-propagates into the meta-learner's weights and (with ``copy_initial_weights=False``)
    into the model's initial weights. With ``first_order=True`` the learner's gradients are
    computed without ``create_graph``: no double-backward graph is built at all.

    The param groups' ``lr`` and ``weight_decay`` come from higher's copy of the drop-in's
    groups; ``override={"lr": [tensor]}`` (as for higher's SGD) makes them tensors, even ones
    that require grad. ``step(loss)`` always takes the loss.
    """

    def __init__(self, other: LSTMMetaOptimizer, reference_params, *args, **kwargs) -> None:
        super().__init__(other, reference_params, *args, **kwargs)
        # By reference: higher deep-copies param groups, which would cut the meta-gradients.
        self.meta_learner = other.meta_learner
        self.first_order = other.first_order
        self._buckets: list[dict[tuple, Tensor]] = [{} for _ in self.param_groups]
        # First order: one anchored trajectory per bucket (see learned_optim.rule.tape).
        self._chains: list[dict[tuple, _Chain]] = [{} for _ in self.param_groups]
        self._loss: Tensor | None = None
        self._rule_cache = _RuleCache()  # the episode's prepare_rule, recorded once
        # RMS-scaled rules (gradient_scale): per-parameter moments and step counts, starting
        # from the drop-in optimizer's (copied by higher).
        self._moments = [{i: (self.state[g][i].get("grad_moments"),
                              self.state[g][i].get("rule_step", 0))
                          for i in range(len(group["params"]))}
                         for g, group in enumerate(self.param_groups)]

    # Overrides higher's step, whose body this follows, because the rule needs three things
    # that higher's cannot give: (1) first order must not build the double-backward graph
    # (higher always takes the gradients with create_graph=track_higher_grads); (2) the rule
    # reads the loss, which higher does not pass to _update; (3) with track_higher_grads=False
    # the update must record nothing. It relies on five protected attributes of
    # higher.optim.DifferentiableOptimizer (_apply_override, _fmodel, _track_higher_grads,
    # _grad_callback, _group_to_param_list; and on self.state holding the drop-in's state per
    # group and parameter index): tests/test_higher_twin.py pins what it expects of them.
    def step(self, loss: Tensor, params=None, override=None, grad_callback=None, **kwargs):
        """Compute the gradients of ``loss`` and take one differentiable step.

        Same contract as ``higher.optim.DifferentiableOptimizer.step``; returns the new fast
        weights.
        """
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "params must be passed to step() when the optimizer has no patched model"
                )
            params = self._fmodel.fast_params
        params = list(params)
        _loss_tensor(loss)  # validates shape and finiteness
        # The learner's backward and the rule's update: on a CPU they run on the threads the
        # policy chooses for the size of what is updated (learned_optim.rule.policy.
        # tape_step_threads: torch's for the compiled node, else one when small or when cores
        # are busy).
        updated = self._updated_indices()
        with policy.threads_for_tape_step(_device_for_threads(params),
                                          sum(params[i].numel() for i in updated)):
            return self._step(loss, params, updated, grad_callback)

    def _step(self, loss: Tensor, params: list[Tensor], updated: set[int],
              grad_callback) -> list[Tensor]:
        """:meth:`step` once the parameters (and which of them it updates) are known, under
        the policy's threads."""
        second_order = self._track_higher_grads and not self.first_order
        # Unused or frozen parameters, and those this optimizer does not update (a head-only
        # inner loop): a dummy target keeps autograd.grad happy, their grad is None and the
        # backward stops where the updated ones start.
        targets = [p if p.requires_grad and i in updated else torch.empty(0, requires_grad=True)
                   for i, p in enumerate(params)]
        grads = torch.autograd.grad(
            loss, targets, create_graph=second_order, allow_unused=True
        )
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = callback(grads)
        self._loss = loss.reshape(()) if second_order else loss.detach().reshape(())

        grouped = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            for slot, index in enumerate(mapping):
                group["params"][slot] = params[index]
            grouped.append([grads[index] for index in mapping])
        with torch.set_grad_enabled(self._track_higher_grads):
            self._update(grouped)

        new_params = list(params)
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            for param, index in zip(group["params"], mapping):
                new_params[index] = (
                    param if self._track_higher_grads else param.detach().requires_grad_()
                )
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
        return new_params

    def _updated_indices(self) -> set[int]:
        """Which of the patched model's parameters (by index) this optimizer updates."""
        return {index for mapping in self._group_to_param_list for index in mapping}

    def _rule_gradient(self, group_index: int, index: int, grad: Tensor) -> Tensor:
        """As :meth:`LSTMMetaOptimizer._rule_gradients`, for one parameter."""
        if not self.meta_learner.counts_steps:
            return grad
        moment, step = self._moments[group_index][index]
        if moment is not None:
            moment = moment.to(dtype=grad.dtype, device=grad.device)
        scaled, moment = self.meta_learner.rule_gradient(grad, moment, step + 1)
        self._moments[group_index][index] = (moment, step + 1)
        return scaled

    def _step_decay(self, group_index: int, active: list[int]) -> float:
        """The rule's ``step_decay`` multiplier for a bucket (its most advanced parameter)."""
        if self.meta_learner.step_decay is None:
            return 1.0
        return self.meta_learner.update_multiplier(
            max(self._moments[group_index][i][1] for i in active))

    def _first_order_path(self, flat_grad: Tensor) -> str | None:
        """``"trajectory"`` where this step can join a first-order trajectory (on a tape, the
        gradient and the loss constants, so only the last parameters need the tape),
        ``"native"`` or ``"compiled"`` where it takes one node a step instead, else ``None``."""
        return (first_order_path(flat_grad, self._loss, self.meta_learner.hidden_size)
                if self.first_order else None)

    def _initial_bucket_state(self, group_index: int, indices: list[int], like: Tensor) -> Tensor:
        """The state the drop-in optimizer had (copied by higher), or a new task's zeros.

        Feature-major where the bucket's steps take one node a step (the native, Triton or
        compiled node keeps its state so): a row-major start would be transposed by the first
        step.
        """
        group = self.param_groups[group_index]
        hidden = self.meta_learner.hidden_size
        sizes = [group["params"][i].numel() for i in indices]
        copied = [self.state[group_index][i].get("lstm_state") for i in indices]
        feature_major = policy.tape_path(like.device, sum(sizes), self.first_order) in (
            "native", "triton")
        if all(c is None for c in copied):
            return initial_state(sum(sizes), hidden, dtype=like.dtype, device=like.device,
                                 feature_major=feature_major)
        pieces = [(initial_state(size, hidden) if c is None else c).to(dtype=like.dtype,
                                                                         device=like.device)
                  for size, c in zip(sizes, copied)]
        if feature_major:
            return torch.cat([piece.t() for piece in pieces], dim=1).t()
        return torch.cat(pieces)

    def _update(self, grouped_grads, **kwargs) -> None:
        weights = self.meta_learner.weights()
        for group_index, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            params = group["params"]
            # From higher's copy of the param groups (or an ``override``): may be tensors.
            lr = _group_option(group, "lr", group_index)
            weight_decay = _group_option(group, "weight_decay", group_index)
            plain = _is_default(lr, weight_decay)
            for key, indices in _bucket_by_device_and_dtype(params).items():
                state = self._buckets[group_index].get(key)
                if state is None:
                    state = self._initial_bucket_state(group_index, indices, params[indices[0]])
                active = [i for i in indices if grads[i] is not None]
                if not active:
                    continue
                constants = self._rule_cache.constants(weights, self._loss, key[1], key[0])
                sizes = [params[i].numel() for i in indices]
                rows = dict(zip(indices, state.split(sizes)))
                active_rows = (torch.cat([rows[i] for i in active])
                               if len(active) < len(indices) else state)
                flat_grad = torch.cat([self._rule_gradient(group_index, i, grads[i]).reshape(-1)
                                       for i in active])
                multiplier = self._step_decay(group_index, active)
                bucket_lr = lr if multiplier == 1.0 else lr * multiplier
                bucket_plain = plain and multiplier == 1.0
                chains = self._chains[group_index]
                path = self._first_order_path(flat_grad)
                if bucket_plain and path == "trajectory":
                    chain = chains.get(key)
                    if chain is None or not chain.continues(active, params):
                        chain = _Chain(RuleTrajectory(active_rows, torch.cat(
                            [params[i].reshape(-1) for i in active])), tuple(active))
                        chains[key] = chain
                    new_param, new_rows = chain.trajectory.step(constants, flat_grad)
                else:
                    chains.pop(key, None)
                    flat_param = torch.cat([params[i].reshape(-1) for i in active])
                    # the policy's path for the size: the compiled node on a CPU
                    new_param, new_rows = update_rows_differentiable(
                        constants, active_rows, flat_grad, flat_param)
                    if not bucket_plain:
                        new_param = apply_group_options(flat_param, new_param,
                                                        _like(bucket_lr, flat_param),
                                                        _like(weight_decay, flat_param))
                active_sizes = [params[i].numel() for i in active]
                for i, piece, piece_state in zip(
                    active, new_param.split(active_sizes), new_rows.split(active_sizes)
                ):
                    params[i] = piece.view(params[i].shape)
                    rows[i] = piece_state
                if key in chains:
                    chains[key].outputs = [params[i] for i in active]
                self._buckets[group_index][key] = (
                    new_rows if len(active) == len(indices) else torch.cat(
                        [rows[i] for i in indices])
                )


class _Chain:
    """A bucket's trajectory, the active parameters it covers and the views it last returned."""

    def __init__(self, trajectory: RuleTrajectory, active: tuple[int, ...]) -> None:
        self.trajectory = trajectory
        self.active = active
        self.outputs: list[Tensor] = []

    def continues(self, active: list[int], params: list[Tensor]) -> bool:
        """Whether the step's inputs are exactly this chain's last outputs (nobody replaced a
        parameter in between), so that the next step may be recorded against its anchor."""
        return tuple(active) == self.active and len(self.outputs) == len(active) and all(
            params[i] is out for i, out in zip(active, self.outputs))


higher.register_optim(LSTMMetaOptimizer, DifferentiableLSTMMetaOptimizer)
