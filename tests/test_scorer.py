"""The candidate scorer: one logit per candidate and a none logit, candidates as a set, padding ignored."""

from __future__ import annotations

import torch

from custom.networks.scorer import CandidateScorer


def inputs(candidates=4, words=6, features=11, text_dim=16):
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, candidates, features, generator=generator),
        torch.tensor([[True] * candidates, [True] * (candidates - 1) + [False]]),
        torch.randn(2, words, text_dim, generator=generator),
        torch.tensor([[True] * words, [True] * (words - 2) + [False] * 2]),
    )


def test_scores_every_candidate_and_none_and_masks_absent_ones():
    scorer = CandidateScorer(num_features=11, text_dim=16, dim=32, heads=4, layers=2).eval()
    features, mask, words, word_mask = inputs()
    logits, none = scorer(features, mask, words, word_mask)
    assert logits.shape == (2, 4) and none.shape == (2,)
    assert torch.isinf(logits[1, 3]) and logits[1, 3] < 0 and torch.isfinite(logits[0]).all()


def test_candidates_are_a_set_and_padding_changes_nothing():
    scorer = CandidateScorer(num_features=11, text_dim=16, dim=32, heads=4, layers=2).eval()
    features, mask, words, word_mask = inputs()
    with torch.no_grad():
        logits, none = scorer(features, mask, words, word_mask)
        order = torch.tensor([2, 0, 1, 3])
        permuted, permuted_none = scorer(features[:, order], mask[:, order], words, word_mask)
        torch.testing.assert_close(permuted[0], logits[0, order], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(permuted_none, none, rtol=1e-4, atol=1e-5)
        padded = torch.cat([features, torch.randn(2, 3, 11)], 1)
        padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
        with_padding, padding_none = scorer(padded, padded_mask, words, word_mask)
        torch.testing.assert_close(with_padding[:, :4][mask], logits[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padding_none, none, rtol=1e-4, atol=1e-5)
        other_words, _ = scorer(features, mask, torch.randn_like(words), word_mask)
        assert not torch.allclose(other_words[mask], logits[mask])  # the expression matters


def test_perfect_mask_dice_of_a_chosen_set():
    from benchmarks.referral_upper_bound import score

    samples = {
        "targets": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        "volumes": torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
        "kinds": ["size", "negative", "count", "negative"],
    }
    chosen = torch.tensor([[True, False, False], [False, False, False], [True, False, False], [True, False, False]])
    result = score(chosen, samples)
    assert result["exact"] == 0.5  # the first two only
    expected = [1.0, 1.0, 2 * 3 / (3 + 4), 0.0]  # the third misses the 1 ml lesion; the last answers a negative
    assert abs(result["dice_3d"] - sum(expected) / 4) < 1e-6
    assert result["by_kind"]["negative"] == (0.5, 2)
