"""Candidate-level referral: which of a case's lesion candidates an expression refers to, or none of them."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CandidateScorer"]


class CandidateScorer(nn.Module):
    """Scores all lesion candidates of a case against one expression, the candidates seen together.

    The expression's word features, a learned "none" token and the candidates' feature vectors
    (:func:`custom.detection.candidates.candidate_features`) are projected to ``dim`` and go through a small Transformer
    encoder together, so each candidate sees the words and every other candidate: what "the largest", "the lower
    of the two" or "all three cysts" need. Padding (absent candidates, padded words) is masked.

    ``forward(features (B, N, F), candidate_mask (B, N) bool, words (B, T, E), word_mask (B, T) bool)`` ->
    ``(candidate_logits (B, N), none_logit (B,))``: per candidate the logit of being referred (-inf where
    ``candidate_mask`` is False), and the logit that no candidate is referred.
    """

    def __init__(
        self, num_features: int, text_dim: int, dim: int = 128, heads: int = 4, layers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.candidate_embedding = nn.Sequential(nn.Linear(num_features, dim), nn.GELU(), nn.Linear(dim, dim))
        self.word_embedding = nn.Linear(text_dim, dim)
        self.none_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.role = nn.Parameter(torch.zeros(3, dim))  # word, none, candidate
        nn.init.normal_(self.role, std=0.02)
        nn.init.normal_(self.none_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(
        self, features: torch.Tensor, candidate_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, count = features.shape[:2]
        tokens = torch.cat(
            [
                self.word_embedding(words) + self.role[0],
                self.none_token.expand(batch, 1, -1) + self.role[1],
                self.candidate_embedding(features) + self.role[2],
            ],
            dim=1,
        )
        present = torch.cat([word_mask.bool(), candidate_mask.new_ones(batch, 1), candidate_mask.bool()], dim=1)
        encoded = self.norm(self.encoder(tokens, src_key_padding_mask=~present))
        logits = self.head(encoded[:, words.shape[1] :]).squeeze(-1)  # none token, then the candidates
        candidate_logits = logits[:, 1:].masked_fill(~candidate_mask.bool(), float("-inf"))
        return candidate_logits, logits[:, 0]
