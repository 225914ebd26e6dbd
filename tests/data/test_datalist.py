"""Datalist reading and validation: phantom folders, MONAI datalist JSON, CSV/TSV tables, bad input."""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from medgen.data import Datalist, detect_kind, read_datalist, require_per_class, subjects_per_class
from medgen.data.check import check_dataset
from medgen.errors import MedgenError


def write_volume(path, shape=(20, 24, 18), spacing=(2.0, 1.5, 2.5), seed=0):
    """A small NIfTI with a bright ellipsoid on a dark background."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    data = (np.clip(1 - r, 0, None) * 100 + np.random.default_rng(seed).random(shape)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path


def write_table(path, rows, sep=","):
    path.write_text("\n".join(sep.join(map(str, r)) for r in rows) + "\n")
    return path


@pytest.fixture
def table(tmp_path):
    rows = [("image", "label", "subject")]
    for i in range(6):
        write_volume(tmp_path / "img" / f"s{i}.nii.gz", seed=i)
        rows.append((f"img/s{i}.nii.gz", ["MCI", "AD", "CN"][i % 3], f"sub{i // 2}"))
    return write_table(tmp_path / "data.csv", rows)


def test_table_reads_records_with_phantom_class_order(table, tmp_path):
    data = read_datalist(table)
    assert isinstance(data, Datalist) and data.kind == "table"
    assert data.class_names == ["CN", "MCI", "AD"]  # phantom names keep their conventional order
    assert [r["label"] for r in data.records] == [1, 2, 0, 1, 2, 0]
    assert data.records[0]["image"] == str((tmp_path / "img" / "s0.nii.gz").resolve())
    # without a group column every row is its own subject; with it, repeated scans share one
    assert len({r["subject"] for r in data.records}) == 6
    grouped = read_datalist(table, group_column="subject")
    assert [r["subject"] for r in grouped.records][:2] == ["sub0", "sub0"]


def test_tsv_with_custom_columns_and_sorted_names(tmp_path):
    rows = [("path", "dx", "pid")]
    for i in range(4):
        write_volume(tmp_path / f"v{i}.nii", seed=i)
        rows.append((f"v{i}.nii", ["zeta", "alpha"][i % 2], f"p{i}"))
    path = write_table(tmp_path / "t.tsv", rows, sep="\t")
    data = read_datalist(path, image_column="path", label_column="dx", group_column="pid")
    assert data.class_names == ["alpha", "zeta"]
    assert [r["label"] for r in data.records] == [1, 0, 1, 0]
    forced = read_datalist(path, image_column="path", label_column="dx", class_names=["zeta", "alpha"])
    assert [r["label"] for r in forced.records] == [0, 1, 0, 1]


def test_json_datalist_with_labels_map_ints_and_names(tmp_path):
    for i in range(4):
        write_volume(tmp_path / "ims" / f"a{i}.nii.gz", seed=i)
    doc = {"labels": {"0": "CN", "1": "MCI", "2": "AD"},
           "training": [{"image": "ims/a0.nii.gz", "label": 0}, {"image": "ims/a1.nii.gz", "label": "AD"},
                        {"image": "ims/a2.nii.gz", "label": 1.0}, {"image": "ims/a3.nii.gz", "label": "2"}]}
    (tmp_path / "list.json").write_text(json.dumps(doc))
    data = read_datalist(tmp_path / "list.json")
    assert data.kind == "datalist" and data.class_names == ["CN", "MCI", "AD"]
    assert [r["label"] for r in data.records] == [0, 2, 1, 2]


def test_json_integer_labels_without_map(tmp_path):
    for i in range(4):
        write_volume(tmp_path / f"a{i}.nii.gz", seed=i)
    doc = {"training": [{"image": f"a{i}.nii.gz", "label": [3, 1][i % 2]} for i in range(4)]}
    (tmp_path / "list.json").write_text(json.dumps(doc))
    data = read_datalist(tmp_path / "list.json")
    assert data.class_names == ["1", "3"] and [r["label"] for r in data.records] == [1, 0, 1, 0]
    rows = [("image", "label")] + [(f"a{i}.nii.gz", ["0.0", "1.0"][i % 2]) for i in range(4)]
    table = read_datalist(write_table(tmp_path / "t.csv", rows))
    assert table.class_names == ["0", "1"] and [r["label"] for r in table.records] == [0, 1, 0, 1]


def test_phantom_folder_with_tissue_and_subjects(tmp_path):
    entries = []
    for i in range(3):
        sub = f"sub-{i:04d}"
        write_volume(tmp_path / sub / "anat" / f"{sub}_T1w.nii.gz", seed=i)
        write_volume(tmp_path / sub / "anat" / f"{sub}_dseg.nii.gz", seed=i)
        entries.append({"image": f"{sub}/anat/{sub}_T1w.nii.gz", "label": i, "subject": sub,
                        "tissue": f"{sub}/anat/{sub}_dseg.nii.gz"})
    (tmp_path / "datalist.json").write_text(json.dumps(
        {"name": "medgen-phantom", "labels": {"0": "CN", "1": "MCI", "2": "AD"}, "training": entries}))
    assert detect_kind(tmp_path) == "phantom"
    data = read_datalist(tmp_path)
    assert data.kind == "phantom"
    # subject ids stay ids even though folders of the same name exist beside the datalist
    assert [r["subject"] for r in data.records] == ["sub-0000", "sub-0001", "sub-0002"]
    assert data.records[1]["tissue"].endswith("sub-0001/anat/sub-0001_dseg.nii.gz")


def test_subjects_not_scans_are_counted(table):
    data = read_datalist(table, group_column="subject")
    # 6 scans of 3 subjects whose two scans carry different labels: each subject counts once, as its most
    # frequent label (ties: the lowest index, as the splits stratify): sub0 MCI/AD -> MCI, sub1 CN/MCI -> CN,
    # sub2 AD/CN -> CN
    assert subjects_per_class(data) == {"CN": 2, "MCI": 1, "AD": 0}
    assert sum(subjects_per_class(data).values()) == 3
    assert require_per_class(data, 0, "0 folds") == {"CN": 2, "MCI": 1, "AD": 0}
    with pytest.raises(MedgenError, match=r"^class MCI has 1 subjects?; 2 folds need at least 2"):
        require_per_class(data, 2, "2 folds")
    records = [{"label": 0, "subject": "a"}, {"label": 0, "subject": "a"}, {"label": 1, "subject": "b"}]
    assert subjects_per_class(records, ["x", "y"]) == {"x": 1, "y": 1}
    assert subjects_per_class([0, 0, 1]) == {"0": 2, "1": 1}


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "rows, kwargs, pattern",
    [
        ([("image", "label"), ("img/s0.nii.gz", "CN"), ("img/missing.nii.gz", "AD")], {},
         r"data\.csv, line 3: image file not found: .*missing\.nii\.gz"),
        ([("image", "label"), ("img/s0.nii.gz", "CN"), ("img/s1.nii.gz", "")], {}, r"line 3: missing label"),
        ([("image", "label"), ("img/s0.nii.gz", "CN"), ("img/s1.nii.gz", "XX")], {"class_names": ["CN", "AD"]},
         r"line 3: unknown label 'XX' \(known classes: CN, AD\)"),
        ([("image", "label"), ("img/s0.nii.gz", "CN"), ("img/s0.nii.gz", "AD")], {},
         r"line 3: duplicate row, image img/s0\.nii\.gz is already listed at line 2"),
        ([("image", "label"), ("img/s0.nii.gz", "CN"), ("img/s1.nii.gz", "CN")], {}, r"only one class \(CN\)"),
        ([("file", "label"), ("img/s0.nii.gz", "CN")], {}, r'no column "image" \(columns: file, label; set --image-column\)'),
        ([("image", "label"), ("img/s0.nii.gz", "CN")], {"group_column": "pid"}, r'no column "pid"'),
        ([("image", "label"), ("img/s0.nii.gz", "CN", "extra")], {}, r"line 2: 3 fields but the header has 2"),
        ([("image", "label")], {}, r"header but no rows"),
    ],
)
def test_bad_tables_give_one_line_naming_the_row(tmp_path, rows, kwargs, pattern):
    for i in range(2):
        write_volume(tmp_path / "img" / f"s{i}.nii.gz", seed=i)
    path = write_table(tmp_path / "data.csv", rows)
    with pytest.raises(MedgenError) as excinfo:
        read_datalist(path, **kwargs)
    assert re.search(pattern, _one_line(excinfo)), str(excinfo.value)


def test_unreadable_table_and_json(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    with pytest.raises(MedgenError, match=r"bad\.csv: cannot read table"):
        read_datalist(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(MedgenError, match=r"bad\.json: not valid JSON \(line 1"):
        read_datalist(bad_json)
    (tmp_path / "nolist.json").write_text(json.dumps({"images": []}))
    with pytest.raises(MedgenError, match=r'not a MONAI datalist \(needs a "training" list'):
        read_datalist(tmp_path / "nolist.json")


def test_json_entry_errors_name_the_entry(tmp_path):
    write_volume(tmp_path / "a.nii.gz")
    write_volume(tmp_path / "b.nii.gz")
    (tmp_path / "l.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": 0},
                                                              {"image": "b.nii.gz"}]}))
    with pytest.raises(MedgenError, match=r"l\.json, training\[1\]: missing label"):
        read_datalist(tmp_path / "l.json")
    (tmp_path / "m.json").write_text(json.dumps({"labels": {"0": "CN", "1": "AD"},
                                                 "training": [{"image": "a.nii.gz", "label": 0},
                                                              {"image": "b.nii.gz", "label": 5}]}))
    with pytest.raises(MedgenError, match=r"m\.json, training\[1\]: unknown label '5' \(known classes: CN, AD\)"):
        read_datalist(tmp_path / "m.json")


def test_detect_kind_rejects_other_things(tmp_path):
    with pytest.raises(MedgenError, match="no such file or folder"):
        detect_kind(tmp_path / "nothing")
    with pytest.raises(MedgenError, match="not a phantom folder, datalist JSON, CSV/TSV table or scenes folder"):
        detect_kind(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MedgenError, match="not a phantom folder"):
        detect_kind(tmp_path / "x.txt")
    (tmp_path / "scenes.json").write_text("{}")
    assert detect_kind(tmp_path) == "scenes"


def test_check_dataset_collects_image_problems_and_fold_check(table, tmp_path):
    bad = tmp_path / "img" / "s1.nii.gz"
    arr = np.asanyarray(nib.load(bad).dataobj).copy()
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 1.5, 2.5, 1.0])), bad)
    report = check_dataset(table, group_column="subject", folds=3)
    summary = report.summary()
    assert summary["scans"] == 6 and summary["subjects"] == 3
    assert summary["shapes"] == {"20x24x18": 5}  # the NaN volume is left out of the tallies
    assert summary["spacings_mm"] == {"2x1.5x2.5": 5}
    assert summary["orientations"] == {"RAS": 5}
    assert any("s1.nii.gz: has 1 NaN/Inf voxels" in p for p in summary["problems"])
    assert "class CN has 2 subjects; 3 folds need at least 3" in summary["problems"]
    assert summary["ok"] is False
