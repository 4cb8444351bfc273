"""Checks of an inference run's inputs and outputs before any model work.

:func:`check_inference_inputs` takes the (image, prompt) items of a run and, reading headers only, refuses with a
named error: unreadable or corrupted files (a ``.nii.gz`` that is not gzip or is cut short; a wrong CRC is found
when its voxels are read, before any model work), images that are not
one 3D volume, DICOM series the model cannot read or answer, an output folder that cannot be written or lies in an
input, two items that would write the same files, and outputs that exist already (unless ``overwrite``). It gives
each item a case id that is unique within the run, so two inputs with the same file name in different folders never
share outputs.

The voxel grid and the values of a volume are checked by :mod:`custom.clinical.volume_checks` (its
:func:`check_hounsfield` runs on the loaded volume; kept importable from here).
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.clinical.dicom_series import (
    CTSeriesReader,
    clinical_reader_for,
    damaged_gzip_error,
    is_nifti_path,
    read_whole_gzip,
)
from custom.clinical.errors import (
    ClinicalInputError,
    InvalidValuesError,
    NoImageError,
    NotCTError,
    OutputExistsError,
    ProtectedInputError,
)
from custom.clinical.outputs import ReferringOutputWriter, case_id_of, check_case_folder, expression_slug
from custom.clinical.volume_checks import FORCE_HINT, check_grid, check_hounsfield
from custom.user_inputs import as_bool

__all__ = ["InvalidValuesError", "check_hounsfield", "check_inference_inputs", "check_output_dir", "check_volume_file"]

#: A .nii.gz whose voxels take more than this many times its own size is refused before reading: CT compresses
#: about 2 to 10 times; a file that declares gigabytes of (nearly) one value is not a CT.
MAX_GZIP_RATIO = 200

GZIP_MAGIC = b"\x1f\x8b"


def _check_gzip_start(path: Path) -> None:
    """Refuse a file that does not start as a gzip stream."""
    with open(path, "rb") as stream:
        magic = stream.read(2)
    if magic != GZIP_MAGIC:
        raise damaged_gzip_error(path, OSError(f"no gzip header (starts with {magic!r})"))


def _check_gzip_length(path: Path, expected: int) -> None:
    """Refuse a gzip file cut short, reading its last 4 bytes only: the length the gzip trailer gives (ISIZE, modulo
    2**32) must be the header's size plus its voxels'. When it is not (a file cut short, or a stream of several gzip
    members, as bgzip writes, whose last member gives its own length), the whole stream is read to decide. The CRC
    is checked when the voxels are read (:class:`~custom.clinical.dicom_series.CheckedNibabelReader`)."""
    with open(path, "rb") as stream:
        stream.seek(0, os.SEEK_END)
        if stream.tell() >= 18:  # a gzip header and trailer at least
            stream.seek(-4, os.SEEK_END)
            if int.from_bytes(stream.read(4), "little") == expected % (1 << 32):
                return
    size = read_whole_gzip(path)
    if size < expected:
        raise NoImageError(
            f"'{path}' is cut short: its header describes {expected} bytes but its gzip stream holds {size}. "
            "Copy or export the file again."
        )


def _check_nifti_geometry(path: Path, image):
    """Refuse a NIfTI whose header gives no usable voxel size or position (nibabel would read 0 mm as 1 mm); return
    the header as stored."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as stream:  # the header as stored: nibabel's loader turns 0 mm into 1 mm
        stored = type(image.header).from_fileobj(stream, check=False)
    pixdim = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
    linear = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    problem = None
    if int(stored["sform_code"]) == 0 and (not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0)):
        problem = f"voxel sizes {pixdim.tolist()} mm in its header (pixdim)"
    elif not np.all(np.isfinite(linear)) or abs(np.linalg.det(linear)) < 1e-9:
        problem = "a voxel-to-world matrix (qform/sform) that is not invertible"
    if problem:
        raise NoImageError(
            f"'{path}' has {problem}: lesion sizes and the model's scale depend on real voxel sizes in mm. "
            "Export the CT again with its spacing and orientation (e.g. from the DICOM series with dcm2niix)."
        )
    return stored


def _check_nifti_scaling(path: Path, stored, require_ct: bool) -> None:
    """Refuse a NIfTI whose stored value scaling (scl_slope, scl_inter) is not finite, or (``require_ct``) inverts
    the values (a negative slope turns air into bone)."""
    slope, inter = float(stored["scl_slope"]), float(stored["scl_inter"])
    if slope == 0 or np.isnan(slope):  # "no scaling" (the NIfTI standard's 0; NaN as nibabel writes and reads it)
        return
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise NoImageError(
            f"'{path}' has value scaling scl_slope {slope:g}, scl_inter {inter:g} in its header, which gives no "
            "usable values. Export the CT again (scl_slope 1 and scl_inter 0 for values stored in HU)."
        )
    if require_ct and slope < 0:
        raise NotCTError(
            f"'{path}' has a negative scl_slope ({slope:g}), which inverts its values (air would read as bone): it is "
            f"not a CT in Hounsfield units as stored. Export the CT again in HU, or {FORCE_HINT} to run anyway."
        )


