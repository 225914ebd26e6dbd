"""Subject-level splits for cv-evaluate: a held-out test set first, then K stratified folds.

Everything is split by subject, never by scan, so repeated scans of one subject always share a role.
Each subject gets one stratification label: its most frequent class (ties: the lowest class index),
which covers longitudinal data where a subject's diagnosis changes between scans. Splitting the
subject list with StratifiedShuffleSplit / StratifiedKFold is StratifiedGroupKFold on the scans
with exact per-subject stratification.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from medgen.errors import MedgenError
from medgen.outputs import atomic_write_json

ROLES = ("train", "val", "test")


@dataclass
class Fold:
    """Subject ids of one fold: (K-1)/K of the non-test subjects train, 1/K validate."""

    index: int
    train: list[str]
    val: list[str]


@dataclass
class Splits:
    """The held-out test subjects and the K folds over the remaining subjects."""

    seed: int
    test: list[str]
    folds: list[Fold]
    class_names: list[str]

    def subjects(self, fold: int, role: str) -> list[str]:
        """Subject ids of `role` (train, val or test) in fold `fold`."""
        if role == "test":
            return list(self.test)
        if role not in ROLES:
            raise MedgenError(f"unknown split role {role!r}; use one of {', '.join(ROLES)}")
        return list(getattr(self.folds[fold], role))

    def indices(self, subjects: list[str], fold: int, role: str) -> np.ndarray:
        """Positions in a per-scan subject list whose subject has `role` in fold `fold`."""
        keep = set(self.subjects(fold, role))
        return np.array([i for i, s in enumerate(subjects) if s in keep], dtype=np.int64)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "class_names": list(self.class_names),
            "test": list(self.test),
            "folds": [{"fold": f.index, "train": list(f.train), "val": list(f.val)} for f in self.folds],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Splits:
        return cls(seed=int(d["seed"]), test=list(d["test"]), class_names=list(d["class_names"]),
                   folds=[Fold(index=int(f["fold"]), train=list(f["train"]), val=list(f["val"]))
                          for f in d["folds"]])

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MedgenError(f"{path}: not a readable splits file ({type(e).__name__}: {e})") from e


def subject_labels(subjects: list[str], labels: list[int] | np.ndarray) -> dict[str, int]:
    """One stratification label per subject: its most frequent class (ties -> lowest index)."""
    per: dict[str, Counter] = {}
    for s, y in zip(subjects, np.asarray(labels).tolist(), strict=True):
        per.setdefault(s, Counter())[int(y)] += 1
    return {s: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for s, c in per.items()}


def _n_test(test_size: float, n_subjects: int) -> int:
    """test_size >= 1 is a subject count, below 1 a fraction of the subjects."""
    n = int(round(test_size)) if test_size >= 1 else int(round(test_size * n_subjects))
    return n


def make_splits(subjects: list[str], labels: list[int] | np.ndarray, class_names: list[str], *,
                folds: int = 6, test_size: float = 60, seed: int = 0) -> Splits:
    """Split subjects into a stratified held-out test set and K stratified folds (deterministic in seed).

    Args:
        subjects: subject id per scan (repeated scans share an id).
        labels: class index per scan.
        class_names: names of the classes (index = label), for error messages.
        folds: number of cross-validation folds K (2 or more).
        test_size: held-out test subjects: a count (>= 1) or a fraction of all subjects (< 1).
        seed: random seed of both splitters.
    """
    if folds < 2:
        raise MedgenError(f"cv.folds must be 2 or more, got {folds}")
    by_subject = subject_labels(subjects, labels)
    ids = sorted(by_subject)
    y = np.array([by_subject[s] for s in ids])
    counts = Counter(y.tolist())
    present = sorted(counts)
    if len(present) < 2:
        raise MedgenError(f"the data has subjects of only one class ({class_names[present[0]]!r}); "
                          "cv-evaluate needs two or more classes")
    n_test = _n_test(test_size, len(ids))
    if n_test < len(present):
        raise MedgenError(f"cv.test_size={test_size:g} gives {n_test} test subjects, fewer than the "
                          f"{len(present)} classes; a stratified test set needs at least one per class")
    # Each class needs a test subject plus `folds` subjects for the folds (StratifiedKFold needs K per class).
    for c in present:
        need = folds + max(1, int(np.ceil(n_test * counts[c] / len(ids))))
        if counts[c] < need:
            raise MedgenError(f"class {class_names[c]!r} has {counts[c]} subjects; {folds} folds plus a "
                              f"held-out test set need at least {need} (use fewer --folds or more data)")
    if n_test >= len(ids) - folds * len(present):
        raise MedgenError(f"cv.test_size={test_size:g} leaves too few of the {len(ids)} subjects for {folds} folds")
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_test, random_state=seed)
    rest_pos, test_pos = next(sss.split(np.zeros(len(ids)), y))
    rest_ids = [ids[i] for i in sorted(rest_pos)]
    rest_y = np.array([by_subject[s] for s in rest_ids])
    rest_counts = Counter(rest_y.tolist())
    for c in present:
        if rest_counts.get(c, 0) < folds:
            raise MedgenError(f"class {class_names[c]!r} has {rest_counts.get(c, 0)} subjects outside the test "
                              f"set; {folds} folds need at least {folds} (use fewer --folds or more data)")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for k, (tr, va) in enumerate(skf.split(np.zeros(len(rest_ids)), rest_y)):
        out.append(Fold(index=k, train=sorted(rest_ids[i] for i in tr), val=sorted(rest_ids[i] for i in va)))
    return Splits(seed=seed, test=sorted(ids[i] for i in test_pos), folds=out, class_names=list(class_names))


def holdout_split(subjects: list[str], labels: list[int] | np.ndarray, class_names: list[str], *,
                  holdout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out a share of every class's subjects (stratified, subject-level, deterministic in seed).

    Args:
        subjects: subject id per scan (repeated scans share an id).
        labels: class index per scan.
        class_names: names of the classes (index = label), for error messages.
        holdout: share of the subjects held out, in (0, 1).
        seed: random seed of the splitter.
    Returns:
        (training subject ids, held-out subject ids), each sorted.
    """
    if not 0.0 < holdout < 1.0:
        raise MedgenError(f"train.holdout must be in (0, 1), got {holdout!r}")
    by_subject = subject_labels(subjects, labels)
    ids = sorted(by_subject)
    y = np.array([by_subject[s] for s in ids])
    counts = Counter(y.tolist())
    for c, k in sorted(counts.items()):
        if k < 2:
            raise MedgenError(f"class {class_names[c]!r} has {k} subject; holding out a share of every class "
                              "needs at least 2 per class")
    n_out = max(len(counts), int(round(holdout * len(ids))))
    if n_out > len(ids) - len(counts):
        raise MedgenError(f"train.holdout={holdout:g} of {len(ids)} subjects leaves too few to train on")
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_out, random_state=seed)
    keep, out = next(sss.split(np.zeros(len(ids)), y))
    return sorted(ids[i] for i in keep), sorted(ids[i] for i in out)


