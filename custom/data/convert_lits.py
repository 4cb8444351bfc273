"""Convert a LiTS or MSD Task03 (liver) folder into a referring datalist.

Usage::

    python -m custom.data.convert_lits --src DIR --out DIR [--min-volume-ml X] [--seed S] [--copy-images]

Accepted layouts (labels: 0 background, 1 liver, 2 tumour):

* MSD Task03: ``DIR/imagesTr/<name>.nii.gz`` with ``DIR/labelsTr/<name>.nii.gz``;
* LiTS: ``volume-<n>.nii[.gz]`` with ``segmentation-<n>.nii[.gz]`` anywhere under ``DIR``.

The tumour label is split into 3D connected components (26-connectivity); components smaller than
``min_volume_ml`` are dropped and the rest numbered 1..K by decreasing volume. Each lesion is measured in RAS
world coordinates (volume, longest axial diameter, centroid, lobe and segment from the liver mask, mean HU and
density against the liver) and gets expressions from the same grammar as the synthetic dataset. Lesion types:
``cyst`` (mean at most 15 HU), ``tumour`` (at least 25 HU), ``indeterminate`` in between (never named).

The output folder holds ``lesions/`` and ``liver/`` NIfTI maps on the image grid and ``datalist.json``; images
are referenced by a path relative to the output folder, or copied into ``images/`` with ``--copy-images``.

The same conversion (:func:`write_case` on a :class:`LabelledCT`) serves the other layouts of labelled CT
(3D-IRCADb, DICOM-SEG, 3D Slicer): ``python -m custom.data.import_labelled`` (:mod:`custom.data.importers`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.errors import InputError

from .expressions import EXPRESSION_KINDS, generate_expressions
from .geometry import axial_axis, measure_lesions
from .io import atomic_directory, orientation_of, progress_bar, write_json_atomic, write_nifti
from .synthetic import DEFAULT_SPLIT_FRACTIONS, split_cases

__all__ = [
    "ConversionError",
    "LabelledCT",
    "find_cases",
    "scan_cases",
    "lesion_instances",
    "read_lits_case",
    "write_case",
    "convert_case",
    "convert_lits",
]

DEFAULT_MIN_VOLUME_ML = 0.1
CYST_MAX_HU = 15.0
TUMOUR_MIN_HU = 25.0
KIND_WORDS = ("cyst", "tumour")
NIFTI = re.compile(r"\.nii(\.gz)?$")


class ConversionError(InputError, ValueError):
    """A source folder or case that cannot be converted; the message names the file and the fix.

    ``problem`` names the kind of problem for the import report (:mod:`custom.data.import_labelled`): ``labels``,
    ``grid``, ``unreadable``, ``no_liver``, ``empty_liver``, ``lesion_outside_liver``, ``unpaired``, ``ambiguous``,
    ``layout`` (a source folder in no known layout).
    """

    def __init__(self, message: str, problem: str = "unreadable"):
        super().__init__(message)
        self.problem = problem


@dataclass
class LabelledCT:
    """One labelled CT on one grid, ready to convert (:func:`write_case`).

    ``hu`` (H, W, D) Hounsfield units with its voxel-to-RAS ``affine``; ``liver`` (H, W, D) bool liver mask;
    ``lesions`` bool (H, W, D) masks, each split into lesion instances by :func:`lesion_instances`; ``image_path`` a
    NIfTI file that holds ``hu`` on this grid (referenced, or copied with ``copy_images``), or None to write ``hu``
    into the dataset; ``image_name`` the file name under ``images/`` when the image is copied or written;
    ``source_label`` / ``source_image`` the source files; ``notes`` what the reading noticed (the import report).
    """

    hu: np.ndarray
    affine: np.ndarray
    liver: np.ndarray
    lesions: list[np.ndarray]
    image_path: Path | None
    image_name: str
    source_label: str
    source_image: str = ""
    notes: list[str] = field(default_factory=list)


def _stem(path: Path) -> str:
    return NIFTI.sub("", path.name)


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if NIFTI.search(p.name) and not p.name.startswith("."))


def scan_cases(src: str | Path) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, Path, str]]]:
    """(case_id, image, label) triples of a LiTS or MSD Task03 folder sorted by case id, and the labels without an
    image as (case_id, label, message)."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"Source folder {src} does not exist.")
    cases, unpaired = [], []
    if (src / "imagesTr").is_dir() and (src / "labelsTr").is_dir():
        for label in _nifti_files(src / "labelsTr"):
            images = [p for p in _nifti_files(src / "imagesTr") if _stem(p) == _stem(label)]
            if not images:
                message = (
                    f"Label {label} has no image of the same name in {src / 'imagesTr'}; "
                    "add the image or remove the label."
                )
                unpaired.append((_stem(label), label, message))
                continue
            cases.append((_stem(label), images[0], label))
    else:
        volumes = {re.sub(r"^volume-", "", _stem(p)): p for p in sorted(src.rglob("volume-*.nii*"))}
        for label in sorted(src.rglob("segmentation-*.nii*")):
            number = re.sub(r"^segmentation-", "", _stem(label))
            if number not in volumes:
                message = (
                    f"Label {label} has no matching volume-{number}.nii[.gz] under {src}; "
                    "add the image or remove the label."
                )
                unpaired.append((f"lits_{number}", label, message))
                continue
            cases.append((f"lits_{number}", volumes[number], label))
    return sorted(cases), unpaired


