"""Read a CT DICOM series (or a NIfTI file) into a Hounsfield-unit volume that MONAI pipelines can use.

``CTSeriesReader`` is MONAI's ``PydicomReader`` (which applies RescaleSlope/Intercept and builds the affine) with the
checks a clinical input needs and that ``PydicomReader`` lacks: it picks one series (or the one named by
``series_uid``), sorts the slices by their position along the slice normal (``PydicomReader`` sorts by
InstanceNumber), and refuses mixed series, gaps, duplicate positions, inconsistent slices and non-CT modalities with
named errors. Its metadata keeps what is needed to map a mask back to the source frames for DICOM-SEG.

Data flow (DICOM): folder -> ``CTSeriesReader`` -> array (columns, rows, slices) in *source frame order* with an RAS
affine (``original_affine``) -> ``Orientation(axcodes="RAS")`` -> model -> mask on the RAS grid ->
:func:`ras_mask_to_source_frames` -> (frames, rows, columns) in the order of ``meta["source_files"]`` -> DICOM-SEG.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
from isal import igzip, isal_zlib
from monai.config import KeysCollection, PathLike
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImage, MapTransform, Orientation
from monai.utils import MetaKeys, ensure_tuple
from nibabel.arrayproxy import ArrayProxy
from pydicom.errors import InvalidDicomError

from custom.clinical.errors import (
    ClinicalInputError,
    InvalidGeometryError,
    MissingSliceError,
    MixedSeriesError,
    NoImageError,
    NotCTError,
)
from custom.clinical.geometry import affine_of, as_spatial_array, reorient_to
from custom.clinical.volume_checks import check_hounsfield

__all__ = [
    "ClinicalInputWarning",
    "CTSeriesReader",
    "LoadClinicalImaged",
    "load_clinical_image",
    "load_ct_ras",
    "is_nifti_path",
    "ras_mask_to_source_frames",
    "read_source_datasets",
]

#: DICOM objects that may sit next to images in a series folder but hold no image to read.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC", "PLAN"})

#: A step between neighbouring slices larger than this multiple of the series' median step is a gap.
GAP_FACTOR = 1.5

#: Relative deviation of a slice step from the median step that is reported as irregular spacing.
IRREGULAR_SPACING_TOLERANCE = 0.01

#: Axis labels of the RAS world that NIfTI and ``CTSeriesReader`` affines use (MONAI's ``Orientation`` labels).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: Tolerance for direction cosines and pixel spacings that must agree between slices.
GEOMETRY_TOLERANCE = 1e-4


class ClinicalInputWarning(UserWarning):
    """A property of the input that leaves the results valid but deserves attention."""


class _SliceHeader:
    """One DICOM file's path and header (read without pixel data)."""

    def __init__(self, path: str, header: pydicom.Dataset):
        self.path = path
        self.header = header

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", "<no SeriesInstanceUID>"))

    @property
    def position(self) -> np.ndarray:
        return np.asarray(self.header.ImagePositionPatient, dtype=np.float64)

    @property
    def orientation(self) -> np.ndarray:
        return np.asarray(self.header.ImageOrientationPatient, dtype=np.float64)


