"""Turn a finished meta-training run into a shipped checkpoint with its model card.

    python -m learned_optim.packaging.episodic NAME --runs RUN_DIR [RUN_DIR ...] \
        --evaluation EVAL.json [--hardware "NVIDIA H200"]

``--runs`` lists the run folders in training order (a run warm-started from the previous one's
best checkpoint with ``--init-from`` continues it). The best checkpoint of the last run is
re-saved into ``learned_optim/pretrained/NAME.safetensors`` with a clean configuration (no
machine-specific paths) and a record holding the model card's facts; ``NAME.md`` beside it is
the human-readable card. ``EVAL.json`` is written by ``learned-optim evaluate ... --json``.

Baselines evaluated later (MAML, Meta-SGD) join a shipped card without touching its tensors::

    python -m learned_optim.packaging.episodic NAME --add-results EVAL.json \
        --baseline-runs maml=RUN_DIR metasgd=RUN_DIR [--hardware "..."] \
        [--baseline-notes metasgd="a fact the run folder does not hold"]

A run warm-started from the best checkpoint of the run behind *another* shipped checkpoint
(Lake's 20-way run starts from the 5-way run that shipped as ``omniglot-lake-5w1s``) is packaged
with ``--after SHIPPED`` once that run's folder is gone: the shipped card's training is counted
first, its hardware and command precede this run's, and none of its results are kept (another
setting).

A run warm-started from the shipped checkpoint itself (``--init-from
learned_optim/pretrained/NAME.safetensors``) is packaged with ``--continues``: the shipped card's
training (meta-steps, episodes, wall time, validation trace) is counted first, and its
separately trained baselines (MAML, Meta-SGD: their rows do not depend on this checkpoint) are
kept when the new evaluation has no row of their own.

``EVAL.json`` must hold the card's own LSTM row unchanged (same mean and episodes: the proof
that the baselines ran on the card's episodes); its other rows are added, each with how its
baseline was trained (read from its run folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from learned_optim.checkpoint import (
    PRETRAINED_DIR,
    load_checkpoint,
    read_preprocessing,
    read_training_data,
    save_checkpoint,
)
from learned_optim.config import MetaTrainConfig
from learned_optim.data.omniglot import WITHIN_ALPHABET_PROTOCOLS
from learned_optim.data.preprocessing import Preprocessing
from learned_optim.data.splits import training_data
from learned_optim.learners import LEARNER_CLASSES
from learned_optim.packaging.facts import continued_facts, training_facts
from learned_optim.runstate import read_run_config

__all__ = ["package", "add_results", "card_markdown", "card_setting", "read_evaluation",
           "baseline_training_note", "result_notes", "with_warm_start_seen"]

PROG = "python -m learned_optim.packaging.episodic"  # as the module is run

DEFAULT_META_LR = MetaTrainConfig().meta_lr


def pretraining_text(card: dict) -> str:
    """The card's words for how the learned init's features were pre-trained ("" if not)."""
    source = (f"the training classes of {card['pretrain_alphabets']} training alphabets, "
              "meta-training's episodes drawn from the other alphabets"
              if card.get("pretrain_alphabets") else
              "all training and validation classes (so its validation scores are not held out)"
              if card.get("pretrain_on_validation") else "all training classes")
    stages = []
    if card.get("pretrain_epochs"):
        stages.append(f"as one classifier of {source} ({card['pretrain_epochs']} epochs")
    if card.get("pretrain_episodes"):
        stages.append(f"as a prototypical network on {'them' if stages else source} "
                      f"({card['pretrain_episodes']} episodes")
    if not stages:
        return ""
    distorted = ", randomly distorted images" if card.get("pretrain_distort") else ""
    return ("; the learned init's features pre-trained first "
            + "), then ".join(stages) + f"{distorted}, `learned_optim.pretrain`)")


def preprocessing_of(record: dict) -> dict | None:
    """The record's preprocessing, or the one its configuration implies (older runs)."""
    stored = read_preprocessing(record)
    if stored is not None:
        return stored
    spec = Preprocessing.for_config(record["config"])
    return None if spec is None else spec.to_dict()


def card_setting(record: dict) -> dict:
    """The setting of a checkpoint's card test; cards written before evaluations recorded their
    protocol (Omniglot split, sinusoid family) take it from the checkpoint's configuration."""
    setting = dict(record["card"]["test"]["setting"])
    setting.setdefault("protocol", record["config"].get("protocol"))
    return setting


