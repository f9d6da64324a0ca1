"""``LSTMMetaOptimizer.step()`` on a GPU against the time to read and write its state once.

Issue #16's GPU target: a drop-in step at 100M parameters within 3x of the time one pass over
its state takes at the device's measured copy bandwidth. Prepared so that a session lent a GPU
for a few minutes can measure it in one call::

    python benchmarks/step_gpu.py                           # CUDA, 100M parameters
    python benchmarks/step_gpu.py --sizes 10M,100M          # other sizes (suffixes k and M)
    python benchmarks/step_gpu.py --device cpu --sizes 100k --quick --no-compile   # smoke run

Columns: ``ours`` is the package's ``step(loss=...)`` as shipped (whatever path the policy
takes on the device: on CUDA with Triton, one launch of the fused kernel of
:mod:`learned_optim.rule.triton_step` a parameter); ``chunks`` is the same optimizer with the
fused kernels switched off (the eager chunk path, what a GPU step ran before); ``compiled`` is
one ``torch.compile``'d call of :func:`learned_optim.rule.math.update_rows` over all
coordinates (inductor fuses the elementwise work around the two matrix products; on CUDA that
is Triton), an alternative to the fused kernel, run beside it (its outputs replace the
buffers, no copy back);
``floor`` is the traffic of one step, ``(2 x 42 + 3) x 4`` bytes a coordinate (read and write
the state and the parameter, read the gradient), at the bandwidth of a ``copy_`` of 512 MiB
measured in the same run; ``SGD`` is ``torch.optim.SGD(foreach=True)`` for scale. Times are
medians of rounds in which the implementations take turns, each synchronised on the device.
Before timing, ``compiled`` and ``chunks`` are checked against ``ours`` after one step from
the same start. ``--triton-shapes 32x2,64x4,128x4`` also times the Triton kernel alone over one
flat buffer of N coordinates at each launch shape (rows a program x warps), to choose
``triton_step.BLOCK_ROWS`` and ``NUM_WARPS`` on the device::

    python benchmarks/step_gpu.py --sizes 100M --triton-shapes 32x2,64x2,64x4,128x4,128x8

Below the table: the default optimizer (``LSTMMetaOptimizer(params)``, the shipped ``general``
rule, plain ``step()``) on a model of 256 tensors (64 blocks of ``Linear(256, 256)`` and
``LayerNorm(256)``), against Adam (``fused=True`` on CUDA), SGD and, where the Triton kernel
runs, the same kernel launched once a tensor instead of once for the bucket.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _shared import (  # sibling module: run as python benchmarks/step_gpu.py
    load_average,
    without_compiled_rule,
)
from step import TRAFFIC_ELEMENTS, clone_model, human, interleaved_medians, mlp, parse_size
from torch import nn

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule.math import initial_state, normalisation, prepare_step, update_rows
from learned_optim.rule.native import native_constants
from learned_optim.rule.triton_step import step_rows_triton, triton_step_usable

TARGET_FLOOR_RATIO = 3.0
MANY_BLOCKS = 64  # blocks of the many-tensor model: 256 tensors, 4.2M parameters
COPY_FLOATS = 128 * 2**20  # 512 MiB of float32: far beyond any cache


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of ``dst.copy_(src)`` on the device (read + write counted)."""
    src = torch.randn(COPY_FLOATS // (8 if quick else 1), device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, 2, 5 if quick else 20, 2.0,
                                  lambda: synchronise(device))["copy"]
    return 2 * src.numel() * src.element_size() / seconds


class CompiledFlatStep:
    """The rule over all coordinates as one flat tensor, its step one compiled call."""

    def __init__(self, params, meta: MetaLearnerLSTM) -> None:
        params = list(params)
        self.theta = torch.cat([p.detach().flatten() for p in params])
        self.grad = torch.cat([p.grad.flatten() for p in params])
        self.state = initial_state(self.theta.numel(), meta.hidden_size,
                                   device=self.theta.device)
        self.weights = meta.weights()
        self.step_rows = torch.compile(update_rows, dynamic=False)

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        constants = prepare_step(self.weights, loss, self.theta.dtype, self.theta.device)
        self.theta, self.state = self.step_rows(constants, self.state, self.grad, self.theta)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class TritonFlatStep:
    """The Triton kernel alone over one flat buffer, at one launch shape."""

    def __init__(self, params, meta: MetaLearnerLSTM, loss, block: int, warps: int) -> None:
        params = list(params)
        self.theta = torch.cat([p.detach().flatten() for p in params])
        self.grad = torch.cat([p.grad.flatten() for p in params])
        self.state = initial_state(self.theta.numel(), meta.hidden_size,
                                   device=self.theta.device, feature_major=True)
        self.constants = prepare_step(meta.weights(), loss, self.theta.dtype, self.theta.device)
        self.laid_out = native_constants(self.constants)
        self.block, self.warps = block, warps

    @torch.no_grad()
    def step(self) -> None:
        step_rows_triton(self.constants, self.state, self.grad, self.theta,
                         kernel_constants=self.laid_out, block=self.block, num_warps=self.warps)


