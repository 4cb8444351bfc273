"""Lesion measurements against analytic ground truth (ellipsoids on anisotropic grids in several orientations)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

from custom.clinical.measurements import (
    CONNECTIVITY,
    axial_diameters,
    build_record,
    label_lesions,
    measure_lesions,
    voxel_volume_ml,
)
from custom.clinical.not_present import NotPresentRule

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
SPACING = (0.7, 0.9, 2.5)  # mm along the grid's axes 0, 1, 2 of the axial-stored cases


def grid_affine(columns, spacing, origin=(3.0, -7.0, 11.0)) -> np.ndarray:
    """RAS affine whose column n is ``columns[:, n] * spacing[n]``."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, dtype=float) * np.asarray(spacing, dtype=float)
    affine[:3, 3] = origin
    return affine


def rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


# name -> (direction columns of the source grid, spacing per grid axis, shape): RAS, LPS, feet-first, and two
# permuted (non-axial) storages. Each grid has 0.7 / 0.9 mm in-plane (R-L / A-P) and 2.5 mm superior-inferior.
ORIENTATIONS = {
    "ras": (np.eye(3), (0.7, 0.9, 2.5), (64, 64, 20)),
    "lps": (np.diag([-1, -1, 1]), (0.7, 0.9, 2.5), (64, 64, 20)),
    "feet_first": (np.diag([-1, 1, -1]), (0.7, 0.9, 2.5), (64, 64, 20)),
    "sia": (np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]), (2.5, 0.7, 0.9), (20, 64, 64)),  # axes: S, R, A
    "coronal": (np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]]), (0.7, 2.5, 0.9), (64, 20, 64)),  # L, I, P
}


