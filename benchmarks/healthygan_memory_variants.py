"""HealthyGAN: three variants of the nearest-patch memory against the profile's, on validation and other non-test
scans (docs/experiments.md, section 16; all three lost their rounds). No test scan is read.

    python benchmarks/healthygan_memory_variants.py RUN [RUN ...] [--patchcore-max | --relative-map] [--json OUT]

RUN: a `benchmarks/run_method.py` run of the cpu profile (critic="lite0", score="critic+nearest"). The critic, its
checkpoint and its weight w are the run's own; only the memory changes.

U, the unlabeled scans that look healthy join the memory (the default), by cross-fitting: A's training part (what
fit trains on; the AUCp pool stays out, as in fit) is cut into two seeded folds, whole patients together where ids
exist. For each fold the bank is built from B and, per
variant, from the *other* fold:
    B         B alone (the profile before section 16)
    U         B ∪ the other fold's scans `healthy_looking` admits (the candidate)
    healthy   B ∪ the other fold's healthy scans (labels read: what a perfect admission would give)
    all       B ∪ the whole other fold (no admission rule)
and the scored set is this fold ∪ the AUCp pool ∪ the held-out healthy scans ∪ the validation lesions ∪ the unused
scans, at most --per-class of each label (seeded). σ_memory is recomputed over the scans fit uses (held-out healthy
and the AUCp pool) with each bank, as fit does. Prints W's AUROC (the profile's score) and the memory's alone per
fold and their mean, the validation AUROC of W, lgg_flair's validation pixel AUROC inside the head, and what U
admitted (how many, how many lesions among them).

With --patchcore-max (section 16's second question, M): B's bank; the memory's part of W becomes PatchCore's image
score on the critic's trunk (patches averaged over 3 x 3 neighbourhoods, a 10% coreset of B's averaged patches, the
largest patch distance re-weighted as PatchCore's step 4 with b = 9), computed here by hand; σ_memory is that
part's spread over the same unseen scans. Scored on section 14's wider set (`unseen_records`) and the validation
split, beside W as it is.

With --relative-map (the third question, R): B's bank; the nearest-patch map minus μ, the mean over B's scans of
their maps with B cross-fitted (five seeded folds, each against the bank of the other four); the memory's part of
W is the maximum of map − μ, σ_memory its spread over the same unseen scans. Scored like M, with lgg_flair's
validation pixel AUROC of map − μ beside the plain map's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from scanomaly.localization import foreground_mask, pixel_auroc
from scanomaly.methods.healthygan import NearestHealthyPatch, critic_weight, split_off_indices
from scanomaly.methods.patchcore import greedy_coreset, nearest_neighbors, reweighted_image_score

from healthygan_fused_score import open_run, per_label_sample, unseen_records  # unseen: section 14's wider set


def a_as_fit_splits_it(split, config) -> tuple[list, list]:
    """A's training part (what fit trains on) and the AUCp pool fit holds out of it, as records."""
    kept, pool = split_off_indices(len(split.unlabeled), config.holdout_fraction, config.seed)
    return [split.unlabeled[i] for i in kept.tolist()], [split.unlabeled[i] for i in pool.tolist()][: config.aucp_pool]


@dataclass
class RunForMemory:
    """A run opened as fit saw it, for scoring variants of the memory beside the critic's part of W."""
    det: object
    split: object
    load: object
    x_b: torch.Tensor  # B
    hold: object  # the held-out healthy scans (loaded)
    a_train: object  # A's training part (loaded)
    pool: list  # the AUCp pool (records)
    unseen_for_sigma: torch.Tensor  # held-out healthy ∪ the pool: the scans fit takes W's scales over
    weight: float  # w, the critic's weight from its memorisation of B
    sigma_critic: float

    def deficit(self, images) -> np.ndarray:
        """The critic's deficit (the detector is set to score with the critic alone)."""
        return np.asarray(self.det.score(images)[0])


def open_for_memory(run: Path) -> RunForMemory:
    det, split, load = open_run(run)
    x_b, hold = load(split.healthy).images, load(split.healthy_holdout)
    a_train, pool = a_as_fit_splits_it(split, det.config)
    unseen_for_sigma = torch.cat([hold.images, load(pool).images])
    det.config.score, det.config.heatmap = "critic", "score"  # det.score: the critic's deficit; maps by hand
    opened = RunForMemory(det, split, load, x_b, hold, load(a_train), pool, unseen_for_sigma,
                          critic_weight(det._critic_memorisation(x_b, hold.images)), 0.0)
    opened.sigma_critic = float(np.std(opened.deficit(unseen_for_sigma), ddof=1))
    return opened


