"""Ship a rule meta-trained over the task distribution (``task = "general"``) with its card.

    python -m learned_optim.packaging general --runs runs/general [RUN ...] \\
        --scratch docs/results/scratch.json --transfer docs/results/transfer_general_T5.json

``--runs`` lists the run folders in training order (each continuing the previous one with
``--resume`` in the same folder, or ``--init-from`` its best checkpoint in a new one). The best
checkpoint of the last run is re-saved as ``learned_optim/pretrained/NAME.safetensors`` with a
configuration free of machine paths and a record holding the card's facts; ``NAME.md`` beside
it is the card. The results come from the benchmark JSONs (``benchmarks/scratch.py`` and
``benchmarks/transfer.py``): nothing is typed by hand.

``--step-decay-from STEP_SIZE.json [...]`` sets the rule's ``step_decay`` from the outputs of
``benchmarks/step_size.py`` (long problems of the meta-*validation* stream, never the
evaluation sets): the ``isqrt:TAU`` setting with the highest mean held-out accuracy over all
problems of the files, or none if the undecayed rule (``1.0``) scores at least as high
(:func:`choose_step_decay`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from learned_optim.checkpoint import PRETRAINED_DIR, load_checkpoint, save_checkpoint
from learned_optim.packaging.facts import training_facts

__all__ = ["package_general", "card_markdown", "choose_step_decay"]

PROG = "python -m learned_optim.packaging"  # as the module is run

# Machine-specific fields dropped from a shipped configuration.
_LOCAL_FIELDS = ("run_dir", "data_root", "init_from", "device", "max_time_s")


def _scratch_results(path: Path) -> dict:
    """Final test accuracy per method and problem, and the verdicts, from scratch.json."""
    doc = json.loads(Path(path).read_text())
    final = str(doc["setting"]["steps"])
    results = {}
    for problem, entry in doc["problems"].items():
        for method, data in entry["methods"].items():
            summary = data["summary"].get(final)
            results.setdefault(problem, {})[method] = (
                None if summary is None else summary["test_accuracy"])
    return {"steps": doc["setting"]["steps"], "results": results,
            "lr": {p: e["lr"] for p, e in doc["problems"].items()},
            "verdicts": doc.get("verdicts", [])}


def _transfer_counts(path: Path) -> dict:
    """How many few-shot cells the rule wins against tuned SGD and tuned Adam."""
    doc = json.loads(Path(path).read_text())
    cells = doc["cells"].values()
    rule = [c["results"]["learned rule"]["mean"] for c in cells]
    return {"steps": doc["setting"]["steps"], "cells": len(rule),
            "beats_sgd": sum(r > c["results"]["SGD"]["mean"] for r, c in zip(rule, cells)),
            "beats_adam": sum(r > c["results"]["Adam"]["mean"] for r, c in zip(rule, cells))}


def choose_step_decay(paths: list[Path]) -> dict:
    """The ``step_decay`` the evidence of ``benchmarks/step_size.py`` selects, with the evidence.

    Pooled over the files (each a different slice of one validation stream, all with the same
    settings and horizon), the mean held-out accuracy of every setting; ``tau`` is that of the
    best ``isqrt:TAU`` setting when it beats the undecayed ``1.0``, else None.

    >>> import json, tempfile
    >>> doc = {"setting": {"rule": "general", "horizon": 2000, "seed": 5, "first": 0,
    ...                    "split": "val", "problems": ["a", "b"]},
    ...        "accuracy": {"1.0": [50.0, 60.0], "isqrt:100": [55.0, 61.0]}}
    >>> path = Path(tempfile.mkdtemp()) / "s.json"
    >>> _ = path.write_text(json.dumps(doc))
    >>> choose_step_decay([path])["tau"]
    100.0
    """
    pooled: dict[str, list[float]] = {}
    problems, horizons, splits = [], set(), set()
    for path in paths:
        doc = json.loads(Path(path).read_text())
        if "accuracy" not in doc:
            raise ValueError(f"{path}: no held-out accuracy (written by an older step_size.py)")
        if pooled and set(doc["accuracy"]) != set(pooled):
            raise ValueError(f"{path}: settings {sorted(doc['accuracy'])} differ from the "
                             f"other files' {sorted(pooled)}")
        for key, values in doc["accuracy"].items():
            pooled.setdefault(key, []).extend(values)
        problems += doc["setting"]["problems"]
        horizons.add(doc["setting"]["horizon"])
        splits.add(doc["setting"]["split"])
    if splits != {"val"} or len(horizons) != 1:
        raise ValueError(f"step-decay evidence must come from one horizon of the validation "
                         f"stream, got splits {sorted(splits)} and horizons {sorted(horizons)}")
    if "1.0" not in pooled:
        raise ValueError("step-decay evidence needs the undecayed setting 1.0 to compare with")
    means = {key: sum(v) / len(v) for key, v in pooled.items()}
    decays = {key: mean for key, mean in means.items() if key.startswith("isqrt:")}
    best = max(decays, key=decays.get) if decays else None
    tau = (float(best.split(":", 1)[1])
           if best is not None and decays[best] > means["1.0"] else None)
    wins = ({} if best is None else
            {"problems_better": sum(a > b for a, b in zip(pooled[best], pooled["1.0"])),
             "problems_worse": sum(a < b for a, b in zip(pooled[best], pooled["1.0"]))})
    return {"tau": tau, "mean_accuracy": means, "problems": len(problems),
            "horizon": horizons.pop(), "best_setting": best, **wins,
            "evidence": [str(path) for path in paths]}


def package_general(name: str, runs: list[Path], *, scratch: Path, transfer: list[Path],
                    hardware: str, notes: list[str] = (), out_dir: Path = PRETRAINED_DIR,
                    step_decay_from: list[Path] = ()) -> Path:
    """Re-save the last run's best checkpoint as ``out_dir/NAME.safetensors`` with its card;
    ``notes`` are facts the run folders do not hold (e.g. a run stopped by hand);
    ``step_decay_from``: :func:`choose_step_decay`'s evidence files."""
    runs = [Path(run) for run in runs]
    checkpoint = load_checkpoint(runs[-1] / "best.safetensors")
    decay = choose_step_decay(step_decay_from) if step_decay_from else None
    if decay is not None:
        checkpoint.meta_learner.step_decay = decay["tau"]
    config = {k: v for k, v in checkpoint.record["config"].items() if k not in _LOCAL_FIELDS}
    if config.get("task") != "general":
        raise ValueError(f"{runs[-1]} is a {config.get('task')!r} run, not a 'general' one")
    # Continuation runs re-validate the checkpoint the previous run ended on: counted once.
    facts = training_facts(runs, restarted_validations=False)
    scratch_results = _scratch_results(scratch)
    headline = scratch_results["results"]["mnist5k-mlp"]
    card = {
        **facts, "hardware": hardware, "learned_init_trained": False,
        "best_meta_step": checkpoint.record["card"]["meta_steps"],
        "regenerate": " && ".join(
            [f"learned-optim meta-train --config configs/{name}.toml --data-root "
             "PATH/TO/omniglot"] + ["(same command) --resume"] * (len(runs) - 1)
            + ([] if decay is None else _decay_commands(name, decay))),
        "test": {"metric": "accuracy",
                 "what": f"784-64-64-10 MLP on MNIST-5k from scratch, "
                         f"{scratch_results['steps']} steps, test split, 3 seeds; the rule "
                         "as a drop-in (opt.step(), no loss)",
                 "results": {"meta-learner LSTM": headline["learned rule, no loss"],
                             "meta-learner LSTM, given the loss": headline["learned rule"],
                             "sgd": headline["SGD tuned"], "adam": headline["Adam tuned"],
                             "adam 1e-3": headline["Adam 1e-3"]}},
        "scratch": scratch_results,
        "few_shot": [_transfer_counts(path) for path in transfer],
        "notes": list(notes),
        **({} if decay is None else {"step_decay": decay}),
    }
    path = save_checkpoint(Path(out_dir) / f"{name}.safetensors", checkpoint.meta_learner,
                           config=config, dataset="general", metrics=checkpoint.record["metrics"],
                           card=card)
    (Path(out_dir) / f"{name}.md").write_text(card_markdown(name, config, card,
                                                            checkpoint.meta_learner))
    return path


