"""Measurements of referred lesions and the JSON record of one (case, expression).

Lesions are the 3D connected components of the mask with 26-connectivity (voxels touching by a face, an edge or a
corner belong to the same lesion). All lengths are in mm and computed from the affine, so anisotropic and oblique
grids are measured correctly. "Axial" slices are the slices along the grid axis closest to the patient's
superior-inferior direction (axis 2 of an RAS-oriented volume).

Diameters (RECIST style, calipers on the lesion's outer edge): the longest axial diameter is the longest distance
between two corners of the lesion's pixels on one axial slice, over all slices; on that slice the lesion's outline is
traced at sub-voxel precision (marching squares at the 0.5 level, i.e. half-way between inside and outside voxel
centres) and the perpendicular diameter is its longest chord perpendicular to the long axis (for a non-convex
outline, the extent across all parts of the outline on that line). The dataset generator describes lesion sizes with
the same measurement (:mod:`custom.data.geometry`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform
from skimage.measure import find_contours

from custom.clinical.geometry import affine_of, as_spatial_array, bounding_box, ras_to_lps

__all__ = [
    "CONNECTIVITY",
    "SliceIndexer",
    "voxel_volume_ml",
    "label_lesions",
    "axial_axis",
    "axial_diameters",
    "measure_lesions",
    "build_record",
    "to_builtin",
]

#: Voxel neighbourhood of a connected component (26: faces, edges and corners).
CONNECTIVITY = 26

#: Samples per in-plane voxel spacing along the long axis when searching the perpendicular chord.
_CHORD_SAMPLES_PER_VOXEL = 4


def voxel_volume_ml(affine) -> float:
    """Volume of one voxel in ml (1 ml = 1000 mm^3) of a grid with the given 4x4 affine (mm)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of ``mask > 0``; return (labels (X, Y, Z) int32, number of components)."""
    labels, count = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), dtype=bool))
    return labels.astype(np.int32, copy=False), int(count)


def axial_axis(affine) -> int:
    """Index of the grid axis closest to the superior-inferior direction of an RAS affine."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(columns[2]) / np.linalg.norm(columns, axis=0)))


