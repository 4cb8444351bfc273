"""The "not present" decision: does the referred lesion exist in this volume?

Features of a probability volume ``p`` (after sigmoid, on a grid with a known voxel volume):

- ``max_probability``: the largest voxel probability;
- ``volume_ml``: the volume of the voxels with ``p >= voxel_threshold`` (the voxels the mask would hold).

Rule: "found" if ``max_probability >= min_max_probability`` and ``volume_ml >= min_volume_ml`` and the mask is not
empty; otherwise "not present" (and the mask is emptied). The thresholds are plain floats a JSON config can hold;
:func:`calibrate` chooses them on validation data, :func:`evaluate_rule` reports sensitivity/specificity on test data.
Positives are expressions whose referred lesion exists; sensitivity = share of positives answered "found",
specificity = share of negatives answered "not present".

Confidence (in [0.5, 1]) of a decision: ``0.5 + 0.5 * margin``, where the margin in [0, 1] is how far the features
lie from the operating point, each normalised by its room on that side of its threshold:

- probability margin: ``(p_max - t_p) / (1 - t_p)`` above the threshold, ``(t_p - p_max) / t_p`` below;
- volume margin: ``(v - t_v) / v`` above the threshold (1 when ``t_v = 0``), ``(t_v - v) / t_v`` below.

"Found" takes the smaller of the two margins (both must hold); "not present" takes the larger margin among the
features that failed (one failure suffices). A decision exactly at the operating point has confidence 0.5. This is a
documented score, not a calibrated probability of being right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from custom.clinical.geometry import affine_of, as_spatial_array
from custom.clinical.measurements import voxel_volume_ml

__all__ = ["Decision", "NotPresentRule", "Calibration", "calibrate", "evaluate_rule", "features_table"]

FEATURE_NAMES = ("max_probability", "volume_ml")


@dataclass(frozen=True)
class Decision:
    """Outcome of :meth:`NotPresentRule.decide`: found or not, its confidence and the features it used."""

    found: bool
    confidence: float
    features: dict = field(default_factory=dict)
    rule: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _margin_above(value: float, threshold: float, upper: float | None) -> float:
    """Normalised distance of ``value >= threshold`` above it: to ``upper`` (probability) or relative (volume)."""
    room = (upper - threshold) if upper is not None else value
    return 1.0 if room <= 0 else float(np.clip((value - threshold) / room, 0.0, 1.0))


def _margin_below(value: float, threshold: float) -> float:
    """Normalised distance of ``value < threshold`` below it (``threshold > 0``)."""
    return float(np.clip((threshold - value) / threshold, 0.0, 1.0))


@dataclass
class NotPresentRule:
    """Decide "found" vs "not present" from a probability volume.

    Args:
        min_max_probability: smallest maximum voxel probability that counts as "found".
        min_volume_ml: smallest predicted volume (ml) that counts as "found".
        voxel_threshold: probability at or above which a voxel belongs to the mask (and to ``volume_ml``).
    """

    min_max_probability: float = 0.5
    min_volume_ml: float = 0.0
    voxel_threshold: float = 0.5

    def __post_init__(self):
        for name in ("min_max_probability", "voxel_threshold"):
            value = float(getattr(self, name))
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {value}.")
            setattr(self, name, value)
        self.min_volume_ml = float(self.min_volume_ml)
        if self.min_volume_ml < 0:
            raise ValueError(f"min_volume_ml must be >= 0, got {self.min_volume_ml}.")

    def to_dict(self) -> dict:
        """The parameters as plain floats (for a JSON config)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, params: Mapping) -> NotPresentRule:
        return cls(**{k: float(params[k]) for k in ("min_max_probability", "min_volume_ml", "voxel_threshold")})

    def features(self, probabilities, affine=None, voxel_ml: float | None = None) -> dict:
        """``max_probability`` and ``volume_ml`` of a probability volume (X, Y, Z) or (1, X, Y, Z).

        The voxel volume comes from ``voxel_ml``, else from ``affine`` (or ``probabilities.affine``).
        """
        probs = as_spatial_array(probabilities)
        if voxel_ml is None:
            voxel_ml = voxel_volume_ml(affine_of(probabilities, affine))
        return {
            "max_probability": float(probs.max()) if probs.size else 0.0,
            "volume_ml": float(np.count_nonzero(probs >= self.voxel_threshold)) * float(voxel_ml),
        }

    def decide_features(self, features: Mapping) -> Decision:
        """Decision and confidence for precomputed ``features`` (see the module docstring)."""
        p, v = float(features["max_probability"]), float(features["volume_ml"])
        t_p, t_v = self.min_max_probability, self.min_volume_ml
        probability_ok, volume_ok = p >= t_p, v >= t_v and v > 0
        if probability_ok and volume_ok:
            margin = min(_margin_above(p, t_p, 1.0), _margin_above(v, t_v, None))
        else:
            failed = []
            if not probability_ok:
                failed.append(_margin_below(p, t_p))
            if not volume_ok:
                failed.append(_margin_below(v, t_v) if t_v > 0 else 1.0)
            margin = max(failed)
        found = probability_ok and volume_ok
        return Decision(found, 0.5 + 0.5 * margin, {"max_probability": p, "volume_ml": v}, self.to_dict())

    def decide(self, probabilities, affine=None, voxel_ml: float | None = None) -> Decision:
        """Decide on a probability volume (after sigmoid); see :meth:`features`."""
        return self.decide_features(self.features(probabilities, affine, voxel_ml))

    def apply(self, probabilities, decision: Decision) -> np.ndarray:
        """The binary mask (uint8, same spatial shape) that goes with ``decision``: empty when "not present"."""
        probs = as_spatial_array(probabilities)
        if not decision.found:
            return np.zeros(probs.shape, dtype=np.uint8)
        return (probs >= self.voxel_threshold).astype(np.uint8)


