"""The built-in phantom dementia cohort (DESIGN.md section 2): seeded CN / MCI / AD T1 volumes.

Each subject is the MNI152 template (tissue maps from nilearn) carried through a seeded chain:
draw parameters (age, sex, head scale, pose, class effects, intensities), thin the cortex by partial
volume, warp with a diffeomorphism whose log-Jacobian follows the target regional volume changes
(Poisson solve by FFT for a velocity potential, then scaling and squaring), synthesise the T1
contrast (tissue means, texture, gamma, bias field, blur, Rician noise), and measure the regional
volumes from the subject's own warped maps as ground truth. Same seed, same bytes (for a given
numpy/scipy build).

Scaling-and-squaring and the FFT Poisson solve are written here with numpy/scipy because MONAI and
nibabel do not offer a log-Jacobian-driven deformation.
"""

from __future__ import annotations

import gzip
import json
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first use may generate twice
    fcntl = None

from medgen.bids import write_bidsignore, write_dataset_description, write_participants, write_readme
from medgen.console import log, track
from medgen.data.anatomy import Atlas, load_atlas
from medgen.data.dataset import DEFAULT_CLASS_NAMES
from medgen.errors import MedgenError
from medgen.outputs import has_marker, staged_dir, write_marker

GENERATOR_VERSION = "2"  # 2: a BIDS raw dataset (participant_id, tissue maps under derivatives/)

# Where the tissue label maps go: a BIDS derivative dataset inside the cohort folder.
TISSUE_DERIVATIVE = "derivatives/tissue"
TISSUE_LABELS = {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}

# Age distribution per class: (mean, sd) in years, clipped to AGE_RANGE.
AGE = {"CN": (77.0, 5.0), "MCI": (76.0, 7.0), "AD": (76.5, 7.5)}
AGE_RANGE = (55.0, 95.0)
REFERENCE_AGE = 76.5

# Class effects as log-volume change vs an age-matched CN: region -> (MCI mean, AD mean, sd).
# Sources: Shi 2009 (hippocampus), Schuff 2012 (ADNI rates), Nestor 2008 (ventricles).
EFFECTS = {
    "hippocampus": (-0.13, -0.27, 0.10),
    "mtl": (-0.10, -0.22, 0.12),
    "ventricles": (0.15, 0.35, 0.30),
    "signature": (-0.03, -0.08, 0.05),
    "gm": (-0.01, -0.03, 0.035),
}
# Age slopes of the log volume per year (hippocampus -0.85 %/yr, ventricles +3 %/yr).
AGE_SLOPES = {"hippocampus": math.log(1 - 0.0085), "ventricles": math.log(1 + 0.03)}

HEAD_SCALE_SD = 0.02
SEX_SCALE = 0.015  # linear head size difference, male +1.5 %, female -1.5 %
ROTATION_DEG = 3.0
TRANSLATION_MM = 2.0
WARP_RMS_MM = 1.0  # smooth random anatomical warp
WARP_SMOOTH_MM = 24.0
# The smooth flow spreads a region's target log-Jacobian over its surroundings, so a region's
# measured log-volume change is about 0.45x its target; this gain restores the intended size
# (checked against the measured ground truth in tests/data/test_phantom.py).
DEFORM_GAIN = 2.2
COARSE = 2  # the deformation is computed on a grid this many times coarser
SQUARINGS = 6  # scaling and squaring steps: v / 2^6 is a small, safely invertible step

VOLUME_COLUMNS = (
    "hippocampus_ml",
    "ventricles_ml",
    "gm_ml",
    "wm_ml",
    "csf_ml",
    "mtl_gm_ml",
    "signature_gm_ml",
    "icv_ml",
)


@dataclass
class SubjectParams:
    """Everything drawn for one subject (the deterministic part runs from these plus the RNG stream)."""

    subject: str
    label: int
    age: float
    sex: str
    head_scale: float
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    effects: dict[str, float]  # region -> log-volume change applied (class + age + individual)
    means: tuple[float, float, float]  # CSF, GM, WM intensities
    gamma: float
    bias: float  # maximum |log| of the multiplicative bias field
    blur_vox: float
    noise: float  # Rician noise sd as a fraction of the WM mean


