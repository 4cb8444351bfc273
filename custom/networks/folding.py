"""Fold the batch norms and layer scales of a trained LSMS into its convolutions, for inference.

In evaluation mode a batch norm is an affine map per channel and a layer scale a product per channel, so each can
be merged into the convolution next to it: the network computes the same function (within float rounding) with
fewer passes over its feature maps. A folded network is for inference only: its ``state_dict`` no longer matches
the checkpoints, and training it would train a different parametrisation.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from custom.networks.encoder import OverlapPatchEmbed
from custom.networks.svla import SVLABlock

__all__ = ["fold_batch_norms", "fold_norm_into_next_conv", "fold_scale_into_conv"]


def _batch_norm_affine(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` (C,) of an evaluation-mode batch norm: ``norm(x) = scale * x + shift`` per channel."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def fold_norm_into_next_conv(norm: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1 convolution computing ``conv(norm(x))``: the batch norm before it folded into its weights."""
    if conv.kernel_size != (1, 1) or conv.groups != 1 or conv.stride != (1, 1) or conv.padding != (0, 0):
        raise ValueError("only a 1x1 convolution without groups, stride or padding absorbs the batch norm before it")
    scale, shift = _batch_norm_affine(norm)
    weight = conv.weight.detach()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True).to(weight.device, weight.dtype)
    bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(conv.out_channels)
    fused.weight.data = (weight * scale.detach()[None, :, None, None]).to(memory_format=_layout(conv.weight))
    fused.bias.data = bias + weight[:, :, 0, 0] @ shift.detach()
    return fused


def fold_scale_into_conv(conv: nn.Conv2d, scale: torch.Tensor) -> nn.Conv2d:
    """A convolution computing ``scale * conv(x)`` for a per-channel ``scale`` (C, 1, 1)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    factor = scale.detach().flatten()
    fused.weight.data = (conv.weight.detach() * factor[:, None, None, None]).to(memory_format=_layout(conv.weight))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(factor)
    fused.bias.data = bias * factor
    return fused


def _layout(weight: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _fuse_after(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    fused = fuse_conv_bn_eval(conv, norm)
    fused.weight.data = fused.weight.data.to(memory_format=_layout(conv.weight))
    return fused


def _norm_right_after_conv(block: Convolution) -> bool:
    """Whether a MONAI ``Convolution`` block applies a 2D batch norm directly after its convolution (``adn`` ordering
    starting with the norm; a ``conv_only`` block has no ``adn``)."""
    adn = getattr(block, "adn", None)
    return (
        adn is not None and next(iter(adn.named_children()), ("", None))[0] == "N" and isinstance(adn.N, nn.BatchNorm2d)
    )


@torch.no_grad()
def fold_batch_norms(network: nn.Module) -> nn.Module:
    """Fold, in place, every batch norm of ``network`` (LSMS encoder and decoders) into the convolution before or
    after it, and every SVLA block's layer scales into the convolution that ends its branch; return ``network``
    in evaluation mode. Idempotent."""
    network.eval()
    for module in network.modules():
        if isinstance(module, OverlapPatchEmbed):
            layers, folded = list(module.layers), []
            for layer in layers:
                if isinstance(layer, nn.BatchNorm2d) and folded and isinstance(folded[-1], nn.Conv2d):
                    folded[-1] = _fuse_after(folded[-1], layer)
                else:
                    folded.append(layer)
            module.layers = nn.Sequential(*folded)
        elif isinstance(module, Convolution) and _norm_right_after_conv(module):
            module.conv, module.adn.N = _fuse_after(module.conv, module.adn.N), nn.Identity()
        elif isinstance(module, SVLABlock) and isinstance(module.norm1, nn.BatchNorm2d):
            attention, feed_forward = module.attention, module.feed_forward.layers
            attention.proj_in[0] = fold_norm_into_next_conv(module.norm1, attention.proj_in[0])
            feed_forward[0] = fold_norm_into_next_conv(module.norm2, feed_forward[0])
            attention.proj_out = fold_scale_into_conv(attention.proj_out, module.scale1)
            feed_forward[4] = fold_scale_into_conv(feed_forward[4], module.scale2)
            module.norm1, module.norm2 = nn.Identity(), nn.Identity()
            module.register_parameter("scale1", None)
            module.register_parameter("scale2", None)
    return network
