"""Synthetic lesions inserted into a liver (custom.data.lesion_insertion), on a small volume and on real CT."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom.data.lesion_insertion import InsertionOptions, estimate_phase, insert_lesions, write_inserted_dataset

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "realct"
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def small_liver(liver_hu=110.0, shape=(64, 64, 24)):
    """A body of 40 HU with a 64 x 48 x 18 voxel liver of ``liver_hu`` and real-like noise of 10 HU."""
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000.0, np.float32)
    image[2:-2, 2:-2, :] = 40.0
    liver = np.zeros(shape, bool)
    liver[6:58, 8:56, 3:21] = True
    image[liver] = liver_hu
    return image + rng.normal(0, 10, shape).astype(np.float32), liver


@pytest.mark.parametrize("kind", ["cyst", "metastasis", "hyperdense", "hemangioma", "hcc"])
def test_each_kind_is_inside_the_liver_with_its_contrast(kind):
    image, liver = small_liver()
    options = InsertionOptions(count_range=(1, 1), kind_weights={kind: 1.0}, diameter_range_mm=(18.0, 20.0))
    out, label, info = insert_lesions(image, liver, AFFINE, np.random.default_rng(1), options)
    lesion = label == 2
    assert (
        info["phase"] == "portal_venous" and len(info["lesions"]) == 1 and lesion.sum() == info["lesions"][0]["voxels"]
    )
    assert not (lesion & ~liver).any() and np.array_equal(label > 0, liver)
    changed = np.abs(out - image) > 1e-4
    assert not (changed & ~ndimage.binary_dilation(lesion, iterations=2)).any()  # the lesion and its blended border
    mean = float(out[lesion].mean())
    expected = {
        "cyst": (-5, 25),
        "metastasis": (30, 110),
        "hyperdense": (145, 205),
        "hemangioma": (60, 140),
        "hcc": (70, 100),
    }
    low, high = expected[kind]
    assert low <= mean <= high, (kind, mean)
    noise = float(np.std(out[lesion] - np.mean(out[lesion])))
    assert noise > 5.0  # the real image keeps its own noise inside the lesion


def test_unenhanced_liver_is_guessed_and_lesions_stay_apart():
    image, liver = small_liver(liver_hu=50.0)
    assert estimate_phase(50.0) == "non_contrast" and estimate_phase(110.0) == "portal_venous"
    options = InsertionOptions(count_range=(4, 4), diameter_range_mm=(8.0, 14.0))
    _, label, info = insert_lesions(image, liver, AFFINE, np.random.default_rng(3), options)
    assert info["phase"] == "non_contrast" and len(info["lesions"]) == 4
    assert sum(item["voxels"] for item in info["lesions"]) == (label == 2).sum()
    with pytest.raises(ValueError, match="liver mask is empty"):
        insert_lesions(image, np.zeros_like(liver), AFFINE, np.random.default_rng(0))


def test_dataset_of_a_real_ct_with_inserted_lesions(tmp_path):
    datalist = write_inserted_dataset(
        REAL / "totalseg_example_ct.nii.gz", REAL / "totalseg_liver.nii.gz", tmp_path / "inserted", cases=2, seed=5
    )
    data = json.loads(Path(datalist).read_text())
    assert data["training"] == [] and data["validation"] == [] and len(data["test"]) == 2
    source = nib.load(str(REAL / "totalseg_example_ct.nii.gz"))
    for case in data["test"]:
        image = nib.load(str(Path(datalist).parent / case["image"]))
        lesions = np.asarray(nib.load(str(Path(datalist).parent / case["lesions"])).dataobj)
        liver = np.asarray(nib.load(str(REAL / "totalseg_liver.nii.gz")).dataobj) > 0
        assert np.allclose(image.affine, source.affine) and image.shape == source.shape
        ids = set(np.unique(lesions)) - {0}
        assert ids and ids == {a["id"] for a in case["lesion_attributes"]}
        assert liver[lesions > 0].all()
        assert all(set(e["targets"]) <= ids for e in case["expressions"]) and case["expressions"]
    with pytest.raises(FileExistsError):
        write_inserted_dataset(
            REAL / "totalseg_example_ct.nii.gz", REAL / "totalseg_liver.nii.gz", tmp_path / "inserted", cases=1
        )
