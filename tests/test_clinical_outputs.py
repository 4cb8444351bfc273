"""One call per (case, expression): decision, record and files in the input's format and geometry."""

from __future__ import annotations

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import Compose, Orientationd

from custom.clinical.dicom_export import write_ct_series
from custom.clinical.dicom_series import RAS_LABELS, LoadClinicalImaged, load_ct_ras
from custom.clinical.errors import OutputExistsError
from custom.clinical.outputs import ReferringOutputWriter, SaveReferringOutputsd, expression_slug

SHAPE = (48, 40, 12)
AFFINE_LPS = np.array([[-0.7, 0, 0, 110.0], [0, -0.8, 0, 90.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]])


def case_volume() -> np.ndarray:
    hu = np.full(SHAPE, -100.0, dtype=np.float32)
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    hu[((x - 14) / 9.0) ** 2 + ((y - 22) / 7.0) ** 2 + ((z - 6) / 3.0) ** 2 <= 1] = 60.0
    hu[0] = -1000.0  # air at one border, as in any CT
    return hu


def probabilities_like(image, peak: float):
    """Probabilities on the image's grid: ``peak`` inside the lesion (HU > 0), 0.02 elsewhere."""
    probabilities = image.clone()
    probabilities.array = np.where(image.numpy() > 0, peak, 0.02).astype(np.float32)
    return probabilities


def test_nifti_case_found(tmp_path):
    hu = case_volume()
    nib.save(nib.Nifti1Image(hu, AFFINE_LPS), tmp_path / "case_007.nii.gz")
    image = load_ct_ras(tmp_path / "case_007.nii.gz")
    writer = ReferringOutputWriter(
        tmp_path / "out", rule={"min_max_probability": 0.6, "min_volume_ml": 0.2, "voxel_threshold": 0.5}, montage=True
    )
    result = writer(image, probabilities_like(image, 0.9), "the largest lesion in the right lobe")

    paths = result["paths"]
    assert paths["mask"].parent.name == "case_007" and paths["mask"].name.endswith("_mask.nii.gz")
    assert all(path.is_file() for path in paths.values())
    written = nib.load(paths["mask"])
    np.testing.assert_allclose(written.affine, AFFINE_LPS, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj), hu > 0)
    record = json.loads(paths["record"].read_text())
    assert record == result["record"]
    assert record["found"] and record["n_lesions"] == 1 and record["case_id"] == "case_007"
    truth_ml = (hu > 0).sum() * 0.7 * 0.8 * 2.5 / 1000
    assert record["lesions"][0]["volume_ml"] == pytest.approx(truth_ml, abs=1e-3)
    assert record["outputs"]["mask"] == paths["mask"].name

    with pytest.raises(OutputExistsError):  # refused before anything is written
        writer(image, probabilities_like(image, 0.9), "the largest lesion in the right lobe")


def test_the_record_keeps_the_liver_region_and_says_when_no_liver_was_found(tmp_path):
    hu = case_volume()
    nib.save(nib.Nifti1Image(hu, AFFINE_LPS), tmp_path / "case_008.nii.gz")
    image = load_ct_ras(tmp_path / "case_008.nii.gz")
    writer = ReferringOutputWriter(tmp_path / "out")
    region = {"liver_found": True, "liver_volume_ml": 1500.0, "box_voxels": [[1, 30], [2, 35], [0, 12]]}
    found = writer(image, probabilities_like(image, 0.9), "the cyst", region=region)["record"]
    assert found["liver_region"] == region and "notes" not in found
    nothing = probabilities_like(image, 0.0)
    missing = writer(image, nothing, "all lesions", region={"liver_found": False})["record"]
    assert not missing["found"] and missing["liver_region"] == {"liver_found": False}
    assert any(note.startswith("No liver found") for note in missing["notes"])


