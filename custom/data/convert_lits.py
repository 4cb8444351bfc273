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
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .expressions import EXPRESSION_KINDS, generate_expressions
from .geometry import axial_axis, measure_lesions
from .io import atomic_directory, orientation_of, progress_bar, write_json_atomic, write_nifti
from .synthetic import DEFAULT_SPLIT_FRACTIONS, split_cases

__all__ = ["ConversionError", "find_cases", "convert_case", "convert_lits"]

DEFAULT_MIN_VOLUME_ML = 0.1
CYST_MAX_HU = 15.0
TUMOUR_MIN_HU = 25.0
KIND_WORDS = ("cyst", "tumour")
NIFTI = re.compile(r"\.nii(\.gz)?$")


class ConversionError(ValueError):
    """A source folder or case that cannot be converted; the message names the file and the fix."""


def _stem(path: Path) -> str:
    return NIFTI.sub("", path.name)


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if NIFTI.search(p.name) and not p.name.startswith("."))


def find_cases(src: str | Path) -> list[tuple[str, Path, Path]]:
    """(case_id, image, label) triples of a LiTS or MSD Task03 folder, sorted by case id."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"Source folder {src} does not exist.")
    if (src / "imagesTr").is_dir() and (src / "labelsTr").is_dir():
        cases = []
        for label in _nifti_files(src / "labelsTr"):
            images = [p for p in _nifti_files(src / "imagesTr") if _stem(p) == _stem(label)]
            if not images:
                raise ConversionError(
                    f"Label {label} has no image of the same name in {src / 'imagesTr'}; "
                    "add the image or remove the label."
                )
            cases.append((_stem(label), images[0], label))
    else:
        volumes = {re.sub(r"^volume-", "", _stem(p)): p for p in sorted(src.rglob("volume-*.nii*"))}
        cases = []
        for label in sorted(src.rglob("segmentation-*.nii*")):
            number = re.sub(r"^segmentation-", "", _stem(label))
            if number not in volumes:
                raise ConversionError(
                    f"Label {label} has no matching volume-{number}.nii[.gz] under {src}; "
                    "add the image or remove the label."
                )
            cases.append((f"lits_{number}", volumes[number], label))
    if not cases:
        raise ConversionError(
            f"No cases found under {src}. Expected MSD Task03 ('imagesTr/' and 'labelsTr/' with matching names) "
            "or LiTS ('volume-<n>.nii' with 'segmentation-<n>.nii')."
        )
    return sorted(cases)


def tumour_instances(label: np.ndarray, voxel_ml: float, min_volume_ml: float) -> np.ndarray:
    """(H, W, D) label with 2 = tumour -> instance map of the components of at least ``min_volume_ml``.

    Instances are numbered 1..K by decreasing volume (ties by first voxel in array order).
    """
    components, count = ndimage.label(label == 2, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] * voxel_ml >= min_volume_ml]
    lookup = np.zeros(count + 1, np.uint16)
    lookup[keep] = np.arange(1, len(keep) + 1)
    instances = lookup[components]
    return instances.astype(np.uint8) if len(keep) <= 255 else instances


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
            "2 tumour (LiTS / MSD Task03). Remap the labels first."
        )
    return data.astype(np.uint8), image.affine


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
    label, affine = _load_label(label_path)
    image = nib.load(str(image_path))
    if tuple(image.shape[:3]) != label.shape:
        raise ConversionError(
            f"Case {case_id}: image {image_path} shape {image.shape} differs from label "
            f"{label_path} shape {label.shape}; the label must be on the image grid."
        )
    if not np.allclose(image.affine, affine, atol=1e-3):
        raise ConversionError(
            f"Case {case_id}: image and label affines differ ({image_path}, {label_path}); "
            "resave the label with the image's affine."
        )
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    instances = tumour_instances(label, voxel_ml, min_volume_ml)
    liver = (label > 0).astype(np.uint8)
    hu = image.get_fdata(dtype=np.float32)
    attributes, case_info = measure_lesions(instances, affine, hu, liver)
    for item in attributes:
        item["kind"] = lesion_kind(item.get("mean_hu"))
    for key, array in (("lesions", instances), ("liver", liver)):
        (out_dir / key).mkdir(exist_ok=True)
        write_nifti(out_dir / key / f"{case_id}.nii.gz", array, affine)
    if copy_images:
        (out_dir / "images").mkdir(exist_ok=True)
        target = out_dir / "images" / image_path.name
        shutil.copyfile(image_path, target)
        image_entry = f"images/{image_path.name}"
    else:
        image_entry = os.path.relpath(image_path.absolute(), final_dir)
    expressions = generate_expressions(attributes, case_info["liver_frame"], rng, kind_words=KIND_WORDS)
    for number, expression in enumerate(expressions):
        expression["id"] = f"{case_id}-{number:02d}"
    return {
        "case_id": case_id,
        "image": image_entry,
        "lesions": f"lesions/{case_id}.nii.gz",
        "liver": f"liver/{case_id}.nii.gz",
        "source_label": str(label_path.absolute()),
        "orientation": orientation_of(affine),
        "shape": list(label.shape),
        "spacing_mm": [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        "num_slices": int(label.shape[axial_axis(affine)]),
        "liver_hu": case_info["liver_hu"],
        "liver_frame": case_info["liver_frame"],
        "lesion_attributes": attributes,
        "expressions": [{k: e[k] for k in ("id", "text", "targets", "kind", "query")} for e in expressions],
    }


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
