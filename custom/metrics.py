"""Metrics of referring lesion segmentation, one definition used everywhere.

Per (case, expression) a :class:`ExpressionScores` holds the 3D Dice, the 2D slice overlaps and the lesion-wise
matching; :func:`summarize` aggregates a list of them, overall and per expression kind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice
from scipy import ndimage

from custom.clinical.measurements import axial_axis
from custom.detection.candidates import match_candidates

__all__ = [
    "EXPRESSION_KINDS",
    "ExpressionScores",
    "axial_axis",
    "dice_3d",
    "slice_overlaps",
    "match_lesions",
    "score_expression",
    "summarize",
    "SIZE_BINS",
    "match_detections",
    "match_candidate_detections",
    "summarize_detection",
]

EXPRESSION_KINDS = ("location", "size", "density", "count", "negative")
PRECISION_THRESHOLDS = (0.5, 0.7, 0.9)
#: A referred lesion counts as found when a predicted component overlaps it with at least this Dice.
HIT_DICE = 0.1


def dice_3d(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary volumes (MONAI's ``compute_dice``); two empty volumes agree perfectly (1.0)."""
    as_batch = lambda volume: torch.as_tensor(np.asarray(volume, dtype=bool), dtype=torch.float32)[None, None]  # noqa: E731
    return float(compute_dice(as_batch(pred), as_batch(target), include_background=True, ignore_empty=False))


def slice_overlaps(pred: np.ndarray, target: np.ndarray, axis: int) -> list[tuple[int, int]]:
    """(intersection, union) per 2D slice sample along ``axis``: the slices where the target is present.

    Counts rather than MONAI's ``compute_iou`` ratios: the overall IoU (oIoU) sums
    intersections and unions over all slices, which the per-slice ratios cannot give.
    """
    pred, target = np.moveaxis(pred.astype(bool), axis, 0), np.moveaxis(target.astype(bool), axis, 0)
    return [(int(np.logical_and(p, t).sum()), int(np.logical_or(p, t).sum())) for p, t in zip(pred, target) if t.any()]


def match_lesions(
    pred: np.ndarray, instance_map: np.ndarray, target_ids: Sequence[int], min_dice: float = HIT_DICE
) -> dict[str, int]:
    """Match predicted 3D components (26-connectivity) to the referred lesions by Dice >= ``min_dice``.

    Returns counts: ``targets``, ``targets_hit``, ``components``, ``components_matched``.
    """
    components, count = ndimage.label(pred.astype(bool), structure=np.ones((3, 3, 3), bool))
    targets = [instance_map == t for t in target_ids]
    target_sizes = [int(t.sum()) for t in targets]
    hit = [False] * len(targets)
    matched = 0
    for component_id in range(1, count + 1):
        component = components == component_id
        size = int(component.sum())
        is_match = False
        for i, (target, target_size) in enumerate(zip(targets, target_sizes)):
            overlap = int(np.logical_and(component, target).sum())
            if overlap and 2.0 * overlap / (size + target_size) >= min_dice:
                hit[i] = is_match = True
        matched += is_match
    return {"targets": len(targets), "targets_hit": sum(hit), "components": count, "components_matched": matched}


@dataclass
class ExpressionScores:
    """Scores of one (case, expression)."""

    case_id: str
    text: str
    kind: str
    targets: list[int]
    dice: float
    predicted_empty: bool
    lesions: dict[str, int]
    slices: list[tuple[int, int]] = field(default_factory=list)
    features: dict = field(default_factory=dict)
    selector: str = ""

    @property
    def negative(self) -> bool:
        return not self.targets

    @property
    def hit(self) -> bool:
        """Positive expression whose every referred lesion was found."""
        return bool(self.targets) and self.lesions["targets_hit"] == len(self.targets)

    def row(self) -> dict:
        """Flat record for the per-expression CSV."""
        ious = [i / u for i, u in self.slices if u]
        return {
            "case_id": self.case_id,
            "text": self.text,
            "kind": self.kind,
            "selector": self.selector,
            "targets": " ".join(map(str, self.targets)),
            "dice_3d": round(self.dice, 6),
            "predicted_empty": int(self.predicted_empty),
            "hit": int(self.hit),
            "slices": len(self.slices),
            "mean_slice_iou": round(float(np.mean(ious)), 6) if ious else "",
            **{f"lesion_{k}": v for k, v in self.lesions.items()},
            **{k: round(float(v), 6) for k, v in self.features.items()},
        }


