"""Candidate-level referral: which of a volume's lesion candidates an expression refers to.

Per volume, :class:`LesionCandidatesd` turns the text-free all-lesion output into 3D lesion candidates and measures
them (:func:`custom.detection.candidates.lesion_candidates`). Per expression, :class:`CandidateReferrald` adds the
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

from custom.clinical.measurements import voxel_volume_ml
from custom.detection.candidates import FEATURE_NAMES, candidate_evidence, candidate_feature_table, lesion_candidates
from custom.errors import InputError
from custom.networks.scorer import CandidateScorer
from custom.referral.answer import answer_query
from custom.referral.confidence import ConfidenceCalibration
from custom.referral.query import ReadQuery, read_query

__all__ = [
    "bounding_box",
    "full_candidate_map",
    "LesionCandidatesd",
    "CandidateReferrald",
    "choose_candidates",
    "credible_candidates",
    "candidate_support",
    "LESION_SETTINGS",
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
    it on the whole grid), ``attributes`` (one dict per candidate,
    :func:`custom.detection.candidates.lesion_candidates`), ``detection`` (the mean all-lesion probability over each
    candidate) and ``liver_frame`` (the liver's frame in RAS mm, :meth:`custom.data.geometry.LiverFrame.to_dict`, None
    without a liver: what the lobes and segments of the sentence are checked against). ``split_depth_mm``: touching
    lesions are split at their narrowing (:func:`custom.detection.candidates.split_touching`; ``None`` keeps whole
    components). Data that hold ``candidates_key`` already (an earlier expression on the same volume) keep it.
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
            candidates, attributes, case = lesion_candidates(
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
                "liver_frame": case["liver_frame"],
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


#: Default settings of whether a candidate is supported for a sentence at all (see :func:`credible_candidates`).
LESION_SETTINGS = {"score": 0.1, "evidence": 0.1, "detection": 0.0}


def credible_candidates(
    scores: np.ndarray, evidence: list[dict], detection, settings: Mapping | None = None
) -> np.ndarray:
    """(K,) bool: which candidates the query may choose among for this sentence: those that may be real lesions.

    A candidate is set aside when the learned scorer and the text-conditioned evidence both reject it (its score
    below ``settings["score"]`` and its mean evidence below ``settings["evidence"]``), or when the detector's mean
    all-lesion probability over it is below ``settings["detection"]``. ``scores`` (K,) the scorer's probabilities,
    ``evidence`` the :func:`custom.detection.candidates.candidate_evidence` dicts, ``detection`` (K,) the detection
    means.
    """
    settings = {**LESION_SETTINGS, **dict(settings or {})}
    scores = np.asarray(scores, dtype=np.float64)
    mean = np.array([item["evidence_mean"] for item in evidence], dtype=np.float64).reshape(scores.shape)
    detected = np.asarray(detection, dtype=np.float64).reshape(scores.shape)
    rejected = (scores < settings["score"]) & (mean < settings["evidence"])
    return ~rejected & (detected >= settings["detection"])


def candidate_support(scores: np.ndarray, evidence: list[dict]) -> np.ndarray:
    """(K,) how strongly the learned parts point at each candidate for this sentence: the scorer's probability plus
    the mean text-conditioned probability over the candidate (0 to 2); it decides only what the query leaves open."""
    mean = np.array([item["evidence_mean"] for item in evidence], dtype=np.float64)
    return np.asarray(scores, dtype=np.float64) + mean.reshape(np.shape(scores))


def out_of_scope_reason(read: ReadQuery) -> str | None:
    """Why a sentence is not answered on the liver (it names another organ), or None when it is about the liver."""
    if read.in_scope:
        return None
    return f"this model answers about the liver only; the sentence is about the {read.organ}"


def scorer_fallback_reason(read: ReadQuery) -> str | None:
    """Why the query cannot answer a sentence and the learned scorer does (no lesion word, words not read), or None."""
    if not read.lesion_word:
        return "the sentence names no lesion the query could read"
    if read.unread:
        return "the sentence holds words the query does not read: " + ", ".join(repr(w) for w in read.unread)
    return None


def scorer_explanation(chosen: np.ndarray, scores: np.ndarray, none_probability: float, none_threshold: float) -> str:
    """One sentence on what the learned scorer chose (0-based ``chosen`` of its ``scores``)."""
    if not len(scores):
        return "no lesion candidate is found in the liver"
    if not len(chosen):
        return f"the scorer's 'none of them' output {none_probability:.2f} reaches {none_threshold:.2f}: not present"
    listed = ", ".join(f"{int(i) + 1} (score {scores[i]:.2f})" for i in chosen)
    return f"the scorer chose candidate{'s' if len(chosen) > 1 else ''} {listed}"


class CandidateReferrald(MapTransform):
    """Answer one expression on the volume's lesion candidates, or "not present".

    ``keys``: the expression's referred-lesion probabilities (1, X, Y, Z) -> replaced by the {0, 1} answer mask:
    the union of the chosen candidates' voxels of ``candidates_key`` (:class:`LesionCandidatesd`).

    The sentence (``text_key``; None: not read) is read into a query (:func:`custom.referral.query.read_query`). About
    another organ, the answer is "not present" with the reason. Fully read, it is answered exactly on the
    candidates' measured attributes (:func:`custom.referral.answer.answer_query`: filters, then the selector), among
    the candidates that the learned parts do not both reject (:func:`credible_candidates`, ``lesion_settings``) with
    ``query_settings`` (margins, the HU of a cyst, near ties: :func:`custom.referral.answer.answer_query`); where the
    query leaves the choice open, the learned support decides (:func:`candidate_support`, and the scorer's own
    selection for near ties). Not fully read (no lesion word, words the reader does not place), or with no text to
    read, the learned scorer answers alone, as it always did: it sees every candidate's features
    (:func:`custom.detection.candidates.candidate_features`: measured attributes, the evidence of these probabilities
    over it, its detection probability) with the expression's words from ``text_encoder`` (tokens under
    ``input_ids_key`` / ``attention_mask_key``; ``input_ids_key=None`` withholds them) and the candidates at or above
    ``select_threshold`` are chosen unless its "none" output reaches ``none_threshold``.

    Stored: ``decision_key`` (``found``, ``confidence``, ``reason`` when not present, ``features`` with
    ``none_probability``, ``max_probability`` and ``volume_ml`` of the answer, the mean text-conditioned probability
    over the chosen voxels ``evidence_mean``, the chosen candidates' mean score ``chosen_score``, the best score
    ``top_score``, ``rule``) and ``referral_key`` (``method``: "query", "candidate scorer" or "out of scope";
    ``query``: the sentence as read; ``explanation``; ``steps``: the candidates that passed each filter and the
    selection; ``none_probability``; every candidate with its ``score``, ``evidence_mean``, ``supported`` (credible),
    ``chosen`` flag, ``why`` and attributes). ``confidence`` is the probability that the answer is right
    (:class:`custom.referral.confidence.ConfidenceCalibration` of ``calibration``, a dict of its arguments; None: the
    raw score, 1 minus the none probability for a found answer); for a sentence about another organ it is
    ``out_of_scope_confidence``: that answer is right whenever the organ was read right (of the sentences the
    reader was checked on, it took none about the liver for another organ, and 152 of the 153 about another organ
    for one: ``tests/data/query_sentences.json``, ``benchmarks.referral_query``), which the scores calibrated on
    liver sentences do not measure.
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
        text_key: str | None = "text",
        lesion_settings: Mapping | None = None,
        query_settings: Mapping | None = None,
        out_of_scope_confidence: float = 0.95,
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
        self.decision_key, self.referral_key, self.text_key = decision_key, referral_key, text_key
        self.none_threshold, self.select_threshold = float(none_threshold), float(select_threshold)
        self.evidence_threshold = float(evidence_threshold)
        self.lesion_settings = {**LESION_SETTINGS, **dict(lesion_settings or {})}
        self.query_settings = dict(query_settings or {})
        self.out_of_scope_confidence = float(out_of_scope_confidence)

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

    def read(self, data: Mapping) -> ReadQuery | None:
        """The sentence of ``data`` as read, or None when there is none to read (no ``text_key``)."""
        if self.text_key is None or data.get(self.text_key) is None:
            return None
        text = data[self.text_key]
        return read_query(text[0] if isinstance(text, (list, tuple)) else str(text))

    def answer(self, read, candidates: Mapping, scores, none_probability, evidence) -> dict:
        """The chosen candidates (0-based array) and how they were chosen: ``method``, ``explanation``, ``reason``
        (not present), ``steps``, ``supported`` (credible, per candidate), ``why`` (per candidate), ``fallback``."""
        count = len(scores)
        credible = credible_candidates(scores, evidence, candidates["detection"], self.lesion_settings)
        result = {"supported": credible, "why": {}, "steps": [], "reason": None}
        if read is not None and (reason := out_of_scope_reason(read)) is not None:
            return {**result, "chosen": np.zeros(0, np.int64), "method": "out of scope", "explanation": reason,
                    "reason": reason}  # fmt: skip
        fallback = "no sentence to read" if read is None else scorer_fallback_reason(read)
        if fallback is not None:
            chosen = choose_candidates(scores, none_probability, self.none_threshold, self.select_threshold)
            explanation = scorer_explanation(chosen, scores, none_probability, self.none_threshold)
            return {**result, "chosen": chosen, "method": "candidate scorer", "explanation": explanation,
                    "fallback": fallback, "reason": None if len(chosen) else explanation}  # fmt: skip
        answered = answer_query(
            read,
            candidates["attributes"],
            candidates.get("liver_frame"),
            credible=credible if count else None,
            support=candidate_support(scores, evidence) if count else None,
            settings=self.query_settings,
            selected=np.asarray(scores) >= self.select_threshold if count else None,
        )
        return {
            **result,
            "chosen": np.asarray(answered.chosen, dtype=np.int64),
            "method": "query",
            "explanation": answered.explanation,
            "reason": answered.reason,
            "steps": answered.steps,
            "why": answered.why,
            "tie_broken": answered.tie_broken,
        }

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
        read = self.read(d)
        for key in self.key_iterator(d):
            probabilities = d[key]
            probability = _array(probabilities)[0][box]
            evidence = candidate_evidence(candidate_map, probability, self.evidence_threshold)
            features = candidate_feature_table(candidates["attributes"], evidence, candidates["detection"])
            text = (d[self.input_ids_key], d[self.attention_mask_key]) if self.input_ids_key else ()
            scores, none_probability = self.score(features, *text)
            answer = self.answer(read, candidates, scores, none_probability, evidence)
            chosen = answer["chosen"]
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
            if answer["method"] == "out of scope":  # right whenever the organ is read right, whatever the scores
                confidence = self.out_of_scope_confidence
            else:
                confidence = self.calibration(found, features)
            d[self.decision_key] = {
                "found": found,
                "confidence": confidence,
                **({"reason": answer["reason"]} if not found and answer["reason"] else {}),
                "features": {**features, "confidence": confidence},
                "rule": {"none_threshold": self.none_threshold, "select_threshold": self.select_threshold},
            }
            d[self.referral_key] = self.referral_record(read, answer, candidates, scores, none_probability, evidence)
            mask = torch.zeros(probabilities.shape, dtype=torch.float32)
            mask[(0, *box)] = torch.as_tensor(chosen_mask, dtype=torch.float32)
            d[key] = convert_to_dst_type(mask, probabilities, dtype=torch.float32)[0]
        return d

    @staticmethod
    def referral_record(read, answer: Mapping, candidates: Mapping, scores, none_probability, evidence) -> dict:
        """The record's ``referral``: how the answer was chosen and every candidate with its scores and why."""
        chosen = set(int(i) for i in answer["chosen"])
        return {
            "method": answer["method"],
            **({"query": read.to_dict()} if read is not None else {}),
            "explanation": answer["explanation"],
            **({"fallback": answer["fallback"]} if answer.get("fallback") else {}),
            **({"steps": answer["steps"]} if answer["steps"] else {}),
            "none_probability": round(none_probability, 4),
            "candidates": [
                {
                    "candidate": index + 1,
                    "score": round(float(score), 4),
                    "evidence_mean": round(float(evidence[index]["evidence_mean"]), 4),
                    "supported": bool(answer["supported"][index]),
                    "chosen": index in chosen,
                    **({"why": answer["why"][index]} if index in answer["why"] else {}),
                    "volume_ml": round(float(attributes["volume_ml"]), 3),
                    "longest_axial_diameter_mm": attributes.get("longest_axial_diameter_mm"),
                    "centroid_ras_mm": attributes["centroid_ras_mm"],
                    "mean_hu": attributes.get("mean_hu"),
                    "density": attributes.get("density"),
                    "lobe": attributes.get("lobe"),
                    "segment": attributes.get("segment"),
                }
                for index, (score, attributes) in enumerate(zip(scores, candidates["attributes"]))
            ],
        }


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
            f"The referral scorer file {path} does not exist. Train one with `python -m custom.referral.training`, "
            "or pass --referral_scorer_path with the path of a trained one."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        names = tuple(saved["feature_names"])
    except Exception as err:
        raise ScorerFileError(
            f"{path} is not a referral scorer file ({type(err).__name__}). Give the file "
            "`python -m custom.referral.training` writes."
        ) from err
    if names != FEATURE_NAMES:
        raise ScorerFileError(
            f"{path} was trained on the candidate features {list(names)}, this version computes {list(FEATURE_NAMES)}; "
            "retrain it with `python -m custom.referral.training`."
        )
    try:
        scorer = CandidateScorer(len(names), text_dim, **saved["settings"])
        scorer.load_state_dict(saved["state_dict"])
    except Exception as err:
        raise ScorerFileError(
            f"{path} does not fit the referral scorer ({type(err).__name__}). Give the file "
            "`python -m custom.referral.training` writes."
        ) from err
    return scorer.eval()
