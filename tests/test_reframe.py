"""Random re-framing (zoom and shift) of training batches: `frame_jitter` in the shared GAN loop."""

import pytest
import torch

from scanomaly.errors import ScanomalyError
from scanomaly.methods.healthygan import HealthyGAN
from scanomaly.training.loop import BatchStream, reframe

from conftest import blobs


def _column(size=20, at=10):
    x = torch.zeros(1, 1, size, size)
    x[..., :, at] = 1.0
    return x


def test_reframe_with_central_draws_is_the_identity():
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(reframe(x, torch.full((3, 3), 0.5), 0.2), x, rtol=0, atol=1e-6)


def test_reframe_shifts_by_the_jitter_fraction_of_the_image():
    # the largest shift to one side: 0.1 of a 20-pixel image moves the content by 2 pixels
    right = reframe(_column(), torch.tensor([[0.5, 0.0, 0.5]]), 0.1)
    left = reframe(_column(), torch.tensor([[0.5, 1.0, 0.5]]), 0.1)
    assert int(right[0, 0, 5].argmax()) == 12 and int(left[0, 0, 5].argmax()) == 8
    down = reframe(_column().transpose(-1, -2), torch.tensor([[0.5, 0.5, 0.0]]), 0.1)
    assert int(down[0, 0, :, 5].argmax()) == 12


def test_reframe_zooms_by_up_to_the_jitter_fraction():
    square = torch.zeros(2, 1, 20, 20)
    square[..., 5:15, 5:15] = 1.0  # 100 pixels, centred
    zoomed = reframe(square, torch.tensor([[1.0, 0.5, 0.5], [0.0, 0.5, 0.5]]), 0.1)
    in_, out = zoomed.flatten(1).sum(1)
    assert in_ == pytest.approx(100 * 1.1**2, rel=0.02) and out == pytest.approx(100 * 0.9**2, rel=0.02)


def test_batch_stream_without_jitter_is_unchanged_and_with_it_resumes_exactly():
    data = {"a": blobs(10, seed=3), "b": blobs(7, seed=4)}
    plain, zero = BatchStream(data, 4, seed=7, hflip=True), BatchStream(data, 4, seed=7, hflip=True, frame_jitter=0.0)
    jittered = BatchStream(data, 4, seed=7, hflip=True, frame_jitter=0.1)
    for _ in range(3):
        p, z, j = plain.next(), zero.next(), jittered.next()
        torch.testing.assert_close(z["a"], p["a"], rtol=0, atol=0)
        assert not torch.allclose(j["a"], p["a"])  # re-framed
        assert j["a"].min() >= -1 and j["a"].max() <= 1  # interpolation stays in the data's range
    state = jittered.state_dict()
    expected = [jittered.next() for _ in range(3)]  # crosses an epoch boundary of both sets
    resumed = BatchStream(data, 4, seed=123, hflip=True, frame_jitter=0.1)
    resumed.load_state_dict(state)
    for e in expected:
        r = resumed.next()
        for k in data:
            torch.testing.assert_close(r[k], e[k], rtol=0, atol=0)


@pytest.mark.parametrize("jitter", [-0.1, 0.5])
def test_out_of_range_jitter_is_a_clear_error(jitter):
    with pytest.raises(ScanomalyError, match="frame_jitter"):
        BatchStream({"a": blobs(4, seed=1)}, 2, seed=0, hflip=False, frame_jitter=jitter)


def test_healthygan_config_reaches_the_batches():
    xb, xa = blobs(12, seed=1), blobs(12, seed=2)
    cfg = {"iterations": 6, "checkpoint_every": 6, "sample_every": 1000, "selection": "last"}
    plain = HealthyGAN.from_profile("tiny", cfg).fit(xb, xa, progress=False)
    jittered = HealthyGAN.from_profile("tiny", {**cfg, "frame_jitter": 0.1}).fit(xb, xa, progress=False)
    a, b = plain.generator.state_dict(), jittered.generator.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed, other batches: other weights
