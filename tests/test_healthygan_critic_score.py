"""HealthyGAN's `critic` score: the critic's deficit against the healthy set B, patch by patch. Zero on
average over B, larger and located where a lesion was pasted once the critic has learned it, chosen by AUCp
with the generator, saved and loaded exactly (critic and reference), exported to ONNX with the same
scores; and the StarGAN generator's `upsample=nearest` and `padding=reflect`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import CriticDeficit, HealthyGAN, HealthyScorer, MaskedTranslator, PatchCritic

from conftest import assert_onnx_parity, blobs


def critic_detector(**overrides) -> HealthyGAN:
    return HealthyGAN.from_profile("tiny", {"score": "critic", "selection": "last", "iterations": 6, **overrides})


def test_deficit_is_the_reference_minus_the_verdict_per_patch():
    torch.manual_seed(0)
    critic = PatchCritic(1, 32, width=4, max_width=8).eval()
    healthy = blobs(12, seed=1)
    with torch.no_grad():
        reference = critic(healthy).mean(0, keepdim=True)
        scores, heatmap = CriticDeficit(critic, reference)(healthy)
        x = blobs(3, seed=5)
        s, m = CriticDeficit(critic, reference)(x)
        expected = (reference - critic(x)).flatten(1).mean(1)
    assert heatmap.shape == (12, 32, 32)
    assert abs(float(scores.mean())) < 1e-6  # B's own mean verdict is the zero of the score
    torch.testing.assert_close(s, expected)
    assert not torch.allclose(m[0], m[0].mean())  # a map, not a constant


def test_critic_score_finds_a_learned_lesion_and_points_at_it():
    """B healthy; A half with a bright 8x8 square in the top-left quadrant. The critic learns that A's
    squares are not healthy: new scans with the square score higher, and their deficit map is higher in
    that quadrant than in the opposite one."""
    b = blobs(48, seed=1)
    a = torch.cat([blobs(24, seed=2), blobs(24, seed=3, lesion=True)])
    # a critic that learns within seconds: wider, 5 steps per generator step, a higher rate
    det = critic_detector(iterations=80, n_critic=5, lr=1e-3, batch_size=16, critic_width=16,
                          critic_max_width=64).fit(b, a, progress=False)
    normal, lesion = blobs(16, seed=7), blobs(16, seed=7, lesion=True)
    s_normal, _ = det.score(normal)
    s_lesion, maps = det.score(lesion)
    assert np.all(s_lesion > s_normal)  # the same scans, with and without the square
    assert np.all(maps[:, :16, :16].mean((1, 2)) > maps[:, 16:, 16:].mean((1, 2)))
    s_b, _ = det.score(b)
    assert abs(float(s_b.mean())) < 1e-4  # the reference is B's mean verdict


def test_aucp_chooses_the_generator_and_the_critic_of_one_checkpoint(tmp_path):
    det = critic_detector(iterations=30, checkpoint_every=10, selection="aucp").fit(
        blobs(20, seed=1), blobs(20, seed=2, lesion=True), work_dir=tmp_path, progress=False)
    best = load_file(str(tmp_path / "best.safetensors"))
    assert det.train_result.best_step == max(det.train_result.history, key=lambda h: h["metric"])["step"]
    for name in ("generator", "critic"):
        for k, v in det.scoring[name].state_dict().items():
            torch.testing.assert_close(v, best[f"{name}.{k}"], rtol=0, atol=0)
    # the critic that scores is the chosen one, not the last one trained
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["modules"]["critic"]
    if det.train_result.best_step != 30:
        assert any(not torch.equal(v, last[k]) for k, v in det.scoring["critic"].state_dict().items())


def test_save_load_gives_identical_critic_scores_and_maps(tmp_path):
    det = critic_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    x = blobs(5, seed=9)
    s1, m1 = det.score(x)
    model = det.save(tmp_path / "model")
    saved = load_file(str(next(model.glob("*.safetensors"))))
    assert any(k.startswith("critic.") for k in saved) and "critic_reference" in saved
    torch.manual_seed(123)  # a rebuilt critic would differ: the saved one must be loaded
    loaded = Detector.load(model)
    s2, m2 = loaded.score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert np.ptp(s1) > 0


def test_a_critic_model_without_its_reference_is_refused(tmp_path):
    det = critic_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    tensors = det.state_tensors()
    del tensors["critic_reference"]
    with pytest.raises(ScanomalyError, match="reference"):
        critic_detector().load_state_tensors(tensors)


@pytest.mark.parametrize("padding, heatmap", [("zeros", "score"), ("reflect", "mask")])
def test_critic_onnx_export_has_score_and_heatmap_parity(tmp_path, padding, heatmap):
    det = critic_detector(padding=padding, heatmap=heatmap).fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    assert_onnx_parity(det, tmp_path / "model.onnx")


def test_pixel_and_feature_scores_do_not_save_the_critic():
    det = HealthyGAN.from_profile("tiny", {"iterations": 2, "selection": "last"}).fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    assert not any(k.startswith("critic") for k in det.state_tensors())
    scorer = det.scoring_network()
    assert isinstance(scorer, HealthyScorer) and scorer.critic_deficit is None


# -- upsample=nearest ---------------------------------------------------------------------------
def test_nearest_upsampling_has_no_transposed_convolutions_and_keeps_the_shapes():
    gen = MaskedTranslator(1, width=8, residual_blocks=1, upsample="nearest").eval()
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in gen.modules())
    x = blobs(2)
    with torch.no_grad():
        healthy, translation, mask = gen(x)
    assert healthy.shape == translation.shape == x.shape and mask.shape == (2, 1, 32, 32)
    torch.testing.assert_close(healthy, mask * translation + (1 - mask) * x)


@pytest.mark.parametrize("seed", [0, 1])
def test_nearest_upsampling_has_no_column_parity_at_initialisation(seed):
    """The stripes' seed: a transposed convolution makes even and odd columns with different taps, so at
    initialisation a large share of each mask row's power sits at the period-2 frequency (which the zero-one
    term then drives to 0/1 stripes); nearest ups leave almost none there."""
    x = blobs(8, seed=3)

    def period2_share(upsample):
        torch.manual_seed(seed)
        gen = MaskedTranslator(1, width=8, residual_blocks=1, upsample=upsample).eval()
        with torch.no_grad():
            rows = gen(x)[2][:, 0]
        power = torch.fft.rfft(rows - rows.mean(2, keepdim=True), dim=2).abs() ** 2
        return float(power[..., -1].sum() / power[..., 1:].sum())

    assert period2_share("transposed") > 0.1 and period2_share("nearest") < 0.03


# -- padding=reflect ----------------------------------------------------------------------------
def _mask_of(image: torch.Tensor, seed: int, padding: str) -> torch.Tensor:
    torch.manual_seed(seed)
    gen = MaskedTranslator(1, width=8, residual_blocks=1, upsample="nearest", padding=padding).eval()
    with torch.no_grad():
        return gen(image)[2][0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reflect_padding_gives_the_edge_no_mask_of_its_own(seed):
    """The demo's warm band (docs/experiments.md, sections 24 and 26): zero padding tells the pixels near the edge
    where they are, so even a constant scan gets a mask that differs at the edge. Padded by reflection, every layer
    of a constant scan is constant, and so is its mask."""
    constant = torch.full((1, 1, 32, 32), 0.3)
    zeros, reflect = _mask_of(constant, seed, "zeros"), _mask_of(constant, seed, "reflect")
    assert float((zeros[:3].mean() - zeros[8:-8, 8:-8].mean()).abs()) > 1e-3
    assert float(reflect.max() - reflect.min()) < 1e-5


def test_reflect_padding_has_the_same_weights_and_starts_from_the_same_ones():
    """Padding is not a weight: both generators have the same tensors, drawn alike from one seed, so a run with
    either padding starts where the other does, and the saved config (not the weights) says which pads."""
    nets = {}
    for padding in ("zeros", "reflect"):
        torch.manual_seed(0)
        nets[padding] = MaskedTranslator(1, width=8, residual_blocks=2, upsample="nearest", padding=padding).state_dict()
    assert nets["zeros"].keys() == nets["reflect"].keys()
    for key, value in nets["zeros"].items():
        torch.testing.assert_close(nets["reflect"][key], value)


def test_reflect_padding_survives_save_and_load(tmp_path):
    det = critic_detector(upsample="nearest", padding="reflect").fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    scores, maps = det.score(blobs(4, seed=5))
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.config.padding == "reflect"
    assert any(m.padding_mode == "reflect" for m in loaded.generator.modules() if isinstance(m, torch.nn.Conv2d))
    loaded_scores, loaded_maps = loaded.score(blobs(4, seed=5))
    np.testing.assert_array_equal(loaded_scores, scores)
    np.testing.assert_array_equal(loaded_maps, maps)


def test_padding_reaches_the_lite0_generators_decoder_and_an_unknown_one_is_a_clear_error():
    """generator=lite0 with the cpu profile's padding: its trained decoder pads by reflection, its frozen ImageNet
    encoder keeps the zeros it was trained with."""
    det = HealthyGAN.from_profile("tiny", {"padding": "reflect", "generator": "lite0", "encoder_weights": "random"})
    convolutions = [(name, m) for name, m in det.generator.named_modules() if isinstance(m, torch.nn.Conv2d)]
    decoder = [m for name, m in convolutions if not name.startswith("encoder") and any(m.padding)]  # 1 x 1 ones do not pad
    encoder = [m for name, m in convolutions if name.startswith("encoder")]
    assert decoder and all(m.padding_mode == "reflect" for m in decoder)
    assert encoder and all(m.padding_mode == "zeros" for m in encoder)
    for generator in ("stargan", "lite0"):
        with pytest.raises(ScanomalyError, match="padding must be one of"):
            HealthyGAN.from_profile("tiny", {"padding": "circular", "generator": generator, "encoder_weights": "random"})


def test_unknown_upsample_and_score_are_clear_errors():
    with pytest.raises(ScanomalyError, match="upsample"):
        HealthyGAN.from_profile("tiny", {"upsample": "bicubic"})
    with pytest.raises(ScanomalyError, match="score"):
        HealthyGAN.from_profile("tiny", {"score": "critics"})


def test_cpu_profile_upsamples_by_nearest_and_scores_with_a_pretrained_critic():
    """The cpu profile is the variant the pre-registered choices picked (BENCHMARKS.md): no transposed
    convolutions (their parity drew striped masks), a critic on a frozen EfficientNet-Lite0 trunk, the
    critic's deficit and the memory as the score, saved with the model, and a generator padded by reflection."""
    from scanomaly.nn.pretrained_critic import PretrainedPatchCritic

    small = {"width": 8, "residual_blocks": 1, "critic_weights": "random", "iterations": 2, "selection": "last"}
    det = HealthyGAN.from_profile("cpu", small, {"image_size": 32})
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in det.generator.modules())
    convolutions = [m for m in det.generator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.padding_mode == "reflect" for m in convolutions)
    assert isinstance(det.critic, PretrainedPatchCritic)
    det.fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    assert any(k.startswith("critic.head") for k in det.state_tensors())
    assert det.scoring_network().critic_deficit is not None
    assert det.scoring_network().nearest is not None and "healthy_patches" in det.state_tensors()
    assert det.config.score == "critic+nearest" and det.scoring_network().fused_scales is not None


