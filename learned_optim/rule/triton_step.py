"""The in-place step as one Triton kernel on a CUDA device.

Eager on a GPU, :func:`~learned_optim.rule.math.update_rows` is some twenty kernels a chunk:
the layer-1 product writes the ``[4H, n]`` gates (320 bytes a coordinate at H = 20) and every
elementwise pass reads and writes a slab of them again, so a step moves several times the
state's own bytes and, on small parameters, waits on launches. Here one program takes
``BLOCK`` coordinates through the whole rule in registers, as the CPU's kernel
(:mod:`learned_optim.rule.native`) takes 16: it reads each coordinate's feature-major state,
gradient and value once and writes the state and value once, 87 floats a coordinate, which is
the traffic the issue's bandwidth floor counts.

The layer-1 product is ``2 + H`` outer products into four ``[BLOCK, HP]`` accumulators (one
a gate, ``HP`` the hidden size rounded up to a power of two), in the same order of inputs as
the CPU's kernel; float32 FMAs, no TF32, so the result is the CPU's to float32 rounding (the
meta-gates' sum over the hidden units is a tree here, a chain there). The g columns are doubled
by :func:`~learned_optim.rule.math.prepare_rule`, so ``tanh`` is ``2 sigmoid(2x) - 1`` as in
the other paths.

Triton is optional: where it does not import (no GPU build of torch), :func:`triton_available`
is false and ``step()`` takes its chunk path. With ``TRITON_INTERPRET=1`` set before Triton is
imported, the same kernel runs in Triton's interpreter on CPU tensors, which is how the tests
check it on a machine without a GPU.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from learned_optim.rule.math import Normalisation, StepConstants, normalisation
from learned_optim.rule.native import (
    bucket_table,
    check_bucket,
    check_layout,
    native_constants,
    normalisation_args,
    rule_scalars,
)

try:  # optional: installed beside CUDA builds of torch
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - missing, or broken beside this torch: the eager paths serve
    triton = tl = None

__all__ = ["BLOCK_ROWS", "FP_FUSION", "NUM_WARPS", "cell_and_meta_gates", "hidden_lanes",
           "interpreting", "jit", "load_meta_weights", "preprocess_gradient", "probed",
           "step_bucket_triton", "step_rows_triton", "step_rows_triton_out", "triton_available",
           "triton_step_usable"]

# Coordinates a program takes, and its warps. Four [BLOCK, 32] float32 accumulators (H = 20)
# are 32 registers a thread at 64 rows and 4 warps; untuned until a GPU measures it
# (benchmarks/step_gpu.py --triton-block).
BLOCK_ROWS = 64
NUM_WARPS = 4
# Products and sums contract to FMAs, as in the CPU kernels (at::vec::fmadd): Triton's default
# up to 3.9, which 3.10 turns off; asked for explicitly so that the rounding does not change
# with Triton's version.
FP_FUSION = True


def triton_available() -> bool:
    """Whether Triton imports here (it does beside CUDA builds of torch).

    >>> isinstance(triton_available(), bool)
    True
    """
    return triton is not None


def jit(**options):
    """``triton.jit`` where Triton imports (a plain function otherwise: never called)."""
    return (lambda fn: triton.jit(fn, **options)) if triton is not None else (lambda fn: fn)


@jit()
def preprocess_gradient(g, p, threshold, exp_p):
    """Andrychowicz et al.'s two features of the gradient ``g``: ``(large, log part, sign
    part)``, ``(log|g| / p, sign g)`` where ``large`` (``|g| >= e^-p``), else ``(-1, e^p g)``."""
    magnitude = tl.abs(g)
    large = magnitude >= threshold
    log_part = tl.where(large, tl.log(tl.maximum(magnitude, threshold)) / p, -1.0)
    sign = tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))
    return large, log_part, tl.where(large, sign, g * exp_p)


@jit()
def load_meta_weights(meta_h_ptr, meta_small_ptr, H: tl.constexpr, HP: tl.constexpr):
    """Layer 2's weights: the h1 rows of (f_pre, i_pre), ``[HP]`` each (zeros past ``H``),
    then the theta, previous pre-activation and bias weights of each."""
    units = tl.arange(0, HP)
    in_units = units < H
    return (tl.load(meta_h_ptr + units, mask=in_units, other=0.0),
            tl.load(meta_h_ptr + H + units, mask=in_units, other=0.0),
            tl.load(meta_small_ptr + 0), tl.load(meta_small_ptr + 1),
            tl.load(meta_small_ptr + 2), tl.load(meta_small_ptr + 3),
            tl.load(meta_small_ptr + 4), tl.load(meta_small_ptr + 5))


@jit()
def cell_and_meta_gates(in_gate, forget_gate, out_gate, g_sigmoid, c_prev, slab, theta, f_prev,
                        i_prev, meta_f, meta_i, m_theta_f, m_theta_i, m_prev_f, m_prev_i,
                        m_bias_f, m_bias_i):
    """From layer 1's gate sigmoids (the g gate's of the doubled pre-activation): the cell,
    ``tanh(c) = 2 sigmoid(2c) - 1``, h1 (zeros outside ``slab``) and layer 2's
    pre-activations: ``(c, tanh_c, h1, f_pre, i_pre)``."""
    c = forget_gate * c_prev + in_gate * (g_sigmoid * 2.0 - 1.0)
    tanh_c = tl.sigmoid(c * 2.0) * 2.0 - 1.0
    h1 = tl.where(slab, out_gate * tanh_c, 0.0)
    f_pre = tl.sum(h1 * meta_f[None, :], axis=1) + m_bias_f + theta * m_theta_f + f_prev * m_prev_f
    i_pre = tl.sum(h1 * meta_i[None, :], axis=1) + m_bias_i + theta * m_theta_i + i_prev * m_prev_i
    return c, tanh_c, h1, f_pre, i_pre


@jit()
def _forward_rows(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_ptr, stride, g, theta,
                  rows, in_rows, p, threshold, exp_p, H: tl.constexpr, HP: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The rule's forward on ``BLOCK`` rows (``rows``, int64; ``in_rows`` their mask) of a
    feature-major state ``stride`` floats a feature, their gradient ``g`` and values
    ``theta``: ``(c, h1, f_pre, i_pre)``."""
    units = tl.arange(0, HP)
    in_units = units < H
    slab = in_rows[:, None] & in_units[None, :]
    K = H + 2
    _, log_part, sign_part = preprocess_gradient(g, p, threshold, exp_p)
    # Layer 1: gates (i, f, o, 2g) of [BLOCK, HP] as K outer products, the CPU kernel's order
    # of inputs; weight row j holds gate j's K inputs.
    zeros = tl.zeros([BLOCK, HP], dtype=tl.float32)
    acc_i = zeros + tl.load(bias_ptr + units, mask=in_units, other=0.0)[None, :]
    acc_f = zeros + tl.load(bias_ptr + H + units, mask=in_units, other=0.0)[None, :]
    acc_o = zeros + tl.load(bias_ptr + 2 * H + units, mask=in_units, other=0.0)[None, :]
    acc_g = zeros + tl.load(bias_ptr + 3 * H + units, mask=in_units, other=0.0)[None, :]
    for k in tl.static_range(2 + H):
        if k == 0:
            x = log_part
        elif k == 1:
            x = sign_part
        else:  # h1 of the previous step, feature k - 2
            x = tl.load(state_ptr + (k - 2) * stride + rows, mask=in_rows, other=0.0)
        x = x[:, None]
        acc_i += x * tl.load(weight_ptr + units * K + k, mask=in_units, other=0.0)[None, :]
        acc_f += x * tl.load(weight_ptr + (H + units) * K + k, mask=in_units, other=0.0)[None, :]
        acc_o += x * tl.load(weight_ptr + (2 * H + units) * K + k, mask=in_units,
                             other=0.0)[None, :]
        acc_g += x * tl.load(weight_ptr + (3 * H + units) * K + k, mask=in_units,
                             other=0.0)[None, :]
    c_prev = tl.load(state_ptr + (H + units)[None, :] * stride + rows[:, None], mask=slab,
                     other=0.0)
    f_prev = tl.load(state_ptr + (2 * H) * stride + rows, mask=in_rows, other=0.0)
    i_prev = tl.load(state_ptr + (2 * H + 1) * stride + rows, mask=in_rows, other=0.0)
    c, _, h1, f_pre, i_pre = cell_and_meta_gates(
        tl.sigmoid(acc_i), tl.sigmoid(acc_f), tl.sigmoid(acc_o), tl.sigmoid(acc_g), c_prev,
        slab, theta, f_prev, i_prev, *load_meta_weights(meta_h_ptr, meta_small_ptr, H, HP))
    return c, h1, f_pre, i_pre


