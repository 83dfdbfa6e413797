"""The contract every detector meets, checked the same way for each (as scikit-learn's check_estimator):
fit on a tiny set returns the detector; scores are one finite float per image, maps one finite float32 map per
image at the model's size, the reconstruction (where a method has one) one image per image; scores differ
between images (a detector that scores everything alike detects nothing); scoring is deterministic and leaves
its input alone; and a saved model loads back as the same method, with the same settings, scoring identically.
Method-specific behaviour stays in each method's own test file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanomaly.detector import Detector, available_methods, get_method

from conftest import MeanDetector, blobs, registered


def tiny_images(det: Detector, n: int, seed: int, lesion: bool = False) -> torch.Tensor:
    """n synthetic scans at the detector's size and channels, in [-1, 1]."""
    p = det.preprocessing
    return blobs(n, size=p.image_size, seed=seed, lesion=lesion).repeat(1, p.channels, 1, 1)


def check_detector(make, tmp_path) -> None:
    """Raise AssertionError where the detector `make()` builds breaks the contract (the module docstring)."""
    det = make()
    healthy = tiny_images(det, 12, seed=1)
    unlabeled = torch.cat([tiny_images(det, 8, seed=2), tiny_images(det, 4, seed=3, lesion=True)])
    images = torch.cat([tiny_images(det, 3, seed=4), tiny_images(det, 3, seed=5, lesion=True)])
    n, size = len(images), det.preprocessing.image_size

    fitted = det.fit(healthy, unlabeled if det.needs_unlabeled else None, work_dir=tmp_path / "train", progress=False)
    assert fitted is det, "fit must return the detector"
    before = images.clone()
    scores, maps = det.score(images, batch_size=4)
    assert torch.equal(images, before), "score changed its input"
    scores, maps = np.asarray(scores), np.asarray(maps)
    assert scores.shape == (n,) and np.issubdtype(scores.dtype, np.floating), f"scores: {scores.shape} {scores.dtype}"
    assert maps.shape == (n, size, size) and maps.dtype == np.float32, f"maps: {maps.shape} {maps.dtype}"
    assert np.isfinite(scores).all() and np.isfinite(maps).all(), "scores and maps must be finite"
    assert np.ptp(scores) > 0, "constant scores: every image scores alike"
    again, maps_again = det.score(images, batch_size=4)
    np.testing.assert_array_equal(scores, again, err_msg="scoring twice gave other scores")
    np.testing.assert_array_equal(maps, maps_again, err_msg="scoring twice gave other maps")
    reconstruction = det.reconstruct(images[:2])
    if reconstruction is not None:
        assert np.asarray(reconstruction).shape == (2, *images.shape[1:]), "one reconstruction per image"

    loaded = Detector.load(det.save(tmp_path / "model"))
    assert type(loaded) is type(det) and loaded.config == det.config and loaded.preprocessing == det.preprocessing
    loaded_scores, loaded_maps = loaded.score(images, batch_size=4)
    np.testing.assert_array_equal(scores, loaded_scores, err_msg="the loaded model scores otherwise")
    np.testing.assert_array_equal(maps, loaded_maps, err_msg="the loaded model maps otherwise")


BUILT_IN = [m for m in available_methods() if not m.startswith("_") and "tiny" in get_method(m).profiles]


@pytest.mark.parametrize("method", BUILT_IN)
def test_every_detector_meets_the_contract(method, tmp_path):
    check_detector(lambda: get_method(method).from_profile("tiny"), tmp_path)


def test_the_contract_covers_every_built_in_method():
    assert {"healthygan", "anogan", "fanogan", "ganomaly", "alad", "alocc", "padim", "patchcore"} <= set(BUILT_IN)


class ConstantDetector(MeanDetector):
    """Fits, saves and loads like the fake method, but scores every image 0."""

    name = "_test_constant"

    def score(self, images, batch_size: int = 64):
        _, maps = super().score(images, batch_size)
        return np.zeros(len(maps)), maps


def test_the_contract_passes_the_fake_method_and_fails_a_constant_detector(tmp_path):
    with registered(MeanDetector, ConstantDetector):
        check_detector(lambda: MeanDetector.from_profile("tiny"), tmp_path / "mean")
        with pytest.raises(AssertionError, match="constant scores"):
            check_detector(lambda: ConstantDetector.from_profile("tiny"), tmp_path / "constant")
