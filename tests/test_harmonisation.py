"""What scanners do, undone before the network reads a CT (``custom/harmonisation.py``): on a rendered phantom."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.transforms import Compose, Orientationd, Spacingd
from scipy import ndimage

from custom.data.phantom import render_phantom
from custom.detection.postprocessing import BoxInvertd
from custom.harmonisation import (
    HarmoniseHUd,
    LiverPhaseInfod,
    LiverPhaseNormaliser,
    ThickenSlicesd,
    fat_peak_hu,
)
from custom.transforms import HUWindowd

WINDOWS = [[60, 200], [40, 400]]


@pytest.fixture(scope="module")
def phantom():
    return render_phantom(np.random.default_rng(5))


def harmonise(image: np.ndarray, affine: np.ndarray) -> dict:
    volume = MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    return HarmoniseHUd(keys="image")({"image": volume})


def test_calibrated_phantom_is_left_as_it_is(phantom):
    fat, share = fat_peak_hu(phantom.image.astype(np.float32))
    assert fat is not None and abs(fat + 95.0) < 15.0 and share > 0.1
    out = harmonise(phantom.image, phantom.affine)
    info = out["input_harmonisation"]
    assert info["hu_shift"] == 0.0 and "smoothing_sigma_mm" not in info and info["notes"] == []
    assert np.array_equal(out["image"][0].numpy(), phantom.image.astype(np.float32))


@pytest.mark.parametrize("offset", [60.0, -60.0])
def test_an_hu_offset_is_measured_on_fat_and_removed(phantom, offset):
    body = phantom.image > -500
    shifted = np.where(body, phantom.image + offset, phantom.image).astype(np.float32)
    out = harmonise(shifted, phantom.affine)
    info = out["input_harmonisation"]
    assert abs(info["hu_shift"] + offset) <= 6.0
    restored = out["image"][0].numpy()
    assert np.abs(restored[body] - phantom.image[body]).max() <= 6.0
    assert "fat measures" in info["notes"][0] and "stored values" in info["notes"][0]


def test_no_fat_peak_no_offset():
    ramp = np.linspace(-300.0, 100.0, 40 * 40 * 10, dtype=np.float32).reshape(40, 40, 10)  # soft tissue's flank
    assert fat_peak_hu(ramp)[0] is None
    out = harmonise(ramp, np.eye(4))
    assert out["input_harmonisation"]["hu_shift"] == 0.0 and np.array_equal(out["image"][0].numpy(), ramp)


def test_strong_noise_is_smoothed_down_and_moderate_noise_is_not(phantom):
    rng = np.random.default_rng(0)
    body = phantom.image > -500
    image = phantom.image.astype(np.float32)
    noisy = np.where(body, image + rng.normal(0, 40, image.shape).astype(np.float32), image)
    info = harmonise(noisy, phantom.affine)["input_harmonisation"]
    assert info["noise_hu"] > 30.0 and info["noise_after_hu"] <= 18.0 and info["smoothing_sigma_mm"] > 0
    assert "noisy" in info["notes"][-1]
    mild = np.where(body, image + rng.normal(0, 8, image.shape).astype(np.float32), image)
    assert "smoothing_sigma_mm" not in harmonise(mild, phantom.affine)["input_harmonisation"]


def test_thin_slices_are_read_as_slabs_and_the_answer_returns_to_them():
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    image = MetaTensor(torch.randn(1, 40, 40, 45) * 20.0, affine=torch.as_tensor(affine))
    steps = Compose([Spacingd("image", pixdim=[1.5, 1.5, -1], mode="bilinear"), ThickenSlicesd("image")])
    out = steps({"image": image})
    assert out["image"].shape[-1] in (15, 16) and float(out["image"].pixdim[2]) == pytest.approx(3.0)
    assert out["input_harmonisation"]["slice_mm"] == [1.0, 3.0]
    assert float(out["image"].std()) < 0.6 * float(image.std())  # averaged, not picked
    back = steps.inverse(out)["image"]
    assert back.shape == image.shape and np.allclose(back.affine, affine)
    # the answer's fast return to the input grid (by the affine, its box only) sees the input grid through both
    oriented = Compose([Orientationd("image", axcodes="RAS"), *steps.transforms])({"image": image})["image"]
    grid = BoxInvertd("answer", steps).grid_of(oriented)
    assert grid is not None and grid["shape"] == tuple(image.shape[1:]) and np.allclose(grid["affine"], affine)


def test_slabs_keep_the_hu_of_the_end_slices():
    uniform = MetaTensor(torch.full((1, 8, 8, 30), 100.0), affine=torch.as_tensor(np.diag([1.5, 1.5, 1.0, 1.0])))
    out = ThickenSlicesd("image")({"image": uniform})["image"]
    assert out.shape[-1] < 30 and torch.allclose(out.as_tensor(), torch.tensor(100.0), atol=1e-3)


def test_a_few_thin_slices_are_left_as_they_are():
    three = MetaTensor(torch.randn(1, 8, 8, 3), affine=torch.as_tensor(np.diag([0.8, 0.8, 1.25, 1.0])))
    assert "input_harmonisation" not in ThickenSlicesd("image")({"image": three})


def test_thick_slices_pass_unchanged_and_invert_to_themselves():
    affine = np.diag([0.8, 0.8, 4.0, 1.0])
    image = MetaTensor(torch.randn(1, 40, 40, 12) * 20.0, affine=torch.as_tensor(affine))
    plain = Spacingd("image", pixdim=[1.5, 1.5, -1], mode="bilinear")
    steps = Compose([plain, ThickenSlicesd("image")])
    out = steps({"image": image.clone()})
    assert "input_harmonisation" not in out and len(out["image"].applied_operations) == 1  # nothing recorded
    assert torch.equal(out["image"].as_tensor(), plain({"image": image.clone()})["image"].as_tensor())
    assert steps.inverse(out)["image"].shape == image.shape


def windowed(liver_hu: float, lesion_hu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, 30, 30, 4) windowed inputs: muscle 50 HU, a liver of ``liver_hu`` with a lesion of ``lesion_hu``."""
    hu = torch.full((1, 30, 30, 4), 50.0)
    liver = torch.zeros(30, 30, 4, dtype=torch.bool)
    liver[5:25, 5:25] = True
    hu[0][liver] = liver_hu
    hu[0, 12:16, 12:16] = lesion_hu
    return HUWindowd("image", WINDOWS)({"image": hu})["image"][None], liver


