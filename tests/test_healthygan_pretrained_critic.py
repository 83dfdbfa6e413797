"""HealthyGAN's `critic="lite0"`: a frozen EfficientNet-Lite0 trunk under a trained head (Projected GAN). The trunk
never trains, whatever the loop switches on; gradients reach the pixels through it; the gradient penalty is taken on
its features; the critic scores, saves, loads and exports like the paper's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import HealthyGAN, HealthyGANTask
from scanomaly.nn.pretrained_critic import PretrainedPatchCritic

from conftest import assert_onnx_parity, blobs


def lite0_critic_detector(**overrides) -> HealthyGAN:
    options = {"critic": "lite0", "critic_weights": "random", "score": "critic", "selection": "last", "iterations": 6}
    return HealthyGAN.from_profile("tiny", {**options, **overrides})


def test_the_trunk_stays_frozen_and_the_head_trains():
    det = lite0_critic_detector()
    assert isinstance(det.critic, PretrainedPatchCritic)
    trunk = {k: v.clone() for k, v in det.critic.trunk.state_dict().items()}
    head = {k: v.clone() for k, v in det.critic.head.state_dict().items()}
    det.fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    for k, v in det.critic.trunk.state_dict().items():  # BatchNorm's running statistics included
        torch.testing.assert_close(v, trunk[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, head[k]) for k, v in det.critic.head.state_dict().items())
    det.critic.requires_grad_(True)  # what the training loop does before each critic step
    assert not any(p.requires_grad for p in det.critic.trunk.parameters())
    assert all(p.requires_grad for p in det.critic.head.parameters())
    assert not det.critic.trunk.training  # eval mode, even after the loop's .train()


def test_the_generator_gets_a_gradient_through_the_trunk():
    det = lite0_critic_detector()
    x = blobs(2, seed=3).requires_grad_(True)
    det.critic(x).mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in det.critic.trunk.parameters())


def test_the_gradient_penalty_is_taken_on_the_trunks_features(monkeypatch):
    import scanomaly.methods.healthygan as hg

    det = lite0_critic_detector()
    seen = []
    real_penalty = hg.gradient_penalty
    monkeypatch.setattr(hg, "gradient_penalty", lambda critic, real, fake: seen.append((critic, real.shape)) or real_penalty(critic, real, fake))
    HealthyGANTask(det.generator, det.critic, det.config).loss("critic", {"a": blobs(4, seed=2), "b": blobs(4, seed=1)})
    (judge, shape), = seen
    assert judge == det.critic.judge
    assert shape == (4, 40 + 112, 8, 8)  # stage3 + stage5 at twice the 32 px image: a 64 px input, stride 8


def test_save_load_gives_identical_scores_and_keeps_the_saved_trunk(tmp_path):
    det = lite0_critic_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    x = blobs(5, seed=9)
    s1, m1 = det.score(x)
    model = det.save(tmp_path / "model")
    torch.manual_seed(123)  # a rebuilt random trunk would differ: the saved one must be loaded
    loaded = Detector.load(model)
    s2, m2 = loaded.score(x)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert m1.shape == (5, 32, 32) and np.ptp(s1) > 0


def test_onnx_export_has_score_and_heatmap_parity(tmp_path):
    det = lite0_critic_detector().fit(blobs(8, seed=1), blobs(8, seed=2), progress=False)
    assert_onnx_parity(det, tmp_path / "model.onnx")


def test_unknown_critic_is_a_clear_error():
    with pytest.raises(ScanomalyError, match="critic must be"):
        HealthyGAN.from_profile("tiny", {"critic": "resnet"})