class PerTensorSteps:
    """The default rule's step with one Triton launch a tensor (``step_rows_triton`` in a
    loop, the gradient normalised in the kernel): what ``step()``'s single launch a bucket
    replaces."""

    def __init__(self, params, meta: MetaLearnerLSTM) -> None:
        self.params, self.meta, self.count = list(params), meta, 0
        device = self.params[0].device
        self.state = initial_state(sum(p.numel() for p in self.params), meta.hidden_size,
                                   device=device, feature_major=True)
        self.moments = [torch.zeros(2, p.numel(), device=device) for p in self.params]
        self.constants = prepare_step(meta.weights(), None, torch.float32, device)
        self.laid_out = native_constants(self.constants)

    @torch.no_grad()
    def step(self) -> None:
        self.count += 1
        offset, meta = 0, self.meta
        for param, moments in zip(self.params, self.moments):
            n = param.numel()
            step_rows_triton(self.constants, self.state[offset : offset + n],
                             param.grad.view(-1), param.view(-1),
                             kernel_constants=self.laid_out,
                             normalisation=normalisation(moments, self.count, meta.momentum,
                                                         meta.rms_decay, meta.gradient_scale))
            offset += n


def many_tensor_model(device: torch.device) -> nn.Module:
    """:data:`MANY_BLOCKS` blocks of ``Linear(256, 256)`` and ``LayerNorm(256)`` with drawn
    gradients: a model whose parameters come in many pieces."""
    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(MANY_BLOCKS)
                            for layer in (nn.Linear(256, 256), nn.LayerNorm(256))]).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    return model


def measure_many_tensors(device: torch.device, quick: bool) -> dict:
    """The default optimizer's ``step()`` (one launch a bucket) on :func:`many_tensor_model`
    against one launch a tensor, Adam (fused on CUDA) and SGD (foreach), interleaved."""
    base = many_tensor_model(device)
    opt = LSTMMetaOptimizer(clone_model(base).parameters())  # the shipped general rule
    adam = torch.optim.Adam(clone_model(base).parameters(), fused=device.type == "cuda")
    sgd = torch.optim.SGD(clone_model(base).parameters(), lr=1e-2, foreach=True)
    fns = {"ours": opt.step, "Adam": adam.step, "SGD": sgd.step}
    if triton_step_usable(device):
        fns["a launch a tensor"] = PerTensorSteps(clone_model(base).parameters(),
                                                  opt.meta_learner).step
    warmup, repeats, budget = (1, 3, 1.0) if quick else (3, 30, 5.0)
    return {"n": sum(p.numel() for p in base.parameters()),
            "tensors": len(list(base.parameters())),
            "time": interleaved_medians(fns, warmup, repeats, budget,
                                        lambda: synchronise(device))}