@jit()
def _lerp(start, end, w):
    """``torch.lerp(start, end, w)`` as ATen computes it: one FMA, its form chosen by
    ``|w| < 1/2``."""
    small = (w < 0.5) & (w > -0.5)
    return tl.fma(end - start, tl.where(small, w, w - 1.0), tl.where(small, start, end))


@jit()
def _normalised_gradient(g, moments_ptr, n, rows, in_rows, mean_weight, square_weight,
                         mean_scale, square_debias):
    """:func:`~learned_optim.rule.math.scale_gradient` of ``g`` at these rows, its moments
    (``[2, n]``: m, then v) updated in place."""
    mean = _lerp(tl.load(moments_ptr + rows, mask=in_rows, other=0.0), g, mean_weight)
    square = _lerp(tl.load(moments_ptr + n + rows, mask=in_rows, other=0.0), g * g,
                   square_weight)
    tl.store(moments_ptr + rows, mean, mask=in_rows)
    tl.store(moments_ptr + n + rows, square, mask=in_rows)
    rms = tl.sqrt_rn(tl.div_rn(square, square_debias))
    return tl.div_rn(mean * mean_scale, rms + 1e-12)


# Sizes that vary call by call: specialised (a value of 1, or divisibility by 16), each would
# compile the kernel again.
_NOT_SPECIALISED = ("n", "stride_in", "stride_out")


