"""Volume-level step after slice-wise inference: keep the 3D components the expression refers to."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping
from copy import deepcopy

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, MapTransform, SpatialResample, SplitDimd
from monai.utils import convert_to_dst_type
from monai.utils.type_conversion import dtype_torch_to_numpy
from scipy import ndimage

from custom.clinical.geometry import bounding_box, grow_box, largest_component
from custom.detection.scope import liver_scope

__all__ = [
    "select_referred_components",
    "SelectReferredComponentsd",
    "ApplyNotPresentRuled",
    "SplitOutputsd",
    "BoxInvertd",
    "AnswerToInputGridd",
    "CandidateMapToInputGridd",
    "largest_component",
    "lazy_zeros",
    "liver_region",
    "LiverRegiond",
    "PerVolumeOutputsd",
]


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


class SplitOutputsd(SplitDimd):
    """MONAI ``SplitDimd`` over the channels of the network's output, each channel ``i`` of ``keys`` stored under
    ``names[i]``: ``(K, H, W[, D]) -> names[0]: (1, H, W[, D]), names[1]: ...``.

    Not ``SplitDimd`` as it is: that one names the channels ``{key}_{postfix}`` and needs a postfix per channel; here
    ``names[0]`` may be the key itself (the referred lesion keeps its place) and a 1-channel output fills
    ``names[0]`` only, so the same configuration serves a network with or without the text-free channels (the later
    keys are then absent).
    """

    def __init__(self, keys: KeysCollection, names: tuple[str, ...] = ("pred", "liver_prob", "lesions_prob")) -> None:
        super().__init__(keys, dim=0, keepdim=True, update_meta=True)
        self.names = tuple(names)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            for name, channel in zip(self.names, self.splitter(d[key])):
                d[name] = channel
        return d


def lazy_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU zero tensor whose memory pages are only taken when written (numpy's zeroed allocation): an input-grid
    volume that holds values in a box only costs the box, in time and in resident memory."""
    return torch.from_numpy(np.zeros(tuple(shape), dtype=dtype_torch_to_numpy(dtype)))


