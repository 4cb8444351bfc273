"""Slice-by-slice inference of the 2D referring network over a 3D volume, focused on the liver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from custom.clinical.geometry import bounding_box, grow_box
from custom.detection.postprocessing import largest_component

__all__ = ["ReferringSliceInferer", "liver_box", "slice_context"]

#: Logit given to the referred-lesion channel outside the liver region (sigmoid ~ 2e-9): no answer there.
OUTSIDE_LOGIT = -20.0


def liver_box(liver: np.ndarray, margin: tuple[int, int, int] = (7, 7, 1)) -> tuple[slice, slice, slice] | None:
    """Bounding box of the largest 3D component of a binary ``liver`` (H, W, D), grown by ``margin`` voxels per
    axis and clipped to the volume; ``None`` when there is no liver."""
    largest = largest_component(liver)
    if largest is None:
        return None
    extent = bounding_box(largest)
    return grow_box(extent, margin, liver.shape)  # type: ignore[return-value]


def slice_context(volume: torch.Tensor, context_slices: int, step: int = 1) -> torch.Tensor:
    """Each axial slice with its ``n = context_slices`` neighbours on either side as extra channels, the layout
    training gives (``ReferringSlicesd``): ``(B, C, H, W, D) -> (B, C * (2n + 1), H, W, D)``, channel
    ``c * (2n + 1) + k`` is input channel ``c`` at slice offset ``k - n``; the first and last slices replicate.
    ``step`` > 1: every ``step``-th slice only (``[..., ::step]`` of the result, without building the rest)."""
    if context_slices == 0:
        return volume[..., ::step] if step > 1 else volume
    batch, channels, height, width, depth = volume.shape
    offsets = torch.arange(-context_slices, context_slices + 1, device=volume.device)
    centres = torch.arange(0, depth, step, device=volume.device)
    index = (centres[None] + offsets[:, None]).clamp(0, depth - 1)  # (K, D / step)
    plain = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    stacked = plain[..., index].permute(0, 1, 4, 2, 3, 5)  # (B, C, K, H, W, D / step)
    expanded = stacked.reshape(batch, channels * len(offsets), height, width, len(centres))
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

    Liver focus (``focus_channel``: the network's text-free liver channel, ``None`` for off): a text-free pass gives
    the liver and all-lesion channels; the referring pass (with the text) then runs on the box of the largest liver
    component grown by ``focus_margin`` voxels (or ``focus_margin_mm`` along every axis), on the slices that hold
    it, only. Outside the box channel 0 is :data:`OUTSIDE_LOGIT` (nothing is answered there, nor anywhere when no
    liver is found). Without text channel 0 is the text-free answer (all lesions) inside the box. The last
    text-free pass is kept and reused when the next call has the same volume (several expressions of one case).

    ``lesion_channel`` (the text-free all-lesion channel, ``None`` for off): the referring pass is needed only where
    lesion candidates can be, so it runs only on the slices of the liver's box where that channel reaches
    ``lesion_threshold`` and on their neighbours (from which the answer's return to the input grid interpolates),
    and not at all when there is none. The network reads one slice at a time, so the evidence on those slices is
    the same as with the whole box.

    ``context_slices`` n > 0: the network sees each slice with its n neighbours on either side as channels
    (:func:`slice_context`), as it was trained; ``inputs`` keep their own C channels.

    Two levels (``coarse_factor``, ``None`` for off): the liver is first located by a cheap pass of the same
    network, text-free, on every slice ``coarse_step_mm`` apart, average-pooled ``coarse_factor`` times in plane;
    the text-free pass then runs on the box of that liver grown by the focus margin and ``coarse_margin_mm`` only,
    the liver-centred view training gives the network. Outside it every channel is :data:`OUTSIDE_LOGIT`. When the
    liver found there reaches the box's edge (the coarse pass saw less of it), the box grows and the pass runs
    again; when either pass finds no liver (or the volume has no voxel size), the text-free pass runs on every whole
    slice.
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
        coarse_factor: int | None = None,
        coarse_step_mm: float = 8.0,
        coarse_margin_mm: float = 15.0,
        liver_phase: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if coarse_factor is not None and int(coarse_factor) < 1:
            raise ValueError(f"coarse_factor must be >= 1 or None, got {coarse_factor}.")
        self.coarse_factor = None if coarse_factor is None else int(coarse_factor)
        self.coarse_step_mm = float(coarse_step_mm)
        self.coarse_margin_mm = float(coarse_margin_mm)
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
        self._focus_logit = float(torch.logit(torch.tensor(self.focus_threshold)))
        self.liver_phase = liver_phase
        self.liver_phase_info: dict = {}
        self._last: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._box: tuple[torch.Tensor, tuple[slice, slice, slice] | None] | None = None

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

    @staticmethod
    def _spacing(inputs: torch.Tensor) -> tuple[float, ...] | None:
        """Voxel size in mm per spatial axis from a MetaTensor's affine; ``None`` for a plain tensor."""
        affine = getattr(inputs, "affine", None)
        if affine is None:
            return None
        affine = torch.as_tensor(affine, dtype=torch.float64)
        return tuple(float(s) for s in torch.linalg.norm((affine[0] if affine.ndim == 3 else affine)[:3, :3], dim=0))

    def _margin(self, inputs: torch.Tensor) -> tuple[int, ...]:
        """The box's margin in voxels per axis: ``focus_margin``, or ``focus_margin_mm`` over the voxel size of
        ``inputs`` (a MetaTensor's affine) rounded up, so thin and thick slices get the same margin in mm."""
        spacing = self._spacing(inputs)
        if self.focus_margin_mm is None or spacing is None:
            return self.focus_margin
        return tuple(int(np.ceil(self.focus_margin_mm / s - 1e-6)) for s in spacing)

    def _lesion_slices(self, text_free: torch.Tensor, box: tuple[slice, slice, slice]) -> torch.Tensor | None:
        """The slices (indices along the last axis, ascending) of ``box`` where the all-lesion channel reaches the
        threshold inside it, each with its neighbour on either side (the return to the input grid interpolates
        from them); ``None`` when no voxel does."""
        lesions = text_free[(0, self.lesion_channel, *box)]
        found = (lesions >= self._lesion_logit).flatten(0, 1).any(0)
        if not bool(found.any()):
            return None
        grown = found.clone()
        grown[1:] |= found[:-1]
        grown[:-1] |= found[1:]
        return torch.nonzero(grown).flatten() + box[2].start

    def _coarse_step(self, inputs: torch.Tensor) -> int:
        """Slices between two slices of the coarse pass: ``coarse_step_mm`` over the slice spacing, at least 1."""
        spacing = self._spacing(inputs)
        return 1 if spacing is None else max(1, int(round(self.coarse_step_mm / spacing[2])))

    def _coarse_liver(self, inputs: torch.Tensor, network) -> tuple[slice, slice, slice] | None:
        """Extent of the largest liver component of the coarse pass, in voxels of ``inputs`` (no margin); ``None``
        when it finds no liver. The pass sees every ``step``-th slice (``coarse_step_mm`` apart, with its context
        channels) average-pooled ``coarse_factor`` times in plane."""
        depth = inputs.shape[-1]
        step, factor = self._coarse_step(inputs), int(self.coarse_factor or 1)
        sampled = slice_context(inputs, self.context_slices, step)
        sampled = sampled.as_tensor() if isinstance(sampled, MetaTensor) else sampled
        pooled = F.avg_pool3d(sampled, (factor, factor, 1), ceil_mode=True) if factor > 1 else sampled
        coarse = self._slide(pooled, network)
        extent = liver_box((coarse[0, self.focus_channel] >= self._focus_logit).cpu().numpy(), (0, 0, 0))
        if extent is None:
            return None
        sizes = inputs.shape[-3:]
        return (
            slice(extent[0].start * factor, min(extent[0].stop * factor, sizes[0])),
            slice(extent[1].start * factor, min(extent[1].stop * factor, sizes[1])),
            slice(extent[2].start * step, min((extent[2].stop - 1) * step + 1, depth)),
        )

    def _pass_on_box(self, inputs: torch.Tensor, network, box: tuple[slice, ...], last=None) -> torch.Tensor:
        """The text-free pass on ``box``, ``(1, K, *box sizes)``; ``last = (box, output)`` of a box with the same
        in-plane extent gives its slices (the network reads one slice at a time), so only new slices are run."""
        if last is None or last[0][:2] != box[:2]:
            output = self._slide(self._region_with_context(inputs, box), network)
            return output.as_tensor() if isinstance(output, MetaTensor) else output
        (old, previous), parts = last, []
        if box[2].start < old[2].start:
            parts.append(self._pass_on_box(inputs, network, (*box[:2], slice(box[2].start, old[2].start))))
        parts.append(previous)
        if box[2].stop > old[2].stop:
            parts.append(self._pass_on_box(inputs, network, (*box[:2], slice(old[2].stop, box[2].stop))))
        return torch.cat(parts, dim=-1)

    def _text_free_in_liver_box(self, inputs: torch.Tensor, network) -> torch.Tensor | None:
        """The text-free pass on the coarse liver's box, every other voxel :data:`OUTSIDE_LOGIT`; ``None`` (the
        whole-slice pass is then run) when the voxel size is unknown, or the coarse pass or the pass on its box finds
        no liver. The box is the coarse liver grown by the focus margin, ``coarse_margin_mm`` and the coarse grid's
        own uncertainty (a pooled pixel, a skipped slice); while the liver found in it comes closer to an edge than
        the focus margin, it grows by as much around that liver (at most to the whole volume)."""
        spacing = self._spacing(inputs)
        if spacing is None:
            return None
        extent = self._coarse_liver(inputs, network)
        if extent is None:
            return None
        shape = tuple(inputs.shape[-3:])
        margin = self._margin(inputs)
        slack = tuple(int(np.ceil(self.coarse_margin_mm / s - 1e-6)) for s in spacing)
        uncertainty = (int(self.coarse_factor or 1), int(self.coarse_factor or 1), self._coarse_step(inputs))
        reach = tuple(m + s + u for m, s, u in zip(margin, slack, uncertainty))
        box = grow_box(extent, reach, shape)
        part = self._pass_on_box(inputs, network, box)
        while True:  # the box only grows, up to the whole volume
            liver = liver_box((part[0, self.focus_channel] >= self._focus_logit).cpu().numpy(), (0, 0, 0))
            if liver is None:
                return None
            found = tuple(slice(b.start + e.start, b.start + e.stop) for b, e in zip(box, liver))
            needed = grow_box(found, margin, shape)
            if all(n.start >= b.start and n.stop <= b.stop for n, b in zip(needed, box)):
                break
            grown = grow_box(found, reach, shape)
            grown = tuple(slice(min(b.start, g.start), max(b.stop, g.stop)) for b, g in zip(box, grown))
            box, part = grown, self._pass_on_box(inputs, network, grown, (box, part))
        output = torch.full((1, part.shape[1], *shape), OUTSIDE_LOGIT, dtype=part.dtype, device=part.device)
        output[(slice(None), slice(None), *box)] = part
        if isinstance(inputs, MetaTensor):
            return MetaTensor(output, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return output

    def _text_free_pass(self, inputs: torch.Tensor, network) -> torch.Tensor:
        """One text-free pass: on the coarse liver's box with two levels, else over every whole slice."""
        output = None
        if self.coarse_factor is not None and self.focus_channel is not None:
            output = self._text_free_in_liver_box(inputs, network)
        if output is None:
            output = self._slide(slice_context(inputs, self.context_slices), network)
        return output

    def read_inputs(self, inputs: torch.Tensor, network) -> tuple[torch.Tensor, torch.Tensor]:
        """The text-free pass, ``(1, C, H, W, D) -> (1, K, H, W, D)``, and the inputs the network read: ``inputs``,
        or with ``liver_phase`` and a liver outside the HU it learned, the inputs with that liver moved into them
        (the pass is then run again on those). Reused while the volume and the network's weights (their in-place
        update counters) are the same; what ``liver_phase`` did is in :attr:`liver_phase_info`."""
        weights = (id(network), tuple(p._version for p in network.parameters()))
        last = self._last
        if last is not None and last[0] == weights and last[1].shape == inputs.shape and torch.equal(last[1], inputs):
            return last[2], last[3]
        output, read, self.liver_phase_info = self._text_free_pass(inputs, network), inputs, {}
        if self.liver_phase is not None and self.focus_channel is not None:
            liver = output[0, self.focus_channel] >= self._focus_logit
            adjusted, self.liver_phase_info = self.liver_phase(inputs, liver)
            if adjusted is not None:
                output, read = self._text_free_pass(adjusted, network), adjusted
        self._last = (
            weights,
            inputs.detach(),
            output,
            read,
        )  # kept, not copied: MONAI's transforms do not work in place
        return output, read

    def text_free(self, inputs: torch.Tensor, network) -> torch.Tensor:
        """The text-free pass of :meth:`read_inputs`, ``(1, C, H, W, D) -> (1, K, H, W, D)``."""
        return self.read_inputs(inputs, network)[0]

    def _focus_box(self, inputs: torch.Tensor, text_free: torch.Tensor) -> tuple[slice, slice, slice] | None:
        """The box of the largest liver component of ``text_free`` grown by the focus margin (:func:`liver_box`),
        found once per text-free pass and reused by the further expressions of the volume."""
        if self._box is not None and self._box[0] is text_free:
            return self._box[1]
        liver = (torch.sigmoid(text_free[0, self.focus_channel].float()) >= self.focus_threshold).cpu().numpy()
        box = liver_box(liver, self._margin(inputs))
        self._box = (text_free, box)
        return box

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if self.focus_channel is None:
            return self._slide(slice_context(inputs, self.context_slices), network, *args, **kwargs)
        text_free, inputs = self.read_inputs(inputs, network)
        box = self._focus_box(inputs, text_free)
        output = text_free.clone()
        output[:, 0] = OUTSIDE_LOGIT
        if box is None:
            return output
        if not (args or kwargs):
            output[(slice(None), 0, *box)] = text_free[(slice(None), 0, *box)]
            return output
        if self.lesion_channel is None:
            referred = self._slide(self._region_with_context(inputs, box), network, *args, **kwargs)
            output[(slice(None), 0, *box)] = referred[:, 0]
            return output
        slices = self._lesion_slices(text_free, box)
        if slices is None:
            return output
        span = (box[0], box[1], slice(int(slices[0]), int(slices[-1]) + 1))
        region = self._region_with_context(inputs, span)
        region = (region.as_tensor() if isinstance(region, MetaTensor) else region)[..., slices - span[2].start]
        referred = self._slide(region, network, *args, **kwargs)
        output[0, 0, box[0], box[1], slices] = referred[0, 0]
        return output
