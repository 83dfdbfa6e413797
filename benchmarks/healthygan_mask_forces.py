"""HealthyGAN: which loss term moves the attention mask M, on TRAINING images (B and A; no label is read).

    python benchmarks/healthygan_mask_forces.py RUN [--n 64]       # RUN trained with --set keep_snapshots=true

For every kept snapshot (the EMA generator and the critic of a checkpoint) this takes n scans of A and n of B,
computes the generator's loss terms as training does (adversarial, reconstruction on A, mask on A and B, each
with its weight), and the gradient of each term with respect to A's mask M, per pixel. It prints, per term, the
mean push on M (minus the gradient: positive means the term wants M larger) and the mean |gradient|, with mean M
and mean |T − x| on A, and the adversarial push averaged over 8 x 8 blocks (what a smooth mask can follow).
Where the adversarial push stays below the mask term's pull, masks shrink to nothing and the generator stops
translating; the adversarial push on M is −∂D/∂healthy · (T − x), so it vanishes where T ≈ x.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from healthygan_profile_choice import load_snapshot
from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.methods.healthygan import mask_loss, reconstruction_loss
from scanomaly.pipeline import without_labels
from scanomaly.splits import read_split_manifest


def forces(generator, critic, cfg, x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        _, t_a, m_a = generator(x_a)
        m_b = generator(x_b)[2]
    m_a = m_a.requires_grad_(True)
    healthy_a = m_a * t_a + (1 - m_a) * x_a
    terms = {
        "adversarial": -critic(healthy_a).mean(),
        "reconstruction": cfg.lambda_rec * reconstruction_loss(x_a, t_a, m_a),
        "mask": cfg.lambda_mask * (mask_loss(m_a) + mask_loss(m_b)) / 2,
    }
    out = {"mean M": m_a.mean().item(), "|T - x| on A": (t_a - x_a).abs().mean().item()}
    for name, term in terms.items():
        (g,) = torch.autograd.grad(term, m_a)
        g = g * m_a.numel()  # per pixel, as if the loss were a sum: comparable between terms and sizes
        out[f"{name} push"] = (-g).mean().item()
        out[f"{name} |grad|"] = g.abs().mean().item()
        if name == "adversarial":  # a smooth mask can only follow the push's low frequencies: its 8 x 8 block means
            block = torch.nn.functional.avg_pool2d(-g, 8)
            out["adversarial |push| per 8x8 block"] = block.abs().mean().item()
            out["adversarial 8x8 blocks pushing up"] = (block > 0).float().mean().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    det = Detector.load(args.run / "model")
    split = read_split_manifest(args.run / "split.csv")
    load = lambda records: torch.as_tensor(load_images(records[: args.n], det.preprocessing, progress=False).images)  # noqa: E731
    x_b, x_a = load(split.healthy), load(without_labels(split.unlabeled))
    generator, critic = det.scoring["generator"], det.scoring["critic"]
    for snap in sorted((args.run / "snapshots").glob("step_*.safetensors")):
        load_snapshot(snap, generator, critic)
        row = forces(generator, critic, det.config, x_a, x_b)
        print(snap.stem, "  ".join(f"{k} {v:+.4f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
