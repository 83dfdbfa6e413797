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


@pytest.fixture(scope="module")
def fused() -> HealthyGAN:
    return nearest_detector(score="critic+nearest", selection="aucp", checkpoint_every=3).fit(
        blobs(12, seed=1), blobs(12, seed=2), progress=False)


@pytest.mark.filterwarnings("ignore:AUCp checkpoint selection")
def test_the_fused_score_adds_the_critic_and_the_memory_each_over_its_spread(fused):
    x = torch.cat([blobs(4, seed=9), blobs(4, seed=9, lesion=True)])
    s_fused, m_fused = fused.score(x)
    fused.config.score = "critic"  # the same networks, bank and map; the critic's deficit alone
    try:
        s_critic, m_critic = fused.score(x)
    finally:
        fused.config.score = "critic+nearest"
    np.testing.assert_array_equal(m_fused, m_critic)
    sigma = fused.fused_scales.numpy()
    np.testing.assert_allclose(s_fused, s_critic / sigma[0] + m_critic.reshape(8, -1).max(1) / sigma[1], rtol=1e-5, atol=1e-6)
    # the scales are the parts' standard deviations over the scans they are computed on
    parts = np.c_[s_critic, m_critic.reshape(8, -1).max(1)]
    np.testing.assert_allclose(fused.fused_score_scales(x).numpy(), parts.std(0, ddof=1), rtol=1e-4)


@pytest.mark.filterwarnings("ignore:AUCp checkpoint selection")
def test_the_fused_score_saves_loads_and_exports(fused, tmp_path):
    x = blobs(5, seed=9, lesion=True)
    s1, m1 = fused.score(x)
    loaded = Detector.load(fused.save(tmp_path / "model"))
    s2, m2 = loaded.score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    # ONNX: relative tolerances, as the random test trunk's features are tiny and so are both scales (~1e-7, 1e-5)
    pytest.importorskip("onnxruntime")
    from scanomaly.export import OnnxScorer, export_onnx

    o_scores, o_maps = OnnxScorer(export_onnx(fused, tmp_path / "model.onnx").path).score(x, batch_size=3)
    np.testing.assert_allclose(o_scores, s1, rtol=1e-3)
    np.testing.assert_allclose(o_maps, m1, rtol=1e-3, atol=1e-3 * float(np.abs(m1).max()))
    tensors = {k: v for k, v in fused.state_tensors().items() if k != hg.FUSED_SCALES}
    with pytest.raises(ScanomalyError, match="saved without their scales"):
        nearest_detector(score="critic+nearest").load_state_tensors(tensors)


def test_the_fused_score_needs_held_out_scans_and_says_so_before_training(tmp_path):
    det = nearest_detector(score="critic+nearest", selection="last")
    for n_healthy, n_unlabeled in ((1, 8), (2, 1)):  # nothing to hold out of B; one scan held out in all
        with pytest.raises(ScanomalyError, match="a standard deviation needs two"):
            det.fit(blobs(n_healthy, seed=1), blobs(n_unlabeled, seed=2), work_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the first step
    # with selection=last the scales still come from held-out scans (AUCp is not run)
    det.fit(blobs(10, seed=1), blobs(8, seed=2), progress=False)
    assert det.train_result.best_step is None and torch.all(det.fused_scales > 0)


@pytest.mark.parametrize("overrides, message", [
    ({"heatmap": "gradcam"}, "heatmap must be one of"),
    ({"heatmap": "nearest", "critic": "patch"}, "needs critic=lite0 and the critic's score"),
    ({"heatmap": "nearest", "score": "pixel"}, "needs critic=lite0 and the critic's score"),
    ({"critic": "patch", "score": "critic+nearest", "heatmap": "score"}, r"score=critic\+nearest uses the nearest-patch memory"),
    ({"critic": "patch", "score": "critic+nearest"}, "needs critic=lite0 and the critic's score"),
    # every use of the memory named, and how to do without each
    ({"critic": "patch", "score": "critic+nearest"}, r"heatmap=nearest and score=critic\+nearest use .*--set heatmap=mask score=critic$"),
])
def test_heatmap_option_errors(overrides, message):
    with pytest.raises(ScanomalyError, match=message):
        nearest_detector(**overrides)


def test_the_critic_weight_falls_from_chance_to_complete_memorisation():
    assert [hg.critic_weight(m) for m in (None, 0.3, 0.5, 0.75, 0.9, 1.0)] == pytest.approx([1, 1, 1, 0.5, 0.2, 0])


@pytest.mark.filterwarnings("ignore:AUCp checkpoint selection", "ignore:the critic tells")
@pytest.mark.parametrize("memorisation", [0.9, 1.0])
def test_a_critic_that_has_learned_b_gets_less_say_in_the_fused_score(monkeypatch, tmp_path, memorisation):
    """The same seeded fit, once with the critic's memorisation measured at chance and once high: the memory's scale
    is the same, the critic's is divided by its weight; at complete memorisation the score is the memory's alone."""
    def fit(m):
        monkeypatch.setattr(HealthyGAN, "_critic_memorisation", lambda self, x_b, x_hold: m)
        return nearest_detector(score="critic+nearest", selection="last").fit(blobs(12, seed=1), blobs(12, seed=2),
                                                                               progress=False)
    chance, learned = fit(0.5), fit(memorisation)
    torch.testing.assert_close(learned.fused_scales[1], chance.fused_scales[1])
    x = torch.cat([blobs(3, seed=9), blobs(3, seed=9, lesion=True)])
    scores, maps = learned.score(x)
    if memorisation < 1:
        torch.testing.assert_close(learned.fused_scales[0], chance.fused_scales[0] / hg.critic_weight(memorisation))
    else:
        assert torch.isinf(learned.fused_scales[0])
        np.testing.assert_allclose(scores, maps.reshape(6, -1).max(1) / float(learned.fused_scales[1]), rtol=1e-5)
    assert np.all(np.isfinite(scores))
    # saved and exported with the weight inside the critic's scale (an infinite one included)
    np.testing.assert_array_equal(Detector.load(learned.save(tmp_path / "model")).score(x)[0], scores)
    pytest.importorskip("onnxruntime")
    from scanomaly.export import OnnxScorer, export_onnx

    o_scores, _ = OnnxScorer(export_onnx(learned, tmp_path / "model.onnx").path).score(x, batch_size=4)
    np.testing.assert_allclose(o_scores, scores, rtol=1e-3)


@pytest.mark.filterwarnings("ignore:AUCp checkpoint selection")
def test_the_memorisation_warning_names_the_critics_weight(monkeypatch):
    monkeypatch.setattr(hg, "CRITIC_MEMORISATION_WARN", 0.0)  # every value warns
    det = nearest_detector(score="critic+nearest", selection="last")
    with pytest.warns(UserWarning, match=r"learned B itself.*gives its part the weight \d\.\d\d"):
        det.fit(blobs(12, seed=1), blobs(12, seed=2), progress=False)
