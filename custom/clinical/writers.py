"""Outputs of one (case, expression): mask (NIfTI or DICOM-SEG), JSON record, PNG overlay and montage.

Every writer is atomic (the file is written under a temporary name in the output folder, flushed, then renamed),
refuses to replace an existing output unless ``overwrite=True`` (``OutputExistsError``), and never writes onto an
input file (``ProtectedInputError``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import textwrap
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from custom.clinical.errors import GeometryMismatchError, OutputExistsError, ProtectedInputError
from custom.clinical.geometry import affine_of, as_binary_uint8, as_spatial_array, reorient_to

__all__ = [
    "atomic_write",
    "file_sha256",
    "write_nifti_mask",
    "write_dicom_seg",
    "write_json_record",
    "window_ct",
    "radiological_view",
    "key_slice_index",
    "write_overlay_png",
    "write_montage",
]

#: Name of the algorithm in DICOM-SEG objects.
ALGORITHM_NAME = "LSMS"

#: Abdominal soft-tissue window (centre, width) in HU.
DEFAULT_WINDOW = (40.0, 400.0)

#: Colour (RGB) and opacity of the referred-lesion fill in overlays.
OVERLAY_COLOR = (255, 64, 32)
OVERLAY_ALPHA = 0.4

PathLike = str | os.PathLike


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def file_sha256(path: PathLike) -> str:
    """sha256 (hex) of the file at ``path``, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temporary_name(out_path: Path) -> Path:
    """A hidden, unique name in the output folder that keeps the output's suffix (writers choose format by it)."""
    suffix = ".nii.gz" if out_path.name.lower().endswith(".nii.gz") else out_path.suffix
    return out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _publish(tmp: Path, out_path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``out_path``; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, out_path)
        return
    try:
        os.link(tmp, out_path)  # fails if out_path exists, even if it appeared after the first check
    except FileExistsError:
        raise OutputExistsError(out_path) from None
    except OSError:  # file system without hard links
        if out_path.exists():
            raise OutputExistsError(out_path) from None
        os.replace(tmp, out_path)
        return
    tmp.unlink()


