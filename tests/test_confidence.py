"""The answer's confidence: calibrated by a logistic model per kind of answer, capped when evidence is low."""

from __future__ import annotations

import numpy as np
import pytest

from custom.referral.confidence import (
    LOW_EVIDENCE_CAP,
    ConfidenceCalibration,
    answer_is_right,
    expected_calibration_error,
    fit_calibration,
)


def synthetic_answers(n: int, seed: int) -> list[dict]:
    """Found answers whose chance of being right rises with the chosen score; not-present ones with "none"."""
    rng = np.random.default_rng(seed)
    answers = []
    for _ in range(n):
        found = bool(rng.random() < 0.6)
        score, none = float(rng.random()), float(rng.random())
        p_right = 0.15 + 0.8 * score if found else 0.1 + 0.85 * none
        right = bool(rng.random() < p_right)
        answers.append({"found": found, "none_probability": none, "chosen_score": score, "top_score": score,
                        "volume_ml": float(rng.uniform(0.1, 40)), "evidence_mean": 0.6,
                        "referred": right if found else not right, "dice": 0.9 if right else 0.0})  # fmt: skip
    return answers


def test_fitted_confidence_is_calibrated_on_new_answers_and_raw_scores_are_not():
    calibration = fit_calibration(synthetic_answers(3000, 0))
    held_out = synthetic_answers(3000, 1)
    right = [answer_is_right(a["found"], a["referred"], a["dice"]) for a in held_out]
    fitted = expected_calibration_error([calibration(a["found"], a) for a in held_out], right)["ece"]
    raw = expected_calibration_error([ConfidenceCalibration()(a["found"], a) for a in held_out], right)["ece"]
    assert fitted < 0.03 < raw, (fitted, raw)


def test_low_evidence_never_comes_with_high_confidence():
    calibration = ConfidenceCalibration(found=[10.0, 0.0, 0.0, 0.0, 0.0], not_present=[0.0, 0.0, 0.0])
    strong = {"none_probability": 0.0, "chosen_score": 1.0, "top_score": 1.0, "volume_ml": 5.0, "evidence_mean": 0.9}
    assert calibration(True, strong) > 0.99
    assert calibration(True, {**strong, "evidence_mean": 0.05}) == LOW_EVIDENCE_CAP


def test_expected_calibration_error_by_hand():
    report = expected_calibration_error([0.9, 0.9, 0.2, 0.2], [True, False, False, False])
    assert report["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.2)
    assert [b["count"] for b in report["bins"]] == [2, 2]
    assert answer_is_right(True, True, 0.6) and not answer_is_right(True, False, 0.0)
    assert answer_is_right(False, False, 0.0) and not answer_is_right(False, True, 0.0)
