"""HealthyGAN: why does the nearest-patch memory on the critic's trunk rank some data sets far below PatchCore on
the same backbone? A probe of what each of them does differently, on scans that are neither test nor B.

    python benchmarks/healthygan_memory_preprocessing.py RUN [RUN ...] [--per-class 400] [--json OUT]

RUN: a `benchmarks/run_method.py` run of the cpu profile (critic="lite0"); only its split and its frozen trunk are
used (the memory depends on B alone, not on the training). The memory's image score is the maximum of
`NearestHealthyPatch`'s map, as `score="critic+nearest"` adds it. Evaluated on every scan the memory has not seen
and the test split does not hold: the held-out healthy scans, the unlabeled pool (its labels: the memory never
sees it), the validation lesions and the unused scans, at most --per-class of each label (seeded). No test scan
is read. Variants, each changing one thing from the profile:

- profile:   the run's own preprocessing (64 px; histogram equalisation and the 8% top crop, or lgg_flair's
             percentile scaling without crop), enlarged x2 to the trunk, as the model scores;
- no_crop:   the same without the top crop;
- no_equalise: the data set's plain intensity (as every other method gets it: none; lgg_flair percentile) with the crop;
- plain64:   neither (64 px, enlarged x2);
- plain128:  neither, at 128 px given to the trunk as it is: the trunk's input and grid are PatchCore's;
- plain64_agg3: plain64 with each patch feature averaged over its 3 x 3 neighbours, in the bank and the queries;
- patchcore: PatchCore's cpu profile itself (128 px, 3 x 3 aggregation, re-weighted maximum).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector, get_method
from scanomaly.methods.healthygan import NearestHealthyPatch
from scanomaly.preprocess import Preprocessing
from scanomaly.splits import read_split_manifest

from healthygan_fused_score import unseen_records  # the same non-test scans the fused score's --unseen reads


@torch.no_grad()
def memory_scores(det, prep: Preprocessing, split, records, scale: float, aggregate: bool) -> tuple[np.ndarray, np.ndarray]:
    load = lambda r: load_images(r, prep, progress=False)  # noqa: E731
    critic = det.scoring["critic"].eval()
    critic.scale = scale
    # aggregate: each patch averaged with its 3 x 3 neighbours, in the bank and in the queries (PatchCore's step 1)
    trunk_features = type(critic).features.__get__(critic)
    critic.features = (lambda x: F.avg_pool2d(trunk_features(x), 3, 1, 1)) if aggregate else trunk_features
    det.preprocessing = prep
    nearest = NearestHealthyPatch(critic, det.healthy_patch_bank(load(split.healthy).images))
    images = load(records)
    x = images.images
    scores = torch.cat([nearest(x[i : i + 64]).flatten(1).amax(1) for i in range(0, len(x), 64)])
    return np.asarray(images.labels), scores.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    table = {}
    for run in args.runs:
        det = Detector.load(run / "model")
        split = read_split_manifest(run / "split.csv")
        records = unseen_records(split, args.per_class)
        own = det.preprocessing
        plain = "percentile" if own.intensity == "percentile" else "none"
        variants = {
            "profile": (own, 2.0, False),
            "no_crop": (replace(own, top_crop=0.0), 2.0, False),
            "no_equalise": (replace(own, intensity=plain), 2.0, False),
            "plain64": (replace(own, top_crop=0.0, intensity=plain), 2.0, False),
            "plain128": (replace(own, image_size=2 * own.image_size, top_crop=0.0, intensity=plain), 1.0, False),
            "plain64_agg3": (replace(own, top_crop=0.0, intensity=plain), 2.0, True),
        }
        if args.variants:
            variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
        row = {"n": [sum(r.label == 0 for r in records), sum(r.label == 1 for r in records)]}
        for name, (prep, scale, aggregate) in variants.items():
            y, s = memory_scores(det, prep, split, records, scale, aggregate)
            row[name] = float(roc_auc_score(y, s))
            print(run.name, name, f"{row[name]:.3f}", flush=True)
        patchcore = get_method("patchcore").from_profile("cpu", preprocessing_overrides={"intensity": plain})
        patchcore.fit(load_images(split.healthy, patchcore.preprocessing, progress=False).images)
        images = load_images(records, patchcore.preprocessing, progress=False)
        row["patchcore"] = float(roc_auc_score(images.labels, patchcore.score(images.images)[0]))
        print(run.name, "patchcore", f"{row['patchcore']:.3f}", json.dumps(row), flush=True)
        table[str(run)] = row
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