class BoxInvertd(MapTransform):
    """MONAI ``Invertd`` back to the input grid, resampling only the box where a channel is not constant.

    The referred-lesion channel holds one value outside the liver's box (the inferer's outside logit after the
    activation), so resampling the whole grid for it is wasted work: for each channel of ``box_channels`` the box
    of voxels that differ from the channel's corner value, grown by one voxel, is resampled onto the input-grid box
    it covers and the rest of the input grid takes that value, which is what the whole-grid resampling gives (equal
    within float rounding). Other channels, and preprocessing other than ``Orientationd`` then ``Spacingd``, go
    through ``Invertd`` whole.

    ``keys`` (K, X, Y, Z) outputs on the network grid -> (K, X', Y', Z') on the grid of ``orig_keys`` as loaded.
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform,
        orig_keys: str = "image",
        box_channels: tuple[int, ...] = (0,),
    ) -> None:
        super().__init__(keys)
        self.invert = Invertd(keys, transform, orig_keys=orig_keys, nearest_interp=False, to_tensor=True)
        self.orig_key = orig_keys
        self.box_channels = tuple(int(c) for c in box_channels)

    def grid_of(self, image) -> dict | None:
        """Input grid and resampling of ``Orientationd`` then one or more ``Spacingd`` (the in-plane grid, thin slices
        thickened) as recorded on ``image``: the network grid maps onto the input grid by its affine alone, whatever
        resamplings led to it. ``None`` for any other preprocessing."""
        operations = getattr(image, "applied_operations", [])
        if len(operations) < 2 or operations[0]["class"] != "Orientation":
            return None
        orientation, spacings = operations[0], operations[1:]
        if any(spacing["class"] != "SpatialResample" for spacing in spacings):
            return None
        extra = spacings[0]["extra_info"]
        return {
            "affine": torch.as_tensor(orientation["extra_info"]["original_affine"], dtype=torch.float64),
            "shape": tuple(int(n) for n in orientation["orig_size"]),
            "resample": {k: extra[k] for k in ("mode", "padding_mode", "align_corners", "dtype")},
        }

    def resample_box(
        self,
        channel: torch.Tensor,
        source_affine: torch.Tensor,
        grid: dict,
        offset: tuple[int, ...] = (0, 0, 0),
        fill: float | None = None,
    ) -> tuple:
        """The (X, Y, Z) network-grid ``channel`` on the input grid ``grid`` (:meth:`grid_of`), its box only:
        ``(fill, box, values)`` where the input-grid voxels of ``box`` (a tuple of slices) take ``values`` and every
        other voxel ``fill`` (``box`` and ``values`` are None when the whole channel is ``fill``). ``channel`` may be
        a crop of the network grid starting at voxel ``offset``, everything outside it ``fill`` (default: the
        channel's corner value)."""
        fill = float(channel[0, 0, 0]) if fill is None else float(fill)
        varying = (channel != fill).cpu().numpy()
        if not varying.any():
            return fill, None, None
        found = bounding_box(varying)
        box = grow_box(found, 1, channel.shape)
        crop_affine = source_affine.clone()
        start = [b.start + o for b, o in zip(box, offset)]
        crop_affine[:, 3] = source_affine @ torch.tensor(start + [1], dtype=torch.float64)
        # the input-grid box whose voxels sample inside the crop; beyond it every sample sees the fill value only
        corners = torch.tensor(
            [
                [*(o + (b.stop - 1 if pick else b.start) for b, o, pick in zip(box, offset, picks)), 1]
                for picks in itertools.product((0, 1), repeat=3)
            ],
            dtype=torch.float64,
        )
        target = torch.linalg.solve(grid["affine"], source_affine @ corners.T)[:3]
        low = np.maximum(np.floor(target.min(1).values.numpy()).astype(int), 0)
        high = np.minimum(np.ceil(target.max(1).values.numpy()).astype(int) + 1, grid["shape"])
        if (high <= low).any():
            return fill, None, None
        target_affine = grid["affine"].clone()
        target_affine[:, 3] = grid["affine"] @ torch.tensor([*low.tolist(), 1], dtype=torch.float64)
        crop = MetaTensor(channel[tuple(box)][None], affine=crop_affine)
        resampled = SpatialResample(**grid["resample"])(
            crop, dst_affine=target_affine, spatial_size=tuple((high - low).tolist())
        )
        return fill, tuple(slice(a, b) for a, b in zip(low, high)), torch.as_tensor(resampled[0])

    def invert_channel(
        self,
        channel: torch.Tensor,
        source_affine: torch.Tensor,
        grid: dict,
        dtype: torch.dtype = torch.float32,
        offset: tuple[int, ...] = (0, 0, 0),
        fill: float | None = None,
    ) -> torch.Tensor:
        """The (X, Y, Z) network-grid ``channel`` (or a crop of it at ``offset``, ``fill`` outside) as a whole
        (X', Y', Z') ``dtype`` tensor on the input grid ``grid``, resampling its box only (:meth:`resample_box`)."""
        fill, box, values = self.resample_box(channel, source_affine, grid, offset, fill)
        out = lazy_zeros(grid["shape"], dtype) if fill == 0 else torch.full(grid["shape"], fill, dtype=dtype)
        if box is not None:
            out[box] = values.to(dtype)
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d.get(self.orig_key)
        grid = self.grid_of(image) if isinstance(image, MetaTensor) else None
        for key in self.key_iterator(d):
            output = d[key]
            boxed = [c for c in self.box_channels if c < output.shape[0]]
            if grid is None or not boxed or not isinstance(output, torch.Tensor):
                d[key] = self.invert(d)[key]
                continue
            source_affine = torch.as_tensor(image.affine, dtype=torch.float64)
            plain = output.as_tensor() if isinstance(output, MetaTensor) else output
            result = torch.empty((output.shape[0], *grid["shape"]), dtype=plain.dtype)
            for c in boxed:
                result[c] = self.invert_channel(plain[c], source_affine, grid, result.dtype)
            rest = [c for c in range(output.shape[0]) if c not in boxed]
            if rest:
                result[rest] = torch.as_tensor(self.invert({**d, key: output[rest]})[key]).to(result.dtype)
            meta = deepcopy(image.meta)
            meta["affine"] = grid["affine"]
            d[key] = MetaTensor(result, meta=meta)
        return d


class AnswerToInputGridd(MapTransform):
    """An answer found on the network grid, back on the input grid: its box only is resampled.

    ``keys``: (1, X, Y, Z) {0, 1} answer masks on the network grid -> (1, X', Y', Z') uint8 {0, 1} masks on the
    grid of ``orig_keys`` as loaded. The border comes from the probabilities the answer was thresholded from
    (``prob_key``, ``threshold``: the all-lesion output for the candidates, the referred-lesion output for the rule):
    they are resampled (bilinear, :meth:`BoxInvertd.resample_box`) in the answer and a one-voxel ring around it and
    thresholded again, so the answer keeps the sub-voxel border a whole-grid resampling gives; ring voxels at or above
    the threshold (another candidate touching this one) are held just below it. ``evidence_keys`` (1, X, Y, Z)
    probabilities (the referred-lesion output, for the record's per-lesion figures) are resampled the same way,
    inside the answer and its ring only, 0 elsewhere (float32). Nothing of the size of the input grid is made but
    the outputs; preprocessing other than ``Orientationd`` then ``Spacingd`` goes through ``Invertd`` whole.
    ``nifti_layout``: the answer's memory laid out first axis fastest (a permuted view; same values), as a NIfTI
    file stores it, so that writing it needs no reordering (for inference; array code elsewhere prefers C order).
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform,
        prob_key: str = "lesions_prob",
        threshold: float = 0.5,
        evidence_keys: KeysCollection = (),
        orig_keys: str = "image",
        nifti_layout: bool = False,
    ) -> None:
        super().__init__(keys)
        self.prob_key, self.threshold, self.orig_key = prob_key, float(threshold), orig_keys
        self.nifti_layout = bool(nifti_layout)
        self.evidence_keys = (evidence_keys,) if isinstance(evidence_keys, str) else tuple(evidence_keys)
        self.box_invert = BoxInvertd("answer", transform, orig_keys=orig_keys, box_channels=())

    @staticmethod
    def _ring_box(mask: np.ndarray) -> tuple[slice, ...] | None:
        """The box of ``mask`` grown by two voxels (its one-voxel ring and one voxel beyond), or None if empty."""
        found = bounding_box(mask)
        if found is None:
            return None
        return grow_box(found, 2, mask.shape)

    def _on_input_grid(self, boundary: torch.Tensor, evidence: list[torch.Tensor], box: tuple, data: dict) -> tuple:
        """The answer (uint8, ``boundary`` thresholded) and the ``evidence`` (float32), crops at ``box`` of the
        network grid that is 0 outside them, on the input grid, and the metadata that goes with them."""
        image = data.get(self.orig_key)
        grid = self.box_invert.grid_of(image) if isinstance(image, MetaTensor) else None
        if grid is None:
            source = data[self.prob_key]
            stacked = torch.zeros((1 + len(evidence), *source.shape[1:]), dtype=torch.float32)
            stacked[(slice(None), *box)] = torch.stack([boundary, *evidence])
            stacked = MetaTensor(stacked, meta=source.meta) if isinstance(source, MetaTensor) else stacked
            inverted = self.box_invert({**data, "answer": stacked})["answer"]
            meta, inverted = dict(getattr(inverted, "meta", {})), torch.as_tensor(inverted)
            return (inverted[0] >= self.threshold).to(torch.uint8), list(inverted[1:].unbind(0)), meta
        source_affine = torch.as_tensor(image.affine, dtype=torch.float64)
        offset = tuple(b.start for b in box)
        fill, input_box, values = self.box_invert.resample_box(boundary, source_affine, grid, offset, fill=0.0)
        if self.nifti_layout:  # first axis fastest, as a NIfTI file stores it: written without reordering its bytes
            answer = lazy_zeros(grid["shape"][::-1], torch.uint8).permute(*reversed(range(len(grid["shape"]))))
        else:
            answer = lazy_zeros(grid["shape"], torch.uint8)
        if input_box is not None:
            answer[input_box] = (values >= self.threshold).to(torch.uint8)
        resampled = [
            self.box_invert.invert_channel(channel, source_affine, grid, offset=offset, fill=0.0)
            for channel in evidence
        ]
        meta = deepcopy(image.meta)
        meta["affine"] = grid["affine"]
        return answer, resampled, meta

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            answer = torch.as_tensor(d[key])[0].cpu() > 0
            box = self._ring_box(answer.numpy())
            if box is None:  # an empty answer: a one-voxel crop of zeros
                box = (slice(0, 1),) * answer.ndim
            answer = answer[box]
            near = torch.as_tensor(
                ndimage.binary_dilation(answer.numpy(), structure=np.ones((3, 3, 3), bool))
            )  # the answer and its one-voxel ring (26-neighbourhood)
            probability = torch.as_tensor(d[self.prob_key])[0][box].float().cpu()
            below = torch.clamp(probability, max=self.threshold * (1.0 - 1e-3))
            boundary = torch.where(answer, probability, below) * near
            evidence = [torch.as_tensor(d[name])[0][box].float().cpu() * near for name in self.evidence_keys]
            mask, evidence, meta = self._on_input_grid(boundary, evidence, box, d)
            d[key] = MetaTensor(mask[None], meta=meta)
            for name, values in zip(self.evidence_keys, evidence):
                d[name] = MetaTensor(values[None], meta=meta)
        return d


#: The scope answer when the network finds no liver at all.
NO_LIVER_SCOPE = {"in_scope": False, "reason": "no liver in view: the network finds no liver tissue in this image"}


def liver_region(
    liver_probability: np.ndarray,
    spacing: tuple[float, ...],
    threshold: float = 0.5,
    margin_mm: float = 5.0,
    hounsfield: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """The largest 3D component of ``liver_probability >= threshold``, grown by ``margin_mm``.

    ``liver_probability`` (X, Y, Z) with voxel ``spacing`` in mm -> (bool (X, Y, Z) region, all False when no liver
    is found, and a JSON-ready description: ``liver_found``, ``liver_volume_ml``, ``box_voxels`` of the liver). With
    ``hounsfield`` (X, Y, Z, RAS grid) the liver found is also checked against the anatomy around it
    (:func:`custom.detection.scope.liver_scope`, under ``scope``); out of scope, the region is empty.
    """
    liver = liver_probability >= threshold
    largest = largest_component(liver)
    if largest is None:
        return np.zeros_like(liver), {
            "liver_found": False,
            **({"scope": NO_LIVER_SCOPE} if hounsfield is not None else {}),
        }
    scope = None if hounsfield is None else liver_scope(largest, hounsfield, spacing)
    if scope is not None and not scope["in_scope"]:
        return np.zeros_like(liver), {"liver_found": False, "scope": scope}
    extent = bounding_box(largest)
    # the distance transform only needs the liver's box grown by the margin
    grown = grow_box(extent, [int(np.ceil(margin_mm / s)) for s in spacing], liver.shape)
    region = np.zeros_like(liver)
    region[grown] = ndimage.distance_transform_edt(~largest[grown], sampling=spacing) <= margin_mm
    description = {
        "liver_found": True,
        "liver_volume_ml": float(largest.sum() * np.prod(spacing) / 1000.0),
        "box_voxels": [[e.start, e.stop] for e in extent],
        **({"scope": scope} if scope is not None else {}),
    }
    return region, description


class LiverRegiond(MapTransform):
    """Restrict the answers to the liver: zero ``keys`` outside the text-free liver output grown by ``margin_mm``.

    ``liver_key`` (1, X, Y, Z) liver probabilities (a MetaTensor: its affine gives the voxel spacing) -> ``keys``
    (1, X, Y, Z) zeroed outside the largest liver component grown by ``margin_mm`` (lesions lie inside the liver;
    the margin forgives an imprecise liver border); everything zeroed when no liver is found, or, given the HU image
    under ``image_key`` (same grid), when the liver found is not plausibly a liver in view (:func:`liver_scope`). The
    region's
    description (:func:`liver_region`) is stored under ``region_key`` for the record and the (X, Y, Z) boolean region
    under ``mask_key``. Data that hold ``mask_key`` already (the region of the same volume, computed for an earlier
    expression) reuse it and its description. Without a liver output (a 1-channel network) the data pass unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection,
        liver_key: str = "liver_prob",
        threshold: float = 0.5,
        margin_mm: float = 5.0,
        region_key: str = "liver_region",
        mask_key: str = "liver_region_mask",
        image_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.liver_key, self.threshold, self.margin_mm, self.region_key = liver_key, threshold, margin_mm, region_key
        self.mask_key, self.image_key = mask_key, image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        liver = d.get(self.liver_key)
        if liver is None:
            return d
        if d.get(self.mask_key) is None or self.region_key not in d:
            affine = np.asarray(liver.affine) if hasattr(liver, "affine") else np.eye(4)
            spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))
            array = liver.detach().cpu().numpy() if isinstance(liver, torch.Tensor) else np.asarray(liver)
            image = d.get(self.image_key) if self.image_key is not None else None
            if image is not None:
                image = (image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image))[0]
            region, d[self.region_key] = liver_region(array[0], spacing, self.threshold, self.margin_mm, image)
            d[self.mask_key] = torch.as_tensor(region)
        region = torch.as_tensor(d[self.mask_key])
        for key in self.key_iterator(d):
            d[key] = d[key] * region.to(d[key].device)
        return d


