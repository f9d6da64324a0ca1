"""step() with the hand-fused kernel against step() on the chunk paths, interleaved.

    python benchmarks/step_native.py [--sizes 55k,1M] [--rounds 7] [--threads N]

The same optimizer code both ways: the second optimizer has ``policy.step_native`` switched off,
so its buckets take the chunk loop (the compiled forward where it applies, else the eager
kernel), as ``step()`` does where the kernel cannot be built. Each round times 20 steps of
each, alternately; medians of the rounds are printed with every round and the load average,
and the parameters both reach after the same steps (float32 rounding apart).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer
from learned_optim.rule import policy

SIZES = {"55k": (784, 64), "1M": (784, 680)}  # 784-H-H-10 MLPs: 55,050 and 1,003,690 rows


def _model(inputs: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, 10))


def _steps(model, opt, native: bool, x, y, count: int) -> float:
    """Median seconds of ``count`` steps (the backward untimed)."""
    original = policy.step_native
    if not native:
        policy.step_native = lambda device, dtype: False
    try:
        times = []
        for _ in range(count):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
    finally:
        policy.step_native = original
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="55k,1M")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} (start)")
    print("| coordinates | step(), native kernel (ms) | step(), chunk paths (ms) | ratio | "
          "rounds native / chunk paths | max parameter difference |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        inputs, hidden = SIZES[size]
        x, y = torch.randn(64, inputs), torch.randint(0, 10, (64,))
        pair = []
        for _ in range(2):
            model = _model(inputs, hidden)
            pair.append((model, LSTMMetaOptimizer(model.parameters())))
        rows = sum(p.numel() for p in pair[0][0].parameters())
        for native, (model, opt) in zip((True, False), pair):  # build and warm up
            _steps(model, opt, native, x, y, 3)
        rounds = {True: [], False: []}
        for _ in range(args.rounds):
            for native, (model, opt) in zip((True, False), pair):
                rounds[native].append(1e3 * _steps(model, opt, native, x, y, 20))
        native_ms, chunk_ms = (statistics.median(rounds[k]) for k in (True, False))
        difference = max((a - b).abs().max().item() for a, b in
                         zip(pair[0][0].parameters(), pair[1][0].parameters()))
        shown = " / ".join(", ".join(f"{v:.1f}" for v in rounds[k]) for k in (True, False))
        print(f"| {rows:,} | {native_ms:.2f} | {chunk_ms:.2f} | {chunk_ms / native_ms:.2f}x | "
              f"{shown} | {difference:.1e} |")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (end)")


if __name__ == "__main__":
    main()
