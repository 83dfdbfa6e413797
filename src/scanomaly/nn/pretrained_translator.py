"""A HealthyGAN generator that starts from pretrained features (option generator="lite0").

    x ──► frozen EfficientNet-Lite0, stem to stage3 ──► stage1 (stride 2), stage2 (4), stage3 (8)
    stage3 ─ 1x1 conv ─ residual blocks ─ ↑2 ⊕ stage2 ─ conv ─ ↑2 ⊕ stage1 ─ conv ─ ↑2 ⊕ x ─ conv ─► (T, M)

The encoder is the ImageNet-trained backbone PaDiM / PatchCore use, frozen (eval mode, no gradients:
each training step runs it forward only). The decoder upsamples by nearest-neighbour resizing and a
3x3 convolution (no transposed convolutions, whose uneven overlap draws checkerboards; Odena et al.
2016) and takes the encoder's map of each resolution as a skip connection (U-Net), the input itself
at the last one. The heads and the blend are HealthyGAN's: T = tanh, M = (tanh + 1) / 2,
healthy(x) = M·T + (1 − M)·x. `padding` pads the decoder's convolutions ("zeros" or "reflect", as the StarGAN
generator's option); the frozen encoder keeps the zeros it was trained with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import FeatureExtractor
from .blocks import ResidualBlock

ENCODER_STAGES = ("stage1", "stage2", "stage3")  # strides 2, 4, 8


def _conv_in_relu(cin: int, cout: int, padding: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False, padding_mode=padding),
                         nn.InstanceNorm2d(cout, affine=True), nn.ReLU(inplace=True))


class PretrainedMaskedTranslator(nn.Module):
    """x -> (healthy, T, M) like `MaskedTranslator`, on a frozen pretrained encoder."""

    def __init__(self, encoder: FeatureExtractor, channels: int = 1, width: int = 32, residual_blocks: int = 2,
                 padding: str = "zeros"):
        super().__init__()
        if tuple(encoder.stages) != ENCODER_STAGES:
            raise ValueError(f"the encoder must give the stages {ENCODER_STAGES}, got {encoder.stages}")
        self.encoder = encoder
        c1, c2, c3 = encoder.channels
        w = width
        self.bottleneck = nn.Sequential(
            nn.Conv2d(c3, 4 * w, 1, bias=False), nn.InstanceNorm2d(4 * w, affine=True), nn.ReLU(inplace=True),
            *[ResidualBlock(4 * w, padding_mode=padding) for _ in range(residual_blocks)],
        )
        self.up2 = _conv_in_relu(4 * w + c2, 2 * w, padding)  # at stride 4
        self.up1 = _conv_in_relu(2 * w + c1, w, padding)  # at stride 2
        self.up0 = _conv_in_relu(w + channels, w, padding)  # at the input's resolution
        self.head = nn.Conv2d(w, channels + 1, 3, 1, 1, bias=False, padding_mode=padding)

    @staticmethod
    def _up(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (healthy, T, M)."""
        with torch.no_grad():
            f1, f2, f3 = self.encoder(self.encoder.prepare(x))
        h = self.bottleneck(f3)
        h = self.up2(self._up(h, f2))
        h = self.up1(self._up(h, f1))
        out = self.head(self.up0(self._up(h, x)))
        translation = torch.tanh(out[:, :-1])
        mask = (torch.tanh(out[:, -1:]) + 1) / 2
        healthy = mask * translation + (1 - mask) * x
        return healthy, translation, mask
