"""Imports of labelled CT (MSD / LiTS, 3D-IRCADb, DICOM-SEG, 3D Slicer) on real CT with tumours drawn in the real
livers: lesion instances equal the drawn tumours, the import report counts them, the dataset loads, and every kind
of bad input is refused with its reason while the other cases go on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from custom.clinical import load_ct_ras, ras_mask_to_source_frames
from custom.data.datalist import load_datalist, validate_datalist
from custom.data.import_labelled import DatasetImportError, format_report, import_labelled, main
from custom.data.importers import detect_layout, segment_role
from custom.data.io import reorient
from custom.user_inputs import format_input_error

REAL = Path(__file__).resolve().parents[1] / "data" / "realct"
CT_SERIES = REAL / "dcmqi_ct_3slice"  # 3 real 512x512 slices (BSD)
#: A segment's terminology as 3D Slicer writes it (context~category~type~...): the liver.
LIVER_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
    "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
)


def box_inside(liver: np.ndarray, size) -> tuple[slice, ...]:
    """A box of ``size`` voxels lying wholly inside the liver mask (the middle one of those that fit)."""
    fits = ndimage.minimum_filter(liver.astype(np.uint8), size=size, mode="constant") > 0
    centre = np.argwhere(fits)[int(fits.sum()) // 2]
    return tuple(slice(int(c) - s // 2, int(c) - s // 2 + s) for c, s in zip(centre, size))


def cases_of(datalist: Path) -> dict[str, dict]:
    data = json.loads(datalist.read_text())
    return {case["case_id"]: case for split in ("training", "validation", "test") for case in data[split]}


def lesion_map(datalist: Path, case: dict) -> np.ndarray:
    return np.asarray(nib.load(datalist.parent / case["lesions"]).dataobj)


@pytest.fixture(scope="module")
def dicom_ct():
    """The real CT series in RAS, its real liver on that grid, and two touching tumours drawn in the liver:
    A (40x40x3 voxels, 3.2 ml) and B (14x14x2 voxels, 0.26 ml), both bool on the RAS grid."""
    ct = load_ct_ras(CT_SERIES)
    label = nib.load(REAL / "dcmqi_liver.nii.gz")
    liver, affine = reorient(np.asarray(label.dataobj) > 0, label.affine, "RAS")
    np.testing.assert_allclose(affine, ct.affine.numpy(), atol=1e-3)
    box = box_inside(liver, (54, 40, 3))
    tumour_a, tumour_b = np.zeros(liver.shape, bool), np.zeros(liver.shape, bool)
    x, y = box[0].start, box[1].start
    tumour_a[x : x + 40, y : y + 40, :] = True
    tumour_b[x + 40 : x + 54, y : y + 14, 0:2] = True
    return ct, liver, tumour_a, tumour_b


def source_frames(ct, mask_ras: np.ndarray) -> np.ndarray:
    """A RAS mask as (frames, rows, columns) in the order of ``ct.meta['source_files']``."""
    return ras_mask_to_source_frames(mask_ras, ct.meta, ct.affine)


def write_mask_series(ct, mask_ras, folder: Path, inside: int = 255, pixel_spacing=None) -> None:
    """A DICOM mask series (values 0 / ``inside``) on the CT's slices, as 3D-IRCADb stores its masks."""
    folder.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    for number, (frame, path) in enumerate(zip(source_frames(ct, mask_ras), ct.meta["source_files"])):
        ds = pydicom.dcmread(path)
        ds.PixelData = (frame.astype(np.int16) * inside).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope, ds.Modality = 0, 1, "OT"
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if pixel_spacing is not None:
            ds.PixelSpacing = pixel_spacing
        ds.save_as(folder / f"image_{number}")


