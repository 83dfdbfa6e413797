"""The HealthyGAN split protocol: sizes, determinism, disjoint roles, patients, manifests."""

from __future__ import annotations

import itertools

import pytest

from scanomaly.data import ABNORMAL, NORMAL, ImageRecord
from scanomaly.errors import ScanomalyError
from scanomaly.splits import (
    ROLES,
    HealthyGANSplit,
    make_healthygan_split,
    read_split_manifest,
    split_counts,
    write_split_manifest,
)

MAIN_ROLES = ("healthy", "healthy_holdout", "unlabeled", "val_abnormal", "test")


def flat_records(n_normal=200, n_abnormal=300, split=None):
    return [ImageRecord(f"/d/n{i:03d}.png", NORMAL, split) for i in range(n_normal)] + [
        ImageRecord(f"/d/a{i:03d}.png", ABNORMAL, split) for i in range(n_abnormal)
    ]


def keys(records):
    return {(r.path, r.index) for r in records}


def assert_partition(split, records):
    all_keys = [k for role in ROLES for k in keys(getattr(split, role))]
    assert len(all_keys) == len(set(all_keys)), "a record is in two roles"
    assert set(all_keys) == keys(records), "every record has exactly one role"


def test_sizes_follow_the_protocol():
    records = flat_records()
    s = make_healthygan_split(records, abnormal_fraction=0.3, healthy_fraction=0.5, holdout_fraction=0.1,
                              test_fraction=0.2, seed=0)
    assert_partition(s, records)
    c = split_counts(s)
    assert c["test"]["normal"] == 40 and c["test"]["abnormal"] == 60  # 20 % of each class
    # 160 training normals: 80 B-candidates (8 holdout, 72 healthy), 80 in A
    assert (c["healthy"]["n"], c["healthy_holdout"]["n"]) == (72, 8)
    assert c["healthy"]["abnormal"] == c["healthy_holdout"]["abnormal"] == 0
    assert c["unlabeled"]["normal"] == 80
    assert c["unlabeled"]["abnormal"] == round(80 * 0.3 / 0.7)
    assert c["unlabeled_abnormal_fraction"] == pytest.approx(0.3, abs=0.01)
    assert c["val_abnormal"]["n"] == c["val_abnormal"]["abnormal"] == 8  # default = len(healthy_holdout)
    assert s.val == s.healthy_holdout + s.val_abnormal and c["val"]["n"] == 16


def test_deterministic_by_seed_and_input_order():
    records = flat_records()
    a = make_healthygan_split(records, seed=3)
    b = make_healthygan_split(list(reversed(records)), seed=3)
    c = make_healthygan_split(records, seed=4)
    assert a == b
    assert a != c


def test_official_test_split_is_kept():
    train, test = flat_records(100, 100, "train"), flat_records(10, 15, "test")
    test = [ImageRecord(r.path.replace("/d/", "/t/"), r.label, "test") for r in test]
    s = make_healthygan_split(train + test, test_fraction=0.5)
    assert keys(s.test) == keys(test)
    assert_partition(s, train + test)


def test_val_abnormal_count_and_shortage_warning():
    s = make_healthygan_split(flat_records(), val_abnormal_count=20)
    assert len(s.val_abnormal) == 20
    with pytest.warns(UserWarning, match="abnormal"):
        s = make_healthygan_split(flat_records(200, 20), test_fraction=0.0)
    assert len(s.unlabeled) == 100 + 20 and not s.val_abnormal  # all abnormals used in A


def test_abnormal_fraction_zero_and_invalid_arguments():
    s = make_healthygan_split(flat_records(), abnormal_fraction=0.0)
    assert split_counts(s)["unlabeled"]["abnormal"] == 0
    with pytest.raises(ScanomalyError, match="abnormal_fraction"):
        make_healthygan_split(flat_records(), abnormal_fraction=1.0)
    with pytest.raises(ScanomalyError, match="healthy_fraction"):
        make_healthygan_split(flat_records(), healthy_fraction=0.0)
    with pytest.raises(ScanomalyError, match="no label"):
        make_healthygan_split([ImageRecord("/x.png")])
    with pytest.raises(ScanomalyError, match="normal training images"):
        make_healthygan_split(flat_records(0, 10))