def read_evaluation(path: Path) -> dict:
    """An ``evaluate --json`` file without its per-episode scores (kept in the file, not on
    the card, whose rows are summaries)."""
    evaluation = json.loads(Path(path).read_text())
    for row in evaluation.get("results", {}).values():
        row.pop("scores", None)
    return evaluation


def same_setting(setting: dict, evaluation: dict) -> bool:
    """Whether an evaluation ran in ``setting`` (any checkpoint): every key of either agrees."""
    theirs = evaluation["setting"]
    return all(setting.get(k) == theirs.get(k) for k in setting.keys() | theirs.keys()
               if k != "checkpoint")


def kept_baselines(shipped: dict, evaluation: dict) -> dict:
    """Rows of the shipped record's separately trained baselines that the new evaluation can
    keep: same setting and episodes (a run continued on another family or split keeps none)."""
    if not same_setting(card_setting(shipped), evaluation):
        return {}
    episodes = next(iter(evaluation["results"].values()))["episodes"]
    return {method: row for method, row in shipped["card"]["test"]["results"].items()
            if "trained" in row and method not in evaluation["results"]
            and row["episodes"] == episodes}


def seen_characters(data: dict) -> str:
    counts = ", ".join(f"{len(v)} {k}" for k, v in data["characters"].items())
    rotated = "".join(f"; {split} also rotated by {', '.join(map(str, angles[1:]))} degrees "
                      "as new classes" for split, angles in data.get("rotations", {}).items())
    warm = "".join(f"; with what its warm start `{name}` saw"
                   for name in data.get("warm_started_from", []))
    return (f"{data['dataset']} characters: {counts} (protocol {data['split_protocol']}, split "
            f"seed {data['split_seed']}{rotated}{warm}; `learned_optim.data.splits`)")


def preprocessing_text(spec: dict) -> str:
    steps = [f"mode {spec['mode']}"]
    if spec.get("crop_to_ink") is not None:
        steps.append(f"cropped to the square around the ink, margin {spec['crop_to_ink']:g}")
    steps += [f"{spec['resample']} resize to {spec['size']}x{spec['size']}",
              "inverted (ink = 1)" if spec["invert"] else "not inverted"]
    if spec.get("mean") is not None:
        steps.append(f"normalised mean {spec['mean']} std {spec['std']}")
    return ", ".join(steps) + " (`learned_optim.data.preprocess`)"


def result_notes(row: dict, metric: str) -> str:
    """The notes column of a card's result row: every field but the numbers, the paired
    difference that ``learned-optim evaluate`` records written out.

    >>> result_notes({"mean": 0.6, "ci95": 0.01, "episodes": 600, "lr": 0.1,
    ...               "paired_difference": {"minus": "meta-learner LSTM", "mean": -0.0763,
    ...                                     "ci95": 0.004, "episodes": 600}}, "accuracy")
    'lr 0.1, minus meta-learner LSTM (paired) -7.63 +- 0.40 points'
    """
    scale, points = (100.0, " points") if metric == "accuracy" else (1.0, "")
    notes = []
    for key, value in row.items():
        if key in ("mean", "ci95", "episodes", "scores"):
            continue
        if key == "paired_difference" and isinstance(value, dict):
            notes.append(f"minus {value['minus']} (paired) {value['mean'] * scale:+.2f} +- "
                         f"{value['ci95'] * scale:.2f}{points}")
        else:
            notes.append(f"{key} {value}")
    return ", ".join(notes)


