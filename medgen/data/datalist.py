"""User data -> validated records: a `medgen phantom` folder, a MONAI datalist JSON, or a CSV/TSV table.

Every record is a dict `image` (absolute path), `label` (int index into class_names), `subject` (str; repeated
scans of one person share it) and, where the source has tissue maps, `tissue` (absolute path). Every problem
raises MedgenError with one line naming the file and the row/entry.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgen.data.dataset import DEFAULT_CLASS_NAMES
from medgen.errors import MedgenError

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
KINDS_HELP = "not a phantom folder, datalist JSON, CSV/TSV table or scenes folder"


@dataclass
class Datalist:
    """Validated records read from one source.

    Attributes:
        records: one dict per scan: image, label, subject[, tissue].
        class_names: class name per label index.
        source: the file that was read (datalist.json inside a phantom folder).
        kind: "phantom", "datalist" or "table".
        where: per record, the file and row/entry it came from (for messages).
    """

    records: list[dict[str, Any]]
    class_names: list[str]
    source: Path
    kind: str
    where: list[str] = field(default_factory=list)

    def scans_per_class(self) -> dict[str, int]:
        counts = Counter(r["label"] for r in self.records)
        return {name: counts.get(i, 0) for i, name in enumerate(self.class_names)}

    def subjects_per_class(self) -> dict[str, int]:
        return subjects_per_class(self.records, self.class_names)


def detect_kind(spec: str | Path) -> str:
    """Which kind of data `spec` names: "phantom", "scenes", "datalist" or "table".

    Args:
        spec: the --data value.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise MedgenError(f"--data {spec}: no such file or folder")
    if path.is_dir():
        if (path / "scenes.json").is_file():
            return "scenes"
        if (path / "datalist.json").is_file():
            return "phantom"
        raise MedgenError(f"--data {spec}: {KINDS_HELP} (a folder needs datalist.json or scenes.json)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "datalist"
    if suffix in TABLE_SUFFIXES:
        return "table"
    raise MedgenError(f"--data {spec}: {KINDS_HELP} (expected .json, .csv or .tsv)")


def read_datalist(
    spec: str | Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Datalist:
    """Read and validate a phantom folder, a datalist JSON or a CSV/TSV table.

    Args:
        spec: folder with datalist.json, a .json datalist, or a .csv/.tsv table.
        image_column: column/key holding image paths (relative to the file).
        label_column: column/key holding labels (class names or integer indices).
        group_column: column/key holding the subject id (default: "subject" in JSON, else one subject per row).
        class_names: class order to use (overrides the file's "labels" map and the sorted default).
    """
    kind = detect_kind(spec)
    path = Path(spec).expanduser().resolve()
    if kind == "scenes":
        raise MedgenError(f"--data {spec}: a scenes folder holds 2D scenes, not labelled volumes")
    if kind == "phantom":
        data = read_json_datalist(path / "datalist.json", image_column=image_column,
                                  label_column=label_column, group_column=group_column, class_names=class_names)
        data.kind = "phantom"
        return data
    if kind == "datalist":
        return read_json_datalist(path, image_column=image_column, label_column=label_column,
                                  group_column=group_column, class_names=class_names)
    return read_table(path, image_column=image_column, label_column=label_column,
                      group_column=group_column, class_names=class_names)


def read_json_datalist(
    path: Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Datalist:
    """Read a MONAI (decathlon-style) datalist: {"training": [{"image": ..., "label": ...}], "labels": {...}}.

    Parsed here rather than with monai.data.load_decathlon_datalist because that function turns any value that
    happens to name an existing path (e.g. subject "sub-0001" beside a folder sub-0001) into a path.

    Args:
        path: the JSON file; image paths are relative to its folder.
        image_column, label_column, group_column, class_names: as in read_datalist.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MedgenError(f"{path}: cannot read ({e.__class__.__name__}: {_first_line(e)})") from None
    except json.JSONDecodeError as e:
        raise MedgenError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("training"), list):
        raise MedgenError(f"{path}: not a MONAI datalist (needs a \"training\" list of {{image, label}} entries)")
    entries = doc["training"]
    if not entries:
        raise MedgenError(f"{path}: the \"training\" list is empty")

    names_map = _names_from_map(doc.get("labels"), path) if "labels" in doc else None
    base = path.parent
    subject_key = group_column or "subject"
    rows: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(entries):
        where = f"{path}, training[{i}]"
        if not isinstance(entry, dict):
            raise MedgenError(f"{where}: expected an object with \"{image_column}\" and \"{label_column}\"")
        if image_column not in entry:
            raise MedgenError(f"{where}: no key \"{image_column}\" (keys: {', '.join(map(str, entry))})")
        if label_column not in entry:
            raise MedgenError(f"{where}: missing label (no key \"{label_column}\"; keys: {', '.join(map(str, entry))})")
        if group_column and group_column not in entry:
            raise MedgenError(f"{where}: no key \"{group_column}\" for the subject id")
        rows.append((where, {
            "image": entry[image_column],
            "label": entry[label_column],
            "subject": entry.get(subject_key),
            "tissue": entry.get("tissue"),
        }))
    return _build(rows, base, path, "datalist", names_map, class_names, image_column)


def read_table(
    path: Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Datalist:
    """Read a CSV/TSV table with an image-path column, a label column and optionally a subject column.

    Args:
        path: the .csv/.tsv file; image paths are relative to its folder. The first line is the header.
        image_column, label_column, group_column, class_names: as in read_datalist.
    """
    delimiter = TABLE_SUFFIXES.get(path.suffix.lower(), ",")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            lines = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MedgenError(f"{path}: cannot read table ({e.__class__.__name__}: {_first_line(e)})") from None
    lines = [(n, row) for n, row in lines if any(cell.strip() for cell in row)]  # skip blank lines
    if not lines:
        raise MedgenError(f"{path}: the table is empty")
    header = [h.strip() for h in lines[0][1]]
    if len(lines) == 1:
        raise MedgenError(f"{path}: the table has a header but no rows")
    for col, what in ((image_column, "--image-column"), (label_column, "--label-column"),
                      (group_column, "--group-column")):
        if col is not None and col not in header:
            raise MedgenError(f"{path}: no column \"{col}\" (columns: {', '.join(header)}; set {what})")
    rows: list[tuple[str, dict[str, Any]]] = []
    for line_num, row in lines[1:]:
        where = f"{path}, line {line_num}"
        if len(row) != len(header):
            raise MedgenError(f"{where}: {len(row)} fields but the header has {len(header)}")
        cells = dict(zip(header, (c.strip() for c in row), strict=False))
        rows.append((where, {
            "image": cells[image_column],
            "label": cells[label_column],
            "subject": cells[group_column] if group_column else None,
            "tissue": cells.get("tissue") or None,
        }))
        if group_column and not cells[group_column]:
            raise MedgenError(f"{where}: empty subject id in column \"{group_column}\"")
    return _build(rows, path.parent, path, "table", None, class_names, image_column)


def subjects_per_class(data: Any, class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Number of distinct subjects per class.

    Args:
        data: an ImageSet, a Datalist, a list of records (dicts with label and subject), or a list of labels
            (then every item counts as its own subject).
        class_names: names for the label indices (taken from `data` when it has them).
    """
    labels, subjects, names = _labels_subjects(data, class_names)
    seen: dict[int, set[str]] = {}
    for sub, lab in subject_labels(labels, subjects).items():
        seen.setdefault(lab, set()).add(sub)
    if names is None:
        names = [str(i) for i in range(max([int(x) for x in labels], default=-1) + 1)]
    return {name: len(seen.get(i, ())) for i, name in enumerate(names)}


def subject_labels(labels: Sequence[Any], subjects: Sequence[str]) -> dict[str, int]:
    """One class per subject: its most frequent label (ties: the lowest index), as the splits stratify,
    so a subject whose scans carry different labels (e.g. a conversion) counts once."""
    per: dict[str, Counter] = {}
    for lab, sub in zip(labels, subjects, strict=False):
        per.setdefault(sub, Counter())[int(lab)] += 1
    return {sub: min(c, key=lambda k: (-c[k], k)) for sub, c in per.items()}


def mixed_label_subjects(records: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    """Subjects whose scans carry more than one label: {subject: sorted labels}."""
    per: dict[str, set[int]] = {}
    for r in records:
        per.setdefault(r["subject"], set()).add(int(r["label"]))
    return {s: sorted(v) for s, v in per.items() if len(v) > 1}


def require_per_class(data: Any, minimum: int, what: str, class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Raise MedgenError when a class has fewer than `minimum` subjects (subjects, not scans).

    Args:
        data: as in subjects_per_class.
        minimum: subjects each class needs.
        what: what needs them, for the message (e.g. "6 folds").
        class_names: as in subjects_per_class.

    Returns:
        subjects per class.
    """
    counts = subjects_per_class(data, class_names)
    for name, n in counts.items():
        if n < minimum:
            raise MedgenError(too_few_message(name, n, minimum, what))
    return counts


def too_few_message(name: str, n: int, minimum: int, what: str) -> str:
    noun = "subject" if n == 1 else "subjects"
    return f"class {name} has {n} {noun}; {what} need at least {minimum}"


# ---------------------------------------------------------------------------------------------------------


def _labels_subjects(data: Any, class_names: Sequence[str] | None) -> tuple[list[int], list[str], list[str] | None]:
    names = list(class_names) if class_names is not None else None
    if isinstance(data, Datalist):
        return [r["label"] for r in data.records], [r["subject"] for r in data.records], names or data.class_names
    if hasattr(data, "labels") and hasattr(data, "subjects"):  # ImageSet
        labels = [int(v) for v in data.labels.tolist()]
        return labels, list(data.subjects), names or list(getattr(data, "class_names", []) or []) or None
    items = list(data)
    if items and isinstance(items[0], dict):
        return [int(r["label"]) for r in items], [str(r.get("subject", i)) for i, r in enumerate(items)], names
    return [int(v) for v in items], [str(i) for i in range(len(items))], names


def _build(
    rows: list[tuple[str, dict[str, Any]]],
    base: Path,
    source: Path,
    kind: str,
    names_map: list[tuple[int, str]] | None,
    class_names: Sequence[str] | None,
    image_column: str,
) -> Datalist:
    """Resolve paths, check files exist and are listed once, map labels to indices."""
    seen: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    for where, raw in rows:
        image = raw["image"]
        if image is not None and not isinstance(image, str):
            raise MedgenError(f"{where}: \"{image_column}\" must be a file path string, got {image!r}")
        if not isinstance(image, str) or not image.strip():
            raise MedgenError(f"{where}: empty image path in \"{image_column}\"")
        image_path = _resolve(base, image)
        if image_path.is_dir():
            raise MedgenError(f"{where}: {image_path} is a folder, not an image file")
        if not image_path.is_file():
            raise MedgenError(f"{where}: image file not found: {image_path}")
        key = str(image_path)
        if key in seen:
            raise MedgenError(f"{where}: duplicate row, image {image} is already listed at {seen[key]}")
        seen[key] = where.rsplit(", ", 1)[-1]
        rec: dict[str, Any] = {"image": key, "label": raw["label"],
                               "subject": str(raw["subject"]) if raw["subject"] not in (None, "") else image}
        if raw.get("tissue"):
            tissue = _resolve(base, str(raw["tissue"]))
            if not tissue.is_file():
                raise MedgenError(f"{where}: tissue file not found: {tissue}")
            rec["tissue"] = str(tissue)
        records.append(rec)

    names = _map_labels(records, [w for w, _ in rows], names_map, class_names, source)
    present = sorted({r["label"] for r in records})
    if len(present) < 2:
        only = ", ".join(names[i] for i in present)
        raise MedgenError(f"{source}: only one class ({only}) in the data; at least 2 classes are needed")
    if any("tissue" in r for r in records) and not all("tissue" in r for r in records):
        first = next(w for (w, _), r in zip(rows, records, strict=False) if "tissue" not in r)
        raise MedgenError(f"{first}: no tissue map while other entries have one")
    return Datalist(records=records, class_names=names, source=source, kind=kind, where=[w for w, _ in rows])


def _resolve(base: Path, value: str) -> Path:
    p = Path(value.strip()).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _names_from_map(labels: Any, path: Path) -> list[tuple[int, str]]:
    """The datalist's {"0": "CN", ...} map as sorted (index, name) pairs."""
    if isinstance(labels, list):  # ["CN", "MCI", "AD"] is accepted too
        labels = {str(i): n for i, n in enumerate(labels)}
    if not isinstance(labels, dict) or not labels:
        raise MedgenError(f"{path}: \"labels\" must map integer labels to class names, e.g. {{\"0\": \"CN\"}}")
    pairs = []
    for k, v in labels.items():
        try:
            pairs.append((int(k), str(v)))
        except (TypeError, ValueError):
            raise MedgenError(f"{path}: \"labels\" key {k!r} is not an integer") from None
    names = [n for _, n in pairs]
    if len(set(names)) != len(names):
        raise MedgenError(f"{path}: \"labels\" names a class twice ({', '.join(names)})")
    return sorted(pairs)


def _as_int(value: Any) -> int | None:
    """An integer label (1, 1.0, "1") as int, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            f = float(value.strip())  # "1.0" as written by pandas/R
        except ValueError:
            return None
        return int(f) if math.isfinite(f) and f.is_integer() else None
    return None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _map_labels(
    records: list[dict[str, Any]],
    wheres: list[str],
    names_map: list[tuple[int, str]] | None,
    class_names: Sequence[str] | None,
    source: Path,
) -> list[str]:
    """Replace each record's raw label with its class index; return the class names."""
    for rec, where in zip(records, wheres, strict=False):
        if _is_missing(rec["label"]):
            raise MedgenError(f"{where}: missing label")
        if not isinstance(rec["label"], (str, int, float)) or isinstance(rec["label"], bool):
            raise MedgenError(f"{where}: label {rec['label']!r} is not a class name or integer")
        try:
            number = float(str(rec["label"]).strip())
        except ValueError:
            number = None
        if number is not None and math.isfinite(number) and not number.is_integer():
            raise MedgenError(f"{where}: label {rec['label']!r} is not an integer class index or a class name")

    if class_names is not None:
        names = [str(n) for n in class_names]
        index_of_key = {i: i for i in range(len(names))}
    elif names_map is not None:
        names = [n for _, n in names_map]
        index_of_key = {k: i for i, (k, _) in enumerate(names_map)}
    else:
        raw = [rec["label"] for rec in records]
        ints = [_as_int(v) for v in raw]
        if all(v is not None for v in ints):
            keys = sorted(set(ints))  # type: ignore[type-var]
            names = [str(k) for k in keys]
            index_of_key = {k: i for i, k in enumerate(keys)}
        else:
            found = {str(v).strip() for v in raw}
            if found <= set(DEFAULT_CLASS_NAMES):
                names = [c for c in DEFAULT_CLASS_NAMES if c in found]
            else:
                names = sorted(found)
            index_of_key = {}
    if len(set(names)) != len(names):
        raise MedgenError(f"{source}: class names repeat ({', '.join(names)})")

    by_name = {n: i for i, n in enumerate(names)}
    known = ", ".join(names)
    for rec, where in zip(records, wheres, strict=False):
        value = rec["label"]
        text = str(value).strip()
        if text in by_name:
            rec["label"] = by_name[text]
            continue
        as_int = _as_int(value)
        if as_int is not None and as_int in index_of_key:
            rec["label"] = index_of_key[as_int]
            continue
        raise MedgenError(f"{where}: unknown label {text!r} (known classes: {known})")
    return names


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
