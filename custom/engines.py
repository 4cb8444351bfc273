"""Engine helpers: how a referring batch reaches the network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor, list_data_collate
from monai.engines import PrepareBatchExtraInput
from monai.utils import TraceKeys
from torch.utils.data import default_collate
from torch.utils.data._utils import collate as torch_collate

__all__ = ["ReferringPrepareBatch", "collate_without_copy"]


def _tensor_view(batch: Sequence[torch.Tensor], *, collate_fn_map=None) -> torch.Tensor:
    return batch[0].unsqueeze(0)


def _meta_tensor_view(batch: Sequence[MetaTensor], *, collate_fn_map=None) -> MetaTensor:
    """``collate_meta_tensor_fn`` of a batch of one, its stacking a view (``unsqueeze``) instead of a copy."""
    item = batch[0]
    collated = MetaTensor(item.as_tensor().unsqueeze(0))
    collated.meta = default_collate([item.meta or TraceKeys.NONE])
    collated.applied_operations = [item.applied_operations or TraceKeys.NONE]
    collated.is_batch = True
    collated.spatial_ndim = min(item.spatial_ndim, max(collated.ndim - 1, 1))
    return collated


def collate_without_copy(batch: Sequence) -> Any:
    """MONAI's ``list_data_collate``, except that a batch of one item shares its tensors' memory (a batch dimension
    added as a view) instead of copying them: a whole CT volume is not duplicated on its way to the workflow.
    Batches of several items are collated by ``list_data_collate``."""
    if len(batch) != 1 or isinstance(batch[0], list):
        return list_data_collate(batch)
    views = {
        **torch_collate.default_collate_fn_map,
        MetaTensor: _meta_tensor_view,
        torch.Tensor: _tensor_view,
    }
    return torch_collate.collate(batch, collate_fn_map=views)


class ReferringPrepareBatch(PrepareBatchExtraInput):
    """Pass the tokenised expression of a batch to the network as keyword tensors, plus fixed keyword arguments.

    ``batch["image"], batch["label"]`` become the network input and target; ``input_ids`` and ``attention_mask``
    (B, T) are passed as keywords when the batch has them (a text-free batch reaches the network as image only);
    ``text_keys={}`` withholds the text (the "no text" control of the evaluation).
    ``network_kwargs`` (e.g. ``{"return_embeddings": true}`` for the contrastive loss) are added to every call.
    """

    def __init__(
        self,
        text_keys: Mapping[str, str] | None = None,
        network_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        default_keys = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
        super().__init__(dict(default_keys if text_keys is None else text_keys))
        self.network_kwargs = dict(network_kwargs or {})

    def __call__(self, batchdata: dict[str, torch.Tensor], device=None, non_blocking: bool = False, **kwargs):
        present = {k: v for k, v in self.extra_keys.items() if v in batchdata}
        image, label, args, text = PrepareBatchExtraInput(present)(batchdata, device, non_blocking, **kwargs)
        return image, label, args, {**text, **self.network_kwargs}