def card_markdown(name: str, record: dict) -> str:
    config, card = record["config"], record["card"]
    evaluation = card["test"]
    metric = evaluation["metric"]
    scale, unit = (100.0, " (%)") if metric == "accuracy" else (1.0, "")
    rows = "\n".join(
        f"| {method} | {r['mean'] * scale:.2f} | {r['ci95'] * scale:.2f} | {r['episodes']} | "
        f"{result_notes(r, metric)} |"
        for method, r in evaluation["results"].items())
    setting = evaluation["setting"]
    task = (f"{setting['ways']}-way {setting['shots']}-shot" if setting.get("ways")
            else f"{setting['shots']}-shot regression")
    meta = record["meta_learner"]
    order = "first" if config["first_order"] else "second"
    facts = [
        ("task", f"{config['task']} {task}, {setting['inner_steps']} inner steps (T), "
                 f"{setting['queries']} queries"),
        ("split", f"{config.get('protocol')} (see `learned_optim.data`)"),
        *([("seen in meta-training", seen_characters(record["training_data"]))]
          if record.get("training_data") else []),
        *([("preprocessing", preprocessing_text(record["preprocessing"]))]
          if record.get("preprocessing") else []),
        ("learner", card["learner"]),
        ("meta-learner", f"LSTM, hidden size {meta['hidden_size']}, p = {meta['p']}"),
        ("training", f"Adam {config['meta_lr']}"
                     + ("" if config.get("rule_lr") in (None, config["meta_lr"]) else
                        f" (the rule's weights {config['rule_lr']})")
                     + f", clip {config['grad_clip']}, meta-batch "
                     f"{config['meta_batch']}, {order} order"
                     + pretraining_text(card)),
        ("trained", f"{card['meta_steps']} meta-steps, {card['episodes_trained']} episodes, "
                    f"{card['train_wall_time_s']} s on {card['hardware']}"),
        ("regenerate", f"`{card['command']}`"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in facts)
    return f"""# Model card: `{name}`

Meta-Learner LSTM (Ravi & Larochelle 2017) update rule with a learned initialisation.

| | |
|---|---|
{table}

## Test results ({evaluation['split']} split, 95% CI)

| method | {metric}{unit} | 95% CI | episodes | notes |
|---|---|---|---|---|
{rows}

All methods adapt the same learner for the same number of steps on the same episodes. SGD and
Adam start from this checkpoint's learned init (learning rates chosen on validation episodes), so
they differ from the LSTM in the update rule only; MAML and Meta-SGD, where present, were
meta-trained with the same routine and use their own learned init; `nn` is 1-nearest-neighbour in
the learned init's feature space. BatchNorm uses the support set's statistics only (not
transductive).
{lake_note(config, evaluation)}"""


def with_warm_start_seen(seen: dict | None, earlier: dict | None, name: str) -> dict | None:
    """A ``training_data`` record that also counts what the warm start ``name`` saw: a run
    continued from another checkpoint's weights carries what they were trained on (its rule,
    if not its init), so each split's characters are the union of both records.

    >>> ours = {"dataset": "omniglot", "characters": {"train": [1, 2], "val": [5]}}
    >>> merged = with_warm_start_seen(ours, {"dataset": "omniglot",
    ...                                      "characters": {"train": [2, 3], "val": [4]}}, "x")
    >>> merged["characters"], merged["warm_started_from"]
    ({'train': [1, 2, 3], 'val': [4, 5]}, ['x'])
    """
    if seen is None or earlier is None or earlier.get("dataset") != seen.get("dataset"):
        return seen
    characters = {split: sorted(set(seen["characters"].get(split, []))
                                | set(earlier["characters"].get(split, [])))
                  for split in {*seen["characters"], *earlier["characters"]}}
    return {**seen, "characters": dict(sorted(characters.items(), key=lambda kv: kv[0] != "train")),
            "warm_started_from": [*earlier.get("warm_started_from", []), name]}


def lake_note(config: dict, evaluation: dict) -> str:
    """For Lake's protocol: the error rates beside Lake et al.'s published 20-way figures."""
    protocol = config.get("protocol")
    if protocol not in WITHIN_ALPHABET_PROTOCOLS or evaluation["metric"] != "accuracy":
        return ""
    errors = ", ".join(f"{method} {100 * (1 - r['mean']):.1f}% +- {100 * r['ci95']:.1f}"
                       for method, r in evaluation["results"].items())
    return f"""
Lake et al.'s protocol (`{protocol}`): meta-trained on the 30 background alphabets only; tested
on the 20 evaluation alphabets, which it never saw, each episode's classes from one alphabet and
its support and query images by different drawers. Error rates: {errors}. Published by Lake et
al. (Science 2015) for 20-way within-alphabet one-shot classification: people 4.5%, Bayesian
Program Learning 3.3%, Siamese convnet 8.0%, convnet 13.5%.
"""


def baseline_training_note(run: Path, hardware: str, note: str = "") -> str:
    """How a MAML / Meta-SGD baseline was trained, from its run folder (plus ``note``)."""
    config = read_run_config(run)
    facts = training_facts([run])
    order = "first" if config["first_order"] else "second"
    meta_lr = config.get("meta_lr", DEFAULT_META_LR)
    text = (f"same routine and config as the LSTM ({order} order, T = {config['inner_steps']}, "
            f"meta-batch {config['meta_batch']}, {facts['meta_steps']} meta-steps"
            f"{'' if meta_lr == DEFAULT_META_LR else f', meta-lr {meta_lr:g}'}), inner lr "
            f"{config['inner_lr']}, {facts['train_wall_time_s']} s on {hardware}")
    planned = config.get("meta_steps", facts["meta_steps"])
    if facts["meta_steps"] < planned:  # a run stopped early (a non-finite meta-loss, a limit)
        text += f"; stopped at meta-step {facts['meta_steps']} of {planned}"
    return f"{text}; {note}" if note else text


def add_results(name: str, evaluation_path: Path, baseline_runs: dict[str, Path],
                hardware: str, notes: dict[str, str] | None = None) -> Path:
    """Merge the baseline rows of an evaluation into the shipped checkpoint ``name``."""
    path = PRETRAINED_DIR / f"{name}.safetensors"
    shipped = load_checkpoint(path)
    record = shipped.record
    test = record["card"]["test"]
    evaluation = read_evaluation(evaluation_path)
    ours_name, ours = next(iter(test["results"].items()))
    theirs = evaluation["results"].get(ours_name)
    if (theirs is None or not same_setting(card_setting(record), evaluation)
            or theirs["episodes"] != ours["episodes"] or abs(theirs["mean"] - ours["mean"]) > 1e-9):
        raise SystemExit(
            f"{evaluation_path}: its {ours_name!r} row or setting differs from the card of "
            f"{name} ({ours['mean']:.6f} on {ours['episodes']} episodes): the baselines were "
            "not evaluated on the card's episodes")
    for method, result in evaluation["results"].items():
        if method == ours_name:
            continue
        if method in baseline_runs:
            result = {**result, "trained": baseline_training_note(
                baseline_runs[method], hardware, (notes or {}).get(method, ""))}
        test["results"][method] = result
    save_checkpoint(path, shipped.meta_learner, learned_init=shipped.learned_init,
                    config=record["config"], dataset=record["dataset"],
                    metrics=record["metrics"], card=record["card"],
                    preprocessing=record.get("preprocessing"),
                    training_data=record.get("training_data"))
    (PRETRAINED_DIR / f"{name}.md").write_text(card_markdown(name, load_checkpoint(path).record))
    return path


def package(name: str, runs: list[Path], evaluation_path: Path, hardware: str, command: str,
            *, continues: bool = False, after: str | None = None) -> Path:
    """Ship the best checkpoint of ``runs[-1]`` as ``name`` with its card; return its path.

    ``continues``: ``runs[0]`` was warm-started from the shipped ``name``; ``after``: from the
    run behind the shipped checkpoint ``after`` (see the module's documentation)."""
    if continues and after is not None:
        raise SystemExit("--continues and --after exclude each other")
    best = load_checkpoint(runs[-1] / "best.safetensors")
    config = dict(best.record["config"])
    for machine_specific in ("data_root", "run_dir", "init_from", "max_time_s", "device"):
        config.pop(machine_specific, None)
    evaluation = read_evaluation(evaluation_path)
    evaluated = Path(evaluation["setting"].get("checkpoint", ""))
    if evaluated.resolve() != (runs[-1] / "best.safetensors").resolve():
        raise SystemExit(f"{evaluation_path}: it evaluated {str(evaluated)!r}, not the best "
                         f"checkpoint of {runs[-1]}")
    facts = training_facts(runs)
    # Training that came before runs[0] (its warm start): that shipped checkpoint's card.
    before = None
    if continues or after is not None:
        init_from = read_run_config(runs[0]).get("init_from")
    if continues:
        if not init_from or Path(init_from).name != f"{name}.safetensors":
            raise SystemExit(f"{runs[0]}: --continues needs a first run started with "
                             f"--init-from .../{name}.safetensors, not {init_from!r}")
        shipped = load_checkpoint(PRETRAINED_DIR / f"{name}.safetensors").record
        evaluation["results"].update(kept_baselines(shipped, evaluation))
        before = shipped["card"]
    seen = read_training_data(best.record) or training_data(best.record["config"])
    if after is not None:
        if not init_from:
            raise SystemExit(f"{runs[0]}: --after {after} needs a first run warm-started with "
                             "--init-from (its configuration names none)")
        earlier = load_checkpoint(PRETRAINED_DIR / f"{after}.safetensors").record
        before = earlier["card"]
        seen = with_warm_start_seen(seen, read_training_data(earlier)
                                    or training_data(earlier["config"]), after)
    if before is not None:
        facts = continued_facts(before, facts)
        hardware = f"{before['hardware']}, then {hardware}"
        command = f"{before['command']}; then {command}"
    scale = (f", feature_scale={config['feature_scale']}" if config.get("feature_scale")
             else "")
    learner_class = LEARNER_CLASSES[config.get("architecture",
                                               MetaTrainConfig.architecture)].__name__
    learner = (f"{learner_class}(in_channels=1, ways={config['ways']}, "
               f"filters={config['filters']}, image_size={config['image_size']}{scale})"
               if config["task"] != "sinusoid" else "SinusoidMLP (1-40-40-1, ReLU)")
    adapt = config.get("adapt", MetaTrainConfig.adapt)
    if adapt != MetaTrainConfig.adapt:
        learner += (f"; every method adapts its {adapt} alone (adapt = {adapt!r}), the rest "
                    "stays the learned init")
    # Pre-training happens in the run that asks for it; later runs continue from its weights.
    pretrained = next((run_config for run in runs
                       if (run_config := read_run_config(run)).get("pretrain_epochs")
                       or run_config.get("pretrain_episodes")), None)
    card = {**{k: v for k, v in facts.items() if k != "validation_trace"},
            **({**{key: pretrained[key] for key in ("pretrain_epochs", "pretrain_episodes",
                                                    "pretrain_alphabets",
                                                    "pretrain_on_validation")
                   if pretrained.get(key)},
                "pretrain_distort": bool(pretrained.get("pretrain_distort"))}
               if pretrained else {}),
            "hardware": hardware, "learner": learner, "command": command,
            "test": evaluation, "validation_trace": facts["validation_trace"]}
    ours = next(iter(evaluation["results"].values()))
    metric = evaluation["metric"]
    path = save_checkpoint(
        PRETRAINED_DIR / f"{name}.safetensors", best.meta_learner,
        learned_init=best.learned_init, config=config, dataset=config["task"],
        metrics={f"test_{metric}": ours["mean"], f"test_{metric}_ci95": ours["ci95"],
                 "test_episodes": ours["episodes"]},
        card=card, preprocessing=preprocessing_of(best.record),
        training_data=seen)
    record = load_checkpoint(path).record
    (PRETRAINED_DIR / f"{name}.md").write_text(card_markdown(name, record))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--runs", type=Path, nargs="+")
    parser.add_argument("--evaluation", type=Path)
    parser.add_argument("--hardware", default="CPU")
    parser.add_argument("--command", help="the command that regenerates it")
    parser.add_argument("--continues", action="store_true",
                        help="the first run was warm-started from the shipped NAME itself")
    parser.add_argument("--after", metavar="SHIPPED",
                        help="the first run was warm-started from the run behind the shipped "
                             "SHIPPED (whose card's training is counted first)")
    parser.add_argument("--add-results", type=Path, metavar="EVAL.json",
                        help="add this evaluation's baseline rows to the shipped card")
    parser.add_argument("--baseline-runs", nargs="*", default=[], metavar="METHOD=RUN_DIR",
                        help="run folders of the baselines in --add-results")
    parser.add_argument("--baseline-notes", nargs="*", default=[], metavar="METHOD=TEXT",
                        help="a fact to add to a baseline's training note")
    args = parser.parse_args()
    if args.add_results:
        runs = dict(item.split("=", 1) for item in args.baseline_runs)
        notes = dict(item.split("=", 1) for item in args.baseline_notes)
        path = add_results(args.name, args.add_results,
                           {method: Path(run) for method, run in runs.items()}, args.hardware,
                           notes)
        print(f"updated {path} and {args.name}.md")
        return
    if not (args.runs and args.evaluation and args.command):
        parser.error("--runs, --evaluation and --command are required to package a new run")

    path = package(args.name, args.runs, args.evaluation, args.hardware, args.command,
                   continues=args.continues, after=args.after)
    print(f"wrote {path} and {args.name}.md")


if __name__ == "__main__":
    main()
