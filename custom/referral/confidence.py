"""The answer's ``confidence``: the probability that it is right, calibrated on the validation split.

An answer is right when it is "found" and its mask matches the referred lesions (3D Dice >= :data:`RIGHT_DICE`), or
when it is "not present" and no lesion is referred. The referral's raw outputs (the scorer's "none of them"
probability, its scores of the chosen candidates, the text-conditioned evidence over them) are scores, not
probabilities; :class:`ConfidenceCalibration` maps them to one with a logistic model per kind of answer, fitted on
the validation split's per-expression results by :func:`fit_calibration` (``python -m custom.clinical.calibrate
--confidence``), and measured on the test split by :func:`expected_calibration_error` and a reliability diagram.

Low evidence never comes with high confidence: a "found" answer whose chosen lesions have a mean text-conditioned
probability under ``min_evidence`` gets a confidence below 0.5, whatever the model says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "ABSENT_FEATURES",
    "FOUND_FEATURES",
    "RIGHT_DICE",
    "ConfidenceCalibration",
    "answer_is_right",
    "expected_calibration_error",
    "fit_calibration",
]

#: A found answer is right when its 3D Dice with the referred lesions reaches this.
RIGHT_DICE = 0.5
#: Features of a "found" answer (decision features of :class:`custom.referral.choose.CandidateReferrald`): the scorer's
#: "none of them" probability, its mean score of the chosen candidates, its best score and the answer's volume.
FOUND_FEATURES = ("none_probability", "chosen_score", "top_score", "volume_ml")
#: Features of a "not present" answer.
ABSENT_FEATURES = ("none_probability", "top_score")
#: The highest confidence a found answer with too little text-conditioned evidence can get.
LOW_EVIDENCE_CAP = 0.49
#: How each feature enters the logistic model (probabilities near 0 and volumes spread over decades: logarithms).
TRANSFORMS = {
    "none_probability": lambda p: float(np.log(np.clip(p, 1e-4, 1.0))),
    "chosen_score": float,
    "top_score": float,
    "volume_ml": lambda v: float(np.log(max(v, 0.0) + 0.01)),
}


def _inputs(found: bool, features: Mapping[str, float]) -> np.ndarray:
    """The logistic model's inputs: a bias and each feature of the answer's kind, transformed."""
    names = FOUND_FEATURES if found else ABSENT_FEATURES
    return np.array([1.0, *(TRANSFORMS[name](float(features.get(name, 0.0))) for name in names)])


class ConfidenceCalibration:
    """Calibrated confidence of an answer from its decision features.

    Args:
        found: coefficients ``[bias, w_1, ...]`` over :data:`FOUND_FEATURES` (:data:`TRANSFORMS`; None: uncalibrated).
        not_present: coefficients over :data:`ABSENT_FEATURES` (None: uncalibrated).
        min_evidence: a found answer whose ``evidence_mean`` is below this gets at most :data:`LOW_EVIDENCE_CAP`.
    """

    def __init__(
        self,
        found: Sequence[float] | None = None,
        not_present: Sequence[float] | None = None,
        min_evidence: float = 0.1,
    ) -> None:
        self.found = None if found is None else np.asarray(found, dtype=np.float64)
        self.not_present = None if not_present is None else np.asarray(not_present, dtype=np.float64)
        self.min_evidence = float(min_evidence)

    def __call__(self, found: bool, features: Mapping[str, float]) -> float:
        """The probability that the answer (``found`` or not) is right."""
        coefficients = self.found if found else self.not_present
        if coefficients is None:
            raw = 1.0 - features["none_probability"] if found else features["none_probability"]
        else:
            raw = float(1.0 / (1.0 + np.exp(-float(_inputs(found, features) @ coefficients))))
        if found and features.get("evidence_mean", 1.0) < self.min_evidence:
            raw = min(raw, LOW_EVIDENCE_CAP)
        return raw

    def to_dict(self) -> dict:
        return {
            "found": None if self.found is None else [round(float(v), 5) for v in self.found],
            "not_present": None if self.not_present is None else [round(float(v), 5) for v in self.not_present],
            "min_evidence": self.min_evidence,
        }


def answer_is_right(found: bool, referred: bool, dice: float) -> bool:
    """Whether an answer is right (see the module docstring)."""
    return (found and referred and dice >= RIGHT_DICE) or (not found and not referred)


def _fit_logistic(inputs: np.ndarray, right: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Coefficients of a logistic model (L2-penalised except the bias) by maximum likelihood."""

    def loss(w):
        z = inputs @ w
        penalty = 0.5 * l2 * float(w[1:] @ w[1:])
        return float(np.sum(np.logaddexp(0.0, z) - right * z)) + penalty

    def gradient(w):
        p = 1.0 / (1.0 + np.exp(-(inputs @ w)))
        g = inputs.T @ (p - right)
        g[1:] += l2 * w[1:]
        return g

    return minimize(loss, np.zeros(inputs.shape[1]), jac=gradient, method="L-BFGS-B").x


def fit_calibration(rows: Sequence[Mapping], min_evidence: float = 0.1, l2: float = 0.1) -> ConfidenceCalibration:
    """Fit both logistic models on per-expression rows (``found``, ``referred``, ``dice`` and the features)."""
    coefficients = {}
    for found in (True, False):
        part = [r for r in rows if bool(r["found"]) == found]
        if len(part) < 5:
            coefficients[found] = None
            continue
        inputs = np.stack([_inputs(found, r) for r in part])
        right = np.array([answer_is_right(found, bool(r["referred"]), float(r["dice"])) for r in part], float)
        coefficients[found] = _fit_logistic(inputs, right, l2)
    return ConfidenceCalibration(coefficients[True], coefficients[False], min_evidence)


def expected_calibration_error(confidence: Sequence[float], right: Sequence[bool], bins: int = 10) -> dict:
    """Expected calibration error over ``bins`` equal-width bins, and each bin's (mean confidence, accuracy, count)
    for the reliability diagram."""
    confidence, right = np.asarray(confidence, float), np.asarray(right, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        mean_confidence, accuracy = float(confidence[members].mean()), float(right[members].mean())
        error += members.sum() / len(confidence) * abs(mean_confidence - accuracy)
        table.append({"bin": [round(edges[b], 2), round(edges[b + 1], 2)], "confidence": round(mean_confidence, 4),
                      "accuracy": round(accuracy, 4), "count": int(members.sum())})  # fmt: skip
    return {"ece": float(error), "answers": int(len(confidence)), "bins": table}
