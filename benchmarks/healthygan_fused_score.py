"""HealthyGAN: the critic's score and the nearest-patch memory together (docs/experiments.md, section 13). VALIDATION
unless --test (once, after the choice).

    python benchmarks/healthygan_fused_score.py RUN [RUN ...] [--unseen] [--test [--against OTHER_RUN]]

RUN: a `benchmarks/run_method.py` run of the cpu profile (critic="lite0"; score "critic" or "critic+nearest"). For
each, F = deficit / σ_critic + max(nearest-patch map) / σ_memory, each σ the standard deviation of that component
over the scans AUCp compared in training: the held-out healthy scans and the held-out unlabeled pool (the same
seeded split `HealthyGAN.fit` makes; unseen in training, no labels), and W (section 15), F with the critic's part
weighted by `critic_weight` of its memorisation of B, as `fit` now scores. The checkpoint, the critic and the heatmap
are the run's own; the memory's bank is built by `HealthyGAN.healthy_patch_bank`, as `fit` does. Prints the
validation AUROC of the critic's score, of the memory alone, of F and of W (with --test the same on the test split,
with 95% bootstrap intervals as `run_method` computes them). --unseen adds a wider set of non-test scans (`unseen_records`:
the held-out healthy scans, the unlabeled pool with its labels, the validation lesions and the unused scans, at most
--per-class of each label). The critic trained on most of that pool as A: the wider set compares variants trained
the same way (docs/experiments.md, section 14), it does not stand for their test numbers. Where the validation scans
have lesion masks (lgg_flair), the nearest-patch map's pixel AUROC inside the head is printed too. --against (with
--test): another method's `run_method` run on the same split (its test_scores.csv); prints the mean over RUNs of W's
test AUROC minus the other's, with a 95% interval over paired stratified bootstrap resamples of the test scans (the
same resample for every model), and the share of resamples in which W is ahead: whether a gap is more than the test
set's size allows one to tell. --translation adds, on the same parts, the AUROC of the generator's own evidence
("score = what had to change"): the paper's pixel score mean |x − healthy(x)| / 2, the mask's mean, and the
feature distance of x and healthy(x) (`score="features"`: Lite0 stages 2-3 at 128 px, mean and max of the map),
and T: W with that distance's maximum, scaled by its spread over the same unseen scans, as a third part
(docs/experiments.md, section 20). --multiscale adds X (section 25): W with the memory's part max(s1 / σ1, s3 / σ3),
s1 the single-patch map's maximum, s3 the maximum of the map of trunk patches averaged over 3 x 3 neighbourhoods
against a 10% coreset of B's averaged patches, each σ over the same unseen scans; X's σ_memory is that part's spread.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scanomaly.data import load_images
from scanomaly.detector import Detector
from scanomaly.methods import _patch_features as pf
from scanomaly.methods.healthygan import NEAREST_CORESET_FRACTION, NearestHealthyPatch, _split_off, critic_weight, paper_score
from scanomaly.methods.patchcore import greedy_coreset
from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.metrics import bootstrap_auroc_ci
from scanomaly.pipeline import without_labels
from scanomaly.splits import read_split_manifest


def open_run(run: Path):
    """A `run_method` run's model, its split, and a loader of records with the model's preprocessing."""
    det = Detector.load(run / "model")
    load = lambda records: load_images(records, det.preprocessing, progress=False)  # noqa: E731
    return det, read_split_manifest(run / "split.csv"), load


def per_label_sample(records, per_class: int, seed: int) -> list:
    """At most per_class records of each label, a seeded sample in the records' order."""
    rng, out = np.random.default_rng(seed), []
    for label in (0, 1):
        group = [r for r in records if r.label == label]
        out += [group[i] for i in sorted(rng.permutation(len(group))[:per_class])]
    return out


def unseen_records(split, per_class: int, seed: int = 0) -> list:
    """Neither B nor test: at most per_class scans of each label, a seeded sample."""
    return per_label_sample(split.healthy_holdout + split.unlabeled + split.val_abnormal + split.unused, per_class, seed)