class PerVolumeOutputsd(MapTransform):
    """Post-process the text-free output channels once per volume, the referred-lesion channel per expression.

    ``keys`` (K, X, Y, Z) network outputs (channel 0 the referred lesions, channels 1.. text-free) go through
    ``transforms`` (activation, ``SplitOutputsd``, ``LiverRegiond``, ``LesionCandidatesd`` ...). Their outputs named
    in ``shared_keys`` (the liver and all-lesion probabilities, the liver region, the lesion candidates) depend on
    the volume only:
    for data whose ``volume_key`` tensor equals the previous call's, they are taken from that call and only channel
    0 of ``keys`` goes through ``transforms``, which gives the same results for less work (several expressions or
    prompts on one CT, one after the other). Shared outputs that a transform reads (the liver and its region, which
    ``LiverRegiond`` reuses) are handed to ``transforms``; those a transform processes (one of its ``keys``, such as
    the all-lesion probabilities) are final and join the result afterwards. A 1-channel network has no shared
    outputs and always runs whole.
    """

    def __init__(
        self,
        keys: KeysCollection,
        transforms,
        shared_keys: tuple[str, ...] = (
            "liver_prob",
            "lesions_prob",
            "liver_region",
            "liver_region_mask",
            "lesion_candidates",
        ),
        volume_key: str = "image",
    ) -> None:
        super().__init__(keys)
        self.transforms = transforms if isinstance(transforms, Compose) else Compose(transforms)
        self.shared_keys = tuple(shared_keys)
        self.volume_key = volume_key
        self._processed = {key for t in self.transforms.transforms if isinstance(t, MapTransform) for key in t.keys}
        self._last: tuple[torch.Tensor, dict] | None = None

    def _same_volume(self, volume) -> bool:
        if self._last is None or not isinstance(volume, torch.Tensor):
            return False
        last = self._last[0]
        return last.shape == volume.shape and last.dtype == volume.dtype and torch.equal(last, volume.to(last.device))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        volume = d.get(self.volume_key)
        if self._same_volume(volume):
            shared = self._last[1]  # type: ignore[index]
            for key in self.key_iterator(d):
                d[key] = d[key][:1]
            read = {key: value for key, value in shared.items() if key not in self._processed}
            final = {key: value for key, value in shared.items() if key in self._processed}
            return {**self.transforms({**d, **read}), **final}
        output = self.transforms(d)
        shared = {key: output[key] for key in self.shared_keys if key in output}
        self._last = (volume.detach(), shared) if shared and isinstance(volume, torch.Tensor) else None  # not copied
        return output


