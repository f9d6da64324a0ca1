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
              trajectory (replay), one recomputing node per step (hand-written backward),
              every operation recorded by autograd, the compiled node and the native node.
``layout``    the kernels row-major (``[n, 2H + 2]``, gate blocks strided) against
              feature-major (``[2H + 2, n]``, ``update_rows(feature_major=True)``): the
              forward with its scratch, forward + hand-written backward + the constants'
              gradients, each also with the transposes a row-major caller would pay (state
              in, state or state gradient out), and the first-order replay of one chunk
              (T = 12 forward steps, then 12 backward steps, transposed once per chunk).

Run ``--only layout --rows 2200,8192,28485,55050 --threads 1`` for the layout figures of
docs/results/cpu_speed.md.
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
from learned_optim.rule.compiled import update_rows_compiled
from learned_optim.rule.math import (
    ConstantGrads,
    initial_state,
    prepare_step,
    row_scratch,
    rows_backward,
    update_rows,
)
from learned_optim.rule.native_tape import update_rows_native
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
                elif path == "compiled":
                    theta, state = update_rows_compiled(constants, state, grad, theta)
                elif path == "native":
                    theta, state = update_rows_native(constants, state, grad, theta)
                else:
                    theta, state = update_rows_differentiable(
                        constants, state, grad, theta, recompute=path == "recomputed")
            theta.backward(grad)
        return chain

    return {f"tape: {path}": run(path) for path in policy.TAPE_PATHS
            if path != "triton"}  # a CUDA device's


def kernel_layouts(rows: int, steps: int = 12) -> dict:
    """Row-major against feature-major kernels on ``rows`` coordinates (no autograd)."""
    hidden, width = 20, 42
    rule = MetaLearnerLSTM()
    with torch.no_grad():
        constants = [prepare_step(rule.weights(), torch.tensor(1.6 + 0.01 * t), torch.float32)
                     for t in range(steps)]
    state = torch.randn(rows, width) * 0.5
    grads = [torch.randn(rows) * 1e-2 for _ in range(steps)]
    param, d_param_out = torch.randn(rows), torch.randn(rows)
    d_state_out = torch.randn(rows, width)
    columns, d_columns = state.t().contiguous(), d_state_out.t().contiguous()
    new_rows, new_columns = torch.empty(rows, width), torch.empty(width, rows)
    d_state = torch.empty(rows, width)
    scratch = row_scratch(rows, hidden)
    replay_scratch = [row_scratch(rows, hidden) for _ in range(steps)]
    states = torch.empty(steps + 1, rows * width)
    params = torch.empty(steps + 1, rows)

    def forward(feature_major: bool, transposes: bool = False):
        def run():
            with torch.no_grad():
                if transposes:
                    columns.copy_(state.t())
                update_rows(constants[0], columns if feature_major else state, grads[0], param,
                            out=new_columns if feature_major else new_rows, scratch=scratch,
                            feature_major=feature_major)
                if transposes:
                    new_rows.copy_(new_columns.t())
        return run

    def forward_backward(feature_major: bool, transposes: bool = False):
        # As one chunk of the recomputing node's backward: the new state stays internal.
        def run():
            with torch.no_grad():
                if transposes:
                    columns.copy_(state.t())
                    d_columns.copy_(d_state_out.t())
                inputs = columns if feature_major else state
                outputs = new_columns if feature_major else new_rows
                update_rows(constants[0], inputs, grads[0], param, out=outputs,
                            scratch=scratch, feature_major=feature_major)
                d_in, _, _, dz, d_pre, h1 = rows_backward(
                    constants[0], hidden, scratch, rows, inputs, grads[0], param, outputs,
                    d_param_out, d_columns if feature_major else d_state_out,
                    (True, False, True), feature_major=feature_major)
                ConstantGrads(constants[0]).add(scratch, rows, inputs, param, dz, d_pre, h1,
                                                feature_major=feature_major)
                if transposes:
                    d_state.copy_(d_in.t())
        return run

    def replay(feature_major: bool):
        # One chunk of the first-order replay (learned_optim.rule.tape._chunked_replay).
        def run():
            with torch.no_grad():
                shape = (width, rows) if feature_major else (rows, width)
                chain = [flat.view(shape) for flat in states]
                chain[0].copy_(state.t() if feature_major else state)
                params[0] = param
                for t in range(steps):
                    params[t + 1], _ = update_rows(
                        constants[t], chain[t], grads[t], params[t], out=chain[t + 1],
                        scratch=replay_scratch[t], feature_major=feature_major)
                sums = [ConstantGrads(c) for c in constants]
                d_param, d_chain = d_param_out, None
                for t in reversed(range(steps)):
                    d_chain, _, d_param, dz, d_pre, h1 = rows_backward(
                        constants[t], hidden, replay_scratch[t], rows, chain[t], grads[t],
                        params[t], chain[t + 1], d_param, d_chain, (True, False, True),
                        feature_major=feature_major)
                    sums[t].add(replay_scratch[t], rows, chain[t], params[t], dz, d_pre, h1,
                                feature_major=feature_major)
                d_state.copy_(d_chain.t() if feature_major else d_chain)
        return run

    timed = {
        "forward, rows": forward(False),
        "forward, feature-major": forward(True),
        "forward, feature-major + 2 transposes": forward(True, transposes=True),
        "forward + backward, rows": forward_backward(False),
        "forward + backward, feature-major": forward_backward(True),
        "forward + backward, feature-major + 3 transposes": forward_backward(True, True),
        f"replay chunk (T = {steps}), rows": replay(False),
        f"replay chunk (T = {steps}), feature-major": replay(True),
    }
    if rows > policy.replay_chunk_rows(torch.device("cpu"), rows, steps, 4 * 225):
        # The replay runs on chunks of about 2,200 rows; its T scratches would not fit.
        timed = {name: fn for name, fn in timed.items() if not name.startswith("replay")}
    return timed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="29000,300000",
                        help="comma list of coordinate counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=("tanh", "threads", "tape", "layout"),
                        help="one comparison")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
             f"{load_average()} (start)", ""]
    for rows in (int(r) for r in args.rows.split(",")):
        for title, make in (("tanh", tanh_kernels), ("threads", step_threads),
                            ("tape", tape_paths), ("layout", kernel_layouts)):
            if args.only not in (None, title):
                continue
            fns = make(rows)
            medians = interleaved(fns, args.rounds)
            fastest = min(medians, key=medians.get)
            # layout: each kernel against its row-major form (speed-up, higher is faster).
            ratio = "row-major / this" if title == "layout" else "/ fastest"
            lines.append(f"| {rows:,} rows, {title} | ms (median of {args.rounds}) | "
                         f"{ratio} |")
            lines.append("|---|---|---|")
            for name, seconds in medians.items():
                if title == "layout":
                    value = medians[name.split(",")[0] + ", rows"] / seconds
                else:
                    value = seconds / medians[fastest]
                lines.append(f"| {name} | {seconds * 1e3:.2f} | {value:.2f} |")
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
