"""Shared fixtures: the real data beside the repo (skipped when absent) and small synthetic trees."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scanomaly import detector
from scanomaly.data import ABNORMAL, NORMAL, ImageRecord
from scanomaly.detector import Detector, as_tensor

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


def assert_onnx_parity(det, path: Path, atol: float = 1e-4) -> None:
    """`det` exported to ONNX scores and maps unseen images as PyTorch does (batch size other than the export's)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from scanomaly.export import OnnxScorer, export_onnx

    result = export_onnx(det, path)
    assert result.max_score_difference < atol
    x = blobs(7, seed=9)
    scores, maps = det.score(x)
    o_scores, o_maps = OnnxScorer(result.path).score(x, batch_size=3)
    np.testing.assert_allclose(o_scores, scores, rtol=0, atol=atol)
    np.testing.assert_allclose(o_maps, maps, rtol=0, atol=atol)
    assert np.ptp(scores) > 0


# ------------------------------------------------------------------------------------------
# the fake method of the tests: register it (or a subclass) where a test module needs one
# ------------------------------------------------------------------------------------------
@dataclass
class MeanConfig:
    iterations: int = 1
    batch_size: int = 8
    seed: int = 0
    gain: float = 1.0
    tag: str = "x"


class MeanDetector(Detector):
    """An image's score is its mean absolute difference from the mean healthy image (times `gain`); seeds
    other than 0 perturb that mean image, so that seeds differ. Its reconstruction is the mean image.
    Every fit is recorded in `fits` (a list shared by the subclasses): {"seed", "n", "unlabeled", **kwargs}."""

    name = "_test_mean"
    Config = MeanConfig
    profiles = {"cpu": {"preprocessing": {"image_size": 16}}, "tiny": {"preprocessing": {"image_size": 16}}}
    fits: list = []

    def fit(self, healthy, unlabeled=None, **kwargs):
        x = as_tensor(healthy)
        noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(self.config.seed))
        self.mean_image = x.mean(0) + (0.1 * noise if self.config.seed else 0.0)
        MeanDetector.fits.append({"seed": self.config.seed, "n": len(x), "healthy": healthy, "unlabeled": unlabeled,
                                  **kwargs})
        return self

    def score(self, images, batch_size: int = 64):
        maps = (as_tensor(images) - self.mean_image).abs().mean(1) * self.config.gain
        return maps.flatten(1).mean(1).numpy(), maps.numpy()

    def reconstruct(self, images, batch_size: int = 64):
        return self.mean_image.expand_as(as_tensor(images)).numpy()

    def state_tensors(self):
        return {"mean_image": self.mean_image}

    def load_state_tensors(self, tensors):
        self.mean_image = tensors["mean_image"]


@contextlib.contextmanager
def registered(*classes):
    """Register fake methods for the duration of the block (a test module's fixture), then remove them."""
    for cls in classes:
        detector.register(cls)
    try:
        yield
    finally:
        for cls in classes:
            detector._REGISTRY.pop(cls.name, None)
