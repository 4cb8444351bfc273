"""Reading CT DICOM series and NIfTI inputs: same volume from both, correct HU, named errors for bad inputs."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose, Orientationd
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from custom.clinical.dicom_export import write_ct_series
from custom.clinical.dicom_series import (
    RAS_LABELS,
    ClinicalInputWarning,
    CTSeriesReader,
    LoadClinicalImaged,
    load_clinical_image,
    load_ct_ras,
    ras_mask_to_source_frames,
)
from custom.clinical.errors import (
    ClinicalInputError,
    InvalidGeometryError,
    MissingSliceError,
    MixedSeriesError,
    NoImageError,
    NotCTError,
)

SHAPE = (40, 36, 12)


def synthetic_hu(shape=SHAPE, seed=0) -> np.ndarray:
    """Integer HU volume: soft tissue with noise, air border, a bright and a dark blob (no symmetry)."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(20, 80, size=shape).astype(np.float32)
    volume[:3] = -1000
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    volume[(x - 10) ** 2 + (y - 25) ** 2 + (z - 4) ** 2 < 16] = 1200
    volume[(x - 28) ** 2 + (y - 9) ** 2 + (z - 8) ** 2 < 9] = -40
    return volume


def rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def affine_from(columns: np.ndarray, spacing, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(columns, dtype=float) * np.asarray(spacing, dtype=float)
    affine[:3, 3] = origin
    return affine


# RAS affines of the source grids: DICOM-typical axial (LPS-stored), RAS-stored, feet-first, oblique, coronal.
GEOMETRIES = {
    "axial_lps": affine_from(np.diag([-1, -1, 1]), (0.7, 0.8, 2.5), (120.0, 95.0, -40.0)),
    "axial_ras": affine_from(np.eye(3), (0.75, 0.75, 3.0), (-15.0, -12.0, 10.0)),
    "axial_descending": affine_from(np.diag([-1, -1, -1]), (0.7, 0.7, 2.0), (14.0, 13.0, 30.0)),
    "oblique": affine_from(rotation_z(17.0) @ np.diag([-1, -1, 1]), (0.8, 0.8, 2.5), (10.0, 20.0, 5.0)),
    "coronal": affine_from(np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]]), (0.7, 2.0, 0.7), (12.0, -30.0, 14.0)),
}


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_dicom_series_matches_its_nifti_twin(tmp_path, geometry):
    affine = GEOMETRIES[geometry]
    hu = synthetic_hu()
    write_ct_series(hu, affine, tmp_path / "series", rescale_intercept=-1024.0)
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "twin.nii.gz")
    before = file_digests(tmp_path)

    from_dicom = load_ct_ras(tmp_path / "series")
    from_nifti = load_ct_ras(tmp_path / "twin.nii.gz")

    assert from_dicom.shape == from_nifti.shape == (1, *from_nifti.shape[1:])
    np.testing.assert_array_equal(from_dicom.numpy(), from_nifti.numpy())
    np.testing.assert_allclose(from_dicom.affine.numpy(), from_nifti.affine.numpy(), atol=1e-4)
    assert np.allclose(np.diag(from_dicom.affine.numpy())[:3] > 0, True), "not RAS oriented"
    source_affine = from_dicom.meta["original_affine"]  # slices sorted along the normal: slice axis may flip
    np.testing.assert_allclose(source_affine[:, :2], affine[:, :2], atol=1e-4)
    assert np.allclose(source_affine[:3, 2], affine[:3, 2], atol=1e-4) or np.allclose(
        source_affine[:3, 2], -affine[:3, 2], atol=1e-4
    )
    assert file_digests(tmp_path) == before, "reading modified an input"


def test_slices_are_sorted_by_position_not_by_instance_number_or_file_name(tmp_path):
    hu = synthetic_hu()
    affine = GEOMETRIES["axial_lps"]
    paths = write_ct_series(hu, affine, tmp_path, descending_instance_numbers=True)
    image = load_clinical_image(tmp_path)  # source grid, channel first
    np.testing.assert_array_equal(image[0].numpy(), hu)
    assert image.meta["source_files"] == [str(p) for p in paths]
    assert image.meta["source_instance_numbers"] == list(range(SHAPE[2], 0, -1))


