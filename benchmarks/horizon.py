"""Beyond the horizon: a rule meta-trained for T steps, run for T/2, T, 2T and 5T steps.

For each checkpoint (shipped name or path), the learner starts from the checkpoint's learned
init and is adapted on test episodes by the learned rule, by SGD and by Adam (learning rates
tuned at T on validation episodes with ``learned_optim.evaluate.tuned_on_validation``, from the
same learned init). The query score is recorded after ceil(T/2), T, 2T and 5T steps; for the learned
rule the script also records, after every step, the mean forget gate f_t and input gate i_t over
all coordinates, and for every method the support loss and the L2 norm of the learner's
weights, to show what happens past T. Run from the repository root::

    python benchmarks/horizon.py omniglot-5w1s omniglot-5w5s --data-root /work/shared/data/omniglot
    python benchmarks/horizon.py /path/to/sinusoid.safetensors --episodes 200

Results accumulate in ``--json`` (default ``docs/results/horizon.json``), one entry per
checkpoint (recomputed only with ``--force`` or a different episode count); ``--markdown`` is
rewritten from all entries every time, so the study can be run one checkpoint per call.

The adaptation loop is :func:`learned_optim.finetune.finetune`'s own, watched through its
``on_step`` hook: the query set is scored in eval mode (the support set's running statistics) at
each recorded step, which changes nothing for later steps, and the gates are read with
:func:`learned_optim.plots.gate_values`. A self-check compares the hook's score at T with the
model ``finetune`` returns, on one episode.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from _shared import load_average  # noqa: E402 (sibling module)

from learned_optim import LSTMMetaOptimizer, load_checkpoint  # noqa: E402
from learned_optim.config import MetaTrainConfig  # noqa: E402
from learned_optim.evaluate import (  # noqa: E402
    learner_with_init,
    split_overlap_of,
    tuned_on_validation,
)
from learned_optim.finetune import FinetuneStep, finetune  # noqa: E402
from learned_optim.plots import gate_values  # noqa: E402
from learned_optim.stats import summarize  # noqa: E402
from learned_optim.tasks import build_task  # noqa: E402

DEFAULT_CHECKPOINTS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s")
METHODS = ("learned rule", "SGD", "Adam")


def weight_norm(params) -> float:
    return math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))


def trajectory(learner, spec, episode, max_steps, record_steps, task):
    """Adapt ``learner`` through :func:`finetune` for ``max_steps``; per-step traces (gates for
    the learned rule, support loss, weight norm) and query scores at ``record_steps``.

    The hook scores the query set in eval mode (the support set's running statistics) and
    returns the model to train mode, which changes nothing for later steps.
    """
    trace = {"loss": [], "weight_norm": [], "f": [], "f_min": [], "i": [], "i_max": []}
    scores = {}

    def watch(step: FinetuneStep) -> None:
        if isinstance(step.optimizer, LSTMMetaOptimizer):
            gates = list(gate_values(step.optimizer).values())
            forget = torch.cat([f.reshape(-1) for f, _ in gates])
            inp = torch.cat([i.reshape(-1) for _, i in gates])
            trace["f"].append(float(forget.double().mean()))
            trace["f_min"].append(float(forget.min()))
            trace["i"].append(float(inp.double().mean()))
            trace["i_max"].append(float(inp.max()))
        trace["loss"].append(float(step.loss.detach()))
        trace["weight_norm"].append(weight_norm(p for p in step.model.parameters()
                                                if p.requires_grad))
        if step.step in record_steps:
            step.model.eval()
            with torch.no_grad():
                scores[step.step] = float(task.metric(step.model(episode.query_inputs),
                                                      episode.query_targets))
            step.model.train()

    finetune(learner, episode.support_inputs, episode.support_targets, optimizer=spec,
             steps=max_steps, loss_fn=task.loss, on_step=watch, adapt=task.config.adapt)
    return scores, trace


def study(name: str, args) -> dict:
    checkpoint = load_checkpoint(name)
    saved = dict(checkpoint.record.get("config") or {})
    if saved.get("task") != "sinusoid":
        saved["data_root"] = args.data_root
    if getattr(args, "protocol", None) and saved.get("task") == "omniglot":
        saved["protocol"] = args.protocol  # e.g. lake-within: Lake's within-alphabet runs
    saved["device"] = "cpu"
    config = MetaTrainConfig.from_dict(saved).resolved()
    overlap = split_overlap_of(checkpoint, config, "test")
    if overlap is not None and overlap.seen and not getattr(args, "force_overlap", False):
        raise SystemExit(overlap.message(str(name)) + ": pass --force-overlap to study it anyway")
    task = build_task(config)
    T = config.inner_steps
    record_steps = sorted({max(1, math.ceil(T / 2)), T, 2 * T, 5 * T})
    max_steps = record_steps[-1]
    learner, init_note = learner_with_init(task, checkpoint, "cpu")
    initial_norm = weight_norm(learner.parameters())
    if args.episodes:
        episodes = args.episodes
    elif config.task == "sinusoid":
        episodes = 200
    else:
        episodes = 100 if config.ways <= 5 else 40
    started = time.perf_counter()

    lrs = {}
    for method in ("sgd", "adam"):
        lrs[method] = tuned_on_validation(method, learner, task, T, args.tune_episodes, "cpu")
    tune_s = time.perf_counter() - started
    specs = {
        "learned rule": checkpoint.meta_learner,
        "SGD": functools.partial(torch.optim.SGD, lr=lrs["sgd"]),
        "Adam": functools.partial(torch.optim.Adam, lr=lrs["adam"]),
    }
    source = task.episodes("test")

    # Self-check: the hook's score at T is finetune's own (episode 0).
    episode = source.episode(0)
    check = {}
    for method in ("learned rule", "SGD"):
        spec = specs[method]
        adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                           optimizer=spec, steps=T, loss_fn=task.loss, adapt=task.config.adapt)
        with torch.no_grad():
            reference = float(task.metric(adapted(episode.query_inputs), episode.query_targets))
        mine, _ = trajectory(learner, spec, episode, T, {T}, task)
        check[method] = abs(reference - mine[T]) <= 1e-5 * max(1.0, abs(reference))
    if not all(check.values()):
        raise RuntimeError(f"{name}: the unrolled loop disagrees with finetune: {check}")

    scores = {m: {s: [] for s in record_steps} for m in METHODS}
    traces = {m: {} for m in METHODS}
    for index in range(episodes):
        episode = source.episode(index)
        for method, spec in specs.items():
            got, trace = trajectory(learner, spec, episode, max_steps, set(record_steps), task)
            for step, value in got.items():
                scores[method][step].append(value)
            for key, values in trace.items():
                if values:
                    traces[method].setdefault(key, []).append(values)
    mean_traces = {m: {k: [sum(col) / len(col) for col in zip(*rows)]
                       for k, rows in traces[m].items()} for m in METHODS}
    for m in METHODS:  # extremes over episodes, not means, for the min / max traces
        if "f_min" in traces[m]:
            mean_traces[m]["f_min"] = [min(col) for col in zip(*traces[m]["f_min"])]
            mean_traces[m]["i_max"] = [max(col) for col in zip(*traces[m]["i_max"])]
    return {
        "checkpoint": str(name),
        "task": config.task,
        "setting": {"ways": config.ways, "shots": config.shots, "T": T,
                    "filters": config.filters if config.task != "sinusoid" else None,
                    "queries": config.queries, "init": init_note,
                    "protocol": config.protocol},
        "metric": task.metric_name, "higher_is_better": task.higher_is_better,
        "episodes": episodes, "tune_episodes": args.tune_episodes, "lr": lrs,
        "record_steps": record_steps,
        "scores": {m: {str(s): summarize(v).as_dict() for s, v in scores[m].items()}
                   for m in METHODS},
        "traces": mean_traces, "initial_weight_norm": initial_norm,
        "self_check_vs_finetune": check,
        "seconds": round(time.perf_counter() - started, 1), "tune_seconds": round(tune_s, 1),
        "load_average_end": list(os.getloadavg()),
    }


def _fmt(summary: dict, scale: float, digits: int) -> str:
    return f"{summary['mean'] * scale:.{digits}f} +- {summary['ci95'] * scale:.{digits}f}"


def entry_markdown(entry: dict) -> list[str]:
    s, steps = entry["setting"], entry["record_steps"]
    accuracy = entry["metric"] == "accuracy"
    scale, digits = (100.0, 1) if accuracy else (1.0, 3)
    T = s["T"]
    label = {steps[0]: f"{steps[0]} (~T/2)", T: f"{T} (T)", 2 * T: f"{2 * T} (2T)",
             5 * T: f"{5 * T} (5T)"}
    title = (f"{entry['task']} {s['ways']}-way {s['shots']}-shot" if accuracy
             else f"{entry['task']} {s['shots']}-shot")
    if s.get("protocol"):  # the Omniglot split or sinusoid family
        title += f" ({s['protocol']})"
    unit = "query accuracy (%)" if accuracy else "query MSE (lower is better)"
    lines = [f"### `{entry.get('name', entry['checkpoint'])}`: {title}, T = {T}", "",
             f"{unit}, mean +- 95% CI over {entry['episodes']} test episodes (the same for every "
             f"method), from the learned init ({s['init']}); SGD lr {entry['lr']['sgd']:g} and "
             f"Adam lr {entry['lr']['adam']:g} tuned at T on {entry['tune_episodes']} validation "
             "episodes.", "",
             "| method | " + " | ".join(f"{label[t]} steps" for t in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for method in METHODS:
        row = entry["scores"][method]
        lines.append(f"| {method} | " + " | ".join(_fmt(row[str(t)], scale, digits)
                                                     for t in steps) + " |")
    tr = entry["traces"]
    show = [t for t in (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 25, 30, 40, 50) if t <= 5 * T]
    lines += ["", f"Dynamics (means over the {entry['episodes']} episodes; f and i over all "
              "coordinates; f min / i max: extremes over coordinates and episodes; |w|: L2 norm "
              f"of all learner weights, {entry['initial_weight_norm']:.2f} at the learned init; "
              "loss: support loss before the step):", "",
              "| step | f mean | 1 - f mean | f min | i mean | i max | |w| rule | |w| SGD | "
              "|w| Adam | loss rule | loss SGD | loss Adam |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rule, sgd, adam = tr["learned rule"], tr["SGD"], tr["Adam"]
    for t in show:
        k = t - 1
        lines.append(
            f"| {t} | {rule['f'][k]:.5f} | {1 - rule['f'][k]:.2e} | {rule['f_min'][k]:.4f} | "
            f"{rule['i'][k]:.4f} | {rule['i_max'][k]:.4f} | {rule['weight_norm'][k]:.3f} | "
            f"{sgd['weight_norm'][k]:.3f} | {adam['weight_norm'][k]:.3f} | "
            f"{rule['loss'][k]:.4f} | {sgd['loss'][k]:.4f} | {adam['loss'][k]:.4f} |")
    shrink = math.prod(rule["f"])
    lines += ["", f"Product of the mean forget gate over all {5 * T} steps: {shrink:.4f} "
              f"(a pure-decay factor; the weights also move by the gradient term). Run time "
              f"{entry['seconds']:.0f} s (of which tuning {entry['tune_seconds']:.0f} s), load "
              f"average at end {' '.join(f'{x:.2f}' for x in entry['load_average_end'])}.", ""]
    return lines


def markdown(doc: dict) -> str:
    lines = ["# Past the horizon: learned rules run for more steps than they were trained for",
             "", "Generated by `benchmarks/horizon.py` (do not edit by hand; conclusions are "
             "passed with `--notes`). CPU, 1 thread.", ""]
    if doc.get("notes"):
        lines += ["## Conclusions", "", doc["notes"].strip(), ""]
    lines += ["## Results", ""]
    def order(name):
        entry = doc["entries"][name]
        return (entry["task"] == "sinusoid", entry["setting"]["ways"] or 0,
                entry["setting"]["shots"], name)

    for name in sorted(doc["entries"], key=order):
        lines += entry_markdown(doc["entries"][name])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", default=list(DEFAULT_CHECKPOINTS),
                        help="shipped names or paths (default: the four Omniglot checkpoints)")
    parser.add_argument("--data-root", default="/work/shared/data/omniglot",
                        help="Omniglot folder (images_background.zip, images_evaluation.zip)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="test episodes per checkpoint (default 100 for 5-way, 40 for "
                             "20-way, 200 for sinusoid)")
    parser.add_argument("--tune-episodes", type=int, default=20)
    parser.add_argument("--protocol", help="Omniglot protocol to test on instead of the "
                                           "checkpoint's (vinyals|lake|lake-within)")
    parser.add_argument("--force-overlap", action="store_true",
                        help="study a checkpoint on test characters it was meta-trained on")
    parser.add_argument("--json", default="docs/results/horizon.json")
    parser.add_argument("--markdown", default="docs/results/horizon.md")
    parser.add_argument("--notes", help="a text file of conclusions to put in the Markdown")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"# horizon benchmark; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{load_average()} (start)")
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.is_file() else {"entries": {}}
    if args.notes:
        doc["notes"] = Path(args.notes).read_text()
    for name in args.checkpoints:
        key = Path(name).parent.name if Path(name).name == "best.safetensors" else str(name)
        stored = doc["entries"].get(key)
        if stored and not args.force and (args.episodes is None or
                                          stored["episodes"] == args.episodes):
            print(f"{key}: stored, skipped")
            continue
        entry = study(name, args)
        entry["name"] = key
        doc["entries"][key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
        print("\n".join(entry_markdown(entry)), flush=True)
        print(f"({load_average()})", flush=True)
    # Also when every entry was stored: --notes alone must reach the JSON, or the next run's
    # Markdown loses the conclusions.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    Path(args.markdown).write_text(markdown(doc))
    print(f"{load_average()} (end); run time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
