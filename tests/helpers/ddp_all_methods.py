"""Trains every GAN method (tiny profile, a few iterations) under torchrun and saves each rank's
model in OUT/rank<r>/<method> (tests/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_all_methods.py OUT
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest.blobs
from conftest import blobs  # noqa: E402

from scanomaly import distributed  # noqa: E402
from scanomaly.detector import available_methods, get_method  # noqa: E402

torch.set_num_threads(1)
world = distributed.init_from_env("cpu")
out = Path(sys.argv[1])
for name in available_methods():
    cls = get_method(name)
    if not cls.distributed_training:
        continue
    det = cls.from_profile("tiny", {"iterations": 4, "batch_size": 4})
    size = det.preprocessing.image_size
    healthy, mixed = blobs(8, size=size, seed=1), blobs(8, size=size, seed=2)
    det.fit(healthy, mixed if cls.needs_unlabeled else None, work_dir=out / "work" / name, progress=False)
    det.save(out / f"rank{world.rank}" / name)
distributed.shutdown()
