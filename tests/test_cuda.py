"""The CUDA path: every method trains and scores on a GPU, at each precision users train with.

Skipped where no CUDA device is present (CI and the 2-core development machine). Run on a lent GPU
machine with `python -m pytest -q tests/test_cuda.py`; the date and result of the last such run are
in BENCHMARKS.md ("The CUDA path").
"""

import numpy as np
import pytest
import torch

from scanomaly.cli import main as cli_main
from scanomaly.detector import Detector, available_methods, get_method

from conftest import blobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAST = {"iterations": 20, "checkpoint_every": 10, "sample_every": 1000}


def tiny_on_cuda(method: str, precision: str = "32", **overrides):
    cls = get_method(method)
    cfg = dict(overrides)
    if hasattr(cls.Config, "iterations"):  # the GANs; PaDiM / PatchCore have no training loop
        cfg = {**FAST, **cfg}
    return cls.from_profile("tiny", cfg, device="cuda", precision=precision)


def fit(det, healthy, unlabeled, work_dir):
    if det.needs_unlabeled:
        return det.fit(healthy, unlabeled, work_dir=work_dir, progress=False)
    return det.fit(healthy, work_dir=work_dir, progress=False)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_scores_and_reloads_on_cuda(method, tmp_path):
    xb, xa = blobs(24, seed=1), torch.cat([blobs(12, seed=2), blobs(6, seed=3, lesion=True)])
    det = fit(tiny_on_cuda(method), xb, xa, tmp_path / "run")
    assert det.device.type == "cuda"
    # the networks really are on the GPU (not only the flag)
    params = [p for m in vars(det).values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert params and all(p.is_cuda for p in params)
    x = torch.cat([blobs(4, seed=9), blobs(4, seed=10, lesion=True)])
    scores, maps = det.score(x)
    assert isinstance(scores, np.ndarray) and scores.shape == (8,) and np.isfinite(scores).all()
    assert maps.shape[0] == 8 and np.isfinite(maps).all()
    # a model trained on a GPU loads and scores on a CPU (weights are saved as float32 CPU tensors)
    det.save(tmp_path / "model")
    on_cpu = Detector.load(tmp_path / "model", device="cpu")
    cpu_scores, _ = on_cpu.score(x)
    np.testing.assert_allclose(cpu_scores, scores, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_healthygan_mixed_precision_training_on_cuda(precision, tmp_path):
    xb, xa = blobs(24, seed=1), torch.cat([blobs(12, seed=2), blobs(6, seed=3, lesion=True)])
    det = tiny_on_cuda("healthygan", precision, iterations=40, lr=1e-3, selection="last")
    det.fit(xb, xa, work_dir=tmp_path / "run", progress=False)
    # weights stay float32 under autocast, and training kept them finite
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in det.generator.parameters())
    scores, maps = det.score(torch.cat([blobs(4, seed=9), blobs(4, seed=10, lesion=True)]))
    assert scores.shape == (8,) and np.isfinite(scores).all()
    assert np.isfinite(maps).all()
    if precision == "16-mixed":  # the GradScaler really ran (its scale is saved in the checkpoint)
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert state.get("scaler") and state["scaler"]["scale"] > 0


def test_healthygan_nearest_heatmap_on_cuda_in_bf16_matches_the_cpu(tmp_path):
    """The bank search runs in float32 under autocast; the model moves between devices with its bank."""
    xb, xa = blobs(24, seed=1), torch.cat([blobs(12, seed=2), blobs(6, seed=3, lesion=True)])
    det = tiny_on_cuda("healthygan", "bf16", critic="lite0", critic_weights="random", score="critic",
                       heatmap="nearest", selection="last")
    det.fit(xb, xa, work_dir=tmp_path / "run", progress=False)
    assert det.healthy_patches.is_cuda and det.healthy_patches.dtype == torch.float32
    x = blobs(4, seed=10, lesion=True)
    scores, maps = det.score(x)
    assert np.isfinite(maps).all() and maps.dtype == np.float32
    det.save(tmp_path / "model")
    _, cpu_maps = Detector.load(tmp_path / "model", device="cpu").score(x)  # float32 on the CPU
    np.testing.assert_allclose(cpu_maps, maps, rtol=0.1, atol=0.1 * float(np.abs(cpu_maps).max()))


def test_kill_and_resume_on_cuda_restores_the_random_state_and_finishes(tmp_path, monkeypatch):
    """A run killed on a GPU resumes there from its checkpoint, which is loaded with map_location=cuda:
    the CPU and CUDA random states it saved come back (as the CPU byte tensors torch requires; a first
    GPU run crashed here) and the run finishes. Weights are not compared bit for bit with an
    uninterrupted run as on a CPU (test_healthygan.py): CUDA kernels here are not deterministic, two
    uninterrupted tiny runs of one seed ended up to 1.4e-3 apart (BENCHMARKS.md, "The CUDA path")."""
    from scanomaly.methods.healthygan import HealthyGANTask

    xb, xa = blobs(20, seed=1), blobs(20, seed=2)
    calls, original = {"n": 0}, HealthyGANTask.loss

    def dying_loss(self, phase, batch):
        calls["n"] += 1
        if calls["n"] > 31:  # in iteration 21, after the checkpoint at 15
            raise KeyboardInterrupt
        return original(self, phase, batch)

    monkeypatch.setattr(HealthyGANTask, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        tiny_on_cuda("healthygan", iterations=30, checkpoint_every=15, selection="last").fit(
            xb, xa, work_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(HealthyGANTask, "loss", original)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 15 and len(saved["rng"]["cuda"]) >= 1

    restored = {}
    set_cpu, set_cuda = torch.set_rng_state, torch.cuda.set_rng_state_all
    monkeypatch.setattr(torch, "set_rng_state", lambda s: (restored.setdefault("cpu", s.clone()), set_cpu(s))[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: (restored.setdefault("cuda", [s.clone() for s in states]), set_cuda(states))[1])
    resumed = tiny_on_cuda("healthygan", iterations=30, checkpoint_every=15, selection="last")
    resumed.fit(xb, xa, work_dir=tmp_path / "run", progress=False)
    assert resumed.train_result.steps == 30
    assert torch.equal(restored["cpu"], saved["rng"]["torch"]) and restored["cpu"].device.type == "cpu"
    assert len(restored["cuda"]) == len(saved["rng"]["cuda"])
    for got, want in zip(restored["cuda"], saved["rng"]["cuda"]):
        assert got.device.type == "cpu" and got.dtype == torch.uint8 and torch.equal(got, want)
    assert all(torch.isfinite(p).all() for p in resumed.generator.parameters())


def test_cli_trains_and_scores_on_cuda_with_mixed_precision(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, n in (("healthy", 12), ("unlabeled", 12)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / sub / f"{i}.png")
    run = tmp_path / "run"
    code = cli_main(["train", "healthygan", "--healthy", str(tmp_path / "healthy"), "--unlabeled", str(tmp_path / "unlabeled"),
                     "--out", str(run), "--profile", "tiny", "--iters", "10", "--device", "cuda", "--precision", "16-mixed"])
    assert code in (0, None), capsys.readouterr().err
    code = cli_main(["score", str(run), str(tmp_path / "unlabeled"), "--out", str(tmp_path / "scores.csv"), "--device", "cuda"])
    assert code in (0, None), capsys.readouterr().err
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(lines) == 13  # header + one row per image
