"""Preprocessing to the training grid, image validation, and classical augmentation."""

import dataclasses
import gzip
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medgen.data import load_dataset, require_per_class
from medgen.data.augmentation import (
    AugmentDraw,
    ClassicalAugmentation,
    augment_batch,
    augment_training_batch,
    classical_augmentation,
)
from medgen.data.inspection import inspect_volume
from medgen.data.preprocessing import Preprocessor
from medgen.errors import MedgenError
from medgen.geometry import training_affine


def blob(shape, seed=0, centre=(0.0, 0.0, 0.0)):
    """A bright ellipsoid (off-centre by `centre`, in [-1, 1] units) on a dark noisy background."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)))
    return (np.clip(1 - 1.2 * r, 0, None) * 100 + np.random.default_rng(seed).random(shape)).astype(np.float32)


def save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def odd_affine(spacing=(2.0, 1.5, 2.5), flip_x=False):
    aff = np.diag([*spacing, 1.0])
    if flip_x:
        aff[0, 0] = -spacing[0]
    aff[:3, 3] = [-10.0, 7.0, 3.0]
    return aff


@pytest.fixture
def mixed_table(tmp_path):
    """Six scans with different shapes, spacings and orientations (LAS and RAS)."""
    rows = ["image,label,subject"]
    shapes = [(20, 24, 18), (18, 22, 20), (24, 20, 16)]
    for i in range(6):
        shape = shapes[i % 3]
        save(tmp_path / f"s{i}.nii.gz", blob(shape, seed=i), odd_affine((2.0, 1.5, 2.5), flip_x=bool(i % 2)))
        rows.append(f"s{i}.nii.gz,{['CN', 'AD'][i % 2]},sub{i // 2}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "t.csv"


def test_table_to_training_grid(mixed_table):
    data = load_dataset(mixed_table, group_column="subject", size=16, spacing=3.0)
    assert data.images.shape == (6, 1, 16, 16, 16) and data.images.dtype == torch.float32
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
    assert torch.isfinite(data.images).all()
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1] and data.class_names == ["CN", "AD"]
    assert data.subjects == ["sub0", "sub0", "sub1", "sub1", "sub2", "sub2"]
    # different input grids -> the canonical centred 3 mm RAS affine
    # subjects, not the 6 scans; each subject has a CN and an AD scan, so it counts once, as its lowest tied
    # label (CN), never in both classes
    assert require_per_class(data, 0, "0 folds") == {"CN": 3, "AD": 0}
    np.testing.assert_allclose(data.affine, training_affine(16, 3.0))
    np.testing.assert_allclose(data.affine[:3, 3], [-22.5] * 3)
    assert data.normalisation["spacing_mm"] == [3.0] * 3
    assert data.normalisation["method"] == "ScaleIntensityRangePercentiles"
    assert data.normalisation["percentiles"] == [0.5, 99.5] and data.normalisation["range"] == [-1.0, 1.0]
    assert data.sources[0].endswith("s0.nii.gz") and "tissue" not in data.extras
    # the corners are background (padding / dark voxels), the centre is bright
    assert float(data.images[0, 0, 0, 0, 0]) == -1.0 and float(data.images[0, 0, 8, 8, 8]) > 0.5


def test_default_grid_is_64_cubed_3mm(mixed_table):
    """The default training space: 64^3, 3 mm RAS, centred; inputs of any grid land in [-1, 1]."""
    data = load_dataset(mixed_table)
    assert data.images.shape == (6, 1, 64, 64, 64)
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
    np.testing.assert_allclose(data.affine, np.array([[3.0, 0, 0, -94.5], [0, 3.0, 0, -94.5],
                                                      [0, 0, 3.0, -94.5], [0, 0, 0, 1.0]]))
    assert data.normalisation["size"] == [64] * 3 and data.normalisation["spacing_mm"] == [3.0] * 3


def test_orientation_is_undone(tmp_path):
    """A volume stored RAS and the same volume stored LAS (x flipped) give the same training image."""
    vol = blob((20, 24, 18), centre=(0.3, 0.0, 0.0))  # off-centre along x so a flip would show
    ras = save(tmp_path / "ras.nii.gz", vol, odd_affine())
    las_aff = odd_affine(flip_x=True)
    las_aff[0, 3] = -10.0 + 2.0 * 19  # same world position of the grid, stored mirrored
    las = save(tmp_path / "las.nii.gz", vol[::-1].copy(), las_aff)
    prep = Preprocessor(size=16, spacing=3.0)
    a = prep({"image": str(ras)})["image"]
    b = prep({"image": str(las)})["image"]
    assert a.shape == (1, 16, 16, 16)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # the bright blob sits at +x (R) in the world, so it must be in the upper x half of the RAS grid
    com = (a[0].clamp(min=0) * torch.arange(16.0).view(16, 1, 1)).sum() / a[0].clamp(min=0).sum()
    assert float(com) > 7.5


def test_large_volume_is_cropped_to_foreground(tmp_path):
    """A 1 mm volume bigger than the grid: resampled to 3 mm, cropped to the brain, so the brain survives."""
    vol = np.zeros((80, 80, 80), np.float32)
    vol[30:60, 30:60, 30:60] = blob((30, 30, 30))  # off-centre object in a large field of view
    path = save(tmp_path / "big.nii.gz", vol, np.diag([1.0, 1.0, 1.0, 1.0]))
    out = Preprocessor(size=16, spacing=3.0)({"image": str(path)})["image"]
    assert out.shape == (1, 16, 16, 16)
    assert float(out[0, 8, 8, 8]) > 0.5  # object centred by the foreground crop


def test_training_space_input_is_unchanged_and_keeps_tissue(tmp_path):
    """Data already in the training grid (as the phantom writes it: 192 mm field of view, so 12 mm voxels at 16^3)
    passes through geometrically unchanged."""
    aff = np.diag([12.0, 12.0, 12.0, 1.0])
    aff[:3, 3] = [-90.0, -126.0, -72.0]
    entries = []
    for i in range(4):
        vol = np.zeros((16, 16, 16), np.float32)
        vol[3:13, 2:14, 4:12] = 50 + 10 * i + np.random.default_rng(i).random((10, 12, 8))
        tissue = np.zeros((16, 16, 16), np.int16)
        tissue[3:13, 2:14, 4:12] = 2
        tissue[6:9, 6:9, 6:9] = 1 + i % 3
        save(tmp_path / f"i{i}.nii.gz", vol, aff)
        save(tmp_path / f"t{i}.nii.gz", tissue, aff)
        entries.append({"image": f"i{i}.nii.gz", "label": i % 3, "subject": f"sub-{i}", "tissue": f"t{i}.nii.gz"})
    (tmp_path / "datalist.json").write_text(json.dumps({"labels": {"0": "CN", "1": "MCI", "2": "AD"},
                                                        "training": entries}))
    data = load_dataset(tmp_path, size=16)
    np.testing.assert_allclose(data.affine, aff)  # their own common affine, not re-centred
    tissue = data.extras["tissue"]
    assert tissue.shape == (4, 1, 16, 16, 16) and tissue.dtype == torch.uint8  # labels 0-3: 1 byte a voxel
    for i in range(4):
        expected = np.asanyarray(nib.load(tmp_path / f"t{i}.nii.gz").dataobj)
        assert np.array_equal(tissue[i, 0].numpy(), expected)
        raw = np.asanyarray(nib.load(tmp_path / f"i{i}.nii.gz").dataobj)
        assert np.array_equal((data.images[i, 0] > -1).numpy(), raw > 0)  # same voxels, same place
    assert data.class_counts() == {"CN": 2, "MCI": 1, "AD": 1}
    assert data.normalisation["spacing_mm"] == [12.0] * 3 and training_affine(64)[0, 0] == 3.0


def _bad_files(tmp_path):
    aff = odd_affine()
    nan = blob((20, 24, 18))
    nan[5, 5, 5] = np.nan
    inf = blob((20, 24, 18))
    inf[1, 2, 3] = np.inf
    good = gzip.compress(nib.Nifti1Image(blob((20, 24, 18)), aff).to_bytes())
    (tmp_path / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    return {
        "nan.nii.gz": (save(tmp_path / "nan.nii.gz", nan, aff), r"has 1 NaN/Inf voxels"),
        "inf.nii.gz": (save(tmp_path / "inf.nii.gz", inf, aff), r"has 1 NaN/Inf voxels"),
        "flat.nii.gz": (save(tmp_path / "flat.nii.gz", blob((20, 24, 1)), aff), r"is a 2D image \(shape \(20, 24, 1\)\)"),
        "4d.nii.gz": (save(tmp_path / "4d.nii.gz", np.stack([blob((20, 24, 18))] * 3, -1), aff),
                      r"is a 4D image \(shape \(20, 24, 18, 3\)\); a single 3D volume is needed"),
        "const.nii.gz": (save(tmp_path / "const.nii.gz", np.full((20, 24, 18), 7, np.float32), aff),
                         r"every voxel has the same value \(7\)"),
        "truncated.nii.gz": (tmp_path / "truncated.nii.gz", r"cannot read image"),
        "garbage.nii.gz": (tmp_path / "garbage.nii.gz", r"cannot read image"),
    }


def test_bad_images_raise_one_line_naming_the_file(tmp_path):
    prep = Preprocessor(size=16)
    for name, (path, pattern) in _bad_files(tmp_path).items():
        with pytest.raises(MedgenError, match=pattern) as excinfo:
            prep({"image": str(path)})
        msg = str(excinfo.value)
        assert msg.startswith(str(path)) and "\n" not in msg, (name, msg)
        info = inspect_volume(str(path))  # data-check's reader sees the same problem
        assert info.problem is not None and info.problem.startswith(str(path)), (name, info)


def test_4d_with_singleton_last_axis_is_squeezed(tmp_path):
    path = save(tmp_path / "v.nii.gz", blob((20, 24, 18))[..., None], odd_affine())
    out = Preprocessor(size=16)({"image": str(path)})
    assert out["image"].shape == (1, 16, 16, 16)
    assert inspect_volume(str(path)).problem is None


# ---------------------------------------------------------------------------------------------- augmentation


def test_augmentation_draw_probabilities():
    aug = classical_augmentation(3)
    g = torch.Generator().manual_seed(0)
    draws = [aug.draw(g) for _ in range(4000)]
    translated = np.mean([any(d.shift) for d in draws])
    per_axis = np.mean([[s != 0 for s in d.shift] for d in draws], axis=0)
    rotated = np.mean([d.angle != 0 for d in draws])
    # P(some axis moves) = 0.95 * (1 - 0.34^3)
    assert abs(translated - 0.95 * (1 - 0.34**3)) < 0.02
    assert np.all(np.abs(per_axis - 0.95 * 0.66) < 0.03)
    assert abs(rotated - 0.90) < 0.02
    shifts = np.array([abs(s) for d in draws for s in d.shift if s])
    assert set(shifts.tolist()) == {1, 2, 3, 4}  # whole voxels on the study's 3 mm grid
    assert np.all(np.abs([np.bincount(shifts.astype(int))[1:] / len(shifts) - 0.25]) < 0.03)
    angles = np.degrees([d.angle for d in draws if d.angle])
    assert angles.min() >= -6.0 and angles.max() <= 6.0 and angles.min() < -5.5 and angles.max() > 5.5


def test_augment_batch_shape_range_and_determinism():
    x = torch.rand(4, 1, 16, 16, 16) * 2 - 1
    x[:, :, :2] = -1.0  # some background at the border
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    c = augment_batch(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1.0 - 1e-5 and float(a.max()) <= 1.0 + 1e-5
    assert not torch.equal(a, x)


def test_integer_shift_is_exact_and_rotation_is_axial():
    aug = ClassicalAugmentation()
    x = torch.rand(1, 16, 16, 16)
    shifted = aug.apply(x, AugmentDraw(shift=(2, 0, -1), angle=0.0))
    # interior voxels equal the input moved by whole voxels (MONAI's translate samples output[i] = input[i + t])
    torch.testing.assert_close(shifted[:, 4:12, 4:12, 4:12], x[:, 6:14, 4:12, 3:11], atol=1e-5, rtol=0)
    # a rotation in the axial plane keeps a volume that is constant along z so
    col = torch.rand(1, 16, 16, 1).expand(1, 16, 16, 16).contiguous()
    rot = aug.apply(col, AugmentDraw(shift=(0, 0, 0), angle=math.radians(6)))
    assert not torch.allclose(rot, col)
    torch.testing.assert_close(rot, rot[..., :1].expand_as(rot), atol=1e-5, rtol=0)


def test_augment_2d_and_training_batch_hook():
    @dataclasses.dataclass
    class Batch:
        images: torch.Tensor
        labels: torch.Tensor

    batch = Batch(images=torch.rand(3, 1, 12, 12) * 2 - 1, labels=torch.tensor([0, 1, 2]))
    out = augment_training_batch(batch, torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 1, 12, 12) and torch.equal(out.labels, batch.labels)
    assert out is not batch and not torch.equal(out.images, batch.images)
    with pytest.raises(ValueError, match="expected"):
        classical_augmentation(3)(torch.rand(2, 1, 8, 8), torch.Generator())


@pytest.mark.gpu
def test_augment_batch_on_cuda_matches_cpu():
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    cpu = augment_batch(x, torch.Generator().manual_seed(1))
    gpu = augment_batch(x.cuda(), torch.Generator().manual_seed(1))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def test_augmentation_shifts_are_millimetres_on_every_grid():
    from medgen.data.augmentation import ClassicalAugmentation, TrainingAugmentation

    assert ClassicalAugmentation(spacing_mm=3.0).shift_sizes == (1, 2, 3, 4)
    assert ClassicalAugmentation(spacing_mm=6.0).shift_sizes == (0.5, 1, 1.5, 2)
    assert ClassicalAugmentation(spacing_mm=1.0).shift_sizes == (3, 6, 9, 12)
    for spacing in (1.0, 6.0):
        aug = ClassicalAugmentation(spacing_mm=spacing)
        g = torch.Generator().manual_seed(0)
        mm = {spacing * abs(s) for _ in range(300) for s in aug.draw(g).shift if s}
        assert mm == {3.0, 6.0, 9.0, 12.0}  # the study's distances on any grid
    # half a voxel moves an edge by half a voxel: interpolated between the neighbours
    ramp = torch.arange(16.0).view(1, 16, 1, 1).expand(1, 16, 16, 16).contiguous()
    half = ClassicalAugmentation(spacing_mm=6.0).apply(ramp, AugmentDraw(shift=(0.5, 0.0, 0.0), angle=0.0))
    torch.testing.assert_close(half[:, 2:14], ramp[:, 2:14] + 0.5, atol=1e-4, rtol=0)
    from medgen.training.steps import Batch

    hook = TrainingAugmentation(spacing_mm=6.0)
    batch = Batch(images=torch.rand(2, 1, 16, 16, 16), labels=torch.tensor([0, 1]))
    out = hook(batch, torch.Generator().manual_seed(1))
    assert out.images.shape == batch.images.shape and torch.equal(out.labels, batch.labels)


def test_training_augmentation_share_leaves_the_other_images_as_acquired():
    from medgen.data.augmentation import TrainingAugmentation
    from medgen.training.steps import Batch

    x = torch.rand(64, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = Batch(images=x, labels=torch.zeros(64, dtype=torch.long))
    unchanged = []
    for share in (1.0, 0.5):
        out = TrainingAugmentation(spacing_mm=3.0, share=share)(batch, torch.Generator().manual_seed(0)).images
        unchanged.append(sum(torch.equal(o, xi) for o, xi in zip(out, x, strict=True)))
    assert unchanged[0] <= 3  # the study's probabilities leave about 0.5 % of images untouched
    assert 20 <= unchanged[1] <= 44  # about half
    with pytest.raises(ValueError, match="share"):
        TrainingAugmentation(share=0.0)


def test_training_augmentation_flips_left_right_only_when_asked():
    from medgen.data.augmentation import TrainingAugmentation
    from medgen.training.steps import Batch

    x = torch.arange(4 * 8 ** 3, dtype=torch.float32).view(4, 1, 8, 8, 8)
    batch = Batch(images=x, labels=torch.arange(4))
    out = TrainingAugmentation(flip=True, classical=False)(batch, torch.Generator().manual_seed(0)).images
    flipped = [torch.equal(o, xi.flip(1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped)
    same = TrainingAugmentation(flip=False, classical=False)(batch, torch.Generator().manual_seed(0)).images
    assert torch.equal(same, x)


def test_label_tensor_uses_the_smallest_type_that_holds_the_labels():
    from medgen.data.preprocessing import label_tensor

    assert label_tensor(torch.tensor([0.0, 3.0])).dtype == torch.uint8
    wide = label_tensor(torch.tensor([0.0, 2035.0]))  # FreeSurfer-style label values
    assert wide.dtype == torch.int16 and wide.tolist() == [0, 2035]
    assert label_tensor(torch.tensor([-1.0, 70000.0])).dtype == torch.int64
