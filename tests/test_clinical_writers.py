"""Outputs: NIfTI mask in the input geometry, DICOM-SEG re-read by highdicom, JSON, PNG; atomic, no silent overwrite."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFont

from custom.clinical.dicom_export import write_ct_series
from custom.clinical.dicom_series import load_ct_ras, ras_mask_to_source_frames, read_source_datasets
from custom.clinical.errors import GeometryMismatchError, OutputExistsError, ProtectedInputError
from custom.clinical.measurements import build_record
from custom.clinical.writers import (
    OVERLAY_COLOR,
    atomic_write,
    caption_lines,
    inset_field,
    key_slice_index,
    montage_layout,
    montage_slices,
    radiological_view,
    write_dicom_seg,
    write_json_record,
    write_montage,
    write_nifti_mask,
    write_overlay_png,
)

SHAPE = (48, 40, 12)


def case_volume(shape=SHAPE) -> np.ndarray:
    """HU volume: -100 background, two lesions at 60 HU (a large and a small one), asymmetric."""
    hu = np.full(shape, -100.0, dtype=np.float32)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    hu[((x - 14) / 7.0) ** 2 + ((y - 22) / 5.0) ** 2 + ((z - 6) / 3.0) ** 2 <= 1] = 60.0
    hu[((x - 36) / 3.0) ** 2 + ((y - 10) / 3.0) ** 2 + ((z - 3) / 1.5) ** 2 <= 1] = 60.0
    return hu


def lps_affine(spacing=(0.7, 0.8, 2.5), origin=(110.0, 90.0, -20.0)) -> np.ndarray:
    """RAS affine of a grid stored LPS (as DICOM-derived NIfTI often is)."""
    return np.array(
        [[-spacing[0], 0, 0, origin[0]], [0, -spacing[1], 0, origin[1]], [0, 0, spacing[2], origin[2]], [0, 0, 0, 1.0]]
    )


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("storage", ["lps", "permuted"])
def test_nifti_mask_has_the_input_geometry(tmp_path, storage):
    hu, affine = case_volume(), lps_affine()
    if storage == "permuted":  # axes stored as (z, x, y)
        hu, affine = np.transpose(hu, (2, 0, 1)), affine[:, [2, 0, 1, 3]]
    source = tmp_path / "case.nii.gz"
    image = nib.Nifti1Image(hu, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, source)
    before = digest(source)

    ras = load_ct_ras(source)
    assert not np.allclose(ras.affine.numpy(), affine)  # the pipeline grid differs from the input grid
    out = write_nifti_mask(ras > 0, source, tmp_path / "out" / "case_mask.nii.gz")

    written = nib.load(out)
    assert written.shape == hu.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_zooms(), nib.load(source).header.get_zooms(), atol=1e-6)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), (hu > 0).astype(np.uint8))
    assert digest(source) == before
    assert leftovers(tmp_path / "out") == []


def test_nifti_mask_from_affine_and_shape(tmp_path):
    hu, affine = case_volume(), lps_affine()
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "case.nii.gz")
    ras = load_ct_ras(tmp_path / "case.nii.gz")
    out = write_nifti_mask(ras > 0, (affine, hu.shape), tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), hu > 0)


def test_nifti_mask_on_another_grid_is_refused(tmp_path):
    hu, affine = case_volume(), lps_affine()
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "case.nii.gz")
    ras = load_ct_ras(tmp_path / "case.nii.gz")
    with pytest.raises(GeometryMismatchError, match="Invertd|resampling"):
        write_nifti_mask(ras[:, :-2] > 0, tmp_path / "case.nii.gz", tmp_path / "cropped.nii.gz")
    shifted = np.array(ras.affine.numpy())
    shifted[0, 3] += 5.0
    with pytest.raises(GeometryMismatchError, match="affine"):
        write_nifti_mask(ras.numpy() > 0, tmp_path / "case.nii.gz", tmp_path / "shifted.nii.gz", mask_affine=shifted)
    assert not (tmp_path / "cropped.nii.gz").exists() and not (tmp_path / "shifted.nii.gz").exists()


# --------------------------------------------------------------------------------------------------- overwrite


def test_existing_output_is_not_overwritten_silently(tmp_path):
    hu, affine = case_volume(), lps_affine()
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "case.nii.gz")
    ras = load_ct_ras(tmp_path / "case.nii.gz")
    out = write_nifti_mask(ras > 0, tmp_path / "case.nii.gz", tmp_path / "mask.nii.gz")
    first = digest(out)
    with pytest.raises(OutputExistsError) as error:
        write_nifti_mask(ras > 50, tmp_path / "case.nii.gz", out)
    assert str(out) in str(error.value) and "overwrite=True" in str(error.value)
    assert digest(out) == first
    write_nifti_mask(ras > 1000, tmp_path / "case.nii.gz", out, overwrite=True)
    assert np.asarray(nib.load(out).dataobj).sum() == 0
    assert leftovers(tmp_path) == []


def test_input_file_is_never_an_output(tmp_path):
    hu, affine = case_volume(), lps_affine()
    source = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), source)
    before = digest(source)
    ras = load_ct_ras(source)
    with pytest.raises(ProtectedInputError, match="input file"):
        write_nifti_mask(ras > 0, source, source, overwrite=True)
    assert digest(source) == before


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    def broken_writer(path):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "record.json", broken_writer)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "record.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(tmp_path / "record.json", broken_writer, overwrite=True)
    assert (tmp_path / "record.json").read_text() == "{}" and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------- DICOM-SEG


@pytest.fixture()
def dicom_case(tmp_path):
    hu = case_volume()
    affine = lps_affine()
    affine[:3, 2] *= -1  # slices written head to feet, so the position sort reverses them
    paths = write_ct_series(hu, affine, tmp_path / "series")
    return tmp_path, hu, paths


def test_dicom_seg_round_trip_with_highdicom(dicom_case):
    tmp_path, hu, paths = dicom_case
    before = folder_digests(tmp_path / "series")
    image = load_ct_ras(tmp_path / "series")
    mask_ras = image > 0
    frames = ras_mask_to_source_frames(mask_ras, image.meta)
    out = write_dicom_seg(
        frames,
        read_source_datasets(image.meta),  # headers of the source images, in the order of the frames
        tmp_path / "out" / "seg.dcm",
        description="the largest hypodense lesion in the right lobe",
    )

    seg = hd.seg.segread(out)
    sources = [pydicom.dcmread(p) for p in paths]
    source_uids = {ds.SOPInstanceUID for ds in sources}
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert {uid for _, _, uid in seg.get_source_image_uids()} == source_uids
    assert int(seg.NumberOfFrames) == int((hu > 0).any(axis=(0, 1)).sum())  # empty frames omitted
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "LSMS"
    assert seg.SeriesDescription == "the largest hypodense lesion in the right lobe"

    # per source instance: the frames hold exactly the lesion pixels of that CT image
    uids = [ds.SOPInstanceUID for ds in sources]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0]
    expected = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) > 0 for ds in sources])
    np.testing.assert_array_equal(pixels, expected)

    # geometry: the segmentation volume lies on the source series' grid (highdicom's own geometry)
    source_volume = hd.get_volume_from_series(sources)
    seg_volume = seg.get_volume().match_geometry(source_volume)
    assert seg_volume.geometry_equal(source_volume, tol=1e-4)
    np.testing.assert_array_equal(seg_volume.array[..., 0] > 0, source_volume.array > 0)
    assert folder_digests(tmp_path / "series") == before


def test_empty_dicom_seg_is_valid(dicom_case):
    tmp_path, hu, paths = dicom_case
    frames = np.zeros((len(paths), hu.shape[1], hu.shape[0]), dtype=np.uint8)
    out = write_dicom_seg(frames, paths, tmp_path / "empty_seg.dcm")
    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == len(paths)
    assert not seg.get_pixels_by_source_instance([str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]).any()


def test_dicom_seg_refuses_wrong_shape_overwrite_and_inputs(dicom_case):
    tmp_path, hu, paths = dicom_case
    frames = np.zeros((len(paths), hu.shape[1], hu.shape[0]), dtype=np.uint8)
    with pytest.raises(GeometryMismatchError, match="ras_mask_to_source_frames"):
        write_dicom_seg(np.transpose(frames, (0, 2, 1)), paths, tmp_path / "seg.dcm")
    write_dicom_seg(frames, paths, tmp_path / "seg.dcm")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_dicom_seg(frames, paths, tmp_path / "seg.dcm")
    before = digest(paths[0])
    with pytest.raises(ProtectedInputError):
        write_dicom_seg(frames, paths, paths[0], overwrite=True)
    assert digest(paths[0]) == before


# --------------------------------------------------------------------------------------------------- JSON, PNG


def test_json_record_round_trip(tmp_path):
    hu, affine = case_volume(), lps_affine()
    record = build_record("all lesions", hu > 0, hu, affine)
    out = write_json_record(record, tmp_path / "record.json")
    assert json.loads(out.read_text(encoding="utf-8")) == record
    with pytest.raises(OutputExistsError):
        write_json_record(record, out)
    with pytest.raises(ValueError):
        write_json_record({"confidence": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists() and leftovers(tmp_path) == []


def test_radiological_view_puts_patient_right_left_and_anterior_up():
    slice_ras = np.zeros((5, 4))
    slice_ras[4, 3] = 1  # largest x (patient's right), largest y (anterior)
    slice_ras[0, 0] = 2  # patient's left, posterior
    view = radiological_view(slice_ras)
    assert view.shape == (4, 5)
    assert view[0, 0] == 1 and view[-1, -1] == 2


def test_overlay_png_shows_the_key_slice_in_radiological_view(tmp_path):
    shape = (40, 40, 10)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])  # RAS grid
    hu = np.full(shape, 40.0)
    mask = np.zeros(shape, dtype=bool)
    mask[28:36, 28:36, 6] = True  # patient's right, anterior: largest area on slice 6
    mask[28:30, 28:30, 2:6] = True
    out = tmp_path / "overlay.png"
    index = write_overlay_png(hu, mask, out, title="the lesion in the right anterior liver", affine=affine)
    assert index == key_slice_index(mask) == 6
    with Image.open(out) as png:
        picture = np.asarray(png.convert("RGB")).astype(int)
    assert min(picture.shape[:2]) >= 256
    is_lesion = (np.abs(picture - OVERLAY_COLOR).sum(axis=2) < 30) | (
        (picture[..., 0] > picture[..., 1] + 40) & (picture[..., 0] > picture[..., 2] + 40)
    )
    rows, cols = np.nonzero(is_lesion)
    height, width = picture.shape[:2]
    assert rows.size > 0
    assert cols.max() < width / 2 and rows.max() < height / 2 + 20  # top-left quadrant (below the title bar)
    with pytest.raises(OutputExistsError):
        write_overlay_png(hu, mask, out)


def test_montage_covers_the_mask_slices(tmp_path):
    hu = case_volume()
    mask = hu > 0
    indices = write_montage(
        hu, mask, tmp_path / "montage.png", title="all lesions", count=6, columns=3, affine=lps_affine()
    )
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    assert len(indices) == 6 and indices[0] == present[0] and indices[-1] == present[-1]
    with Image.open(tmp_path / "montage.png") as png:
        assert png.size[0] >= 3 * 192


def test_overlay_title_wraps_instead_of_being_cut(tmp_path):
    shape = (40, 40, 4)
    hu, mask = np.full(shape, 40.0), np.zeros(shape, dtype=bool)
    mask[10:20, 10:20, 1] = True
    short, long = tmp_path / "short.png", tmp_path / "long.png"
    write_overlay_png(hu, mask, short, title="a lesion")
    write_overlay_png(hu, mask, long, title="the largest hypodense lesion in the right lobe: found, 4 lesion(s), " * 3)
    with Image.open(short) as a, Image.open(long) as b:
        assert a.size[0] == b.size[0]
        assert b.size[1] - a.size[1] >= 2 * 12  # extra title lines, none dropped


def lesion_pixels(picture: np.ndarray) -> np.ndarray:
    """Where an RGB picture shows the answer's fill or outline (red well above green and blue)."""
    picture = picture.astype(int)
    return (picture[..., 0] > picture[..., 1] + 40) & (picture[..., 0] > picture[..., 2] + 40)