def find_cases(src: str | Path) -> list[tuple[str, Path, Path]]:
    """(case_id, image, label) triples of a LiTS or MSD Task03 folder, sorted by case id."""
    cases, unpaired = scan_cases(src)
    if unpaired:
        raise ConversionError(unpaired[0][2], "unpaired")
    if not cases:
        raise ConversionError(
            f"No cases found under {src}. Expected MSD Task03 ('imagesTr/' and 'labelsTr/' with matching names) "
            "or LiTS ('volume-<n>.nii' with 'segmentation-<n>.nii')."
        )
    return cases


def lesion_instances(masks: Sequence[np.ndarray], voxel_ml: float, min_volume_ml: float) -> tuple[np.ndarray, int]:
    """Bool (H, W, D) lesion masks -> (instance map, number of components dropped as smaller than ``min_volume_ml``).

    Each mask is split into 26-connected components; components of different masks stay apart even where they
    touch (whoever labelled them kept them apart), and a voxel in several masks goes to the first. Instances are
    numbered 1..K by decreasing volume (ties by mask order, then by first voxel in array order).
    """
    structure = np.ones((3, 3, 3), bool)
    labels, sizes, taken = None, [], None
    for mask in masks:
        mask = np.asarray(mask, bool) if taken is None else np.asarray(mask, bool) & ~taken
        components, count = ndimage.label(mask, structure=structure)
        if labels is None:
            labels, taken = components, mask.copy()
        else:
            labels[mask] = components[mask] + len(sizes)
            taken |= mask
        sizes += np.bincount(components.ravel(), minlength=count + 1)[1:].tolist()
    if labels is None:
        raise ValueError("lesion_instances needs at least one mask (an empty one for a case without lesions).")
    sizes = np.asarray(sizes, np.int64)
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] * voxel_ml >= min_volume_ml]
    lookup = np.zeros(len(sizes) + 1, np.uint16)
    lookup[keep] = np.arange(1, len(keep) + 1)
    instances = lookup[labels]
    return (instances.astype(np.uint8) if len(keep) <= 255 else instances), len(sizes) - len(keep)


def tumour_instances(label: np.ndarray, voxel_ml: float, min_volume_ml: float) -> np.ndarray:
    """(H, W, D) label with 2 = tumour -> instance map of the components of at least ``min_volume_ml``.

    Instances are numbered 1..K by decreasing volume (ties by first voxel in array order).
    """
    return lesion_instances([label == 2], voxel_ml, min_volume_ml)[0]


