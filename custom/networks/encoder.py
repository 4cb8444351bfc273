"""Vision embedding and the 4-stage language-guided vision encoder (strides 4, 8, 16, 32)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from custom.networks.svla import SVLABlock

__all__ = ["OverlapPatchEmbed", "LanguageGuidedEncoder"]


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: strided convolution then batch norm.

    ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``; the first stage uses two stride-2 convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride == 4:
            self.layers = nn.Sequential(
                nn.Conv2d(in_channels, out_channels // 2, 3, stride=2, padding=1),
                nn.BatchNorm2d(out_channels // 2),
                nn.GELU(),
                nn.Conv2d(out_channels // 2, out_channels, 3, stride=2, padding=1),
                nn.BatchNorm2d(out_channels),
            )
        elif stride == 2:
            self.layers = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.BatchNorm2d(out_channels)
            )
        else:
            raise ValueError(f"stride must be 2 or 4, got {stride}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LanguageGuidedEncoder(nn.Module):
    """Four stages of patch embedding plus SVLA blocks; each stage sees the expression's word features.

    ``image (B, C, H, W), words (B, T, D) | None, word_mask (B, T) | None -> [F1, F2, F3, F4]`` with
    ``Fi (B, embed_dims[i], H / 2**(i+2), W / 2**(i+2))``. H and W must be multiples of 32.
    """

    def __init__(
        self,
        in_channels: int,
        text_dim: int,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 4, 2),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        strip_kernel_sizes: Sequence[int] = (7, 11, 21),
        drop_path_rate: float = 0.1,
        use_multi_kernel: bool = True,
        use_language: bool = True,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(mlp_ratios) == len(num_heads) == 4:
            raise ValueError("embed_dims, depths, mlp_ratios and num_heads must each have 4 entries (one per stage).")
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.embeddings = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            self.embeddings.append(
                OverlapPatchEmbed(in_channels if i == 0 else embed_dims[i - 1], dim, 4 if i == 0 else 2)
            )
            self.stages.append(
                nn.ModuleList(
                    SVLABlock(
                        dim,
                        text_dim,
                        num_heads[i],
                        mlp_ratios[i],
                        strip_kernel_sizes,
                        drop_path=rates[start + j],
                        use_multi_kernel=use_multi_kernel,
                        use_language=use_language,
                    )
                    for j in range(depth)
                )
            )
            self.norms.append(nn.LayerNorm(dim))
            start += depth

    def forward(
        self, image: torch.Tensor, words: torch.Tensor | None = None, word_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        features = []
        x = image
        # the features keep the image's memory layout (channels-last stays channels-last: no copies between stages)
        layout = torch.channels_last if image.is_contiguous(memory_format=torch.channels_last) else None
        for embedding, blocks, norm in zip(self.embeddings, self.stages, self.norms):
            x = embedding(x)
            for block in blocks:
                x = block(x, words, word_mask)
            x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=layout) if layout is not None else x.contiguous()
            features.append(x)
        return features
