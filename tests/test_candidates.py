"""Lesion candidates: components of the text-free output, their record attributes, evidence and features."""

from __future__ import annotations

import numpy as np
import pytest

from custom.data.geometry import measure_lesions
from custom.detection.candidates import (
    FEATURE_NAMES,
    candidate_evidence,
    candidate_features,
    lesion_candidates,
    match_candidates,
)


def ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


@pytest.fixture(scope="module")
def case():
    """RAS (40, 30, 20) volume at 1.5 x 1.5 x 2 mm: a liver, a large hypodense lesion at the patient's right (high
    x index) and a small hyperdense one at the left, and a 2-voxel speck of the detector."""
    shape = (40, 30, 20)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    liver = np.zeros(shape, bool)
    liver[4:36, 4:26, 2:18] = True
    instances = np.zeros(shape, np.int32)
    instances[ball(shape, (28, 15, 9), 5)] = 1
    instances[ball(shape, (10, 12, 12), 2)] = 2
    image = np.full(shape, -100.0)
    image[liver] = 60.0
    image[instances == 1], image[instances == 2] = 10.0, 160.0
    detected = (instances > 0).astype(np.float32)
    detected[20, 5, 3:5] = 0.9  # a speck below min_voxels
    return shape, affine, liver, instances, image, detected


def test_candidates_are_the_components_with_the_record_attributes_of_the_ground_truth(case):
    shape, affine, liver, instances, image, detected = case
    candidates, attributes, info = lesion_candidates(detected, affine, image, liver, min_voxels=3)
    assert candidates.max() == 2 and len(attributes) == 2  # the speck is left out
    assert attributes[0]["volume_ml"] > attributes[1]["volume_ml"]  # ids follow decreasing volume
    assert [a["density"] for a in attributes] == ["hypodense", "hyperdense"]
    assert attributes[0]["lobe"] == "right" and attributes[1]["lobe"] == "left"
    assert attributes[0]["lateral"] < 0.5 < attributes[1]["lateral"]  # 0 at the liver's patient-right edge
    truth, _ = measure_lesions(instances, affine, image, liver)
    for key in ("volume_ml", "longest_axial_diameter_mm", "centroid_ras_mm", "contrast_hu", "segment"):
        assert attributes[0][key] == truth[0][key] and attributes[1][key] == truth[1][key]
    assert match_candidates(candidates, instances) == [1, 2]
    assert info["liver_frame"] is not None


def test_evidence_and_features_say_which_candidate_the_expression_points_at(case):
    shape, affine, liver, instances, image, detected = case
    candidates, attributes, _ = lesion_candidates(detected, affine, image, liver)
    referred = np.where(instances == 2, 0.9, 0.05)  # the expression points at the small hyperdense lesion
    evidence = candidate_evidence(candidates, referred)
    assert evidence[0]["evidence_max"] == pytest.approx(0.05) and evidence[0]["evidence_share"] == 0.0
    assert evidence[1]["evidence_mean"] == pytest.approx(0.9) and evidence[1]["evidence_share"] == 1.0
    features = np.stack([candidate_features(a, e) for a, e in zip(attributes, evidence)])
    assert features.shape == (2, len(FEATURE_NAMES)) and features.dtype == np.float32
    column = dict(zip(FEATURE_NAMES, features.T))
    assert column["log1p_volume_ml"][0] > column["log1p_volume_ml"][1] and column["contrast_hu_per_100"][1] > 0.5
    assert column["evidence_max"][1] > column["evidence_max"][0]
    assert not candidate_features({}).any()  # nothing known, nothing invented
    assert candidate_evidence(np.zeros(shape, np.int32), referred) == []


def test_a_candidate_spread_over_two_lesions_or_none_stands_for_no_lesion():
    instances = np.zeros((6, 6, 2), np.int32)
    instances[0:2, :, 0], instances[2:4, :, 0] = 1, 2
    candidates = np.zeros_like(instances)
    candidates[0:4, :, 0] = 1  # half of it on each lesion: a share of 0.5
    candidates[5, :, 1] = 2  # touches no lesion
    assert match_candidates(candidates, instances, min_overlap=0.6) == [0, 0]
    assert match_candidates(candidates, instances, min_overlap=0.5) == [1, 0]


def test_touching_lesions_are_split_at_their_narrowing_and_one_round_lesion_is_not():
    shape = (50, 30, 20)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    instances = np.zeros(shape, np.int32)
    instances[ball((50, 30, 20), (14, 15, 10), 8)] = 1
    instances[ball((50, 30, 20), (28, 15, 10), 6.5) & (instances == 0)] = 2  # touches lesion 1
    liver = np.ones(shape, bool)
    image = np.where(instances > 0, 10.0, 60.0)
    detected = (instances > 0).astype(np.float32)
    whole, _, _ = lesion_candidates(detected, affine, image, liver)
    assert whole.max() == 1  # one component
    split, attributes, _ = lesion_candidates(detected, affine, image, liver, split_depth_mm=2.0)
    assert split.max() == 2 and match_candidates(split, instances) == [1, 2]
    for candidate in (1, 2):
        lesion = match_candidates(split, instances)[candidate - 1]
        overlap = np.logical_and(split == candidate, instances == lesion).sum()
        assert 2 * overlap / ((split == candidate).sum() + (instances == lesion).sum()) > 0.9
    one, _, _ = lesion_candidates((instances == 1).astype(np.float32), affine, image, liver, split_depth_mm=2.0)
    assert one.max() == 1  # a round lesion stays one candidate