def test_overlay_is_readable_and_names_its_slice(tmp_path):
    hu, mask = case_volume(), case_volume() > 0
    out = tmp_path / "overlay.png"
    index = write_overlay_png(hu, mask, out, title="a lesion", affine=lps_affine())
    with Image.open(out) as png:
        assert max(png.size) >= 512
        assert png.text["Slice"] == f"slice {index} of {SHAPE[2]}"
        assert png.text["Title"] == "a lesion"


def test_overlay_slice_is_named_in_the_input_and_its_numbers(tmp_path):
    hu, mask = case_volume(), case_volume() > 0
    stored_downwards = np.diag([1.0, 1.0, -2.5, 1.0])  # the input stores its slices from superior to inferior
    ras = stored_downwards @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1.0]])
    out = tmp_path / "overlay.png"
    numbers = [100 + k for k in range(SHAPE[2])]
    index = write_overlay_png(
        hu, mask, out, affine=ras, source_affine=stored_downwards, slice_numbers=numbers, slice_index=2
    )
    with Image.open(out) as png:
        assert index == 2 and png.text["Slice"] == f"slice {SHAPE[2] - 3} of {SHAPE[2]}, number {97 + SHAPE[2]}"


def test_a_small_answer_gets_a_zoomed_inset(tmp_path):
    shape = (200, 200, 3)
    hu, mask = np.full(shape, 40.0), np.zeros(shape, dtype=bool)
    mask[150:154, 150:154, 1] = True  # 4 of 200 voxels, patient's right and anterior: top left of the view
    small = tmp_path / "small.png"
    write_overlay_png(hu, mask, small, title="a small lesion")
    with Image.open(small) as png:
        picture, text = np.asarray(png.convert("RGB"))[-512:], png.text  # the square slice under the caption
    red = lesion_pixels(picture)
    # the answer's own pixels top left; a zoomed copy in the opposite corner, many times larger
    assert red[256:, 256:].sum() > 20 * red[:256, :256].sum() > 0
    assert text["Slice"] == "slice 1 of 3"
    mask[50:100, 100:150, 1] = True  # a quarter of the side: seen without zoom
    large = tmp_path / "large.png"
    write_overlay_png(hu, mask, large)
    with Image.open(large) as png:
        assert not lesion_pixels(np.asarray(png.convert("RGB"))[-512:])[256:, 256:].any()