def _decay_commands(name: str, decay: dict) -> list[str]:
    """The commands that measured the step-decay evidence and applied it."""
    commands = []
    for path in decay["evidence"]:
        words = json.loads(Path(path).read_text())["setting"]["command"].split()
        kept = [w for i, w in enumerate(words)  # without this machine's paths
                if w not in ("--data-root", "--json")
                and (i == 0 or words[i - 1] not in ("--data-root", "--json"))]
        commands.append(f"python benchmarks/step_size.py {' '.join(kept)} "
                        f"--data-root PATH/TO/omniglot --json {path}")
    return commands + [f"{PROG} {name} --runs RUN ... --step-decay-from "
                       + " ".join(decay["evidence"])]


def _percent(row: dict | None) -> str:
    return "diverged" if row is None else f"{100 * row['mean']:.1f} +- {100 * row['ci95']:.1f}%"


def _decay_rows(decay: dict | None) -> list[str]:
    """The card's line on the step decay and how it was chosen."""
    if decay is None:
        return []
    scores = ", ".join(f"{key} {mean:.1f}%" for key, mean in decay["mean_accuracy"].items())
    chosen = ("none (the undecayed rule scored highest)" if decay["tau"] is None else
              f"update x sqrt({decay['tau']:g} / t) after {decay['tau']:g} steps "
              f"(`step_decay={decay['tau']:g}`; better on {decay['problems_better']} of "
              f"{decay['problems']} problems, worse on {decay['problems_worse']})")
    return [f"| long-run step decay | {chosen}; chosen by held-out accuracy on "
            f"{decay['problems']} minibatch problems of {decay['horizon']} steps from the "
            f"meta-validation stream (`benchmarks/step_size.py`; mean accuracy: {scores}); "
            "never on the evaluation sets |"]


