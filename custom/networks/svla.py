"""Scale-aware Vision-Language Attention (SVLA) and the encoder block that holds it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

__all__ = ["MultiKernelAttention", "PixelWordAttention", "SVLA", "SVLABlock", "ConvFeedForward"]


class MultiKernelAttention(nn.Module):
    """Visual attention over several receptive fields: depthwise 5x5, then strip convolutions 1xk / kx1 per k.

    ``(B, C, H, W) -> (B, C, H, W)`` attention map (un-normalised weights that modulate the features).
    """

    def __init__(self, channels: int, strip_kernel_sizes: Sequence[int] = (7, 11, 21)) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.strips = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, (1, k), padding=(0, k // 2), groups=channels),
                nn.Conv2d(channels, channels, (k, 1), padding=(k // 2, 0), groups=channels),
            )
            for k in strip_kernel_sizes
        )
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)
        summed = local + self.strips[0](local) if len(self.strips) else local
        for strip in self.strips[1:]:
            summed += strip(local)  # accumulated in place: one feature map fewer written and read per branch
        return self.project(summed)


class PixelWordAttention(nn.Module):
    """Each pixel attends over the word features of its expression; padding tokens are masked out.

    ``x (B, C, H, W), words (B, T, D), word_mask (B, T) -> (B, C, H, W)`` language-aligned features.
    """

    def __init__(self, channels: int, text_dim: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, kdim=text_dim, vdim=text_dim, batch_first=True)

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        queries = self.norm(x.flatten(2).transpose(1, 2))
        if self.training:
            aligned, _ = self.attention(queries, words, words, key_padding_mask=~word_mask.bool(), need_weights=False)
        else:
            aligned = self._fused_attention(queries, words, word_mask.bool())
        return aligned.transpose(1, 2).reshape(b, c, h, w)

    def _fused_attention(self, queries: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``self.attention(queries, words, words, key_padding_mask=~word_mask)`` from the module's own weights by
        ``F.scaled_dot_product_attention``, ``(B, N, C) -> (B, N, C)``: in inference ``nn.MultiheadAttention``
        copies the pixel queries into sequence-first layout and back, a pass over stride-4 features per block that
        the fused kernel does not need. Same result within float tolerance (test)."""
        attention = self.attention
        b, n, c = queries.shape
        heads = attention.num_heads
        if attention._qkv_same_embed_dim:  # text features as wide as the pixels': one packed projection
            weights = attention.in_proj_weight.chunk(3)
        else:
            weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None,) * 3
        q = F.linear(queries, weights[0], biases[0]).view(b, n, heads, c // heads).transpose(1, 2)
        k = F.linear(words, weights[1], biases[1]).view(b, -1, heads, c // heads).transpose(1, 2)
        v = F.linear(words, weights[2], biases[2]).view(b, -1, heads, c // heads).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=word_mask[:, None, None, :])
        return attention.out_proj(attended.transpose(1, 2).reshape(b, n, c))


class SVLA(nn.Module):
    """Multi-kernel visual attention in parallel with pixel-to-word attention, fused by modulation.

    The visual branch gives an attention map ``a`` over several receptive fields; the language branch gives
    language-aligned features ``l`` passed through a learned tanh gate. The visual map modulates both the
    visual features and the gated language features: ``out = a * u + a * gate(l) * l``, computed as
    ``a * (u + gate(l) * l)``.

    ``x (B, C, H, W), words (B, T, D) | None, word_mask (B, T) | None -> (B, C, H, W)``.
    Without words (or with ``use_language=False``) it is plain multi-kernel attention; so is a sample of the batch
    whose ``word_mask`` row is all False (a text-free sample among text-conditioned ones).
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        num_heads: int,
        strip_kernel_sizes: Sequence[int] = (7, 11, 21),
        use_multi_kernel: bool = True,
        use_language: bool = True,
    ) -> None:
        super().__init__()
        self.proj_in = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU())
        self.visual = MultiKernelAttention(channels, strip_kernel_sizes) if use_multi_kernel else None
        self.language = PixelWordAttention(channels, text_dim, num_heads) if use_language else None
        self.language_gate = (
            nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1), nn.Tanh())
            if use_language
            else None
        )
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: torch.Tensor, words: torch.Tensor | None = None, word_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        u = self.proj_in(x)
        modulated = u
        if self.language is not None and words is not None:
            if word_mask is None:
                word_mask = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device)
            has_text = word_mask.bool().any(1)  # (B,): a sample whose word mask is all False has no text
            # every sample keeps at least one key so attention stays finite; text-free samples drop the result
            aligned = self.language(u, words, word_mask.bool() | ~has_text[:, None])
            gate = self.language_gate(aligned) * has_text[:, None, None, None].to(aligned.dtype)
            modulated = u + gate * aligned
        return self.proj_out(self.visual(u) * modulated if self.visual is not None else modulated)


class ConvFeedForward(nn.Module):
    """1x1 expand, depthwise 3x3, GELU, 1x1 project. ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.layers = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(hidden, channels, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SVLABlock(nn.Module):
    """Encoder block: pre-norm SVLA and pre-norm feed-forward, each residual with layer scale and drop path.

    ``x (B, C, H, W), words (B, T, D) | None, word_mask (B, T) | None -> (B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        strip_kernel_sizes: Sequence[int] = (7, 11, 21),
        drop_path: float = 0.0,
        layer_scale: float = 1e-2,
        use_multi_kernel: bool = True,
        use_language: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.attention = SVLA(channels, text_dim, num_heads, strip_kernel_sizes, use_multi_kernel, use_language)
        self.norm2 = nn.BatchNorm2d(channels)
        self.feed_forward = ConvFeedForward(channels, mlp_ratio)
        self.scale1 = nn.Parameter(layer_scale * torch.ones(channels, 1, 1))
        self.scale2 = nn.Parameter(layer_scale * torch.ones(channels, 1, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, words: torch.Tensor | None = None, word_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.drop_path(_scaled(self.scale1, self.attention(self.norm1(x), words, word_mask)))
        return x + self.drop_path(_scaled(self.scale2, self.feed_forward(self.norm2(x))))


def _scaled(scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``scale * x``; ``x`` itself once the scale is folded into the branch's last convolution (``scale`` None)."""
    return x if scale is None else scale * x
