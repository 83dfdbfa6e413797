"""HealthyGAN's `mask_target`: the mask is taught, by binary cross-entropy, the probability that a pixel is not healthy
by the nearest-patch memory. The loss's optimum is the target itself; the target is calibrated on held-out healthy
scans and marks a pasted lesion; a fit with it teaches the mask where the lesion is; a bad setting is a clear error."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import scanomaly.methods.healthygan as hg
from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import HealthyGAN, MaskTarget, NearestHealthyPatch, mask_target_loss

from conftest import blobs


def mask_target_detector(**overrides) -> HealthyGAN:
    options = {"critic": "lite0", "critic_weights": "random", "score": "critic", "heatmap": "nearest",
               "selection": "last", "iterations": 6, "mask_target": 10.0}
    return HealthyGAN.from_profile("tiny", {**options, **overrides})


@pytest.mark.parametrize("target", [0.02, 0.3, 0.8])
def test_the_loss_is_lowest_where_the_mask_equals_its_target(target):
    t = torch.full((2, 1, 4, 4), target)
    losses = {m: float(mask_target_loss(torch.full_like(t, m), t)) for m in (target - 0.01, target, target + 0.01)}
    assert losses[target] < losses[target - 0.01] and losses[target] < losses[target + 0.01]
    assert float(mask_target_loss(torch.zeros_like(t), t)) < 10 * 4  # M = 0 or 1 is clamped: finite, no NaN


def test_the_target_is_calibrated_on_held_out_healthy_scans_and_marks_a_pasted_lesion():
    det = mask_target_detector()
    nearest = NearestHealthyPatch(det.critic, det.healthy_patch_bank(blobs(16, seed=1)))
    target = MaskTarget(nearest, blobs(8, seed=5))
    held_out = target(blobs(8, seed=5))
    assert held_out.shape == (8, 1, 32, 32) and float(held_out.min()) >= 0 and float(held_out.max()) <= 1
    # by construction: 0.5 at the 99th percentile, 0.1 at the 90th, of the held-out healthy pixels
    assert float((held_out > 0.5).float().mean()) == pytest.approx(0.01, abs=0.003)
    assert float((held_out > 0.1).float().mean()) == pytest.approx(0.10, abs=0.01)
    lesion = target(blobs(8, seed=7, lesion=True))[:, 0]
    inside, opposite = lesion[:, 8:16, 8:16].mean((1, 2)), lesion[:, 20:28, 20:28].mean((1, 2))
    assert torch.all(inside > 0.9) and torch.all(inside > opposite) and float(opposite.mean()) < 0.5


def test_a_fit_teaches_the_mask_its_target(tmp_path):
    """B: healthy blobs; A: blobs with a bright square at rows and columns 8-15. With the target term the trained mask
    ends near the target (the memory's probability, rebuilt here from the fit's own bank and held-out scans), and
    open inside the square; the paper's losses alone, at the same seed, end far from it."""
    healthy, lesions = blobs(24, seed=1), blobs(24, seed=2, lesion=True)
    x = blobs(8, seed=9, lesion=True)
    error, masks = {}, {}
    for weight in (10.0, 0.0):
        det = mask_target_detector(iterations=100, lr=1e-3, seed=2, mask_target=weight)
        det.fit(healthy, lesions, work_dir=tmp_path / str(weight), progress=False)
        _, held = hg.split_off_indices(len(healthy), det.config.holdout_fraction, det.config.seed)
        target = MaskTarget(NearestHealthyPatch(det.critic, det.healthy_patches), healthy[held])(x)
        with torch.no_grad():
            masks[weight] = det.scoring_generator.eval()(x)[2]
        error[weight] = float((masks[weight] - target).abs().mean())
    assert error[10.0] < 0.5 * error[0.0]
    gap = {w: float(m[:, 0, 8:16, 8:16].mean() - m[:, 0, 20:, 20:].mean()) for w, m in masks.items()}
    assert gap[10.0] > 0.5 and gap[10.0] > gap[0.0] + 0.3  # open on the square, shut in the opposite corner
    with open(tmp_path / "10.0" / "losses.csv") as f:
        assert "G/mask_target" in next(csv.DictReader(f))
    with open(tmp_path / "0.0" / "losses.csv") as f:
        assert "G/mask_target" not in next(csv.DictReader(f))


def test_the_generator_loss_adds_the_weighted_target_term():
    det = mask_target_detector()
    target = MaskTarget(NearestHealthyPatch(det.critic, det.healthy_patch_bank(blobs(8, seed=1))), blobs(4, seed=5))
    batch = {"a": blobs(4, seed=2, lesion=True), "b": blobs(4, seed=1)}
    torch.manual_seed(0)
    with_target, logs = hg.HealthyGANTask(det.generator, det.critic, det.config, target).loss("generator", batch)
    without, _ = hg.HealthyGANTask(det.generator, det.critic, det.config).loss("generator", batch)
    expected = mask_target_loss(det.generator(batch["a"])[2], target(batch["a"]))
    assert logs["G/mask_target"] == pytest.approx(float(expected), rel=1e-5)
    assert float(with_target - without) == pytest.approx(10.0 * float(expected), rel=1e-4)


def test_without_the_memory_or_held_out_scans_it_is_a_clear_error(tmp_path):
    with pytest.raises(ScanomalyError, match="mask_target=10.0 uses the nearest-patch memory"):
        mask_target_detector(critic="patch", heatmap="score")
    with pytest.raises(ScanomalyError, match="calibrates the memory on healthy scans held out"):
        mask_target_detector().fit(blobs(1, seed=1), blobs(4, seed=2), work_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the first step


def test_a_model_trained_with_the_target_scores_and_saves_as_any_other(tmp_path):
    det = mask_target_detector().fit(blobs(10, seed=1), blobs(8, seed=2, lesion=True), progress=False)
    x = blobs(4, seed=3, lesion=True)
    s1, m1 = det.score(x)
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.config.mask_target == 10.0
    s2, m2 = loaded.score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
