"""Candidate-level referral (DESIGN section 8): which of a volume's lesion candidates an expression refers to.

Per volume, :class:`LesionCandidatesd` turns the text-free all-lesion output into 3D lesion candidates and measures
them (:func:`custom.candidates.lesion_candidates`). Per expression, :class:`CandidateReferrald` adds the
text-conditioned evidence over each candidate, lets :class:`custom.networks.scorer.CandidateScorer` score all of
them together with the expression's words, and answers the union of the chosen candidates' masks, or "not present"
when the scorer's "none of them" output wins. The record names every candidate with its score.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_dst_type

from custom.candidates import FEATURE_NAMES, candidate_evidence, candidate_feature_table, lesion_candidates
from custom.clinical.measurements import voxel_volume_ml
from custom.confidence import ConfidenceCalibration
from custom.errors import InputError
from custom.networks.scorer import CandidateScorer

__all__ = [
    "bounding_box",
    "full_candidate_map",
    "LesionCandidatesd",
    "CandidateReferrald",
    "choose_candidates",
    "load_scorer",
    "text_encoder_of",
    "ScorerFileError",
    "ReferralInputError",
]


class ScorerFileError(InputError, ValueError):
    """The referral scorer's weights file is missing or does not fit the scorer."""


class ReferralInputError(InputError, ValueError):
    """The pipeline gives the learned referral nothing to choose from (a network without text-free outputs)."""


def _array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _affine(value) -> np.ndarray:
    return np.asarray(value.affine, dtype=np.float64) if hasattr(value, "affine") else np.eye(4)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of ``mask`` (MONAI's
    ``generate_spatial_bounding_box``); a one-voxel box at the origin when there is none."""
    start, end = generate_spatial_bounding_box(np.asarray(mask)[None])
    if all(a == b for a, b in zip(start, end)):
        return tuple(slice(0, 1) for _ in start)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, end))


def full_candidate_map(candidates: Mapping, shape: tuple[int, ...]) -> np.ndarray:
    """The (X, Y, Z) int32 candidate map of :class:`LesionCandidatesd`'s output on the whole grid of ``shape``."""
    full = np.zeros(shape, np.int32)
    box = tuple(slice(start, stop) for start, stop in candidates["box"])
    full[box] = _array(candidates["map"])
    return full