def test_a_decision_taken_by_the_referral_is_used_instead_of_the_rule_and_kept_with_the_candidates(tmp_path):
    hu = case_volume()
    nib.save(nib.Nifti1Image(hu, AFFINE_LPS), tmp_path / "case_009.nii.gz")
    image = load_ct_ras(tmp_path / "case_009.nii.gz")
    writer = ReferringOutputWriter(tmp_path / "out")  # its rule alone would answer "found" at 0.9
    referral = {"method": "candidate scorer", "none_probability": 0.8, "candidates": [{"candidate": 1, "score": 0.1}]}
    decision = {"found": False, "confidence": 0.8, "features": {"none_probability": 0.8}}
    mask = probabilities_like(image, 1.0)
    result = writer(image, probabilities_like(image, 0.9), "the cyst", mask=mask, decision=decision, referral=referral)
    record = result["record"]
    assert not record["found"] and record["lesions"] == [] and record["confidence"] == 0.8
    assert record["referral"] == referral and record["decision"]["features"] == {"none_probability": 0.8}
    assert not np.asarray(nib.load(result["paths"]["mask"]).dataobj).any()  # the written mask agrees


def test_dicom_case_not_present_gives_an_empty_seg(tmp_path):
    paths = write_ct_series(case_volume(), AFFINE_LPS, tmp_path / "series_a")
    image = load_ct_ras(tmp_path / "series_a")
    writer = ReferringOutputWriter(
        tmp_path / "out", rule={"min_max_probability": 0.6, "min_volume_ml": 0.2, "voxel_threshold": 0.5}
    )
    result = writer(image, probabilities_like(image, 0.55), "a hyperdense lesion in the left lobe")
    record = result["record"]
    assert record["found"] is False and record["lesions"] == [] and record["confidence"] > 0.5
    seg = hd.seg.segread(result["paths"]["mask"])
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    assert not seg.get_pixels_by_source_instance(uids).any()
    assert result["paths"]["overlay"].is_file()


def test_dict_transform_in_a_pipeline_with_a_dicom_series(tmp_path):
    hu = case_volume()
    write_ct_series(hu, AFFINE_LPS, tmp_path / "series_b")
    load = Compose([LoadClinicalImaged("image"), Orientationd("image", axcodes="RAS", labels=RAS_LABELS)])
    data = load({"image": str(tmp_path / "series_b"), "text": "all lesions", "case_id": "patient_b"})
    data["pred"] = probabilities_like(data["image"], 0.95)
    saved = SaveReferringOutputsd(
        tmp_path / "out", rule={"min_max_probability": 0.5, "min_volume_ml": 0.0, "voxel_threshold": 0.5}
    )(data)
    record = saved["record"]
    assert record["found"] and record["case_id"] == "patient_b"
    seg_path = tmp_path / "out" / "patient_b" / f"{expression_slug('all lesions')}_seg.dcm"
    seg = hd.seg.segread(seg_path)
    sources = [pydicom.dcmread(p) for p in data["image"].meta["source_files"]]
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], segment_numbers=[1])[..., 0]
    expected = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) > 0 for ds in sources])
    np.testing.assert_array_equal(pixels, expected)
    numbers = [int(ds.InstanceNumber) for ds, frame in zip(sources, expected) if frame.any()]
    assert record["lesions"][0]["slice_number_range"] == [min(numbers), max(numbers)]


def test_expression_slug_is_a_safe_unique_file_name():
    slug = expression_slug("The largest lesion / in the RIGHT lobe?")
    assert slug.startswith("the_largest_lesion_in_the_right_lobe-") and "/" not in slug
    assert expression_slug("all cysts") != expression_slug("All cysts!")


