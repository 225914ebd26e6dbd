"""The data-check report (`medgen data-check`): read every file once and summarise what training would see."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from medgen.console import track
from medgen.data.datalist import (
    Datalist,
    mixed_label_subjects,
    read_datalist,
    subject_labels,
    too_few_message,
)
from medgen.data.inspection import inspect_volume


@dataclass
class DataReport:
    """What `medgen data-check` prints: counts per class, per-image facts, and problems.

    Attributes:
        data: the validated datalist.
        volumes: one VolumeInfo per record (raw file facts, before preprocessing).
        problems: one line each; any problem makes the data unusable as it is.
    """

    data: Datalist
    volumes: list[Any]
    problems: list[str]

    def notes(self) -> list[str]:
        """Facts worth knowing that do not stop the data being used (e.g. subjects with mixed labels)."""
        names = self.data.class_names
        chosen = subject_labels([r["label"] for r in self.data.records], [r["subject"] for r in self.data.records])
        return [f"subject {s} has scans labelled {', '.join(names[i] for i in labs)}: its scans stay together in one "
                f"split and it counts once, as {names[chosen[s]]} (its most frequent label)"
                for s, labs in sorted(mixed_label_subjects(self.data.records).items())]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        recs = self.data.records
        subjects = self.data.subjects_per_class()
        scans = self.data.scans_per_class()
        ok = [v for v in self.volumes if v.problem is None]

        def tally(values: list[str]) -> dict[str, int]:
            return dict(Counter(values).most_common())

        def fmt(t: tuple) -> str:
            return "x".join(f"{x:g}" for x in t)

        return {
            "source": str(self.data.source),
            "kind": self.data.kind,
            "scans": len(recs),
            "subjects": len({r["subject"] for r in recs}),
            "classes": [{"name": n, "subjects": subjects[n], "scans": scans[n]} for n in self.data.class_names],
            "tissue_maps": all("tissue" in r for r in recs),
            "shapes": tally([fmt(v.shape) for v in ok]),
            "spacings_mm": tally([fmt(v.spacing) for v in ok]),
            "orientations": tally([v.orientation for v in ok]),
            "dtypes": tally([v.dtype for v in ok]),
            "intensity": {
                "min": min((v.minimum for v in ok), default=None),
                "max": max((v.maximum for v in ok), default=None),
                "median_p0.5": float(median(v.p_low for v in ok)) if ok else None,
                "median_p99.5": float(median(v.p_high for v in ok)) if ok else None,
            },
            "problems": list(self.problems),
            "notes": self.notes(),
            "ok": not self.problems,
        }


def check_dataset(
    spec: str | Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
    folds: int | None = None,
    class_names: Sequence[str] | None = None,
) -> DataReport:
    """Validate a dataset without preprocessing it: the datalist (raises MedgenError), then every file.

    Args:
        spec, image_column, label_column, group_column, class_names: as in read_datalist.
        folds: when given, every class needs at least this many subjects.
    """
    data = read_datalist(spec, image_column=image_column, label_column=label_column,
                         group_column=group_column, class_names=class_names)
    volumes, problems = [], []
    for rec in track(data.records, "checking images"):
        for key in ("image", "tissue"):
            if key in rec:
                info = inspect_volume(rec[key])
                if key == "image":
                    volumes.append(info)
                if info.problem:
                    problems.append(info.problem)
    if folds is not None:
        for name, n in data.subjects_per_class().items():
            if n < folds:
                problems.append(too_few_message(name, n, folds, f"{folds} folds"))
    return DataReport(data=data, volumes=volumes, problems=problems)
