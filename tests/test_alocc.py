import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scanomaly.data import ImageRecord, load_images
from scanomaly.detector import Detector
from scanomaly.errors import ScanomalyError
from scanomaly.methods.alocc import (
    ALOCC,
    ALOCCTask,
    Discriminator,
    Reconstructor,
    add_noise,
    adversarial_loss,
    anomaly_map,
    discriminator_loss,
    one_minus_d,
    reconstruction_loss,
)

from conftest import blobs

REAL_NORMALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "train" / "normal"


def tiny(**overrides):
    return ALOCC.from_profile("tiny", overrides)


# -- networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 64), (1, 48)])
def test_network_shapes(channels, size):
    x = torch.rand(3, channels, size, size) * 2 - 1
    r = Reconstructor(channels, 4, 4)
    out = r(x)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert r.encoder(x).shape == (3, 32, size // 8, size // 8)  # S/8 bottleneck of width 8w
    d = Discriminator(channels, size, 4)
    assert d(x).shape == (3,)
    assert torch.allclose(d.probability(x), torch.sigmoid(d(x)))


def test_paper_networks_match_the_public_code():
    r, d = Reconstructor(1, 16, 16), Discriminator(1, 32, 16)
    assert [m.out_channels for m in r.encoder if isinstance(m, torch.nn.Conv2d)] == [32, 64, 128]
    assert [m.out_channels for m in r.decoder if isinstance(m, torch.nn.ConvTranspose2d)] == [32, 16, 1]
    assert [m.out_channels for m in d.features if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64, 128]
    assert all(m.kernel_size == (5, 5) for m in [*r.modules(), *d.modules()] if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    assert not isinstance(d.features[1], torch.nn.BatchNorm2d)  # no BN on D's first layer


# -- noise and losses on hand-made tensors ---------------------------------------------------
def test_noise_is_converted_to_the_minus1_1_range():
    torch.manual_seed(0)
    x = torch.zeros(200_000)
    noisy = add_noise(x, 0.155)  # σ = 0.155 of the [0, 1] range is 0.31 of our [-1, 1] range
    assert noisy.std().item() == pytest.approx(0.31, rel=0.01)
    assert abs(noisy.mean().item()) < 0.01
    assert torch.equal(add_noise(x, 0.0), x)


def test_loss_terms():
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2 * math.log(2))
    assert discriminator_loss(torch.full((4,), 30.0), torch.full((4,), -30.0)).item() < 1e-10
    assert adversarial_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))
    assert adversarial_loss(torch.full((4,), 30.0)).item() < 1e-10  # D calls the reconstruction healthy: no loss
    x, x_rec = torch.tensor([[[[1.0, -1.0]]]]), torch.tensor([[[[0.0, -1.0]]]])
    assert reconstruction_loss(x, x_rec).item() == pytest.approx(0.5)  # (1² + 0²) / 2
    assert anomaly_map(x, x_rec).tolist() == [[[1.0, 0.0]]]


def test_one_minus_d_does_not_tie_when_d_saturates():
    logits = torch.tensor([0.0, 20.0, 21.0, -5.0])
    s = one_minus_d(logits)
    assert s.dtype == torch.float64 and s[0].item() == pytest.approx(0.5)
    assert s[1] > s[2] > 0  # 1 − sigmoid(20) and 1 − sigmoid(21) differ (they tie in float32 as 1 − D)
    assert s[3].item() == pytest.approx(1 - 1 / (1 + math.exp(5)))


def test_reconstructor_loss_weights_l2_by_lambda():
    det = tiny()
    task = ALOCCTask(det.reconstructor, det.discriminator, det.config)
    loss, logs = task.loss("reconstructor", {"x": blobs(4)})
    assert loss.item() == pytest.approx(logs["R/adv"] + 0.4 * logs["R/rec"], rel=1e-5)
    d_loss, d_logs = task.loss("discriminator", {"x": blobs(4)})
    assert d_loss.item() == pytest.approx(d_logs["D/loss"])


# -- detector ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reconstructed", "input"])
def test_score_modes(mode):
    det = tiny(score_mode=mode)
    x = blobs(3)
    scores, maps = det.score(x)
    det.reconstructor.eval()
    det.discriminator.eval()
    with torch.no_grad():
        x_rec = det.reconstructor(x)
        d = det.discriminator.probability(x_rec if mode == "reconstructed" else x).double()
    np.testing.assert_allclose(scores, (1 - d).numpy(), rtol=1e-6)
    np.testing.assert_allclose(maps, (x - x_rec).abs().mean(1).numpy(), rtol=1e-6)


def test_config_errors():
    with pytest.raises(ScanomalyError, match="score_mode"):
        tiny(score_mode="nope")
    with pytest.raises(ScanomalyError, match="multiple of 16"):
        ALOCC.from_profile("tiny", preprocessing_overrides={"image_size": 40})
    with pytest.raises(ScanomalyError, match="at least one"):
        tiny().fit(torch.zeros(0, 1, 32, 32))


def test_input_score_mode_survives_save_and_load(tmp_path):
    # the default mode's fit, score and save -> load are checked in test_conformance.py
    det = tiny(score_mode="input").fit(blobs(12, seed=1), work_dir=tmp_path / "run", progress=False)
    x = blobs(5, seed=9)
    loaded = Detector.load(det.save(tmp_path / "model"))
    assert loaded.config.score_mode == "input"
    np.testing.assert_array_equal(det.score(x)[0], loaded.score(x)[0])


def test_tiny_end_to_end_on_real_chest_xrays():
    if not REAL_NORMALS.is_dir():
        pytest.skip(f"real chest X-rays not found at {REAL_NORMALS} (expected ../shared/data beside the repository)")
    det = tiny()
    files = sorted(REAL_NORMALS.glob("*.png"))[:24]
    images = load_images([ImageRecord(str(f)) for f in files], det.preprocessing, progress=False)
    assert len(images) == 24
    det.fit(images.subset(range(16)), progress=False)
    scores, maps = det.score(images.subset(range(16, 24)))
    assert scores.shape == (8,) and maps.shape == (8, 32, 32)
    assert np.isfinite(scores).all() and np.isfinite(maps).all() and ((scores >= 0) & (scores <= 1)).all()
