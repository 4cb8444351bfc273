"""Candidate-level referral: candidates once per volume, the scorer's answer per expression, the scorer file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.candidates import FEATURE_NAMES
from custom.networks import BertTextEncoder
from custom.networks.scorer import CandidateScorer
from custom.referral import (
    CandidateReferrald,
    LesionCandidatesd,
    ScorerFileError,
    choose_candidates,
    full_candidate_map,
    load_scorer,
)

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


@pytest.fixture(scope="module")
def volume():
    """(1, 40, 30, 20) liver, all-lesion and HU maps: a large hypodense lesion (right) and a small hyperdense one."""
    shape = (40, 30, 20)
    liver = np.zeros(shape, np.float32)
    liver[4:36, 4:26, 2:18] = 1.0
    large, small = ball(shape, (28, 15, 9), 5), ball(shape, (10, 12, 12), 2)
    lesions = np.where(large | small, 0.95, 0.0).astype(np.float32)
    image = np.where(liver > 0, 60.0, -100.0).astype(np.float32)
    image[large], image[small] = 10.0, 160.0

    def meta(array):
        return MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(AFFINE))

    return {"lesions_prob": meta(lesions), "liver_prob": meta(liver), "hounsfield": meta(image)}, large, small


@pytest.fixture(scope="module")
def text_encoder():
    return BertTextEncoder().eval()


def tokens(encoder, text):
    ids = encoder.tokenize([text], max_length=32)
    return {"input_ids": ids["input_ids"][0], "attention_mask": ids["attention_mask"][0]}


def test_candidates_are_found_once_and_kept_for_later_expressions(volume):
    data, large, small = volume
    finder = LesionCandidatesd()
    found = finder(dict(data))["lesion_candidates"]
    assert found["box"] == [[8, 34], [10, 21], [4, 15]]  # the candidates' box: later work stays inside it
    candidate_map = full_candidate_map(found, large.shape)
    assert (
        candidate_map.max() == 2
        and np.array_equal(candidate_map == 1, large)
        and np.array_equal(candidate_map == 2, small)
    )
    assert [a["density"] for a in found["attributes"]] == ["hypodense", "hyperdense"]
    assert found["detection"] == pytest.approx([0.95, 0.95])
    again = finder({"lesion_candidates": found})  # an expression on the same volume: no outputs needed
    assert again["lesion_candidates"] is found


def test_choose_candidates_follows_none_then_scores_then_the_best():
    assert choose_candidates(np.array([0.9, 0.2]), 0.7, 0.5, 0.5).tolist() == []
    assert choose_candidates(np.array([0.9, 0.6, 0.2]), 0.1, 0.5, 0.5).tolist() == [0, 1]
    assert choose_candidates(np.array([0.3, 0.4]), 0.1, 0.5, 0.5).tolist() == [1]
    assert choose_candidates(np.zeros(0), 0.0, 0.5, 0.5).tolist() == []


def referral(volume, text_encoder, **settings):
    data, _, _ = volume
    with_candidates = LesionCandidatesd()(dict(data))
    torch.manual_seed(0)
    step = CandidateReferrald("pred", CandidateScorer(len(FEATURE_NAMES), 384), text_encoder, **settings)
    probabilities = MetaTensor(torch.full((1, 40, 30, 20), 0.2), affine=torch.as_tensor(AFFINE))
    return step({**with_candidates, "pred": probabilities, **tokens(text_encoder, "the largest cyst")})


def test_the_answer_is_the_union_of_the_chosen_candidates_and_the_record_lists_them_all(volume, text_encoder):
    _, large, small = volume
    result = referral(volume, text_encoder, none_threshold=1.0, select_threshold=0.0)  # everything chosen
    assert np.array_equal(np.asarray(result["pred"][0]) > 0, large | small)
    assert isinstance(result["pred"], MetaTensor) and np.allclose(result["pred"].affine, AFFINE)
    decision, record = result["decision"], result["referral"]
    assert decision["found"] and decision["features"]["volume_ml"] == pytest.approx((large | small).sum() * 4.5e-3)
    assert [c["candidate"] for c in record["candidates"]] == [1, 2] and all(c["chosen"] for c in record["candidates"])
    assert 0.0 <= record["none_probability"] <= 1.0


def test_none_of_them_answers_an_empty_mask_with_its_probability(volume, text_encoder):
    result = referral(volume, text_encoder, none_threshold=0.0)
    assert not np.asarray(result["pred"]).any()
    decision = result["decision"]
    assert not decision["found"] and decision["confidence"] == pytest.approx(decision["features"]["none_probability"])
    assert not any(c["chosen"] for c in result["referral"]["candidates"])


def test_shipped_scorer_loads_and_a_missing_or_foreign_file_says_how_to_fix_it(tmp_path):
    scorer = load_scorer(ROOT / "bundle" / "models" / "referral_scorer.pt")
    assert isinstance(scorer, CandidateScorer) and not scorer.training
    with pytest.raises(ScorerFileError, match="does not exist"):
        load_scorer(tmp_path / "nothing.pt")
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(ScorerFileError, match="not a referral scorer file"):
        load_scorer(tmp_path / "text.pt")
    saved = torch.load(ROOT / "bundle" / "models" / "referral_scorer.pt", weights_only=True)
    torch.save({**saved, "feature_names": list(FEATURE_NAMES[:-1])}, tmp_path / "old.pt")
    with pytest.raises(ScorerFileError, match="retrain"):
        load_scorer(tmp_path / "old.pt")