def test_inset_field_surrounds_a_small_answer_inside_the_slice():
    mask = np.zeros((100, 100), dtype=bool)
    mask[97:99, 1:3] = True  # in a corner
    rows, cols = inset_field(mask, (1.0, 1.0))
    assert rows.stop == 100 and cols.start == 0 and rows.stop - rows.start == cols.stop - cols.start >= 100 / 16
    assert rows.start <= 97 and cols.stop >= 3
    mask[10:30, 10:30] = True
    assert inset_field(mask, (1.0, 1.0)) is None
    assert inset_field(np.zeros((10, 10), bool), (1.0, 1.0)) is None


@pytest.mark.parametrize(
    ("available", "expected"), [(1, (1, 1)), (2, (2, 2)), (4, (4, 4)), (5, (4, 4)), (7, (6, 3)), (20, (9, 3))]
)
def test_montage_layout_fills_every_row(available, expected):
    tiles, columns = montage_layout(available, 9, 3)
    assert (tiles, columns) == expected and tiles % columns == 0


def test_montage_has_no_empty_tile(tmp_path):
    shape = (64, 64, 30)
    hu, mask = np.full(shape, 40.0), np.zeros(shape, dtype=bool)
    mask[20:40, 20:40, 3:6] = True  # two lesions on slices 3-5 and 20-23, nothing between
    mask[30:50, 30:50, 20:24] = True
    out = tmp_path / "montage.png"
    indices = write_montage(hu, mask, out, title="all lesions", count=9, columns=3)
    assert indices == montage_slices(mask, 6) and all(mask[:, :, k].any() for k in indices)
    with Image.open(out) as png:
        picture, text = np.asarray(png.convert("RGB")), png.text
    tile = picture.shape[1] // 3  # square tiles under the title
    tiles = picture[picture.shape[0] - 2 * tile :]
    for n in range(len(indices)):
        row, column = divmod(n, 3)
        assert lesion_pixels(tiles[row * tile : (row + 1) * tile, column * tile : (column + 1) * tile]).any()
    assert text["Slices"] == "; ".join(f"slice {k} of 30" for k in indices)


def test_caption_breaks_between_values_never_inside_one():
    font = ImageFont.load_default(size=16)
    title = '"the largest hypodense lesion": 12 lesion(s), 143.1 ml (confidence 0.98)'
    for width in (160, 220, 300, 400):
        lines = caption_lines(title, font, width)
        assert " ".join(lines) == title
        assert any("143.1 ml" in line for line in lines) and any("(confidence 0.98)" in line for line in lines)
        assert any("12 lesion(s)," in line for line in lines)
