"""Localisation metrics (localization.py), masks through preprocessing, patient grouping, and the
lgg_flair benchmark path end to end on a few dozen real slices."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scanomaly import localization as loc
from scanomaly.data import ABNORMAL, NORMAL, ImageRecord, discover, load_images
from scanomaly.errors import ScanomalyError
from scanomaly.preprocess import INTENSITY_MODES, Preprocessing
from scanomaly.splits import ROLES, make_healthygan_split


# ------------------------------------------------------------------------------------------
# small hand-made maps
# ------------------------------------------------------------------------------------------
def hand_made(seed: int = 0, n: int = 5, size: int = 12):
    """Masks with one or two lesions per slice (slice 0 has none), and noisy maps that are higher
    on the lesions; values rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[1, 2:5, 2:6] = True
    masks[2, 7:10, 1:3] = True
    masks[2, 1:2, 9:11] = True  # a second, small region
    masks[3, 4:9, 4:9] = True
    masks[4, 10:12, 10:12] = True
    maps = np.round(masks * 0.8 + rng.normal(0, 0.4, masks.shape), 1).astype(np.float32)
    return maps, masks


def auroc_pairwise(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), over every pair."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def pro_by_sweep(maps, masks, fpr_limit=0.3, region=None):
    """The PRO curve threshold by threshold with plain numpy (one pass per distinct value), then
    the normalised area up to fpr_limit."""
    from scipy import ndimage

    region = np.ones_like(masks) if region is None else region
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i] & region[i], structure=np.ones((3, 3), int))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    neg = maps[region & ~masks]
    pts = [(0.0, 0.0)]
    for t in np.sort(np.unique(maps[region]))[::-1]:
        fpr = float((neg >= t).mean())
        pro = float(np.mean([(maps[i][r] >= t).mean() for i, r in regions]))
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    keep = x <= fpr_limit
    xs, ys = list(x[keep]), list(y[keep])
    j = int(keep.sum())
    if j < len(x) and xs[-1] < fpr_limit:
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (fpr_limit - x[j - 1]) / (x[j] - x[j - 1]))
        xs.append(fpr_limit)
    xs, ys = np.array(xs), np.array(ys)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / fpr_limit)


def test_pixel_auroc_matches_direct_numpy():
    maps, masks = hand_made()
    expected = auroc_pairwise(maps[~masks], maps[masks])
    assert loc.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    region = np.zeros_like(masks)
    region[:, :, :8] = True
    expected = auroc_pairwise(maps[region & ~masks], maps[region & masks])
    assert loc.pixel_auroc(maps, masks, region) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ScanomalyError, match="lesion"):
        loc.pixel_auroc(maps, np.zeros_like(masks))


def test_pixel_auroc_subsamples_negatives_deterministically():
    rng = np.random.default_rng(1)
    masks = np.zeros((20, 32, 32), dtype=bool)
    masks[:, 10:14, 10:14] = True
    maps = (masks * 1.0 + rng.normal(0, 1.0, masks.shape)).astype(np.float32)
    full = loc.pixel_auroc(maps, masks, max_normal_pixels=None)
    a = loc.pixel_auroc(maps, masks, max_normal_pixels=5000)
    assert a == loc.pixel_auroc(maps, masks, max_normal_pixels=5000)  # same subset every time
    assert a == pytest.approx(full, abs=0.02)
    block = loc.evaluate_localization(maps, masks, region="all", max_normal_pixels=5000)
    assert block["normal_pixels_subsampled"] and block["normal_pixels_used"] == 5000
    assert block["n_lesion_pixels"] == int(masks.sum())


def test_aupro_perfect_inverted_and_random():
    _, masks = hand_made()
    perfect = masks.astype(np.float32)
    assert loc.aupro(perfect, masks) == pytest.approx(1.0)
    assert loc.aupro(1.0 - perfect, masks) < 0.05
    rng = np.random.default_rng(0)
    big = np.zeros((30, 32, 32), dtype=bool)
    big[:, 8:20, 8:20] = True
    random_map = rng.random(big.shape).astype(np.float32)
    # a random map has PRO ~ FPR: area 0.3^2 / 2, normalised: 0.15
    assert loc.aupro(random_map, big) == pytest.approx(0.15, abs=0.02)


