"""Meta-training throughput and memory: first-order against second-order, and against the parts.

Omniglot 5-way 1-shot, the paper's learner (4 x conv 32 filters, 28 x 28), T = 12 inner steps,
one episode per meta-step (``--meta-batch``). Run from the repository root::

    python benchmarks/meta_train.py --data-root /work/shared/data/omniglot
    python benchmarks/meta_train.py --data-root ... --rounds 4 --json out.json   # quicker
    python benchmarks/meta_train.py --data-root ... --device cuda                # on a GPU
    python benchmarks/meta_train.py --reference --rounds 3 --threads 1   # against the reference
    python benchmarks/meta_train.py --reference --contended              # one busy process too

``--reference`` times the package's meta-step beside :class:`ReferenceTrainer`, the
straightforward implementation (``nn.LSTMCell`` over all coordinates, every intermediate kept
by autograd; first order through ``torch.autograd.grad`` on a detached flat copy of the
parameters, second order with ``create_graph=True``), at 5-way 1-shot and 20-way 5-shot
(``--settings``), first and second order, and the rule's tape paths alone; it prints each
ratio with its verdict (first order >= 2x, second order >= 1x) and the load average.
``tests/test_meta_train_reference.py`` checks that both compute the same meta-gradient.

What is measured
----------------
``episodes/s``      1 / median wall time of ``MetaTrainer.meta_step()`` (times meta_batch), over
                    ``--rounds`` rounds after warm-up. First- and second-order steps and the
                    parts below are *interleaved* round by round, so that a varying load on a
                    shared machine affects every column alike.
``saved MB``        bytes of the unique storages packed by autograd
                    (``torch.autograd.graph.saved_tensors_hooks``) during one meta-step: what
                    the tape keeps alive until the meta-backward. This is the memory that
                    differs between first and second order (second order also records the
                    learner's backward passes, ``create_graph=True``).
``peak RSS MB``     growth of the process's peak resident set during one meta-step: freed heap
                    returned with ``malloc_trim(0)``, the kernel's peak counter reset through
                    ``/proc/self/clear_refs``, then ``VmHWM - VmRSS`` (a secondary number: it
                    includes allocator slack and temporaries). With ``--device cuda``: growth
                    of ``torch.cuda.max_memory_allocated`` during the step instead.

Parts measured alone (first order), same learner and episode:
  (a) the learner: T x [forward + backward on the support set] + forward + backward on the
      query set (a plain ``ConvLearner``, ``torch.optim``-style ``.backward()``).
  (b) the meta-learner's update on the learner's number of coordinates, on the autograd tape
      as in first-order meta-training: T steps of a ``RuleTrajectory`` (with the concatenation
      of the gradients and parameters that the differentiable optimizer does) + one backward
      through the chain of T updates. Every step is recorded against the chain's start and
      saves only its gradient; the backward replays the chain chunk by chunk of rows
      (``learned_optim.rule.tape``).
  (bs) the same with one node per step, as second order records it (its gradients depend on
      the parameters, so no anchor applies): each node saves its inputs and recomputes the rest
      in a hand-written backward (``learned_optim.rule.tape``); (b0) is that with every
      operation recorded by autograd, the straightforward tape, for comparison. The in-place
      ``LSTMMetaOptimizer.step`` (no tape) is also timed (b'), for reference: meta-training
      cannot use it, because the meta-gradient needs the tape.
  (c) the meta-optimizer: gradient-norm clip + Adam step on the meta-parameters.
The target compares the first-order meta-step with (a) + (b) + (c).

Ceilings: second order runs the same update rule, so even a free update rule could not make
first order faster than (a2) / (a) times second order, nor smaller than saved(a) / saved(a2);
the report prints both next to the targets. ``--ways`` / ``--shots`` change the episode (more
support images make the learner's double backward, which first order drops, larger).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _shared import (  # noqa: E402 (sibling module)
    busy_process,
    load_average,
    quiet_stderr,
    without_compiled_rule,
)
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM  # noqa: E402
from learned_optim.config import MetaTrainConfig  # noqa: E402
from learned_optim.learners import ConvLearner, reset_batchnorm  # noqa: E402
from learned_optim.rule import policy  # noqa: E402
from learned_optim.rule.compiled import update_rows_compiled  # noqa: E402
from learned_optim.rule.math import initial_state, prepare_step  # noqa: E402
from learned_optim.rule.native_tape import update_rows_native  # noqa: E402
from learned_optim.rule.tape import RuleTrajectory, update_rows_differentiable  # noqa: E402
from learned_optim.rule.triton_tape import triton_tape_applies, update_rows_triton  # noqa: E402
from learned_optim.tasks import to_device  # noqa: E402
from learned_optim.train import MetaTrainer  # noqa: E402

TARGET_SPEEDUP = 1.5
TARGET_MEMORY_RATIO = 0.5
TARGET_OVERHEAD = 3.0
# --reference (issue 16): package episodes/s over the straightforward reference's.
TARGET_REFERENCE_SPEEDUP = 2.0  # first order
TARGET_SECOND_ORDER = 1.0  # second order, against the reference's second order


# --- memory -------------------------------------------------------------------------------------


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_growth_mb(fn) -> float | None:
    """Growth of the peak resident set during ``fn()``, in MB (Linux only)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024.0