def test_an_unenhanced_liver_is_moved_into_the_learned_range_with_its_lesion_contrast():
    inputs, liver = windowed(50.0, 20.0)
    normaliser = LiverPhaseNormaliser(WINDOWS, hu_range=(65.0, 130.0), target_hu=95.0)
    adjusted, info = normaliser(inputs, liver)
    assert info["liver_hu"] == pytest.approx(50.0, abs=0.5) and info["liver_hu_shift"] == pytest.approx(45.0, abs=0.5)
    wide = -160.0 + adjusted[0, 1] * 400.0
    assert float(wide[20, 20, 0]) == pytest.approx(95.0, abs=0.5)  # the liver
    assert float(wide[13, 13, 0]) == pytest.approx(65.0, abs=0.5)  # its lesion, 30 HU below it as before
    assert float(wide[0, 0, 0]) == pytest.approx(50.0, abs=0.5)  # outside the liver: unchanged
    enhanced, _ = windowed(110.0, 60.0)
    assert normaliser(enhanced, liver)[0] is None


def test_the_record_note_says_what_the_network_read():
    inputs, liver = windowed(50.0, 20.0)

    class Inferer:
        liver_phase = LiverPhaseNormaliser(WINDOWS)
        liver_phase_info = liver_phase(inputs, liver)[1]

    out = LiverPhaseInfod(Inferer())({"input_harmonisation": {"hu_shift": 0.0, "notes": ["earlier"]}})
    info = out["input_harmonisation"]
    assert info["liver_hu_shift"] == pytest.approx(30.0, abs=0.5)
    assert info["notes"][0] == "earlier" and "50 HU" in info["notes"][1]


