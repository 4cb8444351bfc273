"""Lesion candidates of a volume, what each one carries, and the same for the ground truth.

The candidates of a case are the 3D components (26-connectivity) of the text-free all-lesion output inside the
liver region. Each carries the attributes of the clinical record, measured exactly as the datalist's
``lesion_attributes`` are (:func:`custom.data.geometry.measure_lesions`: volume, longest axial diameter, centroid,
mean HU and contrast to the liver, density, lobe, Couinaud segment, distance to the dome) plus its position as
fractions of the liver's extent (``lateral``, ``vertical``, ``anterior``), and, per expression, the evidence of the
text-conditioned output over it (mean and maximum probability, share of its voxels at or above the threshold).
:func:`candidate_features` turns one candidate into the fixed-length vector a referral scorer reads, the same for
a detected candidate and for a ground-truth lesion, so a scorer can learn from both.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from custom.clinical.geometry import bounding_box, grow_box
from custom.data.geometry import LiverFrame, measure_lesions, segment_of_fractions

__all__ = [
    "FEATURE_NAMES",
    "lesion_candidates",
    "split_touching",
    "with_liver_fractions",
    "candidate_evidence",
    "candidate_features",
    "candidate_feature_table",
    "match_candidates",
]

#: Order of the values of :func:`candidate_features`.
FEATURE_NAMES = (
    "log1p_volume_ml",
    "longest_axial_diameter_cm",
    "lateral",
    "vertical",
    "anterior",
    "right_lobe",
    "contrast_hu_per_100",
    "dome_distance_cm",
    "evidence_mean",
    "evidence_max",
    "evidence_share",
    "detection_mean",
    *(f"segment_{number}" for number in range(2, 9)),
)


def split_touching(components: np.ndarray, spacing_mm, depth_mm: float) -> np.ndarray:
    """Split components that are touching round lesions at their narrowing.

    ``components`` (X, Y, Z) int labels (0 background); ``spacing_mm`` the voxel size per axis. Inside each
    component the distance to its border (mm) has one maximum per lesion centre; maxima that stand at least
    ``depth_mm`` above the saddle between them (``skimage.morphology.h_maxima``) seed a watershed of the negative
    distance, confined to the component. A component with fewer than two such maxima is left whole. Each component
    is worked on inside its own box, so the cost follows the lesions' size, not the volume's. Returns the split
    labels (X, Y, Z) int32, 0 background, in no particular order.
    """
    components = np.asarray(components)
    split = np.zeros(components.shape, np.int32)
    structure = np.ones((3, 3, 3), bool)
    label = 0
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        mask = components[grown] == index
        distance = ndimage.distance_transform_edt(mask, sampling=spacing_mm).astype(np.float32)
        count = 0
        if distance.max() >= depth_mm:  # thinner components hold no seed
            seeds, count = ndimage.label(h_maxima(distance, depth_mm), structure=structure)
        view = split[grown]
        if count < 2:
            label += 1
            view[mask] = label
            continue
        parts = watershed(-distance, seeds, mask=mask, connectivity=3)
        view[mask] = parts[mask] + label
        label += count
    return split


def lesion_candidates(
    lesion_probability: np.ndarray,
    affine: np.ndarray,
    image_hu: np.ndarray,
    liver: np.ndarray,
    threshold: float = 0.5,
    min_voxels: int = 3,
    split_depth_mm: float | None = None,
) -> tuple[np.ndarray, list[dict], dict]:
    """The lesion candidates of one volume.

    Args:
        lesion_probability: (X, Y, Z) text-free all-lesion probabilities, already restricted to the liver region.
        affine: 4x4 voxel-to-RAS affine of the arrays.
        image_hu: (X, Y, Z) CT in Hounsfield units.
        liver: (X, Y, Z) liver mask (probability >= 0.5 or a label); its largest component is the liver.
        threshold: probability at which a voxel belongs to a candidate.
        min_voxels: smaller components are left out.
        split_depth_mm: when given, touching lesions are split at their narrowing (:func:`split_touching`).

    Returns:
        (int32 (X, Y, Z) candidate map, 0 background and 1..K, the attribute dicts of the candidates in id order
        (``measure_lesions``' keys plus ``lateral``, ``vertical``, ``anterior``), and the case dict of
        ``measure_lesions`` (``liver_frame``, ``liver_hu``)). Ids follow decreasing volume.
    """
    foreground = np.asarray(lesion_probability) >= threshold
    # labelled and split inside the lesions' box grown by a voxel of background (what the splitting reads around
    # each component): the same candidates for a fraction of the work
    box = bounding_box(foreground) or tuple(slice(0, 0) for _ in foreground.shape)
    box = grow_box(box, 1, foreground.shape)
    foreground = foreground[box]
    components, count = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    if split_depth_mm is not None and count:
        spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
        components = split_touching(components, spacing, split_depth_mm)
        count = int(components.max())
    sizes = ndimage.sum_labels(foreground, components, np.arange(1, count + 1)) if count else np.zeros(0)
    kept = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels]
    relabel = np.zeros(count + 1, np.int32)
    relabel[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    candidates = np.zeros(np.shape(lesion_probability), np.int32)
    candidates[box] = relabel[components]
    attributes, case = measure_lesions(candidates, affine, np.asarray(image_hu), np.asarray(liver) > 0)
    attributes = [with_liver_fractions(item, case["liver_frame"]) for item in attributes]
    return candidates, attributes, case


def with_liver_fractions(attributes: dict, liver_frame: dict | None) -> dict:
    """A lesion's or candidate's attributes plus its centroid's ``lateral``, ``vertical`` and ``anterior`` fractions
    of the liver's extent (:meth:`custom.data.geometry.LiverFrame.fractions`; unchanged without a liver frame)."""
    if not liver_frame:
        return dict(attributes)
    fractions = LiverFrame.from_dict(liver_frame).fractions(attributes["centroid_ras_mm"])
    return {**attributes, **dict(zip(("lateral", "vertical", "anterior"), fractions))}


def candidate_evidence(candidates: np.ndarray, referred_probability: np.ndarray, threshold: float = 0.5) -> list[dict]:
    """The text-conditioned evidence over each candidate of a (X, Y, Z) candidate map (ids 1..K).

    ``referred_probability`` (X, Y, Z): the expression's probabilities (channel 0 after the sigmoid). Returns, in id
    order, ``evidence_mean``, ``evidence_max`` and ``evidence_share`` (share of the candidate's voxels at or above
    ``threshold``).
    """
    candidates = np.asarray(candidates)
    count = int(candidates.max(initial=0))
    if count == 0:
        return []
    probability = np.asarray(referred_probability, dtype=np.float64)
    index = np.arange(1, count + 1)
    mean = ndimage.mean(probability, candidates, index)
    maximum = ndimage.maximum(probability, candidates, index)
    share = ndimage.mean(probability >= threshold, candidates, index)
    return [
        {"evidence_mean": float(m), "evidence_max": float(x), "evidence_share": float(s)}
        for m, x, s in zip(mean, maximum, share)
    ]


def candidate_features(attributes: dict, evidence: dict | None = None) -> np.ndarray:
    """(len(FEATURE_NAMES),) float32 vector of one candidate or ground-truth lesion.

    ``attributes``: a candidate's dict of :func:`lesion_candidates`, or a lesion of a datalist's
    ``lesion_attributes`` with its liver-frame fractions added. Missing values (no liver, no HU) are 0, and so is
    the evidence when ``evidence`` is None (before any expression). ``evidence`` may also hold ``detection_mean``,
    the mean text-free all-lesion probability over the candidate (how sure the detector is that it is a lesion).
    The last seven values are the one-hot Couinaud segment of the centroid, from its liver-frame fractions
    (:func:`custom.data.geometry.segment_of_fractions`).
    """
    evidence = evidence or {}
    values = (
        np.log1p(max(float(attributes.get("volume_ml", 0.0)), 0.0)),
        float(attributes.get("longest_axial_diameter_mm", 0.0)) / 10.0,
        float(attributes.get("lateral", 0.0)),
        float(attributes.get("vertical", 0.0)),
        float(attributes.get("anterior", 0.0)),
        1.0 if attributes.get("lobe") == "right" else 0.0,
        float(attributes.get("contrast_hu", 0.0)) / 100.0,
        float(attributes.get("dome_distance_mm", 0.0)) / 10.0,
        float(evidence.get("evidence_mean", 0.0)),
        float(evidence.get("evidence_max", 0.0)),
        float(evidence.get("evidence_share", 0.0)),
        float(evidence.get("detection_mean", 0.0)),
    )
    segment = np.zeros(7, np.float32)  # one-hot Couinaud segment 2..8 of the centroid, all 0 without a liver frame
    if "lateral" in attributes:
        fractions = (float(attributes[k]) for k in ("lateral", "vertical", "anterior"))
        segment[segment_of_fractions(*fractions) - 2] = 1.0
    return np.concatenate([np.asarray(values, dtype=np.float32), segment])


def candidate_feature_table(attributes: list[dict], evidence: list[dict], detection: list[float]) -> np.ndarray:
    """(K, len(FEATURE_NAMES)) float32 features of K candidates (or lesions) from their attributes, their
    :func:`candidate_evidence` and their mean all-lesion (detection) probabilities, all in the same order."""
    rows = [candidate_features(a, {**e, "detection_mean": p}) for a, e, p in zip(attributes, evidence, detection)]
    return np.stack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)), np.float32)


def match_candidates(candidates: np.ndarray, instance_map: np.ndarray, min_overlap: float = 0.5) -> list[int]:
    """The ground-truth lesion id each candidate stands for (0: none), for training a scorer.

    A candidate stands for the lesion holding the largest share of its voxels when that share is at least
    ``min_overlap``; otherwise (a false positive, or a candidate spread over several lesions) for none.
    """
    candidates, instance_map = np.asarray(candidates), np.asarray(instance_map)
    matches = []
    for candidate_id in range(1, int(candidates.max(initial=0)) + 1):
        labels = instance_map[candidates == candidate_id]
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        best = int(np.argmax(counts)) if counts.size else -1
        matches.append(int(ids[best]) if best >= 0 and counts[best] >= min_overlap * labels.size else 0)
    return matches
