"""Grid helpers shared by the readers and writers: channel handling and exact reorientation between grids."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms.utils import get_largest_connected_component_mask
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from custom.clinical.errors import GeometryMismatchError

__all__ = [
    "as_spatial_array",
    "affine_of",
    "bounding_box",
    "grow_box",
    "largest_component",
    "reorient_to",
    "ras_to_lps",
]

#: Tolerance (mm) when comparing two affines of the same grid.
AFFINE_ATOL_MM = 1e-3


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The box (a tuple of slices) of the nonzero voxels of an N-D ``mask`` in any memory layout; ``None`` when
    there are none. What ``scipy.ndimage.find_objects(mask)[0]`` gives for a mask, an order of magnitude faster
    on a whole CT: one pass reduces the mask along its fastest axis, the rest reads the projection and the box."""
    mask = np.asarray(mask)
    fastest = int(np.argmin([abs(s) if n > 1 else np.inf for s, n in zip(mask.strides, mask.shape)]))
    projection = mask.any(axis=fastest)
    if not projection.any():
        return None
    others = [axis for axis in range(mask.ndim) if axis != fastest]
    box = [slice(None)] * mask.ndim
    for i, axis in enumerate(others):
        found = np.flatnonzero(projection.any(axis=tuple(j for j in range(projection.ndim) if j != i)))
        box[axis] = slice(int(found[0]), int(found[-1]) + 1)
    found = np.flatnonzero(mask[tuple(box)].any(axis=tuple(others)))
    box[fastest] = slice(int(found[0]), int(found[-1]) + 1)
    return tuple(box)


def grow_box(box: tuple[slice, ...], margin, shape) -> tuple[slice, ...]:
    """``box`` (a tuple of slices) grown by ``margin`` voxels on either side (one int, or one per axis) and clipped
    to an array of ``shape``."""
    margins = (margin,) * len(box) if np.isscalar(margin) else tuple(margin)
    return tuple(slice(max(b.start - int(m), 0), min(b.stop + int(m), int(n))) for b, m, n in zip(box, margins, shape))


def largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest face-connected component of a binary array (MONAI ``get_largest_connected_component_mask``,
    connectivity 1; of equally large ones, the one its sort ranks first), or ``None`` when it is empty:
    ``(X, Y[, Z]) -> bool (X, Y[, Z])``. Labelled inside the mask's box only (same components, a fraction of a
    whole-volume labelling)."""
    box = bounding_box(mask)
    if box is None:
        return None
    largest = np.zeros(np.shape(mask), bool)
    largest[box] = get_largest_connected_component_mask(np.asarray(mask[box]) != 0, connectivity=1)
    return largest


def as_spatial_array(volume) -> np.ndarray:
    """Return ``volume`` as a 3D numpy array (X, Y, Z), dropping a leading channel of size 1.

    Accepts numpy arrays, torch tensors and MONAI ``MetaTensor`` of shape (X, Y, Z) or (1, X, Y, Z).
    """
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    array = np.asarray(volume)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"Expected a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape {array.shape}.")
    return array


def as_binary_uint8(array: np.ndarray) -> np.ndarray:
    """``array > 0`` as uint8 {0, 1}; a uint8 array that already holds only 0 and 1 is returned as it is (no copy)."""
    if array.dtype == np.uint8 and array.max(initial=0) <= 1:
        return array
    return (array > 0).view(np.uint8)


def affine_of(volume, affine=None) -> np.ndarray:
    """Return the 4x4 affine given explicitly, or the one carried by a ``MetaTensor``."""
    if affine is None:
        affine = getattr(volume, "affine", None)
    if affine is None:
        raise ValueError("No affine: pass `affine=` or a MONAI MetaTensor that carries one.")
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    affine = np.asarray(affine, dtype=np.float64)
    if affine.ndim == 3 and affine.shape[0] == 1:  # a batch of one
        affine = affine[0]
    if affine.shape != (4, 4):
        raise ValueError(f"Expected a 4x4 affine, got shape {affine.shape}.")
    return affine


def ras_view(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) with voxel-to-world ``affine``, in RAS orientation as a strided view (axes flipped and
    permuted as MONAI's ``Orientation`` would, nothing copied), and the RAS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    orientation = io_orientation(affine)
    return apply_orientation(array, orientation), affine @ inv_ornt_aff(orientation, array.shape)


def reorient_to(
    array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape=None, order: str = "C"
) -> np.ndarray:
    """Flip and permute the axes of ``array`` (X, Y, Z) so that it lies on the grid of ``target_affine``; the result
    is contiguous in ``order`` ("C", or "F" for a NIfTI file, which stores the first axis fastest).

    Only axis flips and permutations are applied (no resampling), so the result is exact; the resulting affine is
    checked against ``target_affine`` (and the shape against ``target_shape``) and a ``GeometryMismatchError``
    says so when the two grids differ by more than a reorientation (for example after ``Spacingd``: invert it first
    with MONAI's ``Invertd``).
    """
    affine = np.asarray(affine, dtype=np.float64)
    target_affine = np.asarray(target_affine, dtype=np.float64)
    transform = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    result = apply_orientation(array, transform)
    result_affine = affine @ inv_ornt_aff(transform, array.shape)
    if target_shape is not None and tuple(result.shape) != tuple(int(s) for s in target_shape):
        raise GeometryMismatchError(
            f"After reorientation the mask has shape {result.shape} but the image has shape {tuple(target_shape)}. "
            "The mask must lie on the image's grid (up to axis flips/permutations); undo any resampling first."
        )
    if not np.allclose(result_affine, target_affine, atol=AFFINE_ATOL_MM):
        raise GeometryMismatchError(
            "The mask's affine does not match the image's affine after reorientation:\n"
            f"mask:\n{np.round(result_affine, 4)}\nimage:\n{np.round(target_affine, 4)}\n"
            "The mask must lie on the image's grid (up to axis flips/permutations); undo any resampling first."
        )
    return np.asfortranarray(result) if order == "F" else np.ascontiguousarray(result)


def ras_to_lps(points_mm) -> np.ndarray:
    """Convert world points (..., 3) from RAS to LPS (DICOM patient coordinates), or back: negate x and y."""
    points = np.array(points_mm, dtype=np.float64)
    points[..., :2] *= -1
    return points