def card_markdown(name: str, config: dict, card: dict, rule) -> str:
    """The human-readable model card of a general rule."""
    trace = card["validation_trace"]
    lines = [
        f"# Model card: `{name}`", "",
        "Meta-Learner LSTM (Ravi & Larochelle 2017) update rule alone (no learned init), "
        "meta-trained over a distribution of fresh learners, tasks and horizons "
        "(`learned_optim.general`). It is what `LSTMMetaOptimizer(params)` uses when no "
        "meta-learner is given.", "",
        "| | |", "|---|---|",
        f"| meta-learner | LSTM, hidden size {rule.hidden_size}, p = {rule.p}; reads and applies "
        f"Adam's normalised gradient (scale {rule.gradient_scale}, momentum {rule.momentum}, "
        f"decay {rule.rms_decay}); loss input optional |",
        f"| task distribution | MLPs (1-3 hidden layers, 16-256 units, ReLU/tanh/GELU) and conv "
        f"nets (2-4 blocks, 8-64 filters), with and without BatchNorm, random init scale; "
        f"Omniglot background alphabets (few-shot and minibatch), sinusoids, teacher "
        f"regression, blobs, teacher classification; horizons {config['horizon_min']}-"
        f"{config['horizon_max']} steps in truncations of {config['truncation']}; the loss "
        f"withheld from {config['loss_dropout']:.0%} of the problems |",
        "| never seen | scikit-learn digits, MNIST, Animal-MNIST, Omniglot's evaluation "
        "alphabets |",
        f"| training | Adam {config['meta_lr']}, clip {config['grad_clip']}, "
        f"{config['meta_batch']} problems a meta-step, first order, mean log validation loss "
        f"over each truncation |",
        f"| trained | {card['meta_steps']} meta-steps ({card['meta_updates']} Adam updates, "
        f"{card['episodes_trained']} problems), {card['train_wall_time_s']} s on "
        f"{card['hardware']}; best at meta-step {card['best_meta_step']} |",
        f"| validation | mean log loss ratio {trace[0]['val_log_loss_ratio']:.3f} untrained, "
        f"{min(e['val_log_loss_ratio'] for e in trace):.3f} best (lower is better) |",
        *_decay_rows(card.get("step_decay")),
        f"| regenerate | `{card['regenerate']}` |", "",
        f"## From scratch ({card['scratch']['steps']} minibatch steps, test accuracy, 3 seeds)",
        "", "No tuning for the rule; SGD and Adam tuned on a validation split "
        "(`docs/results/scratch.md` has the curves and the training losses).", "",
        "| problem | rule, `opt.step()` | rule, `opt.step(loss=loss)` | tuned SGD | tuned Adam "
        "| Adam 1e-3 |", "|---|---|---|---|---|---|"]
    for problem, row in card["scratch"]["results"].items():
        lines.append(f"| {problem} | {_percent(row.get('learned rule, no loss'))} | "
                     f"{_percent(row.get('learned rule'))} | "
                     f"{_percent(row.get('SGD tuned'))} | {_percent(row.get('Adam tuned'))} | "
                     f"{_percent(row.get('Adam 1e-3'))} |")
    lines += ["", "## Few-shot, fresh models (`docs/results/transfer_general_T*.md`)", ""]
    for counts in card["few_shot"]:
        lines.append(f"- T = {counts['steps']}: the rule beats tuned SGD in "
                     f"{counts['beats_sgd']} of {counts['cells']} cells and tuned Adam in "
                     f"{counts['beats_adam']}.")
    lines += ["", "## Targets", ""] + [f"- {v}" for v in card["scratch"]["verdicts"]] + [""]
    if card.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in card["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=Path("docs/results/scratch.json"))
    parser.add_argument("--transfer", nargs="*", type=Path, default=[])
    parser.add_argument("--hardware", default="the 2-core CPU (1 thread, shared)")
    parser.add_argument("--note", action="append", default=[],
                        help="a fact for the card that the run folders do not hold (repeatable)")
    parser.add_argument("--step-decay-from", nargs="*", type=Path, default=[],
                        help="benchmarks/step_size.py JSONs that choose the rule's step_decay")
    args = parser.parse_args(argv)
    path = package_general(args.name, args.runs, scratch=args.scratch, transfer=args.transfer,
                           hardware=args.hardware, notes=args.note,
                           step_decay_from=args.step_decay_from)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
