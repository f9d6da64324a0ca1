"""``learned-optim``: a thin command line over :func:`meta_train` and :func:`evaluate`.

Examples::

    learned-optim meta-train                         # sinusoid, a few minutes on a CPU
    learned-optim meta-train --task omniglot --data-root DATA --ways 5 --shots 1
    learned-optim meta-train --config configs/omniglot-5w1s.toml --resume
    learned-optim meta-train --run-dir runs/omniglot-5w1s-lstm --resume  # as it was configured
    learned-optim evaluate runs/omniglot-5w1s-lstm/best.safetensors --baselines sgd,adam,nn
    learned-optim plot runs/omniglot-5w1s-lstm        # curves.png from metrics.jsonl
    learned-optim predict omniglot-lake-20w1s --support SUPPORT_DIR --query QUERY_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from learned_optim import distributed
from learned_optim.config import (
    ADAPTED,
    ARCHITECTURES,
    METHODS,
    TASKS,
    MetaTrainConfig,
    load_config,
)
from learned_optim.runstate import METRICS_LOG, RunFolder, read_log

__all__ = ["main", "build_parser"]

# Options of the meta-train command that map one-to-one onto MetaTrainConfig fields.
_CONFIG_OPTIONS = {
    "task": (str, "task family", TASKS),
    "method": (str, "what is meta-learned: the LSTM rule or a baseline", METHODS),
    "data_root": (str, "folder of the data set (Omniglot zips, miniImageNet images+CSVs)", None),
    "protocol": (str, "omniglot split (vinyals|lake|lake-within|lake-alphabets) or sinusoid family "
                      "(maml|metasgd)", None),
    "ways": (int, "classes per episode (N)", None),
    "shots": (int, "support examples per class (K), or support points (sinusoid)", None),
    "queries": (int, "query examples per class (default 15)", None),
    "inner_steps": (int, "updates per episode (T)", None),
    "meta_batch": (int, "episodes per meta-update", None),
    "meta_steps": (int, "meta-updates to run", None),
    "meta_lr": (float, "Adam learning rate (default 1e-3)", None),
    "rule_lr": (float, "Adam learning rate of the rule's weights (default: --meta-lr; sinusoid "
                       "LSTM: 1e-2)", None),
    "grad_clip": (float, "global meta-gradient norm clip (default 0.25)", None),
    "hidden_size": (int, "meta-learner LSTM hidden size (default 20)", None),
    "gradient_scale": (float, "the rule reads RMS-scaled gradients, a step at most this "
                              "(general: 0.1; default: raw gradients, as in the paper)", None),
    "filters": (int, "conv learner filters (resnet12: of its first stage)", None),
    "architecture": (str, "image learner: conv4 (the paper's 4 blocks) or resnet12", ARCHITECTURES),
    "adapt": (str, "image learner: the parameters the rule adapts, all or head (the features "
                   "stay the learned init)", ADAPTED),
    "image_size": (int, "input side in pixels", None),
    "crop_to_ink": (float, "omniglot: crop each image to the square around its ink, widened by "
                           "this share on each side, before resizing (e.g. 0.1)", None),
    "feature_scale": (float, "conv learner: scale the features to this length before the head "
                             "(a cosine classifier; default: as they are)", None),
    "bn_momentum": (float, "BatchNorm momentum of the learner", None),
    "inner_lr": (float, "MAML step size / Meta-SGD initial step size", None),
    "validate_every": (int, "meta-updates between validations", None),
    "val_episodes": (int, "validation episodes", None),
    "checkpoint_every": (int, "meta-updates between saved states", None),
    "init_from": (str, "start from this checkpoint's rule and learned init", None),
    "pretrain_epochs": (int, "omniglot / miniimagenet: first train the learned init's features "
                             "as one classifier of all training classes for this many epochs",
                        None),
    "pretrain_episodes": (int, "omniglot / miniimagenet: (then) train the learned init's "
                               "features as a prototypical network on this many episodes of "
                               "the training classes (within one alphabet for the lake "
                               "protocols)", None),
    "pretrain_alphabets": (int, "omniglot: pre-train the features on this many of the training "
                                "alphabets and meta-train on episodes of the others", None),
    "query_statistics": (str, "meta-training's BatchNorm statistics of the query set: batch "
                              "(the paper: its own) or support (as validation and test)",
                         None),
    "max_time_s": (float, "stop after this many seconds of training (validated, saved)", None),
    "truncation": (int, "general: steps per truncated unroll (default 20)", None),
    "horizon_min": (int, "general: shortest training horizon in steps (default 5)", None),
    "horizon_max": (int, "general: longest training horizon in steps (default 300)", None),
    "loss_dropout": (float, "general: share of problems that withhold the loss (default 0.5)",
                     None),
    "seed": (int, "random seed", None),
    "run_dir": (str, "run folder (default runs/<task>-...)", None),
    "device": (str, "cpu, cuda, cuda:1, ...", None),
}


def _add_meta_train(commands) -> None:
    parser = commands.add_parser("meta-train", help="meta-train an update rule (and learned init)",
                                 description="Meta-train and save checkpoints in a run folder; "
                                             "with no options: the sinusoid task.")
    parser.add_argument("--config", type=Path, help="TOML or JSON file of MetaTrainConfig fields")
    for name, (kind, text, choices) in _CONFIG_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text,
                            choices=choices, default=None)
    parser.add_argument("--second-order", action="store_true", default=None,
                        help="full second-order meta-gradients (default: first order)")
    parser.add_argument("--no-learned-init", dest="learned_init", action="store_false",
                        default=None, help="keep the learner's initial weights fixed")
    parser.add_argument("--rotations", action="store_true", default=None,
                        help="omniglot lake protocols: add the training characters rotated "
                             "by 90, 180 and 270 degrees as new classes (a rotated alphabet is "
                             "a new alphabet; validation and test stay unrotated)")
    parser.add_argument("--pretrain-distort", dest="pretrain_distort", action="store_true",
                        default=None, help="with --pretrain-epochs or --pretrain-episodes: show "
                        "each pre-training image under a small random affine distortion")
    parser.add_argument("--pretrain-on-validation", dest="pretrain_on_validation",
                        action="store_true", default=None,
                        help="with --pretrain-epochs or --pretrain-episodes: pre-train on the "
                             "validation classes too (validation scores are then not held out); "
                             "set it also on an --init-from continuation of such a run")
    parser.add_argument("--download", action="store_true",
                        help="download a missing public data set (Omniglot)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir (with no --config, as saved in its "
                             "config.json); it may change --meta-lr, "
                             "--grad-clip, --meta-steps, --max-time-s, --validate-every, "
                             "--checkpoint-every, --device and --threads (configuration "
                             f"changes are logged in {METRICS_LOG})")
    parser.add_argument("--test-episodes", type=int, default=600,
                        help="test episodes evaluated after training (0: skip)")
    parser.add_argument("--baselines", default="sgd,adam",
                        help="baselines evaluated beside the result (comma list, '' for none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_threads(parser, adaptive=True)


def _add_threads(parser, *, adaptive: bool = False) -> None:
    text = ("CPU threads for torch (default: 1 for the sinusoid task, whose tiny kernels only "
            "wait on extra threads; torch's default otherwise)")
    if adaptive:
        text += ("; auto: torch's default, and only as many as cores are free for a meta-step "
                 "that starts while other processes hold cores (faster on a shared machine, "
                 "but the numbers then depend on the load)")
    parser.add_argument("--threads", type=_thread_count if adaptive else int, default=None,
                        help=text)


def _thread_count(text: str) -> int | str:
    """``--threads`` of meta-train: a count, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--threads takes a number of threads or 'auto', got {text!r}") from None


