"""Output-layer initialisation for sparse foreground (small lesions cover well under 1% of a slice)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_output_bias"]


def init_output_bias(network: nn.Module, foreground_prior: float = 0.01, out_channels: int = 1) -> nn.Module:
    """Set the bias of the network's output convolution so that sigmoid(logit) starts at ``foreground_prior``.

    With logits starting near 0 every pixel begins at probability 0.5, and an Adam-type optimiser moves a bias by
    about one learning rate per step, so hundreds of steps go to learning "mostly background" before lesions are
    learned (the prior initialisation of Lin et al., Focal Loss, 2017). The output convolution is the last
    registered ``nn.Conv*`` / ``nn.ConvTranspose*`` with a bias and ``out_channels`` outputs (LSMS ``head``,
    the last layer of MONAI ``UNet`` / ``BasicUNet``); a ``DistributedDataParallel`` wrapper is looked through.
    Returns ``network``.
    """
    if not 0.0 < foreground_prior < 1.0:
        raise ValueError(f"foreground_prior must be in (0, 1), got {foreground_prior}.")
    module = network.module if hasattr(network, "module") else network
    convolutions = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None and m.out_channels == out_channels
    ]
    if not convolutions:
        raise ValueError(f"{type(module).__name__} has no convolution with a bias and {out_channels} output channels.")
    with torch.no_grad():
        convolutions[-1].bias.fill_(math.log(foreground_prior / (1.0 - foreground_prior)))
    return network