def ellipsoid(affine, shape, semi_axes_mm, angle_deg=0.0, center_index=None) -> tuple[np.ndarray, np.ndarray]:
    """Mask of an ellipsoid with semi-axes (R-L, A-P, S-I before rotation about S-I by ``angle_deg``).

    Returns the mask on the grid and the centre in RAS mm (centred on a voxel centre).
    """
    center_index = [s // 2 for s in shape] if center_index is None else center_index
    center = (affine @ np.array([*center_index, 1.0]))[:3]
    indices = np.indices(shape).reshape(3, -1).astype(float)
    offsets = affine[:3, :3] @ indices + affine[:3, 3:4] - center[:, None]
    local = rotation_z(angle_deg).T @ offsets
    inside = ((local / np.asarray(semi_axes_mm, dtype=float)[:, None]) ** 2).sum(axis=0) <= 1.0
    return inside.reshape(shape), center


def to_ras(volume: np.ndarray, affine: np.ndarray) -> MetaTensor:
    image = MetaTensor(torch.as_tensor(volume[None].astype(np.float32)), affine=torch.as_tensor(affine))
    return Orientation(axcodes="RAS", labels=RAS_LABELS)(image)


def assert_diameters(lesion, semi_axes_mm, in_plane_spacing):
    truth_long, truth_short = 2 * max(semi_axes_mm[:2]), 2 * min(semi_axes_mm[:2])
    tolerance = lambda truth: max(in_plane_spacing) + 0.05 * truth  # noqa: E731 - one voxel plus 5%
    assert abs(lesion["longest_axial_diameter_mm"] - truth_long) <= tolerance(truth_long), lesion
    assert abs(lesion["perpendicular_diameter_mm"] - truth_short) <= tolerance(truth_short), lesion


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("angle", [0.0, 35.0])
def test_ellipsoid_volume_diameters_centroid(orientation, angle):
    columns, spacing, shape = ORIENTATIONS[orientation]
    affine = grid_affine(columns, spacing)
    semi_axes = (13.0, 8.0, 7.5)  # mm: R-L, A-P (then rotated in the axial plane), S-I
    mask, center = ellipsoid(affine, shape, semi_axes, angle)
    hu = np.where(mask, 45.0, -20.0)
    truth_ml = 4.0 / 3.0 * math.pi * np.prod(semi_axes) / 1000.0
    assert truth_ml > 1.0

    ras_mask, ras_hu = to_ras(mask, affine), to_ras(hu, affine)
    for grid_mask, grid_hu, grid_affine_ in ((mask, hu, affine), (ras_mask, ras_hu, None)):  # source, then RAS
        lesions = measure_lesions(grid_mask, grid_hu, grid_affine_)
        assert len(lesions) == 1
        lesion = lesions[0]
        assert abs(lesion["volume_ml"] - truth_ml) <= 0.05 * truth_ml, (lesion["volume_ml"], truth_ml)
        assert_diameters(lesion, semi_axes, in_plane_spacing=(0.7, 0.9))
        np.testing.assert_allclose(lesion["centroid_ras_mm"], center, atol=0.5)
        np.testing.assert_allclose(lesion["centroid_lps_mm"], center * [-1, -1, 1], atol=0.5)
        assert lesion["mean_hu"] == 45.0 and lesion["max_hu"] == 45.0


def test_diameters_on_strongly_anisotropic_in_plane_grid():
    """Long axis along the coarse in-plane axis (2.5 mm) and the fine one (0.5 mm), both measured in mm."""
    affine = grid_affine(np.eye(3), (0.5, 2.5, 3.0))
    for semi_axes in ((6.0, 15.0, 5.0), (15.0, 6.0, 5.0)):
        mask, _ = ellipsoid(affine, (80, 20, 9), semi_axes)
        lesion = measure_lesions(mask, np.zeros(mask.shape), affine)[0]
        assert_diameters(lesion, semi_axes, in_plane_spacing=(0.5, 2.5))


def test_perpendicular_diameter_of_a_rectangle_is_its_width():
    """A 20 x 6 mm rectangle: longest = diagonal, perpendicular = longest chord perpendicular to the diagonal."""
    affine = grid_affine(np.eye(3), (1.0, 1.0, 5.0))
    mask = np.zeros((30, 30, 3), dtype=bool)
    mask[5:25, 10:16, 1] = True
    result = axial_diameters(mask, affine)
    diagonal = math.hypot(20, 6)
    assert abs(result["longest_axial_diameter_mm"] - diagonal) < 0.75
    # a line perpendicular to the diagonal crosses both long sides: chord = width / cos(angle of the diagonal)
    perpendicular = 6 / math.cos(math.atan2(6, 20))
    assert abs(result["perpendicular_diameter_mm"] - perpendicular) < 1.0
    assert result["diameter_slice"] == 1


def test_lesions_are_26_connected_components_sorted_by_volume():
    affine = grid_affine(np.eye(3), (1.0, 1.0, 1.0))
    mask = np.zeros((20, 20, 10), dtype=bool)
    mask[2:5, 2:5, 2:5] = True  # 27 voxels
    mask[5, 5, 5] = True  # touches the cube by a corner only: same lesion under 26-connectivity
    mask[10:16, 10:16, 2:6] = True  # 144 voxels, the largest
    labels, count = label_lesions(mask)
    assert CONNECTIVITY == 26 and count == 2
    lesions = measure_lesions(mask, np.ones(mask.shape), affine)
    assert [lesion["voxel_count"] for lesion in lesions] == [144, 28]
    assert [lesion["index"] for lesion in lesions] == [1, 2]
    assert lesions[1]["slice_range"] == [2, 5]


def test_hu_statistics_and_probabilities():
    affine = grid_affine(np.eye(3), (0.8, 0.8, 2.0))
    mask = np.zeros((16, 16, 6), dtype=bool)
    mask[4:8, 4:8, 2:4] = True  # 32 voxels
    hu = np.full(mask.shape, 40.0)
    hu[5, 5, 2] = 200.0
    hu[0, 0, 0] = 3000.0  # outside the lesion: ignored
    probabilities = np.where(mask, 0.7, 0.1)
    probabilities[6, 6, 3] = 0.95
    lesion = measure_lesions(mask, hu, affine, probabilities)[0]
    assert lesion["max_hu"] == 200.0
    assert lesion["mean_hu"] == pytest.approx((31 * 40.0 + 200.0) / 32)
    assert lesion["max_probability"] == pytest.approx(0.95)
    assert lesion["mean_probability"] == pytest.approx((31 * 0.7 + 0.95) / 32)
    assert lesion["volume_ml"] == pytest.approx(32 * 0.8 * 0.8 * 2.0 / 1000)
    assert voxel_volume_ml(affine) == pytest.approx(0.00128)


def test_slice_range_is_given_in_the_input_slice_indices():
    """A feet-first input: RAS slice k is input slice (Z - 1 - k); slice numbers follow the input's slices."""
    columns, spacing, shape = ORIENTATIONS["feet_first"]
    affine = grid_affine(columns, spacing)
    mask, _ = ellipsoid(affine, shape, (8.0, 6.0, 5.0), center_index=(30, 30, 4))
    expected = np.flatnonzero(mask.any(axis=(0, 1)))
    ras_mask = to_ras(mask, affine)
    numbers = [100 + s for s in range(shape[2])]
    lesion = measure_lesions(ras_mask, ras_mask, source_affine=affine, slice_numbers=numbers)[0]
    assert lesion["slice_range"] == [int(expected[0]), int(expected[-1])]
    assert lesion["slice_number_range"] == [100 + int(expected[0]), 100 + int(expected[-1])]
    assert expected[0] <= lesion["diameter_slice"] <= expected[-1]
    ras_only = measure_lesions(ras_mask, ras_mask)[0]
    assert ras_only["slice_range"] == [shape[2] - 1 - int(expected[-1]), shape[2] - 1 - int(expected[0])]


def test_record_is_json_and_follows_the_decision():
    affine = grid_affine(np.eye(3), (0.8, 0.8, 2.0))
    mask, _ = ellipsoid(affine, (40, 40, 12), (8.0, 6.0, 5.0))
    probabilities = np.where(mask, 0.9, 0.05)
    rule = NotPresentRule(min_max_probability=0.6, min_volume_ml=0.1)
    decision = rule.decide(probabilities, affine)
    record = build_record(
        "the largest lesion",
        rule.apply(probabilities, decision),
        probabilities * 100,
        affine,
        probabilities,
        decision,
        extra={"case": "case_000"},
    )
    text = json.dumps(record, allow_nan=False)
    loaded = json.loads(text)
    assert loaded["found"] is True and loaded["n_lesions"] == 1 and loaded["case"] == "case_000"
    assert loaded["confidence"] == pytest.approx(decision.confidence, abs=1e-3)
    assert loaded["lesions"][0]["volume_ml"] == pytest.approx(loaded["total_volume_ml"])
    for key in (
        "volume_ml",
        "longest_axial_diameter_mm",
        "perpendicular_diameter_mm",
        "mean_hu",
        "max_hu",
        "slice_range",
        "centroid_ras_mm",
        "centroid_lps_mm",
    ):
        assert key in loaded["lesions"][0]


def test_record_of_not_present():
    affine = np.eye(4)
    probabilities = np.full((10, 10, 4), 0.2)
    rule = NotPresentRule(min_max_probability=0.5)
    decision = rule.decide(probabilities, affine)
    empty = rule.apply(probabilities, decision)
    record = build_record("a hyperdense lesion", empty, np.zeros(empty.shape), affine, probabilities, decision)
    assert record["found"] is False and record["lesions"] == [] and record["total_volume_ml"] == 0
    assert record["confidence"] > 0.5
    with pytest.raises(ValueError, match="empty the mask"):
        build_record("a hyperdense lesion", np.ones(empty.shape), np.zeros(empty.shape), affine, None, decision)
    assert build_record("x", empty, np.zeros(empty.shape), affine)["confidence"] is None