def training_selection(subjects: list[str], labels: list[int] | np.ndarray, class_names: list[str], *,
                       classes: list[str] | None = None, holdout: float = 0.0,
                       seed: int = 0) -> tuple[np.ndarray, dict]:
    """Which scans `medgen train` trains on: a held-out share of every class's subjects left out (holdout_split),
    then only the scans of `classes` kept.

    Args:
        subjects: subject id per scan.
        labels: class index per scan.
        class_names: the data's class names.
        classes: class names to train on (None: all).
        holdout: share of subjects held out (0: none).
        seed: seed of the held-out split.
    Returns:
        (positions of the training scans, the record written to RUN/split.json: the rule, the training and the
        held-out subject ids).
    """
    labels = np.asarray(labels)
    keep_classes = list(class_names) if not classes else list(dict.fromkeys(classes))
    for name in keep_classes:
        if name not in class_names:
            raise MedgenError(f"--classes: unknown class {name!r}; the data has classes: {', '.join(class_names)}")
    held: list[str] = []
    if holdout > 0:
        _, held = holdout_split(subjects, labels, class_names, holdout=holdout, seed=seed)
    held_set = set(held)
    wanted = {class_names.index(n) for n in keep_classes}
    by_subject = subject_labels(subjects, labels)
    pos = np.array([i for i, s in enumerate(subjects) if s not in held_set and by_subject[s] in wanted],
                   dtype=np.int64)
    if len(pos) == 0:
        raise MedgenError(f"no training scans left: classes {', '.join(keep_classes)} with holdout {holdout:g}")
    train_ids = sorted({subjects[i] for i in pos})
    record = {
        "rule": (f"subjects of every class held out: {holdout:g} (stratified, seed {seed}); of the rest, "
                 f"the classes {', '.join(keep_classes)} train"),
        "classes": keep_classes, "holdout": holdout, "seed": seed, "class_names": list(class_names),
        "train": train_ids, "held_out": held,
        "held_out_per_class": {n: sum(by_subject[s] == i for s in held) for i, n in enumerate(class_names)},
        "train_per_class": {n: sum(by_subject[s] == i for s in train_ids) for i, n in enumerate(class_names)},
    }
    return pos, record
