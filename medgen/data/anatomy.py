"""The phantom's anatomy: MNI152 tissue maps on the training grid and soft regions of interest.

The MNI152 2009 template, its brain mask and GM/WM probability maps ship inside nilearn (no
network). They are resampled once to the cubic training grid (192 mm field of view, 3 mm voxels at
size 64, RAS) and cached per grid size. Regions are soft ellipsoids placed at MNI coordinates; the
lateral ventricles are the central CSF component of the template.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medgen.geometry import mni_affine

# Soft ellipsoids (centre mm, radii mm, pitch about the x axis in degrees) per region; paired
# regions are mirrored in x. Centres from DESIGN.md section 2; radii give volumes of the usual size.
ELLIPSOIDS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float], float]]] = {
    # long axis runs antero-posteriorly and rises posteriorly (~30 degrees)
    "hippocampus": [
        ((26.0, -22.0, -14.0), (7.0, 18.0, 7.0), -30.0),
        ((-26.0, -22.0, -14.0), (7.0, 18.0, 7.0), -30.0),
    ],
    "mtl": [((25.0, -10.0, -30.0), (9.0, 11.0, 8.0), 0.0), ((-25.0, -10.0, -30.0), (9.0, 11.0, 8.0), 0.0)],
    "signature": [
        ((58.0, -25.0, -15.0), (12.0, 24.0, 12.0), 0.0),
        ((-58.0, -25.0, -15.0), (12.0, 24.0, 12.0), 0.0),
        ((45.0, -55.0, 40.0), (14.0, 16.0, 14.0), 0.0),
        ((-45.0, -55.0, 40.0), (14.0, 16.0, 14.0), 0.0),
        ((0.0, -55.0, 30.0), (14.0, 16.0, 14.0), 0.0),
    ],
}


@dataclass(frozen=True)
class Atlas:
    """Template tissue maps and soft region weights on the training grid (all float32 [S, S, S]).

    Attributes:
        affine: 4x4 voxel -> MNI mm (RAS, isotropic spacing).
        spacing: voxel size in mm.
        mask, gm, wm, csf: brain mask and tissue probabilities (csf = clip(mask - gm - wm)).
        regions: soft region extents in [0, 1] (hippocampus, mtl, signature, ventricles); the
            tissue inside a region is region * tissue.
        cortex: where cortical partial-volume thinning acts (GM bordering sulcal CSF, outside the
            medial temporal regions).
    """

    affine: np.ndarray
    spacing: float
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    regions: dict[str, np.ndarray]
    cortex: np.ndarray


def grid_mm(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """MNI coordinates (mm) of every voxel centre, [3, *shape]."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)  # [3, V]
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape((3, *shape))


def soft_ellipsoid(xyz: np.ndarray, centre, radii, pitch_deg: float = 0.0, edge: float = 0.15) -> np.ndarray:
    """Soft indicator of an ellipsoid: 1 inside, 0 outside, a sigmoid over `edge` of the radius.

    Args:
        xyz: coordinates [3, ...] in mm.
        centre, radii: ellipsoid centre and semi-axes in mm.
        pitch_deg: rotation of the ellipsoid about the x axis.
        edge: width of the soft border as a fraction of the normalised radius.
    """
    d = xyz - np.asarray(centre, dtype=np.float64).reshape(3, *([1] * (xyz.ndim - 1)))
    t = np.deg2rad(pitch_deg)
    y = np.cos(t) * d[1] - np.sin(t) * d[2]
    z = np.sin(t) * d[1] + np.cos(t) * d[2]
    r = np.sqrt((d[0] / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -50, 50)))


def _resample(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape) -> np.ndarray:
    """Resample a volume onto another grid (trilinear), blurring first so that coarser grids do not alias."""
    src_spacing = float(abs(src_affine[0, 0]))
    dst_spacing = float(abs(dst_affine[0, 0]))
    if dst_spacing > src_spacing:
        # Gaussian with the FWHM difference between the two voxel sizes, in source voxels
        sigma = np.sqrt(dst_spacing**2 - src_spacing**2) / 2.355 / src_spacing
        data = ndi.gaussian_filter(data, sigma)
    vox = np.linalg.inv(src_affine) @ dst_affine
    coords = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = vox[:3, :3] @ coords + vox[:3, 3:]
    out = ndi.map_coordinates(data, coords, order=1, mode="constant", cval=0.0)
    return out.reshape(shape)


def _ventricles(csf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Soft lateral-ventricle extent: the largest CSF component inside a central ellipsoid."""
    xyz = grid_mm(affine, csf.shape)
    central = soft_ellipsoid(xyz, (0.0, -12.0, 14.0), (26.0, 40.0, 20.0)) > 0.5
    labels, count = ndi.label((csf > 0.4) & central)
    if count == 0:
        raise RuntimeError("no central CSF component in the MNI152 template")
    sizes = ndi.sum_labels(np.ones_like(csf), labels, index=np.arange(1, count + 1))
    core = labels == (1 + int(np.argmax(sizes)))
    core = ndi.binary_dilation(core, iterations=1)
    return np.clip(ndi.gaussian_filter(core.astype(np.float64), 1.0), 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def load_atlas(size: int = 64) -> Atlas:
    """Load nilearn's MNI152 maps (2 mm) and build the atlas on the size^3 training grid (cached).

    Args:
        size: voxels per side of the training grid.
    """
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=2)
    src_affine = mask_img.affine
    mask = np.asarray(mask_img.get_fdata(), dtype=np.float64)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float64) * mask
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float64) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    vent_src = _ventricles(csf, src_affine)

    affine = mni_affine(size)
    shape = (size, size, size)
    r_mask, r_gm, r_wm, r_vent = (_resample(a, src_affine, affine, shape) for a in (mask, gm, wm, vent_src))
    r_mask = np.clip(r_mask, 0.0, 1.0)
    r_gm = np.clip(r_gm, 0.0, 1.0)
    r_wm = np.clip(r_wm, 0.0, 1.0 - r_gm)
    r_csf = np.clip(r_mask - r_gm - r_wm, 0.0, 1.0)

    xyz = grid_mm(affine, shape)
    regions = {}
    for name, parts in ELLIPSOIDS.items():
        regions[name] = np.clip(sum(soft_ellipsoid(xyz, c, r, p) for c, r, p in parts), 0.0, 1.0)
    regions["ventricles"] = np.clip(r_vent, 0.0, 1.0)

    # cortical ribbon: GM near CSF that is not ventricular, away from the medial temporal lobe
    spacing = float(affine[0, 0])
    sulcal = r_csf * (1.0 - regions["ventricles"])
    near_csf = np.clip(3.0 * ndi.gaussian_filter(sulcal, 3.0 / spacing), 0.0, 1.0)
    cortex = near_csf * (1.0 - regions["hippocampus"]) * (1.0 - regions["mtl"]) * (r_gm > 0.05)

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return Atlas(
        affine=affine,
        spacing=spacing,
        mask=f32(r_mask),
        gm=f32(r_gm),
        wm=f32(r_wm),
        csf=f32(r_csf),
        regions={k: f32(v) for k, v in regions.items()},
        cortex=f32(cortex),
    )