def check_volume_file(path: str | os.PathLike, series_uid: str | None = None, require_ct: bool = True) -> dict:
    """Check one input by its headers; return ``{"dicom": bool, "dicom_seg": bool}`` (whether the mask can be
    written as DICOM-SEG), or raise a :class:`ClinicalInputError` naming the problem and the fix."""
    path = Path(path)
    reader = clinical_reader_for(path, series_uid, require_ct)
    if is_nifti_path(path):
        compressed = path.name.lower().endswith(".gz")
        if compressed:
            _check_gzip_start(path)
        try:
            image = nib.load(str(path))
            shape = tuple(int(s) for s in image.shape)
            dtype = image.get_data_dtype()
        except Exception as err:
            if compressed:
                read_whole_gzip(path)  # a damaged stream is named as such
            raise NoImageError(
                f"Cannot read '{path}' as NIfTI ({type(err).__name__}: {err}). Pass a NIfTI CT volume."
            ) from err
        expected = int(image.dataobj.offset) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if len(shape) >= 3:
            check_grid(shape, [float(v) for v in image.header.get_zooms()[:3]], str(path), require_ct)
        if compressed and expected > MAX_GZIP_RATIO * max(path.stat().st_size, 1) and expected > (64 << 20):
            raise NoImageError(
                f"'{path}' declares {expected / 2**30:.3g} GiB of voxels in a {path.stat().st_size / 2**20:.3g} MiB "
                f"file (more than {MAX_GZIP_RATIO} times its size: nearly one value throughout), which no CT is. "
                "Pass the CT volume itself."
            )
        if compressed:
            _check_gzip_length(path, expected)
        elif path.stat().st_size < expected:
            raise NoImageError(
                f"'{path}' is cut short: its header describes {expected} bytes but the file has {path.stat().st_size}. "
                "Copy or export the file again."
            )
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3 or min(shape) < 1:
            raise NoImageError(
                f"'{path}' has shape {shape}: the model needs one 3D CT volume (x, y, slices). "
                + (
                    "Pass the whole series, not one 2D image."
                    if len(shape) < 3
                    else "Split the 4D file and pass one volume."
                )
            )
        stored = _check_nifti_geometry(path, image)
        _check_nifti_scaling(path, stored, require_ct)
        if np.dtype(dtype).kind == "c":
            raise NoImageError(
                f"'{path}' stores complex ({np.dtype(dtype).name}) voxels; a CT holds real Hounsfield units. "
                "Pass the CT volume in HU (real-valued)."
            )
        if require_ct and np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.bool_)):
            raise NotCTError(
                f"'{path}' stores {np.dtype(dtype).name} voxels, which cannot hold Hounsfield units (air is -1000 HU): "
                f"it is not a CT in HU (a screenshot or a mask?). Pass the CT volume, or {FORCE_HINT} to run anyway."
            )
        return {"dicom": False, "dicom_seg": False}
    assert isinstance(reader, CTSeriesReader)
    headers = reader.select_slices(str(path))
    has_frame = all(str(h.header.get("FrameOfReferenceUID", "") or "") for h in headers)
    return {"dicom": True, "dicom_seg": has_frame}


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried for real: permission bits do not bind root)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lsms-write-test-"):
            return True
    except OSError:
        return False


#: Folders of a bundle that hold what it ships; patient results never go into them.
BUNDLE_CONTENT = ("configs", "models", "docs", "sample", "custom")
#: The folder that holds this ``custom`` package: the repository checkout, or a packaged bundle.
CODE_ROOT = Path(__file__).resolve().parents[2]


def _protected_folders(bundle_root: str | os.PathLike | None) -> tuple[list[Path], list[Path]]:
    """(folders that are never an output folder themselves, folders whose whole tree is never written)."""
    roots = [CODE_ROOT] + ([Path(bundle_root).resolve()] if bundle_root not in (None, "") else [])
    trees = [CODE_ROOT / "custom"] + [root / name for root in roots for name in BUNDLE_CONTENT]
    return roots, trees


