"""The perturbations of the robustness benchmark (``benchmarks/robustness.py``), on small arrays; no network."""

import json

import numpy as np
import pytest

from benchmarks import robustness
from custom.data.datalist import load_datalist
from custom.data.io import write_nifti

SLICE_LAST = np.diag([1.5, 1.5, 3.0, 1.0])  # RAS, slices along axis 2
SLICE_FIRST = np.array([[0, 1.5, 0, 0], [0, 0, 1.5, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]])  # slices along axis 0


def phantom(shape=(24, 24, 10)):
    """Air around a body of 40 HU holding a liver of 100 HU, a 50 HU lesion (id 1) and a 150 HU vessel."""
    image = np.full(shape, -1000.0, np.float32)
    image[2:-2, 2:-2, :] = 40.0
    liver = np.zeros(shape, np.uint8)
    liver[4:20, 4:20, 1:9] = 1
    image[liver > 0] = 100.0
    lesions = np.zeros(shape, np.uint8)
    lesions[6:10, 6:10, 3:6] = 1
    image[lesions > 0] = 50.0
    vessel = np.zeros(shape, bool)
    vessel[14:18, 14:18, 1:9] = True
    image[vessel] = 150.0
    return image, liver, lesions, vessel


def test_offset_and_noise_change_the_body_only():
    image, _, _, _ = phantom()
    body = image > -500
    shifted = robustness.hu_offset(image, -60.0)
    assert np.allclose(shifted[body], image[body] - 60.0) and np.array_equal(shifted[~body], image[~body])
    noisy = robustness.add_noise(image, 20.0, np.random.default_rng(0))
    assert np.array_equal(noisy[~body], image[~body])
    assert abs((noisy - image)[body].std() - 20.0) < 1.0
    again = robustness.add_noise(image, 20.0, robustness.case_rng(0, "noise_20", "case"))
    assert np.array_equal(again, robustness.add_noise(image, 20.0, robustness.case_rng(0, "noise_20", "case")))


@pytest.mark.parametrize("affine, axis", [(SLICE_LAST, 2), (SLICE_FIRST, 0)])
def test_kernels_act_in_plane_only(affine, axis):
    along = np.zeros((9, 9, 9), np.float32)
    np.moveaxis(along, axis, 0)[4] = 100.0  # one bright slice: no in-plane structure
    assert np.allclose(robustness.blur_in_plane(along, affine), along, atol=1e-3)
    assert np.allclose(robustness.sharpen_in_plane(along, affine), along, atol=1e-3)
    point = np.zeros((9, 9, 9), np.float32)
    point[4, 4, 4] = 100.0
    blurred = robustness.blur_in_plane(point, affine)
    assert blurred[4, 4, 4] < 20.0 and np.isclose(blurred.sum(), 100.0, rtol=1e-3)
    assert np.allclose(np.take(blurred, [3, 5], axis), 0.0)  # nothing leaks across slices
    assert robustness.sharpen_in_plane(point, affine)[4, 4, 4] > 100.0


def test_phase_moves_liver_and_vessels_and_keeps_lesion_contrast():
    image, liver, lesions, vessel = phantom()
    changed, info = robustness.change_phase(image, liver, lesions, SLICE_LAST, 55.0, 40.0)
    parenchyma = (liver > 0) & (lesions == 0) & ~vessel
    core = np.zeros_like(vessel)
    core[15:17, 15:17, 2:8] = True  # the vessel away from its partial-volume edge
    assert info["liver_hu"] == 100.0 and info["vessel_voxels"] > 0
    assert np.median(changed[parenchyma]) == pytest.approx(55.0)
    assert changed[lesions > 0].mean() == pytest.approx(5.0)  # 45 HU below the liver, as before
    assert changed[core].mean() == pytest.approx(40.0, abs=5.0)
    assert np.array_equal(changed[liver == 0], image[liver == 0])


def test_thicker_slices_keep_geometry_and_put_back_a_lost_lesion():
    image, liver, lesions, _ = phantom(shape=(24, 24, 12))
    lesions[12:14, 12:14, 5] = 2  # a one-slice lesion between two 5 mm slices
    volumes = robustness.Volumes(image, lesions, liver, SLICE_LAST.copy())
    thick = robustness.resample_slices(volumes, 5.0)
    assert thick.image.shape == (24, 24, 7) and thick.lesions.dtype == lesions.dtype
    assert np.allclose(np.linalg.norm(thick.affine[:3, :3], axis=0), [1.5, 1.5, 5.0])
    assert set(np.unique(thick.lesions)) == {0, 1, 2} and thick.info["lesions_restored"] == [2]
    assert thick.liver[thick.lesions == 2].all()

    def centroid_mm(array, affine):
        return (affine @ [*np.argwhere(array).mean(0), 1])[:3]

    old, new = centroid_mm(lesions == 1, SLICE_LAST), centroid_mm(thick.lesions == 1, thick.affine)
    assert np.allclose(old, new, atol=2.5)  # world position kept within half a new slice
    first, last = (thick.affine @ [0, 0, 0, 1])[2], (thick.affine @ [0, 0, 6, 1])[2]
    assert (first + last) / 2 == pytest.approx(16.5) and last - first == pytest.approx(30.0)  # 7 slices, centred


def test_thinner_and_equal_slices():
    image, liver, lesions, _ = phantom()
    volumes = robustness.Volumes(image, lesions, liver, SLICE_FIRST.copy())
    same = robustness.resample_slices(volumes, 3.0)
    assert np.allclose(same.image, image) and np.array_equal(same.lesions, lesions)
    assert np.allclose(same.affine, SLICE_FIRST)
    thin = robustness.resample_slices(volumes, 1.0)
    assert thin.image.shape == (72, 24, 10) and np.allclose(np.linalg.norm(thin.affine[:3, 0]), 1.0)
    assert (thin.lesions == 1).sum() == 3 * (lesions == 1).sum()


def test_perturbed_dataset_is_a_valid_datalist_with_only_the_image_replaced(tmp_path):
    image, liver, lesions, _ = phantom()
    source = tmp_path / "source"
    for key, array in (("image", image.astype(np.int16)), ("lesions", lesions), ("liver", liver)):
        (source / key).mkdir(parents=True)
        write_nifti(source / key / "c1.nii.gz", array, SLICE_LAST)
    case = {
        "case_id": "c1",
        "image": "image/c1.nii.gz",
        "lesions": "lesions/c1.nii.gz",
        "liver": "liver/c1.nii.gz",
        "lesion_attributes": [{"id": 1, "density": "hypodense"}],
        "expressions": [{"text": "the lesion", "targets": [1], "kind": "location"}],
    }
    (source / "datalist.json").write_text(json.dumps({"test": [case]}))
    cases = load_datalist(source / "datalist.json", "test")
    for name in ("noise_10", "slices_5mm"):
        robustness.write_dataset(cases, name, tmp_path / name, "test", seed=0)
        [written] = load_datalist(tmp_path / name / "datalist.json", "test")
        assert written["image"] == str(tmp_path / name / "image" / "c1.nii.gz")
        grid_changed = name.startswith("slices")
        assert (written["lesions"] == cases[0]["lesions"]) != grid_changed
        assert {k: v for k, v in written.items() if k not in ("image", "lesions", "liver")} == {
            k: v for k, v in cases[0].items() if k not in ("image", "lesions", "liver")
        }
