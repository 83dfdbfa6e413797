import math
from pathlib import Path

import numpy as np
import pytest
import torch

from scanomaly.data import ImageRecord, load_images
from scanomaly.errors import ScanomalyError
from scanomaly.methods.ganomaly import (
    Discriminator,
    GANomaly,
    GANomalyTask,
    Generator,
    adversarial_loss,
    anomaly_map,
    contextual_loss,
    discriminator_loss,
    encoder_loss,
    latent_score,
)

from conftest import blobs

REAL_NORMALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia" / "train" / "normal"


def tiny(**overrides):
    return GANomaly.from_profile("tiny", overrides)


# -- networks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 32), (3, 64)])
def test_generator_and_discriminator_shapes(channels, size):
    g = Generator(channels, size, latent=10, width=8, max_width=32)
    x = torch.rand(3, channels, size, size) * 2 - 1
    x_hat, z, z_hat = g(x)
    assert x_hat.shape == x.shape and z.shape == (3, 10) and z_hat.shape == (3, 10)
    assert x_hat.min() >= -1 and x_hat.max() <= 1  # tanh output
    d = Discriminator(channels, size, width=8, max_width=32)
    logits, feats = d(x)
    assert logits.shape == (3,) and feats.shape[0] == 3 and feats.shape[2:] == (4, 4)  # features before the last conv
    assert torch.allclose(d.probability(x), torch.sigmoid(logits))


def test_paper_networks_match_the_official_code():
    """32 px, width 64, latent 100: encoder convs 64-128-256-100, no biases; D = encoder shape with one output."""
    g = Generator(3, 32)
    widths = [m.out_channels for m in g.encoder if isinstance(m, torch.nn.Conv2d)]
    assert widths == [64, 128, 256, 100]
    convs = [m for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert all(c.bias is None for c in convs)
    d = Discriminator(3, 32)
    assert [m.out_channels for m in d.modules() if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 1]


def test_image_size_must_suit_the_dcgan_stacks():
    with pytest.raises(ScanomalyError, match="image_size"):
        GANomaly.from_profile("tiny", preprocessing_overrides={"image_size": 48})


# -- losses on hand-made tensors -----------------------------------------------------------
def test_loss_terms():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert adversarial_loss(a, b).item() == pytest.approx(2.0)  # (0² + 2²) / 2
    assert encoder_loss(a, b).item() == pytest.approx(2.0)
    assert contextual_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(1.0)
    assert contextual_loss(torch.tensor([[[[0.5, -0.5]]]]), torch.zeros(1, 1, 1, 2)).item() == pytest.approx(0.5)
    # logits 0 = probability 1/2 for both: (log 2 + log 2) / 2
    assert discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(math.log(2))
    # a discriminator that is right with certainty has (almost) no loss
    assert discriminator_loss(torch.full((4,), 30.0), torch.full((4,), -30.0)).item() < 1e-10


def test_score_and_map():
    z, z_hat = torch.tensor([[0.0, 0.0], [1.0, 3.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert latent_score(z, z_hat).tolist() == [0.0, 2.5]  # mean over latent dimensions of (z − ẑ)²
    x, x_hat = torch.ones(1, 3, 1, 2), torch.tensor([[[[1.0, -1.0]]] * 3]).reshape(1, 3, 1, 2)
    assert anomaly_map(x, x_hat).tolist() == [[[0.0, 2.0]]]


def test_generator_loss_is_weighted_sum_1_50_1():
    det = tiny()
    task = GANomalyTask(det.generator, det.discriminator, det.config)
    x = blobs(4)
    torch.manual_seed(0)
    loss, logs = task.loss("generator", {"x": x})
    assert loss.item() == pytest.approx(logs["G/adv"] + 50 * logs["G/con"] + logs["G/enc"], rel=1e-5)
    # the discriminator phase reuses the generator phase's x̂ for the same batch, and works on its own
    assert task._fake[0] is x
    d_loss, d_logs = task.loss("discriminator", {"x": x})
    assert task._fake is None and d_logs["D/loss"] == pytest.approx(d_loss.item())
    assert torch.isfinite(task.loss("discriminator", {"x": x})[0])


# -- the discriminator re-initialisation -------------------------------------------------------
def test_collapsed_discriminator_is_reinitialised():
    det = tiny()
    task = GANomalyTask(det.generator, det.discriminator, det.config)
    before = {k: v.clone() for k, v in det.discriminator.state_dict().items()}
    logs = {"D/loss": 0.3, "D/reinit": 0.0}
    task.after_step("discriminator", logs)  # a healthy loss: nothing happens
    assert task.reinitialisations == 0 and logs["D/reinit"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in det.discriminator.state_dict().items())

    logs = {"D/loss": 1e-7, "D/reinit": 0.0}  # collapsed below 1e-5
    task.after_step("discriminator", logs)
    assert task.reinitialisations == 1 and logs["D/reinit"] == 1.0
    w = det.discriminator.features[0].weight
    assert not torch.equal(before["features.0.weight"], w)
    assert abs(w.std().item() - 0.02) < 0.005  # redrawn from DCGAN's N(0, 0.02)
    task.after_step("generator", {"D/loss": 0.0})  # only the discriminator phase counts
    assert task.reinitialisations == 1


def test_reinitialisation_during_training_is_counted_and_logged(tmp_path):
    # a threshold above any BCE value makes every discriminator step count as a collapse
    det = tiny(iterations=6, reinit_threshold=100.0, checkpoint_every=3).fit(blobs(8), work_dir=tmp_path, progress=False)
    assert det.extra_state()["discriminator_reinitialisations"] == 6
    header, *rows = (tmp_path / "losses.csv").read_text().splitlines()
    col = header.split(",").index("D/reinit")
    assert [float(r.split(",")[col]) for r in rows] == [1.0]


def test_forced_collapse_inside_the_training_loop_reinitialises(monkeypatch):
    """The loop hands each phase's logs to `after_step` after the optimizer step: a discriminator
    reporting a loss below 1e-5 is re-initialised there, in the middle of training."""
    det = tiny(iterations=2)
    task = GANomalyTask(det.generator, det.discriminator, det.config)
    original = GANomalyTask.loss

    def collapsing(self, phase, batch):
        loss, logs = original(self, phase, batch)
        if phase == "discriminator":
            logs["D/loss"] = 1e-6  # what a discriminator that separates x from x̂ perfectly reports
        return loss, logs

    monkeypatch.setattr(GANomalyTask, "loss", collapsing)
    from scanomaly.training.loop import GANTrainer, LoopConfig

    before = det.discriminator.features[0].weight.clone()
    GANTrainer(task, {"x": blobs(8)}, LoopConfig(iterations=2, batch_size=4), progress=False).fit()
    assert task.reinitialisations == 2
    assert not torch.equal(before, det.discriminator.features[0].weight)


# -- detector ----------------------------------------------------------------------------------
def test_fit_writes_sample_grids(tmp_path):
    # fit, score and save -> load are checked for every method in test_conformance.py
    tiny().fit(blobs(12, seed=1), work_dir=tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_empty_training_set_is_refused():
    with pytest.raises(ScanomalyError, match="at least one"):
        tiny().fit(torch.zeros(0, 1, 32, 32))


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
    assert np.isfinite(scores).all() and np.isfinite(maps).all() and (scores >= 0).all()