def peak_cuda_growth_mb(fn, device: torch.device) -> float:
    """Growth of the CUDA caching allocator's peak allocation during ``fn()``, in MB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def saved_tensor_bytes(fn) -> tuple[int, int]:
    """(bytes of unique storages autograd saved during ``fn()``, number of pack calls)."""
    storages: dict[int, int] = {}
    calls = 0

    def pack(tensor):
        nonlocal calls
        calls += 1
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0),
                                               storage.nbytes())
        except (RuntimeError, NotImplementedError):
            storages[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values()), calls


# --- the straightforward reference --------------------------------------------------------------


def paper_preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s preprocessing as the paper states it, one value -> two features:
    ``(log|x| / p, sign x)`` if ``|x| >= e^-p``, else ``(-1, e^p x)``. (The log's argument is
    clamped at ``e^-p`` only so that the unused branch stays finite.)"""
    threshold = math.exp(-p)
    indicator = (x.abs() >= threshold).to(x.dtype)
    log_part = indicator * torch.log(x.abs().clamp_min(threshold)) / p - (1 - indicator)
    sign_part = indicator * torch.sign(x) + (1 - indicator) * math.exp(p) * x
    return torch.stack((log_part, sign_part), dim=1)


class StraightforwardRule(nn.Module):
    """The paper's meta-learner as the public PyTorch port writes it, all coordinates at once.

    ``nn.LSTMCell(4, H)`` over ``[N, 4]`` inputs (preprocessed gradient and loss), then the
    paper's gate layer, ``f_t = [h_t, theta_{t-1}, f_{t-1}] W_F + b_F`` (and ``i_t`` with
    ``W_I``, ``b_I``), ``theta_t = sigmoid(f_t) theta_{t-1} - sigmoid(i_t) g_t``. Every
    intermediate is kept by autograd. Built from a :class:`MetaLearnerLSTM`'s weights, so that
    both compute the same numbers: ``weight_ih``/``weight_hh`` as they are (PyTorch's gate
    order), ``bias`` in ``bias_ih`` with ``bias_hh = 0``, ``meta_weight`` rows as ``W_F``,
    ``W_I``.
    """

    def __init__(self, meta: MetaLearnerLSTM) -> None:
        super().__init__()
        hidden = meta.hidden_size
        self.p = meta.p
        self.lstm = nn.LSTMCell(4, hidden)
        self.WF = nn.Parameter(torch.empty(hidden + 2, 1))
        self.WI = nn.Parameter(torch.empty(hidden + 2, 1))
        self.bF = nn.Parameter(torch.empty(1, 1))
        self.bI = nn.Parameter(torch.empty(1, 1))
        self.to(dtype=meta.weight_ih.dtype, device=meta.weight_ih.device)
        with torch.no_grad():
            self.lstm.weight_ih.copy_(meta.weight_ih)
            self.lstm.weight_hh.copy_(meta.weight_hh)
            self.lstm.bias_ih.copy_(meta.bias)
            self.lstm.bias_hh.zero_()
            self.WF.copy_(meta.meta_weight[0].view(-1, 1))
            self.WI.copy_(meta.meta_weight[1].view(-1, 1))
            self.bF.fill_(meta.meta_bias[0].item())
            self.bI.fill_(meta.meta_bias[1].item())

    def forward(self, grad: torch.Tensor, loss: torch.Tensor, theta: torch.Tensor, state):
        """One step on flat ``grad`` and ``theta`` ``[N]``; ``state`` is ``(h, c, f, i)`` or
        ``None`` (a new task: zeros). Returns ``(theta_t, state_t)``."""
        n = theta.shape[0]
        if state is None:
            zeros = theta.new_zeros(n, self.lstm.hidden_size)
            state = (zeros, zeros, theta.new_zeros(n, 1), theta.new_zeros(n, 1))
        h, c, f_prev, i_prev = state
        grad_prep = paper_preprocess(grad, self.p)
        loss_prep = paper_preprocess(loss.reshape(1), self.p)
        inputs = torch.cat((grad_prep, loss_prep.expand(n, 2)), dim=1)
        h, c = self.lstm(inputs, (h, c))
        theta_col, grad_col = theta.unsqueeze(1), grad.unsqueeze(1)
        f_next = torch.cat((h, theta_col, f_prev), dim=1) @ self.WF + self.bF
        i_next = torch.cat((h, theta_col, i_prev), dim=1) @ self.WI + self.bI
        theta_next = torch.sigmoid(f_next) * theta_col - torch.sigmoid(i_next) * grad_col
        return theta_next.squeeze(1), (h, c, f_next, i_next)

    def gradients_as_package(self) -> dict[str, torch.Tensor]:
        """This rule's ``.grad`` laid out as :class:`MetaLearnerLSTM`'s parameters."""
        return {"weight_ih": self.lstm.weight_ih.grad, "weight_hh": self.lstm.weight_hh.grad,
                "bias": self.lstm.bias_ih.grad,
                "meta_weight": torch.cat((self.WF.grad, self.WI.grad), dim=1).t(),
                "meta_bias": torch.cat((self.bF.grad.view(1), self.bI.grad.view(1)))}