def lesion_kind(mean_hu: float | None) -> str:
    """'cyst', 'tumour' or 'indeterminate' from the mean HU of a lesion."""
    if mean_hu is None:
        return "indeterminate"
    return "cyst" if mean_hu <= CYST_MAX_HU else "tumour" if mean_hu >= TUMOUR_MIN_HU else "indeterminate"


def _load_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    values = np.unique(data)
    if not np.all(np.isin(values, (0, 1, 2))):
        raise ConversionError(
            f"Label {path} holds values {values[:10].tolist()}; expected 0 background, 1 liver, "
            "2 tumour (LiTS / MSD Task03). Remap the labels first.",
            "labels",
        )
    return data.astype(np.uint8), image.affine


def read_lits_case(case_id: str, image_path: Path, label_path: Path) -> LabelledCT:
    """A LiTS / MSD case (NIfTI image and 0/1/2 label on one grid) as a :class:`LabelledCT` on the image's grid."""
    label, affine = _load_label(label_path)
    image = nib.load(str(image_path))
    if tuple(image.shape[:3]) != label.shape:
        raise ConversionError(
            f"Case {case_id}: image {image_path} shape {image.shape} differs from label "
            f"{label_path} shape {label.shape}; the label must be on the image grid.",
            "grid",
        )
    if not np.allclose(image.affine, affine, atol=1e-3):
        raise ConversionError(
            f"Case {case_id}: image and label affines differ ({image_path}, {label_path}); "
            "resave the label with the image's affine.",
            "grid",
        )
    return LabelledCT(
        hu=image.get_fdata(dtype=np.float32),
        affine=affine,
        liver=label > 0,
        lesions=[label == 2],
        image_path=Path(image_path),
        image_name=Path(image_path).name,
        source_label=str(Path(label_path).absolute()),
    )


def _hu_for_writing(hu: np.ndarray) -> np.ndarray:
    """HU as int16 when every value is a whole number in the int16 range (CT as scanners store it), else float32."""
    hu = np.asarray(hu)
    if np.issubdtype(hu.dtype, np.integer) or (np.all(np.isfinite(hu)) and np.all(np.mod(hu, 1) == 0)):
        if hu.size == 0 or (hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max):
            return hu.astype(np.int16)
    return hu.astype(np.float32)


def _image_entry(case: LabelledCT, out_dir: Path, final_dir: Path, copy_images: bool) -> str:
    """The datalist's ``image``: the source NIfTI referenced (relative to the dataset) or copied, or ``case.hu``
    written into ``images/``."""
    if case.image_path is not None and not copy_images:
        return os.path.relpath(case.image_path.absolute(), final_dir)
    (out_dir / "images").mkdir(exist_ok=True)
    target = out_dir / "images" / case.image_name
    if case.image_path is not None:
        shutil.copyfile(case.image_path, target)
    else:
        write_nifti(target, _hu_for_writing(case.hu), case.affine)
    return f"images/{case.image_name}"