def test_reader_agrees_with_highdicom_volume(tmp_path):
    """An independent reader (highdicom) sees the same HU values at the same places."""
    hu = synthetic_hu()
    write_ct_series(hu, GEOMETRIES["oblique"], tmp_path)
    image = load_clinical_image(tmp_path)
    datasets = [pydicom.dcmread(f) for f in image.meta["source_files"]]
    reference = hd.get_volume_from_series(datasets, dtype=np.float32)  # LPS, highdicom's own slice order
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.meta["original_affine"]
    ours = hd.Volume(
        array=np.transpose(image[0].numpy(), (2, 1, 0)),  # (columns, rows, slices) -> (slices, rows, columns)
        affine=lps_affine[:, [2, 1, 0, 3]],
        coordinate_system="PATIENT",
        frame_of_reference_uid=datasets[0].FrameOfReferenceUID,
    ).match_geometry(reference)
    assert ours.geometry_equal(reference, tol=1e-4)
    np.testing.assert_array_equal(ours.array, reference.array)


def test_pydicom_ct_test_file_has_correct_hu():
    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    expected_hu = apply_modality_lut(dataset.pixel_array, dataset)  # stored * 1 + (-1024)
    image = load_clinical_image(path)
    assert image.shape == (1, 128, 128, 1)
    np.testing.assert_array_equal(image[0, :, :, 0].numpy().T, expected_hu)
    assert float(image.min()) == float(dataset.pixel_array.min()) - 1024
    affine = image.affine.numpy()
    np.testing.assert_allclose(affine[:3, 3], [158.135803, 179.035797, -75.699997], atol=1e-5)  # LPS -> RAS
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), [0.661468, 0.661468, 5.0], atol=1e-6)


def test_load_transform_works_in_a_monai_compose(tmp_path):
    hu = synthetic_hu()
    write_ct_series(hu, GEOMETRIES["axial_lps"], tmp_path / "series")
    pipeline = Compose([LoadClinicalImaged("image"), Orientationd("image", axcodes="RAS", labels=RAS_LABELS)])
    data = pipeline({"image": str(tmp_path / "series"), "prompt": "the bright lesion"})
    np.testing.assert_array_equal(data["image"].numpy(), load_ct_ras(tmp_path / "series").numpy())
    assert data["prompt"] == "the bright lesion"


def test_mask_maps_back_to_source_frames(tmp_path):
    hu = synthetic_hu()
    write_ct_series(hu, GEOMETRIES["axial_descending"], tmp_path)
    image = load_ct_ras(tmp_path)
    frames = ras_mask_to_source_frames(image > 500, image.meta)
    for frame, path in zip(frames, image.meta["source_files"]):
        dataset = pydicom.dcmread(path)
        np.testing.assert_array_equal(frame, apply_modality_lut(dataset.pixel_array, dataset) > 500)


def test_series_uid_selects_one_series(tmp_path):
    write_ct_series(synthetic_hu(seed=1), GEOMETRIES["axial_lps"], tmp_path, series_uid="1.2.3.1")
    write_ct_series(synthetic_hu(seed=2), GEOMETRIES["axial_lps"], tmp_path, series_uid="1.2.3.2")
    image = load_clinical_image(tmp_path, series_uid="1.2.3.2")
    np.testing.assert_array_equal(image[0].numpy(), synthetic_hu(seed=2))
    assert image.meta["SeriesInstanceUID"] == "1.2.3.2"


# ------------------------------------------------------------------------------------------- malformed inputs


def test_mixed_series_lists_uids_and_names_the_option(tmp_path):
    write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path, series_uid="1.2.3.10", series_description="art")
    write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path, series_uid="1.2.3.20", series_description="ven")
    with pytest.raises(MixedSeriesError) as error:
        load_ct_ras(tmp_path)
    message = str(error.value)
    assert "1.2.3.10" in message and "1.2.3.20" in message and "art" in message and "ven" in message
    assert "series_uid" in message
    assert isinstance(error.value, ClinicalInputError) and isinstance(error.value, ValueError)


def test_unknown_series_uid_is_refused(tmp_path):
    write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path, series_uid="1.2.3.10")
    with pytest.raises(NoImageError, match="1.2.3.99"):
        load_ct_ras(tmp_path, series_uid="1.2.3.99")


def test_missing_slice_says_where(tmp_path):
    paths = write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path)
    paths[5].unlink()  # positions -40 + 2.5 k: the gap lies between -30.0 (k=4) and -25.0 (k=6)
    with pytest.raises(MissingSliceError) as error:
        load_ct_ras(tmp_path)
    message = str(error.value)
    assert "-30.00 mm" in message and "-25.00 mm" in message and "1 slice(s) missing" in message
    assert paths[4].name in message and paths[6].name in message