def write_seg(ct, segments: list[tuple[str, object, np.ndarray]], path: Path, with_references=True, fractional=False):
    """A DICOM-SEG of the real series: one segment per (label, SCT property type, RAS mask)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = []
    for file in ct.meta["source_files"]:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
            del header.SpecificCharacterSet
        sources.append(header)
    pixels = np.stack([source_frames(ct, mask) for _, _, mask in segments], axis=-1)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, (label, code, _) in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels.astype(np.float32) if fractional else pixels,
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    if not with_references:  # frames placed by ImagePositionPatient only
        del seg.ReferencedSeriesSequence
        for item in seg.PerFrameFunctionalGroupsSequence:
            del item.DerivationImageSequence
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


# ----------------------------------------------------------------------------------------------------- IRCADb


def test_ircadb_masks_become_lesions_and_bad_patients_are_refused(dicom_ct, tmp_path):
    ct, liver, tumour_a, tumour_b = dicom_ct
    src = tmp_path / "3Dircadb1"
    for n in (1, 2, 3, 4):
        patient = src / f"3Dircadb1.{n}"
        shutil.copytree(CT_SERIES, patient / "PATIENT_DICOM")
        masks = patient / "MASKS_DICOM"
        write_mask_series(ct, liver, masks / "liver", pixel_spacing=[0.7, 0.7] if n == 4 else None)
        write_mask_series(ct, tumour_a, masks / "livertumor01")
        write_mask_series(ct, tumour_b, masks / "livertumor02", inside=1)
        if n == 1:
            write_mask_series(ct, ~liver, masks / "portalvein")
    zipped = src / "3Dircadb1.5"
    zipped.mkdir()
    (zipped / "PATIENT_DICOM.zip").write_bytes(b"PK")
    (zipped / "MASKS_DICOM.zip").write_bytes(b"PK")
    assert detect_layout(src)[0] == "ircadb"

    datalist, report = import_labelled(src, tmp_path / "out", progress=False)

    cases = cases_of(datalist)
    assert sorted(cases) == ["3Dircadb1.1", "3Dircadb1.2", "3Dircadb1.3"]
    for case in cases.values():
        lesions = lesion_map(datalist, case)
        np.testing.assert_array_equal(lesions == 1, tumour_a)  # touching masks stay two lesions, largest first
        np.testing.assert_array_equal(lesions == 2, tumour_b)
        assert case["image"] == f"images/{case['case_id']}.nii.gz" and case["orientation"] == "RAS"
    assert report["cases_found"] == 5 and report["cases_imported"] == 3
    assert report["lesions"]["total"] == 6
    assert report["lesions"]["by_size"] == {"<1 ml": 3, "1-10 ml": 3, ">=10 ml": 0}
    assert sum(report["lesions"]["by_density"].values()) == 6
    assert report["expressions"]["total"] == sum(len(c["expressions"]) for c in cases.values())
    assert any("'portalvein'" in note for note in report["cases"][0]["notes"])
    refused = {r["case_id"]: r for r in report["refused"]}
    assert refused["3Dircadb1.4"]["problem"] == "grid"
    assert "voxel size (0.7, 0.7, 1) mm against the CT's (0.8105, 0.8105, 1) mm" in refused["3Dircadb1.4"]["reason"]
    assert refused["3Dircadb1.5"]["problem"] == "unreadable"
    assert "unzip PATIENT_DICOM.zip, MASKS_DICOM.zip" in refused["3Dircadb1.5"]["reason"]
    assert json.loads((datalist.parent / "import_report.json").read_text()) == report
    validate_datalist(datalist)
    assert load_datalist(datalist, "training")[0]["image"].endswith(".nii.gz")


# -------------------------------------------------------------------------------------------------- DICOM-SEG


def test_dicom_seg_segments_by_label_or_code_and_by_reference_or_position(dicom_ct, tmp_path):
    from pydicom.sr.codedict import codes

    ct, liver, tumour_a, tumour_b = dicom_ct
    sct = codes.SCT
    src = tmp_path / "segs"
    for name in ("s1", "s2", "s3", "s4"):
        shutil.copytree(CT_SERIES, src / name / "CT")
    # s1: the lesion named only by its code (Neoplasm); an ignored spleen segment
    write_seg(
        ct,
        [("Liver", sct.Liver, liver), ("Region 2", sct.Neoplasm, tumour_a), ("Region 3", sct.Spleen, ~liver)],
        src / "s1" / "SEG" / "seg.dcm",
    )
    # s2: no references to the source images: frames placed by their positions
    write_seg(
        ct,
        [("liver", sct.Liver, liver), ("Tumour", sct.Tissue, tumour_a | tumour_b)],
        src / "s2" / "seg.dcm",
        with_references=False,
    )
    # s3: a fractional SEG
    write_seg(
        ct,
        [("LIVER", sct.Liver, liver), ("metastasis 1", sct.Tissue, tumour_b)],
        src / "s3" / "seg.dcm",
        fractional=True,
    )
    # s4: no liver segment
    write_seg(ct, [("Spleen", sct.Spleen, liver), ("Mass", sct.Mass, tumour_a)], src / "s4" / "seg.dcm")
    assert detect_layout(src) == ("dicom_seg", "4 DICOM-SEG file(s)")

    datalist, report = import_labelled(src, tmp_path / "out", layout="dicom_seg", progress=False)

    cases = cases_of(datalist)
    assert sorted(cases) == ["s1", "s2", "s3"]
    np.testing.assert_array_equal(lesion_map(datalist, cases["s1"]), tumour_a.astype(np.uint8))
    np.testing.assert_array_equal(lesion_map(datalist, cases["s2"]) > 0, tumour_a | tumour_b)  # one mask, one lesion
    assert len(cases["s2"]["lesion_attributes"]) == 1
    np.testing.assert_array_equal(lesion_map(datalist, cases["s3"]), tumour_b.astype(np.uint8))
    liver_s1 = np.asarray(nib.load(datalist.parent / cases["s1"]["liver"]).dataobj) > 0
    np.testing.assert_array_equal(liver_s1, liver)
    assert report["refused"] == [
        {
            "case_id": "s4",
            "image": str((src / "s4" / "CT").absolute()),
            "label": str(src / "s4" / "seg.dcm"),
            "problem": "no_liver",
            "reason": f"{src / 's4' / 'seg.dcm'} has no liver segment (found: 'Spleen', 'Mass'); name the liver's "
            "segment 'liver' (lesions: lesion, tumour, metastasis, cyst ...).",
        }
    ]
    assert "segments ignored (neither liver nor lesion): 'Region 3'" in report["cases"][0]["notes"]
    validate_datalist(datalist)


# ------------------------------------------------------------------------------------------------- 3D Slicer


def totalseg_with_tumours(hu_shift: tuple[int, int] = (-60, 60)):
    """The real TotalSegmentator CT and liver (3 mm, RAS) with a 13.8 ml tumour and a 0.22 ml one drawn in the liver;
    their HU are shifted by ``hu_shift`` (hypodense, hyperdense). Returns (hu, liver, big, small, affine)."""
    image = nib.load(REAL / "totalseg_example_ct.nii.gz")
    hu = np.asarray(image.dataobj).astype(np.int16)
    liver = np.asarray(nib.load(REAL / "totalseg_liver.nii.gz").dataobj) > 0
    box = box_inside(liver, (12, 8, 8))
    big, small = np.zeros(liver.shape, bool), np.zeros(liver.shape, bool)
    big[box[0].start : box[0].start + 8, box[1], box[2]] = True
    small[box[0].start + 10 : box[0].stop, box[1].start : box[1].start + 2, box[2].start : box[2].start + 2] = True
    hu[big] += hu_shift[0]
    hu[small] += hu_shift[1]
    return hu, liver, big, small, image.affine


def write_seg_nrrd(path: Path, layers: list[np.ndarray], segments: list[tuple[str, int, int]], affine_ras, **extra):
    """A Slicer ``.seg.nrrd``: ``layers`` (X, Y, Z) label arrays; ``segments`` (name, layer, label value)."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine_ras, float)[:3]
    header = {"space": "left-posterior-superior", "space origin": lps[:, 3], **extra}
    if len(layers) == 1:
        data, header["space directions"] = layers[0], lps[:, :3].T
        header["kinds"] = ["domain"] * 3
    else:
        data = np.stack(layers)
        header["space directions"] = np.vstack([np.full(3, np.nan), lps[:, :3].T])
        header["kinds"] = ["list", "domain", "domain", "domain"]
    for number, (name, layer, value) in enumerate(segments):
        header |= {f"Segment{number}_Name": name, f"Segment{number}_Layer": str(layer)}
        header[f"Segment{number}_LabelValue"] = str(value)
    nrrd.write(str(path), data.astype(np.uint8), header)