def as_parts(det, split, load):
    """Set the model to score its two parts (the critic's deficit; the memory's map, with B's bank) and rebuild what fit
    held out, as fit does: (B's images, B's training scans, the held-out healthy scans, the scans the parts' spreads are
    measured on: those and the AUCp pool split off A)."""
    c = det.config
    healthy = load(split.healthy)
    det.config.score, det.config.heatmap = "critic", "nearest"
    det.healthy_patches = det.healthy_patch_bank(healthy.images)
    _, pool = _split_off(load(without_labels(split.unlabeled)).images, c.holdout_fraction, c.seed)
    if split.healthy_holdout:  # the hold-out given to fit, else split off B
        b_train, hold = healthy.images, load(split.healthy_holdout).images
    else:
        b_train, hold = _split_off(healthy.images, c.holdout_fraction, c.seed)
    return healthy, b_train, hold, torch.cat([hold, pool[: c.aucp_pool]])


def components(det, images) -> np.ndarray:
    """[N, 2]: the critic's deficit and the maximum of the nearest-patch map."""
    scores, maps = det.score(images)
    return np.c_[scores, maps.reshape(len(maps), -1).max(1)]


def feature_distance(det) -> pf.FeatureDistance:
    """`score="features"`'s distance with the run's backbone settings, the scans enlarged to 128 px."""
    c = det.config
    extractor = pf.build_extractor(c.score_backbone, c.score_backbone_weights, c.score_stages, det.device)
    return pf.FeatureDistance(extractor, c.score_sigma, input_size=128)


@torch.no_grad()
def translation_scores(det, distance: pf.FeatureDistance, images, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The generator's evidence per scan: the paper's pixel score, the mask's mean, the feature distance of x and
    healthy(x) (mean and maximum of its map)."""
    generator = det.scoring_generator.eval()  # after load, the saved (EMA, AUCp-chosen) weights
    out: dict[str, list] = {"change": [], "mask": [], "features mean": [], "features max": []}
    for x in images.split(batch_size):
        x = x.to(det.device)
        healthy, _, mask = generator(x)
        _, maps = distance(x, healthy.float())
        for key, value in (("change", paper_score(x, healthy.float())), ("mask", mask.flatten(1).mean(1)),
                           ("features mean", maps.flatten(1).mean(1)), ("features max", maps.flatten(1).amax(1))):
            out[key].append(value.float().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


class NeighbourhoodTrunk(torch.nn.Module):
    """The critic's trunk features, each patch averaged with its 3 x 3 neighbours (PatchCore's step 1)."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.critic.features(x), 3, 1, 1)


@torch.no_grad()
def neighbourhood_memory(det, healthy: torch.Tensor) -> NearestHealthyPatch:
    """X's coarse scale: the nearest-patch map of 3 x 3-averaged trunk patches against a coreset of B's."""
    trunk = NeighbourhoodTrunk(det.scoring["critic"]).eval()
    feats = torch.cat([trunk.features(healthy[i : i + 64]).float().permute(0, 2, 3, 1).flatten(0, 2)
                       for i in range(0, len(healthy), 64)])
    keep = greedy_coreset(feats, math.ceil(NEAREST_CORESET_FRACTION * len(feats)), seed=det.config.seed)
    return NearestHealthyPatch(trunk, feats[keep].contiguous())


@torch.no_grad()
def map_maxima(nearest: NearestHealthyPatch, images: torch.Tensor) -> np.ndarray:
    return torch.cat([nearest(images[i : i + 64]).flatten(1).amax(1) for i in range(0, len(images), 64)]).numpy()


def read_test_scores(run: Path) -> dict:
    """A `run_method` run's test scores by (path, index)."""
    with open(run / "test_scores.csv") as f:
        return {(r["path"], r["index"]): float(r["score"]) for r in csv.DictReader(f)}