class CandidateMapToInputGridd(MapTransform):
    """The lesion candidates as one label map on the input grid, candidate ``k`` as value ``k``.

    ``keys``: the candidates of ``custom.referral.choose.LesionCandidatesd`` (``box`` and ``map`` on the network
    grid, numbered 1..K as the record's ``referral.candidates``) -> ``output_key`` (1, X', Y', Z') uint8 (int32
    beyond 255 candidates) on the grid of ``orig_keys`` as loaded. Each candidate comes back as an answer does
    (:class:`AnswerToInputGridd`: its box resampled, its border from ``prob_key`` at ``threshold``), so a chosen
    candidate's voxels are those of the answer; where two touch, the later one takes the voxels they share. With no
    candidates (or none found) the output key is not set.
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform,
        prob_key: str = "lesions_prob",
        threshold: float = 0.5,
        orig_keys: str = "image",
        output_key: str = "candidate_map",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.prob_key, self.output_key = prob_key, output_key
        self.to_input = AnswerToInputGridd("candidate", transform, prob_key, threshold, orig_keys=orig_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            candidates = d[key]
            if not candidates or "map" not in candidates:
                continue
            source = d[self.prob_key]
            network_map = np.zeros(tuple(source.shape[1:]), np.int32)
            network_map[tuple(slice(start, stop) for start, stop in candidates["box"])] = np.asarray(candidates["map"])
            labels, meta = None, None
            for k in range(1, int(network_map.max(initial=0)) + 1):
                one = MetaTensor(torch.as_tensor(network_map == k)[None], meta=getattr(source, "meta", {}))
                on_input = self.to_input({**d, "candidate": one})["candidate"]
                if labels is None:
                    dtype = torch.uint8 if network_map.max() < 256 else torch.int32
                    labels, meta = torch.zeros(on_input.shape[1:], dtype=dtype), on_input.meta
                labels[torch.as_tensor(on_input)[0] > 0] = k
            if labels is not None:
                d[self.output_key] = MetaTensor(labels[None], meta=meta)
        return d
