"""PaDiM: a Patch Distribution Modeling framework (Defard et al., ICPR 2021).

1. Embedding. Feature maps from three stages of a pretrained CNN (ResNet-18: layer1-3) are
   upsampled (nearest) to the first stage's resolution and concatenated, so each position (i, j)
   of that grid holds one patch embedding of the image.
2. Random dimensionality reduction. A fixed random subset of d channels is kept (d = 100 of 448
   for ResNet-18 in the paper).
3. Learning. At every position, the embeddings of the healthy training images are modelled by a
   Gaussian N(mu_ij, Sigma_ij), with Sigma_ij = sample covariance + 0.01 I. Sums and outer products
   are accumulated in float64, batch by batch, so memory does not grow with the number of images.
4. Inference. The anomaly score of a position is the Mahalanobis distance
   sqrt((x - mu)^T Sigma^-1 (x - mu)); the score grid is upsampled to the image size and smoothed
   with a Gaussian (sigma = 4); the image score is the maximum of the map.

Choice of d for EfficientNet-Lite0 (the cpu profile): its stride-4/8/16 stages (stage2, stage3,
stage5; the last block at each of those resolutions, like ResNet's layer1-3) give 24 + 40 + 112 = 176
channels. ResNet-18's paper setting keeps 100 of 448 = 22%; the same fraction of 176 is 39, so d = 40.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..detector import Detector, as_tensor, register
from ..errors import ScanomalyError
from . import _patch_features as pf


# per backbone: the last block at strides 4, 8 and 16, and d. The paper keeps 100 of ResNet-18's
# 448 channels and 550 of Wide-ResNet-50-2's 1792; EfficientNet-Lite0 keeps 40 of 176 (see above).
BACKBONE_DEFAULTS = {
    "resnet18": (("layer1", "layer2", "layer3"), 100),
    "wide_resnet50_2": (("layer1", "layer2", "layer3"), 550),
    "efficientnet_lite0": (("stage2", "stage3", "stage5"), 40),
}


@dataclass
class PadimConfig:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = "imagenet"  # "imagenet", a local weights file, or "random"
    stages: tuple[str, ...] = ()  # empty: BACKBONE_DEFAULTS for the backbone
    d: int | None = None  # random channels kept; None: BACKBONE_DEFAULTS for the backbone
    covariance_eps: float = 0.01  # added to the covariance diagonal (paper: 0.01 I)
    sigma: float = 4.0  # Gaussian smoothing of the anomaly map, in pixels of the input
    seed: int = 0  # for the random channel choice
    batch_size: int = 32  # images per backbone pass during fit


# ------------------------------------------------------------------------------------------
# the Gaussian per position, and the Mahalanobis distance to it
# ------------------------------------------------------------------------------------------
class GaussianAccumulator:
    """Streaming mean and covariance of embeddings [B, d, L] (L positions), in float64."""

    def __init__(self, d: int, positions: int, device: torch.device):
        self.n = 0
        self.sum = torch.zeros(positions, d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(positions, d, d, dtype=torch.float64, device=device)

    def update(self, emb: torch.Tensor) -> None:
        x = emb.to(torch.float64).permute(2, 1, 0)  # [L, d, B]
        self.n += x.shape[-1]
        self.sum += x.sum(-1)
        self.outer += torch.bmm(x, x.transpose(1, 2))  # sum_b x_b x_b^T at every position

    def finalize(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mean [L, d] and W = L^-1 [L, d, d] (float32), where Sigma = L L^T is the Cholesky
        factorisation of the regularised covariance, so that (x-mu)^T Sigma^-1 (x-mu) = ||W (x-mu)||^2."""
        if self.n < 2:
            raise ScanomalyError(f"PaDiM needs at least 2 healthy images to estimate a covariance, got {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * mean.unsqueeze(2) * mean.unsqueeze(1)) / (self.n - 1)
        d = cov.shape[-1]
        cov = cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov)
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device).expand_as(cov)
        inv_chol = torch.linalg.solve_triangular(chol, eye, upper=False)
        # contiguous: LAPACK returns column-major factors, a loaded model has row-major ones, and bmm on the two
        # layouts rounds differently in the last bit; one layout keeps fitted and loaded scores identical
        return mean.float().contiguous(), inv_chol.float().contiguous()


def mahalanobis(emb: torch.Tensor, mean: torch.Tensor, inv_chol: torch.Tensor) -> torch.Tensor:
    """Embeddings [B, d, L], mean [L, d], W = chol(Sigma)^-1 [L, d, d] -> distances [B, L]."""
    diff = emb.permute(2, 0, 1) - mean.unsqueeze(1)  # [L, B, d]
    z = torch.bmm(diff, inv_chol.transpose(1, 2))  # row b of position l: W_l (x_bl - mu_l)
    return z.norm(dim=-1).transpose(0, 1)