def measure(target: int, device: torch.device, quick: bool, compile_step: bool,
            triton_shapes: list[tuple[int, int]]) -> dict:
    base = mlp(target).to(device)  # Module.to moves the drawn .grad along
    n = sum(p.numel() for p in base.parameters())
    torch.manual_seed(0)
    meta = MetaLearnerLSTM().to(device)
    loss = torch.tensor(2.3, device=device)
    model = clone_model(base)
    opt = LSTMMetaOptimizer(model.parameters(), meta)
    sgd = torch.optim.SGD(clone_model(base).parameters(), lr=1e-2, foreach=True)
    chunked = LSTMMetaOptimizer(clone_model(base).parameters(), meta)
    fns = {"ours": lambda: opt.step(loss=loss),
           "chunks": without_compiled_rule(lambda: chunked.step(loss=loss)), "SGD": sgd.step}
    result: dict = {"n": n}
    # Both paths one step from the same start: how far apart they land.
    first, second = clone_model(base), clone_model(base)
    LSTMMetaOptimizer(first.parameters(), meta).step(loss=loss)
    without_compiled_rule(lambda: LSTMMetaOptimizer(second.parameters(), meta).step(loss=loss))()
    result["chunks_disagreement"] = (flat_params(first) - flat_params(second)).abs().max().item()
    if triton_shapes and triton_step_usable(device):
        for block, warps in triton_shapes:
            flat = TritonFlatStep(clone_model(base).parameters(), meta, loss, block, warps)
            fns[f"triton {block}x{warps}"] = flat.step
    if compile_step:
        checked = clone_model(base)
        reference = LSTMMetaOptimizer(checked.parameters(), meta)
        flat = CompiledFlatStep(clone_model(base).parameters(), meta)
        reference.step(loss=loss)
        flat.step(loss)
        ours_flat = torch.cat([p.detach().flatten() for p in checked.parameters()])
        result["disagreement"] = (ours_flat - flat.theta).abs().max().item()
        fns["compiled"] = lambda: flat.step(loss)
    warmup, repeats, budget = (1, 3, 1.0) if quick else (3, 30, 10.0)
    result["time"] = interleaved_medians(fns, warmup, repeats, budget,
                                         lambda: synchronise(device))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100M",
                        help="comma-separated parameter counts (default 100M)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the compiled candidate (no torch.compile)")
    parser.add_argument("--triton-shapes", default="",
                        help="also time the Triton kernel alone at these launch shapes, "
                             "ROWSxWARPS comma-separated (e.g. 64x4,128x4)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.triton_shapes.split(",")
              if shape.strip()]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("step_gpu.py: no CUDA device here (use --device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, float32, {load_average()} (start)")
    bandwidth = copy_bandwidth(device, args.quick)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; traffic {TRAFFIC_ELEMENTS * 4} bytes "
          "a coordinate and step")
    header = (f"{'N':>8} {'ours':>9} {'chunks':>9} {'compiled':>9} {'SGD':>8} {'floor':>8} "
              f"{'ours/floor':>11} {'chunks/ours':>12} {'compiled/floor':>15}")
    print(f"\n{header}\n{'-' * len(header)}")
    verdicts = []
    for target in (parse_size(s) for s in args.sizes.split(",") if s.strip()):
        result = measure(target, device, args.quick, not args.no_compile, shapes)
        n, t = result["n"], result["time"]
        floor = TRAFFIC_ELEMENTS * 4 * n / bandwidth
        compiled = t.get("compiled")
        print(f"{human(n):>8} {t['ours'] * 1e3:9.2f} {t['chunks'] * 1e3:9.2f} "
              f"{compiled * 1e3 if compiled else float('nan'):9.2f} {t['SGD'] * 1e3:8.3f} "
              f"{floor * 1e3:8.3f} {t['ours'] / floor:11.1f} {t['chunks'] / t['ours']:12.2f} "
              f"{compiled / floor if compiled else float('nan'):15.1f}")
        print(f"{'':>8} chunks vs ours after one step: max |diff| "
              f"{result['chunks_disagreement']:.1e}")
        for column, seconds in t.items():
            if column.startswith("triton "):
                print(f"{'':>8} {column}: {seconds * 1e3:.2f} ms, {seconds / floor:.1f}x the "
                      "floor")
        if "disagreement" in result:
            print(f"{'':>8} compiled vs ours after one step: max |diff| "
                  f"{result['disagreement']:.1e}")
        verdicts.append((n, t["ours"] / floor))
    print("(times in ms, medians of interleaved rounds)")
    many = measure_many_tensors(device, args.quick)
    t = many["time"]
    per_tensor = t.get("a launch a tensor")
    print(f"\nthe default optimizer's step() on {MANY_BLOCKS} blocks of Linear(256, 256) + "
          f"LayerNorm ({human(many['n'])} parameters in {many['tensors']} tensors): "
          f"{t['ours'] * 1e3:.2f} ms, {t['ours'] / t['Adam']:.1f}x Adam's "
          f"({t['Adam'] * 1e3:.2f} ms{', fused' if device.type == 'cuda' else ''}), "
          f"{t['ours'] / t['SGD']:.1f}x SGD's ({t['SGD'] * 1e3:.2f} ms)"
          + ("" if per_tensor is None else
             f"; one launch a tensor {per_tensor * 1e3:.2f} ms ({per_tensor / t['ours']:.2f}x)"))
    n, ratio = verdicts[-1]
    passed = ratio <= TARGET_FLOOR_RATIO
    print(f"\n{'PASS' if passed else 'FAIL'}: step() at N = {human(n)} on {name} = {ratio:.1f}x "
          f"the time to read and write its state once (target <= {TARGET_FLOOR_RATIO:g}x)")
    print(f"{load_average()} (end)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
