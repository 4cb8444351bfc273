"""LSMS network components."""

from custom.networks.decoders import CrossScaleAttention, FPNDecoder, FullScaleDecoder, PositionAlignment
from custom.networks.encoder import LanguageGuidedEncoder, OverlapPatchEmbed
from custom.networks.initialization import init_output_bias
from custom.networks.lsms import BASE, LSMS, TINY, lsms_base, lsms_tiny
from custom.networks.svla import SVLA, MultiKernelAttention, PixelWordAttention, SVLABlock
from custom.networks.text_encoder import BertTextEncoder
from custom.networks.weights import ShippedWeights

__all__ = [
    "BASE",
    "SVLA",
    "TINY",
    "BertTextEncoder",
    "CrossScaleAttention",
    "FPNDecoder",
    "FullScaleDecoder",
    "LSMS",
    "LanguageGuidedEncoder",
    "MultiKernelAttention",
    "OverlapPatchEmbed",
    "PixelWordAttention",
    "PositionAlignment",
    "SVLABlock",
    "ShippedWeights",
    "init_output_bias",
    "lsms_base",
    "lsms_tiny",
]
