"""The training grid, defined once: field of view, voxel spacing and the two affines built on it.

Every training volume is a size^3 grid spanning FIELD_OF_VIEW_MM (192 mm: 3 mm voxels at 64^3), RAS.
`training_affine` centres the grid at world (0, 0, 0) (user data brought to the training space);
`mni_affine` centres it on the MNI152 brain (the phantom's grid, so its coordinates are MNI mm).
"""

from __future__ import annotations

import numpy as np

# Field of view of the training grid (mm) and, for the phantom, its centre in MNI space: the centre of
# the MNI152 brain mask's bounding box, so the whole brain (154 mm tall) fits with a margin.
FIELD_OF_VIEW_MM = 192.0
CENTRE_MNI = (0.0, -17.0, 5.0)

def training_spacing(size: int) -> float:
    """Voxel size (mm) of the size^3 training grid: 192 mm field of view, 3 mm at size 64."""
    return FIELD_OF_VIEW_MM / int(size)

def training_affine(size: int = 64, spacing: float | None = None, spatial_dims: int = 3) -> np.ndarray:
    """The canonical training-space affine: RAS, isotropic `spacing` mm, grid centre at world (0, 0, 0).

    Args:
        size: voxels per side.
        spacing: voxel size in mm (default training_spacing(size)).
        spatial_dims: 3 (a 4x4 affine) or 2 (3x3).
    """
    spacing = training_spacing(size) if spacing is None else float(spacing)
    affine = np.eye(spatial_dims + 1)
    affine[:spatial_dims, :spatial_dims] *= spacing
    affine[:spatial_dims, spatial_dims] = -spacing * (size - 1) / 2.0
    return affine

def mni_affine(size: int) -> np.ndarray:
    """The phantom's RAS affine of the size^3 training grid: isotropic 192/size mm voxels centred on the MNI brain.

    Args:
        size: voxels per side (64 gives 3 mm voxels).
    """
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(CENTRE_MNI) - spacing * (size - 1) / 2.0
    return affine


def mni_voxel_affine(affine: np.ndarray, size: int) -> np.ndarray:
    """Voxel -> MNI mm map of a size^3 training grid with the given affine (RAS, 192/size mm voxels).

    The phantom's grid (`mni_affine`) is in MNI mm already. Data brought to the centred training grid
    (`training_affine`) is assumed to hold the brain centred like the phantom's grid, so its world
    coordinates are shifted by the phantom grid's centre; any other affine is taken as MNI mm.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if np.allclose(affine, training_affine(size), atol=1e-3):
        return mni_affine(size) @ np.linalg.inv(training_affine(size)) @ affine
    return affine