@dataclass
class Subject:
    """One generated subject: image float32 [S, S, S], tissue labels uint8 [S, S, S], volumes (ml)."""

    params: SubjectParams
    image: np.ndarray
    tissue: np.ndarray
    volumes: dict[str, float]
    min_jacobian: float


# ---------------------------------------------------------------------------------------------
# deformation: Poisson solve, scaling and squaring, Jacobian


def _wavenumbers(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angular wavenumbers (rad/voxel) on the rfftn grid, broadcastable to [S, S, S//2+1]."""
    kx = 2 * np.pi * np.fft.fftfreq(shape[0])[:, None, None]
    ky = 2 * np.pi * np.fft.fftfreq(shape[1])[None, :, None]
    kz = 2 * np.pi * np.fft.rfftfreq(shape[2])[None, None, :]
    return kx, ky, kz


def velocity_from_log_jacobian(
    log_jac: np.ndarray,
    smooth_vox: float = 1.0,
    noise: np.ndarray | None = None,
    noise_smooth_vox: float = 0.0,
) -> np.ndarray:
    """A curl-free velocity whose divergence is the (smoothed, zero-mean) target log-Jacobian.

    Solves lap(phi) = L by FFT (periodic grid) and returns v = grad(phi), in voxels.

    Args:
        log_jac: target log-Jacobian map [S, S, S].
        smooth_vox: Gaussian smoothing of the target (voxels), keeps the flow smooth.
        noise: optional white noise [3, S, S, S] added as a smooth random velocity.
        noise_smooth_vox: Gaussian smoothing (voxels) of that noise.
    Returns:
        Velocity [3, S, S, S] float64 in voxel units.
    """
    shape = log_jac.shape
    kx, ky, kz = _wavenumbers(shape)
    k2 = kx**2 + ky**2 + kz**2
    lh = np.fft.rfftn(log_jac) * np.exp(-0.5 * k2 * smooth_vox**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(k2 > 0, -lh / k2, 0.0)  # the k=0 term is the mean, which no flow can change
    out = np.empty((3, *shape))
    gauss = np.exp(-0.5 * k2 * noise_smooth_vox**2)
    for j, k in enumerate((kx, ky, kz)):
        vh = 1j * k * phi
        if noise is not None:
            vh = vh + np.fft.rfftn(noise[j]) * gauss
        out[j] = np.fft.irfftn(vh, s=shape)
    return out


def _warp(field_: np.ndarray, disp: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """field_(x + disp(x)) for each component of a [3, ...] field (trilinear, edge values outside)."""
    coords = grid + disp
    return np.stack([ndi.map_coordinates(f, coords, order=1, mode="nearest") for f in field_])


def exp_velocity(velocity: np.ndarray, squarings: int = SQUARINGS) -> np.ndarray:
    """Displacement of the diffeomorphism exp(v) by scaling and squaring.

    Args:
        velocity: stationary velocity [3, S, S, S] in voxels.
        squarings: number of squaring steps (the flow starts from v / 2^squarings).
    Returns:
        Displacement u [3, S, S, S] (voxels): exp(v)(x) = x + u(x).
    """
    grid = np.indices(velocity.shape[1:], dtype=np.float64)
    disp = velocity / (2.0**squarings)
    for _ in range(squarings):
        disp = disp + _warp(disp, disp, grid)  # phi o phi
    return disp


def jacobian_determinant(disp: np.ndarray) -> np.ndarray:
    """det(I + grad u) of a displacement field [3, S, S, S] (central differences), [S, S, S]."""
    # grads[i][j] = d u_i / d x_j
    grads = [np.gradient(disp[i]) for i in range(3)]
    j = [[grads[i][k] + (1.0 if i == k else 0.0) for k in range(3)] for i in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def check_jacobian(disp: np.ndarray, what: str = "deformation") -> float:
    """Raise MedgenError unless det J > 0 everywhere (the map is locally invertible); return min det J."""
    det = jacobian_determinant(disp)
    low = float(det.min())
    if not np.isfinite(low) or low <= 0.0:
        raise MedgenError(f"phantom {what} folds space (min det J = {low:.4g}); lower --effect-scale")
    return low


# ---------------------------------------------------------------------------------------------
# one subject


def draw_subject(rng: np.random.Generator, subject: str, label: int, effect_scale: float) -> SubjectParams:
    """Draw one subject's parameters from its own RNG stream.

    Args:
        rng: the subject's generator.
        subject: subject id.
        label: class index into DEFAULT_CLASS_NAMES.
        effect_scale: multiplies the class mean effects.
    """
    name = DEFAULT_CLASS_NAMES[label]
    mean, sd = AGE[name]
    age = float(np.clip(rng.normal(mean, sd), *AGE_RANGE))
    sex = "M" if rng.random() < 0.5 else "F"
    scale = rng.normal(1.0, HEAD_SCALE_SD) * (1.0 + (SEX_SCALE if sex == "M" else -SEX_SCALE))
    rotation = tuple(float(x) for x in rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))
    translation = tuple(float(x) for x in rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3))
    effects = {}
    for region, (mci, ad, sd_r) in EFFECTS.items():
        class_mean = (0.0, mci, ad)[label] * effect_scale
        effects[region] = (
            class_mean + sd_r * float(rng.normal()) + AGE_SLOPES.get(region, 0.0) * (age - REFERENCE_AGE)
        )
    means = (float(rng.uniform(0.10, 0.25)), float(rng.uniform(0.45, 0.58)), float(rng.uniform(0.75, 0.90)))
    return SubjectParams(
        subject=subject,
        label=label,
        age=round(age, 1),
        sex=sex,
        head_scale=float(scale),
        rotation_deg=rotation,
        translation_mm=translation,
        effects=effects,
        means=means,
        gamma=float(rng.uniform(0.85, 1.15)),
        bias=float(rng.uniform(0.0, math.log(1.10))),
        blur_vox=float(rng.uniform(0.35, 0.6)),
        noise=float(rng.uniform(0.01, 0.04)),
    )


def _pose_matrix(p: SubjectParams, affine: np.ndarray, size: int) -> np.ndarray:
    """4x4 map from subject voxels to template voxels: template = c + R^T (x - c - t) / s.

    c is the grid centre (the brain centre), R the rotation, t the translation, s the head scale.
    """
    rx, ry, rz = np.deg2rad(p.rotation_deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot = rot @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    c = affine[:3, :3] @ np.full(3, (size - 1) / 2.0) + affine[:3, 3]
    mm = np.eye(4)
    mm[:3, :3] = rot.T / p.head_scale
    mm[:3, 3] = c - mm[:3, :3] @ (c + np.asarray(p.translation_mm))
    return np.linalg.inv(affine) @ mm @ affine


def _smooth_field(rng: np.random.Generator, shape, smooth_vox: float) -> np.ndarray:
    """A smooth random field with max |value| = 1 (Gaussian-filtered white noise, by FFT)."""
    kx, ky, kz = _wavenumbers(shape)
    k2 = kx**2 + ky**2 + kz**2
    f = np.fft.irfftn(np.fft.rfftn(rng.standard_normal(shape)) * np.exp(-0.5 * k2 * smooth_vox**2), s=shape)
    return f / max(float(np.abs(f).max()), 1e-12)


def make_subject(atlas: Atlas, p: SubjectParams, rng: np.random.Generator) -> Subject:
    """Build one subject's image, tissue labels and ground-truth volumes from its parameters.

    Args:
        atlas: template maps on the training grid.
        p: drawn parameters.
        rng: the same subject's generator (continues after `draw_subject`): warp, texture, noise.
    """
    shape = atlas.gm.shape
    spacing = atlas.spacing
    reg = atlas.regions
    e = p.effects

    # 1. partial-volume cortical thinning in template space: GM -> CSF in the cortical ribbon,
    # scaled so that total GM changes by exp(e_gm) and signature GM by exp(e_signature) more
    gm, wm, mask = atlas.gm.astype(np.float64), atlas.wm, atlas.mask
    c_gm = atlas.cortex * gm
    a = math.expm1(e["gm"]) * gm.sum() / max(c_gm.sum(), 1e-9)
    b = (
        math.expm1(e["signature"])
        * (reg["signature"] * gm).sum()
        / max((reg["signature"] * c_gm).sum(), 1e-9)
    )
    gm = np.clip(gm * (1.0 + atlas.cortex * (a + b * reg["signature"])), 0.0, np.clip(mask - wm, 0.0, 1.0))

    # 2. target log-Jacobian (template -> subject volume change) in template space; the sulcal CSF
    # takes up the difference so that the intracranial volume is unchanged
    target = DEFORM_GAIN * (
        e["hippocampus"] * reg["hippocampus"] + e["mtl"] * reg["mtl"] + e["ventricles"] * reg["ventricles"]
    )
    sulcal = atlas.csf * (1.0 - reg["ventricles"])
    target = target - sulcal * (target.sum() / max(float(sulcal.sum()), 1e-9))

    # 3. pull the target back to subject space through the pose, solve for the velocity of the
    # sampling map (subject -> template shrinks where the subject grows: -L), exponentiate.
    # The velocity is smooth, so it is built and exponentiated on a grid `f` times coarser (8x fewer
    # voxels at f=2) and the displacement interpolated back to the full grid.
    pose = _pose_matrix(p, atlas.affine, shape[0])
    f = COARSE if shape[0] >= 64 else 1
    # coarse voxel centres in full-grid units, [3, S/f, S/f, S/f]
    coarse = np.indices(tuple(s // f for s in shape), dtype=np.float64) * f
    posed = np.einsum("ij,j...->i...", pose[:3, :3], coarse) + pose[:3, 3].reshape(3, 1, 1, 1)
    target_subj = ndi.map_coordinates(ndi.gaussian_filter(target, f / 2.0), posed, order=1, mode="constant")
    noise_sd = WARP_RMS_MM / (spacing * f)
    smooth = WARP_SMOOTH_MM / (spacing * f)
    # white noise filtered by a Gaussian of sd `smooth` has sd 1 / (2 sqrt(pi) smooth)^(3/2)
    gain = noise_sd * (2.0 * math.sqrt(math.pi) * smooth) ** 1.5
    velocity = velocity_from_log_jacobian(
        -target_subj,
        smooth_vox=0.5,
        noise=gain * rng.standard_normal((3, *target_subj.shape)),
        noise_smooth_vox=smooth,
    )
    disp = exp_velocity(velocity)  # [3, S/f, S/f, S/f] in coarse voxels
    grid = np.indices(shape, dtype=np.float64)  # [3, S, S, S]
    if f > 1:
        disp = f * np.stack([ndi.map_coordinates(d, grid / f, order=1, mode="nearest") for d in disp])
    min_jac = check_jacobian(disp, what=f"deformation of {p.subject}")

    # 4. sample all template maps at template point pose(x + u(x))
    moved = grid + disp
    coords = np.einsum("ij,j...->i...", pose[:3, :3], moved) + pose[:3, 3].reshape(3, 1, 1, 1)

    def sample(vol: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0)

    w_mask = np.clip(sample(mask), 0.0, 1.0)
    w_gm = np.clip(sample(gm), 0.0, 1.0)
    w_wm = np.clip(sample(wm), 0.0, 1.0 - w_gm)
    w_csf = np.clip(w_mask - w_gm - w_wm, 0.0, 1.0)
    w_reg = {k: sample(v) for k, v in reg.items()}

    # 5. ground truth from the subject's own maps (ml)
    voxel_ml = spacing**3 / 1000.0
    volumes = {
        "hippocampus_ml": float((w_reg["hippocampus"] * w_gm).sum() * voxel_ml),
        "ventricles_ml": float((w_reg["ventricles"] * w_csf).sum() * voxel_ml),
        "gm_ml": float(w_gm.sum() * voxel_ml),
        "wm_ml": float(w_wm.sum() * voxel_ml),
        "csf_ml": float(w_csf.sum() * voxel_ml),
        "mtl_gm_ml": float((w_reg["mtl"] * w_gm).sum() * voxel_ml),
        "signature_gm_ml": float((w_reg["signature"] * w_gm).sum() * voxel_ml),
        "icv_ml": float(w_mask.sum() * voxel_ml),
    }
    probs = np.stack([1.0 - w_mask, w_csf, w_gm, w_wm])  # [4, S, S, S]: background, CSF, GM, WM
    tissue = np.argmax(probs, axis=0).astype(np.uint8)

    # 6. T1 contrast: tissue means with texture, gamma, bias field, blur, Rician noise, brain extraction
    m_csf, m_gm, m_wm = p.means
    texture = 1.0 + 0.03 * _smooth_field(rng, shape, 0.7)
    img = (w_csf * m_csf + w_gm * m_gm + w_wm * m_wm) * texture
    img = np.clip(img, 0.0, None) ** p.gamma
    img = img * np.exp(p.bias * _smooth_field(rng, shape, 40.0 / spacing))
    img = ndi.gaussian_filter(img, p.blur_vox)
    sd = p.noise * m_wm
    img = np.sqrt((img + sd * rng.standard_normal(shape)) ** 2 + (sd * rng.standard_normal(shape)) ** 2)
    img = img * (w_mask > 0.3)
    return Subject(
        params=p, image=img.astype(np.float32), tissue=tissue, volumes=volumes, min_jacobian=min_jac
    )


# ---------------------------------------------------------------------------------------------
# cohort


def class_labels(n: int, seed: int) -> list[int]:
    """Balanced labels for n subjects in a seeded order; the remainder goes to the first classes."""
    k = len(DEFAULT_CLASS_NAMES)
    labels = np.array([i % k for i in range(n)])
    order = np.random.default_rng([seed, 0]).permutation(n)
    return [int(x) for x in labels[order]]


def _validate(n: int, seed: int, effect_scale: float, size: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < len(DEFAULT_CLASS_NAMES):
        raise MedgenError(
            f"phantom n must be an integer >= {len(DEFAULT_CLASS_NAMES)} (one subject per class), got {n!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MedgenError(f"phantom seed must be a non-negative integer, got {seed!r}")
    if not (
        isinstance(effect_scale, (int, float)) and math.isfinite(effect_scale) and 0.0 <= effect_scale <= 3.0
    ):
        raise MedgenError(f"phantom effect_scale must be a number in [0, 3], got {effect_scale!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size > 256 or size % 2:
        raise MedgenError(f"phantom size must be an even integer in [16, 256], got {size!r}")


def _nifti_gz(data: np.ndarray, affine: np.ndarray) -> bytes:
    """NIfTI-1 bytes, gzipped with a fixed header time so that the same data gives the same bytes."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=4)  # aligned to MNI152
    img.set_qform(affine, code=4)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _parameters(n: int, seed: int, effect_scale: float, size: int) -> dict:
    return {"n": n, "seed": seed, "effect_scale": float(effect_scale), "size": size}


_WORKER_ATLAS: Atlas | None = None  # set in the parent before forking, read by the render workers


def _render(atlas: Atlas, job: tuple[int, str, int, int, float]) -> tuple[str, bytes, bytes, dict, dict]:
    """One subject: its NIfTI bytes (image, tissue), datalist item and table row. Depends on the job only."""
    i, sid, label, seed, effect_scale = job
    rng = np.random.default_rng([seed, i + 1])
    params = draw_subject(rng, sid, label, effect_scale)
    subj = make_subject(atlas, params, rng)
    item = {"image": f"{sid}/anat/{sid}_T1w.nii.gz", "label": params.label, "subject": sid,
            "tissue": f"{TISSUE_DERIVATIVE}/{sid}/anat/{sid}_dseg.nii.gz"}
    row = {"participant_id": sid, "label": DEFAULT_CLASS_NAMES[params.label], "age": f"{params.age:.1f}", "sex": params.sex}
    row.update({k: f"{subj.volumes[k]:.4f}" for k in VOLUME_COLUMNS})
    row["head_scale"] = f"{params.head_scale:.4f}"
    row.update({f"log_effect_{k}": f"{v:.4f}" for k, v in params.effects.items()})
    row["min_jacobian"] = f"{subj.min_jacobian:.4f}"
    return sid, _nifti_gz(subj.image, atlas.affine), _nifti_gz(subj.tissue, atlas.affine), item, row


def _render_in_worker(job: tuple[int, str, int, int, float]) -> tuple[str, bytes, bytes, dict, dict]:
    assert _WORKER_ATLAS is not None
    return _render(_WORKER_ATLAS, job)


def _render_all(atlas: Atlas, jobs: list, workers: int):
    """Render subjects in order, in `workers` forked processes (1: in this process). Every subject has its
    own seeded stream, so the bytes do not depend on the number of workers."""
    global _WORKER_ATLAS
    if workers <= 1 or len(jobs) < 8 or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            yield _render(atlas, job)
        return
    _WORKER_ATLAS = atlas
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            yield from pool.map(_render_in_worker, jobs, chunksize=4)
    finally:
        _WORKER_ATLAS = None


def default_workers() -> int:
    """Processes for phantom rendering: the CPUs this process may use, at most 8."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(8, os.cpu_count() or 1))


def generate_cohort(
    out: str | Path,
    *,
    n: int = 360,
    seed: int = 0,
    effect_scale: float = 1.0,
    size: int = 64,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a phantom cohort folder (datalist.json, participants.tsv, phantom.json, sub-*/anat/*).

    The folder is built under a temporary sibling and renamed into place only when complete.

    Args:
        out: output folder (refused if it exists and is not empty, unless overwrite).
        n: number of subjects, balanced over CN / MCI / AD.
        seed: cohort seed; subject i uses the stream default_rng([seed, i + 1]).
        effect_scale: multiplies the class mean effects (0 gives no class differences).
        size: voxels per side (field of view 192 mm; 64 gives 3 mm voxels).
        overwrite: replace an existing folder.
        workers: rendering processes (default: the usable CPUs, at most 8); the output does not depend on it.
    Returns:
        The folder path.
    """
    _validate(n, seed, effect_scale, size)
    workers = default_workers() if workers is None else workers
    start = time.perf_counter()
    atlas = load_atlas(size)
    labels = class_labels(n, seed)
    width = max(4, len(str(n)))
    rows, training = [], []
    out = Path(out)
    with staged_dir(out, overwrite=overwrite, command="phantom") as tmp:
        jobs = [(i, f"sub-{i + 1:0{width}d}", labels[i], seed, effect_scale) for i in range(n)]
        tissue_root = tmp / TISSUE_DERIVATIVE
        for sid, t1, dseg, item, row in track(_render_all(atlas, jobs, workers), "phantom", total=n):
            anat = tmp / sid / "anat"
            anat.mkdir(parents=True)
            (anat / f"{sid}_T1w.nii.gz").write_bytes(t1)
            (tissue_root / sid / "anat").mkdir(parents=True)
            (tissue_root / sid / "anat" / f"{sid}_dseg.nii.gz").write_bytes(dseg)
            training.append(item)
            rows.append(row)

        datalist = {
            "name": "medgen-phantom",
            "description": "Procedural CN/MCI/AD T1 cohort from the MNI152 2009 template (medgen phantom)",
            "labels": {str(i): c for i, c in enumerate(DEFAULT_CLASS_NAMES)},
            "tensorImageSize": "3D",
            "numTraining": n,
            "training": training,
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")
        _write_bids_files(tmp, rows, n=n, seed=seed, effect_scale=effect_scale, size=size)
        meta = {
            "generator": "medgen.data.phantom",
            "version": GENERATOR_VERSION,
            "parameters": _parameters(n, seed, effect_scale, size),
            "classes": list(DEFAULT_CLASS_NAMES),
            "subjects_per_class": {c: labels.count(i) for i, c in enumerate(DEFAULT_CLASS_NAMES)},
            "spacing_mm": atlas.spacing,
            "affine": atlas.affine.tolist(),
            "tissue_labels": TISSUE_LABELS,
            "tissue_maps": TISSUE_DERIVATIVE,
            "effects_log_volume": {k: {"MCI": v[0], "AD": v[1], "sd": v[2]} for k, v in EFFECTS.items()},
            "age_slopes_log_per_year": AGE_SLOPES,
            "template": "MNI152 2009 (nilearn bundled), brain mask and GM/WM probability maps at 2 mm",
        }
        (tmp / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"phantom: {n} subjects in {time.perf_counter() - start:.1f} s -> {out}")
    return out


PARTICIPANT_COLUMNS = {
    "label": {"Description": "diagnostic group (the class label)",
              "Levels": {"CN": "cognitively normal", "MCI": "mild cognitive impairment", "AD": "Alzheimer's disease"}},
    "age": {"Description": "age at scan", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
    "head_scale": "linear head size relative to the template",
    "min_jacobian": "smallest Jacobian determinant of the subject's deformation (> 0: no folding)",
    **{k: {"Description": f"ground-truth {k[:-3].replace('_', ' ')} volume", "Units": "ml"} for k in VOLUME_COLUMNS},
    **{f"log_effect_{k}": f"log-volume change applied to {k} (class + age + individual)" for k in EFFECTS},
}


def _write_bids_files(tmp: Path, rows: list[dict], *, n: int, seed: int, effect_scale: float, size: int) -> None:
    """The BIDS side of a cohort folder: a raw dataset (dataset_description.json, participants.tsv/.json,
    README, .bidsignore for datalist.json and phantom.json) holding a derivative with the tissue maps."""
    what = f"medgen phantom n={n} seed={seed} effect_scale={float(effect_scale):g} size={size}"
    write_dataset_description(tmp, "medgen phantom dementia cohort", dataset_type="raw", generated=what,
                              License="CC0")
    write_participants(tmp, rows, PARTICIPANT_COLUMNS)
    write_readme(tmp, f"""\
medgen phantom cohort: procedural CN / MCI / AD T1-weighted volumes built from the MNI152 2009 template
({what}). Not real subjects.

datalist.json is a MONAI datalist of the volumes (image, label, subject, tissue); phantom.json records the
generator parameters. The tissue label maps (0 background, 1 CSF, 2 GM, 3 WM) are a BIDS derivative
in {TISSUE_DERIVATIVE}/.""")
    write_bidsignore(tmp, ["datalist.json", "phantom.json"])
    deriv = tmp / TISSUE_DERIVATIVE
    write_dataset_description(deriv, "medgen phantom tissue maps", dataset_type="derivative",
                              generated=f"tissue label maps of the {what}",
                              source_datasets=[{"URL": "bids:raw:"}], DatasetLinks={"raw": "../../"})
    write_readme(deriv, "Tissue label maps of the medgen phantom cohort: 0 background, 1 CSF, 2 GM, 3 WM.")
    lut = ["index\tname"] + [f"{k}\t{v}" for k, v in TISSUE_LABELS.items() if k != "0"]
    (deriv / "dseg.tsv").write_text("\n".join(lut) + "\n")


def read_parameters(folder: str | Path) -> dict | None:
    """The generator parameters recorded in a phantom folder, or None if it is not a complete one."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "phantom.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != GENERATOR_VERSION or not (folder / "datalist.json").is_file():
        return None
    return meta.get("parameters")


def _written_by_phantom(folder: Path) -> bool:
    """Whether `folder` holds the phantom.json this module writes (a cohort medgen generated)."""
    try:
        meta = json.loads((folder / "phantom.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "medgen.data.phantom"


def ensure_cohort(
    cache_dir: str | Path, *, n: int = 360, seed: int = 0, effect_scale: float = 1.0, size: int = 64
) -> Path:
    """Return a cached phantom cohort with these parameters, generating it first if needed.

    Args:
        cache_dir: folder holding cached cohorts (one sub-folder per parameter set).
        n, seed, effect_scale, size: as for `generate_cohort`.
    """
    _validate(n, seed, effect_scale, size)
    folder = Path(cache_dir) / f"phantom-n{n}-seed{seed}-es{float(effect_scale):g}-s{size}"
    if read_parameters(folder) == _parameters(n, seed, effect_scale, size):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # parallel jobs (e.g. one per fold) share the cache: one generates, the others wait and reuse
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if read_parameters(folder) == _parameters(n, seed, effect_scale, size):
            return folder
        if folder.is_dir() and not has_marker(folder) and _written_by_phantom(folder):
            # a cohort cached before output folders carried medgen's marker (or of an older generator
            # version): it is medgen's own, so it may be regenerated in place
            write_marker(folder, "phantom")
        return generate_cohort(folder, n=n, seed=seed, effect_scale=effect_scale, size=size, overwrite=True)