def paired_difference(y, ours: list, theirs, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Mean over `ours` (score arrays) of their AUROC minus the AUROC of `theirs`, on the same scans: the difference,
    its 95% percentile interval over stratified bootstrap resamples shared by all the models, and the share of
    resamples in which ours is ahead."""
    y = np.asarray(y)
    diff = lambda idx: np.mean([roc_auc_score(y[idx], o[idx]) for o in ours]) - roc_auc_score(y[idx], theirs[idx])  # noqa: E731
    rng, pos, neg = np.random.default_rng(seed), np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    resampled = np.array([diff(np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n_bootstrap)])
    low, high = np.quantile(resampled, [0.025, 0.975])
    return {"difference": float(diff(np.arange(len(y)))), "ci": [float(low), float(high)],
            "share_ahead": float((resampled > 0).mean()), "n": [int(len(pos)), int(len(neg))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--test", action="store_true", help="also score the test split (once, after the choice)")
    ap.add_argument("--unseen", action="store_true", help="also score the wider set of non-test scans")
    ap.add_argument("--per-class", type=int, default=400, help="--unseen: at most this many scans of each label")
    ap.add_argument("--against", type=Path, default=None, help="with --test: another method's run on the same split")
    ap.add_argument("--translation", action="store_true", help="also the generator's own evidence (section 20)")
    ap.add_argument("--multiscale", action="store_true", help="also X, both patch scales in the memory (section 25)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.against and not args.test:
        ap.error("--against compares test scores: add --test")
    table, test_w = {}, {}
    for run in args.runs:
        det, split, load = open_run(run)
        c = det.config
        healthy, b_train, hold, sigma_scans = as_parts(det, split, load)
        sigma = components(det, sigma_scans).std(0, ddof=1)
        if args.translation:  # candidate T's third part is scaled over the same unseen scans
            distance = feature_distance(det)
            sigma_features = float(translation_scores(det, distance, sigma_scans)["features max"].std(ddof=1))
        if args.multiscale:  # X: the larger of the two scales' standardised maxima, scaled again over the same scans
            coarse = neighbourhood_memory(det, healthy.images)
            s1, s3 = components(det, sigma_scans)[:, 1], map_maxima(coarse, sigma_scans)
            scale_1, scale_3 = s1.std(ddof=1), s3.std(ddof=1)
            sigma_x = float(np.maximum(s1 / scale_1, s3 / scale_3).std(ddof=1))
        # W (section 15): the critic's part weighted by w = clip(2 (1 − m), 0, 1), m its memorisation of B as fit
        # measures it (B's training scans against the held-out healthy ones)
        m = det._critic_memorisation(b_train, hold)
        weight = critic_weight(m)
        row = {"sigma": sigma.tolist(), "n_sigma": len(sigma_scans), "memorisation": m, "w": weight}
        parts = {"val": load(split.val)}
        if args.unseen:
            parts["unseen"] = load(unseen_records(split, args.per_class))
        if args.test:
            parts["test"] = load(split.test)
        for part, images in parts.items():
            y, comp = np.asarray(images.labels), components(det, images)
            scores = {"critic": comp[:, 0], "memory": comp[:, 1], "F": (comp / sigma).sum(1),
                      "W": weight * comp[:, 0] / sigma[0] + comp[:, 1] / sigma[1]}
            if args.translation:
                scores |= translation_scores(det, distance, images.images)
                scores["T"] = scores["W"] + scores["features max"] / sigma_features
            if args.multiscale:
                scores["memory 3x3"] = map_maxima(coarse, images.images)
                scores["memory X"] = np.maximum(comp[:, 1] / scale_1, scores["memory 3x3"] / scale_3)
                scores["X"] = weight * comp[:, 0] / sigma[0] + scores["memory X"] / sigma_x
            row[part] = {k: float(roc_auc_score(y, s)) for k, s in scores.items()}
            if part == "val" and images.masks is not None:
                row["val"]["pixel"] = pixel_auroc(det.score(images)[1], images.masks.numpy().astype(bool),
                                                  foreground_mask(images.images.numpy()))
            if part == "test":
                row["test_ci"] = {k: bootstrap_auroc_ci(y, s, seed=c.seed) for k, s in scores.items()}
                test_w[str(run)] = ([(r.path, "" if r.index is None else str(r.index)) for r in split.test], y, scores["W"])
        table[str(run)] = row
        print(run, json.dumps(row), flush=True)
    if args.against:
        theirs = read_test_scores(args.against)
        keys, y, _ = next(iter(test_w.values()))
        if any(k != keys for k, _, _ in test_w.values()) or set(keys) != set(theirs):
            raise SystemExit("--against: every run, and the other method's, must have scored the same test scans")
        table["against"] = {"run": str(args.against), **paired_difference(
            y, [w for _, _, w in test_w.values()], np.array([theirs[k] for k in keys]))}
        print("W minus", args.against, json.dumps(table["against"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
