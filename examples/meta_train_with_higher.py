"""Your own meta-training routine: a hand-written ``higher.innerloop_ctx`` loop.

``LSTMMetaOptimizer`` is registered with ``higher`` on import, so ``higher.innerloop_ctx``
turns it into its differentiable twin: the inner updates stay on the autograd tape, and the
query loss after T steps back-propagates into the meta-learner's weights and (with
``copy_initial_weights=False``) into the learner's initial weights c_0 (the learned init).

This is the paper's algorithm written out, on 10-shot sinusoid regression (MAML's protocol,
MLP 1-40-40-1); ``learned_optim.meta_train`` does the same with checkpoints, validation and
the BatchNorm protocol. Change anything here for your own research.

Run (offline, about a minute on 2 CPU cores)::

    python examples/meta_train_with_higher.py
    python examples/meta_train_with_higher.py --second-order   # full second-order gradients
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import higher
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from learned_optim import LSTMMetaOptimizer, MetaLearnerLSTM, load_checkpoint, save_checkpoint
from learned_optim.data import SinusoidTasks
from learned_optim.finetune import finetune
from learned_optim.learners import SinusoidMLP


def query_loss(learner, meta, episode, steps: int, first_order: bool) -> torch.Tensor:
    """One episode: T differentiable updates on the support set, the loss on the query set."""
    opt = LSTMMetaOptimizer(learner.parameters(), meta, first_order=first_order)
    # copy_initial_weights=False: the learner's own weights start the tape, so they receive
    # meta-gradients (the learned init c_0). The meta-learner is picked up by reference.
    with higher.innerloop_ctx(learner, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            support_loss = F.mse_loss(fmodel(episode.support_inputs), episode.support_targets)
            diffopt.step(support_loss)  # theta_t = f_t * theta_{t-1} - i_t * grad_t
        return F.mse_loss(fmodel(episode.query_inputs), episode.query_targets)


def test_mse(learner, meta, tasks, steps: int, episodes: int = 20) -> float:
    """Mean query MSE after fine-tuning with the rule (no tape: the torch.optim drop-in)."""
    total = 0.0
    for index in range(episodes):
        episode = tasks.episode(index)
        adapted = finetune(learner, episode.support_inputs, episode.support_targets,
                           optimizer=meta, steps=steps, loss_fn=F.mse_loss)
        with torch.no_grad():
            total += F.mse_loss(adapted(episode.query_inputs), episode.query_targets).item()
    return total / episodes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=300,
                        help="meta-updates (default 300)")
    parser.add_argument("--meta-batch", type=int, default=4, help="episodes per meta-update")
    parser.add_argument("--inner-steps", type=int, default=5, help="T (default 5)")
    parser.add_argument("--second-order", action="store_true",
                        help="differentiate through the learner's gradients too")
    parser.add_argument("--out", type=Path, help="checkpoint to write (default: temporary)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    learner = SinusoidMLP()  # its initial weights are c_0, meta-learned with the rule
    meta = MetaLearnerLSTM()  # the update rule: 2,046 weights shared by every coordinate
    meta_params = list(meta.parameters()) + list(learner.parameters())
    adam = torch.optim.Adam(meta_params, lr=3e-3)  # the paper: Adam, lr 1e-3, clip 0.25
    train_tasks = SinusoidTasks(shots=10, seed=0)
    test_tasks = SinusoidTasks(shots=10, seed=2_000_003)

    start = test_mse(learner, meta, test_tasks, args.inner_steps)
    first_order = not args.second_order
    bar = tqdm(range(args.meta_steps), desc="meta-train", dynamic_ncols=True)
    for step in bar:
        adam.zero_grad()
        losses = []
        for slot in range(args.meta_batch):
            episode = train_tasks.episode(step * args.meta_batch + slot)
            loss = query_loss(learner, meta, episode, args.inner_steps, first_order)
            (loss / args.meta_batch).backward()  # grads on meta.parameters() and on c_0
            losses.append(loss.item())
        nn.utils.clip_grad_norm_(meta_params, 0.25)
        adam.step()
        bar.set_postfix(meta_loss=f"{sum(losses) / len(losses):.3f}")
    end = test_mse(learner, meta, test_tasks, args.inner_steps)
    print(f"test query MSE after {args.inner_steps} steps (20 tasks): "
          f"{start:.3f} before meta-training, {end:.3f} after "
          f"({'first' if first_order else 'second'} order, {args.meta_steps} meta-steps)")

    # Save the rule and the learned init like meta_train does; any model can reuse the rule.
    out = args.out or Path(tempfile.mkdtemp()) / "my-rule.safetensors"
    save_checkpoint(out, meta, learned_init=learner, dataset="sinusoid",
                    metrics={"test_mse": end}, config=vars(args) | {"out": str(out)})
    checkpoint = load_checkpoint(out)
    print(f"saved {out} (rule + learned init of {len(checkpoint.learned_init)} tensors)")
    return {"before": start, "after": end, "checkpoint": out}


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        # Small tensors: one thread is as fast, and does not stall on a busy machine.
        torch.set_num_threads(1)
    main()