# ------------------------------------------------------------------------------------------
# the detector
# ------------------------------------------------------------------------------------------
@register
class Padim(Detector):
    name = "padim"
    not_exportable_because = (
        "its score compares backbone features with per-position Gaussians fitted on healthy images "
        "(a memory of statistics, not one trained network); score it with PyTorch"
    )
    Config = PadimConfig
    profiles = {
        "cpu": {
            "config": {
                "backbone": "efficientnet_lite0",
                "backbone_weights": "imagenet",  # shipped in the optional package (scanomaly[pretrained])
                "stages": ("stage2", "stage3", "stage5"),
                "d": 40,
            },
            "preprocessing": {"image_size": 128, "channels": 1},
        },
        "paper": {
            "config": {
                "backbone": "resnet18",
                # torchvision's ImageNet file is not bundled: set backbone_weights=/path/to/resnet18-f37072fd.pth
                "backbone_weights": "imagenet",
                "stages": ("layer1", "layer2", "layer3"),
                "d": 100,
            },
            "preprocessing": {"image_size": 224, "channels": 1},
        },
        "tiny": {  # random weights: fast tests that need no extra package
            "config": {
                "backbone": "resnet18",
                "backbone_weights": "random",
                "stages": ("layer1", "layer2", "layer3"),
                "d": 20,
                "batch_size": 8,
            },
            "preprocessing": {"image_size": 64, "channels": 1},
        },
    }

    def __init__(self, config=None, preprocessing=None, device="cpu", precision="32"):
        super().__init__(config, preprocessing, device, precision)
        c = self.config
        default_stages, default_d = BACKBONE_DEFAULTS.get(c.backbone, ((), None))
        self.extractor = pf.build_extractor(c.backbone, c.backbone_weights, c.stages or default_stages, self.device)
        total = sum(self.extractor.channels)
        self.d = c.d or min(default_d or total, total)  # custom stages may hold fewer channels
        if not 1 <= self.d <= total:
            raise ScanomalyError(f"padim: d must be in [1, {total}] for {c.backbone} stages {self.extractor.stages}, got {self.d}")
        self.channel_idx: torch.Tensor | None = None  # [d] indices into the concatenated channels
        self.mean: torch.Tensor | None = None  # [L, d]
        self.inv_chol: torch.Tensor | None = None  # [L, d, d]
        self.image_size: int | None = None

    # -- embedding --------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] in [-1, 1] -> [B, d, h*w] random-channel patch embeddings on the first stage's grid."""
        feats = pf.stage_features(self.extractor, x, self.device, self.precision)
        size = feats[0].shape[-2:]
        emb = torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="nearest") for f in feats[1:]], dim=1)
        return emb[:, self.channel_idx].flatten(2)

    def _grid(self) -> int:
        return int(round(self.mean.shape[0] ** 0.5))

    # -- the verbs --------------------------------------------------------------------------
    def fit(self, healthy, unlabeled=None, *, work_dir=None, progress=True) -> "Padim":
        x = as_tensor(healthy)
        pf.check_images(x)
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        total = sum(self.extractor.channels)
        self.channel_idx = torch.randperm(total, generator=gen)[: self.d].sort().values.to(self.device)
        acc = None
        for batch in pf.batches(x, c.batch_size, progress, "padim: fitting"):
            emb = self._embed(batch)
            if acc is None:
                acc = GaussianAccumulator(self.d, emb.shape[-1], self.device)
            acc.update(emb)
        self.mean, self.inv_chol = acc.finalize(c.covariance_eps)
        self.image_size = int(x.shape[-1])
        return self

    @torch.no_grad()
    def score(self, images, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None:
            raise ScanomalyError("padim: call fit() (or load a fitted model) before score()")
        x = as_tensor(images)
        pf.check_images(x, self.image_size)
        h = self._grid()
        maps = []
        for batch in pf.batches(x, batch_size, False, "padim: scoring"):
            dist = mahalanobis(self._embed(batch), self.mean, self.inv_chol).view(-1, h, h)
            maps.append(pf.to_anomaly_map(dist, self.image_size, self.config.sigma).cpu())
        maps = torch.cat(maps)
        scores = maps.flatten(1).amax(1)
        return scores.double().numpy(), maps.numpy().astype(np.float32)

    # -- persistence ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise ScanomalyError("padim: nothing to save, the model is not fitted")
        state = {
            "channel_idx": self.channel_idx,
            "mean": self.mean,
            "inv_chol": self.inv_chol,
            "image_size": torch.tensor(self.image_size, dtype=torch.int64),
        }
        return {**state, **pf.backbone_state(self.extractor, self.config.backbone_weights)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channel_idx = tensors["channel_idx"].long().to(self.device)
        self.mean = tensors["mean"].float().to(self.device)
        self.inv_chol = tensors["inv_chol"].float().to(self.device)
        self.image_size = int(tensors["image_size"])
        pf.load_backbone_state(self.extractor, self.config.backbone_weights, tensors)