def atomic_write(
    out_path: PathLike,
    write: Callable[[Path], object],
    overwrite: bool = False,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write a file through ``write(temporary_path)`` and rename it to ``out_path`` once complete.

    Args:
        out_path: the output file; its folder is created if needed.
        write: function that writes the whole file at the path it is given.
        overwrite: replace an existing ``out_path``; otherwise ``OutputExistsError``.
        protected: input files that must never be written (``ProtectedInputError``, even with ``overwrite``).

    Returns:
        ``out_path`` as a ``Path``.
    """
    out_path = Path(out_path)
    for path in protected:
        if out_path.exists() and _same_file(out_path, path):
            raise ProtectedInputError(f"Output path '{out_path}' is the input file '{path}'; choose another path.")
    if out_path.is_dir():
        raise IsADirectoryError(f"Output path '{out_path}' is a folder; give a file name.")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out_path)
    try:
        write(tmp)
        _flush_to_disk(tmp)
        _publish(tmp, out_path, overwrite)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


# --------------------------------------------------------------------------------------------------- NIfTI mask


def _reference_grid(reference) -> tuple[np.ndarray, tuple[int, ...], nib.Nifti1Image | None]:
    """(affine, shape, image or None) of a NIfTI path, a nibabel image, or an (affine, shape) pair."""
    if isinstance(reference, (str, os.PathLike)):
        reference = nib.load(str(reference))
    if isinstance(reference, nib.spatialimages.SpatialImage):
        return np.asarray(reference.affine, dtype=np.float64), tuple(reference.shape[:3]), reference
    affine, shape = reference
    return affine_of(None, affine), tuple(int(s) for s in shape), None


def _nifti_like(data: np.ndarray, affine: np.ndarray, reference: nib.Nifti1Image | None) -> nib.Nifti1Image:
    """A uint8 NIfTI image with the reference's qform/sform (and codes), or ``affine`` with code 1 (scanner).

    Why not MONAI's ``NibabelWriter``: it always sets both the sform and the qform to one affine with code 1, so a
    mask of an input whose qform and sform differ (or carry other codes) would not lie on the input in a viewer that
    reads the other one. The mask keeps the input's header geometry exactly.
    """
    image = nib.Nifti1Image(data.astype(np.uint8, copy=False), affine)
    if isinstance(reference, nib.Nifti1Image):
        sform, sform_code = reference.get_sform(coded=True)
        qform, qform_code = reference.get_qform(coded=True)
        image.set_sform(sform if sform is not None else affine, code=int(sform_code or 0))
        image.set_qform(qform if qform is not None else affine, code=int(qform_code or 0))
        if not sform_code and not qform_code:
            image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def write_nifti_mask(mask, reference, out_path: PathLike, mask_affine=None, overwrite: bool = False) -> Path:
    """Write a binary mask as NIfTI with exactly the input's shape, affine and spacing.

    Args:
        mask: (X, Y, Z) or (1, X, Y, Z) mask on the pipeline's grid (e.g. RAS-oriented); > 0 is foreground.
        reference: the input NIfTI (path or nibabel image), or an ``(affine, shape)`` pair of the input grid.
        out_path: output file (``.nii`` or ``.nii.gz``).
        mask_affine: affine of ``mask``; defaults to ``mask.affine`` (MONAI ``MetaTensor``).
        overwrite: replace an existing output.

    The mask is flipped/permuted back to the input's orientation (exact, no resampling); a mask on a different
    grid raises ``GeometryMismatchError``.
    """
    ref_affine, ref_shape, ref_image = _reference_grid(reference)
    binary = as_binary_uint8(as_spatial_array(mask))
    data = reorient_to(binary, affine_of(mask, mask_affine), ref_affine, ref_shape, order="F")  # NIfTI's own order
    image = _nifti_like(data, ref_affine, ref_image)
    protected = [reference] if isinstance(reference, (str, os.PathLike)) else []
    return atomic_write(out_path, lambda tmp: nib.save(image, str(tmp)), overwrite, protected)


# --------------------------------------------------------------------------------------------------- DICOM-SEG


def _source_headers(source: Sequence) -> list[pydicom.Dataset]:
    """pydicom datasets of the source images (paths are read without pixel data).

    An empty SpecificCharacterSet (present but without a value, as some scanners write it) means the default
    repertoire; it is dropped from a copy of the header, since highdicom refuses '' as a character set."""
    headers = []
    for item in source:
        header = item if isinstance(item, pydicom.Dataset) else pydicom.dcmread(str(item), stop_before_pixels=True)
        if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
            header = copy.copy(header)
            del header.SpecificCharacterSet
        headers.append(header)
    return headers


def _lo(text: str) -> str:
    """Fit ``text`` into a DICOM LO value (64 characters, no backslash)."""
    text = " ".join(str(text).replace("\\", "/").split())
    return text if len(text) <= 64 else text[:63] + "~"


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return f"monai {version('monai')}, highdicom {version('highdicom')}"
    except Exception:  # pragma: no cover - metadata missing in unusual installs
        return "unknown"


def write_dicom_seg(
    mask_frames,
    source,
    out_path: PathLike,
    segment_label: str = "referred lesion",
    description: str | None = None,
    series_number: int = 901,
    algorithm_version: str = "1.0",
    manufacturer: str = "LSMS bundle (MONAI)",
    overwrite: bool = False,
) -> Path:
    """Write a BINARY DICOM-SEG of one segment that references the source CT series.

    Args:
        mask_frames: (frames, rows, columns) mask, frame ``i`` on source image ``i``
            (see ``dicom_series.ras_mask_to_source_frames``).
        source: the source CT images as pydicom datasets or file paths (e.g. ``meta["source_files"]``), in the
            order of ``mask_frames``.
        out_path: output file (``.dcm``).
        segment_label: segment label (DICOM LO, cut to 64 characters).
        description: series and content description, e.g. the referring expression (cut to 64 characters).
        series_number: SeriesNumber of the new segmentation series.
        algorithm_version: version of the LSMS model in the algorithm identification.
        manufacturer: Manufacturer of the segmentation object.
        overwrite: replace an existing output.

    An empty mask gives a valid segmentation with all frames empty ("not present").
    """
    import highdicom as hd  # here, not at the top: its import (0.4 s) is paid by DICOM-SEG outputs only
    from pydicom.sr.codedict import codes

    headers = _source_headers(source)
    mask = as_frames_array(mask_frames)
    expected = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    if mask.shape != expected:
        raise GeometryMismatchError(
            f"The mask has shape {mask.shape} but the source series has {expected[0]} frames of "
            f"{expected[1]}x{expected[2]} pixels (frames, rows, columns); map the mask with "
            "ras_mask_to_source_frames first."
        )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=_lo(segment_label),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    description = _lo(description or f"{ALGORITHM_NAME} referring segmentation")
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_lo(manufacturer),
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=_lo(_software_version()),
        device_serial_number="0",
        series_description=description,
        content_description=description,
        content_label="LSMS",
        omit_empty_frames=bool(mask.any()),
    )
    protected = [item for item in source if isinstance(item, (str, os.PathLike))]
    return atomic_write(out_path, lambda tmp: seg.save_as(str(tmp)), overwrite, protected)


def as_frames_array(mask_frames) -> np.ndarray:
    """A (frames, rows, columns) uint8 0/1 array from a numpy array or tensor."""
    if hasattr(mask_frames, "detach"):
        mask_frames = mask_frames.detach().cpu().numpy()
    mask = np.asarray(mask_frames)
    if mask.ndim != 3:
        raise ValueError(f"Expected mask frames (frames, rows, columns), got shape {mask.shape}.")
    return (mask > 0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- JSON


def write_json_record(record: Mapping, out_path: PathLike, overwrite: bool = False) -> Path:
    """Write the record as indented UTF-8 JSON (NaN/Infinity are refused: use None)."""
    text = json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(out_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)


# --------------------------------------------------------------------------------------------------- PNG


def window_ct(hu, center: float = DEFAULT_WINDOW[0], width: float = DEFAULT_WINDOW[1]) -> np.ndarray:
    """Map HU to uint8 grey levels with a window (centre, width in HU)."""
    low = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / float(width)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def radiological_view(slice_ras: np.ndarray) -> np.ndarray:
    """Turn an axial RAS slice (X toward patient's right, Y toward anterior) into display rows/columns.

    Radiological convention: the patient's right on the image's left, anterior up. Returns (Y, X) with
    ``view[r, c] = slice_ras[X - 1 - c, Y - 1 - r]``.
    """
    return np.ascontiguousarray(np.asarray(slice_ras).T[::-1, ::-1])


def key_slice_index(mask_ras) -> int:
    """Axial index (axis 2) of the slice with the largest mask area; the middle slice for an empty mask."""
    mask = as_spatial_array(mask_ras) > 0
    areas = mask.sum(axis=(0, 1))
    return int(np.argmax(areas)) if areas.any() else mask.shape[2] // 2


def _display_size(shape_yx: tuple[int, int], spacing_xy, min_size: int) -> tuple[int, int]:
    """(width, height) in pixels with square physical pixels, scaled so that the shorter side is >= min_size."""
    sx, sy = (1.0, 1.0) if spacing_xy is None else (float(spacing_xy[0]), float(spacing_xy[1]))
    width_mm, height_mm = shape_yx[1] * sx, shape_yx[0] * sy
    scale = max(min_size / min(width_mm, height_mm), 1.0 / min(sx, sy))
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _overlay_tile(image_slice, mask_slice, window, spacing_xy, min_size: int) -> Image.Image:
    """RGB tile: windowed CT in grey, mask as translucent fill with an opaque outline, radiological view.

    Why not ``monai.visualize.blend_images``: it needs matplotlib (not a dependency of this bundle) for its colour
    map, colours by label value rather than one fixed colour, and draws no outline; the fill here is one line.
    """
    grey = radiological_view(window_ct(image_slice, *window))
    mask = radiological_view(np.asarray(mask_slice) > 0)
    size = _display_size(grey.shape, spacing_xy, min_size)
    rgb = np.array(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR).convert("RGB"), dtype=np.float64)
    mask = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    color = np.array(OVERLAY_COLOR, dtype=np.float64)
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * color
    outline = mask & ~ndimage.binary_erosion(mask, iterations=max(1, size[0] // 256))
    rgb[outline] = color
    tile = Image.fromarray(np.round(rgb).astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    draw.text((4, tile.height // 2), "R", fill=(255, 255, 0))
    draw.text((tile.width - 12, tile.height // 2), "L", fill=(255, 255, 0))
    return tile


def _with_title(tile: Image.Image, title: str | None) -> Image.Image:
    if not title:
        return tile
    font = ImageFont.load_default()
    lines = textwrap.wrap(title, width=max(8, (tile.width - 8) // 6)) or [title]
    line_height = 12
    height = 6 + line_height * len(lines)
    canvas = Image.new("RGB", (tile.width, tile.height + height), (0, 0, 0))
    canvas.paste(tile, (0, height))
    ImageDraw.Draw(canvas).multiline_text((4, 3), "\n".join(lines), fill=(255, 255, 255), font=font, spacing=2)
    return canvas


def _axial_slices(image_ras, mask_ras) -> tuple[np.ndarray, np.ndarray]:
    """3D image and mask as numpy (X, Y, Z) (2D inputs become one slice)."""
    image, mask = np.asarray(_numpy(image_ras)), np.asarray(_numpy(mask_ras))
    if image.ndim == 2:
        image, mask = image[..., None], mask[..., None]
    image, mask = as_spatial_array(image), as_spatial_array(mask)
    if image.shape != mask.shape:
        raise ValueError(f"Image shape {image.shape} and mask shape {mask.shape} differ.")
    return image, mask


def _numpy(volume):
    return volume.detach().cpu().numpy() if hasattr(volume, "detach") else volume


def _spacing_xy(volume, affine):
    if affine is None:
        affine = getattr(volume, "affine", None)
    if affine is None:
        return None
    return np.linalg.norm(affine_of(None, affine)[:3, :2], axis=0)


def write_overlay_png(
    image_ras,
    mask_ras,
    out_path: PathLike,
    title: str | None = None,
    slice_index: int | None = None,
    affine=None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    min_size: int = 256,
    overwrite: bool = False,
) -> int:
    """Write a PNG of one axial slice: windowed CT in grey, the mask as a translucent fill with an outline.

    Args:
        image_ras: CT in HU on the RAS grid, (X, Y, Z), (1, X, Y, Z) or one axial slice (X, Y).
        mask_ras: mask on the same grid.
        out_path: output ``.png``.
        title: text above the image (e.g. the expression and the answer).
        slice_index: axial slice (axis 2) to show; by default the slice with the largest mask area.
        affine: RAS affine, for square physical pixels (defaults to ``image_ras.affine`` if any).
        window: (centre, width) in HU.
        min_size: minimum size in pixels of the image's shorter side.
        overwrite: replace an existing output.

    Returns:
        the slice index shown. The view is radiological: patient's right on the left, anterior up.
    """
    spacing = _spacing_xy(image_ras, affine)
    image, mask = _axial_slices(image_ras, mask_ras)
    index = key_slice_index(mask) if slice_index is None else int(slice_index)
    tile = _with_title(_overlay_tile(image[:, :, index], mask[:, :, index], window, spacing, min_size), title)
    atomic_write(out_path, lambda tmp: tile.save(str(tmp), format="PNG"), overwrite)
    return index


def montage_slices(mask: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` axial indices evenly spread over the mask's slice range (over the volume if empty)."""
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    low, high = (present[0], present[-1]) if present.size else (0, mask.shape[2] - 1)
    return sorted({int(round(v)) for v in np.linspace(low, high, min(count, high - low + 1))})


def write_montage(
    image_ras,
    mask_ras,
    out_path: PathLike,
    title: str | None = None,
    count: int = 9,
    columns: int = 3,
    affine=None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    tile_size: int = 192,
    overwrite: bool = False,
) -> list[int]:
    """Write a PNG grid of axial overlays over the mask's slice range (like :func:`write_overlay_png`).

    Returns:
        the axial indices shown, top-left to bottom-right.
    """
    spacing = _spacing_xy(image_ras, affine)
    image, mask = _axial_slices(image_ras, mask_ras)
    indices = montage_slices(mask > 0, count)
    tiles = [
        _with_title(_overlay_tile(image[:, :, k], mask[:, :, k], window, spacing, tile_size), f"slice {k}")
        for k in indices
    ]
    rows = -(-len(tiles) // columns)
    width, height = tiles[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % columns) * width, (n // columns) * height))
    sheet = _with_title(sheet, title)
    atomic_write(out_path, lambda tmp: sheet.save(str(tmp), format="PNG"), overwrite)
    return indices
