"""Dictionary transforms for referring lesion segmentation that MONAI does not provide.

Loading uses MONAI as is; a typical chain in a config (volumes are reoriented to RAS so that the last axis is
axial, running inferior to superior)::

    LoadImaged(keys=[image, lesions, liver], image_only=True)
    EnsureChannelFirstd(keys=[image, lesions, liver])
    Orientationd(keys=[image, lesions, liver], axcodes="RAS")
    Spacingd(keys=[image, lesions, liver], pixdim=[...], mode=[bilinear, nearest, nearest])   # optional
    HUWindowd(keys=image, windows=[[60, 160], [40, 400]])
    ReferredMaskd(instance_key=lesions, targets_key=targets, output_key=label)
    Tokenized(text_key=text)
    DeleteItemsd(keys=[targets])          # lists of unequal length do not collate
    ReferringSlicesd(keys=[image, label], label_key=label, negative_ratio=0.5, max_samples=8)

Items come from :func:`custom.data.datalist.expand_expressions` (one per expression) or, with
:class:`RandSelectExpressiond`, from :func:`custom.data.datalist.load_datalist` (one per case).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Randomizable, RandomizableTransform, ScaleIntensityRange
from monai.transforms.traits import MultiSampleTrait

from custom.text import DEFAULT_MAX_TOKENS, load_tokenizer

__all__ = [
    "CompactCopyd",
    "HUWindowd",
    "PerVolumeCompose",
    "ReferredMaskd",
    "ReferringSlicesd",
    "Tokenized",
    "RandSelectExpressiond",
    "RandDropTextd",
]


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def compact_copy(volume: torch.Tensor) -> torch.Tensor:
    """A copy of ``volume`` (metadata included) as int16 when that holds every value exactly (CT in whole Hounsfield
    units), else as a plain copy. Checked slab by slab along the last axis, so no full-size temporary is made."""
    values = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    copy = None
    if values.is_floating_point() and values.numel():
        low, high = torch.aminmax(values)
        if -32768 <= float(low) and float(high) <= 32767:
            compact = values.to(torch.int16)
            slabs = zip(compact.split(16, dim=-1), values.split(16, dim=-1))
            if all(torch.equal(slab.to(values.dtype), original) for slab, original in slabs):
                copy = compact
    if copy is None:
        copy = values.clone()
    if isinstance(volume, MetaTensor):
        return MetaTensor(
            copy, meta=deepcopy(dict(volume.meta)), applied_operations=deepcopy(volume.applied_operations)
        )
    return copy


class CompactCopyd(MapTransform):
    """``CopyItemsd`` for volumes of whole numbers such as CT in Hounsfield units: ``names[i]`` becomes a copy of
    ``keys[i]`` that is int16 when that holds every value exactly (half the memory of float32), else a plain copy
    (:func:`compact_copy`). The inference keeps the loaded CT this way for the record's measurements and overlays."""

    def __init__(self, keys: KeysCollection, names: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.names) != len(self.keys):
            raise ValueError(f"CompactCopyd needs one name per key, got keys {self.keys} and names {self.names}.")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            d[name] = compact_copy(d[key])
        return d


