"""The "not present" rule: decisions, confidence, JSON parameters, and calibration on synthetic features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from custom.clinical.not_present import Calibration, NotPresentRule, calibrate, evaluate_rule, features_table

AFFINE_1ML_PER_1000 = np.diag([1.0, 1.0, 1.0, 1.0])  # 1 mm^3 voxels: 1000 voxels = 1 ml


def probability_volume(peak: float, voxels_above: int, shape=(20, 20, 10)) -> np.ndarray:
    """A volume at 0.05 with ``voxels_above`` voxels at ``peak``."""
    volume = np.full(shape, 0.05, dtype=np.float32)
    volume.reshape(-1)[:voxels_above] = peak
    return volume


def test_decide_found_and_not_present():
    rule = NotPresentRule(min_max_probability=0.6, min_volume_ml=0.5, voxel_threshold=0.5)
    found = rule.decide(probability_volume(0.9, 2000), AFFINE_1ML_PER_1000)
    assert found.found and found.features == {"max_probability": pytest.approx(0.9), "volume_ml": 2.0}
    low_probability = rule.decide(probability_volume(0.55, 2000), AFFINE_1ML_PER_1000)
    small = rule.decide(probability_volume(0.9, 100), AFFINE_1ML_PER_1000)
    assert not low_probability.found and not small.found
    assert rule.apply(probability_volume(0.9, 100), small).sum() == 0
    assert rule.apply(probability_volume(0.9, 2000), found).sum() == 2000


def test_volume_uses_the_voxel_size_from_the_affine():
    rule = NotPresentRule(min_max_probability=0.5, min_volume_ml=1.0)
    probabilities = probability_volume(0.9, 200)
    assert not rule.decide(probabilities, AFFINE_1ML_PER_1000).found  # 0.2 ml
    assert rule.decide(probabilities, np.diag([2.0, 2.0, 2.0, 1.0])).found  # 8 mm^3 voxels: 1.6 ml
    assert rule.decide(probabilities, voxel_ml=0.01).features["volume_ml"] == pytest.approx(2.0)


def test_confidence_is_half_at_the_operating_point_and_grows_away_from_it():
    rule = NotPresentRule(min_max_probability=0.6, min_volume_ml=0.0)
    confidence = [
        rule.decide_features({"max_probability": p, "volume_ml": 5.0}).confidence
        for p in (0.0, 0.3, 0.59, 0.6, 0.8, 1.0)
    ]
    assert confidence[3] == pytest.approx(0.5)
    assert confidence[0] == pytest.approx(1.0) and confidence[-1] == pytest.approx(1.0)
    assert confidence[0] > confidence[1] > confidence[2] > 0.5 and 0.5 < confidence[4] < confidence[5]
    found_by_volume = NotPresentRule(min_max_probability=0.5, min_volume_ml=2.0)
    weak = found_by_volume.decide_features({"max_probability": 0.99, "volume_ml": 2.2})
    assert weak.found and weak.confidence == pytest.approx(0.5 + 0.5 * 0.2 / 2.2)
    failed = found_by_volume.decide_features({"max_probability": 0.4, "volume_ml": 0.5})
    assert not failed.found and failed.confidence == pytest.approx(0.5 + 0.5 * max(0.1 / 0.5, 1.5 / 2.0))


def test_rule_parameters_are_plain_json_floats():
    rule = NotPresentRule(min_max_probability=0.72, min_volume_ml=0.35, voxel_threshold=0.4)
    text = json.dumps(rule.to_dict())
    assert NotPresentRule.from_dict(json.loads(text)) == rule
    decision = rule.decide(probability_volume(0.9, 500), AFFINE_1ML_PER_1000)
    json.dumps(decision.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    "bad", [{"min_max_probability": 0.0}, {"min_max_probability": 1.5}, {"min_volume_ml": -1}, {"voxel_threshold": 0}]
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        NotPresentRule(**bad)


def synthetic_features(seed: int, n_pos: int = 120, n_neg: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping classes separated mostly by max probability; volumes alike when something is predicted."""
    rng = np.random.default_rng(seed)
    positives = np.stack([rng.uniform(0.45, 1.0, n_pos), rng.gamma(2.0, 1.0, n_pos)], axis=1)
    negatives = np.stack([rng.uniform(0.0, 0.65, n_neg), rng.gamma(2.0, 1.0, n_neg)], axis=1)
    for table in (positives, negatives):
        table[table[:, 0] < 0.5, 1] = 0.0  # nothing above the voxel threshold
    return positives, negatives


