"""Joint loss of LSMS: Dice + cross-entropy on the mask, plus a pixel-to-sentence contrastive term."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from scipy import ndimage
from torch import nn

__all__ = ["LesionSizeWeightedBCE", "PixelSentenceContrastiveLoss", "LSMSLoss"]

#: Names of the dense (text-free) output channels 1, 2 of a 3-channel network, in the loss terms.
DENSE_TERMS = {1: "liver", 2: "lesions"}


class LesionSizeWeightedBCE(nn.Module):
    """Binary cross-entropy in which a small lesion counts about as much as a large one.

    Each lesion of a slice (a connected component of the target, 8-connectivity) of ``a`` pixels weighs
    ``sqrt(reference_area / a)`` per pixel, clipped to [1, ``max_weight``]; background pixels weigh 1. A Dice or a
    plain cross-entropy over the batch is dominated by the large lesions, so a lesion of a few pixels hardly moves
    them. ``logits (B, 1, H, W), target (B, 1, H, W) in {0, 1} -> scalar`` (the weighted mean).
    """

    def __init__(self, reference_area: float = 80.0, max_weight: float = 10.0) -> None:
        super().__init__()
        if reference_area <= 0 or max_weight < 1:
            raise ValueError(f"reference_area must be > 0 and max_weight >= 1, got {reference_area}, {max_weight}.")
        self.reference_area, self.max_weight = float(reference_area), float(max_weight)

    def weights(self, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights (B, 1, H, W) of a {0, 1} target (B, 1, H, W)."""
        masks = target.detach().cpu().numpy() > 0.5
        weights = np.ones(masks.shape, np.float32)
        for index in np.ndindex(*masks.shape[:2]):
            components, count = ndimage.label(masks[index], structure=np.ones((3, 3), bool))
            if count:
                areas = np.bincount(components.ravel())[1:].astype(np.float32)
                per_lesion = np.clip(np.sqrt(self.reference_area / areas), 1.0, self.max_weight)
                weights[index] = np.concatenate([[1.0], per_lesion])[components]
        return torch.as_tensor(weights, device=target.device)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = self.weights(target)
        per_pixel = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        return (per_pixel * weights).sum() / weights.sum()


class PixelSentenceContrastiveLoss(nn.Module):
    """InfoNCE between an expression and the pixels of its image: referred-lesion pixels are the positives.

    For every positive pixel p of image b: ``-log(exp(s_p / t) / (exp(s_p / t) + sum_n exp(s_n / t)))`` with
    ``s`` the cosine similarity of pixel and sentence embeddings and n running over the image's other (negative)
    pixels. Averaged over positive pixels, then over images that have any; images with an empty target add 0.

    ``pixel_embeddings (B, E, h, w), sentence_embedding (B, E), target (B, 1, H, W) -> scalar``.
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = temperature

    def forward(
        self, pixel_embeddings: torch.Tensor, sentence_embedding: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        positives = F.adaptive_max_pool2d(target.float(), pixel_embeddings.shape[-2:]).flatten(1) > 0.5  # (B, N)
        pixels = F.normalize(pixel_embeddings.flatten(2), dim=1)  # (B, E, N)
        sentence = F.normalize(sentence_embedding, dim=1)  # (B, E)
        scores = torch.einsum("ben,be->bn", pixels, sentence) / self.temperature  # (B, N)
        negatives_logsumexp = torch.logsumexp(scores.masked_fill(positives, float("-inf")), dim=1, keepdim=True)
        per_pixel = -scores + torch.logaddexp(scores, negatives_logsumexp)  # (B, N)
        counts = positives.sum(1)
        has_positive = counts > 0
        if not has_positive.any():
            return scores.sum() * 0.0
        per_image = (per_pixel * positives).sum(1)[has_positive] / counts[has_positive]
        return per_image.mean()


class LSMSLoss(nn.Module):
    """``DiceCELoss(sigmoid)`` on the referred lesion ``+ dense_weight *`` the same on each text-free output channel
    ``+ contrastive_weight * PixelSentenceContrastiveLoss``.

    ``pred`` is the network's logits (B, K, H, W) or its ``return_embeddings=True`` dict; ``target`` (B, K, H, W)
    in {0, 1}, channel 0 the referred lesion(s) and channels 1.. the dense text-free targets (liver, all lesions)
    when the network has them. ``small_lesion_weight`` adds that multiple of :class:`LesionSizeWeightedBCE` on the
    last channel (all lesions, text-free; the referred lesion of a 1-channel network). The contrastive term is used
    when the dict carries a sentence embedding and the weight is > 0, over the samples that have text
    (``text_present``) and on channel 0. Dice is computed over the whole batch (``batch=True``) so slices with an
    empty target stay finite and sensible.

    The terms of the last call are kept in ``terms`` (:meth:`weighted_terms`), for logging.
    """

    def __init__(
        self,
        contrastive_weight: float = 0.1,
        temperature: float = 0.07,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        dense_weight: float = 1.0,
        small_lesion_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.segmentation = DiceCELoss(sigmoid=True, batch=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.small_lesions = LesionSizeWeightedBCE()
        self.small_lesion_weight = float(small_lesion_weight)
        self.contrastive = PixelSentenceContrastiveLoss(temperature)
        self.contrastive_weight = contrastive_weight
        self.dense_weight = dense_weight
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, pred, target: torch.Tensor) -> torch.Tensor:
        terms = self.weighted_terms(pred, target)
        self.terms = {name: value.detach() for name, value in terms.items()}
        return sum(terms.values())

    def weighted_terms(self, pred, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term as it enters the loss (its weight applied), by name: ``referred`` (channel 0), ``liver`` and
        ``lesions`` (the dense channels of a 3-channel network; ``channel_<k>`` otherwise), ``small_lesions`` and
        ``contrastive`` when used. Their sum is the loss; the last forward's are kept in ``terms`` (detached)."""
        logits = pred["logits"] if isinstance(pred, dict) else pred
        target = target.float()
        if logits.shape[1] != target.shape[1]:
            raise ValueError(
                f"The network gives {logits.shape[1]} output channels but the target has {target.shape[1]}: "
                "train a 3-channel network on dense targets (ReferredMaskd dense=True), a 1-channel one without."
            )
        terms = {"referred": self.segmentation(logits[:, :1], target[:, :1])}
        for channel in range(1, logits.shape[1]):
            name = DENSE_TERMS[channel] if logits.shape[1] == len(DENSE_TERMS) + 1 else f"channel_{channel}"
            terms[name] = self.dense_weight * self.segmentation(
                logits[:, channel : channel + 1], target[:, channel : channel + 1]
            )
        if self.small_lesion_weight > 0:
            terms["small_lesions"] = self.small_lesion_weight * self.small_lesions(logits[:, -1:], target[:, -1:])
        if isinstance(pred, dict) and pred.get("sentence_embedding") is not None and self.contrastive_weight > 0:
            with_text = pred.get("text_present")
            with_text = slice(None) if with_text is None else with_text.bool()
            terms["contrastive"] = self.contrastive_weight * self.contrastive(
                pred["pixel_embeddings"][with_text], pred["sentence_embedding"][with_text], target[with_text, :1]
            )
        return terms
