"""LSMS network components."""

from custom.networks.decoders import FPNDecoder, FullScaleDecoder, PositionAlignment, CrossScaleAttention
from custom.networks.initialization import init_output_bias
from custom.networks.encoder import LanguageGuidedEncoder, OverlapPatchEmbed
from custom.networks.lsms import BASE, LSMS, TINY, lsms_base, lsms_tiny
from custom.networks.svla import SVLA, MultiKernelAttention, PixelWordAttention, SVLABlock
from custom.networks.text_encoder import BertTextEncoder
from custom.networks.weights import ShippedWeights