def _set_threads(threads: int | str | None, task: str) -> bool:
    """Apply ``--threads``; returns whether meta-steps choose their threads (``auto``)."""
    import torch

    adaptive = threads == "auto"
    if (threads is None or adaptive) and task in ("sinusoid", "general"):
        threads, adaptive = 1, False  # one thread already
    if isinstance(threads, int):
        if threads < 1:
            raise ValueError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    return adaptive


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="few-shot evaluation with 95%% CIs")
    parser.add_argument("checkpoint", help="checkpoint path or shipped name")
    parser.add_argument("--task", choices=TASKS)
    parser.add_argument("--data-root")
    parser.add_argument("--ways", type=int)
    parser.add_argument("--shots", type=int)
    parser.add_argument("--inner-steps", type=int)
    parser.add_argument("--protocol", help="evaluate on this omniglot protocol (vinyals|lake|"
                                           "lake-within: Lake et al.'s within-alphabet runs|"
                                           "lake-alphabets: the same test, validated "
                                           "within held-out background alphabets) or "
                                           "sinusoid family (maml|metasgd) instead")
    parser.add_argument("--queries", type=int, help="query examples per class (Lake: 1)")
    parser.add_argument("--force-overlap", action="store_true",
                        help="evaluate even on characters the checkpoint was meta-trained or "
                             "validated on (refused otherwise; the overlap is reported)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--baselines", default="",
                        help="comma list of sgd,adam,maml,metasgd,nn")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT",
                        help="checkpoints of other learners for the same setting: every one "
                             "adapts on its own and the queries get their mean probabilities")
    parser.add_argument("--maml", help="MAML checkpoint for the maml baseline")
    parser.add_argument("--metasgd", help="Meta-SGD checkpoint for the metasgd baseline")
    parser.add_argument("--tune-episodes", type=int, default=50,
                        help="validation episodes used to choose SGD/Adam learning rates")
    parser.add_argument("--device", default="cpu")
    _add_threads(parser)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_predict(commands) -> None:
    parser = commands.add_parser(
        "predict", help="classify images with a checkpoint after fitting a few examples",
        description="Fit a checkpoint's learner to SUPPORT (one sub-folder per class, the folder "
                    "name is the label) with its update rule, then print one line per image "
                    "file under QUERY: file, predicted label, probability.")
    parser.add_argument("checkpoint", help="checkpoint path or shipped name")
    parser.add_argument("--support", type=Path, required=True,
                        help="folder of class folders holding the labelled examples")
    parser.add_argument("--query", type=Path, required=True,
                        help="folder of images to label (searched recursively)")
    parser.add_argument("--inner-steps", type=int, help="updates on the support set (default: "
                                                        "the checkpoint's T)")
    parser.add_argument("--json", type=Path, help="also write the predictions as JSON here")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="CHECKPOINT",
                        help="checkpoints of other learners with the same preprocessing: each "
                             "adapts on its own and the queries get their mean probabilities")
    parser.add_argument("--device", default="cpu")
    _add_threads(parser)


