"""Few-shot data: class-indexed data sets, deterministic episodes and the standard loaders.

- :class:`FewShotDataset`: examples grouped by class, in memory.
- :class:`EpisodeSampler`, :class:`Episode`: N-way K-shot tasks drawn by episode index.
- :class:`SinusoidTasks`: few-shot sinusoid regression (MAML / Meta-SGD protocols).
- :func:`omniglot`, :func:`miniimagenet`: the standard benchmarks, read from local files.
- :class:`Preprocessing`, :func:`preprocess`: a checkpoint's image preprocessing, applied;
  :func:`crop_to_ink`, its optional crop of a character to its ink.
- :class:`WithinAlphabetSampler`: Lake et al.'s within-alphabet, drawer-disjoint episodes.
- :func:`image_folder`, :func:`sklearn_digits`, :func:`mnist5k`, :func:`animal_mnist`:
  small cross-domain sets and a user's own images.
"""

from learned_optim.data.crossdomain import animal_mnist, image_folder, mnist5k, sklearn_digits
from learned_optim.data.dataset import FewShotDataset
from learned_optim.data.episodes import (
    Episode,
    EpisodeSampler,
    WithinAlphabetSampler,
    episode_generator,
)
from learned_optim.data.miniimagenet import miniimagenet
from learned_optim.data.omniglot import omniglot
from learned_optim.data.preprocessing import Preprocessing, crop_to_ink, preprocess
from learned_optim.data.sinusoid import SinusoidTask, SinusoidTasks

__all__ = [
    "Episode",
    "EpisodeSampler",
    "FewShotDataset",
    "Preprocessing",
    "crop_to_ink",
    "SinusoidTask",
    "SinusoidTasks",
    "WithinAlphabetSampler",
    "animal_mnist",
    "episode_generator",
    "image_folder",
    "miniimagenet",
    "mnist5k",
    "omniglot",
    "preprocess",
    "sklearn_digits",
]
