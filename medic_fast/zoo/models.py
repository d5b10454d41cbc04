"""Reference models: small ones for the bundled data (a CNN for 8x8 digits, a 5-layer MLP for the
Swiss roll) and the standard CIFAR-style ResNet-18 and Wide-ResNet-16-1 for users' own data.

ReLUs are not in-place, so the output of every conv and BatchNorm layer can be hooked as it is
(an in-place ReLU would overwrite a hooked BatchNorm output with its rectified value).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["DigitsCNN", "MLP", "ResNet", "resnet18", "digits_resnet", "WideResNet", "wrn16_1",
           "wrn_released_layers"]


def _conv_bn(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DigitsCNN(nn.Module):
    """CNN for ``[N, 1, 8, 8]`` digits: two conv-BN-ReLU blocks at 8x8, a 2x2 max-pool, a third
    block at 4x4, then a linear classifier on the flattened 4x4 map (no global pooling, so the
    position of a pattern, e.g. a corner trigger, stays visible to the classifier)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 32), num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        if len(channels) != 3 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be three positive widths, got {tuple(channels)}")
        c1, c2, c3 = (int(c) for c in channels)
        self.features = nn.Sequential(*_conv_bn(in_channels, c1), *_conv_bn(c1, c2),
                                      nn.MaxPool2d(2), *_conv_bn(c2, c3))
        self.classifier = nn.Linear(c3 * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected network: ``len(widths) + 1`` Linear layers with ReLU between them
    (the default four hidden widths make the 5-layer network of the CLEAR paper's Swiss roll)."""

    def __init__(self, in_features: int = 3, num_classes: int = 2,
                 widths: Sequence[int] = (64, 64, 64, 64)):
        super().__init__()
        dims = [int(in_features), *(int(w) for w in widths)]
        if any(d < 1 for d in dims) or num_classes < 1:
            raise ValueError(f"in_features, widths and num_classes must be positive, got "
                             f"{in_features}, {tuple(widths)}, {num_classes}")
        layers: list = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))


class _BasicBlock(nn.Module):
    """ResNet basic block (post-activation): conv-BN-ReLU-conv-BN plus shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no max-pool) of basic blocks: one stage per entry of
    ``blocks``, the first at ``width`` channels, each next one at twice the channels and half
    the resolution."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3, width: int = 64):
        super().__init__()
        if not blocks or any(int(n) < 1 for n in blocks) or int(width) < 1:
            raise ValueError(f"blocks must be positive block counts and width positive, got "
                             f"{tuple(blocks)}, {width}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout, stride = width * 2 ** i, 1 if i == 0 else 2
            stages.append(nn.Sequential(*(_BasicBlock(cin if j == 0 else cout, cout,
                                                      stride if j == 0 else 1) for j in range(n))))
            cin = cout
        for i, stage in enumerate(stages):  # layer1, layer2, ... as in torchvision
            self.add_module(f"layer{i + 1}", stage)
        self.stages = len(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.fc(self.pool(out).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR-style ResNet-18 (11.2M parameters at 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


def digits_resnet(num_classes: int = 10, in_channels: int = 1) -> ResNet:
    """A ResNet-8 for 8x8 digits: three stages of one basic block at 16/32/64 channels
    (8x8, 4x4, 2x2), global average pooling (78k parameters)."""
    return ResNet((1, 1, 1), num_classes, in_channels, width=16)


class _WideBlock(nn.Module):
    """Wide-ResNet pre-activation block: BN-ReLU-conv-BN-ReLU-conv plus shortcut (a 1x1 conv
    on the activated input when the width or stride changes)."""

    def __init__(self, cin: int, cout: int, stride: int, drop: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu(self.bn1(x))
        out = self.conv2(self.drop(self.relu(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """Wide-ResNet-``depth``-``widen_factor`` (Zagoruyko & Komodakis) for 32x32 inputs, the
    architecture of the MEDIC paper's CIFAR-10 experiments."""

    def __init__(self, depth: int = 16, widen_factor: int = 1, num_classes: int = 10,
                 in_channels: int = 3, drop: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g in range(3):
            cin, cout, stride = widths[g], widths[g + 1], 1 if g == 0 else 2
            groups.append(nn.Sequential(*(_WideBlock(cin if j == 0 else cout, cout,
                                                     stride if j == 0 else 1, drop)
                                          for j in range(n))))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(out))).flatten(1))


def wrn16_1(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """Wide-ResNet-16-1 (0.18M parameters), the MEDIC paper's CIFAR-10 model."""
    return WideResNet(16, 1, num_classes, in_channels)


def wrn_released_layers(model: WideResNet) -> list[str]:
    """The 25 tensors the released MEDIC code hooks on WRN-16-1 ("conv+bn" plane): the stem
    conv and, in every block, bn1, conv1, bn2, conv2 (not the shortcut convs or the final BN)."""
    names = ["conv1"]
    for g in ("block1", "block2", "block3"):
        for i, _ in enumerate(getattr(model, g)):
            names += [f"{g}.{i}.{n}" for n in ("bn1", "conv1", "bn2", "conv2")]
    return names