def _predict(args) -> int:
    _set_threads(args.threads, "")
    from learned_optim.classifier import FewShotClassifier, list_images, read_class_folders

    paths, labels = read_class_folders(args.support)
    queries = list_images(args.query)
    if not queries:
        raise ValueError(f"{args.query}: no image files to classify")
    classifier = FewShotClassifier.from_pretrained(args.checkpoint, inner_steps=args.inner_steps,
                                                   device=args.device, ensemble=args.ensemble)
    classifier.fit(paths, labels)
    probabilities = classifier.predict_proba(queries)
    rows = []
    for path, row in zip(queries, probabilities):
        best = int(row.argmax())
        name = path.relative_to(args.query).as_posix()
        rows.append({"file": name, "label": classifier.classes_[best],
                     "probability": round(float(row[best]), 6),
                     "probabilities": {str(c): round(float(p), 6)
                                       for c, p in zip(classifier.classes_, row)}})
        print(f"{name}\t{classifier.classes_[best]}\t{row[best]:.4f}")
    if args.json:
        members = [str(m.checkpoint.path) for m in classifier.members]
        args.json.write_text(json.dumps({"checkpoint": str(classifier.checkpoint.path),
                                         **({"ensemble": members} if members else {}),
                                         "classes": classifier.classes_,
                                         "predictions": rows}, indent=2))
    return 0


def _add_plot(commands) -> None:
    parser = commands.add_parser("plot", help=f"draw a run's {METRICS_LOG} as PNG curves",
                                 description="Draw the meta-loss, training and validation curves "
                                             "of a meta-training run (needs matplotlib: "
                                             "pip install \"learned_optim[plot]\").")
    parser.add_argument("run_dir", type=Path, help=f"run folder holding {METRICS_LOG}")
    parser.add_argument("--out", type=Path, help="output PNG (default RUN_DIR/curves.png)")


