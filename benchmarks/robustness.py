"""Robustness benchmark: referring segmentation and predicted liver volume under CT perturbations, one at a time.

Usage::

    python -m benchmarks.robustness [--split test] [--perturbations noise_20 kernel_sharp ...] [--max_cases N] \
        [--checkpoint bundle/models/model.pt] [--seed 0] [--work_dir DIR] [--keep] [--out results.json] \
        [--set harmonisation#enabled=false]

On a CPU shared with other work, run it with ``OMP_NUM_THREADS=1``: torch's default of one thread per core, with
another process on the cores, made one evaluation of 4 cases take 261 s instead of 14 s (same results).

Every case of ``--split`` of the default synthetic dataset (``ensure_default_dataset('cache')``; the first
``--max_cases`` only, when given) is perturbed with one perturbation at a time. The perturbed images are written
into a temporary dataset folder whose ``datalist.json`` keeps each case's other keys (``lesions``, ``liver``,
``expressions``, ``lesion_attributes`` ...) and replaces its ``image`` only; the slice-thickness perturbations
also replace ``lesions`` and ``liver`` with the label maps resampled (nearest neighbour) onto the new grid. Each
folder is evaluated with ``benchmarks.lesion_detection.evaluate_split``: the network, transforms, inferer and
referral of ``bundle/configs/evaluate.json`` (what ``python -m monai.bundle run evaluating`` builds) with the
expressions scored by ``custom.metrics``; its text-free pass also gives the predicted liver on the input grid, whose
volume is recorded per case. The unperturbed cases are evaluated the same way, as the reference.

Perturbations (:data:`PERTURBATIONS`; seeds fixed by ``--seed``, the case and the perturbation):

- ``phase_non_contrast``, ``phase_arterial``, ``phase_delayed``: contrast phase, inside the liver label only. The
  parenchyma (its median HU) is moved to the phase's liver HU, the lesions by the same offset (lesion-to-liver
  contrast, hence the density words, kept), and the intrahepatic vessels (liver voxels, away from lesions, whose
  in-plane smoothed HU exceeds the parenchyma by 20 HU) to the phase's vessel HU. Vessels and organs outside the
  liver (aorta, spleen, kidneys) keep their enhancement: there are no labels for them.
- ``offset_+60``, ``offset_-60``: HU offset inside the body (HU > -500); lesion-to-liver contrast kept.
- ``noise_10``, ``noise_20``, ``noise_40``: white Gaussian noise of that standard deviation (HU) inside the body.
- ``kernel_smooth``: smoother reconstruction kernel, Gaussian blur of sigma 1 voxel in-plane.
- ``kernel_sharp``: sharper kernel, unsharp mask (image + 1.0 x (image - Gaussian blur of sigma 1 voxel in-plane)).
- ``slices_1mm`` (``slices_1.5mm`` on request), ``slices_5mm``: slice thickness; the image resampled along the slice
  axis (linear, after a Gaussian slab profile when the slices get thicker), labels nearest neighbour, the affine
  updated. A lesion that nearest neighbour would lose (a one-slice lesion between two thick slices) is put back on
  the nearest new slice, so every expression keeps its targets; their number is reported.

Printed: one line per evaluation as it finishes (its wall time), then a table per perturbation: mean 3D Dice per
expression and its drop against the unperturbed run of the same cases, the density-expression Dice and drop, the
change of the predicted liver volume per case against the unperturbed prediction (mean and max absolute relative
change, %), liver Dice, the seconds of the evaluation and of the perturbing; then the 3D Dice per expression kind and
the wall time of the whole run. ``--out`` writes all of it as JSON, with the per-case volume changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks import lesion_detection
from custom import augmentation
from custom.augmentation import body_mask
from custom.clinical.measurements import axial_axis
from custom.data.datalist import load_datalist
from custom.data.default_dataset import ensure_default_dataset
from custom.data.io import write_nifti
from custom.user_inputs import add_set_option

ROOT = Path(__file__).resolve().parents[1]
HU_RANGE = (-1024.0, 3071.0)
#: Liver parenchyma and intrahepatic vessel HU per contrast phase. Unenhanced liver about 55 HU and blood about
#: 40 HU; arterial and delayed are the middle of the phantom's ranges (``custom.data.phantom.sample_contrast``:
#: liver 70-85 and 85-100 HU; arterial vessels the mean of its portal, 120-160, and hepatic veins, 35-50 HU;
#: delayed vessels 10-20 HU above the liver).
PHASE_HU = {"non_contrast": (55.0, 40.0), "arterial": (78.0, 90.0), "delayed": (92.0, 107.0)}
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass
class Volumes:
    """One case's arrays on one grid: ``image`` (float HU), ``lesions`` (instance map), ``liver`` (mask)."""

    image: np.ndarray
    lesions: np.ndarray
    liver: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- array perturbations


