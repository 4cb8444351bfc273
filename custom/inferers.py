"""Slice-by-slice inference of the 2D referring network over a 3D volume, focused on the liver."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from scipy import ndimage

from custom.postprocessing import largest_component

__all__ = ["ReferringSliceInferer", "liver_box", "slice_context"]

#: Logit given to the referred-lesion channel outside the liver region (sigmoid ~ 2e-9): no answer there.
OUTSIDE_LOGIT = -20.0


def liver_box(liver: np.ndarray, margin: tuple[int, int, int] = (7, 7, 1)) -> tuple[slice, slice, slice] | None:
    """Bounding box of the largest 3D component of a binary ``liver`` (H, W, D), grown by ``margin`` voxels per
    axis and clipped to the volume; ``None`` when there is no liver."""
    largest = largest_component(liver)
    if largest is None:
        return None
    extent = ndimage.find_objects(largest.view(np.uint8))[0]
    return tuple(slice(max(e.start - m, 0), min(e.stop + m, n)) for e, m, n in zip(extent, margin, liver.shape))  # type: ignore[return-value]


def slice_context(volume: torch.Tensor, context_slices: int) -> torch.Tensor:
    """Each axial slice with its ``n = context_slices`` neighbours on either side as extra channels, the layout
    training gives (``ReferringSlicesd``): ``(B, C, H, W, D) -> (B, C * (2n + 1), H, W, D)``, channel
    ``c * (2n + 1) + k`` is input channel ``c`` at slice offset ``k - n``; the first and last slices replicate."""
    if context_slices == 0:
        return volume
    batch, channels, height, width, depth = volume.shape
    offsets = torch.arange(-context_slices, context_slices + 1, device=volume.device)
    index = (torch.arange(depth, device=volume.device)[None] + offsets[:, None]).clamp(0, depth - 1)  # (K, D)
    plain = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    stacked = plain[..., index].permute(0, 1, 4, 2, 3, 5)  # (B, C, K, H, W, D)
    expanded = stacked.reshape(batch, channels * len(offsets), height, width, depth)
    if isinstance(volume, MetaTensor):
        return MetaTensor(expanded, meta=volume.meta, applied_operations=volume.applied_operations)
    return expanded


class ReferringSliceInferer(SliceInferer):
    """MONAI ``SliceInferer`` that hands the expression's keyword tensors to the network for every slice batch,
    optionally focused on the liver.

    MONAI 1.6.1's ``SliceInferer.__call__`` drops the ``*args``/``**kwargs`` it documents, so the text would never
    reach the network; here they are bound to the network before sliding. ``input_ids``/``attention_mask`` of
    batch 1 are broadcast by the network over each batch of slices.

    ``inputs (1, C, H, W, D)`` with ``spatial_dim=2`` -> ``(1, out_channels, H, W, D)``. ``roi_size=(-1, -1)``
    infers whole slices.

    Liver focus (``focus_channel``: the network's text-free liver channel, ``None`` for off): a text-free pass over
    every slice gives the liver and all-lesion channels; the referring pass (with the text) then runs on the box of
    the largest liver component grown by ``focus_margin`` voxels (or ``focus_margin_mm`` along every axis), on the
    slices that hold it, only. Outside the box
    channel 0 is :data:`OUTSIDE_LOGIT` (nothing is answered there, nor anywhere when no liver is found). Without text
    channel 0 is the text-free answer (all lesions) inside the box. The last text-free pass is kept and reused when
    the next call has the same volume (several expressions of one case).

    ``lesion_channel`` (the text-free all-lesion channel, ``None`` for off): the referring pass is needed only where
    lesion candidates can be, so it runs only on the slices of the liver's box where that channel reaches
    ``lesion_threshold`` (grown by the box's slice margin), and not at all when there is none. The network reads one
    slice at a time, so the evidence on those slices is the same as with the whole box.

    ``context_slices`` n > 0: the network sees each slice with its n neighbours on either side as channels
    (:func:`slice_context`), as it was trained; ``inputs`` keep their own C channels.
    """

    def __init__(
        self,
        *args: Any,
        focus_channel: int | None = None,
        focus_threshold: float = 0.5,
        focus_margin: tuple[int, int, int] = (7, 7, 1),
        focus_margin_mm: float | None = None,
        context_slices: int = 0,
        lesion_channel: int | None = None,
        lesion_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lesion_channel = lesion_channel
        self.lesion_threshold = float(lesion_threshold)
        self._lesion_logit = float(torch.logit(torch.tensor(self.lesion_threshold)))  # the threshold on the logits
        if int(context_slices) < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}.")
        self.context_slices = int(context_slices)
        self.focus_channel = focus_channel
        self.focus_threshold = float(focus_threshold)
        self.focus_margin = tuple(int(m) for m in focus_margin)
        self.focus_margin_mm = None if focus_margin_mm is None else float(focus_margin_mm)
        self._last: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _slide(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Slide over ``inputs`` already holding their context channels."""
        if not (args or kwargs):
            return super().__call__(inputs, network)
        return super().__call__(inputs, lambda slices: network(slices, *args, **kwargs))

    def _region_with_context(self, inputs: torch.Tensor, box: tuple[slice, slice, slice]) -> torch.Tensor:
        """``inputs[..., box]`` with the context channels of its slices, taken from slices outside the box too."""
        n, depth = self.context_slices, inputs.shape[-1]
        start, stop = max(box[2].start - n, 0), min(box[2].stop + n, depth)
        slab = slice_context(inputs[..., box[0], box[1], start:stop], n)
        return slab[..., box[2].start - start : box[2].stop - start]

    def _margin(self, inputs: torch.Tensor) -> tuple[int, ...]:
        """The box's margin in voxels per axis: ``focus_margin``, or ``focus_margin_mm`` over the voxel size of
        ``inputs`` (a MetaTensor's affine) rounded up, so thin and thick slices get the same margin in mm."""
        affine = getattr(inputs, "affine", None)
        if self.focus_margin_mm is None or affine is None:
            return self.focus_margin
        affine = torch.as_tensor(affine, dtype=torch.float64)
        spacing = torch.linalg.norm((affine[0] if affine.ndim == 3 else affine)[:3, :3], dim=0)
        return tuple(int(np.ceil(self.focus_margin_mm / float(s) - 1e-6)) for s in spacing)

    def _lesion_slices(self, text_free: torch.Tensor, box: tuple[slice, slice, slice], margin: int):
        """``box`` narrowed to the slices where the all-lesion channel reaches the threshold inside it, grown by the
        box's slice margin; ``None`` when no voxel does."""
        lesions = text_free[(0, self.lesion_channel, *box)]
        found = torch.nonzero((lesions >= self._lesion_logit).flatten(0, 1).any(0)).flatten()
        if found.numel() == 0:
            return None
        offset = box[2].start
        start = max(int(found[0]) - margin, 0) + offset
        stop = min(int(found[-1]) + 1 + margin, box[2].stop - offset) + offset
        return (box[0], box[1], slice(start, stop))

    def text_free(self, inputs: torch.Tensor, network) -> torch.Tensor:
        """The text-free pass over every slice, ``(1, C, H, W, D) -> (1, K, H, W, D)``, reused while the volume and
        the network's weights (their in-place update counters) are the same."""
        weights = (id(network), tuple(p._version for p in network.parameters()))
        last = self._last
        if last is not None and last[0] == weights and last[1].shape == inputs.shape and torch.equal(last[1], inputs):
            return last[2]
        output = self._slide(slice_context(inputs, self.context_slices), network)
        self._last = (weights, inputs.detach(), output)  # kept, not copied: MONAI's transforms do not work in place
        return output

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if self.focus_channel is None:
            return self._slide(slice_context(inputs, self.context_slices), network, *args, **kwargs)
        text_free = self.text_free(inputs, network)
        liver = (torch.sigmoid(text_free[0, self.focus_channel].float()) >= self.focus_threshold).cpu().numpy()
        margin = self._margin(inputs)
        box = liver_box(liver, margin)
        output = text_free.clone()
        output[:, 0] = OUTSIDE_LOGIT
        if box is None:
            return output
        if self.lesion_channel is not None and (args or kwargs):
            box = self._lesion_slices(text_free, box, margin[2])
            if box is None:
                return output
        region = (slice(None), slice(None), *box)
        if args or kwargs:
            referred = self._slide(self._region_with_context(inputs, box), network, *args, **kwargs)
        else:
            referred = text_free[region]
        output[(slice(None), 0, *box)] = referred[:, 0]
        return output
