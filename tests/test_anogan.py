from pathlib import Path

import numpy as np
import pytest
import torch

from scanomaly.data import discover, load_images
from scanomaly.detector import anomaly_map
from scanomaly.errors import ScanomalyError
from scanomaly.methods.anogan import (
    AnoGAN,
    AnoGANTask,
    Discriminator,
    Generator,
    discrimination_loss,
    discriminator_loss,
    generator_loss,
    latent_search,
    mapping_loss,
    residual_loss,
    sample_latent,
)

from conftest import blobs

REAL_NORMALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "train" / "normal"


def tiny(**overrides):
    return AnoGAN.from_profile("tiny", overrides)


def frozen_pair(size=32, seed=0):
    torch.manual_seed(seed)
    return Generator(16, 1, size, 8, 32).eval(), Discriminator(1, size, 8, 32).eval()


# -- networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size,feature_channels", [(32, 32), (64, 64)])
def test_network_shapes(size, feature_channels):
    g, d = Generator(100, 1, size, 8, 64), Discriminator(1, size, 8, 64)
    z = sample_latent(3, 100)
    assert z.min() >= -1 and z.max() <= 1
    x = g(z)
    assert x.shape == (3, 1, size, size) and x.abs().max() <= 1
    assert d(x).shape == (3, 1)
    feats = d.features(x)
    assert feats.shape == (3, feature_channels * 4 * 4)  # the last 4 x 4 map; widths double from 8 per halving


# -- losses on hand-made tensors -----------------------------------------------------------
def test_gan_losses_at_even_odds():
    zero = torch.zeros(4, 1)
    # D(x) = sigmoid(0) = 1/2 everywhere: −log ½ − log ½ for D, −log ½ for G
    assert discriminator_loss(zero, zero).item() == pytest.approx(2 * np.log(2))
    assert generator_loss(zero).item() == pytest.approx(np.log(2))
    confident = torch.full((4, 1), 20.0)
    assert discriminator_loss(confident, -confident).item() == pytest.approx(0.0, abs=1e-6)


def test_mapping_loss_is_per_image_weighted_sum():
    x = torch.zeros(2, 1, 2, 2)
    g = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, -1.0], [1.0, -1.0]]]])
    fx, fg = torch.zeros(2, 3), torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    assert residual_loss(x, g).tolist() == [1.0, 4.0]  # Σ|x − G(z)|, per image
    assert discrimination_loss(fx, fg).tolist() == [0.0, 2.0]
    torch.testing.assert_close(mapping_loss(x, g, fx, fg, lam=0.1), torch.tensor([0.9 * 1, 0.9 * 4 + 0.1 * 2]))
    assert anomaly_map(x, g).shape == (2, 2, 2)
    assert anomaly_map(x, g)[1].tolist() == [[1.0, 1.0], [1.0, 1.0]]


# -- the latent search ---------------------------------------------------------------------------
def test_search_lowers_the_loss_of_every_image():
    g, d = frozen_pair()
    x = blobs(5, seed=3)
    start = latent_search(g, d, x, steps=0)
    end = latent_search(g, d, x, steps=25, lr=0.05)
    assert (end.loss < start.loss).all(), (start.loss, end.loss)
    assert end.z.shape == (5, 16) and end.generated.shape == x.shape
    assert end.z.abs().max() <= 1  # kept in the prior's support
    assert end.steps.tolist() == [25] * 5
    # the score is L at the returned z, recomputed
    torch.testing.assert_close(end.loss, mapping_loss(x, g(end.z), d.features(x), d.features(g(end.z)), 0.1))


def test_search_is_independent_per_image():
    g, d = frozen_pair()
    x = blobs(4, seed=3)
    batch = latent_search(g, d, x, steps=20, lr=0.05)
    alone = latent_search(g, d, x[:1], steps=20, lr=0.05)  # the same starting point: shared, seeded
    torch.testing.assert_close(batch.z[0], alone.z[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch.loss[0], alone.loss[0], rtol=1e-6, atol=1e-4)

    # other images (and their early stops) do not change image 0's path at all
    other = x.clone()
    other[1:] = blobs(3, seed=11)
    a = latent_search(g, d, x, steps=20, lr=0.05, tol=0.2, patience=5)
    b = latent_search(g, d, other, steps=20, lr=0.05, tol=0.2, patience=5)
    assert torch.equal(a.z[0], b.z[0]) and a.steps[0] == b.steps[0]


def test_restarts_keep_the_best_per_image_and_early_stop_saves_steps():
    g, d = frozen_pair()
    x = blobs(3, seed=5)
    one = latent_search(g, d, x, steps=10, restarts=1)
    three = latent_search(g, d, x, steps=10, restarts=3)
    assert (three.loss <= one.loss + 1e-3).all()  # restart 0 of the three is the single run's start
    stopped = latent_search(g, d, x, steps=40, tol=0.5, patience=5)  # a gain of 50% per 5 steps: stop at once
    assert (stopped.steps < 40).all()


def test_search_refuses_training_mode():
    g, d = frozen_pair()
    with pytest.raises(ScanomalyError, match="eval mode"):
        latent_search(g.train(), d, blobs(2), steps=1)


def test_search_is_seeded():
    g, d = frozen_pair()
    x = blobs(2)
    a, b = latent_search(g, d, x, steps=5, seed=1), latent_search(g, d, x, steps=5, seed=1)
    c = latent_search(g, d, x, steps=5, seed=2)
    assert torch.equal(a.z, b.z) and not torch.equal(a.z, c.z)


# -- training and the detector -------------------------------------------------------------------
def test_task_phases_and_losses_are_finite():
    det = tiny()
    task = AnoGANTask(det.generator, det.discriminator, det.config)
    assert [p.name for p in task.phases()] == ["discriminator", "generator"]
    for phase in ("discriminator", "generator"):
        loss, logs = task.loss(phase, {"x": blobs(4)})
        assert torch.isfinite(loss) and logs


def test_fit_writes_checkpoint_and_losses(tmp_path):
    # fit, score and save -> load are checked for every method in test_conformance.py
    tiny().fit(blobs(16, seed=1), work_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "losses.csv").is_file()


def test_bad_config_is_refused():
    with pytest.raises(ScanomalyError, match="search_lambda"):
        tiny(search_lambda=1.5)


def test_tiny_end_to_end_on_real_images(tmp_path):
    if not REAL_NORMALS.is_dir():
        pytest.skip(f"real chest X-rays not found at {REAL_NORMALS} (../shared/data beside the repository)")
    det = tiny()
    images = load_images(discover(REAL_NORMALS)[:24], det.preprocessing, progress=False)
    det.fit(images.subset(range(16)), work_dir=tmp_path, progress=False)
    scores, maps = det.score(images.subset(range(16, 24)))
    assert scores.shape == (8,) and np.isfinite(scores).all() and np.isfinite(maps).all()
