"""The learned rule's step size on long problems of its own meta-validation stream.

From scratch on the evaluation sets (``benchmarks/scratch.py --rule-lr``), the ``general``
rule's update scaled down reaches tuned Adam where the unscaled rule does not. This script asks
the same question of the training distribution, on data the evaluation never uses: long
minibatch problems of the general task distribution's *validation* stream (Omniglot background
alphabets, fresh learners), trained through plain ``opt.step()`` with the rule's update scaled
by each ``--lr``, scored by the log of the mean held-out loss over the last 100 steps (lower is
better). Run from the repository root::

    python benchmarks/step_size.py --rule general --lr 1.0,0.3 --horizon 1000 --problems 6

It prints one line per problem and setting, then the mean per setting, and writes the JSON to
``--json`` (default ``docs/results/step_size.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from _shared import load_average  # sibling module

from learned_optim import LSTMMetaOptimizer
from learned_optim.checkpoint import load_update_rule
from learned_optim.general import ProblemDistribution

SCORED_STEPS = 100  # the held-out loss is averaged over this many last steps
SCORE_EVERY = 10


def run(problem, rule, lr: float) -> float:
    """Train ``problem`` through the rule; the log of its mean held-out loss at the end."""
    opt = LSTMMetaOptimizer(problem.model.parameters(), rule, lr=lr)
    losses = []
    for step in range(problem.horizon):
        x, y = problem.train_batch()
        opt.zero_grad()
        problem.loss(problem.model(x), y).backward()
        opt.step()
        if step >= problem.horizon - SCORED_STEPS and step % SCORE_EVERY == 0:
            with torch.no_grad():
                vx, vy = problem.val_batch()
                losses.append(problem.loss(problem.model(vx), vy).item())
    return math.log(sum(losses) / len(losses))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="general", help="shipped name or checkpoint path")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] /
                                                   "shared" / "data" / "omniglot"))
    parser.add_argument("--lr", default="1.0,0.3", help="comma-separated lr multipliers")
    parser.add_argument("--horizon", type=int, default=1000)
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--seed", type=int, default=5, help="the validation stream's seed")
    parser.add_argument("--json", default="docs/results/step_size.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rates = [float(v) for v in args.lr.split(",")]
    print(f"# step size on the meta-validation stream; {load_average()} (start)")
    problems = ProblemDistribution("val", data_root=args.data_root,
                                   horizon=(args.horizon, args.horizon), loss_dropout=1.0,
                                   seed=args.seed, kinds={"omniglot_minibatch": 1.0})
    rule = load_update_rule(args.rule)  # read once: stepping never changes the rule's weights
    started = time.perf_counter()
    scores = {str(lr): [] for lr in rates}
    names = []
    for index in range(args.problems):
        for lr in rates:
            problem = problems.problem(index)  # a fresh learner for every setting
            scores[str(lr)].append(run(problem, rule, lr))
            print(f"{index} {problem.name}: lr {lr:g}: {scores[str(lr)][-1]:.3f}", flush=True)
        names.append(problem.name)
    means = {lr: sum(v) / len(v) for lr, v in scores.items()}
    for lr, mean in means.items():
        print(f"lr {lr}: mean log held-out loss {mean:.3f}")
    Path(args.json).write_text(json.dumps({
        "setting": {"rule": args.rule, "horizon": args.horizon, "problems": names,
                    "seed": args.seed, "kinds": ["omniglot_minibatch"], "split": "val",
                    "command": " ".join(sys.argv[1:] if argv is None else argv)},
        "scores": scores, "means": means, "seconds": round(time.perf_counter() - started),
        "load_average": load_average()}, indent=2))
    print(f"{load_average()} (end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
