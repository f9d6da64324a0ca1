"""Meta-train the update rule through the Python API, then load the checkpoint and use it.

A short sinusoid run (MAML's 10-shot regression, the sinusoid MLP 1-40-40-1): ``meta_train``
writes a run folder (``config.json``, ``metrics.jsonl``, a resumable ``last.state.safetensors``
and the best checkpoint ``best.safetensors``); ``load_checkpoint`` reads the best one back, and
its update rule and learned initialisation fine-tune a new task.

Run (offline, about a minute on 2 CPU cores)::

    python examples/meta_train.py                       # run folder in a temporary directory
    python examples/meta_train.py --run-dir runs/demo   # keep it (and its curves.png)

The run is short (the configuration's default is 1,500 meta-steps: ``learned-optim
meta-train``), but the validation error already falls; it shows the whole round trip.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from learned_optim import LSTMMetaOptimizer, load_checkpoint, load_learned_init
from learned_optim.config import MetaTrainConfig
from learned_optim.data import SinusoidTasks
from learned_optim.finetune import finetune
from learned_optim.learners import SinusoidMLP
from learned_optim.runstate import read_log
from learned_optim.train import meta_train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="run folder (default: a temporary one)")
    parser.add_argument("--meta-steps", type=int, default=300, help="meta-updates (default 300)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="learned-optim-")) / "sinusoid"

    # 1. Meta-train. Every field of MetaTrainConfig is saved inside the checkpoints.
    config = MetaTrainConfig(
        task="sinusoid",  # 10-shot sinusoid regression, MAML's protocol
        inner_steps=5,  # T: updates per episode (use the same T at test time)
        meta_batch=4,  # episodes per meta-update
        meta_steps=args.meta_steps,
        meta_lr=3e-3,  # Adam (the paper uses 1e-3 over far more steps)
        validate_every=100, val_episodes=20, checkpoint_every=100,
        run_dir=str(run_dir),
    )
    best = meta_train(config, progress=not args.no_progress)
    validations = [e for e in read_log(run_dir) if "val_mse" in e]
    for entry in validations:
        print(f"meta-step {entry['step']:3d}: validation MSE {entry['val_mse']:.3f} "
              f"+- {entry['val_mse_ci95']:.3f}")
    print(f"best checkpoint: {best}")

    # 2. Load it: the update rule (portable to any model) and the learned init (this MLP only).
    checkpoint = load_checkpoint(best)
    print(f"record: method={checkpoint.record['method']}, dataset={checkpoint.record['dataset']}, "
          f"metrics={checkpoint.record['metrics']}")

    # 3. Fine-tune on new tasks (the test stream), from the learned init, with the learned rule;
    #    SGD from the same init and for the same number of steps beside it.
    tasks = SinusoidTasks(shots=10, seed=2_000_003)
    model = SinusoidMLP()
    load_learned_init(model, checkpoint)
    scores = {"learned rule": [], "SGD lr 0.01": []}
    for index in range(20):
        episode = tasks.episode(index)
        for name, rule in (("learned rule", checkpoint),
                           ("SGD lr 0.01", functools.partial(torch.optim.SGD, lr=0.01))):
            adapted = finetune(model, episode.support_inputs, episode.support_targets,
                               optimizer=rule, steps=config.inner_steps, loss_fn=F.mse_loss)
            with torch.no_grad():
                query = F.mse_loss(adapted(episode.query_inputs), episode.query_targets).item()
            scores[name].append(query)
    means = {name: sum(values) / len(values) for name, values in scores.items()}
    for name, mean in means.items():
        print(f"query MSE after {config.inner_steps} steps, 20 test tasks, {name:12s}: {mean:.3f}")

    # The same rule as a torch.optim optimizer, by path (shipped checkpoints load by name).
    opt = LSTMMetaOptimizer.from_pretrained(str(best), model.parameters())
    print(f"loaded as a torch.optim optimizer: {type(opt).__name__} over "
          f"{sum(p.numel() for p in model.parameters())} coordinates")

    try:  # curves of the run, if matplotlib is installed
        from learned_optim.plots import plot_run

        print(f"curves: {plot_run(run_dir)}")
    except ImportError as error:
        print(f"(no curves: {error})")
    return {"best": best, **means}


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        # Small tensors: one thread is as fast, and does not stall on a busy machine.
        torch.set_num_threads(1)
    main()
