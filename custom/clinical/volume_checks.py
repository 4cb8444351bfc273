"""Checks of a CT volume itself: a voxel grid the pipeline can resample, and values that are a body CT in HU.

:func:`check_grid` reads the shape and voxel sizes only (the preflight runs it on a file's header);
:func:`check_hounsfield` runs on the loaded volume: NaN or infinite voxels, and values that are not plausibly CT in
Hounsfield units (an MR, a uint8 export, a CT without its rescale), are refused; ``require_ct=False`` forces the
latter through.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from custom.clinical.errors import InvalidValuesError, NoImageError, NotCTError

__all__ = ["FORCE_HINT", "check_grid", "check_hounsfield"]

#: A CT in HU holds air (-1000 HU) or at least fat (-100 HU): without a voxel below this, it is not CT in HU.
MIN_HU_CEILING = -500.0
#: ... and soft tissue (about 40 HU) or more: a volume whose maximum stays below this is not an abdominal CT.
MAX_HU_FLOOR = 0.0
#: How to force a volume that fails the Hounsfield check.
FORCE_HINT = "--require_ct false"
#: No CT in HU holds values beyond this (int16 padding is -32768; extended-range metal stays below 65536).
MAX_ABS_HU = 100_000.0
#: In a CT in HU air outnumbers dense bone and metal; more than this share of voxels above +500 HU, and more of
#: them than below -500 HU, is a CT with its values inverted (a negative scl_slope) or not in HU.
MAX_DENSE_SHARE = 0.2
#: Extent of one axis of a body CT, in mm: at least a few centimetres across in-plane, at most two metres.
MIN_IN_PLANE_MM, MAX_EXTENT_MM = 20.0, 2000.0
#: Voxels across each of two axes at least (a CT volume is a stack of images, not a line of voxels).
MIN_IN_PLANE_VOXELS = 16
#: More voxels than this are refused before reading (a 512 x 512 x 8192 volume; the pipeline resamples to 1.5 mm).
MAX_VOXELS = 1 << 31


def check_grid(shape: Sequence[int], spacing: Sequence[float], source: str, require_ct: bool = True) -> None:
    """Refuse a voxel grid that cannot be resampled (an extent beyond two metres: voxel sizes in metres; too many
    voxels to hold) or, with ``require_ct``, is not a body CT's (a line or a point of voxels, or images below a
    few centimetres across: voxel sizes in micrometres)."""
    shape = [int(n) for n in shape[:3]]
    spacing = [float(abs(v)) for v in spacing[:3]]
    extent = [n * v for n, v in zip(shape, spacing)]
    sizes = ", ".join(f"{v:g}" for v in spacing)
    fix = "Export the CT again with its voxel sizes in mm (e.g. from the DICOM series with dcm2niix)."
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise NoImageError(
            f"'{source}' has {' x '.join(map(str, shape))} voxels, more than this bundle holds in memory "
            f"({MAX_VOXELS:.2g}). Pass the CT resampled to 1 mm or coarser, or a crop around the liver."
        )
    if max(extent) > MAX_EXTENT_MM:
        raise NoImageError(
            f"'{source}' spans {max(extent) / 1000:.3g} m along one axis (voxel sizes {sizes} mm), more than any "
            f"body; its voxel sizes are not in mm. {fix}"
        )
    if require_ct and sum(n >= MIN_IN_PLANE_VOXELS and e >= MIN_IN_PLANE_MM for n, e in zip(shape, extent)) < 2:
        extents = " x ".join(f"{e:.3g}" for e in extent)
        raise NoImageError(
            f"'{source}' is {' x '.join(map(str, shape))} voxels of {sizes} mm ({extents} mm): not the images of "
            f"a CT (each at least {MIN_IN_PLANE_VOXELS} voxels and {MIN_IN_PLANE_MM:g} mm across). Pass the CT "
            f"volume itself (a stack of axial images) with its voxel sizes in mm, or {FORCE_HINT}."
        )


def check_hounsfield(volume, source: str, require_ct: bool = True) -> None:
    """Refuse a loaded volume with NaN/infinite voxels, or (``require_ct``) one that is not plausibly CT in HU."""
    values = np.asarray(volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise InvalidValuesError(
            f"'{source}' holds {bad} NaN or infinite voxel(s) of {values.size}; the model cannot read them. "
            "Replace them (e.g. by -1024 HU, air) in the file and run again."
        )
    affine = getattr(volume, "affine", None)
    if affine is not None and values.ndim >= 3:
        linear = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine)[:3, :3]
        check_grid(values.shape[-3:], np.linalg.norm(linear, axis=0), source, require_ct)
    if not require_ct:
        return
    low, high = float(values.min()), float(values.max())
    not_hu = f"Pass the CT in HU, or {FORCE_HINT} to run anyway."
    if low > MIN_HU_CEILING or high < MAX_HU_FLOOR or max(-low, high) > MAX_ABS_HU:
        raise NotCTError(
            f"'{source}' has values from {low:g} to {high:g}, which is not a CT in Hounsfield units (a CT holds air at "
            f"-1000 HU and soft tissue above 0 HU, and nothing beyond +-{MAX_ABS_HU:g}): an MR, a rescaled or uint8 "
            f"export, or a CT without its RescaleIntercept. {not_hu}"
        )
    sample = values.reshape(-1)[:: max(1, values.size // 4_000_000)]
    dense, air = float(np.mean(sample > 500.0)), float(np.mean(sample < -500.0))
    if dense > MAX_DENSE_SHARE and dense > air:
        raise NotCTError(
            f"'{source}' has {dense:.0%} of its voxels above +500 HU and {air:.0%} below -500 HU: air reads as bone, "
            f"so its values are inverted or not in Hounsfield units. {not_hu}"
        )
    low_q, high_q = np.percentile(sample, [1.0, 99.0])
    if low_q == high_q:
        raise NotCTError(
            f"'{source}' holds one value ({low_q:g}) in at least 98% of its voxels: no anatomy to read. {not_hu}"
        )