def _in_plane_map(affine: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """2x2 map from in-plane voxel offsets (along ``axes``) to mm in an orthonormal basis of the slice plane."""
    col_a, col_b = affine[:3, axes[0]], affine[:3, axes[1]]
    e1 = col_a / np.linalg.norm(col_a)
    e2 = col_b - (col_b @ e1) * e1
    e2 /= np.linalg.norm(e2)
    return np.array([[col_a @ e1, col_b @ e1], [col_a @ e2, col_b @ e2]])


def _outline_segments_mm(slice_mask: np.ndarray, in_plane: np.ndarray) -> np.ndarray:
    """Segments (S, 2, 2) of the 0.5-level outline of a 2D mask, in mm in the slice plane."""
    padded = np.pad(slice_mask.astype(np.float32), 1)
    segments = []
    for contour in find_contours(padded, 0.5):
        points = (contour - 1.0) @ in_plane.T
        segments.append(np.stack([points[:-1], points[1:]], axis=1))
    return np.concatenate(segments) if segments else np.zeros((0, 2, 2))


#: The four corners of a pixel, as offsets from its centre in pixel units.
_PIXEL_CORNERS = np.array([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])


def _pixel_corners_mm(slice_mask: np.ndarray, in_plane: np.ndarray) -> np.ndarray:
    """Corners (4N, 2) in mm in the slice plane of the N edge pixels of a 2D mask (inner pixels cannot hold the
    longest distance: their corners are their neighbours' corners)."""
    if slice_mask.sum() > 8:
        slice_mask = slice_mask & ~ndimage.binary_erosion(slice_mask)
    corners = np.argwhere(slice_mask).astype(np.float64)[:, None, :] + _PIXEL_CORNERS[None]
    return corners.reshape(-1, 2) @ in_plane.T


def _longest_distance(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Longest distance between two of ``points`` (N, 2) and its end points."""
    try:
        candidates = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):  # fewer than 3 points or all collinear
        candidates = points
    distances = squareform(pdist(candidates))
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    return float(distances[i, j]), candidates[i], candidates[j]


def _longest_perpendicular_chord(segments: np.ndarray, direction: np.ndarray, step_mm: float) -> float:
    """Longest extent of the outline ``segments`` along lines perpendicular to unit vector ``direction``."""
    normal = np.array([-direction[1], direction[0]])
    u, v = segments @ direction, segments @ normal  # (S, 2) each: both end points of each segment
    u0, u1, v0, v1 = u[:, 0], u[:, 1], v[:, 0], v[:, 1]
    samples = np.arange(u.min(), u.max() + step_mm, step_mm)
    longest = 0.0
    for block in np.array_split(samples, max(1, len(samples) // 256)):
        at = block[:, None]
        crosses = ((u0 <= at) & (at < u1)) | ((u1 <= at) & (at < u0))
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing_v = v0 + (at - u0) / (u1 - u0) * (v1 - v0)
        upper = np.where(crosses, crossing_v, -np.inf).max(axis=1)
        lower = np.where(crosses, crossing_v, np.inf).min(axis=1)
        valid = crosses.sum(axis=1) >= 2
        if valid.any():
            longest = max(longest, float((upper - lower)[valid].max()))
    return longest


def axial_diameters(component: np.ndarray, affine, perpendicular: bool = True) -> dict:
    """RECIST-style diameters (mm) of one lesion mask (X, Y, Z) on the grid of ``affine``.

    Returns:
        ``longest_axial_diameter_mm``, ``perpendicular_diameter_mm`` (0 unless ``perpendicular``) and
        ``diameter_slice`` (index along the axial axis of this grid of the slice where the longest diameter lies).
    """
    affine = np.asarray(affine, dtype=np.float64)
    axis = axial_axis(affine)
    in_plane_axes = tuple(a for a in range(3) if a != axis)
    in_plane = _in_plane_map(affine, in_plane_axes)
    best = {"longest_axial_diameter_mm": 0.0, "perpendicular_diameter_mm": 0.0, "diameter_slice": None}
    best_section, best_direction = None, None
    for k in np.flatnonzero(np.moveaxis(component, axis, 0).reshape(component.shape[axis], -1).any(axis=1)):
        section = np.take(component, k, axis=axis)
        length, p, q = _longest_distance(_pixel_corners_mm(section, in_plane))
        if length > best["longest_axial_diameter_mm"]:
            best.update(longest_axial_diameter_mm=length, diameter_slice=int(k))
            best_section, best_direction = section, (q - p) / length
    if perpendicular and best_section is not None:
        segments = _outline_segments_mm(best_section, in_plane)
        step = float(np.linalg.norm(affine[:3, list(in_plane_axes)], axis=0).min()) / _CHORD_SAMPLES_PER_VOXEL
        best["perpendicular_diameter_mm"] = _longest_perpendicular_chord(segments, best_direction, step)
    return best


class SliceIndexer:
    """Converts axial slice indices of the working grid into the input's slice indices (and slice numbers)."""

    def __init__(self, affine: np.ndarray, source_affine=None, slice_numbers: Sequence[int] | None = None):
        self.axis = axial_axis(affine)
        source = affine if source_affine is None else np.asarray(source_affine, dtype=np.float64)
        self.source_axis = axial_axis(source)
        self.to_source = np.linalg.inv(source) @ affine
        self.slice_numbers = None if slice_numbers is None else list(slice_numbers)

    def __call__(self, k: int) -> int:
        index = np.zeros(4)
        index[self.axis], index[3] = k, 1.0
        return int(round(float(self.to_source[self.source_axis] @ index)))

    def range_of(self, ks: np.ndarray) -> list[int]:
        source = sorted({self(int(k)) for k in ks})
        return [source[0], source[-1]]

    def number_of(self, source_index: int) -> int | None:
        """The slice number (e.g. DICOM InstanceNumber) of an input slice index; None without slice numbers."""
        return None if self.slice_numbers is None else int(self.slice_numbers[source_index])

    def numbers_of(self, source_range: list[int]) -> list[int] | None:
        if self.slice_numbers is None:
            return None
        numbers = [self.slice_numbers[s] for s in range(source_range[0], source_range[1] + 1)]
        return [int(min(numbers)), int(max(numbers))]


def _lesion_record(component, hu, affine, probabilities, indexer: SliceIndexer, offset: np.ndarray) -> dict:
    """Measurements of one lesion: ``component`` is its boolean mask cropped at voxel ``offset`` of the grid of
    ``affine``; ``hu`` and ``probabilities`` are cropped alike."""
    voxels = np.argwhere(component) + offset
    centroid_ras = (affine @ np.append(voxels.mean(axis=0), 1.0))[:3]
    values = hu[component].astype(np.float64)
    axial_ks = np.unique(voxels[:, indexer.axis])
    diameters = axial_diameters(component, affine)  # lengths need only the affine's linear part
    slice_range = indexer.range_of(axial_ks)
    record = {
        "volume_ml": len(voxels) * voxel_volume_ml(affine),
        "voxel_count": int(len(voxels)),
        "longest_axial_diameter_mm": diameters["longest_axial_diameter_mm"],
        "perpendicular_diameter_mm": diameters["perpendicular_diameter_mm"],
        "diameter_slice": indexer(diameters["diameter_slice"] + int(offset[indexer.axis])),
        "mean_hu": float(values.mean()),
        "max_hu": float(values.max()),
        "slice_range": slice_range,
        "centroid_ras_mm": centroid_ras.tolist(),
        "centroid_lps_mm": ras_to_lps(centroid_ras).tolist(),
    }
    numbers = indexer.numbers_of(slice_range)
    if numbers is not None:
        record["slice_number_range"] = numbers
    if probabilities is not None:
        inside = probabilities[component].astype(np.float64)
        record["max_probability"] = float(inside.max())
        record["mean_probability"] = float(inside.mean())
    return record


def measure_lesions(
    mask_ras,
    hu_ras,
    affine=None,
    probabilities=None,
    source_affine=None,
    slice_numbers: Sequence[int] | None = None,
) -> list[dict]:
    """Measure each 26-connected lesion of a mask, largest first.

    Args:
        mask_ras: (X, Y, Z) or (1, X, Y, Z) mask (> 0 is lesion), normally on the RAS-oriented grid.
        hu_ras: image in Hounsfield units on the same grid.
        affine: 4x4 RAS affine (mm) of the grid; defaults to ``mask_ras.affine`` (MONAI ``MetaTensor``).
        probabilities: optional probabilities (after sigmoid) on the same grid, for per-lesion max/mean.
        source_affine: affine of the input's own grid (``meta["original_affine"]``); slice indices are then
            reported along the input's axial axis (for DICOM: the series sorted by position along the normal).
        slice_numbers: optional label per input slice (e.g. DICOM InstanceNumber, ``meta["source_instance_numbers"]``)
            to add ``slice_number_range``.

    Returns:
        one dict per lesion: ``index`` (1 = largest), ``volume_ml``, ``voxel_count``, ``longest_axial_diameter_mm``,
        ``perpendicular_diameter_mm``, ``diameter_slice``, ``mean_hu``, ``max_hu``, ``slice_range`` ([first, last],
        0-based, inclusive), ``centroid_ras_mm``, ``centroid_lps_mm`` (and ``max_probability``/``mean_probability``,
        ``slice_number_range`` when given the inputs).
    """
    affine = affine_of(mask_ras, affine)
    mask = as_spatial_array(mask_ras) > 0
    hu = as_spatial_array(hu_ras)
    probs = None if probabilities is None else as_spatial_array(probabilities)
    for name, array in (("hu_ras", hu), ("probabilities", probs)):
        if array is not None and array.shape != mask.shape:
            raise ValueError(f"{name} has shape {array.shape} but the mask has shape {mask.shape}.")
    # the lesions' box only: the same components, in the same order, for a fraction of a whole-CT labelling
    extent = bounding_box(mask)
    if extent is None:
        return []
    mask, hu = mask[extent], hu[extent]
    probs = None if probs is None else probs[extent]
    labels, count = label_lesions(mask)
    indexer = SliceIndexer(affine, source_affine, slice_numbers)
    lesions = []
    for n, box in enumerate(ndimage.find_objects(labels), start=1):
        offset = np.array([b.start + e.start for b, e in zip(box, extent)])
        cropped_probs = None if probs is None else probs[box]
        lesions.append(_lesion_record(labels[box] == n, hu[box], affine, cropped_probs, indexer, offset))
    lesions.sort(key=lambda lesion: -lesion["voxel_count"])
    return [{"index": i + 1, **lesion} for i, lesion in enumerate(lesions)]


def to_builtin(value, decimals: int = 3):
    """Convert numpy scalars/arrays (nested in dicts, lists, tuples) to JSON types; floats rounded; NaN -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_builtin(v, decimals) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else round(float(value), decimals)
    return value


def _decision_fields(decision) -> dict | None:
    """``found``, ``confidence`` and the rest of a decision object (``to_dict()``) or mapping."""
    if decision is None:
        return None
    fields = dict(decision.to_dict() if hasattr(decision, "to_dict") else decision)
    if "found" not in fields:
        raise ValueError("A decision must say whether the lesion was found (key 'found').")
    return fields


#: How to read the record's numbers; written into every record.
RECORD_CONVENTIONS = {
    "lesion": f"3D connected component of the mask ({CONNECTIVITY}-connectivity), largest first",
    "volume_ml": "voxel count x voxel volume",
    "diameters": "RECIST style, on the axial slice with the longest in-plane diameter; perpendicular = longest "
    "chord perpendicular to it; outlines traced at sub-voxel precision",
    "slice_range": "[first, last] 0-based slice indices along the input's axial axis (DICOM: series sorted by "
    "position along the slice normal)",
    "centroid_ras_mm": "RAS world coordinates (+x patient's right, +y anterior, +z superior)",
    "centroid_lps_mm": "LPS = DICOM patient coordinates (+x patient's left, +y posterior, +z superior)",
    "hu": "Hounsfield units of the input image",
    "confidence": "probability that this answer is right (found: the mask matches the referred lesions with 3D Dice "
    ">= 0.5; not present: no lesion is referred), calibrated on the validation split of the synthetic data "
    "(referral#confidence_calibration); a raw score when that is null or with --referral#method rule. It does not "
    "know how far a real scan is from the synthetic training data",
}


def build_record(
    expression: str,
    mask,
    hu,
    affine=None,
    probabilities=None,
    decision=None,
    source_affine=None,
    slice_numbers: Sequence[int] | None = None,
    extra: Mapping | None = None,
) -> dict:
    """The JSON record of one (case, expression): expression, found, confidence and per-lesion measurements.

    Args:
        expression: the referring expression.
        mask, hu, affine, probabilities, source_affine, slice_numbers: as in :func:`measure_lesions`.
        decision: the "not present" decision (``NotPresentRule.decide`` result or a mapping with ``found`` and
            ``confidence``). Without one, ``found`` means "the mask is not empty" and ``confidence`` is None.
        extra: optional fields added at the top level (e.g. case identifier, input path).

    Returns:
        a JSON-serialisable dict: ``expression``, ``found``, ``confidence``, ``n_lesions``, ``total_volume_ml``,
        ``lesions`` (see :func:`measure_lesions`), ``decision`` and ``conventions``.

    Raises:
        ValueError: the decision says "not present" but the mask is not empty (apply the decision to the mask first).
    """
    lesions = measure_lesions(mask, hu, affine, probabilities, source_affine, slice_numbers)
    fields = _decision_fields(decision)
    found = bool(lesions) if fields is None else bool(fields["found"])
    if not found and lesions:
        raise ValueError(
            "The decision says 'not present' but the mask holds lesions; empty the mask first "
            "(NotPresentRule.apply) so that the record and the written mask agree."
        )
    record = {
        "expression": str(expression),
        "found": found and bool(lesions),
        "confidence": None if fields is None else fields.get("confidence"),
        "n_lesions": len(lesions),
        "total_volume_ml": sum(lesion["volume_ml"] for lesion in lesions),
        "lesions": lesions,
        "decision": fields,
        "conventions": RECORD_CONVENTIONS,
    }
    if extra:
        record.update(extra)
    return to_builtin(record)