def features_table(features: Sequence[Mapping] | np.ndarray) -> np.ndarray:
    """Stack feature dicts (or pass an (N, 2) array) into an (N, 2) array [max_probability, volume_ml]."""
    if isinstance(features, np.ndarray):
        table = features.astype(np.float64)
    else:
        table = np.array([[float(f[name]) for name in FEATURE_NAMES] for f in features], dtype=np.float64)
    if table.size == 0:
        return np.zeros((0, 2))
    if table.ndim != 2 or table.shape[1] != 2:
        raise ValueError(f"Expected features of shape (N, 2) [{', '.join(FEATURE_NAMES)}], got {table.shape}.")
    return table


def _found(table: np.ndarray, t_p: float, t_v: float) -> np.ndarray:
    return (table[:, 0] >= t_p) & (table[:, 1] >= t_v) & (table[:, 1] > 0)


def _found_rates(table: np.ndarray, t_p: float, volume_thresholds: np.ndarray) -> np.ndarray:
    """Share of ``table`` rows answered "found" for one probability threshold and each volume threshold."""
    candidates = (table[:, 0] >= t_p) & (table[:, 1] > 0)
    return ((table[None, :, 1] >= volume_thresholds[:, None]) & candidates[None, :]).mean(axis=1)


def evaluate_rule(rule: NotPresentRule, positives, negatives) -> dict:
    """Sensitivity and specificity of ``rule`` on feature sets of positives and negatives (with counts)."""
    pos, neg = features_table(positives), features_table(negatives)
    true_pos = int(_found(pos, rule.min_max_probability, rule.min_volume_ml).sum())
    true_neg = int((~_found(neg, rule.min_max_probability, rule.min_volume_ml)).sum())
    return {
        "sensitivity": true_pos / len(pos) if len(pos) else float("nan"),
        "specificity": true_neg / len(neg) if len(neg) else float("nan"),
        "n_positives": len(pos),
        "n_negatives": len(neg),
        "true_positives": true_pos,
        "true_negatives": true_neg,
    }