def score_expression(
    pred: np.ndarray,
    instance_map: np.ndarray,
    target_ids: Sequence[int],
    affine: np.ndarray,
    case_id: str = "",
    text: str = "",
    kind: str = "",
    features: dict | None = None,
    selector: str = "",
) -> ExpressionScores:
    """All scores of one binary prediction against the referred lesions ``target_ids`` of ``instance_map``.

    ``features`` (e.g. the "not present" rule's maximum probability and predicted volume) are carried along.
    """
    pred = np.asarray(pred).astype(bool)
    instance_map = np.asarray(instance_map)
    target = np.isin(instance_map, list(target_ids)) if target_ids else np.zeros_like(pred)
    return ExpressionScores(
        case_id=case_id,
        text=text,
        kind=kind or ("negative" if not target_ids else ""),
        targets=[int(t) for t in target_ids],
        dice=dice_3d(pred, target),
        predicted_empty=not pred.any(),
        lesions=match_lesions(pred, instance_map, target_ids),
        slices=slice_overlaps(pred, target, axial_axis(affine)),
        features=dict(features or {}),
        selector=str(selector or ""),
    )


def _summary_of(scores: Sequence[ExpressionScores]) -> dict:
    positives = [s for s in scores if not s.negative]
    negatives = [s for s in scores if s.negative]
    slices = [pair for s in positives for pair in s.slices]
    ious = np.array([i / u for i, u in slices if u], dtype=float)
    lesions = {
        k: sum(s.lesions[k] for s in scores) for k in ("targets", "targets_hit", "components", "components_matched")
    }
    precision = lesions["components_matched"] / lesions["components"] if lesions["components"] else float("nan")
    recall = lesions["targets_hit"] / lesions["targets"] if lesions["targets"] else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    cases = {s.case_id for s in scores}
    false_positives = lesions["components"] - lesions["components_matched"]
    summary = {
        "expressions": len(scores),
        "dice_3d": float(np.mean([s.dice for s in scores])) if scores else float("nan"),
        "positive_dice_3d": float(np.mean([s.dice for s in positives])) if positives else float("nan"),
        "slice_samples": len(slices),
        "mIoU": float(ious.mean()) if ious.size else float("nan"),
        "oIoU": sum(i for i, _ in slices) / sum(u for _, u in slices) if slices else float("nan"),
        **{f"P@{t}": float((ious >= t).mean()) if ious.size else float("nan") for t in PRECISION_THRESHOLDS},
        "negatives": len(negatives),
        "negatives_empty_rate": float(np.mean([s.predicted_empty for s in negatives])) if negatives else float("nan"),
        "positive_hit_rate": float(np.mean([s.hit for s in positives])) if positives else float("nan"),
        "lesion_hit_rate": recall,
        "instance_precision": precision,
        "instance_recall": recall,
        "instance_f1": f1,
        "false_positives_per_case": false_positives / len(cases) if cases else float("nan"),
        "false_positives_per_expression": false_positives / len(scores) if scores else float("nan"),
    }
    return summary


def summarize(scores: Iterable[ExpressionScores]) -> dict:
    """Aggregate scores overall, per expression kind (location, size, density, count, negative) and per selector
    (``largest``, ``leftmost``, ``all`` ..., for the expressions that carry one)."""
    scores = list(scores)
    result = {"overall": _summary_of(scores), "by_kind": {}, "by_selector": {}}
    for kind in EXPRESSION_KINDS:
        of_kind = [s for s in scores if s.kind == kind]
        if of_kind:
            result["by_kind"][kind] = _summary_of(of_kind)
    for selector in sorted({s.selector for s in scores if s.selector}):
        result["by_selector"][selector] = _summary_of([s for s in scores if s.selector == selector])
    return result


def scores_to_dict(scores: ExpressionScores) -> dict:
    """JSON-serialisable form of one ExpressionScores."""
    return asdict(scores)


#: Lesion size bins of the detection summary, in ml: (name, lower bound inclusive, upper bound exclusive).
SIZE_BINS = (("<1ml", 0.0, 1.0), ("1-5ml", 1.0, 5.0), (">5ml", 5.0, float("inf")))


