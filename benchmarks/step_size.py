"""The learned rule's step size on long problems of its own meta-validation stream.

From scratch on the evaluation sets (``benchmarks/scratch.py --rule-lr``), the ``general``
rule's update scaled down reaches tuned Adam where the unscaled rule does not. This script asks
the same question of the training distribution, on data the evaluation never uses: long
minibatch problems of the general task distribution's *validation* stream (Omniglot background
alphabets, fresh learners), trained through plain ``opt.step()`` with the rule's update scaled
by each ``--lr`` (a constant, or ``isqrt:TAU``: the schedule of
``MetaLearnerLSTM(step_decay=TAU)``), scored over the last 100 steps by the log of the mean
held-out loss (lower is better) and by the held-out accuracy (higher is better). Run from the
repository root::

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


def parse_setting(spec: str) -> tuple[float, float | None]:
    """A setting of ``--lr`` as ``(lr, step_decay)``: a number is a constant multiplier of the
    rule's update (the group ``lr``), ``isqrt:TAU`` the rule's own ``step_decay = TAU``
    (unchanged for TAU steps, then ``sqrt(TAU / t)``; :meth:`MetaLearnerLSTM.update_multiplier`).

    >>> parse_setting("0.3"), parse_setting("isqrt:100")
    ((0.3, None), (1.0, 100.0))
    """
    if spec.startswith("isqrt:"):
        tau = float(spec.split(":", 1)[1])
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"--lr {spec!r}: TAU must be a positive number of steps")
        return 1.0, tau
    value = float(spec)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"--lr {spec!r}: a multiplier must be a finite number >= 0")
    return value, None


def setting_key(spec: str) -> str:
    """The JSON key of a setting: constants as floats ("1" -> "1.0"), schedules as given."""
    return spec if spec.startswith("isqrt:") else str(float(spec))


def run(problem, rule, spec: str) -> tuple[float, float]:
    """Train ``problem`` through the rule with the update multiplier of ``spec``; the log of
    its mean held-out loss and its mean held-out accuracy (%) over the last steps.

    Sets ``rule.step_decay`` for this run (the settings run one after another)."""
    lr, rule.step_decay = parse_setting(spec)
    opt = LSTMMetaOptimizer(problem.model.parameters(), rule, lr=lr)
    losses, correct, seen = [], 0, 0
    for step in range(problem.horizon):
        x, y = problem.train_batch()
        opt.zero_grad()
        problem.loss(problem.model(x), y).backward()
        opt.step()
        if step >= problem.horizon - SCORED_STEPS and step % SCORE_EVERY == 0:
            with torch.no_grad():
                vx, vy = problem.val_batch()
                output = problem.model(vx)
                losses.append(problem.loss(output, vy).item())
                correct += int((output.argmax(dim=1) == vy).sum())
                seen += vy.numel()
    return math.log(sum(losses) / len(losses)), 100.0 * correct / seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="general", help="shipped name or checkpoint path")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] /
                                                   "shared" / "data" / "omniglot"))
    parser.add_argument("--lr", default="1.0,0.3",
                        help="comma-separated settings: a constant multiplier of the rule's "
                             "update, or isqrt:TAU (min(1, sqrt(TAU / step)))")
    parser.add_argument("--horizon", type=int, default=1000)
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--first", type=int, default=0,
                        help="index of the first problem of the stream (to extend a run)")
    parser.add_argument("--seed", type=int, default=5, help="the validation stream's seed")
    parser.add_argument("--json", default="docs/results/step_size.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = [v.strip() for v in args.lr.split(",")]
    for spec in settings:
        parse_setting(spec)  # a bad setting fails before the first problem
    print(f"# step size on the meta-validation stream; {load_average()} (start)")
    problems = ProblemDistribution("val", data_root=args.data_root,
                                   horizon=(args.horizon, args.horizon), loss_dropout=1.0,
                                   seed=args.seed, kinds={"omniglot_minibatch": 1.0})
    # Read once: stepping never changes the rule's weights. Each setting sets its step decay
    # (run), replacing the one a shipped rule carries (the one these scores choose).
    rule = load_update_rule(args.rule)
    started = time.perf_counter()
    keys = [setting_key(spec) for spec in settings]
    scores = {key: [] for key in keys}
    accuracy = {key: [] for key in keys}
    names = []
    for index in range(args.first, args.first + args.problems):
        for spec, key in zip(settings, keys):
            problem = problems.problem(index)  # a fresh learner for every setting
            log_loss, percent = run(problem, rule, spec)
            scores[key].append(log_loss)
            accuracy[key].append(percent)
            print(f"{index} {problem.name}: lr {key}: log loss {log_loss:.3f}, "
                  f"accuracy {percent:.1f}%", flush=True)
        names.append(problem.name)
    means = {key: sum(v) / len(v) for key, v in scores.items()}
    mean_accuracy = {key: sum(v) / len(v) for key, v in accuracy.items()}
    for key in keys:
        print(f"lr {key}: mean log held-out loss {means[key]:.3f}, "
              f"mean held-out accuracy {mean_accuracy[key]:.2f}%")
    Path(args.json).write_text(json.dumps({
        "setting": {"rule": args.rule, "horizon": args.horizon, "problems": names,
                    "seed": args.seed, "first": args.first, "kinds": ["omniglot_minibatch"],
                    "split": "val",
                    "command": " ".join(sys.argv[1:] if argv is None else argv)},
        "scores": scores, "means": means, "accuracy": accuracy,
        "mean_accuracy": mean_accuracy, "seconds": round(time.perf_counter() - started),
        "load_average": load_average()}, indent=2))
    print(f"{load_average()} (end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
