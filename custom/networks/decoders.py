"""Decoders from the encoder's features F1..F4 to stride-4 features (the Full-Scale Decoder and a plain FPN), and
a stride-2 detail head that corrects the output logits from the image itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from custom.networks.weights import rename_sequential_conv_norm_act_keys

__all__ = [
    "conv_norm_act",
    "PositionAlignment",
    "CrossScaleAttention",
    "FullScaleDecoder",
    "FPNDecoder",
    "DetailHead",
    "pre_norm_encoder_layer",
]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1) -> Convolution:
    """MONAI ``Convolution``: 2D convolution without bias, batch norm, ReLU; ``(B, C_in, H, W) -> (B, C_out,
    H / stride, W / stride)``. It also loads weights saved with this block's earlier ``nn.Sequential`` layout
    (:func:`custom.networks.weights.rename_sequential_conv_norm_act_keys`)."""
    block = Convolution(
        2,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=kernel_size,
        act=("relu", {"inplace": True}),
        norm="batch",
        bias=False,
    )
    block.register_load_state_dict_pre_hook(rename_sequential_conv_norm_act_keys)
    return block


class PositionAlignment(nn.Module):
    """Bring F1..F4 to one spatial size, each through its own projection so the scales keep their identity.

    ``[Fi (B, C_i, H_i, W_i)] , size -> [Pi (B, D, *size)]``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList(conv_norm_act(c, channels) for c in in_channels)

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
        aligned = []
        for projection, feature in zip(self.projections, features):
            projected = projection(feature)
            if tuple(projected.shape[-2:]) != tuple(size):
                projected = F.interpolate(projected, size=tuple(size), mode="bilinear", align_corners=False)
            aligned.append(projected)
        return aligned


def pre_norm_encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a norm-first ``nn.TransformerEncoderLayer`` without masks, ``x (B, N, C) -> (B, N, C)``, its
    self-attention computed from the layer's own weights by ``F.scaled_dot_product_attention``.

    Why not ``layer(x)``: in inference it takes PyTorch's fast path, which runs the attention as batched matrix
    products and a softmax; on a CPU that was 18% of the whole network's time at batch 32, where the fused kernel of
    ``scaled_dot_product_attention`` (what ``layer(x)`` uses in training) is several times faster. Same result
    within float tolerance (test).
    """
    attention = layer.self_attn
    b, n, c = x.shape
    heads = attention.num_heads
    qkv = F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, C / heads)
    attended = F.scaled_dot_product_attention(q, k, v, dropout_p=attention.dropout if layer.training else 0.0)
    x = x + layer.dropout1(attention.out_proj(attended.transpose(1, 2).reshape(b, n, c)))
    return x + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(x))))))


class CrossScaleAttention(nn.Module):
    """Global modelling across scales: self-attention over the tokens of several aligned maps together.

    Each map gets a learned scale embedding and a depthwise-convolution position encoding before its tokens are
    concatenated. ``[Pi (B, D, h, w)] -> [Pi' (B, D, h, w)]`` (residual).
    """

    def __init__(self, channels: int, num_scales: int, num_heads: int, depth: int = 1, mlp_ratio: float = 2.0):
        super().__init__()
        self.scale_embedding = nn.Parameter(torch.zeros(num_scales, channels))
        self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                channels,
                num_heads,
                int(channels * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(channels)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        b, c, h, w = maps[0].shape
        tokens = [
            (m + self.position(m)).flatten(2).transpose(1, 2) + self.scale_embedding[i] for i, m in enumerate(maps)
        ]
        x = torch.cat(tokens, dim=1)
        for block in self.blocks:
            x = pre_norm_encoder_layer(block, x)
        x = self.norm(x)
        chunks = x.split(h * w, dim=1)
        return [m + chunk.transpose(1, 2).reshape(b, c, h, w) for m, chunk in zip(maps, chunks)]


class FullScaleDecoder(nn.Module):
    """Full-Scale Decoder (FSD).

    Position Alignment projects F1..F4 per scale; P2..P4 meet at the stride of F3 for global cross-scale
    attention (a token budget that stays small at 480 px), are fused there, brought to the stride of F1 and
    merged with P1. ``[F1..F4] -> (B, D, H / 4, W / 4)``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 128, num_heads: int = 4, depth: int = 1) -> None:
        super().__init__()
        self.align_fine = PositionAlignment(in_channels[:1], channels)
        self.align_coarse = PositionAlignment(in_channels[1:], channels)
        self.cross_scale = CrossScaleAttention(channels, len(in_channels) - 1, num_heads, depth)
        self.fuse_coarse = conv_norm_act(channels * (len(in_channels) - 1), channels)
        self.merge = conv_norm_act(2 * channels, channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fine_size = features[0].shape[-2:]
        (p1,) = self.align_fine(features[:1], fine_size)
        coarse = self.cross_scale(self.align_coarse(features[1:], features[2].shape[-2:]))
        global_context = self.fuse_coarse(torch.cat(coarse, dim=1))
        # merge(cat([p1, upsample(g)])) with its 1x1 convolution split in two: the part that reads the global
        # context runs before the upsampling (a 1x1 convolution and bilinear upsampling commute), so neither the
        # upsampled context nor the concatenation is built at stride 4. Same function, same weights.
        conv, channels = self.merge.conv, p1.shape[1]
        merged = F.conv2d(p1, conv.weight[:, :channels], conv.bias) + F.interpolate(
            F.conv2d(global_context, conv.weight[:, channels:]), size=fine_size, mode="bilinear", align_corners=False
        )
        return self.merge.adn(merged)  # its norm and activation


class FPNDecoder(nn.Module):
    """Plain FPN-style decoder (ablation of FSD): lateral 1x1, top-down upsample-and-add, 3x3 smoothing.

    ``[F1..F4] -> (B, D, H / 4, W / 4)``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 128) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(conv_norm_act(c, channels) for c in in_channels)
        self.smooth = conv_norm_act(channels, channels, kernel_size=3)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False)
        return self.smooth(x)


class DetailHead(nn.Module):
    """A stride-2 correction of the upsampled stride-4 logits, from shallow features of the image itself.

    ``image (B, C, H, W), decoded (B, D, H / 4, W / 4) -> correction (B, K, H, W)`` (H, W multiples of 4), to be added
    to the logits upsampled to (H, W). A lesion a few pixels across covers about one stride-4 feature: this head sees
    it at stride 2 (two 3x3 convolutions of the image) beside the decoded context (projected, then upsampled). The
    correction's last convolution starts at zero, so a network given this head starts with the outputs it had
    without it (its other weights load unchanged).
    """

    def __init__(self, in_channels: int, decoded_channels: int, out_channels: int, channels: int = 16) -> None:
        super().__init__()
        self.image_features = nn.Sequential(
            conv_norm_act(in_channels, channels, kernel_size=3, stride=2),
            conv_norm_act(channels, channels, kernel_size=3),
        )
        self.context = conv_norm_act(decoded_channels, channels)
        self.fuse = conv_norm_act(2 * channels, channels)
        self.correction = nn.Conv2d(channels, out_channels, 1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, image: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        fine = self.image_features(image)
        context = F.interpolate(self.context(decoded), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        correction = self.correction(self.fuse(torch.cat([fine, context], dim=1))).contiguous()
        return F.interpolate(correction, size=image.shape[-2:], mode="bilinear", align_corners=False)