def match_detections(
    pred: np.ndarray, instance_map: np.ndarray, voxel_ml: float, min_dice: float = HIT_DICE
) -> tuple[list[dict], int]:
    """Text-free lesion detection of one case: every lesion of ``instance_map`` against the predicted components.

    A lesion's Dice is taken with the union of the predicted 3D components (26-connectivity) that overlap it; it is
    found when that Dice is at least ``min_dice``. Returns one dict per lesion (``id``, ``volume_ml``, ``dice``,
    ``found``, and ``covered``: the share of its voxels predicted, which tells a lesion merged with a larger
    neighbour, covered but below ``min_dice``, from one not seen) and the number of false-positive components
    (touching no lesion).
    """
    pred = np.asarray(pred).astype(bool)
    instance_map = np.asarray(instance_map).astype(np.int64)
    components, count = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    lesions = []
    for lesion_id in (int(v) for v in np.unique(instance_map) if v != 0):
        lesion = instance_map == lesion_id
        touching = np.unique(components[lesion])
        touching = touching[touching != 0]
        union = np.isin(components, touching) if touching.size else np.zeros_like(pred)
        size = int(lesion.sum())
        dice = 2.0 * float(np.logical_and(lesion, union).sum()) / float(size + union.sum())
        covered = float(np.logical_and(lesion, pred).sum()) / size
        lesions.append(
            {"id": lesion_id, "volume_ml": size * voxel_ml, "dice": dice, "found": dice >= min_dice, "covered": covered}
        )
    if count == 0:
        return lesions, 0
    touches_lesion = ndimage.maximum(instance_map > 0, components, np.arange(1, count + 1))
    return lesions, int(np.sum(np.asarray(touches_lesion) == 0))


def match_candidate_detections(
    candidates: np.ndarray, instance_map: np.ndarray, voxel_ml: float, min_dice: float = HIT_DICE
) -> tuple[list[dict], int]:
    """Lesion detection of one case by lesion candidates (instances, as the referral sees them).

    Each candidate stands for the lesion holding at least half of its voxels, or for none
    (:func:`custom.detection.candidates.match_candidates`); a lesion's Dice is taken with the union of the candidates
    standing for it, so a candidate that merges two lesions serves one of them only. Returns the dicts of
    :func:`match_detections` and the number of candidates that stand for no lesion.
    """
    candidates = np.asarray(candidates)
    instance_map = np.asarray(instance_map).astype(np.int64)
    matches = np.asarray([0, *match_candidates(candidates, instance_map)])
    standing_for = matches[candidates]  # (X, Y, Z) the lesion id each candidate voxel stands for
    lesions = []
    for lesion_id in (int(v) for v in np.unique(instance_map) if v != 0):
        lesion = instance_map == lesion_id
        predicted = standing_for == lesion_id
        size = int(lesion.sum())
        dice = 2.0 * float(np.logical_and(lesion, predicted).sum()) / float(size + predicted.sum())
        lesions.append({"id": lesion_id, "volume_ml": size * voxel_ml, "dice": dice, "found": dice >= min_dice})
    return lesions, int(np.sum(matches[1:] == 0))


def summarize_detection(lesions: Sequence[dict], false_positives: Sequence[int], liver_dice: Sequence[float]) -> dict:
    """Recall and per-lesion Dice by density and size bin, false positives per case and liver Dice.

    ``lesions``: the dicts of :func:`match_detections`, each with a ``density`` added (``hypodense``,
    ``hyperdense`` or ``unknown``); ``false_positives`` and ``liver_dice``: one value per case.
    """

    def group(members: list[dict]) -> dict:
        return {
            "lesions": len(members),
            "recall": float(np.mean([m["found"] for m in members])) if members else float("nan"),
            "mean_dice": float(np.mean([m["dice"] for m in members])) if members else float("nan"),
        }

    densities = sorted({m.get("density", "unknown") for m in lesions})
    by_group = {}
    for density in ["all", *densities]:
        of_density = [m for m in lesions if density == "all" or m.get("density", "unknown") == density]
        by_group[density] = {"all": group(of_density)}
        for name, low, high in SIZE_BINS:
            by_group[density][name] = group([m for m in of_density if low <= m["volume_ml"] < high])
        by_group[density][">=1ml"] = group([m for m in of_density if m["volume_ml"] >= 1.0])
    return {
        "cases": len(false_positives),
        "by_density_and_size": by_group,
        "false_positives_per_case": float(np.mean(false_positives)) if false_positives else float("nan"),
        "liver_dice": float(np.mean(liver_dice)) if liver_dice else float("nan"),
    }