def reference_query_loss(learner: nn.Module, rule: StraightforwardRule, episode, steps: int,
                         loss_fn, first_order: bool = True) -> torch.Tensor:
    """The straightforward inner loop: ``steps`` rule updates of the learner's flat parameters
    on the support set (the learner's own weights are the learned init theta_0), then the
    query loss, on the autograd tape back to theta_0 and the rule.

    First order: each step's gradient is ``torch.autograd.grad`` of the support loss on a
    detached flat copy of theta (gradient and loss are constants); second order: the gradient
    of theta itself with ``create_graph=True``, and the loss on the tape. BatchNorm as in
    meta-training: statistics reset, train mode (batch statistics) throughout.
    """
    names = [name for name, _ in learner.named_parameters()]
    shapes = [p.shape for _, p in learner.named_parameters()]
    sizes = [shape.numel() for shape in shapes]

    def forward(flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        tensors = [piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes)]
        return torch.func.functional_call(learner, dict(zip(names, tensors)), (inputs,))

    reset_batchnorm(learner)
    learner.train()
    theta = torch.cat([p.reshape(-1) for p in learner.parameters()])
    state = None
    for _ in range(steps):
        if first_order:
            flat = theta.detach().requires_grad_()
            loss = loss_fn(forward(flat, episode.support_inputs), episode.support_targets)
            (grad,) = torch.autograd.grad(loss, flat)
            loss = loss.detach()
        else:
            loss = loss_fn(forward(theta, episode.support_inputs), episode.support_targets)
            (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta, state = rule(grad, loss, theta, state)
    return loss_fn(forward(theta, episode.query_inputs), episode.query_targets)


class ReferenceTrainer:
    """A meta-training step written the straightforward way, beside a :class:`MetaTrainer`.

    Same learner (a copy of the trainer's, so the same learned init), same rule weights, same
    episodes, same meta-batch, clip and Adam: only the implementation of the inner loop and of
    the rule differs.
    """

    def __init__(self, trainer: MetaTrainer, first_order: bool) -> None:
        self.trainer = trainer
        self.first_order = first_order
        self.learner = copy.deepcopy(trainer.learner)
        # The straightforward layout: NCHW, where the package's learner runs channels-last on
        # a CPU (learned_optim.learners.conv_memory_format).
        self.learner.channels_last = False
        # ...and plain modules, none of ConvFeatures' fused kernels (same parameter names).
        self.learner.features = nn.Sequential(*self.learner.features)
        self.rule = StraightforwardRule(trainer.rule)
        self.meta_params = list(self.rule.parameters()) + list(self.learner.parameters())
        self.adam = torch.optim.Adam(self.meta_params, lr=trainer.config.meta_lr)
        self.step = 0

    def meta_step(self) -> float:
        """One meta-update over ``meta_batch`` episodes; returns the meta-loss."""
        config, task = self.trainer.config, self.trainer.task
        episodes = task.episodes("train")
        self.adam.zero_grad(set_to_none=True)
        total = 0.0
        for slot in range(config.meta_batch):
            episode = to_device(episodes.episode(self.step * config.meta_batch + slot),
                                self.trainer.device)
            loss = reference_query_loss(self.learner, self.rule, episode, config.inner_steps,
                                        task.loss, self.first_order)
            (loss / config.meta_batch).backward()
            total += loss.item()
        nn.utils.clip_grad_norm_(self.meta_params, config.grad_clip)
        self.adam.step()
        self.step += 1
        return total / config.meta_batch


# --- the parts ----------------------------------------------------------------------------------


class Parts:
    """The pieces of one first-order meta-step, each runnable alone."""

    def __init__(self, trainer: MetaTrainer, steps: int) -> None:
        config = trainer.config
        self.steps = steps
        self.device = device = trainer.device
        episode = to_device(trainer.task.episodes("train").episode(0), device)
        self.support = (episode.support_inputs, episode.support_targets)
        self.query = (episode.query_inputs, episode.query_targets)
        torch.manual_seed(1)
        self.learner = ConvLearner(1, config.ways, config.filters, config.image_size,
                                   config.bn_momentum).to(device)
        self.learner.train()
        self.params = list(self.learner.parameters())
        # Second order runs its learner NCHW, as MetaTrainer does (conv_memory_format)
        self.learner_nchw = copy.deepcopy(self.learner)
        self.learner_nchw.channels_last = False
        self.rows = sum(p.numel() for p in self.params)
        self.rule = MetaLearnerLSTM(hidden_size=config.hidden_size).to(device)
        self.opt = LSTMMetaOptimizer(self.params, MetaLearnerLSTM(config.hidden_size).to(device))
        # Tape version: a learned init c_0 and fixed gradients (constants, as in first order),
        # drawn on the CPU so that every device times the same numbers.
        generator = torch.Generator().manual_seed(2)
        self.init = [nn.Parameter(p.detach().clone()) for p in self.params]
        self.grads = [(torch.randn(p.shape, generator=generator) * 1e-2).to(device)
                      for p in self.params]
        self.meta_params = list(self.rule.parameters()) + self.init
        self.adam = torch.optim.Adam(self.meta_params, lr=1e-3)
        for p in self.meta_params:
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(device)
        self.loss = torch.tensor(1.6, device=device)
        self.reference_rule = StraightforwardRule(self.rule)

    def learner_passes(self) -> None:
        """(a) T x forward/backward on the support set, then forward/backward on the query."""
        x, y = self.support
        for _ in range(self.steps):
            for p in self.params:
                p.grad = None
            F.cross_entropy(self.learner(x), y).backward()
        xq, yq = self.query
        F.cross_entropy(self.learner(xq), yq).backward()

    def learner_passes_second_order(self) -> None:
        """(a2) as (a), functionally, through T plain-SGD steps with ``create_graph=True`` and
        the query backward through the whole chain: the learner's share of a second-order step.
        """
        learner = self.learner_nchw
        names = [n for n, _ in learner.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in self.params]
        x, y = self.support
        for _ in range(self.steps):
            out = torch.func.functional_call(learner, dict(zip(names, params)), (x,))
            grads = torch.autograd.grad(F.cross_entropy(out, y), params, create_graph=True)
            params = [p - 0.01 * g for p, g in zip(params, grads)]
        xq, yq = self.query
        out = torch.func.functional_call(learner, dict(zip(names, params)), (xq,))
        F.cross_entropy(out, yq).backward()

    def update_on_tape(self, backward: bool = True, recompute: bool = True,
                       chain: bool = True, compiled: bool = False,
                       native: bool = False, triton: bool = False) -> None:
        """(b) T steps of the first-order trajectory on the tape, + backward;
        ``chain=False``: one node per step (bs); ``compiled``: one compiled node per step (bc);
        ``native``: one native node (bn); ``triton``: one Triton node (bt, CUDA)."""
        weights = self.rule.weights()
        params = list(self.init)
        state = initial_state(self.rows, self.rule.hidden_size, device=self.device)
        trajectory = (RuleTrajectory(state, torch.cat([p.reshape(-1) for p in params]))
                      if chain else None)
        sizes = [p.numel() for p in params]
        for _ in range(self.steps):
            constants = prepare_step(weights, self.loss, torch.float32, self.device)
            flat_grad = torch.cat([g.reshape(-1) for g in self.grads])
            if trajectory is not None:
                new_param, state = trajectory.step(constants, flat_grad)
            elif compiled or native or triton:
                node = (update_rows_native if native else update_rows_triton if triton
                        else update_rows_compiled)
                new_param, state = node(
                    constants, state, flat_grad, torch.cat([p.reshape(-1) for p in params]))
            else:
                new_param, state = update_rows_differentiable(
                    constants, state, flat_grad, torch.cat([p.reshape(-1) for p in params]),
                    recompute=recompute)
            params = [piece.view(p.shape) for piece, p in zip(new_param.split(sizes), params)]
        # the query loss's gradient w.r.t. theta_T stands in for a constant vector
        if backward:
            torch.autograd.backward(params, self.grads)
        self._kept = params  # so that the saved-tensor count sees the whole tape

    def update_per_step(self) -> None:
        """(bs) as (b), one node per step with the hand-written backward (second order's)."""
        self.update_on_tape(chain=False)

    def update_compiled(self) -> None:
        """(bc) as (bs), each step the node compiled by torch.compile (either order)."""
        self.update_on_tape(chain=False, compiled=True)

    def update_native(self) -> None:
        """(bn) as (bs), each step the node of hand-fused C++ kernels (either order)."""
        self.update_on_tape(chain=False, native=True)

    def update_triton(self) -> None:
        """(bt) as (bs), each step the node of Triton kernels (CUDA, either order)."""
        self.update_on_tape(chain=False, triton=True)

    def update_recorded(self) -> None:
        """(b0) as (bs), every operation recorded by autograd (the straightforward tape)."""
        self.update_on_tape(recompute=False, chain=False)

    def update_reference_chain(self) -> None:
        """(bref) as (b), with :class:`StraightforwardRule`: an ``nn.LSTMCell`` chain recorded
        op by op by autograd (the reference's rule, first order: gradients are constants)."""
        rule = self.reference_rule
        theta = torch.cat([p.reshape(-1) for p in self.init])
        flat_grad = torch.cat([g.reshape(-1) for g in self.grads])
        state = None
        for _ in range(self.steps):
            theta, state = rule(flat_grad, self.loss, theta, state)
        theta.backward(flat_grad)

    def update_forward_only(self) -> None:
        """(b1) the forward half of (b): T updates recorded on the tape, no backward."""
        self.update_on_tape(backward=False)
        self._kept = None

    def step_in_place(self) -> None:
        """(b') T x LSTMMetaOptimizer.step (no tape) on the learner's coordinates."""
        self.opt.reset_state()
        with torch.no_grad():
            for p, g in zip(self.params, self.grads):
                p.grad = g.clone()
        for _ in range(self.steps):
            self.opt.step(loss=self.loss)

    def adam_step(self) -> None:
        """(c) clip + Adam on the meta-parameters (rule + learned init)."""
        nn.utils.clip_grad_norm_(self.meta_params, 0.25)
        self.adam.step()


# --- package against the straightforward reference ---------------------------------------------


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"5w1s,20w5s"`` -> ``[(5, 1), (20, 5)]``."""
    settings = []
    for item in text.split(","):
        ways, shots = item.strip().lower().rstrip("s").split("w")
        settings.append((int(ways), int(shots)))
    return settings


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def compare_setting(args, ways: int, shots: int, run_root: Path) -> dict:
    """Package against reference at one episode shape: whole meta-steps, then the rule alone."""
    setting = argparse.Namespace(**{**vars(args), "ways": ways, "shots": shots})
    fo = make_trainer(setting, True, run_root / f"{ways}w{shots}s")
    eager = make_trainer(setting, True, run_root / f"{ways}w{shots}s-eager")
    # threads="auto": only the free cores for a meta-step that starts while others are busy
    fo_auto = make_trainer(setting, True, run_root / f"{ways}w{shots}s-auto", adaptive=True)
    steps = {"package, first order": fo.meta_step,
             "package, first order, threads auto": fo_auto.meta_step,
             "package, first order, not compiled": without_compiled_rule(eager.meta_step),
             "reference, first order": ReferenceTrainer(fo, first_order=True).meta_step}
    if not args.first_order_only:
        so = make_trainer(setting, False, run_root / f"{ways}w{shots}s")
        steps["package, second order"] = so.meta_step
        so_auto = make_trainer(setting, False, run_root / f"{ways}w{shots}s-auto",
                               adaptive=True)
        steps["package, second order, threads auto"] = so_auto.meta_step
        so_eager = make_trainer(setting, False, run_root / f"{ways}w{shots}s-eager")
        steps["package, second order, not compiled"] = without_compiled_rule(so_eager.meta_step)
        steps["reference, second order"] = ReferenceTrainer(so, first_order=False).meta_step
    parts = Parts(fo, args.steps)
    rule_parts = {"rule: package compiled step (bc)": parts.update_compiled,
                  "rule: package chained replay (b)": parts.update_on_tape,
                  "rule: package hand-written backward per step (bs)": parts.update_per_step,
                  "rule: package recorded op by op (b0)": parts.update_recorded,
                  "rule: reference LSTMCell chain": parts.update_reference_chain}
    if parts.device.type == "cpu":  # the native kernels are the CPU's
        rule_parts = {"rule: package native step (bn)": parts.update_native, **rule_parts}
    timed_fns = {**steps, **rule_parts}
    for _ in range(args.warmup):
        for fn in timed_fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in timed_fns}
    for _ in range(args.rounds):  # interleaved: a changing load hits every column alike
        for name, fn in timed_fns.items():
            times[name].append(timed(fn, parts.device))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {"first order": median["reference, first order"] / median["package, first order"]}
    if not args.first_order_only:
        ratios["second order"] = (median["reference, second order"]
                                  / median["package, second order"])
    fastest_rule = min(rule_parts, key=median.get)
    print(f"\n## Omniglot {ways}-way {shots}-shot, T = {args.steps}, {args.filters} filters: "
          f"{parts.rows:,} coordinates; {args.rounds} interleaved rounds after {args.warmup} "
          f"warm-up; {load_average()}\n")
    print("| measurement | ms (median) | all rounds, ms |")
    print("|---|---|---|")
    for name in timed_fns:
        rounds = ", ".join(f"{t * 1e3:.0f}" for t in times[name])
        print(f"| {name} | {median[name] * 1e3:.1f} | {rounds} |")
    print()
    targets = {"first order": TARGET_REFERENCE_SPEEDUP, "second order": TARGET_SECOND_ORDER}
    verdicts = {}
    for order, ratio in ratios.items():
        verdicts[order] = ratio >= targets[order]
        print(f"{verdict(verdicts[order])}: {ways}-way {shots}-shot {order}, package = "
              f"{ratio:.2f}x as fast as the reference (target >= {targets[order]:g}x)")
    auto = {order: median[f"package, {order}"] / median[f"package, {order}, threads auto"]
            for order in ratios}
    print("threads auto (only the free cores while other processes hold some): "
          + ", ".join(f"{order} {speedup:.2f}x as fast as torch's threads"
                      for order, speedup in auto.items()))
    print(f"fastest rule path at {parts.rows:,} coordinates: {fastest_rule} "
          f"({median[fastest_rule] * 1e3:.1f} ms for T = {args.steps} steps + backward)")
    return {"ways": ways, "shots": shots, "coordinates": parts.rows, "median_s": median,
            "all_s": times, "speedups": ratios, "verdicts": verdicts,
            "threads_auto_speedups": auto,
            "fastest_rule_path": fastest_rule, "load_average_end": os.getloadavg()}


def compare_with_reference(args, argv) -> int:
    """``--reference``: the package's meta-step against the straightforward one."""
    threads = args.threads or policy.usable_cores()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    print(f"# Package against the straightforward reference (benchmarks/meta_train.py)\n\n"
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device "
          f"{args.device} ({device_name(torch.device(args.device))}); replay chunks of "
          f"{policy.replay_chunk_bytes(torch.device(args.device)) / 2**20:g} MB; "
          f"{'contended: one busy single-threaded process running; ' if args.contended else ''}"
          f"{load_average()} (start)")
    run_root = Path(tempfile.mkdtemp(prefix="meta_train_reference_"))
    results = []
    with busy_process(args.contended):
        for ways, shots in parse_settings(args.settings):
            results.append(compare_setting(args, ways, shots, run_root))
    elapsed = time.perf_counter() - started
    print(f"\n{load_average()} (end); run time {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "setting": {"inner_steps": args.steps, "filters": args.filters,
                        "meta_batch": args.meta_batch, "rounds": args.rounds,
                        "threads": threads, "contended": args.contended,
                        "device": args.device, "device_name": device_name(
                            torch.device(args.device)),
                        "replay_chunk_bytes": policy.replay_chunk_bytes(
                            torch.device(args.device)),
                        "command": " ".join(argv if argv is not None else sys.argv[1:])},
            "results": results, "run_time_s": elapsed}, indent=2))
    if args.markdown:
        report = sys.stdout.text()
        sys.stdout = sys.stdout.stream
        Path(args.markdown).write_text(
            f"Generated by `python benchmarks/meta_train.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n{report}")
    return 0


