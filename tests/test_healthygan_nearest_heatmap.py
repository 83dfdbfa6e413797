"""HealthyGAN's `heatmap="nearest"`: beside the critic's score, a heatmap from each patch's distance to its nearest
healthy patch on the critic's frozen trunk. The scores stay exactly the critic's; the bank is a coreset of B's
patches, searched exactly (in slices); the map points at a pasted lesion; the bank is saved, loaded and exported."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import scanomaly.methods.healthygan as hg
from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import HealthyGAN, NearestHealthyPatch

from conftest import assert_onnx_parity, blobs


def nearest_detector(**overrides) -> HealthyGAN:
    options = {"critic": "lite0", "critic_weights": "random", "score": "critic", "selection": "last", "iterations": 6,
               "heatmap": "nearest"}
    return HealthyGAN.from_profile("tiny", {**options, **overrides})


@pytest.fixture(scope="module")
def fitted() -> HealthyGAN:
    return nearest_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)


def test_the_scores_are_the_critics_and_only_the_heatmap_changes(fitted):
    plain = nearest_detector(heatmap="score").fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    x = blobs(6, seed=9, lesion=True)
    (s_nearest, m_nearest), (s_plain, m_plain) = fitted.score(x), plain.score(x)
    np.testing.assert_array_equal(s_nearest, s_plain)
    assert m_nearest.shape == m_plain.shape == (6, 32, 32)
    assert not np.allclose(m_nearest, m_plain)


def test_the_bank_is_a_coreset_of_bs_trunk_patches(fitted):
    b = blobs(8, seed=1)
    with torch.no_grad():
        patches = fitted.scoring["critic"].features(b).permute(0, 2, 3, 1).flatten(0, 2)  # 8 scans x 8 x 8 patches
    bank = fitted.healthy_patches
    assert bank.shape == (math.ceil(hg.NEAREST_CORESET_FRACTION * len(patches)), patches.shape[1])
    # every bank row is one of B's patches, and no patch is kept twice
    nearest = torch.cdist(bank, patches).min(1)
    assert float(nearest.values.max()) < 1e-4
    assert len(set(nearest.indices.tolist())) == len(bank)


def test_the_map_is_the_blurred_exact_nearest_distance_whatever_the_slicing(fitted, monkeypatch):
    critic, bank = fitted.scoring["critic"], fitted.healthy_patches
    x = blobs(3, seed=4, lesion=True)
    with torch.no_grad():
        f = critic.features(x)
        exact = torch.cdist(f.permute(0, 2, 3, 1).flatten(0, 2), bank).min(1).values.view(3, *f.shape[-2:])
        expected = hg.pf.to_anomaly_map(exact, 32, 4.0)
        whole = NearestHealthyPatch(critic, bank)(x)
        monkeypatch.setattr(hg, "NEAREST_SLICE", 7)  # many slices, the last one short
        sliced = NearestHealthyPatch(critic, bank)(x)
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_the_map_peaks_inside_a_pasted_lesion():
    """B and A healthy-looking blobs; new scans get a bright 8x8 square at rows and columns 8-15: the patches that
    see it are far from every healthy patch, so the map is higher there than in the opposite quadrant, and higher
    than on the same scans without the square."""
    det = nearest_detector().fit(blobs(16, seed=1), blobs(8, seed=2), progress=False)
    normal, lesion = blobs(8, seed=7), blobs(8, seed=7, lesion=True)
    _, m_normal = det.score(normal)
    _, m_lesion = det.score(lesion)
    inside = m_lesion[:, 8:16, 8:16].mean((1, 2))
    assert np.all(inside > m_lesion[:, 20:28, 20:28].mean((1, 2)))
    assert np.all(inside > m_normal[:, 8:16, 8:16].mean((1, 2)))
    assert np.all(m_lesion.reshape(8, -1).argmax(1) // 32 < 20)  # the peak's row: near the square, not far below


def test_save_load_gives_identical_scores_and_maps(fitted, tmp_path):
    x = blobs(5, seed=9)
    s1, m1 = fitted.score(x)
    loaded = Detector.load(fitted.save(tmp_path / "model"))
    s2, m2 = loaded.score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    torch.testing.assert_close(loaded.healthy_patches, fitted.healthy_patches, rtol=0, atol=0)


def test_a_model_without_its_bank_is_a_clear_error(fitted, tmp_path):
    unfitted = nearest_detector()
    with pytest.raises(ScanomalyError, match="no bank of healthy patches"):
        unfitted.score(blobs(2))
    with pytest.raises(ScanomalyError, match="nothing to save"):
        unfitted.save(tmp_path / "unfitted")
    tensors = {k: v for k, v in fitted.state_tensors().items() if k != hg.HEALTHY_PATCHES}
    with pytest.raises(ScanomalyError, match="saved without them"):
        nearest_detector().load_state_tensors(tensors)


def test_onnx_export_has_score_and_heatmap_parity(fitted, tmp_path):
    assert_onnx_parity(fitted, tmp_path / "model.onnx")


@pytest.mark.parametrize("overrides, message", [
    ({"heatmap": "gradcam"}, "heatmap must be one of"),
    ({"heatmap": "nearest", "critic": "patch"}, "needs critic=lite0 and score=critic"),
    ({"heatmap": "nearest", "score": "pixel"}, "needs critic=lite0 and score=critic"),
])
def test_heatmap_option_errors(overrides, message):
    with pytest.raises(ScanomalyError, match=message):
        nearest_detector(**overrides)
