"""Exploratory (docs/experiments.md, section 18): can HealthyGAN's mask learn *where* to change if something tells it?
VALIDATION only; no test scan is loaded.

    OMP_NUM_THREADS=2 python benchmarks/healthygan_mask_target.py PROFILE_RUN OUT [--weight 1.0]
    OMP_NUM_THREADS=2 python benchmarks/healthygan_mask_target.py PROFILE_RUN OUT --soft --weight 10 [--binary-weight 0]

PROFILE_RUN: a `run_method` run of the cpu profile on lgg_flair (its split and preprocessing are reused; its model is
the comparison). A new model of the same profile trains with one extra generator term towards a target t_A from the
nearest-patch memory that draws the profile's heatmap (d: a pixel's distance from B's patches; d99, d90: the 99th and
90th percentiles of d over held-out healthy pixels):
  section 18: weight * |M_A − t_A|, t_A = [d > d99] (0/1);
  section 19 (--soft): weight * BCE(M_A, t_A), t_A = sigmoid((d − d99) / s), s = (d99 − d90) / ln 9 (t = 0.1 at d90,
  0.5 at d99): dense, and a probability, so the loss's optimum is the target's conditional mean, not its median.
--binary-weight scales the mask loss's zero-one part (1: the profile's; its barrier at M = 0.5 stops a mask that
starts below from reaching a target above). Then, on the validation lesion slices, the pixel AUROC inside the head of
the mask M, of the change |x − healthy(x)|, and of the memory's map, for both models; and the masks' mean.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import scanomaly.methods.healthygan as hg
from scanomaly.data import load_images
from scanomaly.detector import Detector, anomaly_map, as_tensor
from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.pipeline import without_labels
from scanomaly.splits import read_split_manifest


def mask_target_task(nearest: hg.NearestHealthyPatch, d99: float, d90: float, weight: float, soft: bool,
                     binary_weight: float):
    def target_loss(mask, distance):
        if not soft:
            return (mask - (distance > d99).float()).abs().mean()
        target = torch.sigmoid((distance - d99) * math.log(9) / (d99 - d90))
        return hg.mask_target_loss(mask, target)

    def masks_small_and_binary(mask):  # hg.mask_loss, its zero-one part scaled
        return mask.mean() ** 2 + binary_weight * ((1.0 / ((mask - 0.5).abs() + 0.01)).mean() - 1.0 / 0.51)

    class MaskTargetTask(hg.HealthyGANTask):
        def loss(self, phase, batch):
            if phase == "critic":
                return super().loss(phase, batch)
            x_a, x_b, cfg = batch["a"], batch["b"], self.cfg
            with torch.no_grad():
                distance = nearest(x_a)[:, None]
            healthy_a, t_a, m_a = self.generator(x_a)
            healthy_b, t_b, m_b = self.generator(x_b)
            adv = -self.critic(healthy_a).mean() - self.critic(healthy_b).mean()
            idt, rec = hg.identity_loss(x_b, t_b), hg.reconstruction_loss(x_a, t_a, m_a)
            msk = (masks_small_and_binary(m_a) + masks_small_and_binary(m_b)) / 2
            tgt = target_loss(m_a, distance)
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
    ap.add_argument("--soft", action="store_true", help="the dense probability target and BCE (section 19)")
    ap.add_argument("--binary-weight", type=float, default=1.0)
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
        healthy_pixels = torch.cat([nearest(hold[i:i + 64]) for i in range(0, len(hold), 64)]).flatten()[::7]
        d99, d90 = (float(torch.quantile(healthy_pixels, q)) for q in (0.99, 0.90))
    hg.HealthyGANTask = mask_target_task(nearest, d99, d90, args.weight, args.soft, args.binary_weight)
    det.fit(b, a, holdout=hold, work_dir=args.out, progress=False)

    val = load(split.val)
    row = {"d99": d99, "d90": d90, "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
           "profile": localisation(profile, val), "mask_target": localisation(det, val)}
    print(json.dumps(row, indent=1))
    (args.out / "localisation.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