@pytest.mark.parametrize("failing", ["write_overlay_png", "write_montage"])
def test_a_failure_while_writing_leaves_no_output_and_a_rerun_works(tmp_path, monkeypatch, failing):
    """The outputs of one (case, expression) are one unit: a writer failing halfway leaves none of them."""
    import custom.clinical.outputs as outputs

    nib.save(nib.Nifti1Image(case_volume(), AFFINE_LPS), tmp_path / "case_008.nii.gz")
    image = load_ct_ras(tmp_path / "case_008.nii.gz")
    writer = ReferringOutputWriter(tmp_path / "out", montage=True)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    real = getattr(outputs, failing)
    monkeypatch.setattr(outputs, failing, broken)
    with pytest.raises(OSError, match="disk full"):
        writer(image, probabilities_like(image, 0.9), "all lesions")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    monkeypatch.setattr(outputs, failing, real)
    result = writer(image, probabilities_like(image, 0.9), "all lesions")
    assert all(path.is_file() for path in result["paths"].values())
    assert sorted(p.name for p in result["paths"]["mask"].parent.iterdir()) == sorted(
        p.name for p in result["paths"].values()
    )


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "PIR", "ASL"])
def test_the_writer_sees_the_volume_as_monai_orientation_gives_it_without_a_copy(axcodes):
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from custom.clinical.outputs import _ras_view

    volume = MetaTensor(torch.rand(1, 7, 6, 5), affine=torch.as_tensor(AFFINE_LPS))
    volume = Orientation(axcodes=axcodes, labels=RAS_LABELS)(volume)
    expected = Orientation(axcodes="RAS", labels=RAS_LABELS)(volume)
    view, affine = _ras_view(volume, "image")
    np.testing.assert_array_equal(view, expected[0].numpy())
    np.testing.assert_allclose(affine, expected.affine.numpy(), rtol=0, atol=1e-9)
    assert np.shares_memory(view, volume.numpy())


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "permuted"])
def test_bounding_box_is_the_box_find_objects_gives_in_any_memory_layout(layout):
    from scipy import ndimage

    from custom.clinical.geometry import bounding_box

    rng = np.random.default_rng(0)
    mask = np.zeros((23, 17, 11), bool)
    mask[tuple(rng.integers(0, n, 5) for n in mask.shape)] = True  # five scattered voxels
    array = {
        "C": mask,
        "F": np.asfortranarray(mask),
        "flipped": np.asfortranarray(mask)[::-1, :, ::-1],
        "permuted": mask.transpose(2, 0, 1),
    }[layout]
    assert bounding_box(array) == ndimage.find_objects(array.view(np.uint8))[0]
    assert bounding_box(array.astype(np.uint8)) == ndimage.find_objects(array.astype(np.uint8))[0]
    assert bounding_box(np.zeros_like(array)) is None
    assert bounding_box(np.ones((1, 4, 1), bool)) == (slice(0, 1), slice(0, 4), slice(0, 1))


def test_a_full_disk_is_named_and_nothing_is_published(tmp_path, monkeypatch):
    """A write the file system refuses (ENOSPC) ends as the named OutputWriteError; no output and no staging
    folder is left."""
    import errno

    import custom.clinical.outputs as outputs
    from custom.clinical.errors import OutputWriteError

    nib.save(nib.Nifti1Image(case_volume(), AFFINE_LPS), tmp_path / "case_008.nii.gz")
    image = load_ct_ras(tmp_path / "case_008.nii.gz")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_overlay_png", no_space)
    writer = ReferringOutputWriter(tmp_path / "out", rule={"min_max_probability": 0.6, "min_volume_ml": 0.2})
    with pytest.raises(OutputWriteError, match="No space left on device"):
        writer(image, probabilities_like(image, 0.9), "the largest lesion")
    assert not any((tmp_path / "out").rglob("*")), list((tmp_path / "out").rglob("*"))


def test_staging_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from custom.clinical.outputs import remove_stale_staging

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".lsms-{int(finished.stdout)}-0123456789ab.tmp"
    alive = tmp_path / f".lsms-{os.getppid()}-0123456789ab.tmp"
    other = tmp_path / ".lsms-notes.tmp"
    for folder in (dead, alive, other):
        folder.mkdir()
    assert remove_stale_staging(tmp_path) == [dead]
    assert not dead.exists() and alive.is_dir() and other.is_dir()


def test_a_case_folder_that_is_a_link_is_refused(tmp_path):
    from custom.clinical.errors import ProtectedInputError
    from custom.clinical.outputs import check_case_folder

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ProtectedInputError, match="symbolic link"):
        check_case_folder(tmp_path / "out" / "case")
    check_case_folder(tmp_path / "out" / "new_case")  # a folder still to be made is fine


def test_every_record_names_the_bundle_version_and_the_weights_it_came_from(tmp_path):
    import hashlib

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    nib.save(nib.Nifti1Image(case_volume(), AFFINE_LPS), tmp_path / "case_009.nii.gz")
    image = load_ct_ras(tmp_path / "case_009.nii.gz")
    provenance = {"version": "9.9.9", "weights": str(weights), "referral_scorer": str(tmp_path / "missing.pt")}
    writer = ReferringOutputWriter(tmp_path / "out", rule={"min_max_probability": 0.6}, provenance=provenance)
    record = writer(image, probabilities_like(image, 0.9), "the largest lesion")["record"]
    assert record["bundle"] == {
        "version": "9.9.9",
        "weights": {"file": "model.pt", "sha256": hashlib.sha256(b"weights").hexdigest()},
        "referral_scorer": {"file": "missing.pt", "sha256": None},
    }
