"""Synthetic lesions inserted into a real (or phantom) liver.

After Hu et al., "Label-free liver tumor segmentation" (CVPR 2023): a lesion's shape is a randomly deformed and
rotated ellipsoid, its texture a scaled and smoothed noise, its contrast set by its kind and the contrast phase,
and it is placed inside the liver away from the large vessels. The real image keeps its own noise and texture: a
lesion replaces the local mean HU (the image smoothed), not the voxels' fluctuation around it, and its border is
blended over about a millimetre. Mass effect (the liver pushed aside by a large lesion) is not modelled.

Kinds and their HU, ``L`` the liver parenchyma (median of the liver label away from vessels):

* ``cyst``: 0-20 HU, homogeneous, sharp margin;
* ``metastasis``: ``L`` - 30 to 70 HU (unenhanced: ``L`` - 10 to 30), lobulated; an enhancing rim (``L`` + 5 to
  25) from 15 mm up (not unenhanced), a darker necrotic centre from 25 mm up;
* ``hyperdense``: ``L`` + 40 to 90 HU (not unenhanced: there ``L`` - 20 to 35, a hypodense focus);
* ``hemangioma``: arterial / portal venous: a hypodense centre (``L`` - 20 to 40) with nodular rim enhancement as
  bright as blood (``L`` + 40 to 80); delayed: filled in, ``L`` + 10 to 25; unenhanced: ``L`` - 20 to 35;
* ``hcc``: arterial: ``L`` + 30 to 60; portal venous and delayed: washout (``L`` - 15 to 35) with an enhancing
  capsule (``L`` + 10 to 20); unenhanced: ``L`` - 10 to 25.

The phase is given, or guessed from ``L`` (at most 65 HU: unenhanced; otherwise portal venous).

``python -m custom.data.lesion_insertion --image ct.nii.gz --liver liver.nii.gz --out <folder> --cases N`` writes
N variants of the CT, each with its own lesions, as a dataset (``datalist.json``, lesion instances, liver, and the
referring expressions generated from the lesions' measured geometry, by the LiTS / MSD import,
:mod:`custom.data.convert_lits`).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.augmentation import liver_parts
from custom.data.convert_lits import DEFAULT_MIN_VOLUME_ML, convert_case
from custom.data.expressions import EXPRESSION_KINDS
from custom.data.io import atomic_directory, write_json_atomic, write_nifti
from custom.data.phantom import random_rotation, smooth_field

__all__ = [
    "LESION_KINDS",
    "InsertionOptions",
    "LiverCanvas",
    "estimate_phase",
    "insert_into",
    "insert_lesions",
    "write_inserted_dataset",
]

LESION_KINDS = ("cyst", "metastasis", "hyperdense", "hemangioma", "hcc")
PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")
UNENHANCED_MAX_LIVER_HU = 65.0


@dataclass
class InsertionOptions:
    """How many lesions, of which kinds and sizes (diameters in mm, drawn log-uniformly)."""

    count_range: tuple[int, int] = (1, 5)
    kind_weights: dict[str, float] = field(
        default_factory=lambda: {"cyst": 0.25, "metastasis": 0.3, "hyperdense": 0.15, "hemangioma": 0.15, "hcc": 0.15}
    )
    diameter_range_mm: tuple[float, float] = (5.0, 50.0)
    edge_mm: tuple[float, float] = (0.5, 1.5)
    min_inside_fraction: float = 0.7
    min_volume_ml: float = 0.1
    vessel_clearance_mm: float = 3.0


def estimate_phase(liver_hu: float) -> str:
    """The contrast phase guessed from the liver parenchyma's HU: unenhanced up to 65 HU, else portal venous."""
    return "non_contrast" if liver_hu <= UNENHANCED_MAX_LIVER_HU else "portal_venous"


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def lesion_field(
    shape: tuple[int, ...], centre: np.ndarray, radii_mm: np.ndarray, spacing: np.ndarray, rng: np.random.Generator
) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box around a deformed, rotated ellipsoid and its normalised radius ``q`` (< 1 inside) in that box."""
    half = np.ceil(1.4 * radii_mm.max() / spacing).astype(int) + 1
    low = np.maximum(np.round(centre).astype(int) - half, 0)
    high = np.minimum(np.round(centre).astype(int) + half + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    grids = np.meshgrid(*[(np.arange(s.start, s.stop) - c) * d for s, c, d in zip(box, centre, spacing)], indexing="ij")
    local = np.einsum("ij,j...->i...", random_rotation(rng).T, np.stack(grids))
    q = np.sqrt(sum((local[i] / radii_mm[i]) ** 2 for i in range(3)))
    bumps = smooth_field(rng, q.shape, cells=3)
    return box, q / (1.0 + rng.uniform(0.03, 0.15) * bumps)


def lesion_hu(kind: str, phase: str, liver_hu: float, q: np.ndarray, diameter: float, rng) -> np.ndarray:
    """The lesion's HU over its box (``q`` its normalised radius): contrast by kind and phase, plus texture."""
    texture = rng.uniform(2.0, 8.0) * smooth_field(rng, q.shape, cells=4)
    unenhanced = phase == "non_contrast"
    if kind == "cyst":
        return np.full(q.shape, rng.uniform(0.0, 20.0), np.float32) + 0.3 * texture
    if kind == "hyperdense":
        shift = -rng.uniform(20, 35) if unenhanced else rng.uniform(40, 90)
        return liver_hu + shift + texture
    if kind == "metastasis":
        hu = liver_hu - (rng.uniform(10, 30) if unenhanced else rng.uniform(30, 70)) + texture
        if diameter >= 25:
            hu = np.where(q < 0.45, hu - rng.uniform(10, 20), hu)
        if diameter >= 15 and not unenhanced:
            rim = max(1.2, 0.1 * diameter / 2) / (diameter / 2)
            hu = np.where(q > 1.0 - rim, liver_hu + rng.uniform(5, 25), hu)
        return hu
    if kind == "hemangioma":
        if unenhanced:
            return liver_hu - rng.uniform(20, 35) + texture
        if phase == "delayed":
            return liver_hu + rng.uniform(10, 25) + texture
        hu = liver_hu - rng.uniform(20, 40) + texture
        nodules = (q > 0.7) & (smooth_field(rng, q.shape, cells=6) > 0.2)
        return np.where(nodules, liver_hu + rng.uniform(40, 80), hu)
    if kind == "hcc":
        if unenhanced:
            return liver_hu - rng.uniform(10, 25) + texture
        if phase == "arterial":
            return liver_hu + rng.uniform(30, 60) + texture
        hu = liver_hu - rng.uniform(15, 35) + texture
        return np.where(q > 0.88, liver_hu + rng.uniform(10, 20), hu)
    raise ValueError(f"unknown lesion kind {kind!r}; expected one of {LESION_KINDS}")