# ---------------------------------------------------------------------------------------------------- end to end
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "bundle" / "sample" / "sample_case.nii.gz"


def infer(image: Path, out: Path, prompt: str = "the largest hypodense lesion", **overrides) -> dict:
    """The bundle's inference (shipped weights) on ``image``; returns the record."""
    flow = ConfigWorkflow(
        config_file=str(ROOT / "bundle" / "configs" / "inference.json"),
        meta_file=str(ROOT / "bundle" / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(ROOT / "bundle"),
        image=str(image),
        prompt=prompt,
        output_dir=str(out),
        **overrides,
    )
    flow.initialize()
    flow.run()
    flow.finalize()
    (record,) = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    return record


@pytest.fixture(scope="module")
def sample_answer(tmp_path_factory):
    return infer(SAMPLE, tmp_path_factory.mktemp("sample"))


def same_lesion(record: dict, reference: dict) -> bool:
    (answer,), (expected,) = record["lesions"], reference["lesions"]
    near = np.linalg.norm(np.subtract(answer["centroid_ras_mm"], expected["centroid_ras_mm"])) < 5.0
    return near and answer["volume_ml"] == pytest.approx(expected["volume_ml"], rel=0.25)


def test_a_scanner_offset_gets_the_same_answer_and_says_so(sample_answer, tmp_path):
    source = nib.load(SAMPLE)
    image = np.asarray(source.dataobj).astype(np.float32)
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.where(image > -500, image + 60, image).astype(np.int16), source.affine), shifted)
    record = infer(shifted, tmp_path / "out")
    assert sample_answer["found"] and record["found"] and same_lesion(record, sample_answer)
    assert record["input_harmonisation"]["hu_shift"] == pytest.approx(-60.0, abs=6.0)
    assert any("fat measures" in note for note in record["notes"])
    assert "input_harmonisation" not in sample_answer or sample_answer["input_harmonisation"]["hu_shift"] == 0.0


def test_thin_slices_get_the_same_answer_on_their_own_grid(sample_answer, tmp_path):
    source = nib.load(SAMPLE)
    image = np.asarray(source.dataobj).astype(np.float32)
    thickness = float(source.header.get_zooms()[2])
    factor = thickness / 1.25
    thin = ndimage.zoom(image, (1, 1, factor), order=1)
    affine = source.affine.copy()
    affine[:3, 2] /= thin.shape[2] / image.shape[2]
    path = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(thin).astype(np.int16), affine), path)
    record = infer(path, tmp_path / "out")
    assert record["input_harmonisation"]["slice_mm"][1] == 3.0
    assert record["found"] and same_lesion(record, sample_answer)
    (mask,) = (tmp_path / "out").rglob("*_mask.nii.gz")
    assert nib.load(mask).shape == thin.shape


def test_an_unenhanced_liver_is_moved_when_asked_and_the_record_says_so(phantom, tmp_path):
    liver = phantom.liver > 0
    image = phantom.image.astype(np.float32)
    median = float(np.median(image[liver & (phantom.lesions == 0)]))
    unenhanced = np.where(liver, image - (median - 50.0), image)  # the liver and its lesions at 50 HU
    path = tmp_path / "unenhanced.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(unenhanced).astype(np.int16), phantom.affine), path)
    harmonisation = {**json.loads((ROOT / "bundle" / "configs" / "inference.json").read_text())["harmonisation"]}
    record = infer(
        path, tmp_path / "on", "all lesions in the liver", harmonisation={**harmonisation, "liver_phase": True}
    )
    info = record["input_harmonisation"]
    assert info["liver_hu"] < 65.0 and info["liver_hu_shift"] == pytest.approx(80.0 - info["liver_hu"], abs=0.2)
    assert any("the network read the liver and its lesions" in note for note in record["notes"])
    default = infer(path, tmp_path / "off", "all lesions in the liver")  # off by default
    assert "liver_hu_shift" not in default.get("input_harmonisation", {})
