"""Shipping meta-trained rules: checkpoints in ``learned_optim/pretrained/`` with their cards.

- :mod:`learned_optim.packaging.facts`: what a card says about training, from the run folders;
- :mod:`learned_optim.packaging.episodic`: episodic checkpoints (Omniglot, sinusoid), their
  cards and the baselines that join them later
  (``python -m learned_optim.packaging.episodic NAME ...``);
- :mod:`learned_optim.packaging.general_rule`: the rule meta-trained over the task
  distribution (``python -m learned_optim.packaging general ...``).

Nothing here is imported by the rest of the package: it reads run folders and benchmark
results and writes shipped files.
"""

from learned_optim.packaging.facts import training_facts
from learned_optim.packaging.general_rule import card_markdown, package_general

# The names this module held when it packaged the general rule alone.
__all__ = ["card_markdown", "package_general", "training_facts"]
