"""Shared pieces of the patch-feature methods (PaDiM, PatchCore).

- building the frozen backbone from a method's config, and running it batch by batch
  (with autocast for bf16 / 16-mixed);
- turning per-position scores into an anomaly map at the input resolution: bilinear upsampling,
  then a Gaussian blur with sigma = 4 (both papers), written as two 1-D convolutions;
- saving / restoring a randomly initialised backbone (pretrained ones are reloaded from their source);
- `FeatureDistance`: the per-position distance between the features of two images (HealthyGAN's
  `features` score of a scan against its healthy translation).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones import FeatureExtractor, get_backbone, is_random
from ..errors import ScanomalyError

BACKBONE_PREFIX = "backbone."


def build_extractor(name: str, weights, stages, device: torch.device) -> FeatureExtractor:
    return get_backbone(name, weights=weights, stages=list(stages)).to(device)


def autocast(device: torch.device, precision: str):
    """Mixed precision for the backbone only; statistics and distances stay in float32 / float64.
    (On CPUs whose AMX units crash oneDNN, the Detector base class has already made bf16 safe.)"""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def batches(images: torch.Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[torch.Tensor]:
    n = images.shape[0]
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield images[s : s + batch_size]


@torch.no_grad()
def stage_features(extractor: FeatureExtractor, x: torch.Tensor, device: torch.device, precision: str) -> list[torch.Tensor]:
    """One batch of our [-1, 1] images -> the backbone's stage outputs, float32, on `device`."""
    x = extractor.prepare(x.to(device, torch.float32))
    with autocast(device, precision):
        feats = extractor(x)
    return [f.float() for f in feats]


def check_images(x: torch.Tensor, image_size: int | None = None) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ScanomalyError(f"expected [N, 1 or 3, S, S] images, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ScanomalyError("no images given")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        raise ScanomalyError(
            f"the model was fitted on {image_size}x{image_size} images, got {x.shape[-2]}x{x.shape[-1]}; "
            "use the model's own preprocessing"
        )


# ------------------------------------------------------------------------------------------
# anomaly maps
# ------------------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, device=None) -> torch.Tensor:
    radius = int(math.ceil(4.0 * sigma))  # +-4 sigma holds all but ~6e-5 of the mass
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """[N, H, W] -> [N, H, W], separable Gaussian blur with reflected borders."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    radius = len(k) // 2
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)  # reflection needs pad < size
    k = k[len(k) // 2 - radius : len(k) // 2 + radius + 1]
    k = k / k.sum()
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def to_anomaly_map(grid_scores: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Per-position scores [N, h, w] -> smoothed map [N, size, size] (bilinear upsampling, then blur)."""
    up = F.interpolate(grid_scores.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


# ------------------------------------------------------------------------------------------
# persistence of a random backbone
# ------------------------------------------------------------------------------------------
def backbone_state(extractor: FeatureExtractor, weights) -> dict[str, torch.Tensor]:
    """Random weights cannot be rebuilt from a name, so they are saved with the model;
    pretrained ones are reloaded from `backbone_weights` and are not duplicated."""
    if not is_random(weights):
        return {}
    return {BACKBONE_PREFIX + k: v for k, v in extractor.net.state_dict().items()}


def load_backbone_state(extractor: FeatureExtractor, weights, tensors: dict[str, torch.Tensor]) -> None:
    sd = {k[len(BACKBONE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    if is_random(weights):
        if not sd:
            raise ScanomalyError("the saved model uses a random backbone but holds no backbone weights")
        extractor.net.load_state_dict(sd, strict=True)


# ------------------------------------------------------------------------------------------
# feature-space discrepancy between an image and a version of it (HealthyGAN's `features` score)
# ------------------------------------------------------------------------------------------
class FeatureDistance(torch.nn.Module):
    """How differently a frozen backbone sees `x` and `y`, position by position.

    Per stage, the cosine distance of the two feature vectors at each position, written as
    ½·|f_x/|f_x| − f_y/|f_y||² (= 1 − cos, in [0, 2], exactly 0 where the features are equal);
    the per-stage grids are upsampled to the image size (bilinear), averaged over stages and
    blurred (sigma in image pixels): the anomaly map. The score is the map's mean (`pool="mean"`)
    or maximum (`pool="max"`). Images may be enlarged to `input_size` before the backbone (ImageNet
    features see little in a 64 px image). One forward pass with fixed shapes: it traces to ONNX.
    """

    def __init__(self, extractor: FeatureExtractor, sigma: float = 4.0, input_size: int = 0, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ScanomalyError(f"feature score pooling must be 'mean' or 'max', got {pool!r}")
        self.extractor, self.sigma, self.input_size, self.pool = extractor, sigma, input_size, pool

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.input_size and self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return [F.normalize(f.float(), dim=1, eps=1e-6) for f in self.extractor(self.extractor.prepare(x))]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([N] scores, [N, S, S] anomaly map) for images x and y of shape [N, C, S, S]."""
        grids = [0.5 * (fx - fy).pow(2).sum(1) for fx, fy in zip(self._features(x), self._features(y))]
        # upsampling and blurring are linear: the blurred mean of the stages is the mean of their maps
        maps = torch.stack([to_anomaly_map(g, x.shape[-1], self.sigma) for g in grids]).mean(0)
        scores = maps.flatten(1).amax(1) if self.pool == "max" else maps.flatten(1).mean(1)
        return scores, maps
