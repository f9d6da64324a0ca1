"""Fine-tune your own model on your own few-shot images through a pretrained update rule.

Your data: a folder with one sub-folder per class (``my_images/cat/*.png``, ...), or arrays
(an ``.npz`` with ``images`` and ``labels``). This script writes such a folder into a temporary
directory from real data (Animal-MNIST silhouettes, from ``../shared/data`` beside the
repository) or, without it, from generated patterns, then draws 5-way 1-shot episodes from it.

Two ways to use a pretrained checkpoint:

- **update rule only**, for any model (here ``MyNet``, a class of your own): the rule is
  coordinate-wise, so it applies to any architecture;
- **update rule + learned init**, for the architecture it was meta-trained with (the paper's
  conv learner for ``omniglot-5w1s``): ``load_learned_init(model, "omniglot-5w1s")``.

Run (offline, about a minute on 2 CPU cores)::

    python examples/finetune_custom_model.py
    python examples/finetune_custom_model.py --data path/to/my_images     # your folder
    python examples/finetune_custom_model.py --data my_arrays.npz         # your arrays
    python examples/finetune_custom_model.py --checkpoint runs/omniglot-5w1s-lstm/best.safetensors

The shipped ``omniglot-5w1s`` checkpoint is used when this version ships it; otherwise a freshly
initialised meta-learner stands in (close to SGD with a small step) and the learned-init part
runs only with ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from learned_optim import MetaLearnerLSTM, available_pretrained, load_checkpoint
from learned_optim.data import EpisodeSampler, FewShotDataset, animal_mnist, image_folder
from learned_optim.finetune import finetune
from learned_optim.learners import ConvLearner
from learned_optim.stats import summarize

PRETRAINED = "omniglot-5w1s"  # 5-way 1-shot Omniglot, 28 x 28 grey images
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WAYS, SHOTS, QUERIES = 5, 1, 5
DEFAULT_STEPS = 12  # the paper's 1-shot T; a checkpoint's own T takes precedence


class MyNet(nn.Module):
    """A model of your own: any nn.Module works with the update rule (BatchNorm included)."""

    def __init__(self, ways: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(32, ways)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(images))


def write_image_folder(root: Path, per_class: int = 20) -> Path:
    """A folder of PNGs, one sub-folder per class, as a user would have."""
    source = SHARED_DATA / "animal_mnist" / "animal_mnist_v3.npz"
    if source.is_file():
        data = animal_mnist(source)
        classes = {name: data.examples_of(c)[:per_class, 0].numpy()
                   for c, name in enumerate(data.class_names)}
        print(f"writing {per_class} Animal-MNIST images per class to {root}")
    else:  # no shared data: ten classes of noisy random patterns
        rng = np.random.default_rng(0)
        classes = {}
        for c in range(10):
            prototype = rng.random((28, 28)) > 0.7
            noise = rng.random((per_class, 28, 28)) < 0.1
            classes[f"pattern{c}"] = np.logical_xor(prototype, noise).astype(np.float32)
        print(f"(no shared data at {SHARED_DATA}) writing generated patterns to {root}")
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray((image * 255).astype(np.uint8)).save(root / name / f"{index:03d}.png")
    return root


def load_data(path: Path) -> FewShotDataset:
    """A folder of class folders (``image_folder``) or an ``.npz`` (``from_arrays``)."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
        if images.ndim == 3:  # [n, H, W] -> [n, 1, H, W]
            images = images[:, None]
        return FewShotDataset.from_arrays(images, labels, name=path.stem)
    return image_folder(path, image_size=28, grayscale=True)


def accuracy_over(sampler, make_model, rule, steps: int, episodes: int,
                  learned_init=None) -> str:
    """Mean query accuracy (95% CI) of fine-tuning ``make_model()`` on ``episodes`` episodes."""
    scores = []
    for index in range(episodes):
        episode = sampler.episode(index)
        torch.manual_seed(index)
        adapted = finetune(make_model(), episode.support_inputs, episode.support_targets,
                           optimizer=rule, steps=steps, learned_init=learned_init)
        with torch.no_grad():
            predictions = adapted(episode.query_inputs).argmax(dim=1)
        scores.append((predictions == episode.query_targets).float().mean().item())
    summary = summarize(scores)
    return f"{100 * summary.mean:5.1f}% +- {100 * summary.ci95:4.1f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of class folders, or an .npz")
    parser.add_argument("--checkpoint", help="checkpoint path or shipped name (default: "
                                             f"{PRETRAINED} if shipped)")
    parser.add_argument("--episodes", type=int, default=20, help="test episodes (default 20)")
    args = parser.parse_args(argv)

    data_path = args.data or write_image_folder(Path(tempfile.mkdtemp()) / "my_images")
    dataset = load_data(data_path)
    print(dataset)
    sampler = EpisodeSampler(dataset, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=0)

    source = args.checkpoint or (PRETRAINED if PRETRAINED in available_pretrained() else None)
    if source is None:
        print(f"note: no shipped {PRETRAINED!r} checkpoint in this version: a freshly "
              "initialised meta-learner stands in for the pretrained rule (pass --checkpoint)")
        checkpoint, rule, steps = None, MetaLearnerLSTM(), DEFAULT_STEPS
    else:
        checkpoint = load_checkpoint(source)
        rule = checkpoint  # finetune() accepts a checkpoint, a name, a path or a MetaLearnerLSTM
        # Use the number of steps T the rule was meta-trained with.
        steps = (checkpoint.record.get("config") or {}).get("inner_steps") or DEFAULT_STEPS
        print(f"update rule from {checkpoint.path}")

    results = {}
    print(f"\n{WAYS}-way {SHOTS}-shot, {steps} steps, {args.episodes} episodes, "
          f"{QUERIES} queries per class:")
    # 1. Your own model class: only the update rule applies (the init is for another net).
    results["MyNet, learned rule"] = accuracy_over(sampler, lambda: MyNet(WAYS), rule, steps,
                                                   args.episodes)
    results["MyNet, SGD lr 0.1"] = accuracy_over(
        sampler, lambda: MyNet(WAYS), functools.partial(torch.optim.SGD, lr=0.1), steps,
        args.episodes)

    # 2. The checkpoint's own architecture: the update rule with and without its learned init.
    if checkpoint is not None and checkpoint.learned_init is not None:
        def conv_learner() -> nn.Module:
            return ConvLearner(in_channels=1, ways=WAYS, filters=64, image_size=28)

        results["ConvLearner, learned rule, random init"] = accuracy_over(
            sampler, conv_learner, rule, steps, args.episodes)
        # finetune(..., learned_init=...) calls load_learned_init(model, checkpoint) on a copy
        results["ConvLearner, learned rule + learned init"] = accuracy_over(
            sampler, conv_learner, rule, steps, args.episodes, learned_init=checkpoint)
    else:
        print("(the learned-init comparison needs a checkpoint with a learned init)")
    for name, text in results.items():
        print(f"  {name:42s} {text}")
    return results


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        # Small tensors: one thread is as fast, and does not stall on a busy machine.
        torch.set_num_threads(1)
    main()
