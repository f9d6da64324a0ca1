"""Plot the forget gate f_t and input gate i_t of the learned rule over the inner steps.

The update rule is theta_t = f_t * theta_{t-1} - i_t * grad_t, with one (f_t, i_t) pair per
coordinate. This script fine-tunes the sinusoid MLP (1-40-40-1) on a few few-shot sinusoid
tasks with ``LSTMMetaOptimizer``, records the gates after every step, and draws, per parameter
tensor, their mean over episodes and their spread over the tensor's coordinates.

Run (offline, a few seconds on a CPU; needs matplotlib: ``pip install "learned_optim[plot]"``)::

    python examples/plot_gates.py                          # shipped rule, or a fresh one
    python examples/plot_gates.py --checkpoint runs/sinusoid-10shot-lstm/best.safetensors
    python examples/plot_gates.py --out gates.png --episodes 5 --steps 10

A freshly initialised meta-learner gives flat lines near f = 0.99 and i = 0.01 (gradient
descent with a small step): that is the paper's starting point. A meta-trained rule moves them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.nn import functional as F

from learned_optim import (
    MetaLearnerLSTM,
    available_pretrained,
    finetune,
    load_checkpoint,
    load_learned_init,
)
from learned_optim.data import SinusoidTasks
from learned_optim.learners import SinusoidMLP
from learned_optim.plots import plot_gates, record_gates

PRETRAINED = "sinusoid-10shot"


def choose_rule(path: str | None):
    """The update rule (and the checkpoint, for its learned init) to look at."""
    source = path or (PRETRAINED if PRETRAINED in available_pretrained() else None)
    if source is None:
        print(f"note: no shipped {PRETRAINED!r} checkpoint in this version; plotting a freshly "
              "initialised meta-learner (flat gates). Pass --checkpoint to plot a trained one.")
        torch.manual_seed(0)
        return MetaLearnerLSTM(), None, "fresh meta-learner"
    checkpoint = load_checkpoint(source)
    if checkpoint.meta_learner is None:
        raise SystemExit(f"{source} is a {checkpoint.method!r} baseline: it has no gates")
    return checkpoint.meta_learner, checkpoint, Path(str(source)).name


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint path or shipped name")
    parser.add_argument("--episodes", type=int, default=5, help="sinusoid tasks (default 5)")
    parser.add_argument("--steps", type=int, default=10, help="inner steps T (default 10)")
    parser.add_argument("--shots", type=int, default=10, help="support points (default 10)")
    parser.add_argument("--out", type=Path, default=Path("gates.png"), help="output PNG")
    parser.add_argument("--json", type=Path, help="also write the gate records as JSON")
    args = parser.parse_args(argv)

    rule, checkpoint, label = choose_rule(args.checkpoint)
    tasks = SinusoidTasks(shots=args.shots, seed=2_000_003)  # the test stream of meta_train
    records = []
    for index in range(args.episodes):
        episode = tasks.episode(index)
        torch.manual_seed(index)
        model = SinusoidMLP()
        if checkpoint is not None and checkpoint.learned_init is not None:
            load_learned_init(model, checkpoint)
        before = F.mse_loss(model(episode.query_inputs), episode.query_targets).item()
        # A new task: finetune gives the rule a new optimizer (new per-coordinate state); the
        # hook records the gates after every step.
        adapted = finetune(model, episode.support_inputs, episode.support_targets,
                           optimizer=rule, steps=args.steps, loss_fn=F.mse_loss,
                           on_step=lambda step, index=index: records.extend(record_gates(
                               step.optimizer, step=step.step, episode=index,
                               model=step.model)))
        with torch.no_grad():
            after = F.mse_loss(adapted(episode.query_inputs), episode.query_targets).item()
        print(f"episode {index}: query MSE {before:.3f} -> {after:.3f} after {args.steps} steps")

    last = [r for r in records if r["step"] == args.steps]
    for layer in dict.fromkeys(r["layer"] for r in last):
        rows = [r for r in last if r["layer"] == layer]
        forget = sum(r["forget_mean"] for r in rows) / len(rows)
        input_ = sum(r["input_mean"] for r in rows) / len(rows)
        print(f"  step {args.steps}, {layer:18s} f_t {forget:.4f}  i_t {input_:.4f}")
    path = plot_gates(records, args.out, title=f"Gates of {label} on {args.episodes} sinusoid "
                      f"tasks ({args.shots}-shot), band: spread over coordinates")
    print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        # Small tensors: one thread is as fast, and does not stall on a busy machine.
        torch.set_num_threads(1)
    main()
