"""The CPU measurements behind ``learned_optim.rule.policy``: kernels, threads and tape paths.

Run from the repository root (about a minute on 2 cores)::

    python benchmarks/rule_kernels.py                      # 29k and 300k coordinates
    python benchmarks/rule_kernels.py --rows 29000 --markdown out.md
    python benchmarks/rule_kernels.py --threads 1 --only tape

Three comparisons, each interleaved round by round (medians of wall time, so that a changing
load hits every column alike), with the load average printed beside them:

``tanh``      torch's tanh against ``2 sigmoid(2x) - 1`` on ``[rows, 20]`` (the rule's two tanh).
``threads``   the in-place ``LSTMMetaOptimizer.step`` on ``rows`` coordinates, chunk loop on one
              thread against one per usable core (at least 2; the policy's
              ``chunk_loop_threads`` bypassed).
``tape``      T = 12 first-order steps on the autograd tape + one backward, by each path the
              policy may choose (``learned_optim.rule.policy.tape_path``): the anchored
              trajectory (replay), one recomputing node per step (hand-written backward), and
              every operation recorded by autograd.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _shared import (  # sibling module: run as python benchmarks/rule_kernels.py
    load_average,
)

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM
from learned_optim.rule import policy
from learned_optim.rule.math import initial_state, prepare_step
from learned_optim.rule.tape import RuleTrajectory, update_rows_differentiable


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median wall seconds of each function, one warm-up call, then ``rounds`` rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def tanh_kernels(rows: int) -> dict:
    x = torch.randn(rows, 20) * 2
    out = torch.empty_like(x)
    return {"torch.tanh": lambda: torch.tanh(x, out=out),
            "2 sigmoid(2x) - 1": lambda: torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)}


def step_threads(rows: int) -> dict:
    params = [torch.nn.Parameter(torch.randn(rows))]
    params[0].grad = torch.randn(rows) * 1e-3
    opt = LSTMMetaOptimizer(params, MetaLearnerLSTM())
    loss = torch.tensor(2.3)
    threads = max(2, policy.usable_cores())

    def with_threads(count: int):
        def run():
            saved = policy.chunk_loop_threads
            policy.chunk_loop_threads = lambda device, rows: count  # bypass the policy
            try:
                opt.step(loss=loss)
            finally:
                policy.chunk_loop_threads = saved
        return run

    return {"step, 1 thread": with_threads(1), f"step, {threads} threads": with_threads(threads)}


def tape_paths(rows: int, steps: int = 12) -> dict:
    rule = MetaLearnerLSTM()
    init = torch.nn.Parameter(torch.randn(rows) * 0.1)
    grad = torch.randn(rows) * 1e-2
    loss = torch.tensor(1.6)

    def run(path: str):
        def chain():
            weights = rule.weights()
            state = initial_state(rows, rule.hidden_size)
            theta = init
            trajectory = RuleTrajectory(state, theta) if path == "trajectory" else None
            for _ in range(steps):
                constants = prepare_step(weights, loss, torch.float32)
                if trajectory is not None:
                    theta, state = trajectory.step(constants, grad)
                else:
                    theta, state = update_rows_differentiable(
                        constants, state, grad, theta, recompute=path == "recomputed")
            theta.backward(grad)
        return chain

    return {f"tape: {path}": run(path) for path in policy.TAPE_PATHS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="29000,300000",
                        help="comma list of coordinate counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=("tanh", "threads", "tape"), help="one comparison")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
             f"{load_average()} (start)", ""]
    for rows in (int(r) for r in args.rows.split(",")):
        for title, fns in (("tanh", tanh_kernels(rows)), ("threads", step_threads(rows)),
                           ("tape", tape_paths(rows))):
            if args.only not in (None, title):
                continue
            medians = interleaved(fns, args.rounds)
            fastest = min(medians, key=medians.get)
            lines.append(f"| {rows:,} rows, {title} | ms (median of {args.rounds}) | "
                         f"/ fastest |")
            lines.append("|---|---|---|")
            for name, seconds in medians.items():
                lines.append(f"| {name} | {seconds * 1e3:.2f} | "
                             f"{seconds / medians[fastest]:.2f} |")
            lines.append("")
            print("\n".join(lines[-len(medians) - 3:]), flush=True)
    lines.append(f"{load_average()} (end)")
    print(lines[-1])
    if args.markdown:
        command = " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(
            f"Generated by `python benchmarks/rule_kernels.py {command}`.\n\n"
            + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
