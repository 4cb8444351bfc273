"""Engine helpers: how a referring batch reaches the network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import PrepareBatchExtraInput

__all__ = ["ReferringPrepareBatch"]


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
