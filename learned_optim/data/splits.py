"""Which classes a checkpoint has seen, and whether a test split overlaps them.

Meta-training reads the ``"train"`` split and model selection the ``"val"`` split of its task.
For Omniglot both are sets of characters fixed by the protocol and its split seed
(:func:`~learned_optim.data.omniglot.omniglot_split_characters`), so they are computable from
a configuration alone and recorded in every checkpoint as :func:`training_data` (old
checkpoints: derived from their configuration). :func:`split_overlap` counts how many
characters of an evaluation split were seen; :func:`learned_optim.evaluate` refuses to test on
an overlapping split unless forced.

Characters are numbered as the official release orders them: the 964 background characters
(sorted ``Alphabet/characterNN``), then the 659 evaluation characters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learned_optim.data.omniglot import (
    LAKE_SPLIT_SEED,
    OMNIGLOT_BACKGROUND,
    PROTOCOLS,
    ROTATIONS,
    VINYALS_SPLIT_SEED,
    omniglot_split_characters,
)

__all__ = ["training_data", "split_characters", "split_overlap", "Overlap", "TRAINING_SPLITS"]

OMNIGLOT_EVALUATION = 659
TRAINING_SPLITS = ("train", "val")  # what meta-training reads: episodes and model selection
_SPLIT_SEEDS = {"vinyals": VINYALS_SPLIT_SEED, "lake": LAKE_SPLIT_SEED,
                "lake-alphabets": LAKE_SPLIT_SEED}


def _split_protocol(protocol: str | None) -> str:
    # "lake-within" changes how episodes are drawn, not which characters a split holds.
    return "lake" if protocol == "lake-within" else (protocol or "vinyals")


def split_characters(protocol: str | None, split: str) -> np.ndarray:
    """Indices of the Omniglot characters of ``split`` under ``protocol`` (official layout).

    >>> len(split_characters("lake-within", "test")), len(split_characters("vinyals", "train"))
    (659, 1100)
    """
    archive = np.array([0] * OMNIGLOT_BACKGROUND + [1] * OMNIGLOT_EVALUATION)
    return omniglot_split_characters(archive, split, _split_protocol(protocol))


def training_data(config: dict | object) -> dict | None:
    """The checkpoint record's ``training_data``: what a configuration meta-trains on.

    ``None`` for tasks whose splits are not class sets of a known layout (sinusoid: every
    task is freshly drawn; miniImageNet: the split files are the user's). A lake run with
    ``rotations`` adds ``"rotations": {"train": [0, 90, 180, 270]}``: its training classes are
    these characters at these angles (the characters seen are the same).

    >>> record = training_data({"task": "omniglot", "protocol": "lake"})
    >>> record["split_protocol"], record["split_seed"], len(record["characters"]["train"])
    ('lake', 0, 868)
    >>> training_data({"task": "omniglot", "protocol": "lake", "rotations": True})["rotations"]
    {'train': [0, 90, 180, 270]}
    """
    values = config if isinstance(config, dict) else vars(config)
    if values.get("task") != "omniglot":
        return None
    protocol = values.get("protocol") or "vinyals"
    split_protocol = _split_protocol(protocol)
    record = {
        "dataset": "omniglot",
        "protocol": protocol,
        "split_protocol": split_protocol,
        "split_seed": _SPLIT_SEEDS[split_protocol],
        "splits": list(TRAINING_SPLITS),
        "characters": {s: split_characters(protocol, s).tolist() for s in TRAINING_SPLITS},
    }
    if values.get("pretrain_on_validation"):
        # Only when set, as rotations: the validation characters are already counted as seen;
        # this says the features were trained on them, so validation scores are not held out.
        record["pretrained_on"] = ["train", "val"]
    if values.get("rotations"):
        # Only when set: records without it stay as they were. The rotated copies are classes
        # of the same characters, so "characters" (and the overlap check) does not change.
        record["rotations"] = {"train": list(ROTATIONS)}
    return record


@dataclass(frozen=True)
class Overlap:
    """How many characters of an evaluation split a checkpoint has seen, and where."""

    split: str
    protocol: str
    characters: int  # in the evaluation split
    seen_in_training: int
    seen_in_validation: int

    @property
    def seen(self) -> int:
        return self.seen_in_training + self.seen_in_validation

    def message(self, name: str) -> str:
        """A sentence for errors and reports."""
        return (f"{self.seen} of the {self.characters} Omniglot characters of the "
                f"{self.split!r} split of protocol {self.protocol!r} were seen in the "
                f"meta-training of {name} ({self.seen_in_training} in its training split, "
                f"{self.seen_in_validation} in its validation split)")


def split_overlap(seen: dict | None, protocol: str | None, split: str) -> Overlap | None:
    """Characters of ``split`` (under ``protocol``) among ``seen`` (a ``training_data`` record).

    ``None`` if either side is not an Omniglot character set. For ``split="val"`` under the
    training protocol the validation characters are the point and are not counted.

    >>> vinyals = training_data({"task": "omniglot", "protocol": "vinyals"})
    >>> overlap = split_overlap(vinyals, "lake-within", "test")
    >>> overlap.characters, overlap.seen
    (659, 486)
    >>> split_overlap(vinyals, "vinyals", "test").seen
    0
    >>> lake = training_data({"task": "omniglot", "protocol": "lake"})
    >>> split_overlap(lake, "lake-alphabets", "val").seen_in_training  # lake trained on them
    149
    """
    if not seen or seen.get("dataset") != "omniglot" or protocol is None:
        return None
    if protocol not in PROTOCOLS:
        return None
    wanted = set(split_characters(protocol, split).tolist())
    train = wanted & set(seen["characters"].get("train", []))
    val = wanted & set(seen["characters"].get("val", [])) - train
    same_split = _split_protocol(protocol) == seen.get("split_protocol")
    if split == "val" and same_split:
        val = set()
    return Overlap(split, protocol, len(wanted), len(train), len(val))
