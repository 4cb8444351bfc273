"""Scope before lesions: a liver the network finds where no liver can be is out of scope, with the reason.

The rules (:func:`custom.detection.scope.liver_scope`) on drawn anatomy, then the shipped bundle on real CT that shows
no liver (head slices, a chest slice, the pelvis and lower abdomen of a real CT) and on real CT that does (three real
upper abdominal slices from dcmqi, written back as DICOM-SEG).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.scope import cut_slices, pydicom_file
from custom.detection.scope import MIN_BODY_WIDTH_MM, liver_scope
from tests.test_bundle import SHIPPED, cli

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "realct"
SPACING = (1.5, 1.5, 5.0)


def drawn_anatomy(body_mm: float = 320.0, liver_centre_mm: float = 70.0, liver_radius_mm: float = 70.0, slices=6):
    """(liver, HU) on a RAS grid: an elliptic body of ``body_mm`` width in air, a round liver centred
    ``liver_centre_mm`` to the patient's right of the midline (negative: left)."""
    shape = (300, 240, slices)
    x, y = np.meshgrid(
        (np.arange(shape[0]) - 150) * SPACING[0], (np.arange(shape[1]) - 120) * SPACING[1], indexing="ij"
    )
    body = (x / (body_mm / 2)) ** 2 + (y / (body_mm / 3)) ** 2 <= 1
    liver = (x - liver_centre_mm) ** 2 + y**2 <= liver_radius_mm**2
    liver &= body
    hu = np.where(body, 40.0, -1000.0)
    hu[liver] = 100.0
    return np.repeat(liver[..., None], slices, 2), np.repeat(hu[..., None], slices, 2).astype(np.float32)


def test_a_liver_in_the_right_upper_abdomen_is_in_scope():
    scope = liver_scope(*drawn_anatomy(), SPACING)
    assert scope["in_scope"], scope
    assert scope["measurements"]["right_offset"] > 0.3 and scope["measurements"]["body_width_mm"] >= 300


@pytest.mark.parametrize(
    "anatomy, reason",
    [
        ({"body_mm": 150.0, "liver_centre_mm": 20.0, "liver_radius_mm": 40.0}, "as a head or a limb"),
        ({"liver_centre_mm": 0.0}, "midline"),
        ({"liver_centre_mm": -70.0}, "midline"),
        ({"liver_centre_mm": 120.0, "liver_radius_mm": 25.0}, "cm2 at most per slice"),
    ],
)
def test_a_liver_where_none_can_be_is_out_of_scope(anatomy, reason):
    scope = liver_scope(*drawn_anatomy(**anatomy), SPACING)
    assert not scope["in_scope"] and reason in scope["reason"], scope


def test_a_body_cut_by_the_image_edge_is_not_taken_for_a_head():
    """A field of view narrower than the body (the body touches the image edge) says nothing about body width."""
    liver, hu = drawn_anatomy(body_mm=500.0, liver_centre_mm=120.0)
    liver, hu = liver[100:200], hu[100:200]  # a 150 mm wide field of view, through the liver
    assert (hu[0] > -400).any()
    scope = liver_scope(liver, hu, SPACING)
    assert scope["measurements"]["body_width_mm"] < MIN_BODY_WIDTH_MM
    assert "as a head" not in scope.get("reason", "")


@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped weights bundle/models/model.pt")
def test_real_ct_without_a_liver_is_not_present_with_its_reason_and_a_real_liver_is_in_scope(tmp_path):
    pairs = []
    for name in ("693_UNCI.dcm", "J2K_pixelrep_mismatch.dcm"):
        folder = tmp_path / Path(name).stem
        folder.mkdir()
        shutil.copy(pydicom_file(name), folder)
        pairs.append((str(folder), "head"))
    totalseg = REAL / "totalseg_example_ct.nii.gz"
    image = nib.load(totalseg)
    pairs.append((str(cut_slices(image, 0, 40, tmp_path / "pelvis.nii.gz")), "below"))
    pairs.append((str(cut_slices(image, 40, 78, tmp_path / "lower_abdomen.nii.gz")), "below"))
    dcmqi = tmp_path / "dcmqi"
    shutil.copytree(REAL / "dcmqi_ct_3slice", dcmqi)  # its SpecificCharacterSet is empty: DICOM-SEG still written
    pairs.append((str(dcmqi), "liver"))
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps([{"image": image, "prompt": "all lesions in the liver"} for image, _ in pairs]))
    out = tmp_path / "out"
    cli("run", "inference", "--config_file", "bundle/configs/inference.json", "--datalist", str(datalist),
        "--output_dir", str(out))  # fmt: skip
    for image, kind in pairs:
        case = out / Path(image).name.removesuffix(".nii.gz")
        record = json.loads(next(case.glob("*.json")).read_text())
        scope = record["liver_region"]["scope"]
        if kind == "liver":
            assert scope["in_scope"] and record["liver_region"]["liver_found"], record["liver_region"]
            assert list(case.glob("*_seg.dcm")), "a DICOM input gets its DICOM-SEG"
            continue
        assert not record["found"] and record["n_lesions"] == 0, (image, record)
        assert not scope["in_scope"] and scope["reason"].startswith("no liver in view"), (image, scope)
        assert any(scope["reason"] in note for note in record["notes"])
        if kind == "head":
            assert "head or a limb" in scope["reason"], (image, scope["reason"])