def test_duplicate_positions_are_refused(tmp_path):
    paths = write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path / "a", series_uid="1.2.3.5")
    shutil.copy(paths[3], tmp_path / "a" / "copy_of_slice_3.dcm")
    dataset = pydicom.dcmread(tmp_path / "a" / "copy_of_slice_3.dcm")
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(tmp_path / "a" / "copy_of_slice_3.dcm")
    with pytest.raises(InvalidGeometryError, match="same position"):
        load_ct_ras(tmp_path / "a")


def test_mr_series_is_refused(tmp_path):
    write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path, modality="MR", rescale_intercept=0.0)
    with pytest.raises(NotCTError, match="MR"):
        load_ct_ras(tmp_path)
    with pytest.raises(NotCTError, match="require_ct=False"):
        load_ct_ras(get_testdata_file("MR_small.dcm"))
    assert load_ct_ras(tmp_path, require_ct=False).shape == (1, *SHAPE)


def test_non_image_file_is_refused(tmp_path):
    text = tmp_path / "report.txt"
    text.write_text("not an image")
    with pytest.raises(NoImageError, match="neither a NIfTI file"):
        load_ct_ras(text)
    fake_dicom = tmp_path / "notes.dcm"
    fake_dicom.write_text("not DICOM either")
    with pytest.raises(NoImageError, match="No DICOM image found"):
        load_ct_ras(fake_dicom)
    with pytest.raises(NoImageError, match="does not exist"):
        load_ct_ras(tmp_path / "absent.nii.gz")
    broken_nifti = tmp_path / "broken.nii.gz"
    broken_nifti.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(NoImageError, match="damaged gzip file"):
        load_ct_ras(broken_nifti)
    not_nifti = tmp_path / "notes.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"a gzipped text, not a NIfTI header"))
    with pytest.raises(NoImageError, match="as NIfTI"):
        load_ct_ras(not_nifti)


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "README").write_text("a folder without DICOM images")
    with pytest.raises(NoImageError, match="README"):
        load_ct_ras(tmp_path)


def test_extra_non_image_file_in_folder_is_skipped_with_a_warning(tmp_path):
    hu = synthetic_hu()
    write_ct_series(hu, GEOMETRIES["axial_lps"], tmp_path)
    (tmp_path / "notes.txt").write_text("exported by the PACS")
    with pytest.warns(ClinicalInputWarning, match="notes.txt"):
        image = load_clinical_image(tmp_path)
    np.testing.assert_array_equal(image[0].numpy(), hu)


def test_undecodable_pixel_data_is_a_named_error(tmp_path):
    paths = write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path)
    dataset = pydicom.dcmread(paths[2])
    dataset.PixelData = dataset.PixelData[:100]
    dataset.save_as(paths[2])
    with pytest.raises(NoImageError, match="pixel data"):
        load_ct_ras(tmp_path)


def test_irregular_spacing_warns_but_reads(tmp_path):
    paths = write_ct_series(synthetic_hu(), GEOMETRIES["axial_ras"], tmp_path)
    dataset = pydicom.dcmread(paths[6])
    position = [float(v) for v in dataset.ImagePositionPatient]
    dataset.ImagePositionPatient = [position[0], position[1], position[2] + 0.3]
    dataset.save_as(paths[6])
    with pytest.warns(ClinicalInputWarning, match="Slice spacing varies"):
        image = load_ct_ras(tmp_path)
    assert image.shape == (1, *SHAPE)