def test_slicer_files_beside_the_ct(dicom_ct, tmp_path):
    ct, liver, tumour_a, tumour_b = dicom_ct
    hu, ts_liver, big, small, ts_affine = totalseg_with_tumours()
    src = tmp_path / "slicer"
    # a: CT as a DICOM series folder, a one-layer .seg.nrrd (tumour carved out of the liver, as Slicer paints it)
    (src / "a").mkdir(parents=True)
    shutil.copytree(CT_SERIES, src / "a" / "CT")
    labels = liver.astype(np.uint8) + tumour_a
    write_seg_nrrd(src / "a" / "Segmentation.seg.nrrd", [labels], [("Liver", 0, 1), ("Tumor", 0, 2)], ct.affine.numpy())
    # b: CT as NIfTI in RAS (referenced as it is), a labelmap 0/1/2
    (src / "b").mkdir()
    nib.save(nib.Nifti1Image(hu, ts_affine), src / "b" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(ts_liver.astype(np.uint8) + (big | small), ts_affine), src / "b" / "ct-label.nii.gz")
    # c: CT as NRRD, a two-layer segmentation cropped to the liver's box (overlapping segments, Slicer's own names)
    (src / "c").mkdir()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ts_affine
    nrrd.write(
        str(src / "c" / "ct.nrrd"), hu, {"space": "LPS", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    )
    crop = ndimage.find_objects(ts_liver.astype(np.uint8))[0]
    cropped = ts_affine.copy()
    cropped[:3, 3] = (ts_affine @ [*(s.start for s in crop), 1])[:3]
    layers = [ts_liver[crop], big[crop] | small[crop]]
    write_seg_nrrd(
        src / "c" / "Segmentation.seg.nrrd",
        layers,
        [("Segment_1", 0, 1), ("Liver lesion", 1, 1)],
        cropped,
        Segment0_Terminology=LIVER_TERMINOLOGY,
    )
    # d: the real dcmqi liver label (NRRD, LPS) beside the CT as NIfTI in LPS: rewritten in RAS, no lesion
    (src / "d").mkdir()
    shutil.copy(REAL / "dcmqi_ct_3slice.nii.gz", src / "d" / "ct.nii.gz")
    shutil.copy(REAL / "dcmqi_liver_seg.nrrd", src / "d" / "liver_seg.nrrd")
    assert detect_layout(src)[0] == "slicer"

    datalist, report = import_labelled(src, tmp_path / "out", progress=False)

    cases = cases_of(datalist)
    assert report["refused"] == [] and sorted(cases) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(lesion_map(datalist, cases["a"]), tumour_a.astype(np.uint8))
    a_liver = np.asarray(nib.load(datalist.parent / cases["a"]["liver"]).dataobj) > 0
    np.testing.assert_array_equal(a_liver, liver | tumour_a)  # the carved-out tumour counts as liver
    assert any("lay outside the liver mask, touching it" in n for n in report["cases"][0]["notes"])
    for name in ("b", "c"):
        lesions = lesion_map(datalist, cases[name])
        np.testing.assert_array_equal(lesions == 1, big)
        np.testing.assert_array_equal(lesions == 2, small)
        assert [a["density"] for a in cases[name]["lesion_attributes"]] == ["hypodense", "hyperdense"]
    assert cases["b"]["image"] == "../slicer/b/ct.nii.gz"  # a NIfTI CT in RAS is referenced, not copied
    assert cases["c"]["image"] == "images/c.nii.gz" and cases["d"]["image"] == "images/d.nii.gz"
    assert cases["d"]["lesion_attributes"] == [] and all(e["kind"] == "negative" for e in cases["d"]["expressions"])
    d_liver = np.asarray(nib.load(datalist.parent / cases["d"]["liver"]).dataobj)
    assert d_liver.sum() == 107098  # every voxel of the real label, on the RAS grid
    assert report["lesions"]["by_size"] == {"<1 ml": 2, "1-10 ml": 1, ">=10 ml": 2}
    assert report["lesions"]["by_density"]["hypodense"] >= 2 and report["lesions"]["by_density"]["hyperdense"] >= 2
    assert sum(report["expressions"]["by_kind"].values()) == report["expressions"]["total"] > 0
    validate_datalist(datalist)
    assert len(load_datalist(datalist, "test")) >= 1
    text = format_report(report)
    assert "Imported 4 of 4 case(s)" in text and "layout slicer, detected from 4 Slicer" in text


# ----------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def bad_and_good(tmp_path_factory):
    """A Slicer-layout folder: three good cases and one case per kind of bad input; returns (folder, expected
    {case: problem})."""
    hu, liver, big, small, affine = totalseg_with_tumours()
    src = tmp_path_factory.mktemp("mixed") / "slicer"
    labelmap = liver.astype(np.uint8) + (big | small)
    far = np.zeros(liver.shape, bool)
    far[2:6, 2:6, 2:6] = True  # in the air beside the body, far from the liver
    shifted = affine.copy()
    shifted[:3, 3] += [1.5, 0, 0]  # half a voxel
    cases = {
        "good1": (labelmap, affine),
        "good2": (labelmap, affine),
        "good3": (liver.astype(np.uint8), affine),
        "outside": (labelmap + 2 * far, affine),
        "grid": (labelmap, shifted),
        "labels": (labelmap * 3, affine),
    }
    for name, (label, label_affine) in cases.items():
        (src / name).mkdir(parents=True)
        nib.save(nib.Nifti1Image(hu, affine), src / name / "ct.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), label_affine), src / name / "ct-label.nii.gz")
    (src / "colours").mkdir()  # a labelmap whose values a Slicer color table names
    nib.save(nib.Nifti1Image(hu, affine), src / "colours" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labelmap * 5 + (labelmap == 2), affine), src / "colours" / "ct-label.nii.gz")
    table = "# Color table file ct-label_ColorTable.ctbl\n0 Background 0 0 0 0\n5 liver 221 130 101 255\n"
    (src / "colours" / "ct-label_ColorTable.ctbl").write_text(table + "11 tumor 144 238 144 255\n")
    for name in ("empty", "noliver"):
        (src / name).mkdir()
        nib.save(nib.Nifti1Image(hu, affine), src / name / "ct.nii.gz")
    write_seg_nrrd(
        src / "empty" / "ct.seg.nrrd", [(big * 2).astype(np.uint8)], [("Liver", 0, 1), ("Tumor", 0, 2)], affine
    )
    write_seg_nrrd(src / "noliver" / "ct.seg.nrrd", [liver.astype(np.uint8)], [("Segment_1", 0, 1)], affine)
    (src / "unreadable").mkdir()
    nib.save(nib.Nifti1Image(hu, affine), src / "unreadable" / "ct.nii.gz")
    data = (src / "good1" / "ct-label.nii.gz").read_bytes()
    (src / "unreadable" / "ct-label.nii.gz").write_bytes(data[: len(data) // 2])
    expected = {
        "outside": "lesion_outside_liver",
        "grid": "grid",
        "labels": "labels",
        "empty": "empty_liver",
        "noliver": "no_liver",
        "unreadable": "unreadable",
    }
    return src, expected


def test_each_bad_input_is_refused_with_its_reason_and_the_others_imported(bad_and_good, tmp_path):
    src, expected = bad_and_good
    datalist, report = import_labelled(src, tmp_path / "out", progress=False)
    cases = cases_of(datalist)
    assert sorted(cases) == ["colours", "good1", "good2", "good3"]
    assert [a["volume_ml"] for a in cases["colours"]["lesion_attributes"]] == [13.824, 0.216]
    assert {r["case_id"]: r["problem"] for r in report["refused"]} == expected
    assert report["refused_by_problem"] == {problem: 1 for problem in sorted(expected.values())}
    reasons = {r["case_id"]: r["reason"] for r in report["refused"]}
    assert "lies outside the liver mask and does not touch it" in reasons["outside"]
    assert "origin off the CT's voxel centres by (1.5, 0, 0) mm" in reasons["grid"]
    assert "masks are not resampled" in reasons["grid"]
    assert "holds the values [3, 6]" in reasons["labels"] and "remap it to 0 background, 1 liver" in reasons["labels"]
    assert "liver mask" in reasons["empty"] and "is empty" in reasons["empty"]
    assert "no liver segment (found: 'Segment_1')" in reasons["noliver"]
    assert "damaged gzip file" in reasons["unreadable"] or "Cannot read" in reasons["unreadable"]
    validate_datalist(datalist)


def test_all_refused_names_the_fix_last_and_writes_nothing(bad_and_good, tmp_path, capsys):
    src, _ = bad_and_good
    only_bad = tmp_path / "grids"
    for name in ("grid",):
        shutil.copytree(src / name, only_bad / name)
    shutil.copytree(src / "grid", only_bad / "grid2")
    with pytest.raises(DatasetImportError) as caught:
        main(["--src", str(only_bad), "--out", str(tmp_path / "out"), "--no-progress"])
    printed = capsys.readouterr().out
    assert "refused 2 case(s):" in printed and "grid2 [grid]" in printed
    last = format_input_error(caught.value).splitlines()[-1]
    assert last.startswith("error: None of the 2 case(s) under") and "(2 grid; reasons above)" in last
    assert last.endswith("save every mask on its CT's grid (same voxels and slices) and run again.")
    assert not (tmp_path / "out").exists()


def test_msd_and_lits_layouts_import_through_the_same_conversion(tmp_path):
    hu, liver, big, small, affine = totalseg_with_tumours()
    label = liver.astype(np.uint8) + (big | small)
    msd = tmp_path / "Task03_Liver"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    for n in range(4):
        nib.save(nib.Nifti1Image(hu, affine), msd / "imagesTr" / f"liver_{n}.nii.gz")
        nib.save(nib.Nifti1Image(label * (3 if n == 3 else 1), affine), msd / "labelsTr" / f"liver_{n}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), msd / "labelsTr" / "liver_9.nii.gz")  # no image
    assert detect_layout(msd)[0] == "msd"
    datalist, report = import_labelled(msd, tmp_path / "out", copy_images=True, progress=False)
    cases = cases_of(datalist)
    assert sorted(cases) == ["liver_0", "liver_1", "liver_2"]
    assert all(c["image"] == f"images/{c['case_id']}.nii.gz" for c in cases.values())
    assert {r["case_id"]: r["problem"] for r in report["refused"]} == {"liver_3": "labels", "liver_9": "unpaired"}
    assert report["lesions"]["by_size"] == {"<1 ml": 3, "1-10 ml": 0, ">=10 ml": 3}
    validate_datalist(datalist)
    with pytest.raises(DatasetImportError, match="already exists and is not empty"):
        import_labelled(msd, tmp_path / "out", progress=False)
    with pytest.raises(Exception, match="not in the lits layout"):
        import_labelled(msd, tmp_path / "other", layout="lits", progress=False)


@pytest.mark.parametrize(
    "names, role",
    [
        (("Liver",), "liver"),
        (("liver segmentation",), "liver"),
        (("Segment_1", "Liver"), "liver"),
        (("livertumor01",), "lesion"),
        (("liverkyst",), "lesion"),
        (("Region 2", "Neoplasm"), "lesion"),
        (("Liver lesion",), "lesion"),
        (("Metastases",), "lesion"),
        (("portalvein",), None),
        (("Segment_1",), None),
    ],
)
def test_segment_roles(names, role):
    assert segment_role(*names) == role