def check_output_dir(
    output_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] = (),
    bundle_root: str | os.PathLike | None = None,
) -> Path:
    """The output folder, resolved; refused if it is not given, cannot be made or written, lies in an input DICOM
    series, or is the bundle (or the checkout holding it) or one of the folders the bundle ships
    (:data:`BUNDLE_CONTENT` of ``bundle_root`` and of :data:`CODE_ROOT`)."""
    if output_dir is None or not str(output_dir).strip():
        raise ProtectedInputError(
            "The output folder is empty (--output_dir ''). Pass a folder, e.g. --output_dir outputs."
        )
    out = Path(output_dir).expanduser()
    resolved = out.resolve()
    roots, trees = _protected_folders(bundle_root)
    if resolved in roots or any(_inside(resolved, tree) for tree in trees):
        raise ProtectedInputError(
            f"The output folder '{out}' is {'' if resolved in roots else 'inside '}the bundle's own files (weights, "
            "configs, code); patient results are never written there. Pass a folder of its own, e.g. "
            "--output_dir outputs."
        )
    if resolved.exists() and not resolved.is_dir():
        raise ProtectedInputError(f"The output folder '{out}' is a file. Pass a folder with --output_dir.")
    existing = next((p for p in (resolved, *resolved.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not _can_create_in(existing):
        raise ProtectedInputError(
            f"The output folder '{out}' cannot be written ('{existing}' is not writable). Pass a writable --output_dir."
        )
    for source in map(lambda p: Path(p).resolve(), inputs):
        if source.is_dir() and _inside(resolved, source):
            raise ProtectedInputError(
                f"The output folder '{out}' is inside the input series folder '{source}'; outputs are never written "
                "into an input. Pass another --output_dir."
            )
    return resolved


def _unique_case_ids(paths: Sequence[Path]) -> list[str]:
    """Case ids from the input names; inputs that share a name get their parent folders' names in front."""
    resolved = [p.resolve() for p in paths]
    ids = [case_id_of(str(p)) for p in paths]
    depth = 1
    while True:
        owners: dict[str, set[Path]] = {}
        for case_id, path in zip(ids, resolved):
            owners.setdefault(case_id, set()).add(path)
        clashes = {c for c, members in owners.items() if len(members) > 1}
        if not clashes or depth > 8:
            return ids
        for n, (case_id, path) in enumerate(zip(ids, resolved)):
            if case_id in clashes:
                parents = [p.name for p in path.parents][:depth][::-1]
                ids[n] = "_".join([*parents, case_id_of(str(path))]) if parents else f"{case_id}_{n}"
        depth += 1


def check_inference_inputs(
    items: Sequence[Mapping],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    montage: bool = False,
    series_uid: str | None = None,
    require_ct: bool = True,
    bundle_root: str | os.PathLike | None = None,
) -> list[dict]:
    """Check every (image, prompt) item and its outputs before the model runs; return the items with ``case_id``.

    Args:
        items: ``{"image": path, "text": prompt}`` dicts (e.g. from :func:`custom.prompts.prompt_items`).
        output_dir: root folder of the outputs.
        overwrite: replace existing outputs; otherwise an existing output is refused here, before any model work.
        montage: the run also writes montages (their paths are checked too).
        series_uid: the series to read from DICOM folders holding several.
        require_ct: refuse inputs that are not CT (DICOM modality, uint8 NIfTI, HU range after loading).
        bundle_root: the bundle folder, whose shipped content is never an output folder (:func:`check_output_dir`).
    """
    overwrite, montage, require_ct = (
        as_bool(overwrite, "overwrite"),
        as_bool(montage, "montage"),
        as_bool(require_ct, "require_ct"),
    )
    if not items:
        raise NoImageError("Nothing to run: the input list is empty. Give --image, or a --datalist with entries.")
    paths = [Path(str(item["image"])) for item in items]
    formats = {}
    for path in dict.fromkeys(paths):
        formats[path] = check_volume_file(path, series_uid, require_ct)
    out = check_output_dir(output_dir, [p for p in paths if formats[p]["dicom"]], bundle_root)
    writer = ReferringOutputWriter(out, overwrite=overwrite, montage=montage)
    checked, owners = [], {}
    for item, path, case_id in zip(items, paths, _unique_case_ids(paths)):
        text = str(item["text"])
        planned = writer.output_paths(case_id, expression_slug(text), formats[path]["dicom_seg"])
        check_case_folder(planned["mask"].parent)
        for source in (p.resolve() for p in paths if formats[p]["dicom"]):
            if _inside(planned["mask"].parent, source):
                raise ProtectedInputError(
                    f"The outputs of '{path}' would go to '{planned['mask'].parent}', the input series folder "
                    f"'{source}'; outputs are never written into an input. Pass another --output_dir."
                )
        for kind, target in planned.items():
            if target in owners:
                raise ClinicalInputError(
                    f"'{path}' with the prompt {text!r} is listed twice (both would write '{target}'). "
                    "Remove the repeated entry."
                )
            owners[target] = path
            if target.is_symlink() or target.is_dir():
                raise ProtectedInputError(
                    f"The output '{target}' exists as a {'symbolic link' if target.is_symlink() else 'folder'}; "
                    "outputs are written as new files only. Move it, or pass another --output_dir."
                )
            if not overwrite and target.exists():
                raise OutputExistsError(target)
        checked.append(
            {**item, "case_id": case_id, "output_format": "dicom-seg" if formats[path]["dicom_seg"] else "nifti"}
        )
    return checked