def _plot(args) -> int:
    from learned_optim.plots import plot_run

    try:
        print(f"wrote {plot_run(args.run_dir, args.out)}")
    except ImportError as error:  # matplotlib missing: say which extra to install
        print(f"learned-optim plot: error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learned-optim", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_meta_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_plot(commands)
    return parser


def _config_from(args) -> MetaTrainConfig:
    base = load_config(args.config) if args.config else MetaTrainConfig()
    saved = RunFolder(args.run_dir).config_path if args.run_dir else None
    if args.resume and not args.config and saved is not None and saved.is_file():
        # --run-dir DIR --resume continues DIR's run as it was configured: options left out
        # keep their saved values, options given are checked as changes.
        base = load_config(saved)
    changes = {name: getattr(args, name) for name in _CONFIG_OPTIONS
               if getattr(args, name) is not None}
    if args.second_order:
        changes["first_order"] = False
    if args.learned_init is not None:
        changes["learned_init"] = args.learned_init
    if args.rotations:
        changes["rotations"] = True
    if args.pretrain_distort:
        changes["pretrain_distort"] = True
    if args.pretrain_on_validation:
        changes["pretrain_on_validation"] = True
    if args.download:
        changes["extra"] = {**base.extra, "download": True}
    return dataclasses.replace(base, **changes)


def _baselines(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _meta_train(args) -> int:
    from learned_optim.checkpoint import load_checkpoint
    from learned_optim.evaluate import evaluate
    from learned_optim.train import meta_train

    config = _config_from(args).resolved()
    adaptive = _set_threads(args.threads, config.task)
    best = meta_train(config, resume=args.resume, progress=not args.no_progress,
                      adaptive_threads=adaptive)
    if config.task == "general":
        return _report_general(config, best)
    if not distributed.is_main():  # under torchrun: rank 0 reports and runs the test episodes
        return 0
    record = load_checkpoint(best).record
    key = next(k for k in record["metrics"] if not k.endswith("ci95") and k != "val_episodes")
    start = next(e for e in read_log(config.run_dir) if key in e)  # the untrained validation
    print(f"validation {key[4:]}: untrained {start[key]:.4f} +- {start[key + '_ci95']:.4f}, "
          f"best {record['metrics'][key]:.4f} +- {record['metrics'][key + '_ci95']:.4f} "
          f"(meta-step {record['card']['meta_steps']})")
    print(f"best checkpoint: {best}")
    if args.test_episodes > 0:
        report = evaluate(best, episodes=args.test_episodes, baselines=_baselines(args.baselines),
                          device=config.device, progress=not args.no_progress)
        print(f"\ntest split, {args.test_episodes} episodes:")
        print(report.to_markdown())
        report.write_json(Path(config.run_dir) / "test_results.json")
    return 0


def _report_general(config: MetaTrainConfig, best: Path) -> int:
    from learned_optim.checkpoint import load_checkpoint

    record = load_checkpoint(best).record
    start = next(e for e in read_log(config.run_dir) if "val_log_loss_ratio" in e)
    print(f"validation log-loss ratio (lower is better): untrained "
          f"{start['val_log_loss_ratio']:.4f}, best {record['metrics']['val_log_loss_ratio']:.4f}"
          f" (meta-step {record['card']['meta_steps']})")
    print(f"best checkpoint: {best}")
    print("compare it with tuned SGD and Adam: python benchmarks/scratch.py and "
          "benchmarks/transfer.py --rule PATH")
    return 0


def _evaluate(args) -> int:
    _set_threads(args.threads, args.task or "")
    from learned_optim.evaluate import evaluate

    report = evaluate(
        args.checkpoint, task=args.task, ways=args.ways, shots=args.shots,
        inner_steps=args.inner_steps, protocol=args.protocol, data_root=args.data_root,
        episodes=args.episodes,
        split=args.split, baselines=_baselines(args.baselines),
        baseline_checkpoints={k: v for k, v in (("maml", args.maml),
                                                ("metasgd", args.metasgd)) if v},
        tune_episodes=args.tune_episodes, device=args.device, progress=not args.no_progress,
        queries=args.queries, force_overlap=args.force_overlap, ensemble=args.ensemble)
    print(json.dumps(report.setting))
    print(report.to_markdown())
    if args.json:
        report.write_json(args.json)
    if args.markdown:
        args.markdown.write_text(report.to_markdown() + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``learned-optim`` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "meta-train":
            return _meta_train(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "predict":
            return _predict(args)
        return _evaluate(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError,
            distributed.DistributedError) as error:
        rank, size = distributed.world()
        where = f" (rank {rank} of {size})" if size > 1 else ""
        print(f"learned-optim {args.command}{where}: error: {error}", file=sys.stderr)
        if isinstance(error, distributed.DistributedError) and size > 1:
            # A process group whose peer died can abort (SIGABRT) in torch's C++ teardown at
            # interpreter exit, hiding this exit code: the files are written, so leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
