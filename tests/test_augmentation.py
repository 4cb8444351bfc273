"""Scanner augmentation in training: the random contrast phase and the training config's HU chain."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom.augmentation import RandContrastPhased

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "bundle" / "configs" / "train.json"


def slice_sample(shape=(40, 40)):
    """A (1, H, W) HU slice: body 40 HU, liver 100 HU with a 150 HU vessel and a 50 HU lesion; dense label."""
    image = np.full(shape, -1000.0, np.float32)
    image[2:-2, 2:-2] = 40.0
    liver = np.zeros(shape, bool)
    liver[5:35, 5:35] = True
    image[liver] = 100.0
    vessel = np.zeros(shape, bool)
    vessel[24:29, 24:29] = True
    image[vessel] = 150.0
    lesion = np.zeros(shape, bool)
    lesion[8:14, 8:14] = True
    image[lesion] = 50.0
    label = np.stack([lesion, liver, lesion]).astype(np.float32)
    return {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label)}, liver, lesion, vessel


def test_random_phase_moves_the_liver_and_keeps_the_lesion_contrast():
    sample, liver, lesion, vessel = slice_sample()
    transform = RandContrastPhased(
        keys="image", liver_hu_range=(50.0, 60.0), vessel_offset_range=(-20.0, -10.0), prob=1
    )
    transform.set_random_state(0)
    out = transform(sample)["image"][0].numpy()
    before = sample["image"][0].numpy()
    parenchyma = liver & ~lesion & ~vessel
    moved = float(np.median(out[parenchyma]))
    assert 50.0 <= moved <= 60.0
    assert out[lesion].mean() - moved == pytest.approx(-50.0, abs=1e-3)  # 50 HU below the liver, as before
    core = np.zeros_like(vessel)
    core[25:28, 25:28] = True
    assert out[core].mean() < moved  # unenhanced-like: vessels darker than the liver
    assert np.array_equal(out[~liver], before[~liver])


def test_random_phase_leaves_slices_without_liver_and_prob_zero_alone():
    sample, _, _, _ = slice_sample()
    never = RandContrastPhased(keys="image", prob=0.0)
    assert torch.equal(never(sample)["image"], sample["image"])
    empty = dict(sample, label=torch.zeros_like(sample["label"]))
    always = RandContrastPhased(keys="image", prob=1.0)
    assert torch.equal(always(empty)["image"], sample["image"])


def test_training_config_augments_in_hounsfield_units_before_windowing():
    config = json.loads(TRAIN.read_text())
    names = [t["_target_"] for t in config["train"]["random_transforms"]]
    window = names.index("custom.transforms.HUWindowd")
    for augmentation in (
        "custom.augmentation.RandContrastPhased",
        "RandShiftIntensityd",
        "RandGaussianNoised",
        "RandGaussianSmoothd",
        "RandGaussianSharpend",
    ):
        assert names.index(augmentation) < window, augmentation
    assert all(t["_target_"] != "custom.transforms.HUWindowd" for t in config["volume_transforms"])


@pytest.mark.parametrize("augment", [True, False])
def test_training_samples_are_windowed_and_augment_switches_off(augment):
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["augment"] = augment
    probabilities = parser.get_parsed_content("scanner_augmentation")
    chosen = {k: v for k, v in probabilities.items() if k.endswith("_prob")}
    assert len(chosen) == 6 and all((v > 0) == augment for v in chosen.values())
    windowing = parser.get_parsed_content("train#random_transforms")
    hu_chain = [t for t in windowing if type(t).__name__ in {"RandShiftIntensityd", "HUWindowd"}]
    sample = {"image": torch.full((1, 16, 16), 60.0), "label": torch.zeros(3, 16, 16)}
    for transform in hu_chain:
        sample = transform(sample)
    assert sample["image"].shape == (2, 16, 16) and 0.0 <= float(sample["image"].min()) <= 1.0
