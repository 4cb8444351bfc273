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
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.transforms import ScaleIntensityRange
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from custom.atomic_files import atomic_write
from custom.clinical.errors import GeometryMismatchError
from custom.clinical.geometry import affine_of, as_binary_uint8, as_spatial_array, bounding_box, reorient_to
from custom.clinical.measurements import SliceIndexer

__all__ = [
    "atomic_write",
    "file_sha256",
    "write_nifti_mask",
    "write_dicom_seg",
    "write_json_record",
    "caption_lines",
    "inset_field",
    "montage_layout",
    "montage_slices",
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


def file_sha256(path: PathLike) -> str:
    """sha256 (hex) of the file at ``path``, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def write_nifti_mask(
    mask, reference, out_path: PathLike, mask_affine=None, overwrite: bool = False, labels: bool = False
) -> Path:
    """Write a binary mask (or with ``labels``, a label map of values 0-65535) as NIfTI with exactly the input's
    shape, affine and spacing.

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
    values = as_spatial_array(mask)
    if labels:
        values = np.asarray(values).astype(np.uint8 if int(np.max(values, initial=0)) < 256 else np.uint16)
    else:
        values = as_binary_uint8(values)
    data = reorient_to(values, affine_of(mask, mask_affine), ref_affine, ref_shape, order="F")  # NIfTI's own order
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


#: Long side of an overlay in pixels (at least; never under one pixel per voxel).
OVERLAY_SIZE = 512
#: Long side of one montage tile in pixels.
MONTAGE_TILE_SIZE = 256
#: An answer whose box spans less than this share of the slice's long side gets a zoomed inset.
INSET_BELOW = 1 / 8
#: The inset's long side as a share of the overlay's short side (it stays clear of the 'R' and 'L' marks); the
#: field it shows, in multiples of the answer's box (at least 1/16 of the slice's long side).
INSET_SHARE, INSET_FIELD = 0.4, 2.0
#: Colour of text and of the inset's frames.
TEXT_COLOR, MARK_COLOR = (255, 255, 255), (255, 255, 0)


def _grey_levels(hu, window: tuple[float, float]) -> np.ndarray:
    """uint8 grey levels of HU through a display window (centre, width): MONAI's ``ScaleIntensityRange``."""
    center, width = float(window[0]), float(window[1])
    scale = ScaleIntensityRange(center - width / 2, center + width / 2, 0.0, 255.0, clip=True)
    return np.round(np.asarray(scale(np.asarray(hu, dtype=np.float32)))).astype(np.uint8)


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


def _display_size(shape_yx: tuple[int, int], spacing_yx: tuple[float, float], long_side: int) -> tuple[int, int]:
    """(width, height) in pixels with square physical pixels, the long side at least ``long_side``."""
    height_mm, width_mm = shape_yx[0] * spacing_yx[0], shape_yx[1] * spacing_yx[1]
    scale = max(long_side / max(width_mm, height_mm), 1.0 / min(spacing_yx))
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def _render(grey: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """RGB picture at ``size`` of a display-oriented slice: grey CT, the answer as a translucent fill with an outline.

    Why not ``monai.visualize.blend_images``: it colours the label through a matplotlib colour map (matplotlib is
    not a dependency of this bundle) and draws no outline.
    """
    rgb = np.array(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR).convert("RGB"), dtype=np.float64)
    inside = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    color = np.array(OVERLAY_COLOR, dtype=np.float64)
    rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * color
    rgb[inside & ~ndimage.binary_erosion(inside, iterations=max(1, max(size) // 256))] = color
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(10, int(size)))


def _line_height(font) -> int:
    return font.getbbox("Ag|")[3] + 4


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill=TEXT_COLOR) -> None:
    """Text with a dark edge, readable on any grey."""
    draw.text(xy, text, fill=fill, font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _mark_sides(tile: Image.Image, font) -> None:
    """'R' and 'L' at the middle of the left and right edges (radiological view)."""
    draw = ImageDraw.Draw(tile)
    middle = (tile.height - _line_height(font)) // 2
    _label(draw, (6, middle), "R", font, MARK_COLOR)
    _label(draw, (tile.width - 6 - font.getlength("L"), middle), "L", font, MARK_COLOR)


# ----------------------------------------------------------------------------------------- captions


_STARTS_WITH_NUMBER = re.compile(r"[(\[]?[-+]?\d")
_NUMBER = re.compile(r"[(\[]?[-+]?\d+(?:\.\d+)?")


def _units(text: str) -> list[str]:
    """The words of ``text``, a number kept with the word before and after it (``confidence 0.98)``, ``43.1 ml``,
    ``1 lesion(s)``) but never across a ``,`` ``:`` or ``;``: the pieces a caption may be broken between."""
    units: list[str] = []
    for word in text.split():
        previous = units[-1] if units else ""
        joined = previous and not previous.endswith((",", ":", ";"))
        if joined and (_STARTS_WITH_NUMBER.match(word) or _NUMBER.fullmatch(previous.split()[-1])):
            units[-1] = f"{previous} {word}"
        else:
            units.append(word)
    return units


def _cut(unit: str, font, width: float) -> list[str]:
    """``unit`` cut into pieces of at most ``width`` pixels (a single character may be wider)."""
    pieces = []
    while len(unit) > 1 and font.getlength(unit) > width:
        n = len(unit) - 1
        while n > 1 and font.getlength(unit[:n]) > width:
            n -= 1
        pieces.append(unit[:n])
        unit = unit[n:]
    return pieces + [unit]


def caption_lines(text: str, font, width: float) -> list[str]:
    """``text`` broken into lines of at most ``width`` pixels in ``font``, never inside a value (``43.1 ml`` stays
    on one line); only a unit wider than a whole line is cut."""
    lines: list[str] = []
    for unit in _units(text):
        if lines and font.getlength(f"{lines[-1]} {unit}") <= width:
            lines[-1] = f"{lines[-1]} {unit}"
        else:
            lines += _cut(unit, font, width)
    return lines


def _with_caption(picture: Image.Image, lines: Sequence[str], font) -> Image.Image:
    """``picture`` under a black bar holding ``lines`` (each already fits the width)."""
    if not lines:
        return picture
    step = _line_height(font)
    bar = 6 + step * len(lines)
    canvas = Image.new("RGB", (picture.width, picture.height + bar), (0, 0, 0))
    canvas.paste(picture, (0, bar))
    draw = ImageDraw.Draw(canvas)
    for n, line in enumerate(lines):
        draw.text((6, 3 + n * step), line, fill=TEXT_COLOR, font=font)
    return canvas


def _caption(title: str | None, notes: Sequence[str], width: int, font) -> list[str]:
    lines = caption_lines(title, font, width - 12) if title else []
    return lines + [line for note in notes for line in caption_lines(note, font, width - 12)]


def _slice_label(index: int, depth: int, indexer: SliceIndexer) -> str:
    """``slice 37 of 80``: the input's 0-based axial index (as the record counts), with the input's slice number
    where it has them (``slice 37 of 80, number 38``, e.g. the DICOM InstanceNumber)."""
    source = indexer(index)
    number = indexer.number_of(source)
    return f"slice {source} of {depth}" + ("" if number is None else f", number {number}")


def _save_png(picture: Image.Image, out_path: PathLike, text: Mapping[str, str], overwrite: bool) -> Path:
    """Write ``picture`` as PNG with ``text`` as its text chunks (read back with ``PIL.Image.open(path).text``)."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return atomic_write(out_path, lambda tmp: picture.save(str(tmp), format="PNG", pnginfo=info), overwrite)


# ----------------------------------------------------------------------------------------- zoomed inset


def inset_field(mask: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[slice, slice] | None:
    """The (rows, columns) a zoomed inset shows of a display-oriented slice: a square in mm around the answer,
    ``INSET_FIELD`` times its box (at least 1/16 of the slice's long side), inside the slice; None when there is no
    answer or its box spans ``INSET_BELOW`` of the slice's long side or more."""
    box = bounding_box(mask)
    if box is None:
        return None
    long_mm = max(n * s for n, s in zip(mask.shape, spacing_yx))
    extent_mm = max((b.stop - b.start) * s for b, s in zip(box, spacing_yx))
    if extent_mm >= INSET_BELOW * long_mm:
        return None
    side_mm = max(INSET_FIELD * extent_mm, long_mm / 16)
    field = []
    for b, s, n in zip(box, spacing_yx, mask.shape):
        length = min(n, max(1, int(np.ceil(side_mm / s))))
        start = min(max(0, round((b.start + b.stop - length) / 2)), n - length)
        field.append(slice(start, start + length))
    return field[0], field[1]


def _farthest_corner(size: tuple[int, int], inset: tuple[int, int], towards: tuple[float, float], margin: int):
    """Top-left (x, y) of the corner position for an ``inset`` (width, height) farthest from point ``towards``."""
    xs, ys = (margin, size[0] - inset[0] - margin), (margin, size[1] - inset[1] - margin)
    corners = [(x, y) for y in ys for x in xs]
    return max(corners, key=lambda c: (c[0] + inset[0] / 2 - towards[0]) ** 2 + (c[1] + inset[1] / 2 - towards[1]) ** 2)


def _add_inset(tile: Image.Image, grey: np.ndarray, mask: np.ndarray, spacing_yx, field) -> float:
    """Paste a zoomed view of ``field`` into the corner of ``tile`` farthest from it, frame both; return the zoom."""
    rows, cols = field
    size = _display_size(grey[rows, cols].shape, spacing_yx, round(INSET_SHARE * min(tile.size)))
    zoomed = _render(grey[rows, cols], mask[rows, cols], size)
    fy, fx = tile.height / grey.shape[0], tile.width / grey.shape[1]
    frame = (cols.start * fx, rows.start * fy, cols.stop * fx - 1, rows.stop * fy - 1)
    centre = ((frame[0] + frame[2]) / 2, (frame[1] + frame[3]) / 2)
    corner = _farthest_corner(tile.size, zoomed.size, centre, margin=max(4, tile.width // 64))
    draw = ImageDraw.Draw(tile)
    draw.rectangle(frame, outline=MARK_COLOR, width=2)
    tile.paste(zoomed, corner)
    draw.rectangle(
        (corner[0], corner[1], corner[0] + zoomed.width - 1, corner[1] + zoomed.height - 1), outline=MARK_COLOR, width=2
    )
    return zoomed.width / (frame[2] - frame[0] + 1)


# ----------------------------------------------------------------------------------------- overlay and montage


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


def _ras_affine(volume, affine) -> np.ndarray:
    if affine is None:
        affine = getattr(volume, "affine", None)
    return np.eye(4) if affine is None else affine_of(None, affine)


def _spacing_yx(affine: np.ndarray) -> tuple[float, float]:
    """Pixel spacing (rows, columns) in mm of the display view of an axial slice of the RAS grid of ``affine``."""
    sx, sy = np.linalg.norm(affine[:3, :2], axis=0)
    return float(sy), float(sx)


def _view(image: np.ndarray, mask: np.ndarray, index: int, window) -> tuple[np.ndarray, np.ndarray]:
    """Grey levels and mask of axial slice ``index``, in the display view."""
    return radiological_view(_grey_levels(image[:, :, index], window)), radiological_view(mask[:, :, index] > 0)


def write_overlay_png(
    image_ras,
    mask_ras,
    out_path: PathLike,
    title: str | None = None,
    slice_index: int | None = None,
    affine=None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    size: int = OVERLAY_SIZE,
    overwrite: bool = False,
    source_affine=None,
    slice_numbers: Sequence[int] | None = None,
) -> int:
    """Write a PNG of one axial slice: windowed CT in grey, the mask as a translucent fill with an outline.

    Under the title a line names the slice (``slice 37 of 80``). A small answer (its box under ``INSET_BELOW`` of
    the slice's long side) gets a zoomed inset in the corner farthest from it, both framed in yellow. The PNG's
    text chunks ``Title`` and ``Slice`` hold the title and that line.

    Args:
        image_ras: CT in HU on the RAS grid, (X, Y, Z), (1, X, Y, Z) or one axial slice (X, Y).
        mask_ras: mask on the same grid.
        out_path: output ``.png``.
        title: text above the image (e.g. the expression and the answer); broken between values, never inside one.
        slice_index: axial slice (axis 2) to show; by default the slice with the largest mask area.
        affine: RAS affine, for square physical pixels (defaults to ``image_ras.affine`` if any).
        window: (centre, width) in HU.
        size: minimum size in pixels of the image's long side.
        overwrite: replace an existing output.
        source_affine: affine of the input's own grid, to name the slice by the input's index (default: the RAS
            grid's, the same for an input stored inferior to superior).
        slice_numbers: the input's slice numbers (e.g. DICOM InstanceNumber), added to the slice line.

    Returns:
        the slice index shown (RAS grid). The view is radiological: patient's right on the left, anterior up.
    """
    ras_affine = _ras_affine(image_ras, affine)
    spacing = _spacing_yx(ras_affine)
    image, mask = _axial_slices(image_ras, mask_ras)
    index = key_slice_index(mask) if slice_index is None else int(slice_index)
    grey, answer = _view(image, mask, index, window)
    tile = _render(grey, answer, _display_size(grey.shape, spacing, size))
    font = _font(max(tile.size) / 32)
    _mark_sides(tile, font)
    label = _slice_label(index, image.shape[2], SliceIndexer(ras_affine, source_affine, slice_numbers))
    field = inset_field(answer, spacing)
    note = label if field is None else f"{label}; inset zoomed x{_add_inset(tile, grey, answer, spacing, field):.1f}"
    picture = _with_caption(tile, _caption(title, [note], tile.width, font), font)
    _save_png(picture, out_path, {"Title": title or "", "Slice": label}, overwrite)
    return index


def montage_slices(mask: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` axial indices evenly spread over the slices that hold the mask (over the volume if empty)."""
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    if present.size == 0:
        present = np.arange(mask.shape[2])
    picks = np.round(np.linspace(0, present.size - 1, min(count, present.size))).astype(int)
    return [int(present[p]) for p in picks]


def montage_layout(available: int, count: int, columns: int) -> tuple[int, int]:
    """(tiles, columns) of a montage of at most ``count`` of ``available`` slices in full rows, about ``columns``
    wide: as many tiles as full rows allow, then the width closest to ``columns``, then the wider."""
    tiles = max(1, min(count, available))
    if tiles <= columns:
        return tiles, tiles
    best = max(range(2, columns + 2), key=lambda c: ((tiles // c) * c, -abs(c - columns), c))
    return (tiles // best) * best, best


def write_montage(
    image_ras,
    mask_ras,
    out_path: PathLike,
    title: str | None = None,
    count: int = 9,
    columns: int = 3,
    affine=None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    tile_size: int = MONTAGE_TILE_SIZE,
    overwrite: bool = False,
    source_affine=None,
    slice_numbers: Sequence[int] | None = None,
) -> list[int]:
    """Write a PNG grid of axial overlays (like :func:`write_overlay_png`) of slices that hold the mask (any slice
    when it is empty), in full rows: no tile is blank or without the answer. Each tile names its slice; the PNG's
    text chunk ``Slices`` lists them.

    Returns:
        the axial indices shown (RAS grid), top-left to bottom-right.
    """
    ras_affine = _ras_affine(image_ras, affine)
    spacing = _spacing_yx(ras_affine)
    image, mask = _axial_slices(image_ras, mask_ras)
    available = int(mask.any(axis=(0, 1)).sum()) or mask.shape[2]
    tiles, columns = montage_layout(available, count, columns)
    indices = montage_slices(mask > 0, tiles)
    indexer = SliceIndexer(ras_affine, source_affine, slice_numbers)
    labels = [_slice_label(k, image.shape[2], indexer) for k in indices]
    pictures = []
    for k, label in zip(indices, labels):
        grey, answer = _view(image, mask, k, window)
        tile = _render(grey, answer, _display_size(grey.shape, spacing, tile_size))
        font = _font(max(tile.size) / 18)
        _mark_sides(tile, font)
        _label(ImageDraw.Draw(tile), (6, 4), label.split(",")[0], font)
        pictures.append(tile)
    width, height = pictures[0].size
    sheet = Image.new("RGB", (columns * width, len(pictures) // columns * height), (0, 0, 0))
    for n, tile in enumerate(pictures):
        sheet.paste(tile, ((n % columns) * width, (n // columns) * height))
    font = _font(max(sheet.width / 40, 14))
    sheet = _with_caption(sheet, _caption(title, [], sheet.width, font), font)
    _save_png(sheet, out_path, {"Title": title or "", "Slices": "; ".join(labels)}, overwrite)
    return indices
