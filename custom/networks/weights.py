"""The weights a bundle ships: the network's state dict without a frozen pretrained text encoder."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from custom.errors import InputError

__all__ = [
    "ShippedWeights",
    "CheckpointError",
    "check_checkpoint",
    "load_weights",
    "read_weights",
    "rename_sequential_conv_norm_act_keys",
    "text_encoder_frozen",
    "widen_input_channels",
]

TEXT_ENCODER_PREFIX = "text_encoder."
#: The first convolution of the encoder's stem, the only weight that reads the input channels.
STEM_WEIGHT = "encoder.embeddings.0.layers.0.weight"

#: Keys of a decoder block (convolution, batch norm, ReLU) in weights saved while it was an ``nn.Sequential`` (the
#: shipped ``bundle/models/model.pt`` and checkpoints of earlier training runs) -> its keys as MONAI ``Convolution``.
SEQUENTIAL_CONV_NORM_ACT_KEYS = {
    "0.weight": "conv.weight",
    "1.weight": "adn.N.weight",
    "1.bias": "adn.N.bias",
    "1.running_mean": "adn.N.running_mean",
    "1.running_var": "adn.N.running_var",
    "1.num_batches_tracked": "adn.N.num_batches_tracked",
}

logger = logging.getLogger(__name__)


def rename_sequential_conv_norm_act_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of a decoder block (:func:`custom.networks.decoders.conv_norm_act`): renames the
    block's keys in ``state_dict`` from its earlier ``nn.Sequential`` layout (:data:`SEQUENTIAL_CONV_NORM_ACT_KEYS`),
    in place, before the block loads them. Every way of loading goes through it (``load_state_dict`` of the network,
    :class:`ShippedWeights`, MONAI's ``CheckpointLoader``), so old and new weights load alike, strictly."""
    for old, new in SEQUENTIAL_CONV_NORM_ACT_KEYS.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


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

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load ``state_dict`` into the network; returns its missing and unexpected keys (``strict=False``)."""
        try:
            return self.network.load_state_dict(state_dict, strict=strict)
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


def load_weights(network: nn.Module, path: str | os.PathLike, may_lack: Sequence[str] = ()) -> nn.Module:
    """Load the weights file at ``path`` (:func:`read_weights`) into ``network`` through :class:`ShippedWeights`;
    returns ``network``.

    ``may_lack``: names of submodules (e.g. ``"detail"``, a detail head added to earlier weights) the file may leave
    out; they keep their initialisation (logged). Any other missing key, an unexpected key or a shape mismatch
    raises :class:`CheckpointError`.
    """
    keys = ShippedWeights(network).load_state_dict(read_weights(path), strict=not may_lack)
    prefixes = tuple(f"{name}." for name in may_lack)
    missing = [k for k in keys.missing_keys if not k.startswith(prefixes)]
    if missing or keys.unexpected_keys:
        raise CheckpointError(
            f"The checkpoint '{path}' does not match the network: missing {missing[:3]}, unexpected "
            f"{list(keys.unexpected_keys)[:3]} ... Check that the network_def arguments (variant, windows, context "
            "slices, ablation switches) are the ones the checkpoint was trained with."
        )
    fresh = sorted({k.split(".")[0] for k in keys.missing_keys} & set(may_lack))
    if fresh:
        logger.info("%s has no weights for %s: they start from their initialisation.", path, ", ".join(fresh))
    return network


def widen_input_channels(
    state: Mapping[str, torch.Tensor], windows: tuple[int, int], context_slices: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``state`` for a network with more input channels: more HU windows and/or more neighbouring slices.

    ``windows`` and ``context_slices`` are ``(from, to)`` pairs. Input channel ``w * K + k`` is window ``w`` of slice
    ``k`` of the ``K = 2 * context_slices + 1`` (``HUWindowd`` after ``ReferringSlicesd``); the old windows are the
    first ones of the new list and the old slices the middle ones. The stem keeps its weights for the old channels
    and gets zeros for the new ones, so the widened network starts with the outputs of the original one whatever
    the new channels hold. ``(O, W0 * K0, kh, kw) -> (O, W1 * K1, kh, kw)``; the other weights are unchanged.
    """
    (w0, w1), (c0, c1) = windows, context_slices
    k0, k1 = 2 * c0 + 1, 2 * c1 + 1
    stem = state[STEM_WEIGHT]
    if w1 < w0 or c1 < c0 or stem.shape[1] != w0 * k0:
        raise CheckpointError(
            f"Cannot widen a stem of {stem.shape[1]} input channels from {w0} windows and {c0} context slices to "
            f"{w1} windows and {c1} context slices: give the weights' own windows and context slices first, and at "
            "least as many after."
        )
    widened = stem.new_zeros(stem.shape[0], w1 * k1, *stem.shape[2:])
    offset = c1 - c0
    for w in range(w0):
        widened[:, w * k1 + offset : w * k1 + offset + k0] = stem[:, w * k0 : (w + 1) * k0]
    return {**state, STEM_WEIGHT: widened}