def test_aupro_matches_a_threshold_sweep():
    maps, masks = hand_made(seed=3)
    for limit in (0.3, 0.1, 1.0):
        assert loc.aupro(maps, masks, fpr_limit=limit) == pytest.approx(pro_by_sweep(maps, masks, limit), abs=1e-9)
    region = np.zeros_like(masks)
    region[:, 1:, :] = True
    assert loc.aupro(maps, masks, region=region) == pytest.approx(pro_by_sweep(maps, masks, region=region), abs=1e-9)


def test_aupro_weighs_every_region_equally():
    """A map that finds only the small lesion of two: half the regions, though few of the pixels."""
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 2:4, 2:4] = True  # 4 px
    masks[0, 10:30, 10:30] = True  # 400 px
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 2:4, 2:4] = 1.0
    fpr, pro = loc.pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0
    # the next (and last) threshold flags everything: (1, 1); PRO at FPR 0.3 interpolates to 0.65
    assert loc.aupro(maps, masks) == pytest.approx(0.3 * (0.5 + 0.65) / 2 / 0.3)
    assert loc.pixel_auroc(maps, masks) < 0.6  # pixel-wise, the small lesion barely counts


def test_dice_matches_direct_numpy():
    maps, masks = hand_made(seed=2)
    t = 0.5
    got = loc.dice_scores(maps, masks, t)
    for i in range(len(maps)):
        p, g = maps[i] >= t, masks[i]
        if not g.any():
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()))
    p = maps >= t
    assert loc.dice_global(maps, masks, t) == pytest.approx(2 * (p & masks).sum() / (p.sum() + masks.sum()))
    region = np.ones_like(masks)
    region[:, :, 6:] = False
    got = loc.dice_scores(maps, masks, t, region)
    p, g = (maps[3] >= t) & region[3], masks[3] & region[3]
    assert got[3] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()))


def test_dice_threshold_is_chosen_on_validation_not_test():
    val_maps, val_masks = hand_made(seed=4)
    thr, val_dice, n = loc.choose_dice_threshold(val_maps, val_masks)
    assert n == 4  # the slices with a lesion
    # no threshold on a fine grid beats the chosen one on validation
    grid = np.linspace(val_maps.min() - 0.1, val_maps.max() + 0.1, 400)
    brute = max(np.nanmean(loc.dice_scores(val_maps, val_masks, g)) for g in grid)
    assert val_dice >= brute - 1e-9
    assert val_dice == pytest.approx(np.nanmean(loc.dice_scores(val_maps, val_masks, thr)))
    # test maps on another scale: the validation threshold is applied as is
    test_maps, test_masks = hand_made(seed=5)
    test_maps = test_maps * 3.0 + 1.0
    block = loc.evaluate_localization(test_maps, test_masks, val_maps=val_maps, val_masks=val_masks, region="all")
    assert block["dice_threshold"] == pytest.approx(thr)
    assert block["dice"] == pytest.approx(np.nanmean(loc.dice_scores(test_maps, test_masks, thr)))
    assert block["val_dice"] == pytest.approx(val_dice)
    test_best = max(np.nanmean(loc.dice_scores(test_maps, test_masks, g * 3 + 1)) for g in grid)
    assert block["dice"] < test_best  # what an oracle on test would have reported
    assert "validation" in block["dice_threshold_source"]


def test_foreground_mask_is_the_filled_head():
    yy, xx = np.mgrid[0:64, 0:64]
    head = (yy - 32) ** 2 + (xx - 30) ** 2 < 24**2
    ventricle = (yy - 32) ** 2 + (xx - 30) ** 2 < 5**2
    rng = np.random.default_rng(0)
    img = np.where(head & ~ventricle, 0.7, 0.0) + rng.uniform(0, 0.03, head.shape)
    img[2:4, 2:4] = 0.9  # a bright speck outside the head: not the largest component
    fg = loc.foreground_mask((img * 2 - 1)[None, None])[0]
    assert (fg == head).mean() > 0.99 and fg[ventricle].all() and not fg[2:4, 2:4].any()
    assert loc.foreground_mask(-np.ones((1, 8, 8))).all()  # an empty slice is evaluated everywhere


def test_evaluate_localization_reports_both_regions():
    maps, masks = hand_made()
    images = np.where(np.arange(12)[None, None, :] < 9, 0.5, -1.0) * np.ones((5, 1, 12, 12))  # head: columns < 9
    block = loc.evaluate_localization(maps, masks, images, maps, masks, images)
    assert block["region"] == "foreground" and "all_pixels" in block
    region = images[:, 0] > 0
    assert block["pixel_auroc"] == pytest.approx(loc.pixel_auroc(maps, masks, region))
    assert block["all_pixels"]["pixel_auroc"] == pytest.approx(loc.pixel_auroc(maps, masks))
    assert block["lesion_pixels_outside_region"] == pytest.approx((masks & ~region).sum() / masks.sum())
    assert block["n_regions"] == loc._regions(masks & region)[1]
    for k in ("pixel_auroc", "aupro", "dice", "dice_global"):
        assert 0.0 <= block[k] <= 1.0


