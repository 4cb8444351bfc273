"""Volume-level step after slice-wise inference: keep the 3D components the expression refers to."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

__all__ = ["select_referred_components", "SelectReferredComponentsd"]


def select_referred_components(
    probabilities: np.ndarray, threshold: float = 0.5, relative_evidence: float = 0.8, min_voxels: int = 3
) -> np.ndarray:
    """Binary mask of the 3D components (26-connectivity) that carry the expression's evidence.

    The slice-wise probabilities are thresholded and grouped into 3D components. A component's evidence is its
    mean probability. Components smaller than ``min_voxels`` are dropped; of the rest, those whose evidence is at
    least ``relative_evidence`` times the strongest component's are kept (``relative_evidence=0`` keeps all).
    This settles relations a single slice cannot ("the largest lesion") when the network fires weakly on a
    lesion it was not asked for, while several referred lesions of similar evidence ("all cysts") all stay.

    ``probabilities``: array of any dimensionality, values in [0, 1] -> bool array of the same shape.
    """
    foreground = probabilities >= threshold
    labels, count = ndimage.label(foreground, structure=np.ones((3,) * probabilities.ndim, bool))
    if count == 0:
        return foreground
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(foreground, labels, index)
    evidence = ndimage.mean(probabilities, labels, index)
    evidence = np.where(sizes >= min_voxels, evidence, -1.0)
    if evidence.max() < 0:
        return np.zeros_like(foreground)
    kept = index[evidence >= relative_evidence * evidence.max()]
    return np.isin(labels, kept)


class SelectReferredComponentsd(MapTransform):
    """Dictionary wrapper of :func:`select_referred_components` for channel-first probabilities.

    ``(1, H, W, D)`` probabilities -> ``(1, H, W, D)`` float {0, 1} mask (a MetaTensor keeps its metadata).
    """

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float = 0.5,
        relative_evidence: float = 0.8,
        min_voxels: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold
        self.relative_evidence = relative_evidence
        self.min_voxels = min_voxels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = d[key]
            array = probabilities.detach().cpu().numpy() if isinstance(probabilities, torch.Tensor) else probabilities
            mask = np.stack(
                [select_referred_components(c, self.threshold, self.relative_evidence, self.min_voxels) for c in array]
            )
            d[key] = convert_to_dst_type(mask.astype(np.float32), probabilities, dtype=torch.float32)[0]
        return d


class ApplyNotPresentRuled(MapTransform):
    """Answer "not present" with an empty mask when the probabilities fail the calibrated rule.

    ``prob_key`` (1, H, W, D) probabilities with an affine (MetaTensor) decide through
    :class:`custom.clinical.not_present.NotPresentRule` (``rule``: its parameters, as in a JSON config); the masks
    under ``keys`` are emptied when the answer is "not present". The decision (found, confidence, features) is
    stored under ``decision_key``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "prob",
        rule: Mapping | None = None,
        decision_key: str = "decision",
        allow_missing_keys: bool = False,
    ) -> None:
        from custom.clinical.not_present import NotPresentRule

        super().__init__(keys, allow_missing_keys)
        self.prob_key = prob_key
        self.rule = NotPresentRule.from_dict(rule) if rule else NotPresentRule()
        self.decision_key = decision_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        decision = self.rule.decide(d[self.prob_key])
        d[self.decision_key] = decision.to_dict()
        if not decision.found:
            for key in self.key_iterator(d):
                d[key] = d[key] * 0
        return d