@dataclass
class LiverCanvas:
    """A CT's liver, measured once, ready to receive lesions (:func:`insert_into`).

    ``image`` (H, W, D) float32 HU; ``liver`` (H, W, D) bool; ``spacing`` (3,) mm; ``liver_hu`` the parenchyma's
    median away from vessels; ``phase`` the contrast phase; ``inside_depth`` and ``vessel_distance`` (H, W, D) the
    distances (mm) to the liver's border and to its vessels; ``local_mean`` (H, W, D) the image smoothed over 1.5 mm,
    the mean HU a lesion replaces.
    """

    image: np.ndarray
    liver: np.ndarray
    spacing: np.ndarray
    liver_hu: float
    phase: str
    inside_depth: np.ndarray
    vessel_distance: np.ndarray
    local_mean: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray, liver: np.ndarray, affine: np.ndarray, phase: str | None = None) -> LiverCanvas:
        """Measure the liver of ``image`` (HU) within the mask ``liver`` on the grid of ``affine``."""
        liver = np.asarray(liver) > 0
        spacing = spacing_of(affine)
        image = np.asarray(image, np.float32)
        parts = liver_parts(image, liver, np.zeros(liver.shape, bool), (1.0, 1.0, 0.0))
        if parts["liver_hu"] is None:
            raise ValueError("the liver mask is empty: there is no liver to insert lesions into")
        phase = phase or estimate_phase(parts["liver_hu"])
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        return cls(
            image=image,
            liver=liver,
            spacing=spacing,
            liver_hu=parts["liver_hu"],
            phase=phase,
            inside_depth=ndimage.distance_transform_edt(liver, sampling=spacing),
            vessel_distance=ndimage.distance_transform_edt(~parts["vessels"], sampling=spacing),
            local_mean=ndimage.gaussian_filter(image, 1.5 / spacing, mode="nearest"),
        )


