"""Shared fixtures of the data tests: a small synthetic dataset and a LiTS-layout folder, each made once."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom.data.phantom import render_phantom
from custom.data.synthetic import generate_dataset


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Datalist path of a 6-case synthetic dataset (seed 1)."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "data", num_cases=6, seed=1)


@pytest.fixture(scope="session")
def lits_folder(tmp_path_factory):
    """A LiTS-layout folder (volume-<n>.nii / segmentation-<n>.nii) made from 3 phantoms, plus their truth.

    Case 0 gets an extra one-voxel tumour speck far from its lesions. Returns (folder, {n: phantom}).
    """
    folder = tmp_path_factory.mktemp("lits")
    phantoms = {}
    for n, seed in enumerate((11, 12, 13)):
        phantom = render_phantom(np.random.default_rng(seed))
        label = phantom.liver.astype(np.uint8) + (phantom.lesions > 0).astype(np.uint8)
        if n == 0:
            free = np.argwhere((label == 1) & ~ndimage.binary_dilation(phantom.lesions > 0, iterations=3))
            i, j, k = free[len(free) // 2]
            label[i, j, k] = 2
            phantom.speck = (int(i), int(j), int(k))
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(folder / f"volume-{n}.nii"))
        nib.save(nib.Nifti1Image(label, phantom.affine), str(folder / f"segmentation-{n}.nii"))
        phantoms[n] = phantom
    return folder, phantoms