def _candidate_thresholds(values: np.ndarray, lowest: float, highest: float | None = None) -> np.ndarray:
    """``lowest`` plus the midpoints between consecutive distinct values (clipped to ``highest``)."""
    unique = np.unique(values)
    midpoints = (unique[:-1] + unique[1:]) / 2.0
    candidates = np.unique(np.concatenate([[lowest], midpoints[midpoints > lowest]]))
    return candidates if highest is None else candidates[candidates <= highest]


@dataclass(frozen=True)
class Calibration:
    """Chosen operating point and its sensitivity/specificity on the calibration (validation) data."""

    rule: NotPresentRule
    sensitivity: float
    specificity: float
    youden_j: float
    objective: str
    n_positives: int
    n_negatives: int

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rule"] = self.rule.to_dict()
        return out


def calibrate(
    positives,
    negatives,
    objective: str = "youden",
    min_specificity: float = 0.9,
    voxel_threshold: float = 0.5,
) -> Calibration:
    """Choose ``min_max_probability`` and ``min_volume_ml`` on validation features.

    Candidates are the midpoints between consecutive observed values of each feature (plus "no threshold"), so the
    operating point lies between samples rather than on one.

    Args:
        positives: features (dicts or (N, 2) array [max_probability, volume_ml]) of expressions whose lesion exists,
            computed with the same ``voxel_threshold``.
        negatives: features of "no such lesion" expressions.
        objective: ``"youden"`` maximises sensitivity + specificity - 1; ``"specificity"`` maximises sensitivity
            among operating points with specificity >= ``min_specificity``.
        min_specificity: the specificity target of ``objective="specificity"``.
        voxel_threshold: the voxel threshold the features were computed with (stored in the rule).

    Ties are broken by higher specificity, then by the lower thresholds.

    Raises:
        ValueError: empty positives or negatives, an unknown objective, or an unreachable specificity target.
    """
    pos, neg = features_table(positives), features_table(negatives)
    if not len(pos) or not len(neg):
        raise ValueError(f"Calibration needs positives and negatives, got {len(pos)} and {len(neg)}.")
    if objective not in ("youden", "specificity"):
        raise ValueError(f"Unknown objective '{objective}'; use 'youden' or 'specificity'.")
    both = np.concatenate([pos, neg])
    volume_thresholds = _candidate_thresholds(both[:, 1], lowest=0.0)
    best_key, best = None, None
    for t_p in _candidate_thresholds(both[:, 0], lowest=1e-6, highest=1.0):
        sens = _found_rates(pos, t_p, volume_thresholds)
        spec = 1.0 - _found_rates(neg, t_p, volume_thresholds)
        score = sens if objective == "specificity" else sens + spec - 1.0
        allowed = spec >= min_specificity if objective == "specificity" else np.ones_like(spec, dtype=bool)
        indices = np.flatnonzero(allowed)
        if not indices.size:
            continue
        score, spec_r = np.round(score[indices], 12), np.round(spec[indices], 12)
        i = indices[np.lexsort((volume_thresholds[indices], -spec_r, -score))[0]]
        key = (round(float(score.max()), 12), round(float(spec[i]), 12), -t_p, -float(volume_thresholds[i]))
        if best_key is None or key > best_key:
            best_key, best = key, (float(t_p), float(volume_thresholds[i]), float(sens[i]), float(spec[i]))
    if best is None:
        raise ValueError(
            f"No operating point reaches specificity {min_specificity} on these {len(neg)} negatives; lower "
            "min_specificity or use objective='youden'."
        )
    t_p, t_v, sens, spec = best
    rule = NotPresentRule(min_max_probability=float(t_p), min_volume_ml=float(t_v), voxel_threshold=voxel_threshold)
    return Calibration(rule, sens, spec, sens + spec - 1.0, objective, len(pos), len(neg))