class LesionCandidatesd(MapTransform):
    """The lesion candidates of a volume, once per volume.

    ``keys``: the text-free all-lesion probabilities (1, X, Y, Z), already restricted to the liver region, on the
    grid of ``image_key`` (1, X, Y, Z) Hounsfield units and ``liver_key`` (1, X, Y, Z) liver probabilities (the
    configs keep all three on the network grid); the affine comes from the lesion probabilities (a MetaTensor).
    The work is done inside the box that holds the liver and the lesion voxels (everything outside is background),
    so it costs what the liver's size costs, not the whole
    CT. Stored under ``candidates_key``: ``box`` ([start, stop] per axis of the box holding the candidates), ``map``
    (int32 candidate map of that box, 0 background and 1..K by decreasing volume; :func:`full_candidate_map` gives
    it on the whole grid), ``attributes`` (one dict per candidate, :func:`custom.candidates.lesion_candidates`) and
    ``detection`` (the mean all-lesion probability over each candidate). ``split_depth_mm``: touching lesions are
    split at their narrowing (:func:`custom.candidates.split_touching`; ``None`` keeps whole components). Data that
    hold ``candidates_key`` already (an earlier expression on the same volume) keep it.
    """

    def __init__(
        self,
        keys: KeysCollection = "lesions_prob",
        liver_key: str = "liver_prob",
        image_key: str = "hounsfield",
        candidates_key: str = "lesion_candidates",
        threshold: float = 0.5,
        min_voxels: int = 3,
        split_depth_mm: float | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.liver_key, self.image_key, self.candidates_key = liver_key, image_key, candidates_key
        self.threshold, self.min_voxels = float(threshold), int(min_voxels)
        self.split_depth_mm = None if split_depth_mm is None else float(split_depth_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if d.get(self.candidates_key) is not None:
            return d
        for key in self.key_iterator(d):
            lesions = d[key]
            probability = _array(lesions)[0]
            liver = _array(d[self.liver_key])[0] >= 0.5 if self.liver_key in d else np.ones(probability.shape, bool)
            box = bounding_box(liver | (probability >= self.threshold))
            affine = _affine(lesions).copy()
            affine[:3, 3] += affine[:3, :3] @ np.array([b.start for b in box], dtype=np.float64)
            probability = probability[box]
            candidates, attributes, _ = lesion_candidates(
                probability,
                affine,
                _array(d[self.image_key])[0][box],
                liver[box],
                self.threshold,
                self.min_voxels,
                self.split_depth_mm,
            )
            inner = bounding_box(candidates > 0)
            candidates, probability = candidates[inner], probability[inner]  # later steps need the candidates' box only
            box = tuple(slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner))
            detection = [item["evidence_mean"] for item in candidate_evidence(candidates, probability)]
            d[self.candidates_key] = {
                "box": [[b.start, b.stop] for b in box],
                "map": torch.as_tensor(candidates),
                "attributes": attributes,
                "detection": detection,
            }
        return d


def choose_candidates(
    candidate_probability: np.ndarray, none_probability: float, none_threshold: float, select_threshold: float
) -> np.ndarray:
    """Indices of the chosen candidates: empty when ``none_probability >= none_threshold`` or there is no candidate,
    else those at or above ``select_threshold``, or the best one when none is."""
    candidate_probability = np.asarray(candidate_probability, dtype=np.float64)
    if candidate_probability.size == 0 or none_probability >= none_threshold:
        return np.zeros(0, dtype=np.int64)
    chosen = np.flatnonzero(candidate_probability >= select_threshold)
    return chosen if chosen.size else np.array([int(np.argmax(candidate_probability))])


class CandidateReferrald(MapTransform):
    """Answer one expression with the candidates the scorer picks, or "not present".

    ``keys``: the expression's referred-lesion probabilities (1, X, Y, Z) -> replaced by the {0, 1} answer mask:
    the union of the chosen candidates' voxels of ``candidates_key`` (:class:`LesionCandidatesd`). The scorer sees
    every candidate's features (:func:`custom.candidates.candidate_features`: measured attributes, the evidence of
    these probabilities over it, its detection probability) with the expression's words from ``text_encoder``
    (tokens under ``input_ids_key`` / ``attention_mask_key``; ``input_ids_key=None`` withholds them). Stored:
    ``decision_key`` (``found``, ``confidence``, ``features`` with ``none_probability``, ``max_probability`` and
    ``volume_ml`` of the answer, the mean text-conditioned probability over the chosen voxels ``evidence_mean``, the
    chosen candidates' mean score ``chosen_score``, the best score ``top_score``, ``rule``) and ``referral_key``
    (``none_probability`` and every candidate with its ``score``, ``chosen`` flag and attributes). ``confidence`` is
    the probability that the answer is right (:class:`custom.confidence.ConfidenceCalibration` of ``calibration``,
    a dict of its arguments; None: the raw score, 1 minus the none probability for a found answer).
    """

    def __init__(
        self,
        keys: KeysCollection,
        scorer: CandidateScorer | None,
        text_encoder: torch.nn.Module | None,
        candidates_key: str = "lesion_candidates",
        input_ids_key: str | None = "input_ids",
        attention_mask_key: str = "attention_mask",
        decision_key: str = "decision",
        referral_key: str = "referral",
        none_threshold: float = 0.5,
        select_threshold: float = 0.5,
        evidence_threshold: float = 0.5,
        calibration: Mapping | None = None,
    ) -> None:
        super().__init__(keys)
        self.calibration = ConfidenceCalibration(**dict(calibration or {}))
        self.scorer = scorer.eval() if scorer is not None else None  # None: a config that answers by the rule
        self.text_encoder = text_encoder
        self.candidates_key, self.input_ids_key, self.attention_mask_key = (
            candidates_key,
            input_ids_key,
            attention_mask_key,
        )
        self.decision_key, self.referral_key = decision_key, referral_key
        self.none_threshold, self.select_threshold = float(none_threshold), float(select_threshold)
        self.evidence_threshold = float(evidence_threshold)

    @torch.no_grad()
    def score(self, features: np.ndarray, input_ids=None, attention_mask=None) -> tuple:
        """(N,) candidate probabilities and the "none of them" probability for (N, F) ``features``; without
        ``input_ids`` the scorer sees no words (the "no text" control)."""
        parameter = next(self.scorer.parameters())
        if input_ids is None:
            words = torch.zeros(1, 1, self.scorer.word_embedding.in_features, device=parameter.device)
            mask = torch.zeros(1, 1, dtype=torch.long, device=parameter.device)
        else:
            if self.text_encoder is None:
                raise ReferralInputError(
                    "The learned referral reads the expression through the network's text encoder, and this network "
                    "has none. Use an LSMS network, or --referral#method rule."
                )
            ids = torch.as_tensor(input_ids).reshape(1, -1).long().to(parameter.device)
            mask = torch.as_tensor(attention_mask).reshape(1, -1).long().to(parameter.device)
            words = self.text_encoder(ids, mask)[0].to(parameter.dtype)
        candidates = torch.as_tensor(features, dtype=parameter.dtype, device=parameter.device)[None]
        present = torch.ones(candidates.shape[:2], dtype=torch.bool, device=parameter.device)
        logits, none = self.scorer(candidates, present, words, mask.bool())
        return logits[0].sigmoid().cpu().numpy(), float(none[0].sigmoid())

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        candidates = d.get(self.candidates_key)
        if candidates is None:
            raise ReferralInputError(
                f"The learned referral needs the lesion candidates ({self.candidates_key!r}), which come from the "
                "network's text-free all-lesion output: this network has none (out_channels 1). Use --out_channels 3 "
                "weights, or --referral#method rule."
            )
        candidate_map = _array(candidates["map"])
        box = tuple(slice(start, stop) for start, stop in candidates["box"])
        for key in self.key_iterator(d):
            probabilities = d[key]
            probability = _array(probabilities)[0][box]
            evidence = candidate_evidence(candidate_map, probability, self.evidence_threshold)
            features = candidate_feature_table(candidates["attributes"], evidence, candidates["detection"])
            text = (d[self.input_ids_key], d[self.attention_mask_key]) if self.input_ids_key else ()
            scores, none_probability = self.score(features, *text)
            chosen = choose_candidates(scores, none_probability, self.none_threshold, self.select_threshold)
            chosen_mask = np.isin(candidate_map, chosen + 1)
            found = bool(chosen.size)
            features = {
                "none_probability": none_probability,
                "max_probability": float(probability[chosen_mask].max()) if found else 0.0,
                "volume_ml": float(chosen_mask.sum() * voxel_volume_ml(_affine(probabilities))),
                "evidence_mean": float(probability[chosen_mask].mean()) if found else 0.0,
                "chosen_score": float(np.mean(scores[chosen])) if found else 0.0,
                "top_score": float(np.max(scores, initial=0.0)),
            }
            confidence = self.calibration(found, features)
            d[self.decision_key] = {
                "found": found,
                "confidence": confidence,
                "features": {**features, "confidence": confidence},
                "rule": {"none_threshold": self.none_threshold, "select_threshold": self.select_threshold},
            }
            d[self.referral_key] = {
                "method": "candidate scorer",
                "none_probability": round(none_probability, 4),
                "candidates": [
                    {
                        "candidate": index + 1,
                        "score": round(float(score), 4),
                        "chosen": bool(index in chosen),
                        "volume_ml": round(float(attributes["volume_ml"]), 3),
                        "centroid_ras_mm": attributes["centroid_ras_mm"],
                        "density": attributes.get("density"),
                        "lobe": attributes.get("lobe"),
                        "segment": attributes.get("segment"),
                    }
                    for index, (score, attributes) in enumerate(zip(scores, candidates["attributes"]))
                ],
            }
            mask = torch.zeros(probabilities.shape, dtype=torch.float32)
            mask[(0, *box)] = torch.as_tensor(chosen_mask, dtype=torch.float32)
            d[key] = convert_to_dst_type(mask, probabilities, dtype=torch.float32)[0]
        return d


def text_encoder_of(network: torch.nn.Module) -> torch.nn.Module | None:
    """The text encoder of an LSMS network, looking through a ``DistributedDataParallel`` wrapper; None for a
    network without one (a plain segmentation network of the ablations)."""
    return getattr(getattr(network, "module", network), "text_encoder", None)


def load_scorer(path: str | Path, text_dim: int = 384) -> CandidateScorer:
    """The referral scorer saved at ``path`` (``state_dict``, its ``settings`` and ``feature_names``), in eval mode.

    Raises :class:`ScorerFileError` when the file is missing, is not such a file, or was trained on other features.
    """
    path = Path(path)
    if not path.is_file():
        raise ScorerFileError(
            f"The referral scorer file {path} does not exist. Train one with `python -m custom.referral_training`, "
            "or pass --referral_scorer_path with the path of a trained one."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        names = tuple(saved["feature_names"])
    except Exception as err:
        raise ScorerFileError(
            f"{path} is not a referral scorer file ({type(err).__name__}). Give the file "
            "`python -m custom.referral_training` writes."
        ) from err
    if names != FEATURE_NAMES:
        raise ScorerFileError(
            f"{path} was trained on the candidate features {list(names)}, this version computes {list(FEATURE_NAMES)}; "
            "retrain it with `python -m custom.referral_training`."
        )
    try:
        scorer = CandidateScorer(len(names), text_dim, **saved["settings"])
        scorer.load_state_dict(saved["state_dict"])
    except Exception as err:
        raise ScorerFileError(
            f"{path} does not fit the referral scorer ({type(err).__name__}). Give the file "
            "`python -m custom.referral_training` writes."
        ) from err
    return scorer.eval()
