"""The weights a bundle ships: the network's state dict without a frozen pretrained text encoder."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from custom.errors import InputError

__all__ = [
    "ShippedWeights",
    "CheckpointError",
    "check_checkpoint",
    "load_weights",
    "read_weights",
    "text_encoder_frozen",
]

TEXT_ENCODER_PREFIX = "text_encoder."


def text_encoder_frozen(network: nn.Module) -> bool:
    """Whether ``network`` has a text encoder none of whose weights train (they are its pretrained ones)."""
    encoder = getattr(network, "text_encoder", None)
    return encoder is not None and not any(p.requires_grad for p in encoder.parameters())


class ShippedWeights:
    """State-dict view of an LSMS network for ``CheckpointSaver`` / ``CheckpointLoader``.

    While the text encoder is fully frozen its weights are those of its pretrained package, so they are left out
    of the file (``bundle/models/model.pt`` stays small); the network's own ``load_state_dict`` accepts such a file
    (so MONAI's ``ckpt_export`` and any plain ``load_state_dict`` do too). Loading is exact for every key the file
    holds: an unexpected key, a shape mismatch or another missing key raises :class:`CheckpointError`.
    A ``DistributedDataParallel`` wrapper is looked through.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network.module if hasattr(network, "module") else network

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.network.state_dict()
        if text_encoder_frozen(self.network):
            state = {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
        return state

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        try:
            self.network.load_state_dict(state_dict, strict=strict)
        except RuntimeError as err:
            raise CheckpointError(
                f"The checkpoint does not match the network: {str(err).splitlines()[0]} ... Check that the "
                "network_def arguments (variant, windows, context slices, ablation switches) are the ones the "
                "checkpoint was trained with."
            ) from err


class CheckpointError(InputError, ValueError):
    """A weights file that is missing or is not a PyTorch state dict."""


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of tensors in the weights file at ``path`` (read with ``weights_only=True``: no code runs; a
    training state's ``model`` entry is taken), else :class:`CheckpointError` naming the problem and the fix."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(
            f"The checkpoint '{path}' does not exist. Pass the model.pt of a training run with --checkpoint, or leave "
            "it out to use the bundle's shipped weights."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"The checkpoint '{path}' is not a PyTorch weights file ({type(err).__name__}). Pass the model.pt that "
            "training wrote (runs/<run>/models/model.pt) or the bundle's models/model.pt."
        ) from err
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(
            f"The checkpoint '{path}' holds no network weights (a state dict of tensors). Pass the model.pt that "
            "training wrote or the bundle's models/model.pt."
        )
    return dict(state)


def check_checkpoint(path: str | os.PathLike) -> str:
    """Return ``path`` if it holds a state dict of tensors (:func:`read_weights`), else raise
    :class:`CheckpointError` naming the problem and the fix."""
    read_weights(path)
    return str(path)


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights file at ``path`` (:func:`read_weights`) into ``network`` through :class:`ShippedWeights`;
    returns ``network``."""
    ShippedWeights(network).load_state_dict(read_weights(path))
    return network