# ------------------------------------------------------------------------------------------
# masks stay aligned with their images
# ------------------------------------------------------------------------------------------
def _write_pair(root: Path, h: int, w: int):
    """A non-square scan with a bright off-centre L-shaped lesion and its mask (same geometry)."""
    yy, xx = np.mgrid[0:h, 0:w]
    lesion = ((yy > 0.35 * h) & (yy < 0.75 * h) & (xx > 0.3 * w) & (xx < 0.5 * w)) | \
             ((yy > 0.6 * h) & (yy < 0.75 * h) & (xx >= 0.5 * w) & (xx < 0.7 * w))
    img = np.where(lesion, 230, 40 + (xx * 40 // w)).astype(np.uint8)
    (root / "abnormal").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "normal").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / "abnormal" / "a.png")
    Image.fromarray((lesion * 255).astype(np.uint8)).save(root / "masks" / "a.png")
    Image.fromarray(np.full((h, w), 40, np.uint8)).save(root / "normal" / "n.png")


@pytest.mark.parametrize("shape", [(60, 90), (90, 60)])
@pytest.mark.parametrize("image_size", [24, 37, 64])
@pytest.mark.parametrize("top_crop,center_crop", [(0.0, True), (0.15, True), (0.0, False), (0.2, False)])
def test_masks_stay_aligned_through_preprocessing(tmp_path, shape, image_size, top_crop, center_crop):
    _write_pair(tmp_path, *shape)
    # Histogram equalisation ranks intensities: the small lesion's level lands just above the brightest
    # background's, so a brightness threshold no longer outlines it. Its geometry is the same code path;
    # below, its masks must equal the others' and the lesion must stay the brightest region on average.
    masks_by_mode = {}
    for intensity in INTENSITY_MODES:
        for channels in (1, 3):
            prep = Preprocessing(image_size=image_size, channels=channels, top_crop=top_crop,
                                 center_crop=center_crop, intensity=intensity)
            s = load_images(discover(tmp_path), prep, progress=False)
            i = [r.label for r in s.records].index(ABNORMAL)
            mask = s.masks[i].numpy()
            assert mask.shape == (image_size, image_size) and s.images.shape[-2:] == mask.shape
            assert not s.masks[1 - i].any()  # the normal image: an all-False mask
            img = s.images[i].numpy().mean(0)
            masks_by_mode.setdefault(intensity, mask)
            if intensity == "equalize":
                assert np.array_equal(mask, masks_by_mode["none"])
                if mask.any() and (~mask).any():
                    assert img[mask].mean() > img[~mask].mean() + 0.5
                continue
            bright = img > (img.max() + np.median(img)) / 2
            if not mask.any():
                assert not bright.any() or bright.mean() < 0.01, "the crop removed the lesion from the mask only"
                continue
            iou = (bright & mask).sum() / (bright | mask).sum()
            assert iou > 0.75, (intensity, channels, iou)
            cy, cx = (np.argwhere(mask).mean(0) - np.argwhere(bright).mean(0))
            assert abs(cy) < 1.0 and abs(cx) < 1.0


# ------------------------------------------------------------------------------------------
# patients and slice positions
# ------------------------------------------------------------------------------------------
def lgg_like_records(n_patients=40, seed=0):
    """Every patient has normal and abnormal slices, as in lgg_flair."""
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        n_norm, n_abn = int(rng.integers(6, 30)), int(rng.integers(3, 20))
        recs += [ImageRecord(f"/d/normal/P{p}__{k}.png", NORMAL, patient_id=f"P{p}") for k in range(n_norm)]
        recs += [ImageRecord(f"/d/abnormal/P{p}__{k}.png", ABNORMAL, patient_id=f"P{p}",
                             mask_path=f"/d/masks/P{p}__{k}.png") for k in range(n_abn)]
    return recs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("test_fraction,abnormal_fraction", [(0.2, 0.3), (0.3, 0.1), (0.1, 0.5)])