def patient_records(n_normal_only=30, n_mixed=30, slices=6, seed_offset=0):
    """Patients with only normal slices, and patients with both normal and abnormal slices."""
    recs = []
    for p in range(n_normal_only):
        recs += [ImageRecord(f"/p/N{p}_{k}.png", NORMAL, patient_id=f"N{p}") for k in range(slices)]
    for p in range(n_mixed):
        recs += [ImageRecord(f"/p/M{p}_{k}.png", ABNORMAL if k % 2 else NORMAL, patient_id=f"M{p}")
                 for k in range(slices)]
    return recs


def assert_patients_disjoint(split):
    pats = {role: {r.patient_id for r in getattr(split, role)} for role in MAIN_ROLES}
    for a, b in itertools.combinations(MAIN_ROLES, 2):
        assert not pats[a] & pats[b], f"patients in both {a} and {b}: {pats[a] & pats[b]}"


def test_patient_grouping():
    records = patient_records()
    s = make_healthygan_split(records, seed=1)
    assert_partition(s, records)
    assert_patients_disjoint(s)
    assert all(r.label == NORMAL for r in s.healthy + s.healthy_holdout)
    assert all(r.label == ABNORMAL for r in s.val_abnormal) and s.val_abnormal
    assert s.healthy_holdout and s.unlabeled and s.test
    c = split_counts(s)
    assert c["unlabeled_abnormal_fraction"] == pytest.approx(0.3, abs=0.05)
    assert c["test"]["patients"] > 0


def test_every_patient_mixed_like_lgg():
    records = patient_records(n_normal_only=0, n_mixed=40, slices=10)
    s = make_healthygan_split(records, seed=0)
    assert_partition(s, records)
    assert_patients_disjoint(s)
    c = split_counts(s)
    assert c["healthy"]["n"] > 0 and c["unlabeled"]["abnormal"] > 0 and c["val_abnormal"]["n"] > 0
    assert c["unlabeled_abnormal_fraction"] == pytest.approx(0.3, abs=0.05)


def test_official_split_patient_leak_goes_unused():
    records = patient_records(10, 10, 4)
    records = [ImageRecord(r.path, r.label, "test" if r.patient_id in ("N0", "M0") else "train",
                           patient_id=r.patient_id) for r in records]
    records.append(ImageRecord("/p/N0_leak.png", NORMAL, "train", patient_id="N0"))
    with pytest.warns(UserWarning, match="official test split"):
        s = make_healthygan_split(records)
    assert "/p/N0_leak.png" in {r.path for r in s.unused}
    assert_patients_disjoint(s)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_manifest_round_trip(tmp_path):
    records = patient_records(8, 8, 3) + [
        ImageRecord("/v/vol.nii.gz", NORMAL, "train", index=k) for k in range(10)
    ] + [ImageRecord("/m/a.png", ABNORMAL, None, patient_id="Z", mask_path="/m/masks/a.png")]
    s = make_healthygan_split(records, seed=5)
    path = write_split_manifest(s, tmp_path / "run" / "split.csv")
    back = read_split_manifest(path)
    assert back == s
    assert path.read_text().splitlines()[0] == "path,label,role,patient_id,split,index,mask_file"


def test_read_split_manifest_errors(tmp_path):
    with pytest.raises(ScanomalyError, match="no such"):
        read_split_manifest(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("path,label,role\n/a.png,0,training\n")
    with pytest.raises(ScanomalyError, match="unknown role"):
        read_split_manifest(tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("path,label\n/a.png,0\n")
    with pytest.raises(ScanomalyError, match="not a split manifest"):
        read_split_manifest(tmp_path / "nocol.csv")


def test_empty_split_counts():
    c = split_counts(HealthyGANSplit())
    assert c["healthy"]["n"] == 0 and c["unlabeled_abnormal_fraction"] == 0.0


def test_real_chest_slice(chest_slice):
    s = make_healthygan_split(chest_slice, seed=0)
    assert keys(s.test) == keys(r for r in chest_slice if r.split == "test")
    assert_partition(s, chest_slice)
    assert len(s.healthy) + len(s.healthy_holdout) == 6