def in_plane_sigma(affine: np.ndarray, sigma: float, ndim: int = 3) -> tuple[float, ...]:
    """Per-axis Gaussian sigma: ``sigma`` voxels on the two in-plane axes, 0 along the slice axis."""
    axis = axial_axis(affine)
    return tuple(0.0 if a == axis else float(sigma) for a in range(ndim))


def hu_offset(image: np.ndarray, offset: float) -> np.ndarray:
    """``image`` with ``offset`` HU added inside the body."""
    return np.where(body_mask(image), image + offset, image)


def add_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` with white Gaussian noise of ``std`` HU added inside the body."""
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
    return np.where(body_mask(image), image + noise, image)


def blur_in_plane(image: np.ndarray, affine: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """A smoother reconstruction kernel: Gaussian blur of ``sigma`` voxels in-plane, none across slices."""
    return ndimage.gaussian_filter(image.astype(np.float32), in_plane_sigma(affine, sigma), mode="nearest")


def sharpen_in_plane(image: np.ndarray, affine: np.ndarray, sigma: float = 1.0, amount: float = 1.0) -> np.ndarray:
    """A sharper reconstruction kernel: unsharp mask, ``image + amount * (image - in-plane blur)``."""
    image = image.astype(np.float32)
    return image + np.float32(amount) * (image - blur_in_plane(image, affine, sigma))


def change_phase(
    image: np.ndarray, liver: np.ndarray, lesions: np.ndarray, affine: np.ndarray, liver_hu: float, vessel_hu: float
) -> tuple[np.ndarray, dict]:
    """Another contrast phase inside the liver label (:func:`custom.augmentation.change_phase`), vessels found
    after an in-plane smoothing of sigma 1 voxel."""
    return augmentation.change_phase(image, liver, lesions, liver_hu, vessel_hu, in_plane_sigma(affine, 1.0))


def slice_positions(count: int, spacing: float, thickness: float) -> np.ndarray:
    """Centres of the new slices in the old slice index, covering the same extent (centred on it)."""
    new_count = max(1, int(round(count * spacing / thickness)))
    step = thickness / spacing
    start = -0.5 + (count - new_count * step) / 2.0
    return start + (np.arange(new_count) + 0.5) * step


def resample_linear(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """``array`` linearly interpolated at fractional ``positions`` along ``axis`` (edges held)."""
    positions = np.clip(positions, 0, array.shape[axis] - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, array.shape[axis] - 1)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = (positions - low).reshape(shape).astype(np.float32)
    return np.take(array, low, axis) * (1 - weight) + np.take(array, high, axis) * weight


def restore_lost_lesions(
    old: np.ndarray, new: np.ndarray, liver: np.ndarray, positions: np.ndarray, axis: int
) -> list[int]:
    """Put each lesion of ``old`` missing from ``new`` back: its largest old slice onto the nearest new slice.

    Only background voxels of ``new`` are written; ``liver`` gets them too. Returns the ids put back.
    """
    lost = sorted(set(np.unique(old).tolist()) - set(np.unique(new).tolist()) - {0})
    for lesion in lost:
        counts = np.moveaxis(old == lesion, axis, 0).reshape(old.shape[axis], -1).sum(1)
        source = int(np.argmax(counts))
        target = int(np.argmin(np.abs(positions - source)))
        mask = (np.take(old, source, axis) == lesion) & (np.take(new, target, axis) == 0)
        index = [slice(None)] * old.ndim
        index[axis] = target
        new[tuple(index)][mask] = lesion
        liver[tuple(index)][mask] = 1
    return lost


def resample_slices(volumes: Volumes, thickness: float) -> Volumes:
    """``volumes`` on slices ``thickness`` mm apart along the slice axis, same extent, affine updated.

    Image: linear interpolation, after a Gaussian slab profile along the axis when the slices get thicker (FWHM
    ``sqrt(thickness**2 - spacing**2)``). Labels: nearest neighbour, lost lesions put back
    (:func:`restore_lost_lesions`).
    """
    axis = axial_axis(volumes.affine)
    spacing = float(np.linalg.norm(volumes.affine[:3, axis]))
    positions = slice_positions(volumes.image.shape[axis], spacing, thickness)
    image = volumes.image.astype(np.float32)
    if thickness > spacing:
        sigma = np.sqrt(thickness**2 - spacing**2) / FWHM_PER_SIGMA / spacing
        image = ndimage.gaussian_filter1d(image, sigma, axis=axis, mode="nearest")
    nearest = np.clip(np.rint(positions), 0, volumes.image.shape[axis] - 1).astype(int)
    lesions = np.take(volumes.lesions, nearest, axis)
    liver = np.take(volumes.liver if volumes.liver is not None else volumes.lesions > 0, nearest, axis)
    restored = restore_lost_lesions(volumes.lesions, lesions, liver, positions, axis)
    affine = np.array(volumes.affine, dtype=float)
    affine[:3, 3] += affine[:3, axis] * positions[0]
    affine[:3, axis] *= thickness / spacing
    info = {"slices": [int(volumes.image.shape[axis]), len(positions)], "spacing_mm": [spacing, thickness]}
    info["lesions_restored"] = restored
    liver = liver if volumes.liver is not None else None
    return Volumes(resample_linear(image, positions, axis), lesions, liver, affine, info)


# ---------------------------------------------------------------- the perturbations


def _image_only(function: Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]):
    """A perturbation of the image alone from ``function(image, affine, rng)``."""

    def apply(volumes: Volumes, rng: np.random.Generator) -> Volumes:
        return Volumes(function(volumes.image, volumes.affine, rng), volumes.lesions, volumes.liver, volumes.affine)

    return apply


def _phase(name: str) -> Callable[[Volumes, np.random.Generator], Volumes]:
    """The contrast phase perturbation ``name`` (:data:`PHASE_HU`)."""

    def apply(volumes: Volumes, rng: np.random.Generator) -> Volumes:
        if volumes.liver is None:
            raise ValueError("a contrast phase perturbation needs the case's liver label")
        image, info = change_phase(volumes.image, volumes.liver, volumes.lesions, volumes.affine, *PHASE_HU[name])
        return Volumes(image, volumes.lesions, volumes.liver, volumes.affine, info)

    return apply


def _slices(thickness: float) -> Callable[[Volumes, np.random.Generator], Volumes]:
    """The slice-thickness perturbation to ``thickness`` mm."""
    return lambda volumes, rng: resample_slices(volumes, thickness)


#: name -> (description, apply(volumes, rng) -> volumes). ``DEFAULT_PERTURBATIONS`` are run without
#: ``--perturbations``.
PERTURBATIONS: dict[str, tuple[str, Callable[[Volumes, np.random.Generator], Volumes]]] = {
    **{
        f"phase_{name}": (
            f"{name.replace('_', '-')} phase in the liver: parenchyma {liver:.0f} HU, vessels {vessel:.0f} HU",
            _phase(name),
        )
        for name, (liver, vessel) in PHASE_HU.items()
    },
    "offset_+60": ("+60 HU inside the body", _image_only(lambda image, affine, rng: hu_offset(image, 60.0))),
    "offset_-60": ("-60 HU inside the body", _image_only(lambda image, affine, rng: hu_offset(image, -60.0))),
    **{
        f"noise_{std}": (
            f"Gaussian noise, std {std} HU, inside the body",
            _image_only(lambda image, affine, rng, std=std: add_noise(image, float(std), rng)),
        )
        for std in (10, 20, 40)
    },
    "kernel_smooth": (
        "smoother kernel: Gaussian blur, sigma 1 voxel in-plane",
        _image_only(lambda image, affine, rng: blur_in_plane(image, affine, 1.0)),
    ),
    "kernel_sharp": (
        "sharper kernel: unsharp mask, sigma 1 voxel in-plane, amount 1",
        _image_only(lambda image, affine, rng: sharpen_in_plane(image, affine, 1.0, 1.0)),
    ),
    "slices_1mm": ("1.0 mm slices", _slices(1.0)),
    "slices_1.5mm": ("1.5 mm slices", _slices(1.5)),
    "slices_5mm": ("5 mm slices", _slices(5.0)),
}
DEFAULT_PERTURBATIONS = [name for name in PERTURBATIONS if name != "slices_1.5mm"]


def case_rng(seed: int, perturbation: str, case_id: str) -> np.random.Generator:
    """The fixed random generator of one perturbation of one case."""
    return np.random.default_rng([seed, zlib.crc32(perturbation.encode()), zlib.crc32(case_id.encode())])


# ---------------------------------------------------------------- datasets


def read_volumes(case: dict) -> Volumes:
    """A case's image (float32 HU), lesion map and liver mask (as stored), with the image's affine."""
    image = nib.load(case["image"])
    liver = np.asarray(nib.load(case["liver"]).dataobj) if case.get("liver") else None
    lesions = np.asarray(nib.load(case["lesions"]).dataobj)
    return Volumes(image.get_fdata(dtype=np.float32), lesions, liver, np.asarray(image.affine, dtype=float))


def to_int16_hu(image: np.ndarray) -> np.ndarray:
    """HU rounded and clipped to the CT range, as int16."""
    return np.clip(np.rint(image), *HU_RANGE).astype(np.int16)


def perturb_case(case: dict, name: str, folder: Path, seed: int) -> tuple[dict, dict]:
    """Write case ``case`` perturbed with ``name`` into ``folder``; returns its datalist record and the info.

    The record is ``case`` (absolute paths) with ``image`` (and, when the grid changed, ``lesions`` and ``liver``)
    replaced by paths relative to ``folder``.
    """
    volumes = read_volumes(case)
    perturbed = PERTURBATIONS[name][1](volumes, case_rng(seed, name, case["case_id"]))
    record = dict(case)
    files = {"image": to_int16_hu(perturbed.image)}
    if perturbed.lesions is not volumes.lesions:
        files["lesions"] = perturbed.lesions
        if perturbed.liver is not None:
            files["liver"] = perturbed.liver
    for key, array in files.items():
        relative = f"{key}/{case['case_id']}.nii.gz"
        (folder / key).mkdir(parents=True, exist_ok=True)
        write_nifti(folder / relative, array, perturbed.affine)
        record[key] = relative
    return record, perturbed.info


def write_dataset(cases: list[dict], name: str, folder: Path, split: str, seed: int) -> dict:
    """A dataset folder holding ``cases`` perturbed with ``name`` and its ``datalist.json`` (``split`` only).

    Returns the info of each case (what a perturbation measured or changed), by case id.
    """
    folder.mkdir(parents=True, exist_ok=True)
    records, infos = [], {}
    for case in cases:
        record, infos[case["case_id"]] = perturb_case(case, name, folder, seed)
        records.append(record)
    (folder / "datalist.json").write_text(json.dumps({split: records}, indent=1) + "\n")
    return infos


# ---------------------------------------------------------------- evaluation


@contextmanager
def recording_liver_volumes():
    """Record the predicted liver volume (ml) per case while ``lesion_detection.evaluate_split`` runs.

    ``evaluate_split`` brings the text-free outputs back to the input grid with ``text_free_on_input_grid`` and
    scores the liver there (liver probability >= 0.5) but returns its Dice only; this wraps that function for the
    duration and yields ``{case_id: ml}``.
    """
    volumes: dict[str, float] = {}
    original = lesion_detection.text_free_on_input_grid

    def recording(outputs: dict, item: dict, preprocessing, threshold: float = 0.5) -> dict:
        back = original(outputs, item, preprocessing, threshold)
        if "liver" in back:
            voxel_ml = abs(np.linalg.det(np.asarray(item["lesions"].affine)[:3, :3])) / 1000.0
            volumes[str(item["case_id"])] = float((back["liver"] >= 0.5).sum() * voxel_ml)
        return back

    lesion_detection.text_free_on_input_grid = recording
    try:
        yield volumes
    finally:
        lesion_detection.text_free_on_input_grid = original


def evaluate(
    config_file: str,
    dataset_dir: Path,
    split: str,
    checkpoint: str | None,
    max_cases: int | None,
    overrides: dict | None = None,
) -> dict:
    """Referring and liver results of the dataset in ``dataset_dir`` with the evaluation config and ``overrides``
    (config ids, as ``--set``); adds ``liver_volume_ml`` per case."""
    settings = {"bundle_root": str(ROOT / "bundle"), **(overrides or {}), "dataset_dir": str(dataset_dir)}
    config = lesion_detection.build(config_file, settings)
    checkpoint = checkpoint or config.get_parsed_content("checkpoint")
    with recording_liver_volumes() as volumes:
        results = lesion_detection.evaluate_split(config, checkpoint, split, True, max_cases)
    results["liver_volume_ml"] = dict(volumes)
    return results


def volume_changes(reference: dict[str, float], perturbed: dict[str, float]) -> dict:
    """Relative change (%) of the predicted liver volume per case, with its mean and max absolute value."""
    per_case = {
        case: 100.0 * (perturbed[case] - volume) / volume
        for case, volume in reference.items()
        if case in perturbed and volume > 0
    }
    values = np.abs(list(per_case.values())) if per_case else np.array([np.nan])
    return {
        "mean_abs_pct": float(values.mean()),
        "max_abs_pct": float(values.max()),
        "mean_signed_pct": float(np.mean(list(per_case.values()))) if per_case else float("nan"),
        "per_case_pct": {case: round(value, 3) for case, value in per_case.items()},
    }


def compare(reference: dict, results: dict) -> dict:
    """One perturbation's summary against the unperturbed ``reference`` (same cases, same expressions)."""
    ref_rows, rows = reference["expressions"], results["expressions"]
    if [(r["case_id"], r["text"]) for r in ref_rows] != [(r["case_id"], r["text"]) for r in rows]:
        raise RuntimeError("the perturbed evaluation scored other expressions than the unperturbed one")
    ref_dice = np.array([r["dice_3d"] for r in ref_rows], dtype=float)
    dice = np.array([r["dice_3d"] for r in rows], dtype=float)
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        chosen = np.array([r["kind"] == kind for r in rows])
        by_kind[kind] = {
            "expressions": int(chosen.sum()),
            "dice_3d": float(dice[chosen].mean()),
            "drop": float(ref_dice[chosen].mean() - dice[chosen].mean()),
        }
    return {
        "expressions": len(rows),
        "dice_3d": float(dice.mean()),
        "drop": float(ref_dice.mean() - dice.mean()),
        "expressions_worse_by_0.1": int((ref_dice - dice > 0.1).sum()),
        "expressions_better_by_0.1": int((dice - ref_dice > 0.1).sum()),
        "by_kind": by_kind,
        "liver_dice": results["detection"]["liver_dice"],
        "liver_volume_change": volume_changes(reference["liver_volume_ml"], results["liver_volume_ml"]),
        "seconds_evaluation": results["seconds"],
    }


# ---------------------------------------------------------------- report


def signed(value: float, digits: int) -> str:
    """``value`` with its sign and ``digits`` decimals, never ``-0.000``."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def table(summary: dict) -> str:
    """The markdown tables of a run (see the module docstring)."""
    lines = [
        "| perturbation | 3D Dice | drop | density Dice | density drop | liver vol. mean abs. change % | "
        "max abs. change % | liver Dice | eval s | perturb s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["perturbations"].items():
        density = row["by_kind"].get("density", {"dice_3d": float("nan"), "drop": float("nan")})
        volume = row["liver_volume_change"]
        lines.append(
            f"| {name} | {row['dice_3d']:.4f} | {signed(row['drop'], 4)} | {density['dice_3d']:.4f} | "
            f"{signed(density['drop'], 4)} | {volume['mean_abs_pct']:.2f} | {volume['max_abs_pct']:.2f} | "
            f"{row['liver_dice']:.4f} | {row['seconds_evaluation']:.0f} | {row.get('seconds_perturbing', 0.0):.0f} |"
        )
    kinds = sorted({kind for row in summary["perturbations"].values() for kind in row["by_kind"]})
    lines += ["", "| perturbation | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, row in summary["perturbations"].items():
        cells = [
            f"{row['by_kind'][k]['dice_3d']:.3f} ({signed(row['by_kind'][k]['drop'], 3)})"
            if k in row["by_kind"]
            else "-"
            for k in kinds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    restored = {
        name: row["lesions_restored"] for name, row in summary["perturbations"].items() if row.get("lesions_restored")
    }
    lines += [
        "",
        "drop: unperturbed minus perturbed mean 3D Dice per expression (positive: worse); the per-kind table shows "
        "3D Dice (drop).",
        f"lesions lost by nearest-neighbour slice resampling and put back: {restored or 'none'}",
        f"{summary['cases']} cases of split '{summary['split']}', {summary['expressions']} expressions; "
        f"{len(summary['perturbations']) - 1} perturbations; total wall time {summary['seconds_total']:.0f} s "
        f"({summary['seconds_total'] / 60:.1f} min)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """The benchmark: the unperturbed evaluation, then each perturbation's dataset and evaluation."""
    start = time.perf_counter()
    datalist = Path(ensure_default_dataset(ROOT / "cache"))
    cases = load_datalist(datalist, args.split)[: args.max_cases]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="robustness-"))
    overrides = dict(args.overrides)
    reference = evaluate(args.config_file, datalist.parent, args.split, args.checkpoint, args.max_cases, overrides)
    print(f"unperturbed: 3D Dice {reference['referring']['overall']['dice_3d']:.4f}, {reference['seconds']:.0f} s")
    perturbations = {"none": {**compare(reference, reference), "description": "unperturbed", "seconds_perturbing": 0}}
    for name in args.perturbations:
        folder = work / name
        began = time.perf_counter()
        infos = write_dataset(cases, name, folder, args.split, args.seed)
        perturbing = time.perf_counter() - began
        row = compare(reference, evaluate(args.config_file, folder, args.split, args.checkpoint, None, overrides))
        row.update(description=PERTURBATIONS[name][0], seconds_perturbing=perturbing, cases_info=infos)
        restored = {case: info["lesions_restored"] for case, info in infos.items() if info.get("lesions_restored")}
        if name.startswith("slices_"):
            row["lesions_restored"] = restored
        perturbations[name] = row
        print(
            f"{name}: 3D Dice {row['dice_3d']:.4f} (drop {row['drop']:+.4f}), liver volume change mean "
            f"{row['liver_volume_change']['mean_abs_pct']:.2f} %, evaluation {row['seconds_evaluation']:.0f} s, "
            f"perturbing {perturbing:.0f} s",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "split": args.split,
        "cases": len(cases),
        "case_ids": [case["case_id"] for case in cases],
        "expressions": len(reference["expressions"]),
        "seed": args.seed,
        "checkpoint": reference["checkpoint"],
        "reference_liver_volume_ml": reference["liver_volume_ml"],
        "perturbations": perturbations,
        "seconds_total": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", default=lesion_detection.EVALUATION_CONFIG)
    parser.add_argument("--split", default="test", choices=("training", "validation", "test"))
    parser.add_argument("--perturbations", nargs="+", default=DEFAULT_PERTURBATIONS, choices=list(PERTURBATIONS))
    parser.add_argument("--max_cases", type=int, default=None, help="the first N cases of the split only")
    parser.add_argument("--checkpoint", default=None, help="weights (default: the config's, the shipped model.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random perturbations (noise)")
    parser.add_argument("--work_dir", default=None, help="folder of the perturbed datasets (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the perturbed datasets")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_set_option(parser, "a config setting for every evaluation, e.g. harmonisation#enabled=false")
    args = parser.parse_args(argv)
    summary = run(args)
    print(table(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
