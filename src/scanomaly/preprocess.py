"""Preprocessing: from a decoded image in [0, 1] to the tensor a model sees.

The recipe is a small dataclass saved with every model, so a loaded model prepares new scans
exactly as it did in training. Order: (optional) per-image intensity normalisation, top crop,
centre square crop, resize, optional repeat to 3 channels, scale to [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

from .errors import ScanomalyError

INTENSITY_MODES = ("none", "minmax", "percentile", "equalize")


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 64
    channels: int = 1  # 1 for grayscale models; 3 repeats the gray channel (RGB models, pretrained backbones)
    top_crop: float = 0.0  # fraction of rows removed from the top (HealthyGAN crops 8% of chest X-rays)
    center_crop: bool = True  # crop to the central square before resizing
    intensity: str = "none"  # "minmax" / "percentile" (1-99%) rescale each image (MRI); "equalize": histogram equalisation

    def __post_init__(self):
        if self.image_size < 8:
            raise ScanomalyError(f"image_size must be at least 8, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ScanomalyError(f"channels must be 1 or 3, got {self.channels}")
        if not 0.0 <= self.top_crop < 1.0:
            raise ScanomalyError(f"top_crop must be in [0, 1), got {self.top_crop}")
        if self.intensity is None:  # `--set intensity=none` parses "none" as None
            object.__setattr__(self, "intensity", "none")  # a frozen dataclass
        if self.intensity not in INTENSITY_MODES:
            raise ScanomalyError(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- geometry, shared by images and masks so that masks stay aligned -------------------
    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the region kept before resizing."""
        top = int(round(self.top_crop * height))
        h, w = height - top, width
        if self.center_crop:
            side = min(h, w)
            t = top + (h - side) // 2
            left = (w - side) // 2
            return t, left, t + side, left + side
        return top, 0, height, width

    def _geometry(self, img: np.ndarray, resample) -> np.ndarray:
        t, l, b, r = self.crop_box(*img.shape)
        img = img[t:b, l:r]
        if img.shape != (self.image_size, self.image_size):
            pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
            img = np.asarray(pil.resize((self.image_size, self.image_size), resample), dtype=np.float32)
        return img

    def apply(self, img01: np.ndarray) -> torch.Tensor:
        """[H, W] float in [0, 1] -> [C, S, S] float32 in [-1, 1]."""
        img = np.asarray(img01, dtype=np.float32)
        if img.ndim != 2:
            raise ScanomalyError(f"expected a 2-D image, got shape {img.shape}")
        img = normalise_intensity(img, self.intensity)
        img = np.clip(self._geometry(img, Image.BILINEAR), 0.0, 1.0)
        t = torch.from_numpy(img * 2.0 - 1.0).unsqueeze(0)
        return t.repeat(self.channels, 1, 1) if self.channels > 1 else t

    def apply_mask(self, mask: np.ndarray) -> torch.Tensor:
        """A binary mask of the source image -> [S, S] bool, with the image's exact geometry (nearest neighbour)."""
        m = (np.asarray(mask) > 0).astype(np.float32)
        return torch.from_numpy(self._geometry(m, Image.NEAREST) > 0.5)


def normalise_intensity(img: np.ndarray, mode: str) -> np.ndarray:
    if mode == "none":
        return img
    if mode == "equalize":
        return equalise_histogram(img)
    if mode == "minmax":
        lo, hi = float(img.min()), float(img.max())
    else:  # percentile: robust to a few hot pixels
        lo, hi = (float(v) for v in np.percentile(img, [1, 99]))
    if hi - lo < 1e-8:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def equalise_histogram(img: np.ndarray, bins: int = 256) -> np.ndarray:
    """Map each intensity to its quantile in the image (256 bins, as Pillow's ImageOps.equalize),
    so that scans exposed or windowed differently by other sites and machines look alike."""
    hist, edges = np.histogram(img, bins=bins, range=(0.0, 1.0))
    occupied = np.flatnonzero(hist)
    if len(occupied) < 2:  # (nearly) constant: nothing to spread
        return np.zeros_like(img, dtype=np.float32)
    cdf = np.cumsum(hist, dtype=np.float64)
    darkest = cdf[occupied[0]]
    cdf = (cdf - darkest) / (cdf[-1] - darkest)  # the darkest occupied bin maps to 0, the brightest to 1
    return np.clip(np.interp(img, edges[1:], cdf), 0.0, 1.0).astype(np.float32)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model tensors in [-1, 1] back to [0, 1] (for display and for pretrained backbones)."""
    return (x.clamp(-1, 1) + 1.0) / 2.0
