from collections import Counter

import numpy as np
import pytest

from medgen.errors import MedgenError
from medgen.evaluation.splits import Splits, make_splits


def _cohort(n=120, classes=3, scans=1, seed=0):
    rng = np.random.default_rng(seed)
    subjects, labels = [], []
    for i in range(n):
        y = int(rng.integers(classes)) if i >= classes * 10 else i % classes
        for _ in range(scans):
            subjects.append(f"sub-{i:04d}")
            labels.append(y)
    return subjects, np.array(labels)


def test_no_subject_in_two_roles_and_folds_cover_the_rest():
    subjects, labels = _cohort(120, scans=2)
    sp = make_splits(subjects, labels, ["CN", "MCI", "AD"], folds=6, test_size=24, seed=3)
    assert len(sp.test) == 24
    all_ids = set(subjects)
    vals = []
    for f in sp.folds:
        tr, va, te = set(f.train), set(f.val), set(sp.test)
        assert not tr & va and not tr & te and not va & te
        assert tr | va | te == all_ids
        vals.extend(f.val)
    assert sorted(vals) == sorted(all_ids - set(sp.test))  # each non-test subject validates once


def test_grouped_scans_stay_together():
    subjects, labels = _cohort(60, scans=3)
    sp = make_splits(subjects, labels, ["a", "b", "c"], folds=4, test_size=0.2, seed=0)
    for k in range(4):
        for role in ("train", "val", "test"):
            idx = sp.indices(subjects, k, role)
            ids = {subjects[i] for i in idx}
            # all 3 scans of every subject in the role are selected
            assert len(idx) == 3 * len(ids)


def test_stratification_within_tolerance():
    subjects, labels = _cohort(180)
    sp = make_splits(subjects, labels, ["CN", "MCI", "AD"], folds=6, test_size=30, seed=1)
    by = dict(zip(subjects, labels.tolist(), strict=True))
    overall = Counter(labels.tolist())
    for group in [sp.test] + [f.val for f in sp.folds]:
        c = Counter(by[s] for s in group)
        for k, v in overall.items():
            assert abs(c[k] / len(group) - v / len(labels)) < 0.1


def test_deterministic_and_roundtrip(tmp_path):
    subjects, labels = _cohort(90)
    a = make_splits(subjects, labels, ["x", "y", "z"], folds=3, test_size=15, seed=7)
    b = make_splits(subjects, labels, ["x", "y", "z"], folds=3, test_size=15, seed=7)
    c = make_splits(subjects, labels, ["x", "y", "z"], folds=3, test_size=15, seed=8)
    assert a.to_dict() == b.to_dict() and a.to_dict() != c.to_dict()
    a.save(tmp_path / "splits.json")
    assert Splits.load(tmp_path / "splits.json").to_dict() == a.to_dict()


def test_too_few_subjects_of_a_class_is_one_clear_error():
    subjects = [f"s{i}" for i in range(40)]
    labels = np.array([0] * 20 + [1] * 16 + [2] * 4)
    with pytest.raises(MedgenError, match="class 'AD' has 4 subjects"):
        make_splits(subjects, labels, ["CN", "MCI", "AD"], folds=6, test_size=8, seed=0)


def test_two_classes_with_other_names():
    subjects = [f"p{i}" for i in range(30)]
    labels = np.array([0, 1] * 15)
    sp = make_splits(subjects, labels, ["healthy", "tumour"], folds=3, test_size=6, seed=0)
    assert len(sp.folds) == 3 and len(sp.test) == 6