def test_patient_splits_never_share_a_patient(seed, test_fraction, abnormal_fraction):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = make_healthygan_split(lgg_like_records(seed=seed), abnormal_fraction=abnormal_fraction,
                                      test_fraction=test_fraction, seed=seed)
    roles = [r for r in ROLES if r != "unused"]
    patients = {r: {x.patient_id for x in getattr(split, r)} for r in roles}
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not patients[a] & patients[b], (a, b)
    assert patients["healthy"] and patients["unlabeled"] and patients["test"]
    assert all(r.label == NORMAL for r in split.healthy + split.healthy_holdout)


def test_patient_level_and_per_patient():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.35, 0.2])
    labels = np.array([0, 1, 0, 1, 0, 0, 0])
    ids = ["A", "A", "B", "B", "C", "C", "D"]
    pl = loc.patient_level(scores, labels, ids, k=1)
    assert pl["available"] and pl["n_patients"] == 4 and pl["n_abnormal_patients"] == 2
    assert pl["auroc_max"] == 1.0 and pl["auroc_topk_mean"] == 1.0
    # mean: A 0.5, B 0.5 vs C 0.325, D 0.2
    assert pl["auroc_mean"] == 1.0
    only_abnormal = loc.patient_level(scores[:4], labels[:4], ids[:4])
    assert not only_abnormal["available"] and only_abnormal["auroc_mean"] is None and "abnormal" in only_abnormal["note"]
    rows = loc.per_patient(scores, labels, ids)
    by = {r["patient_id"]: r for r in rows}
    assert by["A"]["slice_auroc"] == 1.0 and by["C"]["slice_auroc"] is None
    summary = loc.summarize_per_patient(rows)
    assert summary["n_patients"] == 4 and summary["slice_auroc"]["n"] == 2


def test_slice_positions_from_the_manifest(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "file,label,patient_id,slice_index,n_slices\n"
        "normal/a__1.png,normal,a,1,10\nabnormal/a__5.png,abnormal,a,5,10\nnormal/b__9.png,normal,b,9,10\n")
    pos = loc.read_slice_positions(tmp_path)
    assert pos[os.path.normpath(str(tmp_path / "abnormal/a__5.png"))] == pytest.approx(0.45)
    assert pos[os.path.normpath(str(tmp_path / "normal/a__1.png"))] == pytest.approx(0.05)
    assert loc.read_slice_positions(tmp_path / "nothing_here") == {}
    recs = [ImageRecord(str(tmp_path / "abnormal/a__5.png"), 1), ImageRecord(str(tmp_path / "other.png"), 0)]
    p = loc.positions_of(recs, pos)
    assert p[0] == pytest.approx(0.45) and np.isnan(p[1])


def test_slice_matched_and_position_only_baseline():
    rng = np.random.default_rng(0)
    # normals low in the head, abnormals in the middle: position alone separates them
    pos = np.r_[rng.uniform(0.0, 0.5, 200), rng.uniform(0.3, 0.8, 200)]
    labels = np.r_[np.zeros(200, int), np.ones(200, int)]
    scores = pos + rng.normal(0, 0.05, 400)  # a "detector" that only sees anatomy
    val_pos = np.r_[rng.uniform(0.0, 0.5, 100), rng.uniform(0.3, 0.8, 100)]
    val_labels = np.r_[np.zeros(100, int), np.ones(100, int)]
    sm = loc.slice_matched(scores, labels, pos, val_labels, val_pos)
    inside = (pos >= 1 / 3) & (pos < 2 / 3)
    assert sm["n"] == int(inside.sum()) and sm["n_abnormal"] == int(labels[inside].sum())
    assert sm["auroc_all"] > 0.85 and sm["position_only_auroc"] > 0.85
    assert sm["auroc"] < sm["auroc_all"] - 0.1  # matching takes much of the anatomy away
    assert sm["median_position_normal"] < sm["median_position_abnormal"]
    # within a tenth of the volume position cannot separate: the anatomy-only detector falls to ~0.5
    assert sm["auroc_position_bins"] < 0.7 and sm["n_pairs_position_bins"] > 0
    auc, pairs = loc.position_binned_auroc(pos, labels, pos)
    b = np.clip(np.digitize(pos, np.linspace(0, 1, 11)) - 1, 0, 9)
    pairs_direct = [(p, n) for p in np.flatnonzero(labels == 1) for n in np.flatnonzero(labels == 0) if b[p] == b[n]]
    assert pairs == len(pairs_direct)
    assert auc == pytest.approx(np.mean([(pos[p] > pos[n]) + 0.5 * (pos[p] == pos[n]) for p, n in pairs_direct]))