def two_folds(records, seed: int) -> np.ndarray:
    """Fold 0 or 1 for each record; the unit is a patient where records carry ids."""
    units = sorted({r.patient_id or f"#{i}" for i, r in enumerate(records)})
    order = np.random.default_rng(seed).permutation(len(units))
    fold_of = {units[j]: k % 2 for k, j in enumerate(order)}
    return np.array([fold_of[r.patient_id or f"#{i}"] for i, r in enumerate(records)])


@torch.no_grad()
def nearest_maps(det, images: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    nearest = NearestHealthyPatch(det.scoring["critic"], bank)
    return torch.cat([nearest(images[i : i + 64]).float() for i in range(0, len(images), 64)])


@torch.no_grad()
def memory_scores(det, images: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The maximum of each scan's nearest-patch map against `bank` (the memory's part of the score): [N]."""
    return nearest_maps(det, images, bank).flatten(1).amax(1)


@torch.no_grad()
def healthy_looking(det, x_b: torch.Tensor, x_a: torch.Tensor, quantile: float = 0.9, n_folds: int = 5):
    """Candidate U's admission: which of A's scans the memory finds no farther from B than nine in ten of B's own scans
    are from the rest of B (τ: the quantile of B's memory scores, B cross-fitted in n_folds seeded folds, each against
    the bank of the others). Label-free. Returns (a bool mask over x_a, τ)."""
    folds = torch.randperm(len(x_b), generator=torch.Generator().manual_seed(det.config.seed)) % n_folds
    reference = torch.cat([memory_scores(det, x_b[folds == k], det.healthy_patch_bank(x_b[folds != k]))
                           for k in range(n_folds)])
    tau = float(torch.quantile(reference.double(), quantile))
    return memory_scores(det, x_a, det.healthy_patch_bank(x_b)) <= tau, tau


@torch.no_grad()
def averaged_patches(det, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The critic trunk's patches, each averaged with its 3 x 3 neighbours (PatchCore's step 1): [N, P, C]."""
    critic = det.scoring["critic"]
    out = [F.avg_pool2d(critic.features(images[i : i + batch_size]).float(), 3, 1, 1).flatten(2).transpose(1, 2)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def patchcore_max(det, images: torch.Tensor, bank: torch.Tensor, b: int = 9) -> np.ndarray:
    """PatchCore's image score (step 4: the re-weighted largest patch distance) on averaged trunk patches."""
    out = []
    for i in range(0, len(images), 64):
        f = averaged_patches(det, images[i : i + 64])
        n, p, dim = f.shape
        dist, idx = nearest_neighbors(f.reshape(-1, dim), bank, k=1)
        out.append(reweighted_image_score(f, dist.view(n, p), idx.view(n, p), bank, b))
    return torch.cat(out).numpy()


@torch.no_grad()
def healthy_baseline(det, x_b: torch.Tensor, n_folds: int = 5) -> torch.Tensor:
    """μ [S, S]: the mean of B's nearest-patch maps, each scan against the bank of the folds it is not in."""
    folds = torch.randperm(len(x_b), generator=torch.Generator().manual_seed(det.config.seed)) % n_folds
    total = sum(nearest_maps(det, x_b[folds == k], det.healthy_patch_bank(x_b[folds != k])).sum(0) for k in range(n_folds))
    return total / len(x_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--patchcore-max", action="store_true", help="candidate M instead of U (B's bank, wider set)")
    ap.add_argument("--relative-map", action="store_true", help="candidate R (B's bank, wider set)")
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    table = {}
    for run in args.runs:
        opened = open_for_memory(run)
        det, split, load, c = opened.det, opened.split, opened.load, opened.det.config
        x_b, x_a_train, pool = opened.x_b, opened.a_train, opened.pool
        unseen_for_sigma, deficit = opened.unseen_for_sigma, opened.deficit
        weight, sigma_critic = opened.weight, opened.sigma_critic

        def W(images, critic_part, bank):
            """W (the profile's score) with this bank: σ_memory over the scans fit uses, as fit does."""
            memory = memory_scores(det, images, bank).numpy()
            sigma_memory = float(memory_scores(det, unseen_for_sigma, bank).numpy().std(ddof=1))
            return weight * critic_part / sigma_critic + memory / sigma_memory, memory

        row = {"w": weight}
        val = load(split.val)
        val_deficit = deficit(val.images)
        if args.relative_map or args.patchcore_max:  # R or M: the memory's part replaced, B's bank, section 14's sets
            bank = det.healthy_patch_bank(x_b)
            if args.relative_map:
                tag, mu = "R", healthy_baseline(det, x_b)
                candidate = lambda x: (nearest_maps(det, x, bank) - mu).flatten(1).amax(1).numpy()  # noqa: E731
            else:
                averaged = averaged_patches(det, x_b).flatten(0, 1)
                bank_m = averaged[greedy_coreset(averaged, int(np.ceil(0.1 * len(averaged))), seed=c.seed)].contiguous()
                tag, candidate = "M", lambda x: patchcore_max(det, x, bank_m)  # noqa: E731
            sigma_candidate = float(candidate(unseen_for_sigma).std(ddof=1))
            for part, images in {"val": val, "unseen": load(unseen_records(split, args.per_class))}.items():
                y, critic_part = np.asarray(images.labels), (val_deficit if part == "val" else deficit(images.images))
                s_w, memory = W(images.images, critic_part, bank)
                part_c = candidate(images.images)
                s_c = weight * critic_part / sigma_critic + part_c / sigma_candidate
                row[part] = {"W": float(roc_auc_score(y, s_w)), "memory": float(roc_auc_score(y, memory)),
                             f"W_{tag}": float(roc_auc_score(y, s_c)), f"memory_{tag}": float(roc_auc_score(y, part_c)),
                             "n": [int((y == 0).sum()), int((y == 1).sum())]}
                if args.relative_map and part == "val" and images.masks is not None:
                    maps = nearest_maps(det, images.images, bank)
                    masks, head = images.masks.numpy().astype(bool), foreground_mask(images.images.numpy())
                    row["val"]["pixel"] = pixel_auroc(maps.numpy(), masks, head)
                    row["val"]["pixel_R"] = pixel_auroc((maps - mu).numpy(), masks, head)
            print(run, json.dumps(row), flush=True)
            table[str(run)] = row
            continue
        folds = two_folds(x_a_train.records, seed=c.seed)
        others = list(split.healthy_holdout) + pool + list(split.val_abnormal) + list(split.unused)
        for k in (0, 1):
            this = [r for r, f in zip(x_a_train.records, folds) if f == k]
            other = x_a_train.subset(np.flatnonzero(folds != k))
            scored = load(per_label_sample(this + others, args.per_class, seed=c.seed + k))
            y, scored_deficit = np.asarray(scored.labels), deficit(scored.images)
            admitted, tau = healthy_looking(det, x_b, other.images)
            other_y = np.asarray(other.labels)
            banks = {"B": x_b, "U": torch.cat([x_b, other.images[admitted]]),
                     "healthy": torch.cat([x_b, other.images[torch.as_tensor(other_y == 0)]]),
                     "all": torch.cat([x_b, other.images])}
            fold = {"admitted": int(admitted.sum()), "admitted_lesions": int(other_y[admitted.numpy()].sum()),
                    "of": len(other_y), "lesions_in_other_fold": int(other_y.sum()), "tau": tau,
                    "n_scored": [int((y == 0).sum()), int((y == 1).sum())]}
            for name, bank_scans in banks.items():
                bank = det.healthy_patch_bank(bank_scans)
                s, memory = W(scored.images, scored_deficit, bank)
                fold[name] = {"W": float(roc_auc_score(y, s)), "memory": float(roc_auc_score(y, memory))}
                if k == 0 and name in ("B", "U"):  # the validation split is the same for both folds
                    s_val, _ = W(val.images, val_deficit, bank)
                    row[f"val_{name}"] = float(roc_auc_score(np.asarray(val.labels), s_val))
                    if val.masks is not None:
                        row[f"val_pixel_{name}"] = pixel_auroc(nearest_maps(det, val.images, bank).numpy(),
                                                               val.masks.numpy().astype(bool),
                                                               foreground_mask(val.images.numpy()))
            row[f"fold{k}"] = fold
            print(run, k, json.dumps(fold), flush=True)
        row["mean"] = {name: {m: float(np.mean([row[f"fold{k}"][name][m] for k in (0, 1)])) for m in ("W", "memory")}
                       for name in ("B", "U", "healthy", "all")}
        print(run, json.dumps({k: v for k, v in row.items() if not k.startswith("fold")}), flush=True)
        table[str(run)] = row
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