@jit()
def _step_block(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_in_ptr, state_out_ptr,
                grad_ptr, theta_in_ptr, theta_out_ptr, block, n, stride_in, stride_out, p,
                threshold, exp_p, lr, decay, moments_ptr, mean_weight, square_weight,
                mean_scale, square_debias, H: tl.constexpr, HP: tl.constexpr,
                BLOCK: tl.constexpr, NORMALISE: tl.constexpr):
    """One step on rows ``block * BLOCK ..`` of ``n``; in place where the in and out pointers
    are the same (a program reads all its rows before it writes them). ``NORMALISE``: the
    rule reads ``scale_gradient``'s gradient, its moments at ``moments_ptr`` (see
    :func:`learned_optim.rule.native.normalisation_args`)."""
    # Rows in int64: a feature's offset reaches 2H + 1 strides of n rows.
    rows = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_rows = rows < n
    units = tl.arange(0, HP)
    slab = in_rows[:, None] & (units < H)[None, :]
    stride_in = stride_in.to(tl.int64)
    stride_out = stride_out.to(tl.int64)
    g = tl.load(grad_ptr + rows, mask=in_rows, other=0.0)
    theta = tl.load(theta_in_ptr + rows, mask=in_rows, other=0.0)
    if NORMALISE:
        g = _normalised_gradient(g, moments_ptr, n.to(tl.int64), rows, in_rows, mean_weight,
                                 square_weight, mean_scale, square_debias)
    c, h1, f_pre, i_pre = _forward_rows(
        weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_in_ptr, stride_in, g, theta,
        rows, in_rows, p, threshold, exp_p, H, HP, BLOCK)
    proposed = tl.sigmoid(f_pre) * theta - tl.sigmoid(i_pre) * g
    # lr and decoupled decay as the CPU kernel applies them (torch.lerp's two forms).
    if lr != 1.0:
        if lr < 0.5:
            proposed = theta + lr * (proposed - theta)
        else:
            proposed = proposed - (proposed - theta) * (1.0 - lr)
    if decay != 0.0:
        proposed = proposed - decay * theta
    tl.store(state_out_ptr + units[None, :] * stride_out + rows[:, None], h1, mask=slab)
    tl.store(state_out_ptr + (H + units)[None, :] * stride_out + rows[:, None], c, mask=slab)
    tl.store(state_out_ptr + (2 * H) * stride_out + rows, f_pre, mask=in_rows)
    tl.store(state_out_ptr + (2 * H + 1) * stride_out + rows, i_pre, mask=in_rows)
    tl.store(theta_out_ptr + rows, proposed, mask=in_rows)


