"""The learned rule's update size on short few-shot problems of its own meta-validation stream.

Few-shot fine-tuning of fresh models (``benchmarks/transfer.py``, T = 5) is where the shipped
``general`` rule falls short of tuned SGD and Adam in a few cells. This script asks, on data the
evaluation never uses, whether its updates are too small there: N-way K-shot problems of the
general task distribution's *validation* stream (Omniglot background-alphabet characters never
trained on, fresh MLPs and conv nets), trained on the support set for ``--steps`` steps with the
rule's update multiplied by each ``--scale`` (a group ``lr``) through ``finetune`` (the loss
given, BatchNorm on the support set's statistics), scored by query accuracy. Run from the
repository root::

    python benchmarks/fewshot_scale.py --rule general --scale 1,1.5,2,3,4 --steps 5 --problems 150

It prints the mean query accuracy per setting and on how many problems it beats the first
setting, and writes the JSON to ``--json`` (default ``docs/results/step_size/fewshot_scale.json``).
A diagnostic: no setting of a shipped rule is chosen by it yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _shared import load_average  # sibling module

from learned_optim import LSTMMetaOptimizer, finetune
from learned_optim.checkpoint import load_update_rule
from learned_optim.general import ProblemDistribution
from learned_optim.plots import gate_values


def query_accuracy(problem, rule, scale: float) -> tuple[float, list[float]]:
    """Fine-tune ``problem``'s learner on its support set through the rule at ``scale``.

    Through :func:`learned_optim.finetune`, as ``benchmarks/transfer.py`` does: the loss is
    given to the rule, and BatchNorm scores the queries with the support set's statistics
    (queries never see each other). Returns the query accuracy and the rule's mean input gate
    i_t over all coordinates after each step (its step is ``scale * i_t`` times its input).
    """
    x, y = problem.train_batch()
    input_gates = []

    def record_gates(step):
        gates = gate_values(step.optimizer).values()
        input_gates.append(float(torch.cat([i.flatten() for _, i in gates]).mean()))

    adapted = finetune(problem.model, x, y, loss_fn=problem.loss, steps=problem.horizon,
                       optimizer=lambda params: LSTMMetaOptimizer(params, rule, lr=scale),
                       on_step=record_gates)
    with torch.no_grad():
        qx, qy = problem.val_batch()
        return float((adapted(qx).argmax(dim=1) == qy).float().mean()), input_gates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="general", help="shipped name or checkpoint path")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] /
                                                   "shared" / "data" / "omniglot"))
    parser.add_argument("--scale", default="1,1.5,2,3,4", help="comma-separated multipliers")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--problems", type=int, default=150)
    parser.add_argument("--seed", type=int, default=11, help="the validation stream's seed")
    parser.add_argument("--json", default="docs/results/step_size/fewshot_scale.json")
    args = parser.parse_args(argv)
    scales = [float(v) for v in args.scale.split(",")]
    if any(not s > 0 for s in scales) or args.steps < 1 or args.problems < 1:
        parser.error("--scale values, --steps and --problems must be positive")
    torch.set_num_threads(1)
    print(f"# few-shot update scale on the meta-validation stream; {load_average()} (start)")
    rule = load_update_rule(args.rule)
    rule.step_decay = None  # the settings are multipliers of the rule's own update
    problems = ProblemDistribution("val", data_root=args.data_root,
                                   horizon=(args.steps, args.steps), loss_dropout=0.0,
                                   seed=args.seed, kinds={"omniglot_fewshot": 1.0})
    started = time.perf_counter()
    accuracy = {str(s): [] for s in scales}
    gates = {str(s): [] for s in scales}
    for index in range(args.problems):
        for scale in scales:  # a fresh learner (same init) for every setting
            score, input_gates = query_accuracy(problems.problem(index), rule, scale)
            accuracy[str(scale)].append(score)
            gates[str(scale)].append(input_gates)
    first = accuracy[str(scales[0])]
    summary = {}
    for key, values in accuracy.items():
        summary[key] = {"mean_accuracy": 100 * sum(values) / len(values),
                        "better_than_first": sum(a > b for a, b in zip(values, first)),
                        "worse_than_first": sum(a < b for a, b in zip(values, first)),
                        # per step, averaged over the problems
                        "mean_input_gate": torch.tensor(gates[key]).mean(0).tolist()}
        step_gates = summary[key]["mean_input_gate"]
        print(f"update x{key}: mean query accuracy {summary[key]['mean_accuracy']:.2f}% "
              f"({len(values)} problems; vs x{scales[0]:g}: better on "
              f"{summary[key]['better_than_first']}, worse on {summary[key]['worse_than_first']}); "
              f"mean input gate {step_gates[0]:.3f} at step 1, {step_gates[-1]:.3f} at step "
              f"{len(step_gates)}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "setting": {"rule": args.rule, "steps": args.steps, "problems": args.problems,
                    "seed": args.seed, "split": "val", "kinds": ["omniglot_fewshot"],
                    "command": " ".join(sys.argv[1:] if argv is None else argv)},
        "accuracy": accuracy, "summary": summary,
        "seconds": round(time.perf_counter() - started), "load_average": load_average()},
        indent=2))
    print(f"{load_average()} (end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
