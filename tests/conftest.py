"""Shared fixtures: the real data beside the repo (skipped when absent) and small synthetic trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scanomaly.data import ABNORMAL, NORMAL, ImageRecord

# ../shared/data relative to the repository root
DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT} (expected ../shared/data beside the repository)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def chest_slice(data_root) -> list[ImageRecord]:
    """12 normal + 12 abnormal chest X-rays from each official split (48 records)."""
    root = data_root / "chest_xray_pneumonia"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    records = []
    for split in ("train", "test"):
        for cls, label in (("normal", NORMAL), ("abnormal", ABNORMAL)):
            files = sorted((root / split / cls).glob("*.png"))[:12]
            if len(files) < 12:
                pytest.skip(f"{root / split / cls} holds fewer than 12 PNGs")
            records += [ImageRecord(str(p), label, split) for p in files]
    return records


def synthetic_image(rng: np.random.Generator, size: int, abnormal: bool) -> np.ndarray:
    """A smooth gradient with noise; abnormal images carry a bright disc. uint8 [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.3 + 0.2 * yy + 0.05 * rng.standard_normal((size, size))
    if abnormal:
        cy, cx = rng.uniform(0.3, 0.7, 2)
        img = img + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 0.04)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_tiny_tree(root: Path, n: int = 6, size: int = 32, seed: int = 0) -> Path:
    """root/{train,test}/{normal,abnormal}/*.png with n images per folder."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("normal", "abnormal"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(synthetic_image(rng, size, cls == "abnormal")).save(folder / f"{cls}_{i:02d}.png")
    return root


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    return make_tiny_tree(tmp_path / "tiny")


def blobs(n: int, size: int = 32, seed: int = 0, lesion: bool = False) -> torch.Tensor:
    """Smooth synthetic 'scans' [n, 1, size, size] in [-1, 1]; with lesion=True a bright square is added."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2) * 2 - 1
    if lesion:
        base[:, :, 8:16, 8:16] = 1.0
    return base
