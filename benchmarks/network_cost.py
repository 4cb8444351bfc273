"""Parameters and FLOPs per slice of LSMS variants next to MONAI 2D UNet and SwinUNETR.

Usage: ``python -m benchmarks.network_cost [--sizes 256 480]`` from the repository root.
FLOPs come from ``torch.utils.flop_counter``
(one multiply-add counts as 2 FLOPs) for one slice of one channel; LSMS is counted with an expression of 16
tokens, text encoder included, and its trainable parameters exclude the frozen text encoder.
"""

from __future__ import annotations

import argparse

import torch
from monai.networks.nets import SwinUNETR, UNet
from torch.utils.flop_counter import FlopCounterMode

from custom.networks import BertTextEncoder, lsms_base, lsms_tiny


def count_flops(net: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of one forward pass of ``net`` in eval mode without gradients."""
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(*args, **kwargs)
    return counter.get_total_flops()


def parameters(net: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad), sum(p.numel() for p in net.parameters())


def build_models(text_encoder: BertTextEncoder) -> dict[str, torch.nn.Module]:
    return {
        "lsms_tiny": lsms_tiny(text_encoder=text_encoder),
        "lsms_base": lsms_base(text_encoder=text_encoder),
        "UNet 2D (16-256, 2 res units)": UNet(2, 1, 1, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2),
        "SwinUNETR 2D (feature 48)": SwinUNETR(1, 1, feature_size=48, spatial_dims=2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 480])
    args = parser.parse_args()
    text_encoder = BertTextEncoder()
    tokens = text_encoder.tokenize(["the largest hypodense lesion in the right lobe"], max_length=16)
    rows = []
    for name, net in build_models(text_encoder).items():
        trainable, total = parameters(net)
        text = tokens if name.startswith("lsms") else {}
        flops = [count_flops(net, torch.rand(1, 1, size, size), **text) for size in args.sizes]
        rows.append((name, trainable, total, flops))
    header = (
        "| model | trainable params (M) | total params (M) | "
        + " | ".join(f"GFLOPs/slice @{s}x{s}" for s in args.sizes)
        + " |"
    )
    print(header)
    print("|" + "---|" * (3 + len(args.sizes)))
    for name, trainable, total, flops in rows:
        cells = " | ".join(f"{f / 1e9:.2f}" for f in flops)
        print(f"| {name} | {trainable / 1e6:.2f} | {total / 1e6:.2f} | {cells} |")


if __name__ == "__main__":
    main()