# --- main ---------------------------------------------------------------------------------------


def make_trainer(args, first_order: bool, run_root: Path, adaptive: bool = False) -> MetaTrainer:
    """A :class:`MetaTrainer` on Omniglot with the benchmark's episode shape (no validation);
    ``adaptive``: its meta-steps choose their threads (``threads="auto"``)."""
    config = MetaTrainConfig(
        task="omniglot", data_root=args.data_root, ways=args.ways, shots=args.shots,
        inner_steps=args.steps,
        filters=args.filters, image_size=28, meta_batch=args.meta_batch, meta_steps=10**6,
        first_order=first_order, validate_every=10**6, checkpoint_every=10**6, seed=0,
        device=args.device,
        run_dir=str(run_root / ("first" if first_order else "second")),
    )
    return MetaTrainer(config, progress=False, adaptive_threads=adaptive)


def profile_step(trainer: MetaTrainer, rows: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile

    on_cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities) as prof:
        trainer.meta_step()
        synchronize(trainer.device)
    sort_by = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that wall time covers them (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What ran the benchmark, for the report: the GPU's name or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def timed(fn, device: torch.device) -> float:
    """Wall seconds of ``fn()``, queued device work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="/work/shared/data/omniglot")
    parser.add_argument("--steps", type=int, default=12, help="inner steps T (paper 1-shot: 12)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--meta-batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="torch.profiler tables: when a target fails (auto), always, never")
    parser.add_argument("--replay-chunk-mb", type=float,
                        help="memory of one chunk of the first-order replay, on every device "
                             "(default: the package's per-device choice)")
    parser.add_argument("--reference", action="store_true",
                        help="time the package against the straightforward reference "
                             "(issue 16) at --settings instead of the first/second-order report")
    parser.add_argument("--settings", default="5w1s,20w5s",
                        help="--reference: episode shapes, comma list of <ways>w<shots>s")
    parser.add_argument("--first-order-only", action="store_true",
                        help="--reference: skip the second-order comparison")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: 1; with --reference, the usable cores)")
    parser.add_argument("--contended", action="store_true",
                        help="run one busy single-threaded process of our own meanwhile")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--markdown", help="also write the printed report to this file")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout = _Tee(sys.stdout)
    if args.replay_chunk_mb is not None:
        chunk_bytes = int(args.replay_chunk_mb * 2**20)
        policy.REPLAY_CHUNK_BYTES = policy.ACCELERATOR_REPLAY_CHUNK_BYTES = chunk_bytes
    if args.reference:
        return compare_with_reference(args, argv)
    with busy_process(args.contended):
        return first_and_second_order(args, argv)


def first_and_second_order(args, argv) -> int:
    """The default report: first- against second-order meta-steps, and their parts."""
    torch.set_num_threads(args.threads or 1)
    started = time.perf_counter()
    print(f"Setting: Omniglot {args.ways}-way {args.shots}-shot, T = {args.steps}, filters "
          f"{args.filters}, meta_batch {args.meta_batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); device {args.device} "
          f"({device_name(torch.device(args.device))}); replay chunks of "
          f"{policy.replay_chunk_bytes(torch.device(args.device)) / 2**20:g} MB; "
          f"{load_average()} (start)")

    run_root = Path(tempfile.mkdtemp(prefix="meta_train_bench_"))
    trainers = {"first-order": make_trainer(args, True, run_root),
                "second-order": make_trainer(args, False, run_root)}
    parts = Parts(trainers["first-order"], args.steps)
    part_fns = {"(a) learner fwd/bwd": parts.learner_passes,
                "(a2) learner, second order (create_graph)": parts.learner_passes_second_order,
                "(b) meta-learner update, on tape": parts.update_on_tape,
                "(bs) the same, one node per step": parts.update_per_step,
                "(b0) one node per step, recorded op by op": parts.update_recorded,
                "(b1) of which forward only": parts.update_forward_only,
                "(b') LSTMMetaOptimizer.step, in place": parts.step_in_place,
                "(c) clip + Adam": parts.adam_step}
    if triton_tape_applies(parts.grads[0], parts.rule.hidden_size):  # second order's, on CUDA
        part_fns["(bt) the same, one Triton node per step"] = parts.update_triton

    for _ in range(args.warmup):
        for trainer in trainers.values():
            trainer.meta_step()
        for fn in part_fns.values():
            fn()

    times: dict[str, list[float]] = {name: [] for name in [*trainers, *part_fns]}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            times[name].append(timed(trainer.meta_step, parts.device))
        for name, fn in part_fns.items():
            times[name].append(timed(fn, parts.device))
    median = {name: statistics.median(values) for name, values in times.items()}

    on_cuda = parts.device.type == "cuda"
    memory = {}
    for name, trainer in trainers.items():
        saved, calls = saved_tensor_bytes(trainer.meta_step)
        rss = (peak_cuda_growth_mb(trainer.meta_step, parts.device)
               if on_cuda else peak_rss_growth_mb(trainer.meta_step))
        memory[name] = {"saved_mb": saved / 2**20, "pack_calls": calls, "peak_rss_mb": rss}

    part_saved = {}
    for name, fn in (("(a) learner fwd/bwd", parts.learner_passes),
                     ("(a2) learner, second order (create_graph)",
                      parts.learner_passes_second_order),
                     ("(b) meta-learner update, on tape", parts.update_on_tape),
                     ("(bs) the same, one node per step", parts.update_per_step),
                     ("(b0) one node per step, recorded op by op", parts.update_recorded)):
        part_saved[name] = saved_tensor_bytes(fn)[0] / 2**20
    parts._kept = None

    fo, so = "first-order", "second-order"
    eps = {n: args.meta_batch / median[n] for n in trainers}
    print(f"\nlearner coordinates: {parts.rows:,}; meta-learner parameters: "
          f"{sum(p.numel() for p in parts.rule.parameters()):,}; "
          f"{args.rounds} timed rounds after {args.warmup} warm-up")
    peak_label = "peak CUDA MB" if on_cuda else "peak RSS MB"
    print(f"\n| mode | ms / meta-step | episodes/s | saved MB | pack calls | {peak_label} |")
    print("|---|---|---|---|---|---|")
    for name in trainers:
        m = memory[name]
        rss = "n/a" if m["peak_rss_mb"] is None else f"{m['peak_rss_mb']:.1f}"
        print(f"| {name} | {median[name] * 1e3:.1f} | {eps[name]:.2f} | {m['saved_mb']:.1f} | "
              f"{m['pack_calls']} | {rss} |")
    speedup = eps[fo] / eps[so]
    mem_ratio = memory[fo]["saved_mb"] / memory[so]["saved_mb"]
    rss_ratio = (None if not memory[so]["peak_rss_mb"] else
                 memory[fo]["peak_rss_mb"] / memory[so]["peak_rss_mb"])
    print(f"| ratio first/second | {median[fo] / median[so]:.3f} | {speedup:.2f}x | "
          f"{mem_ratio:.3f} | | {'n/a' if rss_ratio is None else f'{rss_ratio:.3f}'} |")

    print("\n| part (alone) | ms (median) | saved MB |")
    print("|---|---|---|")
    for name in part_fns:
        saved = f"{part_saved[name]:.1f}" if name in part_saved else ""
        print(f"| {name} | {median[name] * 1e3:.1f} | {saved} |")
    parts_sum = (median["(a) learner fwd/bwd"] + median["(b) meta-learner update, on tape"]
                 + median["(c) clip + Adam"]) * args.meta_batch
    parts_sum_in_place = (median["(a) learner fwd/bwd"]
                          + median["(b') LSTMMetaOptimizer.step, in place"]
                          + median["(c) clip + Adam"]) * args.meta_batch
    overhead = median[fo] / parts_sum
    print(f"| sum (a) + (b) + (c), x meta_batch | {parts_sum * 1e3:.1f} | |")
    print(f"| first-order meta-step / sum | {overhead:.2f}x | |")
    print(f"| (for reference) first-order meta-step / [(a) + (b') + (c)] | "
          f"{median[fo] / parts_sum_in_place:.2f}x | |")
    parts_sum_so = (median["(a2) learner, second order (create_graph)"]
                    + median["(bs) the same, one node per step"]
                    + median["(c) clip + Adam"]) * args.meta_batch
    print(f"| (for reference) second-order meta-step / [(a2) + (bs) + (c)] | "
          f"{median[so] / parts_sum_so:.2f}x | |")
    share_time = median["(b) meta-learner update, on tape"] * args.meta_batch / median[fo]
    share_mem = part_saved["(b) meta-learner update, on tape"] / memory[fo]["saved_mb"]
    a1, a2 = "(a) learner fwd/bwd", "(a2) learner, second order (create_graph)"
    b, bs = "(b) meta-learner update, on tape", "(bs) the same, one node per step"
    b0 = "(b0) one node per step, recorded op by op"
    per_step = {name: part_saved[name] * 2**20 / (parts.rows * args.steps) for name in (b, bs, b0)}
    print(f"\nThe meta-learner's first-order tape (b) is {share_time:.0%} of the first-order "
          f"step's time and {share_mem:.0%} of its saved tensors. Second order adds the "
          f"learner's double-backward tape, (a2) - (a) = "
          f"{(median[a2] - median[a1]) * 1e3:.0f} ms, "
          f"{part_saved[a2] - part_saved[a1]:.1f} MB, and records the rule one node per step, "
          f"(bs) - (b) = {(median[bs] - median[b]) * 1e3:.0f} ms, "
          f"{part_saved[bs] - part_saved[b]:.1f} MB; "
          f"measured second - first: {(median[so] - median[fo]) * 1e3:.0f} ms, "
          f"{memory[so]['saved_mb'] - memory[fo]['saved_mb']:.1f} MB. Per coordinate and "
          f"inner step the meta-learner's tape keeps {per_step[b]:.0f} bytes in first order "
          f"(the gradient, plus the chain's start spread over T steps), {per_step[bs]:.0f} "
          f"bytes one node per step (its inputs: state, gradient, parameter) and "
          f"{per_step[b0]:.0f} bytes recorded op by op ((b0), {median[b0] / median[bs]:.2f}x "
          f"the time of (bs)), against "
          f"{part_saved[a1] * 2**20 / parts.rows:.0f} bytes per coordinate "
          f"for the learner's whole first-order episode.")
    speed_ceiling = (median[a2] + median["(c) clip + Adam"]) / (median[a1]
                                                               + median["(c) clip + Adam"])
    memory_floor = part_saved[a1] / part_saved[a2]
    print(f"\nCeilings: with an update rule that cost nothing, first order could be at most "
          f"{speed_ceiling:.2f}x faster than second order ((a2) / (a)) and no smaller than "
          f"{memory_floor:.2f} of it (saved (a) / (a2)).")

    verdicts = {
        "speed": speedup >= TARGET_SPEEDUP,
        "memory": mem_ratio <= TARGET_MEMORY_RATIO,
        "overhead": overhead <= TARGET_OVERHEAD,
    }
    print()
    print(f"{'PASS' if verdicts['speed'] else 'FAIL'}: first-order episodes/s = {speedup:.2f}x "
          f"second-order (target >= {TARGET_SPEEDUP}x)")
    print(f"{'PASS' if verdicts['memory'] else 'FAIL'}: first-order saved-tensor memory = "
          f"{mem_ratio:.2f} of second-order (target <= {TARGET_MEMORY_RATIO}); {peak_label} growth "
          f"ratio {'n/a' if rss_ratio is None else f'{rss_ratio:.2f}'} (secondary)")
    print(f"{'PASS' if verdicts['overhead'] else 'FAIL'}: first-order meta-step = "
          f"{overhead:.2f}x the sum of its parts (target <= {TARGET_OVERHEAD}x)")

    profiles = {}
    if args.profile == "always" or (args.profile == "auto" and not all(verdicts.values())):
        for name, trainer in trainers.items():
            with quiet_stderr():
                profiles[name] = profile_step(trainer)
            clock = "CUDA" if on_cuda else "CPU"
            print(f"\n## torch.profiler, one {name} meta-step (top ops by self {clock} time)\n")
            print("\n".join("    " + line for line in profiles[name].splitlines()))
    elapsed = time.perf_counter() - started
    print(f"\n{load_average()} (end); run time {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "setting": {"task": "omniglot", "ways": args.ways, "shots": args.shots,
                        "inner_steps": args.steps,
                        "filters": args.filters, "meta_batch": args.meta_batch,
                        "rounds": args.rounds, "threads": torch.get_num_threads(),
                        "device": str(parts.device), "device_name": device_name(parts.device),
                        "replay_chunk_bytes": policy.replay_chunk_bytes(parts.device),
                        "load_average_end": os.getloadavg()},
            "median_s": median, "all_s": times, "episodes_per_s": eps, "memory": memory,
            "speedup": speedup, "saved_memory_ratio": mem_ratio, "rss_ratio": rss_ratio,
            "parts_sum_s": parts_sum, "parts_saved_mb": part_saved, "overhead": overhead,
            "speed_ceiling": speed_ceiling, "memory_floor": memory_floor,
            "verdicts": verdicts,
            "run_time_s": elapsed}, indent=2))
    if args.markdown:
        report = sys.stdout.text()
        sys.stdout = sys.stdout.stream
        Path(args.markdown).write_text(
            "# Meta-training throughput and memory (benchmarks/meta_train.py)\n\n"
            "Generated by `python benchmarks/meta_train.py "
            + " ".join(argv if argv is not None else sys.argv[1:]) + "`.\n\n"
            + report)
    return 0


class _Tee:
    """Write to a stream and remember what was written."""

    def __init__(self, stream) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)


if __name__ == "__main__":
    raise SystemExit(main())
