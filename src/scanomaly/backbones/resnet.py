"""ResNet-18 (He et al., 2016) and Wide-ResNet-50-2 (Zagoruyko & Komodakis, 2016).

Module names follow torchvision exactly (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`,
`fc`, ...), so torchvision's ImageNet state dicts load with strict=True from a local file. Nothing is
downloaded: pass the file with `weights=path`. The stride of a bottleneck block sits on its 3x3
convolution (torchvision's "ResNet v1.5"), as in the weights PaDiM and PatchCore were run with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, width_factor: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, width_factor: int = 1):
        super().__init__()
        width = planes * width_factor  # Wide-ResNet-50-2 doubles the inner 3x3 width
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], width_factor: int = 1, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        cin = 64
        self.stage_info: dict[str, tuple[int, int]] = {}
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stride = 1 if i == 1 else 2
            cout = planes * block.expansion
            downsample = None
            if stride != 1 or cin != cout:  # the projection shortcut: downsample.0 (conv), .1 (BN)
                downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            blocks = [block(cin, planes, stride, downsample, width_factor)]
            cin = cout
            blocks += [block(cin, planes, 1, None, width_factor) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.stage_info[f"layer{i}"] = (cin, 2 ** (i + 1))  # channels, stride (4, 8, 16, 32)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor, stages: list[str]) -> list[torch.Tensor]:
        out = {}
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            name = f"layer{i}"
            x = getattr(self, name)(x)
            if name in stages:
                out[name] = x
                if len(out) == len(set(stages)):
                    break
        return [out[s] for s in stages]

    def truncate(self, last_stage: str) -> None:
        last = int(last_stage.removeprefix("layer"))
        for i in range(last + 1, 5):
            setattr(self, f"layer{i}", nn.Identity())
        self.avgpool, self.fc = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def wide_resnet50_2() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width_factor=2)
