"""Exploratory (docs/experiments.md, section 18): can HealthyGAN's mask learn *where* to change if something tells it?
VALIDATION only; no test scan is loaded.

    OMP_NUM_THREADS=2 python benchmarks/healthygan_mask_target.py PROFILE_RUN OUT [--weight 1.0]

PROFILE_RUN: a `run_method` run of the cpu profile on lgg_flair (its split and preprocessing are reused; its model is
the comparison). A new model of the same profile trains with one extra generator term, weight * |M_A − t_A|, where the
target t_A marks the pixels whose trunk patch is farther from B's patches than 99% of held-out healthy pixels are
(the nearest-patch memory that draws the profile's heatmap, thresholded). Then, on the validation lesion slices, the
pixel AUROC inside the head of the mask M, of the change |x − healthy(x)|, and of the memory's map, for both models;
and the masks' mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import scanomaly.methods.healthygan as hg
from scanomaly.data import load_images
from scanomaly.detector import Detector, anomaly_map, as_tensor
from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.pipeline import without_labels
from scanomaly.splits import read_split_manifest


def mask_target_task(nearest: hg.NearestHealthyPatch, threshold: float, weight: float):
    class MaskTargetTask(hg.HealthyGANTask):
        def loss(self, phase, batch):
            if phase == "critic":
                return super().loss(phase, batch)
            x_a, x_b, cfg = batch["a"], batch["b"], self.cfg
            with torch.no_grad():
                target = (nearest(x_a) > threshold).float()[:, None]
            healthy_a, t_a, m_a = self.generator(x_a)
            healthy_b, t_b, m_b = self.generator(x_b)
            adv = -self.critic(healthy_a).mean() - self.critic(healthy_b).mean()
            idt, rec = hg.identity_loss(x_b, t_b), hg.reconstruction_loss(x_a, t_a, m_a)
            msk = (hg.mask_loss(m_a) + hg.mask_loss(m_b)) / 2
            tgt = (m_a - target).abs().mean()
            loss = adv + cfg.lambda_id * idt + cfg.lambda_rec * rec + cfg.lambda_mask * msk + weight * tgt
            logs = {"G/adv": adv, "G/id": idt, "G/rec": rec, "G/mask": msk, "G/target": tgt, "G/mask_mean": m_a.mean()}
            return loss, {k: v.item() for k, v in logs.items()}
    return MaskTargetTask


@torch.no_grad()
def localisation(det, val) -> dict:
    """Pixel AUROC inside the head on the validation lesion slices: the mask, the change, the memory's map."""
    lesion = np.asarray(val.labels) == 1
    x = val.images[lesion]
    masks, head = val.masks.numpy()[lesion].astype(bool), foreground_mask(x.numpy())
    healthy, _, m = det.scoring_generator.eval()(x.to(det.device))
    maps = det.score(x)[1]
    return {"mask": pixel_auroc(m[:, 0].cpu().numpy(), masks, head),
            "change": pixel_auroc(anomaly_map(x, healthy.cpu()).numpy(), masks, head),
            "memory": pixel_auroc(maps, masks, head), "mask_mean": float(m.mean()),
            "mask_mean_in_lesions": float(m[:, 0].cpu().numpy()[masks].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile_run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=None, help="fewer than the profile's, for a smoke run")
    args = ap.parse_args()
    profile = Detector.load(args.profile_run / "model")
    split = read_split_manifest(args.profile_run / "split.csv")
    load = lambda records: load_images(records, profile.preprocessing, progress=False)  # noqa: E731
    b, a, hold = (as_tensor(load(r)) for r in (split.healthy, without_labels(split.unlabeled), split.healthy_holdout))

    overrides = {"seed": profile.config.seed}
    if args.iterations:
        overrides |= {"iterations": args.iterations, "checkpoint_every": args.iterations, "sample_every": args.iterations}
    if profile.config.heatmap != "nearest":  # a model saved before the memory drew the heatmap: give it the memory
        profile.config.score, profile.config.heatmap = "critic", "nearest"
        profile.healthy_patches = profile.healthy_patch_bank(b)
    det = hg.HealthyGAN.from_profile("cpu", overrides, {"intensity": profile.preprocessing.intensity})
    nearest = hg.NearestHealthyPatch(det.critic, det.healthy_patch_bank(b))
    with torch.no_grad():
        threshold = float(torch.quantile(torch.cat([nearest(hold[i:i + 64]) for i in range(0, len(hold), 64)]).flatten()[::7], 0.99))
    hg.HealthyGANTask = mask_target_task(nearest, threshold, args.weight)
    det.fit(b, a, holdout=hold, work_dir=args.out, progress=False)

    val = load(split.val)
    row = {"threshold": threshold, "profile": localisation(profile, val), "mask_target": localisation(det, val)}
    print(json.dumps(row, indent=1))
    (args.out / "localisation.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
