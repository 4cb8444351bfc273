"""Export the bundle's network with its text path to TorchScript.

``python -m monai.bundle ckpt_export`` traces the network with a single random image, so the expression
(``input_ids``, ``attention_mask``) would never be part of the exported graph, and the Hugging Face text encoder
cannot be scripted. This command traces the network with an image *and* a tokenised expression instead, at the
slice size of ``network_data_format`` (the traced graph is valid for that slice size, any batch size and any
expression; pad or resize slices to it), verifies the traced outputs against eager PyTorch, and saves it with
the bundle metadata through MONAI's ``save_net_with_metadata``::

    python -m custom.export --config_file bundle/configs/inference.json \\
        --ckpt_file bundle/models/model.pt --filepath bundle/models/model.ts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import save_net_with_metadata
from monai.networks.utils import convert_to_torchscript

from custom.networks import ShippedWeights

__all__ = ["export_torchscript"]


def export_torchscript(
    config_file: str,
    ckpt_file: str,
    filepath: str,
    meta_file: str | None = None,
    example_text: str = "the largest hypodense lesion in the right lobe",
) -> torch.jit.ScriptModule:
    """Trace ``network_def`` of ``config_file`` with weights from ``ckpt_file`` and save it to ``filepath``."""
    meta_file = meta_file or str(Path(config_file).with_name("metadata.json"))
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    network = parser.get_parsed_content("network_def").eval()
    ShippedWeights(network).load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    if network.text_encoder is not None:
        network.text_encoder.cache_size = 0  # the cache is Python-side state a trace cannot hold
    image_format = parser.get("_meta_#network_data_format#inputs#image")
    height, width = image_format["spatial_shape"]
    image = torch.rand(2, image_format["num_channels"], height, width)
    max_length = parser.get("_meta_#network_data_format#inputs#input_ids#spatial_shape")[0]
    tokens = network.text_encoder.tokenize([example_text], max_length=max_length)
    inputs = [image, tokens["input_ids"], tokens["attention_mask"]]
    traced = convert_to_torchscript(network, inputs=inputs, use_trace=True, verify=True, rtol=1e-4, atol=1e-4)
    Path(filepath).parent.mkdir(parents=True, exist_ok=True)
    save_net_with_metadata(
        traced,
        str(Path(filepath).with_suffix("")),
        ".ts",
        meta_values=parser.get("_meta_"),
        more_extra_files={"inference.json": json.dumps(parser.get()).encode()},
    )
    return traced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", default="bundle/configs/inference.json")
    parser.add_argument("--ckpt_file", default="bundle/models/model.pt")
    parser.add_argument("--filepath", default="bundle/models/model.ts")
    parser.add_argument("--meta_file", default=None)
    args = parser.parse_args()
    export_torchscript(args.config_file, args.ckpt_file, args.filepath, args.meta_file)
    print(f"saved {args.filepath}")


if __name__ == "__main__":
    main()
