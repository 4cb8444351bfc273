"""LSMS: Language-guided Scale-aware MedSegmentor (Ouyang et al., arXiv 2408.17347), 2D slice network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from custom.networks.decoders import DetailHead, FPNDecoder, FullScaleDecoder
from custom.networks.encoder import LanguageGuidedEncoder
from custom.networks.text_encoder import BertTextEncoder
from custom.networks.weights import text_encoder_frozen

__all__ = ["LSMS", "lsms_tiny", "lsms_base", "TINY", "BASE"]

#: Constructor arguments of the CPU default (3-6 M trainable parameters without the text encoder).
TINY = dict(
    embed_dims=(32, 64, 128, 192),
    depths=(2, 2, 3, 2),
    mlp_ratios=(4, 4, 4, 4),
    num_heads=(1, 2, 4, 4),
    decoder_channels=96,
    decoder_heads=4,
    decoder_depth=1,
)
#: Constructor arguments at the paper's scale (SegNeXt-B sized encoder).
BASE = dict(
    embed_dims=(64, 128, 320, 512),
    depths=(3, 3, 12, 3),
    mlp_ratios=(8, 8, 4, 4),
    num_heads=(1, 2, 5, 8),
    decoder_channels=256,
    decoder_heads=8,
    decoder_depth=2,
)


def _frozen_text_encoder_comes_pretrained(module: LSMS, incompatible_keys) -> None:
    """``load_state_dict`` hook: while the text encoder is fully frozen its weights are the pretrained ones it was
    built from, so a checkpoint may leave them out (``ShippedWeights`` does); a strict load does not count them as
    missing. Any other missing, unexpected or mismatched key still fails a strict load."""
    if not text_encoder_frozen(module):
        return
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith("text_encoder.") or ".text_encoder." in k)]


class LSMS(nn.Module):
    """Referring lesion segmentation of a CT slice conditioned on an expression.

    ``forward(image (B, C, H, W), input_ids (B or 1, T) | None, attention_mask (B or 1, T) | None)
    -> logits (B, out_channels, H, W)``. Any H, W (padded internally to a multiple of 32). Text of batch 1 is
    broadcast over the image batch. Without text it segments all lesions (conventional segmentation); a sample
    whose ``attention_mask`` row is all zeros is text-free within a text-conditioned batch.
    Output channel 0 is the referred lesion(s); with ``out_channels=3`` channels 1 and 2 are the text-free liver and
    all-lesion outputs (dense targets, trained on every slice whatever the expression).
    With ``return_embeddings=True`` it returns a dict with ``logits``, ``pixel_embeddings`` (B, E, H/4, W/4),
    ``sentence_embedding`` (B, E) and ``text_present`` (B,) bool (both ``None`` without text) for the contrastive
    loss.

    Args:
        in_channels: image channels (HU windows times 2.5D neighbour slices).
        out_channels: output logit channels: 1 (the referred lesion) or 3 (referred lesion, liver, all lesions).
        embed_dims, depths, mlp_ratios, num_heads: per-stage encoder sizes (4 entries each).
        strip_kernel_sizes: k of the 1xk / kx1 strip convolutions of the multi-kernel branch.
        decoder_channels, decoder_heads, decoder_depth: width, attention heads and transformer depth of the FSD.
        embedding_dim: size of the shared pixel / sentence space of the contrastive loss.
        text_model_path: BERT-family encoder folder or hub name; ``None`` takes the packaged MiniLM-L6.
        freeze_text: keep the text encoder frozen; ``text_trainable_layers`` top layers are still fine-tuned.
        use_multi_kernel: ablation switch of the SVLA multi-kernel branch.
        use_language: ablation switch of the SVLA language branch (off: conventional segmentation network).
        decoder: ``"fsd"`` (Full-Scale Decoder) or ``"fpn"`` (plain FPN-style decoder, ablation).
        drop_path_rate: stochastic depth of the encoder.
        text_encoder: an already built text encoder to use instead of building one from ``text_model_path``.
        detail_channels: width of the stride-2 detail head (:class:`DetailHead`) that refines the logits from the
            image itself; 0 leaves it out (the stride-4 logits are upsampled as they are).
        channels_last: keep the convolution weights and the feature maps in channels-last (NHWC) memory layout.
            The encoder is mostly depthwise and strip convolutions, which CPUs run much faster in NHWC; outputs equal
            those of the NCHW layout within float tolerance, and checkpoints load into either.
    """

    pad_multiple = 32

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        embed_dims: Sequence[int] = TINY["embed_dims"],
        depths: Sequence[int] = TINY["depths"],
        mlp_ratios: Sequence[float] = TINY["mlp_ratios"],
        num_heads: Sequence[int] = TINY["num_heads"],
        strip_kernel_sizes: Sequence[int] = (7, 11, 21),
        decoder_channels: int = TINY["decoder_channels"],
        decoder_heads: int = TINY["decoder_heads"],
        decoder_depth: int = TINY["decoder_depth"],
        embedding_dim: int = 64,
        text_model_path: str | None = None,
        freeze_text: bool = True,
        text_trainable_layers: int = 0,
        use_multi_kernel: bool = True,
        use_language: bool = True,
        decoder: str = "fsd",
        drop_path_rate: float = 0.1,
        text_encoder: nn.Module | None = None,
        detail_channels: int = 0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if decoder not in ("fsd", "fpn"):
            raise ValueError(f"decoder must be 'fsd' or 'fpn', got {decoder!r}.")
        self.use_language = use_language
        self.text_encoder = (
            (text_encoder or BertTextEncoder(text_model_path, freeze_text, text_trainable_layers))
            if use_language
            else None
        )
        text_dim = self.text_encoder.hidden_size if self.text_encoder is not None else 1
        self.encoder = LanguageGuidedEncoder(
            in_channels,
            text_dim,
            embed_dims,
            depths,
            mlp_ratios,
            num_heads,
            strip_kernel_sizes,
            drop_path_rate,
            use_multi_kernel,
            use_language,
        )
        self.decoder = (
            FullScaleDecoder(embed_dims, decoder_channels, decoder_heads, decoder_depth)
            if decoder == "fsd"
            else FPNDecoder(embed_dims, decoder_channels)
        )
        self.head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(decoder_channels, out_channels, 1))
        self.detail = (
            DetailHead(in_channels, decoder_channels, out_channels, detail_channels) if detail_channels else None
        )
        self.pixel_projection = nn.Conv2d(decoder_channels, embedding_dim, 1)
        self.sentence_projection = nn.Linear(text_dim, embedding_dim) if use_language else None
        self.register_load_state_dict_post_hook(_frozen_text_encoder_comes_pretrained)
        self.channels_last = channels_last
        if channels_last:  # 4D weights only (nn.Module.to leaves the others); kept by .to(device) and loading
            self.to(memory_format=torch.channels_last)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Word features (B, T, D), word mask (B, T) and sentence features (B, D), text batch 1 broadcast to B."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape[0] not in (1, batch_size):
            raise ValueError(
                f"The text batch ({input_ids.shape[0]}) must be 1 or equal to the image batch ({batch_size})."
            )
        words, sentence = self.text_encoder(input_ids.long(), attention_mask.long())
        word_mask = attention_mask.bool()
        if words.shape[0] != batch_size:
            words, sentence = words.expand(batch_size, -1, -1), sentence.expand(batch_size, -1)
            word_mask = word_mask.expand(batch_size, -1)
        return words, word_mask, sentence

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_embeddings: bool = False,
    ):
        height, width = image.shape[-2:]
        padded = _pad_to_multiple(image, self.pad_multiple)
        if self.channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        words = word_mask = sentence = None
        if self.use_language and input_ids is not None:
            words, word_mask, sentence = self.encode_text(input_ids, attention_mask, image.shape[0])
        decoded = self.decoder(self.encoder(padded, words, word_mask))
        # the few output channels are upsampled in NCHW: bilinear upsampling of a 3-channel map is about 3x slower
        # in channels-last on CPU
        logits = F.interpolate(
            self.head(decoded).contiguous(), size=padded.shape[-2:], mode="bilinear", align_corners=False
        )
        if self.detail is not None:
            logits = logits + self.detail(padded, decoded)
        logits = logits[..., :height, :width].contiguous()
        if not return_embeddings:
            return logits
        pixel_embeddings = self.pixel_projection(decoded)[..., : -(-height // 4), : -(-width // 4)].contiguous()
        sentence_embedding = self.sentence_projection(sentence) if sentence is not None else None
        text_present = word_mask.any(1) if word_mask is not None else None
        return {
            "logits": logits,
            "pixel_embeddings": pixel_embeddings,
            "sentence_embedding": sentence_embedding,
            "text_present": text_present,
        }


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right of ``(B, C, H, W)`` so H and W are multiples of ``multiple``."""
    pad_h = -image.shape[-2] % multiple
    pad_w = -image.shape[-1] % multiple
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    return image


def lsms_tiny(**overrides) -> LSMS:
    """LSMS at the CPU-friendly size (the shipped weights). Any constructor argument can be overridden."""
    return LSMS(**{**TINY, **overrides})


def lsms_base(**overrides) -> LSMS:
    """LSMS at the paper's scale. Any constructor argument can be overridden."""
    return LSMS(**{**BASE, **overrides})
