"""The residual WGAN-GP networks of Gulrajani et al. (2017, "ResNet 64x64"), as f-AnoGAN uses them.

- `UpBlock`:   BN-ReLU-(upsample, conv3x3)-BN-ReLU-conv3x3, plus a shortcut (upsample, conv1x1).
- `DownBlock`: LN-ReLU-conv3x3-LN-ReLU-(conv3x3, mean-pool), plus a shortcut (mean-pool, conv1x1).
- `ResNetGenerator`: z -> linear -> 8d x 4 x 4 -> up-blocks to the image size -> BN-ReLU-conv3x3-tanh.
- `ResNetCritic`:    conv3x3 -> down-blocks to 4 x 4 -> flattened features f(x) -> linear -> 1.
  `ResNetCritic(..., out_features=128)` with `tanh` is f-AnoGAN's encoder (same body, new head).

"LayerNorm" here is the original's: statistics over (C, H, W) of each sample, a scale and offset per
channel, i.e. `GroupNorm(1, C)`. The critic must not use BatchNorm: the gradient penalty is per
sample, and batch statistics would couple the samples (Gulrajani et al., section 4).

Widths follow the original at 64 px with d = `width` (generator 8d, 8d, 4d, 2d, d; critic d, 2d,
4d, 8d, 8d); the number of blocks follows the image size (one per halving down to 4 x 4), so a 32 px
model has three blocks and a 128 px model five. Upsampling is nearest-neighbour (the original's
"concatenate four copies + depth_to_space" is exactly that); mean-pooling is 2 x 2 average pooling.
Weights keep PyTorch's default initialisation (the original used He-uniform, which is close).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import num_halvings

MAX_MULT = 8  # widths grow to 8 d, as in the original


def layer_norm(channels: int) -> nn.GroupNorm:
    """Per-sample normalisation over (C, H, W), per-channel affine: the original critic's LayerNorm."""
    return nn.GroupNorm(1, channels, eps=1e-5)


class UpBlock(nn.Module):
    """Residual up-block (2x): the generator's."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(out_ch), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        h = self.conv1(up(F.relu(self.norm1(x))))
        h = self.conv2(F.relu(self.norm2(h)))
        return self.shortcut(up(x)) + h


class DownBlock(nn.Module):
    """Residual down-block (1/2): the critic's and the encoder's."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = layer_norm(in_ch), nn.Conv2d(in_ch, in_ch, 3, 1, 1, bias=False)
        self.norm2, self.conv2 = layer_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        h = F.avg_pool2d(self.conv2(F.relu(self.norm2(h))), 2)
        return self.shortcut(F.avg_pool2d(x, 2)) + h


def generator_widths(image_size: int, width: int) -> list[int]:
    """Channel widths from the 4 x 4 input to the last block: 64 px, d=64 -> [512, 512, 256, 128, 64]."""
    n = num_halvings(image_size)
    return [width * MAX_MULT] + [width * min(2 ** (n - 1 - i), MAX_MULT) for i in range(n)]


def critic_widths(image_size: int, width: int) -> list[int]:
    """Channel widths from the stem to the 4 x 4 features: 64 px, d=64 -> [64, 128, 256, 512, 512]."""
    n = num_halvings(image_size)
    return [width] + [width * min(2 ** (i + 1), MAX_MULT) for i in range(n)]


class ResNetGenerator(nn.Module):
    def __init__(self, latent_dim: int = 128, channels: int = 1, image_size: int = 64, width: int = 64):
        super().__init__()
        w = generator_widths(image_size, width)
        self.latent_dim = latent_dim
        self.input = nn.Linear(latent_dim, w[0] * 4 * 4)
        self.blocks = nn.Sequential(*[UpBlock(a, b) for a, b in zip(w[:-1], w[1:])])
        self.head = nn.Sequential(nn.BatchNorm2d(w[-1]), nn.ReLU(), nn.Conv2d(w[-1], channels, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # unflatten, not view(len(z), ...): a traced len() would fix the batch size of an ONNX export
        h = self.input(z).unflatten(1, (-1, 4, 4))
        return self.head(self.blocks(h))


class ResNetCritic(nn.Module):
    """Critic (out_features=1) or encoder (out_features=latent_dim, tanh=True): same body."""

    def __init__(self, channels: int = 1, image_size: int = 64, width: int = 64, out_features: int = 1, tanh: bool = False):
        super().__init__()
        w = critic_widths(image_size, width)
        self.body = nn.Sequential(
            nn.Conv2d(channels, w[0], 3, 1, 1), *[DownBlock(a, b) for a, b in zip(w[:-1], w[1:])], nn.Flatten()
        )
        self.output = nn.Linear(w[-1] * 4 * 4, out_features)
        self.tanh = tanh

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the flattened 4 x 4 features before the last linear layer, [N, 16 * 8d]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.output(self.body(x))
        return torch.tanh(out) if self.tanh else out
