"""The learners of the paper and of the sinusoid benchmark, and BatchNorm helpers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from learned_optim.native_batchnorm import batchnorm_train, double_backward_fusable
from learned_optim.native_block import batchnorm_relu_maxpool, fusable
from learned_optim.native_pool import relu_maxpool, relu_maxpool_fusable
from learned_optim.native_stem import conv_batchnorm_relu_maxpool, stem_fusable

__all__ = [
    "CPU_CHANNELS_LAST",
    "ConvFeatures",
    "ConvLearner",
    "LEARNER_CLASSES",
    "ResNet12Learner",
    "ScaledUnitNorm",
    "SinusoidMLP",
    "classification_learner",
    "conv_inputs",
    "conv_memory_format",
    "reset_batchnorm",
    "set_batchnorm_momentum",
    "set_channels_last",
    "start_classes_alike",
]

# Conv learners run channels-last (NHWC) on a CPU. Measured on the 2-core EPYC, one thread,
# torch 2.13 (oneDNN): forward + cross-entropy + backward of the paper's Omniglot learner
# (32 filters, 28 x 28) is 1.3x to 1.6x as fast as NCHW at 5 to 300 images (up to 1.9x on a
# quieter machine), most of it in max-pooling, which is strided in NCHW
# (benchmarks/learner_layout.py, docs/results/learner_layout.md). On a GPU the layout stays
# NCHW: it was not measured there.
CPU_CHANNELS_LAST = True
# ... except under a double backward (second-order meta-training), where channels-last is
# slower: forward, backward and backward of the backward took 1.15x to 1.55x the NCHW time
# (BatchNorm's and ReLU's double backward, sums and thresholds over mixed layouts).


def conv_memory_format(device: torch.device, second_order: bool = False) -> torch.memory_format:
    """The memory format a conv learner's activations take on ``device``: channels-last on a
    CPU, NCHW elsewhere and whenever the learner's backward is itself differentiated
    (``second_order``).

    The learner's policy, beside it rather than in :mod:`learned_optim.rule.policy`: that
    module holds the update rule's choices, and the rule knows nothing of learners. Read at
    call time, so a test may set :data:`CPU_CHANNELS_LAST`.

    >>> conv_memory_format(torch.device("cpu")), conv_memory_format(torch.device("cuda"))
    (torch.channels_last, torch.contiguous_format)
    >>> conv_memory_format(torch.device("cpu"), second_order=True)
    torch.contiguous_format
    """
    if device.type == "cpu" and CPU_CHANNELS_LAST and not second_order:
        return torch.channels_last
    return torch.contiguous_format


def conv_inputs(inputs: Tensor, channels_last: bool | None = None) -> Tensor:
    """``inputs`` restrided for a conv net: channels-last if ``channels_last`` (``None``: as
    :func:`conv_memory_format` chooses for their device), else NCHW.

    ``to`` rather than ``contiguous``: a 1-channel batch is already "contiguous" in both
    formats, and only its strides tell oneDNN which kernels to pick (the first conv's output,
    and every layer after it, then keep that layout), and :class:`ConvFeatures` whether to
    fuse.

    >>> conv_inputs(torch.zeros(2, 1, 4, 4), True).stride()
    (16, 1, 4, 1)
    >>> conv_inputs(torch.zeros(2, 1, 4, 4).to(memory_format=torch.channels_last), False).stride()
    (16, 16, 4, 1)
    """
    if channels_last is None:
        channels_last = conv_memory_format(inputs.device) == torch.channels_last
    if inputs.dim() != 4:
        return inputs
    return inputs.to(memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)


def set_channels_last(model: nn.Module, channels_last: bool | None) -> None:
    """Set ``channels_last`` on every :class:`ConvLearner` in ``model`` (``None``: as
    :func:`conv_memory_format` chooses for the inputs' device)."""
    for module in model.modules():
        if isinstance(module, ConvLearner):
            module.channels_last = channels_last


class ScaledUnitNorm(nn.Module):
    """Scale every row to the same length: ``scale * x / |x|`` (no parameters).

    Ahead of a linear head it makes a cosine classifier (Chen et al., "A closer look at
    few-shot classification", 2019): a class row grown from one support example scores a
    query by the angle between their features, not by how much ink the support image has.

    >>> ScaledUnitNorm(5.0)(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    tensor([[3., 4.],
            [0., 5.]])
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"feature_scale must be positive, got {scale!r}")
        self.scale = float(scale)

    def forward(self, inputs: Tensor) -> Tensor:
        return nn.functional.normalize(inputs, dim=1) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether any of ``modules`` has forward hooks, or any module has (global hooks): a fused
    block would skip them, so such a block runs module by module."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


class ConvFeatures(nn.Sequential):
    """A ``Sequential`` whose ``conv -> BatchNorm -> ReLU -> max-pool 2`` blocks run as
    hand-fused kernels where they may, and module by module otherwise.

    On channels-last float32 CPU activations with batch statistics (the inner loop and
    meta-training), the first block, on the data, runs whole as one kernel each way
    (:func:`learned_optim.native_stem.stem_fusable`), and every later block runs the three
    modules after its convolution as one (:func:`learned_optim.native_block.fusable`). On
    NCHW activations (second-order meta-training runs its learner so) a BatchNorm with batch
    statistics runs PyTorch's forward and backward with its double backward as one kernel
    (:func:`learned_optim.native_batchnorm.double_backward_fusable`), and a ReLU and 2 x 2
    max-pooling run as one kernel each way, at every order of derivative
    (:func:`learned_optim.native_pool.relu_maxpool_fusable`). Same modules, same
    parameter names, the same outputs to float32 rounding. A block with a forward hook on any
    of its modules runs module by module, so the hook sees what it expects.

    >>> import torch
    >>> features = ConvFeatures(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                         nn.MaxPool2d(2), nn.Flatten())
    >>> features(torch.zeros(2, 1, 6, 6)).shape
    torch.Size([2, 36])
    """

    def forward(self, inputs: Tensor) -> Tensor:
        modules = list(self)
        x, index = inputs, 0
        while index < len(modules):
            module, block = modules[index], modules[index + 1: index + 4]
            if (isinstance(module, nn.ReLU) and index + 1 < len(modules)
                    and not _hooked(modules[index: index + 2])
                    and relu_maxpool_fusable(x, module, modules[index + 1])):
                x = relu_maxpool(x)  # NCHW: one kernel each way, at every order
                index += 2
                continue
            # a conv starting a whole, unhooked block: only there are the fusions worth asking
            whole = (isinstance(module, nn.Conv2d) and len(block) == 3
                     and not _hooked(modules[index: index + 4]))
            if whole and stem_fusable(x, module, *block):
                x = conv_batchnorm_relu_maxpool(x, module, block[0])
                index += 4
                continue
            if (isinstance(module, nn.BatchNorm2d) and not _hooked([module])
                    and double_backward_fusable(x, module)):
                x = batchnorm_train(x, module)  # NCHW: its double backward fused
            else:
                x = module(x)
            if whole and fusable(x, *block):
                x = batchnorm_relu_maxpool(x, block[0])
                index += 4
            else:
                index += 1
        return x


class ConvLearner(nn.Module):
    """The paper's learner: 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2], then a linear head.

    Works for any input size (the head's width is computed from ``image_size``) and any number
    of ways.

    Parameters
    ----------
    in_channels:
        1 for Omniglot, 3 for miniImageNet.
    ways:
        Output classes.
    filters:
        Channels of every conv layer (paper: 32 on miniImageNet).
    image_size:
        Height = width of the inputs.
    bn_momentum:
        BatchNorm momentum (PyTorch convention: weight of the new batch). The authors use
        0.9 for 1-shot and 0.95 for 5-shot.
    channels_last:
        Run the convolutions in channels-last memory format: ``None`` (default) as
        :func:`conv_memory_format` chooses for the inputs' device, ``True`` / ``False`` always
        / never. Only the activations change layout (the parameters stay as they are, so
        checkpoints, ``higher``'s fast weights and the update rule see the same tensors); the
        outputs are the same to rounding. A hand-written second-order loop (a double backward
        through the learner) is faster with ``False``; ``MetaTrainer`` sets it so.
    feature_scale:
        ``None`` (the paper): the head reads the pooled features as they are. A number: the
        features are scaled to this length first (:class:`ScaledUnitNorm`, the last module of
        ``features``), making the head a cosine classifier. No parameter is added, so the
        learned init's tensors have the same names and shapes either way.

    Examples
    --------
    >>> import torch
    >>> learner = ConvLearner(in_channels=1, ways=5, filters=8, image_size=28)
    >>> learner(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
    """

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 5,
        filters: int = 32,
        image_size: int = 84,
        bn_momentum: float = 0.9,
        blocks: int = 4,
        channels_last: bool | None = None,
        feature_scale: float | None = None,
    ) -> None:
        super().__init__()
        if min(in_channels, ways, filters, image_size, blocks) < 1:
            raise ValueError("in_channels, ways, filters, image_size and blocks must be positive")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            layers += [
                nn.Conv2d(channels, filters, 3, padding=1),
                nn.BatchNorm2d(filters, momentum=bn_momentum),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = filters, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {blocks} pooling blocks")
        layers.append(nn.Flatten())
        if feature_scale is not None:
            layers.append(ScaledUnitNorm(feature_scale))
        self.features = ConvFeatures(*layers)
        self.head = nn.Linear(filters * size * size, ways)
        self.channels_last = channels_last

    def forward(self, inputs: Tensor) -> Tensor:
        # getattr: modules pickled before the option existed
        inputs = conv_inputs(inputs, getattr(self, "channels_last", None))
        return self.head(self.features(inputs))


class ResidualStage(nn.Module):
    """Three 3x3 conv + BatchNorm layers (leaky ReLU between them) beside a 1x1 conv +
    BatchNorm shortcut, summed, then leaky ReLU and a 2x2 max-pool: one stage of ResNet-12."""

    def __init__(self, in_channels: int, channels: int, bn_momentum: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(3):
            layers += [nn.Conv2d(in_channels if index == 0 else channels, channels, 3,
                                 padding=1, bias=False),
                       nn.BatchNorm2d(channels, momentum=bn_momentum)]
            if index < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                      nn.BatchNorm2d(channels, momentum=bn_momentum))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.out(self.body(inputs) + self.shortcut(inputs))


class ResNet12Learner(nn.Module):
    """A ResNet-12 learner: four residual stages (:class:`ResidualStage`) of ``filters``,
    ``2 filters``, ``4 filters`` and ``8 filters`` channels, global average pooling, a linear
    head. The deeper feature net of the few-shot literature (Oreshkin et al., 2018; Lee et al.,
    2019 use widths 64-160-320-640); its features have ``8 filters`` entries whatever the
    input size (at least 16 pixels).

    Same interface as :class:`ConvLearner` (``features`` then ``head``; ``feature_scale``
    makes the head a cosine classifier), so pre-training, the paper's BatchNorm protocol,
    ``higher`` and the update rule take it as they take the 4-block net. It runs plain torch
    modules (none of the 4-block net's fused CPU kernels).

    Examples
    --------
    >>> import torch
    >>> learner = ResNet12Learner(in_channels=1, ways=5, filters=4, image_size=28)
    >>> learner(torch.zeros(2, 1, 28, 28)).shape, learner.head.in_features
    (torch.Size([2, 5]), 32)
    """

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 5,
        filters: int = 64,
        image_size: int = 84,
        bn_momentum: float = 0.9,
        feature_scale: float | None = None,
    ) -> None:
        super().__init__()
        if min(in_channels, ways, filters, image_size) < 1:
            raise ValueError("in_channels, ways, filters and image_size must be positive")
        if image_size < 16:
            raise ValueError(f"image_size {image_size} is too small for ResNet-12's four "
                             "pooling stages (at least 16 pixels)")
        stages: list[nn.Module] = []
        channels = in_channels
        for width in (filters, 2 * filters, 4 * filters, 8 * filters):
            stages.append(ResidualStage(channels, width, bn_momentum))
            channels = width
        layers = [*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if feature_scale is not None:
            layers.append(ScaledUnitNorm(feature_scale))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, ways)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.features(inputs))


# The image learner each config.ARCHITECTURES name builds; their constructors share the
# arguments (in_channels, ways, filters, image_size, bn_momentum, feature_scale).
LEARNER_CLASSES: dict[str, type[nn.Module]] = {"conv4": ConvLearner, "resnet12": ResNet12Learner}


def classification_learner(architecture: str, in_channels: int, ways: int, filters: int,
                           image_size: int, bn_momentum: float,
                           feature_scale: float | None = None) -> nn.Module:
    """The image learner ``architecture`` names (a key of :data:`LEARNER_CLASSES`): the
    paper's 4-block :class:`ConvLearner` (``"conv4"``) or :class:`ResNet12Learner`
    (``"resnet12"``).

    >>> type(classification_learner("resnet12", 1, 5, 4, 28, 0.9)).__name__
    'ResNet12Learner'
    """
    if architecture not in LEARNER_CLASSES:
        raise ValueError(f"architecture must be one of {tuple(LEARNER_CLASSES)}, got "
                         f"{architecture!r}")
    return LEARNER_CLASSES[architecture](in_channels=in_channels, ways=ways, filters=filters,
                                         image_size=image_size, bn_momentum=bn_momentum,
                                         feature_scale=feature_scale)


class SinusoidMLP(nn.Module):
    """The MLP of Finn et al. (2017) for sinusoid regression: 1-40-40-1 with ReLU.

    >>> import torch
    >>> SinusoidMLP()(torch.zeros(5, 1)).shape
    torch.Size([5, 1])
    """

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                      nn.ReLU())
        self.head = nn.Linear(hidden, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.features(inputs))


def reset_batchnorm(model: nn.Module) -> None:
    """Reset every BatchNorm's running statistics: a new episode starts from none."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()


def set_batchnorm_momentum(model: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every BatchNorm in ``model``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def start_classes_alike(learner: nn.Module, learned: dict[str, torch.Tensor],
                        names: Sequence[str]) -> None:
    """Give every output row of the parameters ``names`` (a head of another number of classes
    than the learned init's) the mean of the learned rows, so that all classes start alike.

    Class indices are arbitrary in few-shot episodes, so the learned rows are interchangeable
    and their mean is the neutral start; a random head would give the classes random scores
    before the first step (with the two shipped lake-alphabets checkpoints at 5 ways, 62-68%
    instead of 97% on validation episodes). :class:`~learned_optim.FewShotClassifier` and
    :func:`~learned_optim.evaluate.evaluate` start so a head of another number of ways.

    >>> head = nn.Linear(3, 4)
    >>> start_classes_alike(nn.Sequential(head), {"0.weight": torch.ones(2, 3),
    ...                                           "0.bias": torch.tensor([1.0, 3.0])},
    ...                     ["0.weight", "0.bias"])
    >>> head.weight.tolist()[3], head.bias.tolist()
    ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    """
    params = dict(learner.named_parameters())
    with torch.no_grad():
        for name in names:
            if name in learned and learned[name].shape[1:] == params[name].shape[1:]:
                params[name].copy_(learned[name].mean(dim=0).expand_as(params[name]))