# Sizes that vary call by call: specialised (a value of 1, or divisibility by 16), each would
# compile the kernel again.
_NOT_SPECIALISED = ("n", "stride_in", "stride_out")


@jit(do_not_specialize=_NOT_SPECIALISED)
def _rule_step(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_in_ptr, state_out_ptr,
               grad_ptr, theta_in_ptr, theta_out_ptr, n, stride_in, stride_out, p, threshold,
               exp_p, lr, decay, moments_ptr, mean_weight, square_weight, mean_scale,
               square_debias, H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr,
               NORMALISE: tl.constexpr):
    """One step of one tensor, ``BLOCK`` rows a program (:func:`_step_block`)."""
    _step_block(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_in_ptr, state_out_ptr,
                grad_ptr, theta_in_ptr, theta_out_ptr, tl.program_id(0), n, stride_in,
                stride_out, p, threshold, exp_p, lr, decay, moments_ptr, mean_weight,
                square_weight, mean_scale, square_debias, H, HP, BLOCK, NORMALISE)


@jit(do_not_specialize=("tensors", "stride"))
def _rule_step_bucket(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, table_ptr, numbers_ptr,
                      tensors, stride, p, threshold, exp_p, lr, decay, H: tl.constexpr,
                      HP: tl.constexpr, BLOCK: tl.constexpr, NORMALISE: tl.constexpr):
    """One step, in place, of every tensor of a bucket (the state rows of each in one
    feature-major buffer ``stride`` floats a feature): ``BLOCK`` rows of one tensor a
    program, found by bisecting the entries' first blocks. ``table`` holds six int64 an
    entry: rows, the addresses of its state rows, gradient, values and moments, and its
    first block; ``numbers`` its normalisation's four."""
    program = tl.program_id(0)
    low = program * 0
    high = low + tensors  # entry `low` starts at or before this program, `high` after it
    while high - low > 1:
        middle = (low + high) // 2
        if tl.load(table_ptr + middle * 6 + 5) <= program:
            low = middle
        else:
            high = middle
    entry = table_ptr + low.to(tl.int64) * 6
    state_ptr = tl.load(entry + 1).to(tl.pointer_type(tl.float32))
    theta_ptr = tl.load(entry + 3).to(tl.pointer_type(tl.float32))
    numbers = numbers_ptr + low.to(tl.int64) * 4
    _step_block(weight_ptr, bias_ptr, meta_h_ptr, meta_small_ptr, state_ptr, state_ptr,
                tl.load(entry + 2).to(tl.pointer_type(tl.float32)), theta_ptr, theta_ptr,
                program - tl.load(entry + 5), tl.load(entry), stride, stride, p, threshold,
                exp_p, lr, decay, tl.load(entry + 4).to(tl.pointer_type(tl.float32)),
                tl.load(numbers), tl.load(numbers + 1), tl.load(numbers + 2),
                tl.load(numbers + 3), H, HP, BLOCK, NORMALISE)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter, on CPU tensors: ``TRITON_INTERPRET=1``
    when Triton was imported (how the tests check the kernel without a GPU).

    >>> isinstance(interpreting(), bool)
    True
    """
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def step_rows_triton(constants: StepConstants, state: Tensor, grad: Tensor, param: Tensor,
                     lr: float = 1.0, weight_decay: float = 0.0, *,
                     kernel_constants: tuple | None = None,
                     normalisation: Normalisation | None = None, block: int = BLOCK_ROWS,
                     num_warps: int = NUM_WARPS) -> None:
    """One step of the rule for ``n`` coordinates, in place, as one Triton kernel: the same
    contract as :func:`learned_optim.rule.native.step_rows_native` (feature-major ``state``
    ``[n, 2H + 2]``, contiguous ``grad`` and ``param`` ``[n]``, float32, ``lr`` and decoupled
    ``weight_decay``, and ``normalisation``, the gradient normalisation with its moments
    updated in place), on a CUDA device.

    ``kernel_constants``: :func:`learned_optim.rule.native.native_constants` of the same
    constants (the same layout serves both kernels). ``block`` and ``num_warps``: the launch's
    shape (``block`` a power of two). Under Triton's interpreter (:func:`interpreting`) the
    tensors are CPU ones. The caller checks :func:`triton_available`.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step, update_rows
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), torch.tensor(1.0), torch.float32)
    >>> state = initial_state(3, 20, feature_major=True)
    >>> grad, theta = torch.ones(3), torch.zeros(3)
    >>> expected, _ = update_rows(constants, state, grad, theta)
    >>> device = "cpu" if interpreting() else "cuda"
    >>> if triton_available() and (interpreting() or torch.cuda.is_available()):
    ...     state, grad, theta = state.to(device), grad.to(device), theta.to(device)
    ...     step_rows_triton(constants._replace(**{name: getattr(constants, name).to(device)
    ...                      for name in constants._fields if name != "p"}), state, grad, theta)
    ...     torch.testing.assert_close(theta.cpu(), expected)
    """
    rows = grad.shape[0]
    hidden = constants.meta_weight_h.shape[0]
    kernel = "the Triton step kernel" + (" (TRITON_INTERPRET=1)" if interpreting() else "")
    check_layout(state, grad, param, rows, hidden, device="cpu" if interpreting() else "cuda",
                 kernel=kernel)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16, got {block}")
    moments, normalise, *numbers = normalisation_args(
        normalisation, rows, device="cpu" if interpreting() else "cuda", kernel=kernel)
    if rows == 0:
        return
    if kernel_constants is None:
        kernel_constants = native_constants(constants)
    stride = state.stride(1)
    _rule_step[(triton.cdiv(rows, block),)](
        *kernel_constants, state, state, grad, param, param, rows, stride, stride,
        *rule_scalars(constants.p), float(lr), float(lr) * float(weight_decay),
        grad if not normalise else moments, *numbers, H=hidden, HP=hidden_lanes(hidden),
        BLOCK=block, NORMALISE=bool(normalise), num_warps=num_warps,
        enable_fp_fusion=FP_FUSION)


def step_bucket_triton(constants: StepConstants, buffer: Tensor, grads: list[Tensor | None],
                       params: list[Tensor], lr: float = 1.0, weight_decay: float = 0.0, *,
                       kernel_constants: tuple | None = None,
                       normalisations: list[Normalisation | None] | None = None,
                       block: int = BLOCK_ROWS, num_warps: int = NUM_WARPS) -> None:
    """:func:`step_rows_triton` for a bucket of parameters whose state rows lie one after
    another in ``buffer``, as one launch (the contract of
    :func:`learned_optim.rule.native.step_bucket_native`): a model of many small tensors
    waits on one launch, not one each. The bucket's description (addresses, lengths, its
    normalisations' numbers) goes to the device as two small tensors.

    >>> from learned_optim import MetaLearnerLSTM
    >>> from learned_optim.rule.math import initial_state, prepare_step, update_rows
    >>> constants = prepare_step(MetaLearnerLSTM().weights(), None, torch.float32)
    >>> device = "cpu" if interpreting() else "cuda"
    >>> if triton_available() and (interpreting() or torch.cuda.is_available()):
    ...     buffer = initial_state(5, 20, feature_major=True).to(device)
    ...     params = [torch.zeros(3, device=device), torch.ones(2, device=device)]
    ...     expected, _ = update_rows(constants, buffer.cpu(), torch.ones(5),
    ...                               torch.cat(params).cpu())
    ...     step_bucket_triton(constants._replace(**{name: getattr(constants, name).to(device)
    ...                        for name in constants._fields if name != "p"}), buffer,
    ...                        [torch.ones(3, device=device), torch.ones(2, device=device)],
    ...                        params)
    ...     torch.testing.assert_close(torch.cat(params).cpu(), expected)
    """
    hidden = constants.meta_weight_h.shape[0]
    kernel = "the Triton step kernel" + (" (TRITON_INTERPRET=1)" if interpreting() else "")
    device = "cpu" if interpreting() else "cuda"
    rows = check_bucket(buffer, grads, params, hidden, device=device, kernel=kernel)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16, got {block}")
    table, numbers, normalise = bucket_table(buffer, grads, params, rows, normalisations,
                                             device, kernel)
    if not table:
        return
    if kernel_constants is None:
        kernel_constants = native_constants(constants)
    blocks = 0
    for index, entry in enumerate(table):
        table[index] = (*entry, blocks)
        blocks += triton.cdiv(entry[0], block)
    _rule_step_bucket[(blocks,)](
        *kernel_constants, _on_device(torch.tensor(table), buffer.device),
        _on_device(torch.tensor(numbers), buffer.device), len(table), buffer.stride(1),
        *rule_scalars(constants.p), float(lr), float(lr) * float(weight_decay), H=hidden,
        HP=hidden_lanes(hidden), BLOCK=block, NORMALISE=normalise, num_warps=num_warps,
        enable_fp_fusion=FP_FUSION)


def _on_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` copied to ``device`` without making the CPU wait for the GPU: from pinned
    memory, asynchronously (a plain copy from pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return host  # the interpreter's tensors stay on the CPU
    return host.pin_memory().to(device, non_blocking=True)


def step_rows_triton_out(kernel_constants: tuple, p: float, columns: Tensor, grad: Tensor,
                         param: Tensor) -> tuple[Tensor, Tensor]:
    """One step out of place, for the tape: ``columns`` (``[2H + 2, n]``, each feature
    contiguous), ``grad`` and ``param`` (contiguous ``[n]``) give new ``(theta_t,
    [2H + 2, n] state)`` tensors; ``kernel_constants`` as for :func:`step_rows_triton`.
    The caller has checked the inputs (:func:`learned_optim.rule.triton_tape.update_rows_triton`
    lays them out)."""
    hidden = kernel_constants[2].shape[1]
    rows = grad.shape[0]
    new_columns = torch.empty(2 * hidden + 2, rows, dtype=grad.dtype, device=grad.device)
    new_param = torch.empty_like(param)
    if rows:
        _rule_step[(triton.cdiv(rows, BLOCK_ROWS),)](
            *kernel_constants, columns, new_columns, grad, param, new_param, rows,
            columns.stride(0), new_columns.stride(0), *rule_scalars(p), 1.0, 0.0, grad,
            *normalisation_args(None, rows)[2:], H=hidden, HP=hidden_lanes(hidden),
            BLOCK=BLOCK_ROWS, NORMALISE=False, num_warps=NUM_WARPS,
            enable_fp_fusion=FP_FUSION)
    return new_param, new_columns


def hidden_lanes(hidden: int) -> int:
    """The kernels' hidden dimension: ``hidden`` rounded up to a power of two, at least 16
    (``tl.dot``'s smallest).

    >>> hidden_lanes(20), hidden_lanes(5), hidden_lanes(33)
    (32, 16, 64)
    """
    return max(16, 1 << (hidden - 1).bit_length())


_usable: dict[str, bool] = {}  # per device, once probed


def triton_step_usable(device: torch.device) -> bool:
    """Whether :func:`step_bucket_triton` runs on ``device``: Triton imports, and the kernel
    compiles there and steps a probe of two small parameters right (with and without the
    gradient's normalisation). The first call per device
    compiles it (seconds); a failure warns once and answers ``False``, and ``step()`` takes
    its chunk path.

    >>> triton_step_usable(torch.device("meta"))
    False
    """
    device = torch.device(device)
    wanted = "cpu" if interpreting() else "cuda"
    if not triton_available() or device.type != wanted:
        return False
    return probed(_usable, device, _probe, "the Triton step kernel", "step() takes the chunk path")


def probed(results: dict, device: torch.device, probe, name: str, fallback: str) -> bool:
    """``probe(device)`` once per device, its outcome kept in ``results``: ``False`` (after
    one warning that names the kernel, the error and ``fallback``) where it raises."""
    key = str(device)
    if key not in results:
        try:
            probe(device)
            results[key] = True
        except Exception as error:  # noqa: BLE001 - any failure means: take the other path
            first_line = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"learned_optim: {name} failed on {device} ({type(error).__name__}: "
                          f"{first_line}); {fallback} (set LEARNED_OPTIM_COMPILE=0 to skip "
                          "the attempt)", RuntimeWarning, stacklevel=3)
            results[key] = False
    return results[key]


def _probe(device: torch.device) -> None:
    """A step of two parameters (two and one coordinates) in one bucket launch, as
    ``step()`` takes them, at the paper's hidden size (the kernel the common rules compile)
    with zero weights: every gate is 1/2, so theta_t = theta / 2 - g / 2 and the cell
    c = (c_prev + 0) / 2. Then the same with the gradient normalised (the ``general``
    rule's kernel) from zero moments: at step 1 that gradient is ``0.1 sign(g)``."""
    hidden = 20
    zeros = torch.zeros
    constants = StepConstants(zeros(2 + hidden, 4 * hidden, device=device),
                              zeros(4 * hidden, device=device), zeros(hidden, 2, device=device),
                              zeros(2, device=device), zeros(2, device=device),
                              zeros(2, device=device), p=10.0)
    grad = torch.tensor([1.0, -2.0, 0.5], device=device)
    for normalise, expected in ((False, [1.0, 1.5, -0.75]), (True, [1.45, 0.55, -0.55])):
        state = zeros(2 * hidden + 2, 3, device=device)
        state[hidden] = 4.0
        state = state.t()
        theta = torch.tensor([3.0, 1.0, -1.0], device=device)
        moments = [zeros(2, 2, device=device), zeros(2, 1, device=device)]
        step_bucket_triton(constants, state, [grad[:2], grad[2:]], [theta[:2], theta[2:]],
                           normalisations=[normalisation(m, 1, 0.9, 0.99, 0.1) for m in moments]
                           if normalise else None)
        if not torch.allclose(theta.cpu(), torch.tensor(expected)) or not torch.allclose(
                state[:, hidden].cpu(), torch.full((3,), 2.0)):
            raise RuntimeError(f"the probe stepped theta to {theta.tolist()} (expected "
                               f"{expected}) and c to {state[:, hidden].tolist()} (expected "
                               f"2.0 each){' normalising the gradient' if normalise else ''}")
