"""learned_optim: the Meta-Learner LSTM of Ravi & Larochelle (2017) as a PyTorch optimizer.

>>> import torch, learned_optim
>>> model = torch.nn.Linear(3, 1)
>>> opt = learned_optim.LSTMMetaOptimizer(model.parameters())
>>> learned_optim.finetune.__module__, learned_optim.meta_train.__module__
('learned_optim.finetune', 'learned_optim.train')
"""

from learned_optim.checkpoint import (
    Checkpoint,
    CheckpointError,
    available_pretrained,
    load_checkpoint,
    load_learned_init,
    save_checkpoint,
)
from learned_optim.classifier import FewShotClassifier
from learned_optim.config import MetaTrainConfig

# Imported eagerly, not through a module __getattr__: ``evaluate`` and ``finetune`` are also the
# names of submodules, and importing a submodule binds its name on the package, which would
# hide a lazily provided function of the same name. (Import time does not change: the
# classifier already imports most of what they need.)
from learned_optim.evaluate import evaluate
from learned_optim.finetune import finetune
from learned_optim.metalearner import MetaLearnerLSTM, meta_update
from learned_optim.optimizer import DifferentiableLSTMMetaOptimizer, LSTMMetaOptimizer
from learned_optim.train import meta_train
from learned_optim.version import __version__

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "available_pretrained",
    "load_checkpoint",
    "load_learned_init",
    "save_checkpoint",
    "DifferentiableLSTMMetaOptimizer",
    "FewShotClassifier",
    "LSTMMetaOptimizer",
    "MetaLearnerLSTM",
    "MetaTrainConfig",
    "evaluate",
    "finetune",
    "meta_train",
    "meta_update",
    "__version__",
]
