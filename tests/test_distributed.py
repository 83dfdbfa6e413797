"""Data-parallel training with torch.distributed (gloo, 2 CPU processes launched by torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import blobs
from scanomaly import cli, distributed
from scanomaly.training.loop import BatchStream

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def torchrun(nproc: int, *args, check=True, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted 1-process and 2-process run of the same tiny HealthyGAN (global batch 4), and a
    1-process run whose gradients change by about one float32 rounding (relative EPS32) at every step."""
    root = tmp_path_factory.mktemp("ddp")
    torchrun(1, WORKER, root / "one")
    torchrun(2, WORKER, root / "two")
    torchrun(1, WORKER, root / "rounded", "--gradient-noise", EPS32)
    return root


def _close(a: dict, b: dict, atol: float, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def test_ranks_end_with_identical_weights(runs):
    r0, r1 = load_file(runs / "two" / "rank0.safetensors"), load_file(runs / "two" / "rank1.safetensors")
    _close(r0, r1, atol=0, rtol=0)


def _distance(a: dict, b: dict) -> float:
    """The L2 distance between two sets of weights, all tensors together."""
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)) ** 0.5


def _largest_differences(a: dict, b: dict, n: int = 3) -> str:
    worst = sorted(((float((a[k] - b[k]).abs().max()), k) for k in a), reverse=True)[:n]
    return ", ".join(f"{k}: {d:.3g}" for d, k in worst)


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    # same samples, flips, interpolation weights (gradient penalty) and learning rates: only the
    # order of float additions differs (each rank sums the gradients of its half of the batch, then
    # the halves are averaged). How far that can move the weights is not a fixed number: Adam turns a
    # gradient that rounding flips around zero into a step of up to the learning rate, and the GAN's
    # steps feed on each other, differently on CPUs whose kernels add in other orders. So the bound is
    # measured on this CPU, over the same steps: a one-process run whose every gradient element is
    # changed by about one rounding (relative EPS32) at every step. Two processes must stay within a
    # few times that distance; a real error (a wrong shard, unaveraged or unsynchronised gradients)
    # moves the weights by the size of a training step everywhere, far beyond it.
    one, two = load_file(runs / "one" / "rank0.safetensors"), load_file(runs / "two" / "rank0.safetensors")
    rounded = load_file(runs / "rounded" / "rank0.safetensors")
    assert one.keys() == two.keys() == rounded.keys()
    size = _distance(one, {k: torch.zeros_like(v) for k, v in one.items()})
    by_processes, by_rounding = _distance(one, two), _distance(one, rounded)
    report = (f"|one - two| = {by_processes:.3g}, |one - rounded| = {by_rounding:.3g} (weights' norm {size:.3g}); "
              f"largest element differences, two processes: {_largest_differences(one, two)}; "
              f"rounding: {_largest_differences(one, rounded)}")
    assert by_processes <= 4 * by_rounding + 1e-7 * size, report
    assert by_rounding <= 1e-4 * size, report  # rounding-sized changes stay small: the bound is a tight one
    # and training moved the weights: the comparison is not between two untouched initialisations
    moved = load_file(runs / "one" / "rank0.safetensors")
    init_like = {k: v for k, v in moved.items() if k.startswith("critic.") and v.ndim == 4}
    assert init_like and max(float(v.abs().max()) for v in init_like.values()) > 0


def test_rank0_alone_writes_checkpoint_log_and_best_weights(runs):
    work = runs / "two" / "work"
    assert (work / "checkpoint.pt").is_file() and (work / "best.safetensors").is_file()
    lines = (work / "losses.csv").read_text().splitlines()
    steps = [int(line.split(",")[0]) for line in lines[1:]]
    assert steps == sorted(set(steps)), "each step logged once (by rank 0 only)"
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    assert state["step"] == 8 and len(state["history"]) == 2  # AUCp at 4 and 8, broadcast from rank 0


def test_killed_distributed_run_resumes_on_every_rank_to_the_same_weights(runs, tmp_path):
    # 8 iterations, critic every iteration and generator every 2nd: 12 loss calls; the checkpoint
    # at iteration 4 is written after call 6; every rank stops at call 8 (inside iteration 6)
    killed = torchrun(2, WORKER, tmp_path, "--die-after-calls", 8, check=False)
    assert killed.returncode != 0
    assert torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)["step"] == 4
    torchrun(2, WORKER, tmp_path)
    resumed, uninterrupted = load_file(tmp_path / "rank1.safetensors"), load_file(runs / "two" / "rank1.safetensors")
    _close(resumed, uninterrupted, atol=0, rtol=0)


def test_every_gan_method_trains_under_torchrun_and_ranks_save_the_same_model(tmp_path):
    torchrun(2, WORKER.with_name("ddp_all_methods.py"), tmp_path)
    methods = sorted(p.name for p in (tmp_path / "rank0").iterdir())
    assert methods == ["alad", "alocc", "anogan", "fanogan", "ganomaly", "healthygan"]
    for method in methods:
        # weights and BatchNorm statistics (averaged over the ranks at each checkpoint) alike
        r0 = load_file(tmp_path / "rank0" / method / "model.safetensors")
        r1 = load_file(tmp_path / "rank1" / method / "model.safetensors")
        _close(r0, r1, atol=0, rtol=0)


def test_batch_stream_shards_are_the_one_process_batch(monkeypatch):
    data = {"a": blobs(10, seed=3)}
    one = BatchStream(data, batch_size=4, seed=7, hflip=True)  # flips are drawn for the global batch
    halves = [BatchStream(data, batch_size=4, seed=7, hflip=True, world=distributed.World(r, 2)) for r in (0, 1)]
    for _ in range(5):  # crosses an epoch boundary (10 images, 4 per batch)
        whole = one.next()["a"]
        torch.testing.assert_close(torch.cat([h.next()["a"] for h in halves]), whole, rtol=0, atol=0)
    with pytest.raises(Exception, match="multiple of the number of processes"):
        BatchStream(data, batch_size=5, seed=7, hflip=True, world=distributed.World(0, 2))


def test_per_sample_random_numbers_are_the_one_process_draws(monkeypatch):
    torch.manual_seed(11)
    whole = torch.randn(6, 3)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank, 2))
        torch.manual_seed(11)
        parts.append(distributed.per_sample_randn(3, 3))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    monkeypatch.setattr(distributed, "world", lambda: distributed.World())
    torch.manual_seed(11)
    torch.testing.assert_close(distributed.per_sample_randn(6, 3), whole, rtol=0, atol=0)


def _png_dir(path: Path, images: torch.Tensor) -> Path:
    path.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(((img[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(path / f"{i:02d}.png")
    return path


def test_torchrun_cli_trains_and_rank0_saves_the_model(tmp_path):
    healthy = _png_dir(tmp_path / "healthy", blobs(8, seed=1))
    mixed = _png_dir(tmp_path / "mixed", torch.cat([blobs(4, seed=2), blobs(4, seed=3, lesion=True)]))
    torchrun(2, "-m", "scanomaly", "train", "healthygan", "--healthy", healthy, "--unlabeled", mixed,
             "--profile", "tiny", "--iters", 4, "--set", "checkpoint_every=2", "--out", tmp_path / "run",
             "--no-progress")
    assert (tmp_path / "run" / "model" / "model.json").is_file()
    assert (tmp_path / "run" / "train_summary.json").is_file()


def test_methods_without_gradient_training_refuse_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["train", "padim", "--healthy", str(tmp_path), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "does not train with torchrun" in capsys.readouterr().err
