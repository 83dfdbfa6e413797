"""Trains a tiny HealthyGAN under torchrun and saves this rank's live weights (tests/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node=N ddp_worker.py OUT [--die-after-calls K]

The data are the same synthetic blobs on every rank; the global batch is 4 whatever N is.
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest.blobs
from conftest import blobs  # noqa: E402

from scanomaly import distributed  # noqa: E402
from scanomaly.methods.healthygan import HealthyGAN, HealthyGANTask  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--die-after-calls", type=int, default=0, help="simulate a kill: stop every rank at this loss call")
ap.add_argument("--gradient-noise", type=float, default=0.0,
                help="multiply every gradient element by (1 + u * this), u uniform in [-1, 1] from a generator of its "
                     "own: rounding-sized changes at every step, as a different order of float additions makes")
args = ap.parse_args()

torch.set_num_threads(1)
world = distributed.init_from_env("cpu")
if args.die_after_calls:
    original, calls = HealthyGANTask.loss, {"n": 0}

    def dying_loss(self, phase, batch):
        calls["n"] += 1
        if calls["n"] > args.die_after_calls:
            raise SystemExit(3)
        return original(self, phase, batch)

    HealthyGANTask.loss = dying_loss

# AUCp selection on: rank 0 evaluates, every rank loads the best weights it wrote
det = HealthyGAN.from_profile("tiny", {"iterations": 8, "checkpoint_every": 4, "batch_size": 4, "aucp_pool": 8})
out = Path(args.out)
if args.gradient_noise:
    noise = torch.Generator().manual_seed(1234)  # not the training's random numbers: those must stay the same
    original_build = HealthyGANTask.__init__

    def noisy_init(self, *a, **kw):
        original_build(self, *a, **kw)
        for module in self.modules().values():
            for p in module.parameters():
                if p.requires_grad:
                    p.register_hook(lambda g: g * (1 + args.gradient_noise * (2 * torch.rand(g.shape, generator=noise) - 1)))

    HealthyGANTask.__init__ = noisy_init
det.fit(blobs(12, seed=1), blobs(12, seed=2), work_dir=out / "work", progress=False)
weights = {f"generator.{k}": v for k, v in det.generator.state_dict().items()}
weights |= {f"critic.{k}": v for k, v in det.critic.state_dict().items()}
weights |= {f"scoring.{k}": v for k, v in det.scoring_generator.state_dict().items()}
save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{world.rank}.safetensors"))
distributed.shutdown()