def write_case(
    case_id: str,
    case: LabelledCT,
    instances: np.ndarray,
    out_dir: Path,
    final_dir: Path,
    rng: np.random.Generator,
    copy_images: bool = False,
) -> dict:
    """Measure the lesion ``instances`` (H, W, D) of ``case``, write its lesion and liver maps (and its image when
    it has no NIfTI file or ``copy_images``) under ``out_dir``, and return its datalist record."""
    affine = np.asarray(case.affine, float)
    liver = np.asarray(case.liver, bool).astype(np.uint8)
    attributes, case_info = measure_lesions(instances, affine, case.hu, liver)
    for item in attributes:
        item["kind"] = lesion_kind(item.get("mean_hu"))
    for key, array in (("lesions", instances), ("liver", liver)):
        (out_dir / key).mkdir(exist_ok=True)
        write_nifti(out_dir / key / f"{case_id}.nii.gz", array, affine)
    image_entry = _image_entry(case, out_dir, final_dir, copy_images)
    expressions = generate_expressions(attributes, case_info["liver_frame"], rng, kind_words=KIND_WORDS)
    for number, expression in enumerate(expressions):
        expression["id"] = f"{case_id}-{number:02d}"
    record = {
        "case_id": case_id,
        "image": image_entry,
        "lesions": f"lesions/{case_id}.nii.gz",
        "liver": f"liver/{case_id}.nii.gz",
        "source_label": case.source_label,
        "orientation": orientation_of(affine),
        "shape": list(instances.shape),
        "spacing_mm": [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        "num_slices": int(instances.shape[axial_axis(affine)]),
        "liver_hu": case_info["liver_hu"],
        "liver_frame": case_info["liver_frame"],
        "lesion_attributes": attributes,
        "expressions": [{k: e[k] for k in ("id", "text", "targets", "kind", "query")} for e in expressions],
    }
    if case.source_image:
        record["source_image"] = case.source_image
    return record


def convert_case(
    case_id: str,
    image_path: Path,
    label_path: Path,
    out_dir: Path,
    final_dir: Path,
    min_volume_ml: float,
    rng: np.random.Generator,
    copy_images: bool = False,
) -> dict:
    """Write one case's lesion and liver maps under ``out_dir`` and return its datalist record."""
    case = read_lits_case(case_id, image_path, label_path)
    voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000.0
    instances, _ = lesion_instances(case.lesions, voxel_ml, min_volume_ml)
    return write_case(case_id, case, instances, out_dir, final_dir, rng, copy_images)


def convert_lits(
    src: str | Path,
    out: str | Path,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    seed: int = 0,
    copy_images: bool = False,
    split_fractions=DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a LiTS / MSD Task03 folder; returns the path of ``out/datalist.json`` (written atomically).

    ``progress`` shows a progress bar (only on a terminal).
    """
    cases = find_cases(src)
    splits = split_cases([case_id for case_id, _, _ in cases], seed, split_fractions)
    final_dir = Path(out).absolute()
    with atomic_directory(final_dir, overwrite=overwrite) as tmp:
        records = {}
        bar = progress_bar(cases, desc="Converting cases", unit="case", enabled=progress)
        for index, (case_id, image, label) in enumerate(bar):
            rng = np.random.default_rng([seed, index])
            records[case_id] = convert_case(
                case_id, image, label, Path(tmp), final_dir, min_volume_ml, rng, copy_images
            )
        datalist = {
            "name": f"Referring liver lesions converted from {Path(src).name}",
            "description": "LiTS / MSD Task03 tumour components as lesion instances with generated referring "
            "expressions (custom.data.convert_lits).",
            "modality": "CT",
            "generator": {
                "module": "custom.data.convert_lits",
                "source": str(Path(src).absolute()),
                "seed": seed,
                "min_volume_ml": min_volume_ml,
            },
            "expression_kinds": list(EXPRESSION_KINDS),
            **{name: [records[case_id] for case_id in ids] for name, ids in splits.items()},
        }
        write_json_atomic(Path(tmp) / "datalist.json", datalist)
    return final_dir / "datalist.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert a LiTS / MSD Task03 folder to a referring datalist.")
    parser.add_argument("--src", required=True, help="LiTS or MSD Task03 folder")
    parser.add_argument("--out", required=True, help="output folder (created; must not hold other files)")
    parser.add_argument(
        "--min-volume-ml",
        type=float,
        default=DEFAULT_MIN_VOLUME_ML,
        help="drop tumour components smaller than this (ml)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and expression sampling")
    parser.add_argument("--copy-images", action="store_true", help="copy images into the output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = convert_lits(
        args.src,
        args.out,
        args.min_volume_ml,
        args.seed,
        args.copy_images,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"Converted {args.src} in {time.perf_counter() - start:.1f} s: {path}")


if __name__ == "__main__":
    main()