def brute_force(positives, negatives, objective="youden", min_specificity=0.9) -> float:
    """Best objective over every threshold pair taken at observed values (an independent enumeration)."""
    both = np.concatenate([positives, negatives])
    volume_thresholds = np.unique(np.concatenate([[0.0], both[:, 1]]))[:, None]
    best = -np.inf
    for t_p in np.unique(both[:, 0]):
        sens = ((positives[:, 0] >= t_p) & (positives[:, 1] >= volume_thresholds) & (positives[:, 1] > 0)).mean(1)
        spec = 1 - ((negatives[:, 0] >= t_p) & (negatives[:, 1] >= volume_thresholds) & (negatives[:, 1] > 0)).mean(1)
        score = sens if objective == "specificity" else sens + spec - 1
        allowed = spec >= min_specificity if objective == "specificity" else np.ones_like(spec, dtype=bool)
        if allowed.any():
            best = max(best, float(score[allowed].max()))
    return best


def test_youden_calibration_finds_the_best_operating_point():
    positives, negatives = synthetic_features(seed=3)
    result = calibrate(positives, negatives, objective="youden")
    assert isinstance(result, Calibration)
    assert result.youden_j == pytest.approx(brute_force(positives, negatives), abs=1e-9)
    assert 0.45 < result.rule.min_max_probability < 0.65
    achieved = evaluate_rule(result.rule, positives, negatives)
    assert achieved["sensitivity"] == pytest.approx(result.sensitivity)
    assert achieved["specificity"] == pytest.approx(result.specificity)
    assert 0.0 < result.youden_j < 1.0
    json.dumps(result.to_dict(), allow_nan=False)


def test_specificity_target_is_met_with_best_sensitivity():
    positives, negatives = synthetic_features(seed=4)
    result = calibrate(positives, negatives, objective="specificity", min_specificity=0.95)
    assert result.specificity >= 0.95
    assert result.sensitivity == pytest.approx(brute_force(positives, negatives, "specificity", 0.95), abs=1e-9)
    youden = calibrate(positives, negatives, objective="youden")
    assert youden.specificity >= 0.95 and result.sensitivity >= youden.sensitivity  # youden's point is allowed too


def test_volume_threshold_is_used_when_only_volume_separates():
    rng = np.random.default_rng(5)
    positives = np.stack([rng.uniform(0.7, 1.0, 50), rng.uniform(1.0, 3.0, 50)], axis=1)
    negatives = np.stack([rng.uniform(0.7, 1.0, 50), rng.uniform(0.01, 0.5, 50)], axis=1)
    result = calibrate(positives, negatives)
    assert result.sensitivity == 1.0 and result.specificity == 1.0
    assert 0.5 < result.rule.min_volume_ml < 1.0


def test_operating_point_lies_between_samples():
    positives = [{"max_probability": p, "volume_ml": 1.0} for p in (0.7, 0.8, 0.9)]
    negatives = [{"max_probability": p, "volume_ml": 1.0} for p in (0.2, 0.3, 0.5)]
    result = calibrate(positives, negatives)
    assert result.rule.min_max_probability == pytest.approx(0.6)  # midpoint of 0.5 and 0.7
    assert (result.sensitivity, result.specificity) == (1.0, 1.0)


def test_unreachable_specificity_and_missing_classes_are_errors():
    positives = np.array([[0.9, 2.0], [0.95, 3.0]])
    negatives = np.array([[1.0, 5.0], [0.1, 0.0]])  # a negative above every positive
    with pytest.raises(ValueError, match="specificity 1.0"):
        calibrate(positives, negatives, objective="specificity", min_specificity=1.0)
    with pytest.raises(ValueError, match="positives and negatives"):
        calibrate(positives, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="objective"):
        calibrate(positives, negatives, objective="accuracy")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        features_table(np.zeros((3, 3)))


def test_evaluate_rule_counts():
    rule = NotPresentRule(min_max_probability=0.5, min_volume_ml=1.0)
    positives = [
        {"max_probability": 0.9, "volume_ml": 2.0},
        {"max_probability": 0.9, "volume_ml": 0.5},
        {"max_probability": 0.4, "volume_ml": 3.0},
        {"max_probability": 0.6, "volume_ml": 1.0},
    ]
    negatives = [{"max_probability": 0.2, "volume_ml": 0.0}, {"max_probability": 0.8, "volume_ml": 4.0}]
    result = evaluate_rule(rule, positives, negatives)
    assert result["true_positives"] == 2 and result["sensitivity"] == 0.5
    assert result["true_negatives"] == 1 and result["specificity"] == 0.5