def insert_lesions(
    image: np.ndarray,
    liver: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    options: InsertionOptions | None = None,
    phase: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Insert lesions into the liver of a CT.

    ``image`` (H, W, D) HU, ``liver`` (H, W, D) mask, ``affine`` its voxel-to-world matrix. Returns the image
    (float32 HU), the label map (0 background, 1 liver, 2 lesion; LiTS / MSD numbering) and what was inserted
    (``phase``, ``liver_hu``, per lesion its kind, diameter and voxel count).
    """
    return insert_into(LiverCanvas.of(image, liver, affine, phase), rng, options)


def insert_into(
    canvas: LiverCanvas, rng: np.random.Generator, options: InsertionOptions | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`insert_lesions` on a liver measured once (several variants of one CT)."""
    options = options or InsertionOptions()
    out = canvas.image.copy()
    lesions = np.zeros(canvas.liver.shape, bool)
    kinds, weights = zip(*options.kind_weights.items())
    weights = np.asarray(weights, float) / sum(weights)
    inserted = []
    for _ in range(int(rng.integers(options.count_range[0], options.count_range[1] + 1))):
        kind = str(rng.choice(kinds, p=weights))
        diameter = float(np.exp(rng.uniform(*np.log(options.diameter_range_mm))))
        for _attempt in range(20):
            placed = _place(canvas, out, lesions, kind, diameter, options, rng)
            if placed is not None:
                inserted.append({"kind": kind, "diameter_mm": round(diameter, 1), "voxels": placed})
                break
            diameter = max(options.diameter_range_mm[0], diameter * 0.85)
    label = canvas.liver.astype(np.uint8)
    label[lesions] = 2
    return out, label, {"phase": canvas.phase, "liver_hu": round(canvas.liver_hu, 1), "lesions": inserted}


def _place(
    canvas: LiverCanvas,
    out: np.ndarray,
    lesions: np.ndarray,
    kind: str,
    diameter: float,
    options: InsertionOptions,
    rng: np.random.Generator,
) -> int | None:
    """Paint one lesion into ``out`` and ``lesions`` at a random admissible centre; its voxel count, or None when it
    did not fit."""
    liver, spacing = canvas.liver, canvas.spacing
    radius = diameter / 2
    admissible = (
        (canvas.inside_depth >= 0.5 * radius) & (canvas.vessel_distance >= options.vessel_clearance_mm) & ~lesions
    )
    points = np.argwhere(admissible)
    if len(points) == 0:
        return None
    centre = points[rng.integers(len(points))] + rng.uniform(-0.5, 0.5, 3)
    radii = radius * rng.uniform(0.8, 1.2, 3)
    radii *= radius / np.cbrt(np.prod(radii))
    box, q = lesion_field(liver.shape, centre, radii, spacing, rng)
    edge = rng.uniform(*options.edge_mm) / radius
    weight = np.clip((1.0 - q) / edge + 0.5, 0.0, 1.0)
    shape = q <= 1.0
    mask = shape & liver[box] & ~lesions[box]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if (
        mask.sum() * voxel_ml < options.min_volume_ml
        or mask.sum() < options.min_inside_fraction * shape.sum()
        or (shape & lesions[box]).any()
    ):
        return None
    weight = np.where(liver[box], weight, 0.0)
    target = lesion_hu(kind, canvas.phase, canvas.liver_hu, q, diameter, rng)
    out[box] += (weight * (target - canvas.local_mean[box])).astype(np.float32)
    lesions[box] |= mask
    return int(mask.sum())


def write_inserted_dataset(
    image_path: str | Path,
    liver_path: str | Path,
    out: str | Path,
    cases: int,
    seed: int = 0,
    split: str = "test",
    options: InsertionOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """``cases`` variants of one CT, each with its own inserted lesions, as a dataset; returns its datalist path.

    Every variant goes to ``split`` (the others are empty). Each case is converted as a LiTS / MSD case is
    (:func:`custom.data.convert_lits.convert_case`: lesion instances, liver, expressions from the measured lesions);
    the images are written into the dataset (``images/``).
    """
    ct = nib.load(str(image_path))
    liver_image = nib.load(str(liver_path))
    if ct.shape[:3] != liver_image.shape[:3] or not np.allclose(ct.affine, liver_image.affine, atol=1e-3):
        raise ValueError(f"{liver_path} is not on the grid of {image_path}: resample the liver mask onto the CT first")
    canvas = LiverCanvas.of(ct.get_fdata(dtype=np.float32), np.asarray(liver_image.dataobj) > 0, ct.affine)
    final_dir = Path(out).absolute()
    records, inserted = [], {}
    with atomic_directory(final_dir, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        (Path(tmp) / "images").mkdir()
        for index in range(cases):
            case_id = f"inserted_{index:03d}"
            rng = np.random.default_rng([seed, index])
            image, label, inserted[case_id] = insert_into(canvas, rng, options)
            image_file = Path(tmp) / "images" / f"{case_id}.nii.gz"
            label_file = Path(scratch) / f"{case_id}_label.nii.gz"
            write_nifti(image_file, np.clip(np.rint(image), -1024, 3071).astype(np.int16), ct.affine)
            write_nifti(label_file, label, ct.affine)
            record = convert_case(case_id, image_file, label_file, Path(tmp), final_dir, DEFAULT_MIN_VOLUME_ML, rng)
            record["image"] = f"images/{case_id}.nii.gz"
            record["source_label"] = None
            record["inserted"] = inserted[case_id]
            records.append(record)
        datalist = {
            "name": f"Lesions inserted into {Path(image_path).name}",
            "description": "Synthetic lesions inserted into a real liver (custom.data.lesion_insertion), converted "
            "as LiTS / MSD cases (custom.data.convert_lits).",
            "modality": "CT",
            "generator": {
                "module": "custom.data.lesion_insertion",
                "source": Path(image_path).name,
                "liver": Path(liver_path).name,
                "seed": seed,
                "cases": cases,
            },
            "expression_kinds": list(EXPRESSION_KINDS),
            **{name: records if name == split else [] for name in ("training", "validation", "test")},
        }
        write_json_atomic(Path(tmp) / "datalist.json", datalist)
    return final_dir / "datalist.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="the CT (NIfTI, HU)")
    parser.add_argument("--liver", required=True, help="its liver mask (NIfTI, on the CT's grid)")
    parser.add_argument("--out", required=True, help="the dataset folder to write (must not exist)")
    parser.add_argument("--cases", type=int, default=8, help="how many variants, each with its own lesions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_inserted_dataset(args.image, args.liver, args.out, args.cases, args.seed)}")


if __name__ == "__main__":
    main()
