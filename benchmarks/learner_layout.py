"""The conv learner in NCHW against channels-last on the CPU, module by module and through
the fused block kernels (issue 16): the ratios behind
``learned_optim.learners.conv_memory_format`` and ``learned_optim.learners.ConvFeatures``.

The paper's Omniglot learner (``ConvLearner``, 32 filters, 28 x 28, 1 channel) on the batches
of a meta-training episode (5-way 1-shot: 5 support and 75 query images; 20-way 5-shot: 100
and 300): forward + cross-entropy + backward to the parameters (what first order, evaluation
and fine-tuning run), and forward + backward + backward of the backward (what second order
adds). Four variants, timed interleaved round by round with the same weights: NCHW (the
straightforward layout, module by module), channels-last module by module
(``native_block.FUSED_BLOCKS`` off), channels-last as the package runs it (the first
block through ``learned_optim.native_stem``, the later ones through
``learned_optim.native_block``), and NCHW as the package runs it (second-order meta-training:
BatchNorm's double backward through ``learned_optim.native_batchnorm``, ReLU and pooling
through ``learned_optim.native_pool``). Run from the
repository root::

    python benchmarks/learner_layout.py --threads 1 --markdown docs/results/learner_layout.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _shared import load_average  # noqa: E402 (sibling module)
from torch.nn import functional as F  # noqa: E402

from learned_optim import native_block  # noqa: E402
from learned_optim.learners import ConvLearner  # noqa: E402

# (ways, images): the support and query batches of the two benchmark episodes.
CASES = [(5, 5), (5, 75), (20, 100), (20, 300)]


def passes(learner: ConvLearner, inputs, targets, double: bool) -> None:
    params = list(learner.parameters())
    loss = F.cross_entropy(learner(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=double)
    if double:
        torch.autograd.grad(sum((g * g).sum() for g in grads), params)


VARIANTS = ("NCHW", "channels-last", "channels-last fused", "NCHW fused")


def time_case(ways: int, images: int, double: bool, rounds: int) -> list[float]:
    """Median milliseconds of each of :data:`VARIANTS`."""
    torch.manual_seed(0)
    nchw = ConvLearner(1, ways, 32, 28, channels_last=False)
    nhwc = ConvLearner(1, ways, 32, 28, channels_last=True)
    nhwc.load_state_dict(nchw.state_dict())
    # Omniglot-like images: ink in [0, 1] on a blank background
    inputs = torch.rand(images, 1, 28, 28) * (torch.rand(images, 1, 28, 28) < 0.2)
    targets = torch.randint(0, ways, (images,))
    variants = ((nchw, False), (nhwc, False), (nhwc, True), (nchw, True))
    times: list[list[float]] = [[] for _ in variants]
    before = native_block.FUSED_BLOCKS
    try:
        for round_ in range(rounds + 1):  # the first is a warm-up
            for slot, (learner, fused) in enumerate(variants):
                native_block.FUSED_BLOCKS = fused
                start = time.perf_counter()
                passes(learner, inputs, targets, double)
                if round_:
                    times[slot].append(time.perf_counter() - start)
    finally:
        native_block.FUSED_BLOCKS = before
    return [statistics.median(t) * 1e3 for t in times]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = ["# ConvLearner: NCHW, channels-last and fused blocks on the CPU "
             "(benchmarks/learner_layout.py)",
             "", f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved "
             f"rounds after a warm-up; {load_average()} (start)", "",
             "| passes | ways | images | NCHW ms | channels-last ms | fused ms "
             "| NCHW fused ms | NCHW / channels-last | channels-last / fused | NCHW / fused "
             "| NCHW / NCHW fused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for double in (False, True):
        for ways, images in CASES:
            nchw, nhwc, fused, nchw_fused = time_case(ways, images, double, args.rounds)
            kind = "forward + backward + double backward" if double else "forward + backward"
            lines.append(f"| {kind} | {ways} | {images} | {nchw:.1f} | {nhwc:.1f} | {fused:.1f} "
                         f"| {nchw_fused:.1f} | {nchw / nhwc:.2f}x | {nhwc / fused:.2f}x "
                         f"| {nchw / fused:.2f}x | {nchw / nchw_fused:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", f"{load_average()} (end)", "",
              "Generated by `python benchmarks/learner_layout.py "
              + " ".join(argv if argv is not None else sys.argv[1:]) + "`."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