# ------------------------------------------------------------------------------------------
# end to end on real lgg_flair slices
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lgg_subset(tmp_path_factory):
    from conftest import DATA_ROOT

    src = DATA_ROOT / "lgg_flair"
    if not (src / "manifest.csv").is_file():
        pytest.skip(f"{src} not found (expected ../shared/data/lgg_flair beside the repository)")
    with open(src / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
        fields = list(rows[0])
    patients = sorted({r["patient_id"] for r in rows})[:: max(1, len({r["patient_id"] for r in rows}) // 12)][:12]
    root = tmp_path_factory.mktemp("lgg") / "lgg_small"
    kept = []
    for p in patients:
        mine = sorted((r for r in rows if r["patient_id"] == p), key=lambda r: int(r["slice_index"]))
        normal = [r for r in mine if r["label"] == "normal"]
        abnormal = [r for r in mine if r["label"] == "abnormal"]
        kept += normal[:: max(1, len(normal) // 3)][:3] + abnormal[:: max(1, len(abnormal) // 3)][:3]
    for r in kept:
        for rel in (r["file"], r["mask_file"]):
            if rel:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src / rel, root / rel)
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)
    return root


def test_lgg_benchmark_reports_localization(lgg_subset, tmp_path):
    from scanomaly.benchmark import run_benchmark

    out = tmp_path / "bench"
    results = run_benchmark(lgg_subset, ["padim"], out, profile="tiny", seeds=1, n_bootstrap=20, progress=False,
                            config_overrides={"preprocessing.intensity": "percentile"})
    from scanomaly.report import build_report

    build_report(out)
    run = results["runs"][0]
    assert run["status"] == "ok", run.get("error")
    run_dir = out / run["dir"]
    result = json.loads((run_dir / "result.json").read_text())
    block = result["localization"]
    assert block["region"] == "foreground" and block["map_size"] == [64, 64]
    for key in ("pixel_auroc", "aupro", "dice", "dice_global"):
        assert 0.0 <= block[key] <= 1.0, key
        assert 0.0 <= block["all_pixels"][key] <= 1.0, key
    assert np.isfinite(block["dice_threshold"]) and "validation" in block["dice_threshold_source"]
    assert block["n_lesion_images"] == result["split"]["test"]["abnormal"] and block["n_regions"] > 0
    assert block["lesion_pixels_outside_region"] < 0.05  # lesions lie inside the head
    assert 0.2 < block["foreground_fraction"] < 0.95
    # per-image normalisation is part of the preprocessing saved with the model
    assert result["preprocessing"]["intensity"] == "percentile"
    assert json.loads((run_dir / "model" / "model.json").read_text())["preprocessing"]["intensity"] == "percentile"
    sm = result["slice_matched"]
    assert sm["n_with_position"] == result["split"]["test"]["n"] and sm["position_only_auroc"] is not None
    assert result["patient_level"]["n_patients"] == result["split"]["test"]["patients"]
    assert not result["patient_level"]["available"]  # every lgg patient has lesion slices
    assert (run_dir / loc.PER_PATIENT_FILE).is_file() and result["per_patient"]["n_patients"] >= 1
    # the gallery: the run's own test masks, aligned with its images
    g = loc.load_gallery(run_dir / loc.GALLERY_FILE)
    assert g["maps"].dtype == np.float16 and g["masks"].shape == g["maps"].shape == g["images"].shape
    assert (g["labels"] == 1).sum() >= 1 and all(g["masks"][i].any() == (g["labels"][i] == 1) for i in range(len(g["labels"])))
    recs = [ImageRecord(str(p), int(y), mask_path=str(p).replace("/abnormal/", "/masks/") if y == 1 else None)
            for p, y in zip(g["paths"], g["labels"])]
    direct = load_images(recs, Preprocessing(image_size=64, intensity="percentile"), progress=False)
    assert np.array_equal(direct.masks.numpy(), g["masks"])
    # tables, CSV and report
    assert run["metrics"]["pixel_auroc"] == pytest.approx(block["pixel_auroc"])
    md = (out / "results.md").read_text()
    assert "## Localisation" in md and "Pixel AUROC" in md and "Anatomy check" in md
    rows = list(csv.DictReader(open(out / "results.csv", newline="")))
    assert float(rows[0]["aupro"]) == pytest.approx(block["aupro"])
    html = (out / "report.html").read_text()
    assert 'alt="localization gallery"' in html and "lesion outline" in html
