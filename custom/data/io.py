"""File helpers of the data tools: NIfTI in a chosen orientation, atomic folders and JSON files.

:func:`custom.atomic_files.atomic_directory` (re-exported here) writes a folder whole before it appears (the data
sets, ``python -m custom.package``); a single file is written through :func:`custom.atomic_files.atomic_write`.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from custom.atomic_files import atomic_directory, atomic_write

__all__ = ["reorient", "write_nifti", "atomic_directory", "write_json_atomic", "orientation_of", "progress_bar"]


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """A ``tqdm`` progress bar on stderr; off when ``enabled`` is False or stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def orientation_of(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. 'RAS' or 'LPS'."""
    return "".join(nib.aff2axcodes(np.asarray(affine, float)))


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip the axes of a (H, W, D) array to ``axcodes`` (e.g. 'LPS'); the world geometry is unchanged."""
    current = io_orientation(np.asarray(affine, float))
    transform = ornt_transform(current, axcodes2ornt(tuple(axcodes.upper())))
    data = apply_orientation(array, transform)
    return np.ascontiguousarray(data), np.asarray(affine, float) @ inv_ornt_aff(transform, array.shape)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype=None) -> None:
    """Write a NIfTI-1 file with the affine as both qform and sform, unscaled ``dtype`` voxels."""
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    image = nib.Nifti1Image(array, np.asarray(affine, float))
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(np.asarray(affine, float), code=1)
    image.set_sform(np.asarray(affine, float), code=1)
    nib.save(image, str(path))


def write_json_atomic(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON to ``path`` through :func:`custom.atomic_files.atomic_write` (a temporary
    file renamed into place; an existing file is replaced)."""
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)
