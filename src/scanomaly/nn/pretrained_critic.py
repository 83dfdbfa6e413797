"""A HealthyGAN critic on pretrained features (option critic="lite0"; Projected GAN, Sauer et al. 2021).

    x ──► ×2 bilinear ──► frozen EfficientNet-Lite0: stage3 (stride 8), stage5 (stride 16)
      stage5 ↑ to stage3's grid, ⊕ stage3 ─ 1x1 conv ─ LeakyReLU ─ 3x3 conv ─ LeakyReLU ─ 1x1 conv ─► patch map

The trunk is the ImageNet-trained backbone, stages and input scale as PatchCore's cpu profile uses it
(128 px, stage3 + stage5 on a 16 x 16 grid), frozen: eval mode (BatchNorm keeps ImageNet's statistics)
and no parameter ever trains. The generator's adversarial term flows *through* it to the pixels. The
WGAN-GP penalty holds the trained head to 1-Lipschitz on the trunk's features (`features`, then
`judge`), not on pixels: the trunk is fixed, and differentiating the penalty through it twice made a
critic step three times slower on CPU. Only the small head learns, on features learned from millions of
images. Measured (docs/experiments.md, section 8): its map finds lgg_flair lesions far better than the
paper's critic (validation pixel AUROC 0.70 against 0.33), but on a B of 31-48 scans the head still learns
B itself, and the generator's masks empty out against it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import FeatureExtractor

CRITIC_STAGES = ("stage3", "stage5")  # PatchCore's cpu profile


class PretrainedPatchCritic(nn.Module):
    """x [N, C, S, S] in [-1, 1] -> a patch map [N, 1, 2S/8, 2S/8] (a WGAN critic's verdicts)."""

    def __init__(self, trunk: FeatureExtractor, width: int = 64, scale: float = 2.0):
        super().__init__()
        if tuple(trunk.stages) != CRITIC_STAGES:
            raise ValueError(f"the trunk must give the stages {CRITIC_STAGES}, got {trunk.stages}")
        self.trunk, self.scale = trunk, scale
        self.head = nn.Sequential(
            nn.Conv2d(sum(trunk.channels), width, 1), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(width, width, 3, 1, 1), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(width, 1, 1, bias=False),
        )

    def requires_grad_(self, requires_grad: bool = True) -> "PretrainedPatchCritic":
        super().requires_grad_(requires_grad)
        self.trunk.requires_grad_(False)  # the training loop switches whole modules on and off: the trunk stays frozen
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's view of x: [N, 40 + 112, 2S/8, 2S/8]."""
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        # the trunk's own forward runs under no_grad (feature extraction); here gradients must reach x
        f3, f5 = self.trunk.net.forward_stages(self.trunk.prepare(x), list(self.trunk.stages))
        f5 = F.interpolate(f5, size=f3.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f3, f5], 1)

    def judge(self, features: torch.Tensor) -> torch.Tensor:
        """The trained part: features -> patch map."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge(self.features(x))