@pytest.mark.filterwarnings("ignore:AUCp checkpoint selection")
def test_fit_reports_how_far_the_critic_tells_b_from_held_out_healthy_scans(monkeypatch):
    """Label-free memorisation check: the AUROC of the saved model's scores, B (0) against the hold-out (1), kept in
    the model's extra state, with a warning at or above CRITIC_MEMORISATION_WARN."""
    from sklearn.metrics import roc_auc_score

    import scanomaly.methods.healthygan as hg

    xb, xa, hold = blobs(12, seed=1), blobs(12, seed=2), blobs(6, seed=3)
    monkeypatch.setattr(hg, "CRITIC_MEMORISATION_WARN", 0.0)  # every value warns
    det = critic_detector(selection="aucp", iterations=6, checkpoint_every=3)
    with pytest.warns(UserWarning, match="learned B itself"):
        det.fit(xb, xa, holdout=hold, progress=False)
    s_b, s_hold = det.score(xb)[0], det.score(hold)[0]
    expected = roc_auc_score(np.r_[np.zeros(len(s_b)), np.ones(len(s_hold))], np.r_[s_b, s_hold])
    assert det.extra_state()["critic_b_vs_holdout_auroc"] == pytest.approx(expected)

    monkeypatch.setattr(hg, "CRITIC_MEMORISATION_WARN", 1.01)  # none does
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*learned B itself")
        critic_detector(selection="aucp", iterations=6, checkpoint_every=3).fit(xb, xa, holdout=hold, progress=False)
    pixel = HealthyGAN.from_profile("tiny", {"selection": "aucp", "iterations": 6, "checkpoint_every": 3})
    assert pixel.fit(xb, xa, holdout=hold, progress=False).extra_state()["critic_b_vs_holdout_auroc"] is None
