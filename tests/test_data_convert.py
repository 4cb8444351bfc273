"""LiTS / MSD Task03 converter: round trip on a folder written by the test, speck filter, layouts, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom.data.convert_lits import ConversionError, convert_lits, find_cases, main
from custom.data.datalist import load_datalist, validate_datalist


def cases_by_id(datalist: Path) -> dict[str, dict]:
    data = json.loads(datalist.read_text())
    return {c["case_id"]: c for split in ("training", "validation", "test") for c in data[split]}


def truth_components(phantom, voxel_ml: float) -> list[float]:
    """Volumes (ml) of the 26-connected components of the phantom's lesions, largest first."""
    components, count = ndimage.label(phantom.lesions > 0, structure=np.ones((3, 3, 3)))
    return sorted((np.bincount(components.ravel())[1:] * voxel_ml).tolist(), reverse=True)


def test_round_trip_on_a_lits_folder(lits_folder, tmp_path):
    folder, phantoms = lits_folder
    datalist = convert_lits(folder, tmp_path / "out", min_volume_ml=0.05)
    validate_datalist(datalist)
    cases = cases_by_id(datalist)
    assert sorted(cases) == ["lits_0", "lits_1", "lits_2"]
    for n, phantom in phantoms.items():
        case = cases[f"lits_{n}"]
        assert (datalist.parent / case["image"]).resolve() == (folder / f"volume-{n}.nii").resolve()
        instances = np.asarray(nib.load(datalist.parent / case["lesions"]).dataobj)
        liver = np.asarray(nib.load(datalist.parent / case["liver"]).dataobj)
        np.testing.assert_array_equal(liver > 0, phantom.liver > 0)
        np.testing.assert_array_equal(instances > 0, phantom.lesions > 0)  # the speck (case 0) is dropped
        voxel_ml = abs(np.linalg.det(phantom.affine[:3, :3])) / 1000
        volumes = [a["volume_ml"] for a in case["lesion_attributes"]]
        np.testing.assert_allclose(volumes, truth_components(phantom, voxel_ml), atol=1e-3)
        assert volumes == sorted(volumes, reverse=True)  # ids by decreasing volume
        assert [a["id"] for a in case["lesion_attributes"]] == list(range(1, len(volumes) + 1))
        for attributes in case["lesion_attributes"]:
            assert attributes["kind"] in ("cyst", "tumour", "indeterminate")
            assert attributes["lobe"] in ("right", "left") and 2 <= attributes["segment"] <= 8
        for expression in case["expressions"]:
            assert "metasta" not in expression["text"]  # converted lesions have no known diagnosis
    speck = phantoms[0].speck
    assert np.asarray(nib.load(datalist.parent / cases["lits_0"]["lesions"]).dataobj)[speck] == 0
    assert load_datalist(datalist, "training")[0]["image"].endswith(".nii")


def test_min_volume_zero_keeps_the_speck(lits_folder, tmp_path):
    folder, phantoms = lits_folder
    datalist = convert_lits(folder, tmp_path / "out", min_volume_ml=0.0)
    case = cases_by_id(datalist)["lits_0"]
    instances = np.asarray(nib.load(datalist.parent / case["lesions"]).dataobj)
    assert instances[phantoms[0].speck] == len(case["lesion_attributes"])  # the smallest comes last
    assert case["lesion_attributes"][-1]["volume_ml"] < 0.05


def test_msd_layout_and_command_line(lits_folder, tmp_path, capsys):
    folder, _ = lits_folder
    msd = tmp_path / "Task03_Liver"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    for n in range(3):
        for kind, prefix in (("imagesTr", "volume"), ("labelsTr", "segmentation")):
            image = nib.load(folder / f"{prefix}-{n}.nii")
            nib.save(image, str(msd / kind / f"liver_{n}.nii.gz"))
    (msd / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"resource fork")  # macOS junk in the MSD archive
    assert [c[0] for c in find_cases(msd)] == ["liver_0", "liver_1", "liver_2"]
    main(["--src", str(msd), "--out", str(tmp_path / "out"), "--min-volume-ml", "0.05", "--copy-images"])
    assert "Converted" in capsys.readouterr().out
    datalist = tmp_path / "out" / "datalist.json"
    validate_datalist(datalist)
    assert all(c["image"].startswith("images/") for c in cases_by_id(datalist).values())


def test_bad_sources_are_named(lits_folder, tmp_path):
    folder, _ = lits_folder
    with pytest.raises(ConversionError, match="No cases found"):
        find_cases(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in range(3):
        shutil.copy(folder / f"volume-{n}.nii", bad / f"volume-{n}.nii")
        shutil.copy(folder / f"segmentation-{n}.nii", bad / f"segmentation-{n}.nii")
    label = nib.load(bad / "segmentation-1.nii")
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, label.affine), str(bad / "segmentation-1.nii"))
    with pytest.raises(ConversionError, match=r"segmentation-1.nii holds values \[0, 1, 2, 3\]"):
        convert_lits(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (bad / "volume-1.nii").unlink()
    with pytest.raises(ConversionError, match="no matching volume-1"):
        find_cases(bad)


def test_a_liver_with_more_lesions_than_the_phantom_makes(tmp_path):
    """Real livers hold up to dozens of tumours: 12 of them convert, and counts above ten are written in digits."""
    shape = (80, 80, 12)
    image = np.full(shape, 40, np.int16)
    label = np.zeros(shape, np.uint8)
    label[4:76, 4:76, 1:11] = 1
    for n in range(12):
        i, j = 10 + 20 * (n % 4), 12 + 22 * (n // 4)
        label[i - 3 : i + 3, j - 3 : j + 3, 3:8] = 2
    image[label == 1], image[label == 2] = 110, 40
    source = tmp_path / "lits"
    source.mkdir()
    for n in range(3):
        nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 3.0, 1.0])), str(source / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(label, np.diag([1.5, 1.5, 3.0, 1.0])), str(source / f"segmentation-{n}.nii"))
    cases = cases_by_id(convert_lits(source, tmp_path / "out", progress=False))
    for case in cases.values():
        assert len(case["lesion_attributes"]) == 12
        assert all(set(e["targets"]) <= set(range(1, 13)) for e in case["expressions"])
    texts = [e["text"] for case in cases.values() for e in case["expressions"] if len(e["targets"]) == 12]
    assert texts and not any("None" in text for text in texts)
