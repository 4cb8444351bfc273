"""File helpers of the data tools: NIfTI in a chosen orientation, atomic folders and JSON files."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

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


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder that replaces ``out_dir`` only when the block succeeds.

    A half-written dataset is never visible under ``out_dir``. An existing non-empty ``out_dir`` is an error
    unless ``overwrite`` is set.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {out_dir} already exists and is not empty; choose another folder "
            "or pass overwrite=True (--overwrite on the command line)."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
