"""The shipped weights on a real abdominal CT slice: nothing is answered outside the liver.

``explicit_VR-UN.dcm`` of the PyPI package ``pydicom-data`` is one 512x512 slice of a contrast-enhanced abdominal
CT (series "Pancreas", 0.86 mm pixels) with the liver, both kidneys, the pancreas and bowel in view and no lesion
visible. The liver outline below was drawn by hand on it (pixel columns and rows); every voxel the bundle answers
to "all lesions in the liver" must lie inside it, grown by a few millimetres (the answer margin around the liver
region is 5 mm).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from skimage.draw import polygon2mask

from tests.test_bundle import SHIPPED, cli

#: Hand-drawn outline of the liver on the slice, (column, row) pixel corners (a margin around the liver).
LIVER_OUTLINE = [tuple(v) for v in json.loads((Path(__file__).resolve().parents[1] / "data" / "realct" /
                 "explicit_VR-UN_liver_outline.json").read_text())["coarse"]]  # fmt: skip
TOLERANCE_MM = 6.0


def real_slice() -> Path:
    data_store = pytest.importorskip("data_store", reason="needs the PyPI package pydicom-data")
    return Path(data_store.__file__).parent / "data" / "explicit_VR-UN.dcm"


def liver_outline(shape: tuple[int, int], spacing_mm: float) -> np.ndarray:
    """(rows, columns) boolean mask of the hand-drawn liver grown by ``TOLERANCE_MM``."""
    outline = polygon2mask(shape, [(row, column) for column, row in LIVER_OUTLINE])
    return ndimage.binary_dilation(outline, iterations=int(np.ceil(TOLERANCE_MM / spacing_mm)))


@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped weights bundle/models/model.pt")
def test_nothing_is_answered_outside_the_liver_of_a_real_ct(tmp_path):
    source = real_slice()
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(source, series)
    out = tmp_path / "out"
    cli(
        "run", "inference", "--config_file", "bundle/configs/inference.json", "--image", str(series),
        "--prompt", "all lesions in the liver", "--output_dir", str(out),
    )  # fmt: skip
    record = json.loads(next(out.rglob("*.json")).read_text())
    assert record["expression"] == "all lesions in the liver"
    assert "liver_region" in record  # the record says whether and where a liver was found
    seg_files = list(out.rglob("*_seg.dcm"))
    if not record["found"]:
        return
    ct = pydicom.dcmread(source)
    allowed = liver_outline(ct.pixel_array.shape, float(ct.PixelSpacing[0]))
    assert seg_files, "a found answer on a DICOM series is written as DICOM-SEG"
    frames = pydicom.dcmread(seg_files[0]).pixel_array.reshape(-1, *ct.pixel_array.shape) > 0
    answered = frames.any(0)
    assert answered.any()
    outside = answered & ~allowed
    assert not outside.any(), (
        f"{int(outside.sum())} answered pixels outside the liver, e.g. at {np.argwhere(outside)[0]}"
    )


def test_the_hand_drawn_outline_covers_liver_and_leaves_out_the_kidney():
    ct = pydicom.dcmread(real_slice())
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    outline = polygon2mask(hu.shape, [(row, column) for column, row in LIVER_OUTLINE])
    inside = np.median(hu[outline])
    assert 60 < inside < 200  # enhanced liver parenchyma
    allowed = liver_outline(hu.shape, float(ct.PixelSpacing[0]))
    assert not allowed[203:218, 199:214].any()  # the right kidney's collecting system
    assert not allowed[:, 260:].any()  # nothing left of the spine (the patient's left)
