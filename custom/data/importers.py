"""Labelled CT in the layouts users have, read onto the CT's grid in RAS for the one conversion of convert_lits.

Layouts (``python -m custom.data.import_labelled --layout``):

* ``lits`` / ``msd``: NIfTI volumes with 0/1/2 label maps (:func:`custom.data.convert_lits.scan_cases`).
* ``ircadb``: 3D-IRCADb: per patient ``PATIENT_DICOM/`` (the CT series) and ``MASKS_DICOM/<structure>/`` (one DICOM
  series per structure on the CT's slices, values 0/255 or 0/1). ``liver`` is the liver; ``livertumor01``,
  ``livertumor02`` ... and the cysts (``liverkyst``) are lesions, each mask kept apart from the others; other
  structures are ignored.
* ``dicom_seg``: a CT DICOM series with a DICOM-SEG (read with highdicom). Segments are named by SegmentLabel, else by
  the meaning of their SegmentedPropertyType code: ``liver``; lesion, tumour, neoplasm, mass, metastasis, cyst. The
  SEG frames go to the series' slices by ReferencedSOPInstanceUID, or by ImagePositionPatient when the SEG names no
  source image of the series.
* ``slicer``: 3D Slicer files beside the CT (an NRRD or NIfTI file, or a DICOM series folder): a segmentation
  ``.seg.nrrd`` (segments from the header keys ``Segment{N}_Name``, ``_LabelValue``, ``_Layer``) or a labelmap
  (``.nrrd``, ``.nii[.gz]``) with ``label``, ``seg`` or ``mask`` in its name. A labelmap's values are named by a
  Slicer color table beside it (``<labelmap name>*.ctbl`` or ``.txt``), else read as 0 background, 1 liver,
  2 tumour.

Every reader returns a :class:`~custom.data.convert_lits.LabelledCT` in RAS on the CT's grid (a NIfTI CT already in
RAS is referenced as it is). Masks are never resampled: only axis flips and permutations and the placing of a
cropped mask on the CT's lattice are exact and done; any other difference of grid refuses the case with what differs.
A case that cannot be read raises :class:`~custom.data.convert_lits.ConversionError` whose ``problem`` names the kind.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from custom.clinical.dicom_series import ClinicalInputWarning, is_nifti_path, load_clinical_image
from custom.clinical.geometry import affine_of, as_spatial_array, grow_box

from .convert_lits import ConversionError, LabelledCT, read_lits_case, scan_cases
from .geometry import voxel_to_world
from .io import orientation_of, reorient

__all__ = [
    "LAYOUTS",
    "CaseSource",
    "Refusal",
    "detect_layout",
    "find_sources",
    "read_case",
    "segment_role",
    "place_on_grid",
    "nrrd_affine",
    "attach_lesions_to_liver",
]

LAYOUTS = ("lits", "msd", "ircadb", "dicom_seg", "slicer")

#: Words that make a segment, mask or structure a liver lesion (matched inside the lower-case name).
LESION_WORDS = ("lesion", "tumour", "tumor", "neoplasm", "mass", "metasta", "cyst", "kyst", "carcinoma", "hcc")
#: Words that may stand beside "liver" in the name of the liver itself ("Liver segmentation", "whole liver").
LIVER_FILLERS = frozenset(
    {"whole", "total", "mask", "seg", "segment", "segmentation", "label", "labels", "organ", "parenchyma", "the", "of"}
)
#: Words that mark a file as a label (labelmap or segmentation) rather than a CT in the Slicer layout.
LABEL_WORDS = frozenset({"label", "labels", "labelmap", "seg", "segmentation", "mask", "masks", "annotation", "gt"})
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: NRRD ``space`` -> signs that take its axes to RAS.
NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
}
#: Grid tolerances: relative voxel size, direction cosines, origin off the lattice (in voxels).
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3
LATTICE_ATOL_VOXELS = 0.01


@dataclass
class CaseSource:
    """One case found under a source folder: its id, layout, CT (file or series folder) and label (file or folder).

    ``series_uid`` picks the CT series in a folder that holds several (DICOM-SEG layout)."""

    case_id: str
    layout: str
    image: Path
    label: Path
    series_uid: str | None = None


@dataclass
class Refusal:
    """A case that was not imported: ``problem`` is the kind (see :class:`ConversionError`), ``reason`` the
    message naming the file and the fix."""

    case_id: str
    image: str
    label: str
    problem: str
    reason: str


# ------------------------------------------------------------------------------------------------- names and grids


def segment_role(*names: str | None) -> str | None:
    """'lesion', 'liver' or None for a segment known by ``names`` (label first, then a code meaning ...)."""
    for name in names:
        if not name:
            continue
        text = str(name).lower()
        if any(word in text for word in LESION_WORDS):
            return "lesion"
        words = [w for w in re.split(r"[^a-z]+", text) if w and w not in LIVER_FILLERS]
        if words in (["liver"], ["hepar"]):
            return "liver"
    return None


def safe_case_id(text: str) -> str:
    """``text`` made a file-name-safe case id (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _unique(case_id: str, used: set[str]) -> str:
    candidate, number = case_id, 2
    while candidate in used:
        candidate, number = f"{case_id}_{number}", number + 1
    used.add(candidate)
    return candidate


def _folder_id(folder: Path, src: Path) -> str:
    relative = folder.relative_to(src)
    return safe_case_id(src.name if relative == Path(".") else "_".join(relative.parts))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _grid_text(shape, affine: np.ndarray) -> str:
    return (
        f"shape {tuple(int(s) for s in shape)}, voxels {_fmt(np.linalg.norm(affine[:3, :3], axis=0))} mm, "
        f"origin {_fmt(affine[:3, 3])} mm RAS, axes {orientation_of(affine)}"
    )


def _grid_differences(shape, affine, ct_shape, ct_affine) -> list[str]:
    """What keeps a mask (already in the CT's axis order) off the CT's lattice; empty when it lies on it."""
    spacing, ct_spacing = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(ct_affine[:3, :3], axis=0)
    if not np.allclose(spacing, ct_spacing, rtol=SPACING_RTOL):
        return [f"voxel size {_fmt(spacing)} mm against the CT's {_fmt(ct_spacing)} mm"]
    if not np.allclose(affine[:3, :3] / spacing, ct_affine[:3, :3] / ct_spacing, atol=DIRECTION_ATOL):
        return ["axis directions differ (the mask is rotated or tilted against the CT)"]
    offset = np.linalg.solve(ct_affine[:3, :3], affine[:3, 3] - ct_affine[:3, 3])
    if not np.allclose(offset, np.round(offset), atol=LATTICE_ATOL_VOXELS):
        shift = ct_affine[:3, :3] @ (offset - np.round(offset))
        return [f"origin off the CT's voxel centres by {_fmt(shift)} mm (a shift of {_fmt(offset)} voxels)"]
    return []


def place_on_grid(mask: np.ndarray, affine: np.ndarray, ct_shape, ct_affine: np.ndarray, name: str) -> np.ndarray:
    """A (X, Y, Z) ``mask`` with voxel-to-RAS ``affine`` -> the same voxels on the CT's grid (``ct_shape``,
    ``ct_affine``), same dtype.

    Exact moves only: axis flips and permutations, and a box of the CT's lattice (a cropped or padded mask) put in
    place when its labelled voxels all fall inside the CT. Anything else raises a ``grid`` :class:`ConversionError`
    saying what differs."""
    mask, affine = reorient(np.asarray(mask), np.asarray(affine, float), orientation_of(ct_affine))
    ct_shape = tuple(int(s) for s in ct_shape)
    differences = _grid_differences(mask.shape, affine, ct_shape, np.asarray(ct_affine, float))

    def refuse(what: str) -> ConversionError:
        return ConversionError(
            f"{name} is not on the CT's grid: {what}. Mask: {_grid_text(mask.shape, affine)}; CT: "
            f"{_grid_text(ct_shape, ct_affine)}. Save the mask on the CT's grid (same voxels and slices); masks are "
            "not resampled.",
            "grid",
        )

    if differences:
        raise refuse("; ".join(differences))
    offset = np.round(np.linalg.solve(ct_affine[:3, :3], affine[:3, 3] - ct_affine[:3, 3])).astype(int)
    if not offset.any() and mask.shape == ct_shape:
        return mask
    source = tuple(slice(max(0, -o), min(n, c - o)) for o, n, c in zip(offset, mask.shape, ct_shape))
    target = tuple(slice(s.start + o, s.stop + o) for s, o in zip(source, offset))
    inside = int(np.count_nonzero(mask[source])) if all(s.stop > s.start for s in source) else 0
    if inside != np.count_nonzero(mask):
        raise refuse(
            f"{np.count_nonzero(mask) - inside} labelled voxel(s) fall outside the CT (offset {tuple(offset)})"
        )
    placed = np.zeros(ct_shape, mask.dtype)
    if inside:
        placed[target] = mask[source]
    return placed


def binary_mask(values: np.ndarray, name: str) -> np.ndarray:
    """A mask stored as 0/1 or 0/255 (any type) -> bool; other values raise a ``labels`` ConversionError."""
    found = np.unique(values)
    if not np.all(np.isin(found, (0, 1, 255))):
        raise ConversionError(
            f"{name} holds the values {found[:10].tolist()}; a mask must hold 0 (outside) and 1 or 255 (inside). "
            "Re-export it as a binary mask.",
            "labels",
        )
    return values > 0


def read_volume(path: Path, require_ct: bool = True, series_uid: str | None = None):
    """A CT or mask volume -> (array (X, Y, Z) in its stored axis order, voxel-to-RAS affine, metadata).

    A DICOM series folder or NIfTI file goes through :func:`custom.clinical.load_clinical_image` (its checks of
    the series included); an NRRD file through pynrrd and :func:`nrrd_affine` (MONAI's ``NrrdReader`` takes the
    short space names 'LPS', 'LAS' for RAS)."""
    if str(path).lower().endswith((".nrrd", ".nhdr")):
        import nrrd

        data, header = nrrd.read(str(path))
        if data.ndim != 3:
            raise ConversionError(f"{path} holds {data.ndim}-D data; a CT is a 3D volume.", "unreadable")
        return data, nrrd_affine(header, path), {}
    image = load_clinical_image(path, series_uid, require_ct)
    return as_spatial_array(image), affine_of(image), dict(image.meta)


def labelled_in_ras(
    case_id: str,
    hu: np.ndarray,
    affine: np.ndarray,
    liver: np.ndarray,
    lesions: list[np.ndarray],
    source: CaseSource,
    notes: list[str],
) -> LabelledCT:
    """CT and masks on the CT's grid -> a :class:`LabelledCT` in RAS; a NIfTI CT already in RAS is referenced as it
    is, any other CT is written into the dataset as ``images/<case_id>.nii.gz``."""
    keep = source.image.is_file() and is_nifti_path(source.image) and orientation_of(affine) == "RAS"
    if orientation_of(affine) != "RAS":
        hu, ras_affine = reorient(hu, affine, "RAS")
        liver = reorient(liver, affine, "RAS")[0]
        lesions = [reorient(mask, affine, "RAS")[0] for mask in lesions]
        affine = ras_affine
    suffix = ".nii" if keep and source.image.name.lower().endswith(".nii") else ".nii.gz"
    return LabelledCT(
        hu=hu,
        affine=affine,
        liver=liver,
        lesions=lesions,
        image_path=source.image if keep else None,
        image_name=f"{case_id}{suffix}",
        source_label=str(source.label.absolute()),
        source_image=str(source.image.absolute()),
        notes=notes,
    )


def _missing_liver(source: CaseSource, found: list[str], where: str) -> ConversionError:
    listed = ", ".join(f"'{name}'" for name in found) or "none"
    return ConversionError(
        f"{source.label} has no liver {where} (found: {listed}); name the liver's {where} 'liver' "
        "(lesions: lesion, tumour, metastasis, cyst ...).",
        "no_liver",
    )


def _ignored_note(names: list[str], what: str) -> list[str]:
    return [f"{what} ignored (neither liver nor lesion): {', '.join(repr(n) for n in names)}"] if names else []


def _union(masks: list[np.ndarray], shape) -> np.ndarray:
    union = np.zeros(shape, bool)
    for mask in masks:
        union |= mask
    return union


# ------------------------------------------------------------------------------------------------------ the checks


def attach_lesions_to_liver(case: LabelledCT, instances: np.ndarray) -> None:
    """Check the liver and the lesion ``instances`` (H, W, D) of ``case``; extend ``case.liver`` by the lesion voxels
    outside it (the liver includes its lesions, as in a LiTS label map) with a note in ``case.notes``.

    Raises an ``empty_liver`` ConversionError for an empty liver mask, and a ``lesion_outside_liver`` one for a
    lesion that neither overlaps nor touches the liver's parenchyma (liver voxels that are no lesion): a mask of
    another organ or series. Such a case is refused rather than clipped or thinned: clipping would delete the
    lesion, and dropping it would leave a lesion in the CT that the labels deny."""
    liver = np.asarray(case.liver, bool)
    if not liver.any():
        raise ConversionError(
            f"The liver mask of {case.source_label} is empty; draw the liver (lesion positions are measured in it) "
            "or leave the case out.",
            "empty_liver",
        )
    structure = np.ones((3, 3, 3), bool)
    voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000.0
    for index, box in enumerate(ndimage.find_objects(instances.astype(np.int32)), start=1):
        if box is None:
            continue
        grown = grow_box(box, 1, instances.shape)
        lesion = instances[grown] == index
        parenchyma = liver[grown] & (instances[grown] == 0)
        if not (ndimage.binary_dilation(lesion, structure) & parenchyma).any():
            ijk = np.argwhere(lesion).mean(axis=0) + [s.start for s in grown]
            centre = voxel_to_world(np.asarray(case.affine, float), ijk[None])[0]
            raise ConversionError(
                f"A lesion of {lesion.sum() * voxel_ml:.2f} ml centred at RAS {_fmt(centre)} mm in "
                f"{case.source_label} lies outside the liver mask and does not touch it; the lesion mask may belong "
                "to another organ or series, or the liver mask misses part of the liver. Correct the masks, or "
                "remove that lesion from the labels.",
                "lesion_outside_liver",
            )
    outside = (instances > 0) & ~liver
    if outside.any():
        case.liver = liver | (instances > 0)
        case.notes.append(
            f"{int(outside.sum())} lesion voxel(s) ({outside.sum() * voxel_ml:.2f} ml) lay outside the liver mask, "
            "touching it; they were added to the liver (a liver includes its lesions)"
        )


# ------------------------------------------------------------------------------------------------ LiTS / MSD


def find_lits(src: Path, layout: str) -> tuple[list[CaseSource], list[Refusal]]:
    """The cases of a LiTS or MSD Task03 folder (``scan_cases``) and its labels without an image."""
    msd = (src / "imagesTr").is_dir() and (src / "labelsTr").is_dir()
    if (layout == "msd") != msd:
        expected = "'imagesTr/' and 'labelsTr/'" if layout == "msd" else "'volume-<n>.nii' and 'segmentation-<n>.nii'"
        raise ConversionError(f"{src} is not in the {layout} layout (expected {expected}); check --layout.", "layout")
    cases, unpaired = scan_cases(src)
    sources = [CaseSource(case_id, layout, image, label) for case_id, image, label in cases]
    refusals = [Refusal(case_id, "", str(label), "unpaired", message) for case_id, label, message in unpaired]
    return sources, refusals


def read_lits(source: CaseSource) -> LabelledCT:
    """A LiTS / MSD case on its image's grid, the image referenced as convert_lits does."""
    return read_lits_case(source.case_id, source.image, source.label)


# ------------------------------------------------------------------------------------------------------ IRCADb


def _ircadb_patients(src: Path) -> list[Path]:
    return sorted({p.parent for p in src.rglob("PATIENT_DICOM*") if p.name in ("PATIENT_DICOM", "PATIENT_DICOM.zip")})


def find_ircadb(src: Path) -> tuple[list[CaseSource], list[Refusal]]:
    """One case per folder holding ``PATIENT_DICOM/`` and ``MASKS_DICOM/`` (zipped folders are refused)."""
    sources, refusals, used = [], [], set()
    for patient in _ircadb_patients(src):
        case_id = _unique(_folder_id(patient, src), used)
        image, label = patient / "PATIENT_DICOM", patient / "MASKS_DICOM"
        missing = [p for p in (image, label) if not p.is_dir()]
        if missing:
            zipped = [p.name for p in missing if p.with_suffix(".zip").is_file()]
            fix = f"unzip {', '.join(z + '.zip' for z in zipped)} in place" if zipped else "add the missing folder"
            reason = f"{patient} has no {' and no '.join(p.name + '/' for p in missing)} folder; {fix}."
            refusals.append(Refusal(case_id, str(image), str(label), "unreadable", reason))
            continue
        sources.append(CaseSource(case_id, "ircadb", image, label))
    return sources, refusals


def read_mask_series(folder: Path, ct_shape, ct_affine: np.ndarray) -> np.ndarray:
    """A DICOM mask series (0/1 or 0/255) -> bool (X, Y, Z) on the CT's grid."""
    values, affine, _ = read_volume(folder, require_ct=False)
    return place_on_grid(binary_mask(values, f"Mask series {folder}"), affine, ct_shape, ct_affine, f"Mask {folder}")


def read_ircadb(source: CaseSource) -> LabelledCT:
    """An IRCADb patient: the CT series, the ``liver`` mask and the lesion masks, in RAS."""
    hu, affine, _ = read_volume(source.image)
    structures = sorted((p for p in source.label.iterdir() if p.is_dir()), key=lambda p: p.name)
    roles = {p.name: segment_role(p.name) for p in structures}
    livers = [p for p in structures if roles[p.name] == "liver"]
    if not livers:
        raise _missing_liver(source, [p.name for p in structures], "mask folder")
    liver = _union([read_mask_series(p, hu.shape, affine) for p in livers], hu.shape)
    lesions = [read_mask_series(p, hu.shape, affine) for p in structures if roles[p.name] == "lesion"]
    notes = _ignored_note([p.name for p in structures if roles[p.name] is None], "structures")
    return labelled_in_ras(source.case_id, hu, affine, liver, lesions, source, notes)


# --------------------------------------------------------------------------------------------------- DICOM-SEG


def _dicom_headers(src: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """(path, header) of the DICOM files under ``src`` (Modality, SOPClassUID and SeriesInstanceUID only)."""
    headers = []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            tags = ["Modality", "SOPClassUID", "SeriesInstanceUID"]
            headers.append((path, pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)))
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
            continue
    return headers


def _is_seg(header: pydicom.Dataset) -> bool:
    return str(header.get("Modality", "")).upper() == "SEG" or str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS


def _common_folder(paths: list[Path]) -> Path:
    parts = [p.absolute().parts for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) > 1:
            break
        common.append(items[0])
    return Path(*common)


def _series_for_seg(seg_path: Path, series: dict[tuple[str, Path], list[Path]], src: Path):
    """The (series UID, folder) of a SEG's CT series: of the series it refers to (else of all CT series) the one in
    the folder nearest to the SEG; None and the reason when there is none, or several as near."""
    header = pydicom.dcmread(seg_path, stop_before_pixels=True)
    referenced = {str(item.get("SeriesInstanceUID", "")) for item in header.get("ReferencedSeriesSequence", [])}
    candidates = [key for key in series if not referenced or key[0] in referenced]
    if not candidates:
        found = "refers to the series " + ", ".join(sorted(referenced)) if referenced else "has no CT series"
        return None, f"{seg_path} {found}, which is not under {src}; add the CT series beside the SEG."
    folder, top = seg_path.parent.absolute(), src.absolute()
    while True:
        near = [key for key in candidates if key[1] == folder or folder in key[1].parents]
        if len(near) == 1:
            return near[0], ""
        if len(near) > 1:
            return None, (
                f"{folder} holds {len(near)} CT series that could belong to {seg_path}; keep one CT series per case "
                "folder."
            )
        if folder == top or folder == folder.parent:
            return None, f"No CT series for {seg_path} under {src}; add the CT series beside the SEG."
        folder = folder.parent


def find_dicom_seg(src: Path) -> tuple[list[CaseSource], list[Refusal]]:
    """One case per DICOM-SEG under ``src``, with the CT series (one series in one folder) nearest to it among
    those it refers to."""
    headers = _dicom_headers(src)
    series: dict[tuple[str, Path], list[Path]] = {}
    for path, header in headers:
        if not _is_seg(header) and str(header.get("Modality", "")).upper() == "CT":
            series.setdefault((str(header.get("SeriesInstanceUID", "")), path.parent.absolute()), []).append(path)
    sources, refusals, used = [], [], set()
    for seg_path in [path for path, header in headers if _is_seg(header)]:
        key, reason = _series_for_seg(seg_path, series, src)
        if key is None:
            refusals.append(Refusal(_unique(safe_case_id(seg_path.stem), used), "", str(seg_path), "unpaired", reason))
            continue
        case_id = _unique(_folder_id(_common_folder([seg_path.parent, key[1]]), src.absolute()), used)
        sources.append(CaseSource(case_id, "dicom_seg", key[1], seg_path, key[0]))
    return sources, refusals


def _seg_roles(seg) -> dict[int, tuple[str, str | None]]:
    """Segment number -> (shown name, 'liver' / 'lesion' / None) from SegmentLabel, else the property type."""
    roles = {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        label = str(getattr(description, "segment_label", "") or "")
        meaning = str(getattr(description.segmented_property_type, "meaning", "") or "")
        roles[number] = (label or meaning or f"segment {number}", segment_role(label, meaning))
    return roles


def _seg_by_reference(seg, path: Path, numbers: list[int], ct_shape, ct_uids: list[str]) -> list[np.ndarray] | None:
    """The segments' masks (X, Y, Z) on the CT's slices by ReferencedSOPInstanceUID; None when the SEG's frames do
    not refer to the series' images."""
    referenced = {str(uids[2]) for uids in seg.get_source_image_uids()}
    if not referenced & set(ct_uids):
        return None
    if foreign := referenced - set(ct_uids):
        raise ConversionError(
            f"{path} refers to {len(foreign)} image(s) that are not in the CT series; export the SEG for this series.",
            "grid",
        )
    if (int(seg.Rows), int(seg.Columns)) != (int(ct_shape[1]), int(ct_shape[0])):
        raise ConversionError(
            f"{path} has frames of {seg.Rows}x{seg.Columns} pixels, the CT {ct_shape[1]}x{ct_shape[0]}; export the "
            "SEG on the CT's pixels.",
            "grid",
        )
    try:
        pixels = seg.get_pixels_by_source_instance(
            ct_uids, segment_numbers=numbers, assert_missing_frames_are_empty=True
        )
    except (ValueError, KeyError, RuntimeError, AttributeError):  # frames without their own source reference
        return None
    return [np.transpose(pixels[..., i], (2, 1, 0)) >= 0.5 for i in range(len(numbers))]  # (slices, rows, columns)


def _seg_by_position(seg, path: Path, numbers: list[int], ct_shape, ct_affine: np.ndarray) -> list[np.ndarray]:
    """The segments' masks (X, Y, Z) on the CT's grid from the frames' ImagePositionPatient (highdicom volume)."""
    volume = seg.get_volume(segment_numbers=numbers)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(volume.affine, float)  # (slices, rows, columns) -> RAS
    array = np.asarray(volume.array)
    return [
        place_on_grid(array[..., i] >= 0.5, affine, ct_shape, ct_affine, f"{path} segment {number}")
        for i, number in enumerate(numbers)
    ]


def seg_masks(seg, path: Path, numbers: list[int], ct_shape, ct_affine: np.ndarray, meta: dict) -> list[np.ndarray]:
    """Bool (X, Y, Z) masks of the SEG's segments ``numbers`` on the CT series' grid (array order of ``meta``):
    by ReferencedSOPInstanceUID when the frames refer to the series' images, else by the frames' positions."""
    ct_uids = [str(uid) for uid in meta.get("source_sop_instance_uids", [])]
    masks = _seg_by_reference(seg, path, numbers, ct_shape, ct_uids)
    return masks if masks is not None else _seg_by_position(seg, path, numbers, ct_shape, ct_affine)


def read_dicom_seg(source: CaseSource) -> LabelledCT:
    """A CT series and its DICOM-SEG: the liver segment(s) and the lesion segments, in RAS."""
    import highdicom as hd  # here: its import is paid by DICOM-SEG imports only

    hu, affine, meta = read_volume(source.image, series_uid=source.series_uid)
    seg = hd.seg.segread(str(source.label))
    roles = _seg_roles(seg)
    livers = [n for n, (_, role) in roles.items() if role == "liver"]
    lesions = [n for n, (_, role) in roles.items() if role == "lesion"]
    if not livers:
        raise _missing_liver(source, [name for name, _ in roles.values()], "segment")
    masks = seg_masks(seg, source.label, livers + lesions, hu.shape, affine, meta)
    notes = _ignored_note([name for name, role in roles.values() if role is None], "segments")
    liver = _union(masks[: len(livers)], hu.shape)
    return labelled_in_ras(source.case_id, hu, affine, liver, masks[len(livers) :], source, notes)


# ------------------------------------------------------------------------------------------------------- Slicer


def _volume_stem(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_volume_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith((".nrrd", ".nii", ".nii.gz"))


def _is_label_name(path: Path) -> bool:
    words = set(re.split(r"[^a-z0-9]+", _volume_stem(path).lower()))
    return path.name.lower().endswith(".seg.nrrd") or bool(words & LABEL_WORDS)


def _holds_dicom(folder: Path) -> bool:
    files = [p for p in sorted(folder.iterdir())[:20] if p.is_file() and not p.name.startswith(".")]
    return any(pydicom.misc.is_dicom(str(p)) for p in files[:5])


def _ct_for_label(label: Path, volumes: list[Path], series_folders: list[Path]) -> tuple[Path | None, str]:
    """The CT beside a label: the volume named like it (``ct.nrrd`` for ``ct-label.nrrd``), else the one CT file or
    DICOM series folder of its folder."""
    stem = "-".join(w for w in re.split(r"[-_. ]+", _volume_stem(label)) if w.lower() not in LABEL_WORDS)
    named = [v for v in volumes if "-".join(re.split(r"[-_. ]+", _volume_stem(v))) == stem]
    candidates = named or volumes + series_folders
    if len(candidates) == 1:
        return candidates[0], ""
    found = ", ".join(p.name for p in candidates) or "none"
    return None, (
        f"Cannot tell which CT belongs to {label} (candidates in {label.parent}: {found}); keep one CT file or DICOM "
        "series folder beside each label, or name them alike ('ct.nrrd' with 'ct-label.nrrd')."
    )


def _slicer_labels(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if _is_volume_file(p) and _is_label_name(p))


def find_slicer(src: Path) -> tuple[list[CaseSource], list[Refusal]]:
    """One case per CT with a Slicer segmentation or labelmap beside it (a ``.seg.nrrd`` before a labelmap)."""
    sources, refusals, used = [], [], set()
    by_folder: dict[Path, list[Path]] = {}
    for label in _slicer_labels(src):
        by_folder.setdefault(label.parent, []).append(label)
    for folder, labels in sorted(by_folder.items()):
        volumes = sorted(p for p in folder.iterdir() if _is_volume_file(p) and not _is_label_name(p))
        series = [p for p in sorted(folder.iterdir()) if p.is_dir() and _holds_dicom(p)]
        series += [folder] if _holds_dicom(folder) else []
        pairs: dict[Path, list[Path]] = {}
        for label in labels:
            ct, reason = _ct_for_label(label, volumes, series)
            if ct is None:
                refusals.append(Refusal(_unique(_folder_id(folder, src), used), "", str(label), "ambiguous", reason))
                continue
            pairs.setdefault(ct, []).append(label)
        for ct, found in pairs.items():
            segmentations = [p for p in found if p.name.lower().endswith(".seg.nrrd")]
            case_id = _folder_id(folder, src) if len(pairs) == 1 else safe_case_id(_volume_stem(ct))
            case_id = _unique(case_id, used)
            if len(found) > 1 and len(segmentations) != 1:
                reason = (
                    f"{ct} has {len(found)} labels beside it ({', '.join(p.name for p in found)}); keep one "
                    "segmentation or labelmap per CT."
                )
                refusals.append(Refusal(case_id, str(ct), str(found[0]), "ambiguous", reason))
                continue
            sources.append(CaseSource(case_id, "slicer", ct, segmentations[0] if len(found) > 1 else found[0]))
    return sources, refusals


def nrrd_affine(header: dict, path: Path) -> np.ndarray:
    """Voxel-to-RAS 4x4 affine of the spatial axes of a pynrrd header (``space``, ``space directions``, ``space
    origin``); a list axis (the layers of a segmentation) has no direction and is skipped."""
    space = str(header.get("space", "")).lower()
    if space not in NRRD_SPACES or "space directions" not in header:
        raise ConversionError(
            f"{path} has no supported NRRD space (found '{header.get('space', '')}'); save it from 3D Slicer, which "
            "writes 'left-posterior-superior' or 'right-anterior-superior' with space directions.",
            "unreadable",
        )
    directions = np.asarray(header["space directions"], float)
    spatial = directions[np.all(np.isfinite(directions), axis=1)]
    if spatial.shape != (3, 3):
        raise ConversionError(f"{path} does not have three spatial axes; save a 3D segmentation.", "unreadable")
    affine = np.eye(4)
    affine[:3, :3] = spatial.T
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), float)
    affine[:3] *= np.asarray(NRRD_SPACES[space], float)[:, None]
    return affine


def _layers_last(data: np.ndarray, header: dict) -> np.ndarray:
    """NRRD voxels with the list axis (the layers) last: (X, Y, Z, layers); a 3D volume gets one layer."""
    if data.ndim == 3:
        return data[..., None]
    directions = np.asarray(header["space directions"], float)
    layer_axis = int(np.flatnonzero(~np.all(np.isfinite(directions), axis=1))[0])
    return np.moveaxis(data, layer_axis, -1)


def _terminology_type(text: str) -> str:
    """The type's code meaning in a Slicer terminology string (context~category~type~...: 'SCT^10200004^Liver')."""
    fields = str(text).split("~")
    return fields[2].split("^")[2] if len(fields) > 2 and fields[2].count("^") >= 2 else ""


def slicer_segments(data: np.ndarray, header: dict) -> list[tuple[str, str | None, np.ndarray]]:
    """(name, role, bool (X, Y, Z) mask) of each segment of a Slicer ``.seg.nrrd`` (pynrrd data and header).

    A segment is the voxels of its ``_Layer`` that hold its ``_LabelValue``; files without these keys (older Slicer)
    hold one segment per layer with value 1."""
    layers = _layers_last(data, header)
    numbers = sorted(int(m.group(1)) for key in header if (m := re.fullmatch(r"Segment(\d+)_Name", key)))
    segments = []
    for position, number in enumerate(numbers):
        name = str(header[f"Segment{number}_Name"])
        layer = int(header.get(f"Segment{number}_Layer", position if layers.shape[-1] > 1 else 0))
        value = int(header.get(f"Segment{number}_LabelValue", 1))
        terminology = _terminology_type(header.get(f"Segment{number}_Terminology", ""))
        segments.append((name, segment_role(name, terminology), layers[..., layer] == value))
    return segments


def _color_table(label: Path) -> dict[int, str]:
    """Value -> name from a Slicer color table beside a labelmap (``<labelmap name>*.ctbl`` or ``.txt``: lines
    ``value name r g b a``); empty when there is none."""
    stem = _volume_stem(label)
    tables = sorted(p for p in label.parent.glob(f"{stem}*") if p.suffix.lower() in (".ctbl", ".txt"))
    names = {}
    for line in tables[0].read_text(errors="replace").splitlines() if tables else []:
        fields = line.split()
        if len(fields) >= 2 and not line.lstrip().startswith("#") and fields[0].isdigit():
            names[int(fields[0])] = fields[1]
    return names


def labelmap_segments(labels: np.ndarray, label: Path) -> list[tuple[str, str | None, np.ndarray]]:
    """(name, role, bool mask) per value of a labelmap: named by its color table, else 1 liver and 2 tumour."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not np.all(np.mod(np.unique(labels), 1) == 0):
        raise ConversionError(f"{label} holds non-integer values; a labelmap holds whole numbers.", "labels")
    names = _color_table(label)
    if not names:
        if not set(values) <= {1, 2}:
            raise ConversionError(
                f"{label} holds the values {values[:10]} and no color table names them; save the segmentation as "
                ".seg.nrrd (named segments), put its Slicer color table (.ctbl) beside it, or remap it to "
                "0 background, 1 liver, 2 tumour.",
                "labels",
            )
        liver = labels > 0  # LiTS convention: the liver label counts its tumours
        return [("liver", "liver", liver)] + [("tumour", "lesion", labels == 2)] * (2 in values)
    return [(names.get(v, f"value {v}"), segment_role(names.get(v)), labels == v) for v in values]


def read_label_file(label: Path) -> tuple[list[tuple[str, str | None, np.ndarray]], np.ndarray]:
    """The segments (name, role, bool mask (X, Y, Z)) of a Slicer segmentation or labelmap, and their affine."""
    if label.name.lower().endswith((".nrrd", ".nhdr")):
        import nrrd

        data, header = nrrd.read(str(label))
        affine = nrrd_affine(header, label)
        if any(re.fullmatch(r"Segment\d+_Name", key) for key in header):
            return slicer_segments(data, header), affine
        return labelmap_segments(_layers_last(data, header)[..., 0], label), affine
    image = load_clinical_image(label, require_ct=False)
    return labelmap_segments(as_spatial_array(image), label), affine_of(image)


def read_slicer(source: CaseSource) -> LabelledCT:
    """A CT and its Slicer segmentation or labelmap: the liver and the lesion segments, in RAS."""
    hu, affine, _ = read_volume(source.image)
    segments, label_affine = read_label_file(source.label)
    livers = [mask for _, role, mask in segments if role == "liver"]
    if not livers:
        raise _missing_liver(source, [name for name, _, _ in segments], "segment")

    def placed(mask: np.ndarray, name: str) -> np.ndarray:
        return place_on_grid(mask, label_affine, hu.shape, affine, f"Segment '{name}' of {source.label}")

    liver = _union([placed(m, n) for n, role, m in segments if role == "liver"], hu.shape)
    lesions = [placed(m, n) for n, role, m in segments if role == "lesion"]
    notes = _ignored_note([name for name, role, _ in segments if role is None], "segments")
    return labelled_in_ras(source.case_id, hu, affine, liver, lesions, source, notes)


# ------------------------------------------------------------------------------------------- layouts and dispatch

FINDERS: dict[str, Callable[[Path], tuple[list[CaseSource], list[Refusal]]]] = {
    "lits": lambda src: find_lits(src, "lits"),
    "msd": lambda src: find_lits(src, "msd"),
    "ircadb": find_ircadb,
    "dicom_seg": find_dicom_seg,
    "slicer": find_slicer,
}
READERS: dict[str, Callable[[CaseSource], LabelledCT]] = {
    "lits": read_lits,
    "msd": read_lits,
    "ircadb": read_ircadb,
    "dicom_seg": read_dicom_seg,
    "slicer": read_slicer,
}


def detect_layout(src: Path) -> tuple[str, str]:
    """(layout, what gave it away) of a source folder: MSD, LiTS and IRCADb by their names, else Slicer label files,
    else DICOM-SEG files (whose headers are read)."""
    found = {}
    if (src / "imagesTr").is_dir() and (src / "labelsTr").is_dir():
        found["msd"] = "'imagesTr/' and 'labelsTr/'"
    elif labels := list(src.rglob("segmentation-*.nii*")):
        found["lits"] = f"{len(labels)} 'segmentation-<n>.nii' file(s)"
    if patients := _ircadb_patients(src):
        found["ircadb"] = f"'PATIENT_DICOM/' in {len(patients)} folder(s)"
    if len(found) > 1:
        raise ConversionError(
            f"{src} holds several layouts ({'; '.join(f'{k}: {v}' for k, v in found.items())}); choose one with "
            "--layout.",
            "layout",
        )
    if not found and (labels := _slicer_labels(src)):
        found["slicer"] = f"{len(labels)} Slicer segmentation or labelmap file(s)"
    if not found and (segs := [path for path, header in _dicom_headers(src) if _is_seg(header)]):
        found["dicom_seg"] = f"{len(segs)} DICOM-SEG file(s)"
    if not found:
        raise ConversionError(
            f"No labelled CT found under {src}. Expected one of: MSD Task03 ('imagesTr/', 'labelsTr/'); LiTS "
            "('volume-<n>.nii', 'segmentation-<n>.nii'); 3D-IRCADb ('PATIENT_DICOM/', 'MASKS_DICOM/'); a CT DICOM "
            "series with a DICOM-SEG; 3D Slicer files (a '.seg.nrrd', or a labelmap named '*-label.nrrd' beside "
            "the CT).",
            "layout",
        )
    return next(iter(found.items()))


def find_sources(src: Path, layout: str) -> tuple[list[CaseSource], list[Refusal]]:
    """The cases of ``src`` in ``layout`` and the ones refused on sight (a label without its CT ...)."""
    if layout not in FINDERS:
        raise ConversionError(f"Unknown layout '{layout}'; choose one of auto, {', '.join(LAYOUTS)}.", "layout")
    return FINDERS[layout](Path(src))


def read_case(source: CaseSource) -> LabelledCT:
    """Read one case of any layout; the CT reader's warnings (irregular slices ...) become notes of the case."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case = READERS[source.layout](source)
    seen = []
    for item in caught:
        text = str(item.message).splitlines()[0]
        if not issubclass(item.category, ClinicalInputWarning):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        elif text not in seen:
            seen.append(text)
    case.notes.extend(seen)
    return case
