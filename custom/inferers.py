"""Slice-by-slice inference of the 2D referring network over a 3D volume."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SliceInferer

__all__ = ["ReferringSliceInferer"]


class ReferringSliceInferer(SliceInferer):
    """MONAI ``SliceInferer`` that hands the expression's keyword tensors to the network for every slice batch.

    MONAI 1.6.1's ``SliceInferer.__call__`` drops the ``*args``/``**kwargs`` it documents, so the text would never
    reach the network; here they are bound to the network before sliding. ``input_ids``/``attention_mask`` of
    batch 1 are broadcast by the network over each batch of slices.

    ``inputs (1, C, H, W, D)`` with ``spatial_dim=2`` -> ``(1, out_channels, H, W, D)``. ``roi_size=(-1, -1)``
    infers whole slices.
    """

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if not (args or kwargs):
            return super().__call__(inputs, network)
        return super().__call__(inputs, lambda slices: network(slices, *args, **kwargs))