def is_nifti_path(path: PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def is_dicom_input(path: PathLike) -> bool:
    """Whether ``path`` is a folder (a series) or a DICOM file (``.dcm`` suffix or a DICM preamble)."""
    path = Path(path)
    if path.is_dir():
        return True
    return path.is_file() and (path.suffix.lower() == ".dcm" or pydicom.misc.is_dicom(str(path)))


def list_candidate_files(paths: Sequence[PathLike], recursive: bool = False) -> list[str]:
    """Expand folders into the files they hold (hidden files skipped), sorted by name; files are kept as given."""
    files: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise NoImageError(f"Input '{path}' does not exist. Pass an existing DICOM series folder or file.")
        if path.is_file():
            files.append(str(path))
            continue
        pattern = "**/*" if recursive else "*"
        files += sorted(str(p) for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
    return files


def read_headers(files: Sequence[str]) -> tuple[list[_SliceHeader], list[str]]:
    """Read the headers of the DICOM image files among ``files``; return them and the skipped files with reasons."""
    headers, skipped = [], []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            skipped.append(f"{path} (not a readable DICOM file: {err})")
            continue
        modality = str(header.get("Modality", "")).upper()
        if "Rows" not in header or "SegmentSequence" in header or modality in NON_IMAGE_MODALITIES:
            skipped.append(f"{path} (DICOM object without an image: modality '{modality or '?'}')")
            continue
        headers.append(_SliceHeader(path, header))
    return headers, skipped


def describe_series(groups: Mapping[str, list[_SliceHeader]]) -> str:
    """One line per series: UID, modality, number of images and description."""
    lines = []
    for uid, members in groups.items():
        header = members[0].header
        description = header.get("SeriesDescription", "") or "(no description)"
        lines.append(f"  - {uid}: {header.get('Modality', '?')}, {len(members)} image(s), {description}")
    return "\n".join(lines)


def select_series(headers: Sequence[_SliceHeader], series_uid: str | None, source: str) -> list[_SliceHeader]:
    """Return the headers of the one series of the input, or of the series named by ``series_uid``."""
    groups: dict[str, list[_SliceHeader]] = {}
    for item in headers:
        groups.setdefault(item.series_uid, []).append(item)
    if series_uid is not None:
        if series_uid not in groups:
            raise NoImageError(
                f"Series '{series_uid}' is not in {source}. The series found are:\n{describe_series(groups)}"
            )
        return groups[series_uid]
    if len(groups) > 1:
        raise MixedSeriesError(
            f"{source} holds {len(groups)} DICOM series:\n{describe_series(groups)}\n"
            "Choose one with --series_uid <SeriesInstanceUID> (series_uid= in Python)."
        )
    return next(iter(groups.values()))


def check_modality(series: Sequence[_SliceHeader], require_ct: bool = True) -> None:
    """Raise ``NotCTError`` unless every image of the series has modality CT (skipped if ``require_ct`` is False)."""
    if not require_ct:
        return
    modalities = sorted({str(item.header.get("Modality", "")).upper() for item in series})
    if modalities != ["CT"]:
        found = ", ".join(m or "<missing Modality tag>" for m in modalities)
        raise NotCTError(
            f"Series {series[0].series_uid} has modality {found}, but LSMS needs CT (values in Hounsfield units). "
            "Choose a CT series with --series_uid, or pass --require_ct false (require_ct=False in Python) to read it "
            "anyway at your own risk."
        )


def check_same_frame_geometry(series: Sequence[_SliceHeader]) -> None:
    """Raise ``InvalidGeometryError`` unless all slices share orientation, pixel spacing and size."""
    required = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    for item in series:
        missing = [tag for tag in required if tag not in item.header]
        if missing:
            raise InvalidGeometryError(
                f"'{item.path}' lacks {', '.join(missing)}, so its slice cannot be placed in space. "
                "Export the series with its geometry tags (the CT Image module requires them)."
            )
        if int(item.header.get("NumberOfFrames", 1) or 1) > 1:
            raise InvalidGeometryError(
                f"'{item.path}' is a multi-frame (enhanced) image, which this reader does not support. "
                "Export the series as single-frame (classic) CT images."
            )
    first = series[0]
    for item in series[1:]:
        for tag in ("ImageOrientationPatient", "PixelSpacing"):
            if not np.allclose(item.header[tag].value, first.header[tag].value, atol=GEOMETRY_TOLERANCE):
                raise InvalidGeometryError(
                    f"{tag} differs between '{first.path}' ({list(first.header[tag].value)}) and "
                    f"'{item.path}' ({list(item.header[tag].value)}): the slices do not form one volume. "
                    "Select a single consistent series (`series_uid`) or re-export it."
                )
        if (item.header.Rows, item.header.Columns) != (first.header.Rows, first.header.Columns):
            raise InvalidGeometryError(
                f"Image size differs between '{first.path}' ({first.header.Rows}x{first.header.Columns}) and "
                f"'{item.path}' ({item.header.Rows}x{item.header.Columns}): the slices do not form one volume."
            )


def slice_normal(orientation) -> np.ndarray:
    """Unit normal (LPS) of slices with ImageOrientationPatient ``orientation`` (row cosines, column cosines)."""
    orientation = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def sort_by_position(series: Sequence[_SliceHeader]) -> tuple[list[_SliceHeader], np.ndarray]:
    """Sort slices by their position along the slice normal (ascending); return them and those positions (mm)."""
    normal = slice_normal(series[0].orientation)
    positions = np.array([item.position @ normal for item in series])
    order = np.argsort(positions, kind="stable")
    return [series[i] for i in order], positions[order]


def _slice_label(item: _SliceHeader) -> str:
    number = item.header.get("InstanceNumber", None)
    return f"'{item.path}'" + (f" (InstanceNumber {number})" if number is not None else "")


def check_slice_steps(series: Sequence[_SliceHeader], positions: np.ndarray) -> float:
    """Check the steps between sorted slice positions; return the mean step (mm).

    Raises ``InvalidGeometryError`` for slices at the same position and ``MissingSliceError`` for a gap (a step above
    ``GAP_FACTOR`` times the median step); warns for irregular but gap-free spacing and for sheared (tilted) stacks.
    """
    if len(series) < 2:
        return float("nan")
    steps = np.diff(positions)
    median = float(np.median(steps))
    duplicates = np.flatnonzero(steps < max(1e-3, 1e-3 * median))
    if duplicates.size or median <= 0:
        i = int(duplicates[0]) if duplicates.size else 0
        raise InvalidGeometryError(
            f"{_slice_label(series[i])} and {_slice_label(series[i + 1])} lie at the same position "
            f"({positions[i]:.3f} mm along the slice normal). The series seems to hold several acquisitions or "
            "phases; export them as separate series and choose one with `series_uid`."
        )
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        i = int(gaps[0])
        missing = max(1, int(round(steps[i] / median)) - 1)
        raise MissingSliceError(
            f"Gap in the series: {steps[i]:.2f} mm between {_slice_label(series[i])} at {positions[i]:.2f} mm and "
            f"{_slice_label(series[i + 1])} at {positions[i + 1]:.2f} mm along the slice normal, where the "
            f"series' slice spacing is {median:.2f} mm; about {missing} slice(s) missing"
            + (f" ({gaps.size} gap(s) in all)" if gaps.size > 1 else "")
            + ". Re-export the complete series."
        )
    if np.max(np.abs(steps - median)) > IRREGULAR_SPACING_TOLERANCE * median:
        warnings.warn(
            f"Slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm; the volume uses the mean spacing "
            f"{steps.mean():.3f} mm, so positions and measurements along the slice axis are approximate.",
            ClinicalInputWarning,
            stacklevel=3,
        )
    normal = slice_normal(series[0].orientation)
    shift = series[-1].position - series[0].position
    in_plane = np.linalg.norm(shift - (shift @ normal) * normal)
    if in_plane > 1e-2 * len(series):
        warnings.warn(
            f"The slice positions drift {in_plane:.2f} mm within the slice plane (gantry tilt); the volume's affine is "
            "sheared accordingly.",
            ClinicalInputWarning,
            stacklevel=3,
        )
    return float(steps.mean())


def single_slice_step(header: pydicom.Dataset) -> float:
    """Slice thickness (mm) to give a one-slice volume: SpacingBetweenSlices, else SliceThickness, else 1."""
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        value = header.get(tag, None)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return 1.0


class CTSeriesReader(PydicomReader):
    """MONAI ``ImageReader`` for one CT DICOM series, with the checks of a clinical input.

    Output of ``get_data``: a float32 array in Hounsfield units of shape (columns, rows, slices), slices sorted by
    position along the slice normal, and metadata with the RAS ``affine`` / ``original_affine`` plus
    ``SeriesInstanceUID``, ``StudyInstanceUID``, ``Modality``, ``SeriesDescription``, ``source_files`` and
    ``source_sop_instance_uids``/``source_instance_numbers`` (one per slice, in array order).

    Args:
        series_uid: SeriesInstanceUID of the series to read when the input holds several.
        require_ct: refuse series whose Modality is not CT (``NotCTError``).
        recursive: also look for DICOM files in sub-folders of a given folder.
        kwargs: passed to ``pydicom.dcmread`` for the pixel read.

    Input: a series folder, a single DICOM file, or a list of DICOM files of one series.

    Use it through :class:`LoadClinicalImaged` / :func:`load_clinical_image` (or ``LoadImage(...)(path, reader)``):
    a reader given to ``LoadImage``'s constructor is tried first, but on any error ``LoadImage`` falls back to its
    default readers, which would read a mixed or gapped series without complaint.
    """

    def __init__(self, series_uid: str | None = None, require_ct: bool = True, recursive: bool = False, **kwargs):
        super().__init__(affine_lps_to_ras=True, swap_ij=True, prune_metadata=True, **kwargs)
        self.series_uid = series_uid
        self.require_ct = require_ct
        self.recursive = recursive
        self._series_meta: dict = {}

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every name is a folder or a DICOM file."""
        return all(is_dicom_input(name) for name in ensure_tuple(filename))

    def select_slices(self, data: Sequence[PathLike] | PathLike) -> list[_SliceHeader]:
        """Headers of the selected series' slices, checked and sorted by position."""
        names = [str(name) for name in ensure_tuple(data)]
        source = f"'{names[0]}'" if len(names) == 1 else f"the {len(names)} given files"
        headers, skipped = read_headers(list_candidate_files(names, self.recursive))
        if not headers:
            detail = "\n".join(f"  - {s}" for s in skipped[:10]) or "  (no files)"
            raise NoImageError(
                f"No DICOM image found in {source}:\n{detail}\nPass a DICOM series folder, a DICOM image file, or a "
                "NIfTI file (.nii / .nii.gz)."
            )
        series = select_series(headers, self.series_uid, source)
        check_modality(series, self.require_ct)
        check_same_frame_geometry(series)
        series, positions = sort_by_position(series)
        step = check_slice_steps(series, positions)
        if skipped and len(names) == 1 and Path(names[0]).is_dir():
            warnings.warn(
                f"Skipped {len(skipped)} file(s) without a DICOM image in {source}, e.g. {skipped[0]}.",
                ClinicalInputWarning,
                stacklevel=2,
            )
        self._series_meta = self.series_metadata(series, step)
        return series

    @staticmethod
    def series_metadata(series: Sequence[_SliceHeader], step: float) -> dict:
        """Series identity and per-slice source references (in array order) kept in the image metadata."""
        first = series[0].header
        return {
            "SeriesInstanceUID": series[0].series_uid,
            "StudyInstanceUID": str(first.get("StudyInstanceUID", "")),
            "Modality": str(first.get("Modality", "")),
            "SeriesDescription": str(first.get("SeriesDescription", "")),
            "FrameOfReferenceUID": str(first.get("FrameOfReferenceUID", "") or ""),
            "source_files": [item.path for item in series],
            "source_sop_instance_uids": [str(item.header.get("SOPInstanceUID", "")) for item in series],
            "source_instance_numbers": [int(item.header.get("InstanceNumber", -1) or -1) for item in series],
            "slice_step_mm": step if np.isfinite(step) else single_slice_step(first),
        }

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        """Select, check and sort the series; return its pydicom datasets (with pixel data) in position order."""
        series = self.select_slices(data)
        options = {**self.kwargs, **kwargs}
        self.filenames = [[item.path for item in series]]
        self.has_series = True
        return [pydicom.dcmread(item.path, **options) for item in series]

    def _combine_dicom_series(self, data: Sequence[pydicom.Dataset], filenames: Sequence[PathLike]):
        """Stack the position-sorted slices along a last axis (``PydicomReader`` would re-sort by InstanceNumber)."""
        arrays = [self._get_array_data(ds, name) for ds, name in zip(data, filenames)]
        stack = np.stack(arrays, axis=-1).astype(np.float32, copy=False)
        metadata = self._get_meta_dict(data[0])
        pixel_spacing = [float(v) for v in data[0].PixelSpacing]
        metadata["spacing"] = np.asarray([*pixel_spacing, self._series_meta["slice_step_mm"]])
        metadata["lastImagePositionPatient"] = np.asarray(data[-1].ImagePositionPatient, dtype=np.float64)
        metadata[MetaKeys.SPATIAL_SHAPE] = stack.shape
        metadata.update(self._series_meta)
        return stack, metadata

    def _get_affine(self, metadata: dict, lps_to_ras: bool = True):
        """``PydicomReader``'s affine, with the slice thickness along the normal for a one-slice volume."""
        affine = super()._get_affine(metadata, lps_to_ras=False)
        if metadata[MetaKeys.SPATIAL_SHAPE][-1] == 1:
            normal = slice_normal(metadata["00200037"]["Value"])
            affine[:3, 2] = normal * float(metadata.get("slice_step_mm", 1.0))
        return orientation_ras_lps(affine) if lps_to_ras else affine

    def _get_array_data(self, img, filename):
        """Pixel values with RescaleSlope/Intercept applied (HU), as float32; a clear error if undecodable."""
        if "PixelData" not in img and "FloatPixelData" not in img and "DoubleFloatPixelData" not in img:
            raise NoImageError(
                f"'{filename}' holds no pixel data (a DICOM header without its image: a structured report, a "
                "presentation state, or a file saved without pixels). Pass the folder of the CT image slices."
            )
        try:
            data = super()._get_array_data(img, filename)
        except Exception as err:  # pydicom raises several types for undecodable pixel data
            raise NoImageError(
                f"Cannot decode the pixel data of '{filename}' ({type(err).__name__}: {err}). For compressed transfer "
                "syntaxes install a pydicom pixel plugin (pylibjpeg, gdcm), or re-export the series uncompressed."
            ) from err
        return np.asarray(data, dtype=np.float32)


def read_source_datasets(meta: Mapping) -> list[pydicom.Dataset]:
    """Headers (no pixel data) of a loaded series' source images, in array order, from ``meta["source_files"]``."""
    files = meta.get("source_files")
    if not files:
        raise ValueError("The metadata has no 'source_files': it does not come from `CTSeriesReader`.")
    return [pydicom.dcmread(str(path), stop_before_pixels=True) for path in files]


# what reading a damaged gzip stream with ``igzip`` raises: a bad CRC or length (``gzip.BadGzipFile``, an
# ``OSError``), a stream cut short (``EOFError``), undecodable data (``isal_zlib.error``)
_GZIP_ERRORS = (OSError, EOFError, isal_zlib.error)


def damaged_gzip_error(path: PathLike, err: BaseException) -> NoImageError:
    """The error that names a damaged (or not) gzip file ``path`` and what to do."""
    return NoImageError(
        f"'{path}' is a damaged gzip file ({type(err).__name__}: {err}); its voxels cannot be trusted. "
        "Copy or export the file again."
    )


def read_whole_gzip(path: PathLike) -> int:
    """Read the whole gzip stream of ``path``, so that its CRC and length are checked, and return its decompressed
    size; a damaged stream raises the named :class:`NoImageError`."""
    size = 0
    try:
        with igzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                size += len(chunk)
    except _GZIP_ERRORS as err:
        raise damaged_gzip_error(path, err) from err
    return size


class CheckedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` that checks the whole gzip stream of a ``.nii.gz`` while reading its voxels once.

    nibabel stops reading at the last voxel, before the gzip trailer, so a damaged file (a wrong CRC or length)
    would be read silently. Here the voxels are read through nibabel's own ``ArrayProxy`` from one gzip stream that
    is then read to its end, which makes the gzip reader check the CRC and length: one decompression, the same
    array; a damaged file raises the named :class:`NoImageError`. Other files are read as ``NibabelReader`` reads
    them. Either way the voxels come laid out in C order (:func:`in_c_order`).
    """

    def _get_array_data(self, img, filename):
        proxy = img.dataobj
        if not (str(filename).lower().endswith(".gz") and isinstance(proxy, ArrayProxy)):
            return in_c_order(super()._get_array_data(img, filename))
        spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        try:
            with igzip.open(filename, "rb") as stream:
                data = np.asanyarray(ArrayProxy(stream, spec, order=proxy.order))
                while stream.read(1 << 20):  # the rest of the stream: its end checks the CRC and the length
                    pass
        except _GZIP_ERRORS as err:
            raise damaged_gzip_error(filename, err) from err
        return in_c_order(data)


def in_c_order(array: np.ndarray) -> np.ndarray:
    """``array`` laid out in C order, the layout MONAI's transforms make of it anyway (same shape and values).

    A NIfTI file stores its first axis fastest (Fortran order). PyTorch's copy transposes in tiles on all its threads,
    about twice as fast as numpy's on 2 cores (0.10 s against 0.19 s for a 512x512x120 int16 CT); numpy's copy
    serves the types PyTorch does not hold (non-native byte order, for one) and read-only arrays.
    """
    if array.flags.c_contiguous or not array.flags.writeable:
        return np.ascontiguousarray(array)
    try:
        return torch.from_numpy(array).contiguous().numpy()
    except (TypeError, ValueError):
        return np.ascontiguousarray(array)


def _nifti_reader_or_error(path: Path) -> NibabelReader:
    if not path.exists():
        raise NoImageError(f"Input '{path}' does not exist.")
    if not path.is_file():  # a folder, a FIFO or a device named .nii.gz: reading it could block for ever
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe, socket or device)"
        raise NoImageError(f"'{path}' is {kind}. Pass the NIfTI file itself, saved on disk.")
    return CheckedNibabelReader()


def clinical_reader_for(path: PathLike, series_uid: str | None = None, require_ct: bool = True):
    """The reader for ``path``: ``NibabelReader`` for NIfTI, ``CTSeriesReader`` for a DICOM folder or file."""
    path = Path(path)
    if is_nifti_path(path):
        return _nifti_reader_or_error(path)
    if not path.exists():
        raise NoImageError(f"Input '{path}' does not exist. Pass a DICOM series folder, a DICOM file or a NIfTI file.")
    if is_dicom_input(path):
        return CTSeriesReader(series_uid=series_uid, require_ct=require_ct)
    raise NoImageError(
        f"'{path}' is neither a NIfTI file (.nii, .nii.gz) nor a DICOM file or series folder. "
        "Pass the CT as a DICOM series folder or a NIfTI file."
    )


def load_clinical_image(path: PathLike, series_uid: str | None = None, require_ct: bool = True) -> MetaTensor:
    """Load a NIfTI file or a CT DICOM series as a channel-first ``MetaTensor`` (1, X, Y, Z) in its source grid.

    Voxels stored as integers of up to 16 bits without scaling (a NIfTI file of int16: most CT files) keep their
    type, which holds them exactly in half the memory; every other volume (a DICOM series in HU, a scaled, float or
    wider-integer NIfTI) is float32. Named ``ClinicalInputError`` subclasses reach the caller unchanged
    (``LoadImage`` with a runtime reader does not fall back to other readers that would read a mixed or gapped series
    silently).
    """
    reader = clinical_reader_for(path, series_uid, require_ct)
    try:
        image = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=None)(path, reader)
        if image.is_floating_point() or image.dtype == torch.bool or image.element_size() > 2:
            image = image.to(torch.float32)
        return image
    except ClinicalInputError:
        raise
    except Exception as err:
        if isinstance(reader, NibabelReader):
            if str(path).lower().endswith(".gz"):
                read_whole_gzip(path)  # a damaged stream is named as such
            raise NoImageError(f"Cannot read '{path}' as NIfTI ({type(err).__name__}: {err}).") from err
        raise


def load_ct_ras(path: PathLike, series_uid: str | None = None, require_ct: bool = True) -> MetaTensor:
    """Load a NIfTI file or a CT DICOM series as (1, X, Y, Z) HU in RAS orientation (``Orientation(axcodes="RAS")``).

    ``meta["original_affine"]`` keeps the source grid's affine, which the writers use to map a mask back.
    """
    return Orientation(axcodes="RAS", labels=RAS_LABELS)(load_clinical_image(path, series_uid, require_ct))


class LoadClinicalImaged(MapTransform):
    """Dictionary transform: load NIfTI or CT DICOM series paths as channel-first ``MetaTensor`` in source grid.

    Follow it with ``Orientationd(keys, axcodes="RAS")`` so that MONAI's ``Invertd`` can map predictions back.

    Args:
        keys: keys of the paths to load.
        series_uid: SeriesInstanceUID to read when a DICOM input holds several series.
        require_ct: refuse non-CT DICOM series.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        require_ct: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        from custom.user_inputs import as_bool

        self.series_uid = series_uid or None
        self.require_ct = as_bool(require_ct, "require_ct")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = str(d[key])
            d[key] = load_clinical_image(source, self.series_uid, self.require_ct)
            check_hounsfield(d[key], source, self.require_ct)
        return d


def ras_mask_to_source_frames(mask_ras, image_meta: Mapping, ras_affine=None) -> np.ndarray:
    """Map a mask on the image's RAS grid back to the source DICOM frames.

    Args:
        mask_ras: (X, Y, Z) or (1, X, Y, Z) mask on the grid of the RAS-oriented image.
        image_meta: metadata of the loaded image (``original_affine``, ``spatial_shape`` and ``source_files``
            from ``CTSeriesReader``; ``affine`` is the RAS affine unless ``ras_affine`` is given).
        ras_affine: affine of ``mask_ras``; defaults to ``mask_ras.affine`` or ``image_meta["affine"]``.

    Returns:
        uint8 array (frames, rows, columns); frame ``i`` belongs to ``image_meta["source_files"][i]``.
    """
    if ras_affine is None:
        ras_affine = getattr(mask_ras, "affine", None)
    if ras_affine is None:
        ras_affine = image_meta[MetaKeys.AFFINE]
    source_affine = affine_of(None, image_meta[MetaKeys.ORIGINAL_AFFINE])
    source_shape = [int(s) for s in ensure_tuple(image_meta[MetaKeys.SPATIAL_SHAPE])]
    grid = reorient_to(as_spatial_array(mask_ras), affine_of(None, ras_affine), source_affine, source_shape)
    frames = np.transpose(grid, (2, 1, 0))  # (columns, rows, slices) -> (slices, rows, columns)
    return np.ascontiguousarray(frames > 0, dtype=np.uint8)
