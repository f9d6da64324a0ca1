"""learned_optim: the Meta-Learner LSTM of Ravi & Larochelle (2017) as a PyTorch optimizer.

>>> import torch, learned_optim
>>> model = torch.nn.Linear(3, 1)
>>> opt = learned_optim.LSTMMetaOptimizer(model.parameters())
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
from learned_optim.metalearner import MetaLearnerLSTM, meta_update
from learned_optim.optimizer import DifferentiableLSTMMetaOptimizer, LSTMMetaOptimizer

__version__ = "0.1.0"

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
    "meta_update",
    "__version__",
]
