"""Weights saved before the decoder blocks became MONAI ``Convolution`` (the shipped model.pt, earlier checkpoints)
load into the network strictly: every key is consumed and lands in the block it belonged to."""

import pytest
import torch
from monai.networks.blocks import Convolution

from custom.networks import BertTextEncoder, ShippedWeights, lsms_tiny
from custom.networks.weights import SEQUENTIAL_CONV_NORM_ACT_KEYS, STEM_WEIGHT, load_weights

SHIPPED = "bundle/models/model.pt"


@pytest.fixture(scope="module")
def text_encoder():
    return BertTextEncoder()


def sequential_keys(network: torch.nn.Module) -> dict[str, str]:
    """Each state-dict key of ``network`` -> the key its earlier ``nn.Sequential`` decoder blocks gave it (others
    unchanged)."""
    blocks = [f"{name}." for name, module in network.named_modules() if isinstance(module, Convolution)]
    old_of = {new: old for old, new in SEQUENTIAL_CONV_NORM_ACT_KEYS.items()}
    keys = {}
    for key in network.state_dict():
        block = next((prefix for prefix in blocks if key.startswith(prefix)), None)
        keys[key] = key if block is None else block + old_of[key[len(block) :]]
    return keys


def test_sequential_keys_load_strictly_into_the_convolution_blocks(text_encoder, tmp_path):
    torch.manual_seed(0)
    trained = lsms_tiny(text_encoder=text_encoder, detail_channels=8).eval()
    for module in trained.modules():  # batch norm statistics unlike a fresh network's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    state = ShippedWeights(trained).state_dict()
    old_key = sequential_keys(trained)
    old = {old_key[key]: value for key, value in state.items()}
    assert "decoder.merge.0.weight" in old and "detail.fuse.1.running_var" in old and len(old) == len(state)

    torch.manual_seed(1)
    fresh = lsms_tiny(text_encoder=text_encoder, detail_channels=8).eval()
    keys = fresh.load_state_dict(old, strict=True)  # every key consumed, none missing
    assert not keys.missing_keys and not keys.unexpected_keys
    loaded = fresh.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key

    path = tmp_path / "sequential.pt"
    torch.save(old, path)
    torch.manual_seed(2)
    from_file = load_weights(lsms_tiny(text_encoder=text_encoder, detail_channels=8).eval(), path)
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_file(image), trained(image), rtol=0, atol=0)


def test_the_shipped_weights_load_strictly_and_each_lands_where_it_was_saved(text_encoder):
    shipped = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    detail = shipped.get("detail.correction.weight")
    network = lsms_tiny(
        in_channels=shipped[STEM_WEIGHT].shape[1],
        out_channels=len(shipped["head.1.bias"]),
        text_encoder=text_encoder,
        detail_channels=detail.shape[1] if detail is not None else 0,
    ).eval()
    keys = network.load_state_dict(shipped, strict=True)
    assert not keys.missing_keys and not keys.unexpected_keys
    loaded = network.state_dict()
    new_key = {old: new for new, old in sequential_keys(network).items()}
    for key, value in shipped.items():  # saved in either layout
        assert torch.equal(loaded[new_key.get(key, key)], value), key
