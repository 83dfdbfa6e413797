"""HealthyGAN's `heatmap="mask"`: the heatmap is the generator's attention mask M, where it changes the scan. The scores
are the model's, unchanged; the map is the scoring (EMA) generator's M; it saves, loads and exports; with the paper's
pixel score it needs no memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scanomaly.methods.healthygan as hg
from scanomaly.detector import Detector
from scanomaly.methods.healthygan import HealthyGAN, NearestHealthyPatch

from conftest import blobs


def detector(**overrides) -> HealthyGAN:
    options = {"critic": "lite0", "critic_weights": "random", "score": "critic+nearest", "heatmap": "mask",
               "mask_target": 10.0, "selection": "last", "iterations": 6}
    return HealthyGAN.from_profile("tiny", {**options, **overrides})


@pytest.fixture(scope="module")
def fitted() -> HealthyGAN:
    return detector().fit(blobs(10, seed=1), blobs(8, seed=2, lesion=True), progress=False)


def test_the_map_is_the_scoring_generators_mask_and_the_scores_are_unchanged(fitted):
    x = blobs(6, seed=9, lesion=True)
    scores, maps = fitted.score(x)
    with torch.no_grad():
        masks = fitted.scoring_generator.eval()(x)[2][:, 0].numpy()
    assert maps.shape == (6, 32, 32)
    np.testing.assert_allclose(maps, masks, rtol=0, atol=1e-6)
    fitted.config.heatmap = "nearest"  # the same model, bank and scales: the memory's map instead
    try:
        scores_nearest, maps_nearest = fitted.score(x)
    finally:
        fitted.config.heatmap = "mask"
    np.testing.assert_array_equal(scores, scores_nearest)
    assert not np.allclose(maps, maps_nearest)


def test_the_fused_scores_scales_are_the_memorys_not_the_masks(fitted):
    """score="critic+nearest" divides the memory's maximum by its spread: with the mask as the heatmap that spread is
    still the memory map's."""
    x = blobs(8, seed=4, lesion=True)
    with torch.no_grad():
        memory_max = NearestHealthyPatch(fitted.scoring["critic"], fitted.healthy_patches)(x).flatten(1).amax(1)
    scales = fitted.fused_score_scales(x)
    assert float(scales[1]) == pytest.approx(float(memory_max.std()), rel=1e-4)


def test_it_saves_loads_and_exports(fitted, tmp_path):
    x = blobs(5, seed=9, lesion=True)
    s1, m1 = fitted.score(x)
    s2, m2 = Detector.load(fitted.save(tmp_path / "model")).score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    # ONNX: the masks absolutely (they lie in [0, 1]); the scores loosely, as the fused score divides by the random
    # test trunk's tiny spreads (its parity is test_healthygan_nearest_heatmap's)
    pytest.importorskip("onnxruntime")
    from scanomaly.export import OnnxScorer, export_onnx

    o_scores, o_maps = OnnxScorer(export_onnx(fitted, tmp_path / "model.onnx").path).score(x, batch_size=3)
    np.testing.assert_allclose(o_scores, s1, rtol=1e-2)
    np.testing.assert_allclose(o_maps, m1, rtol=0, atol=1e-4)


def test_a_memory_used_only_to_teach_the_mask_is_not_searched_or_saved(tmp_path):
    det = detector(score="critic").fit(blobs(10, seed=1), blobs(8, seed=2, lesion=True), progress=False)
    assert not det.scores_with_memory and det.scoring_network().nearest is None
    assert hg.HEALTHY_PATCHES not in det.state_tensors()
    x = blobs(4, seed=3, lesion=True)
    s1, m1 = det.score(x)
    s2, m2 = Detector.load(det.save(tmp_path / "model")).score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)


def test_with_the_papers_pixel_score_it_needs_no_memory():
    det = HealthyGAN.from_profile("tiny", {"heatmap": "mask", "selection": "last", "iterations": 2})
    assert not det.scores_with_memory
    det.fit(blobs(6, seed=1), blobs(6, seed=2), progress=False)
    assert det.healthy_patches is None
    x = blobs(4, seed=3)
    scores, maps = det.score(x)
    with torch.no_grad():
        healthy, _, masks = det.scoring_generator.eval()(x)
    np.testing.assert_allclose(scores, (x - healthy).abs().mean((1, 2, 3)).numpy() / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps, masks[:, 0].numpy(), rtol=0, atol=1e-6)