class HUWindowd(MapTransform):
    """Map Hounsfield units to [0, 1] through one or several (centre, width) windows.

    (C, H, W[, D]) HU -> (C * len(windows), H, W[, D]) float32; output channel ``w * C + c`` is input channel
    ``c`` seen through window ``w``. Values outside a window are clipped to 0 or 1.

    Each window is MONAI's ``ScaleIntensityRange`` (``a_min``/``a_max`` the window's edges, clipped to [0, 1]),
    and the channels are concatenated as ``ConcatItemsd`` would. One transform rather than that chain in the configs:
    the number of windows is an option (``windows``; the network's input channels are ``len(windows)``), and a
    config cannot unroll a variable number of transforms without Python in it.

    Args:
        keys: keys of the images to window.
        windows: ``[[centre, width], ...]`` in HU, e.g. ``[[60, 160], [40, 400]]`` (liver, abdomen).
    """

    def __init__(
        self,
        keys: KeysCollection,
        windows: Sequence[Sequence[float]] = ((40.0, 400.0),),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        windows = [tuple(float(v) for v in window) for window in windows]
        if not windows or any(len(w) != 2 or w[1] <= 0 for w in windows):
            raise ValueError(
                f"windows must be a non-empty list of [centre, width] pairs with width > 0, got {windows}."
            )
        self.windows = windows
        self.scalers = [
            ScaleIntensityRange(a_min=centre - width / 2, a_max=centre + width / 2, b_min=0.0, b_max=1.0, clip=True)
            for centre, width in windows
        ]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = _as_tensor(d[key]).float()
            d[key] = torch.cat([scale(image) for scale in self.scalers], dim=0)
        return d


class ReferredMaskd(MapTransform):
    """Mask of the referred lesions: union of the ``targets`` ids of the instance map.

    (1, H, W[, D]) instance map + list of ids -> ``output_key`` (1, H, W[, D]) float32 in {0, 1}; empty
    targets give zeros. A target id absent from the map raises ``ValueError`` unless
    ``allow_absent_targets`` (e.g. after resampling that may erase a tiny lesion).

    With ``dense=True`` the output has 3 channels, the targets of a 3-channel network: the referred lesions, the
    liver (``liver_key``, required) and all lesions of the case.
    """

    def __init__(
        self,
        instance_key: str = "lesions",
        targets_key: str = "targets",
        output_key: str = "label",
        allow_absent_targets: bool = False,
        dense: bool = False,
        liver_key: str = "liver",
        allow_missing_keys: bool = False,
    ):
        super().__init__([instance_key], allow_missing_keys)
        self.instance_key = instance_key
        self.targets_key = targets_key
        self.output_key = output_key
        self.allow_absent_targets = allow_absent_targets
        self.dense = dense
        self.liver_key = liver_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.instance_key not in d and self.allow_missing_keys:
            return d
        instances = _as_tensor(d[self.instance_key])
        targets = [int(t) for t in _as_tensor(d.get(self.targets_key, [])).reshape(-1).tolist()]
        mask = torch.zeros_like(instances, dtype=torch.bool)
        for target in targets:
            hit = instances == target
            if not self.allow_absent_targets and not bool(hit.any()):
                present = sorted(int(v) for v in torch.unique(instances).tolist() if v != 0)
                raise ValueError(
                    f"Case '{d.get('case_id', '?')}': target id {target} is not in the lesion instance map "
                    f"'{self.instance_key}' (ids present: {present}). Check the datalist with "
                    "custom.data.datalist.validate_datalist, or set allow_absent_targets=True after resampling."
                )
            mask |= hit
        if not self.dense:
            d[self.output_key] = mask.float()
            return d
        if d.get(self.liver_key) is None:
            raise ValueError(
                f"Case '{d.get('case_id', '?')}' has no liver mask '{self.liver_key}', which dense targets need. Add "
                "the liver to the datalist (the LiTS/MSD conversion writes it), or train with dense=False."
            )
        liver = _as_tensor(d[self.liver_key]) > 0
        d[self.output_key] = torch.cat([mask, liver, instances > 0]).float()
        return d


class ReferringSlicesd(Randomizable, MapTransform, MultiSampleTrait):
    """Turn a volume sample into 2D axial slice samples (a list of dicts).

    Input volumes (C, H, W, D) in RAS (D axial). Output per chosen slice ``z``: each key of ``keys`` other than
    ``label_key`` becomes (C * (2 * context_slices + 1), H, W) with the neighbouring slices ``z - n .. z + n``
    as extra channels (channel ``c * (2n + 1) + k`` is input channel ``c`` at offset ``k - n``; edges
    replicate the first / last slice); ``label_key`` becomes its centre slice (K, H, W). Every other item is
    copied, except volumes of the same (H, W, D) that are not in ``keys`` (e.g. ``lesions``, ``liver``), and
    ``slice_index`` is added.

    Chosen slices: every slice where the label (its channel 0, the referred lesions) is present, plus
    ``ceil(negative_ratio * positives)`` random slices without it taken from the liver's z-range when ``liver_key``
    is available (all slices otherwise).
    For an empty label (a negative expression) every slice of the liver's z-range (all slices without a liver
    mask or with an empty one). ``max_samples`` keeps a random subset of that size. Randomness comes from
    ``self.R``, so ``set_random_state`` and MONAI's data loaders make it reproducible.

    With ``lesion_key`` (the (1, H, W, D) lesion instance map) every lesion of the case, referred or not, also
    brings one random slice of its own, so that a small lesion is seen as often as a large one by the dense
    targets and as a slice without the referent by the text-conditioned one. ``max_samples`` then keeps at most
    half of its slices from the referred target's and fills the rest from the lesion and negative slices.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        negative_ratio: float = 0.5,
        context_slices: int = 0,
        max_samples: int | None = None,
        liver_key: str | None = "liver",
        lesion_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if negative_ratio < 0 or context_slices < 0 or (max_samples is not None and max_samples < 1):
            raise ValueError("negative_ratio and context_slices must be >= 0 and max_samples >= 1 (or None).")
        self.label_key = label_key
        self.negative_ratio = float(negative_ratio)
        self.context_slices = int(context_slices)
        self.max_samples = max_samples
        self.liver_key = liver_key
        self.lesion_key = lesion_key
        self._chosen: list[int] = []

    def _liver_slices(self, d: Mapping, depth: int) -> np.ndarray:
        """Boolean (D,) of the slices inside the liver's z-range; all True without a usable liver mask."""
        liver = d.get(self.liver_key) if self.liver_key else None
        if liver is None:
            return np.ones(depth, bool)
        present = _as_tensor(liver).reshape(-1, depth).amax(0).cpu().numpy() > 0
        if not present.any():
            return np.ones(depth, bool)
        inside = np.zeros(depth, bool)
        indices = np.flatnonzero(present)
        inside[indices[0] : indices[-1] + 1] = True
        return inside

    def _lesion_extents(self, d: Mapping, depth: int) -> list[np.ndarray]:
        """Slice indices of each lesion instance of ``lesion_key`` (empty list without one)."""
        if not self.lesion_key or d.get(self.lesion_key) is None:
            return []
        instances = _as_tensor(d[self.lesion_key]).reshape(-1, depth).long().cpu().numpy()
        present = np.zeros((int(instances.max(initial=0)) + 1, depth), bool)  # (lesion id, slice), one pass
        present[instances, np.arange(depth)] = True
        return [np.flatnonzero(row) for row in present[1:] if row.any()]

    def randomize(
        self, positive: np.ndarray, liver_range: np.ndarray, lesion_extents: list[np.ndarray] | None = None
    ) -> None:
        """Choose the slice indices from (D,) boolean masks of target slices and liver-range slices.

        ``lesion_extents``: slice indices of each lesion instance; each brings one random slice of its own.
        """
        if lesion_extents:
            self._randomize_with_lesions(positive, liver_range, lesion_extents)
            return
        if positive.any():
            candidates = np.flatnonzero(~positive & liver_range)
            if candidates.size == 0:
                candidates = np.flatnonzero(~positive)
            count = min(candidates.size, math.ceil(self.negative_ratio * int(positive.sum()) - 1e-9))
            negatives = self.R.choice(candidates, count, replace=False) if count else np.array([], int)
            chosen = np.union1d(np.flatnonzero(positive), negatives)
        else:
            chosen = np.flatnonzero(liver_range)
        if self.max_samples is not None and chosen.size > self.max_samples:
            chosen = np.sort(self.R.choice(chosen, self.max_samples, replace=False))
        self._chosen = [int(z) for z in chosen]

    def _randomize_with_lesions(
        self, positive: np.ndarray, liver_range: np.ndarray, lesion_extents: list[np.ndarray]
    ) -> None:
        referred = np.flatnonzero(positive)
        lesion_slices = np.unique([int(self.R.choice(extent)) for extent in lesion_extents if extent.size])
        others = np.flatnonzero(~positive & liver_range)
        if referred.size:
            count = min(others.size, math.ceil(self.negative_ratio * referred.size - 1e-9))
            negatives = self.R.choice(others, count, replace=False) if count else np.array([], int)
        else:
            negatives = others
        rest = np.setdiff1d(np.union1d(lesion_slices, negatives), referred)
        if self.max_samples is None or referred.size + rest.size <= self.max_samples:
            chosen = np.union1d(referred, rest)
        else:
            from_referred = min(referred.size, max(self.max_samples - rest.size, math.ceil(self.max_samples / 2)))
            picked = self.R.choice(referred, from_referred, replace=False) if from_referred else np.array([], int)
            # lesion slices first, then negatives, each in random order
            lesion_rest = self.R.permutation(np.intersect1d(rest, lesion_slices))
            negative_rest = self.R.permutation(np.setdiff1d(rest, lesion_slices))
            filler = np.concatenate([lesion_rest, negative_rest]).astype(int)[: self.max_samples - from_referred]
            chosen = np.union1d(picked, filler)
        self._chosen = [int(z) for z in np.sort(chosen)]

    def _slice(self, volume, z: int, context: int):
        volume = _as_tensor(volume)
        depth = volume.shape[-1]
        if context == 0:
            out = volume[..., z]
        else:
            index = torch.arange(z - context, z + context + 1).clamp(0, depth - 1)
            stack = volume[..., index]  # (C, H, W, K)
            out = stack.permute(0, 3, 1, 2).reshape(-1, *volume.shape[1:-1])
        if isinstance(volume, MetaTensor):
            affine = volume.affine.clone()
            affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * z  # origin of slice z
            out = MetaTensor(
                out.as_tensor() if isinstance(out, MetaTensor) else out,
                affine=affine,
                meta={k: v for k, v in volume.meta.items() if k != "affine"},
            )
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        label = _as_tensor(d[self.label_key])
        depth = label.shape[-1]
        spatial = tuple(label.shape[1:])
        positive = label[0].reshape(-1, depth).amax(0).cpu().numpy() > 0
        self.randomize(positive, self._liver_slices(d, depth), self._lesion_extents(d, depth))
        sliced = set(self.key_iterator(d))
        copied = {
            key: value
            for key, value in d.items()
            if key not in sliced
            and not (hasattr(value, "shape") and len(value.shape) >= 4 and tuple(value.shape[1:]) == spatial)
        }
        samples = []
        for z in self._chosen:
            sample = dict(copied)
            for key in sliced:
                sample[key] = self._slice(d[key], z, 0 if key == self.label_key else self.context_slices)
            sample["slice_index"] = z
            samples.append(sample)
        return samples


class Tokenized(MapTransform):
    """Tokenise the expression with the text encoder's tokenizer.

    ``text_key`` (str) -> ``input_ids`` and ``attention_mask``, each a (max_length,) long tensor padded to
    ``max_length`` so that samples collate. The tokenizer is loaded once per transform instance, from
    ``model_path`` (a local folder or hub name; default: the bundled MiniLM BERT, no network).
    """

    def __init__(
        self,
        text_key: str = "text",
        model_path: str | None = None,
        max_length: int = DEFAULT_MAX_TOKENS,
        input_ids_key: str = "input_ids",
        attention_mask_key: str = "attention_mask",
        allow_missing_keys: bool = False,
    ):
        super().__init__([text_key], allow_missing_keys)
        self.text_key = text_key
        self.model_path = model_path
        self.max_length = int(max_length)
        self.input_ids_key = input_ids_key
        self.attention_mask_key = attention_mask_key
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            text = d[key]
            if not isinstance(text, str):
                raise TypeError(f"'{key}' must be a string expression, got {type(text).__name__}: {text!r}.")
            encoded = self.tokenizer(
                text, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            d[self.input_ids_key] = encoded["input_ids"][0].long()
            d[self.attention_mask_key] = encoded["attention_mask"][0].long()
        return d


class RandSelectExpressiond(Randomizable, MapTransform):
    """Pick one random expression of a case item (from ``load_datalist``).

    Adds ``text``, ``targets`` (list of int), ``kind`` and ``expression_id`` from one entry of
    ``expressions_key``, and removes ``drop_keys`` (lists of unequal length that would not collate).
    """

    def __init__(
        self,
        expressions_key: str = "expressions",
        drop_keys: Sequence[str] = ("expressions", "lesion_attributes"),
        allow_missing_keys: bool = False,
    ):
        super().__init__([expressions_key], allow_missing_keys)
        self.expressions_key = expressions_key
        self.drop_keys = tuple(drop_keys)
        self._index = 0

    def randomize(self, count: int) -> None:
        self._index = int(self.R.randint(count))

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        expressions = d.get(self.expressions_key) or []
        if not expressions:
            raise ValueError(f"Case '{d.get('case_id', '?')}' has no expressions to choose from.")
        self.randomize(len(expressions))
        chosen = expressions[self._index]
        d.update(
            text=chosen["text"],
            targets=[int(t) for t in chosen["targets"]],
            kind=chosen["kind"],
            expression_id=chosen.get("id", f"{d.get('case_id', '')}-{self._index:02d}"),
        )
        for key in self.drop_keys:
            d.pop(key, None)
        return d


class RandDropTextd(RandomizableTransform, MapTransform):
    """With probability ``prob`` make a sample text-free: the network then answers "all lesions".

    The attention mask (``attention_mask_key``, (T,)) becomes all zeros, which the network reads as "no text" for
    that sample, and channel 0 of the dense label (``label_key``, (3, ...) from ``ReferredMaskd(dense=True)``)
    becomes the all-lesion channel ``all_lesions_channel``. This trains the network's own text-free mode (the
    per-volume pass of inference and the lesion-detection evaluation) alongside the referring one. Apply it to the
    volume, before the slices are chosen, so that a text-free sample takes the slices of all lesions.
    """

    def __init__(
        self,
        prob: float = 0.25,
        label_key: str = "label",
        attention_mask_key: str = "attention_mask",
        all_lesions_channel: int = 2,
    ) -> None:
        MapTransform.__init__(self, [label_key, attention_mask_key])
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.attention_mask_key = attention_mask_key
        self.all_lesions_channel = all_lesions_channel

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = _as_tensor(d[self.label_key]).clone()
        if label.shape[0] <= self.all_lesions_channel:
            raise ValueError(
                f"RandDropTextd needs the dense label (3 channels, ReferredMaskd dense=True); '{self.label_key}' has "
                f"{label.shape[0]}."
            )
        label[0] = label[self.all_lesions_channel]
        d[self.label_key] = label
        d[self.attention_mask_key] = torch.zeros_like(_as_tensor(d[self.attention_mask_key]))
        return d


class PerVolumeCompose(Compose):
    """``Compose(volume_transforms + item_transforms)`` whose volume transforms run once per volume.

    ``volume_transforms`` (loading, reorienting, resampling, windowing) depend on the ``keys`` items only (the
    image path, a lesion map): data whose ``keys`` values equal those of the previous call start from the previous
    call's volume outputs (the items those transforms added or changed, merged with the data's own), and only
    ``item_transforms`` (tokenising the prompt ...) run again. Several prompts on one CT, listed one after the
    other, load and resample it once. Volume outputs are shared, not copied: later steps must not change them in
    place (MONAI's collation and ``Invertd`` copy). Inverting (``Invertd``) sees all transforms, as for a plain
    ``Compose``.
    """

    def __init__(self, volume_transforms, item_transforms=(), keys: Sequence[str] = ("image",), **kwargs) -> None:
        volume_transforms, item_transforms = list(volume_transforms), list(item_transforms)
        super().__init__(volume_transforms + item_transforms, **kwargs)
        self.volume = Compose(volume_transforms, **kwargs)
        self.item = Compose(item_transforms, **kwargs)
        self.keys = tuple(keys)
        self._last: tuple[tuple, dict] | None = None

    def __call__(self, data, *args, **kwargs):
        if not isinstance(data, Mapping):
            return super().__call__(data, *args, **kwargs)
        identity = tuple(repr(data.get(key)) for key in self.keys)
        if self._last is not None and self._last[0] == identity:
            volume = {**data, **self._last[1]}
        else:
            volume = self.volume(data, *args, **kwargs)
            changed = {k: v for k, v in volume.items() if k in self.keys or k not in data or v is not data[k]}
            self._last = (identity, changed)
        return self.item(volume, *args, **kwargs)
