"""BIDS metadata files shared by the phantom (raw dataset) and synth (derivative) folders.

Only the files the specification asks for at the top of a dataset: dataset_description.json,
participants.tsv with its participants.json column descriptions, README, and .bidsignore for medgen's
own extra files (datalist.json, phantom.json). Written by hand because pybids reads datasets but does
not write them; the official validator (`bids-validator-deno`) checks the result in the tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import medgen
from medgen.outputs import atomic_write_json, atomic_write_text

BIDS_VERSION = "1.10.0"


def generated_by(description: str) -> list[dict[str, str]]:
    """The GeneratedBy entry naming medgen and its version."""
    return [{"Name": "medgen", "Version": medgen.__version__, "Description": description}]


def write_dataset_description(folder: str | os.PathLike, name: str, *, dataset_type: str = "raw",
                              generated: str | None = None, source_datasets: Sequence[Mapping[str, str]] = (),
                              **extra: Any) -> None:
    """dataset_description.json: Name, BIDSVersion, DatasetType, GeneratedBy, SourceDatasets, then `extra`."""
    desc: dict[str, Any] = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": dataset_type}
    if generated is not None:
        desc["GeneratedBy"] = generated_by(generated)
    if source_datasets:
        desc["SourceDatasets"] = [dict(s) for s in source_datasets]
    desc.update(extra)
    atomic_write_json(Path(folder) / "dataset_description.json", desc)


def write_participants(folder: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                       descriptions: Mapping[str, Any]) -> None:
    """participants.tsv (first column participant_id, "n/a" for a missing value) and participants.json.

    Args:
        folder: the dataset root.
        rows: one mapping per participant, each with "participant_id" and the same other keys.
        descriptions: column -> description (a string, or a full BIDS column object with Levels/Units).
    """
    header = list(rows[0])
    if header[0] != "participant_id":
        header.remove("participant_id")
        header.insert(0, "participant_id")
    lines = ["\t".join(header)]
    for r in rows:
        lines.append("\t".join("n/a" if r.get(h) in (None, "") else str(r[h]) for h in header))
    atomic_write_text(Path(folder) / "participants.tsv", "\n".join(lines) + "\n")
    columns = {h: (d if isinstance(d, Mapping) else {"Description": d})
               for h in header if h != "participant_id" and (d := descriptions.get(h)) is not None}
    if columns:
        atomic_write_json(Path(folder) / "participants.json", columns)


def write_bidsignore(folder: str | os.PathLike, patterns: Iterable[str]) -> None:
    """.bidsignore: medgen's extra files (MONAI datalist, generator metadata) that BIDS does not define."""
    atomic_write_text(Path(folder) / ".bidsignore", "".join(f"{p}\n" for p in patterns))


def write_readme(folder: str | os.PathLike, text: str) -> None:
    """README (recommended at a dataset's root)."""
    atomic_write_text(Path(folder) / "README", text.rstrip() + "\n")