def test_reader_keeps_the_image_reader_interface(tmp_path):
    write_ct_series(synthetic_hu(), GEOMETRIES["axial_lps"], tmp_path / "series")
    reader = CTSeriesReader()
    assert reader.verify_suffix(str(tmp_path / "series"))
    assert not reader.verify_suffix(str(tmp_path / "image.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClinicalInputWarning)
        array, meta = reader.get_data(reader.read(str(tmp_path / "series")))
    assert array.shape == SHAPE and array.dtype == np.float32
    assert meta["Modality"] == "CT" and len(meta["source_sop_instance_uids"]) == SHAPE[2]


def test_gzipped_nifti_is_read_once_as_nibabel_reads_it_and_a_wrong_crc_or_length_is_named(tmp_path):
    """The checked reader gives nibabel's scaled array (slope and intercept applied); a stream of two gzip members
    (as bgzip writes) is read whole; a wrong CRC or undecodable data is found when the voxels are read, a file cut
    short before."""
    from monai.data import NibabelReader

    from custom.clinical.dicom_series import CheckedNibabelReader, load_clinical_image
    from custom.clinical.preflight import check_volume_file

    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4) - 1024
    image = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]))
    image.header.set_slope_inter(1.0, -24.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(image, str(path))
    plain, checked = NibabelReader(), CheckedNibabelReader()
    expected = plain.get_data(plain.read(str(path)))[0]
    assert expected.min() == -1048  # scaled as the header says
    read = checked.get_data(checked.read(str(path)))[0]
    assert read.dtype == expected.dtype
    np.testing.assert_array_equal(read, expected)

    raw = gzip.decompress(path.read_bytes())
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    check_volume_file(members, require_ct=False)
    np.testing.assert_array_equal(load_clinical_image(members, require_ct=False)[0].numpy(), expected)

    bad_crc = bytearray(path.read_bytes())
    bad_crc[-8] ^= 0xFF
    (tmp_path / "bad_crc.nii.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(NoImageError, match="damaged gzip file.*CRC"):
        load_clinical_image(tmp_path / "bad_crc.nii.gz", require_ct=False)  # the reader alone finds it
    undecodable = bytearray(gzip.compress(raw))  # a 10-byte header, then the first deflate block's header bits
    undecodable[10] |= 0b110  # block type 3, which deflate reserves: the stream cannot be decoded
    (tmp_path / "undecodable.nii.gz").write_bytes(bytes(undecodable))
    with pytest.raises(NoImageError, match="damaged gzip file"):
        load_clinical_image(tmp_path / "undecodable.nii.gz", require_ct=False)
    (tmp_path / "cut.nii.gz").write_bytes(path.read_bytes()[:-30])
    with pytest.raises(NoImageError, match="damaged gzip file"):
        check_volume_file(tmp_path / "cut.nii.gz", require_ct=False)
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[:-10]))  # an intact stream of a NIfTI cut short
    with pytest.raises(NoImageError, match="cut short"):
        check_volume_file(tmp_path / "short.nii.gz", require_ct=False)


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_whole_number_nifti_keeps_its_type_and_others_are_float32(tmp_path, byte_order):
    """An int16 NIfTI without scaling loads as int16 with its values (in C order, as MONAI lays it out), in either
    byte order; a scaled, a float64 and an int32 one load as float32, and so does the DICOM series of the same HU."""
    from custom.clinical.dicom_series import in_c_order

    hu = synthetic_hu().astype(np.dtype(f"{byte_order}i2"))
    affine = GEOMETRIES["axial_ras"]
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "int16.nii.gz")
    scaled = nib.Nifti1Image(hu, affine)
    scaled.header.set_slope_inter(0.5, -24.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti1Image(hu.astype(np.float64), affine), tmp_path / "float64.nii")
    nib.save(nib.Nifti1Image(hu.astype(np.int32), affine), tmp_path / "int32.nii.gz")
    write_ct_series(hu.astype(np.float32), affine, tmp_path / "series", rescale_intercept=-1024.0)

    whole = load_clinical_image(tmp_path / "int16.nii.gz")
    assert whole.dtype == torch.int16 and whole.is_contiguous()
    np.testing.assert_array_equal(whole[0].numpy(), hu)
    cases = (("scaled.nii.gz", hu * 0.5 - 24.0), ("float64.nii", hu), ("int32.nii.gz", hu), ("series", hu))
    for name, expected in cases:
        image = load_clinical_image(tmp_path / name)
        assert image.dtype == torch.float32, name
        np.testing.assert_array_equal(image[0].numpy(), expected.astype(np.float32))

    fortran = np.asfortranarray(hu)
    read_only = fortran.copy(order="F")
    read_only.flags.writeable = False
    # PyTorch's copy, and numpy's for a type PyTorch does not hold and for a read-only array
    for array in (fortran, fortran.astype(">i2"), read_only):
        ordered = in_c_order(array)
        assert ordered.flags.c_contiguous
        np.testing.assert_array_equal(ordered, hu)
    assert load_clinical_image(tmp_path / "float64.nii").is_contiguous()  # an uncompressed file, through MONAI's read
