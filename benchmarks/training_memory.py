"""Training memory and time per epoch with full-size CT: 10 cases against 50, the disk cache against the memory cache.

Usage::

    python -m benchmarks.training_memory [--cases 10 50] [--caches disk memory] [--epochs 2]

Full-size cases are made from the default dataset's phantoms: each is resampled to 512 x 512 pixels of about 0.6 mm
and 0.8 mm slices and extended to 450 slices (360 mm, chest to pelvis) by repeating its first and last slices,
written as ``.nii.gz`` (int16 CT, uint8 labels) with its own expressions. They are written once into
``cache/full_size_n<N>`` (about 25 s and 60 MB per case).

For each number of cases and each ``--dataset_cache``, ``monai.bundle run training`` runs ``--epochs`` epochs
(batch 8, no replay cases, one validation case at the end) in a process of its own; printed per run: the peak
resident memory of that process (``ru_maxrss`` from ``wait4``), the time of the first epoch (which fills the disk
cache; the memory cache fills before it) and of the last one (read from the cache), and the ratio of the peak memory
with the most cases to that with the fewest. The crops of the disk cache are removed after each run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.data.datalist import load_datalist, read_datalist
from custom.data.default_dataset import ensure_default_dataset
from custom.data.io import write_json_atomic, write_nifti

ROOT = Path(__file__).resolve().parents[1]
IN_PLANE, SLICES, SLICE_MM = 512, 450, 0.8
EPOCH_LINE = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def full_size_case(case: dict, out: Path) -> dict:
    """``case`` of the phantom dataset as a full-size case in ``out``; returns its datalist entry."""
    image = nib.load(case["image"])
    old_shape = np.asarray(image.shape[:3], float)
    spacing = np.asarray(image.header.get_zooms()[:3], float)
    zoom = (IN_PLANE / old_shape[0], IN_PLANE / old_shape[1], spacing[2] / SLICE_MM)
    new_spacing = spacing / np.asarray(zoom)
    entry = {k: v for k, v in case.items() if k not in ("image", "lesions", "liver")}
    for key, order, dtype in (("image", 1, np.int16), ("lesions", 0, np.uint8), ("liver", 0, np.uint8)):
        array = np.asarray(nib.load(case[key]).dataobj)
        resized = ndimage.zoom(array.astype(np.float32 if order else array.dtype), zoom, order=order)
        below = max(0, (SLICES - resized.shape[2]) // 2)
        above = max(0, SLICES - resized.shape[2] - below)
        padded = np.pad(resized, ((0, 0), (0, 0), (below, above)), mode="edge" if key == "image" else "constant")
        affine = image.affine @ np.diag([*(new_spacing / spacing), 1.0])
        affine[:3, 3] -= affine[:3, 2] * below
        name = f"{key}s/{case['case_id']}.nii.gz" if key != "lesions" else f"lesions/{case['case_id']}.nii.gz"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        write_nifti(out / name, np.rint(padded).astype(dtype), affine)
        entry[key] = name
    return entry


def ensure_full_size(cache_dir: Path, cases: int) -> Path:
    """A dataset of ``cases`` full-size training cases (and one validation case); returns its folder."""
    folder = cache_dir / f"full_size_n{cases}"
    if (folder / "datalist.json").is_file():
        return folder
    source = ensure_default_dataset(cache_dir)
    phantoms = load_datalist(source, "training") + load_datalist(source, "validation")
    if len(phantoms) < cases + 1:
        raise SystemExit(f"error: the default dataset has {len(phantoms)} cases; --cases at most {len(phantoms) - 1}")
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.perf_counter()
    entries = []
    for number, case in enumerate(phantoms[: cases + 1], 1):
        entries.append(full_size_case(case, scratch))
        print(f"full-size case {number} of {cases + 1}, {time.perf_counter() - start:.0f} s", flush=True)
    datalist = {k: v for k, v in read_datalist(source).items() if k not in ("training", "validation", "test")}
    datalist.update({"training": entries[:cases], "validation": entries[cases:], "test": []})
    write_json_atomic(scratch / "datalist.json", datalist)
    scratch.rename(folder)
    return folder


def epoch_seconds(log: str) -> dict[int, float]:
    """Seconds per epoch from the trainer's ``Epoch[k] Complete. Time taken: h:m:s`` lines."""
    return {int(e): int(h) * 3600 + int(m) * 60 + float(s) for e, h, m, s in EPOCH_LINE.findall(log)}


def measure(dataset: Path, dataset_cache: str, epochs: int, run_dir: Path, cache_dir: Path) -> dict:
    """One training run in a process of its own; its peak resident memory and epoch times."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    crops = cache_dir / "training_crops_benchmark"
    shutil.rmtree(crops, ignore_errors=True)  # every run fills its cache from scratch
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(ROOT / "bundle" / "configs" / "train.json"),
        "--dataset_dir", str(dataset), "--dataset_cache", dataset_cache, "--crop_cache_dir", str(crops),
        "--epochs", str(epochs), "--val_interval", str(epochs), "--max_val_expressions", "1",
        "--run_dir", str(run_dir), "--progress", "false",
    ]  # fmt: skip
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    text = run_dir.with_suffix(".log").read_text()
    if process.returncode:
        raise SystemExit(f"error: training failed (exit {process.returncode}); see {run_dir.with_suffix('.log')}")
    shutil.rmtree(crops, ignore_errors=True)
    epochs_taken = epoch_seconds(text)
    if 1 not in epochs_taken or epochs not in epochs_taken:
        raise SystemExit(f"error: no epoch times in {run_dir.with_suffix('.log')}; the training log format changed")
    return {
        "peak_rss_gb": usage.ru_maxrss / 1024**2,
        "first_epoch_s": epochs_taken.get(1),
        "last_epoch_s": epochs_taken.get(epochs),
        "wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--caches", nargs="+", default=["disk", "memory"], choices=("disk", "memory"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
    parser.add_argument("--run_dir", default="runs/training_memory")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir)
    dataset = ensure_full_size(cache_dir, max(args.cases))
    results = []
    for dataset_cache in args.caches:
        for cases in sorted(args.cases):
            subset = dataset.with_name(f"{dataset.name}_first{cases}")
            if not (subset / "datalist.json").is_file():  # the first ``cases`` training cases, the same files
                subset.mkdir(exist_ok=True)
                datalist = read_datalist(dataset / "datalist.json")
                datalist["training"] = [
                    {**c, **{k: str(dataset / c[k]) for k in ("image", "lesions", "liver")}}
                    for c in datalist["training"][:cases]
                ]
                datalist["validation"] = [
                    {**c, **{k: str(dataset / c[k]) for k in ("image", "lesions", "liver")}}
                    for c in datalist["validation"]
                ]
                write_json_atomic(subset / "datalist.json", datalist)
            result = measure(
                subset, dataset_cache, args.epochs, Path(args.run_dir) / f"{dataset_cache}_{cases}", cache_dir
            )
            results.append({"dataset_cache": dataset_cache, "cases": cases, **result})
            print(
                f"{dataset_cache:>6} cache, {cases:>3} full-size cases: peak memory {result['peak_rss_gb']:.2f} GB, "
                f"first epoch {result['first_epoch_s']:.0f} s, epoch {args.epochs} {result['last_epoch_s']:.0f} s",
                flush=True,
            )
    for dataset_cache in args.caches:
        peaks = {r["cases"]: r["peak_rss_gb"] for r in results if r["dataset_cache"] == dataset_cache}
        most, fewest = max(peaks), min(peaks)
        print(
            f"{dataset_cache} cache: peak memory with {most} cases / with {fewest}: {peaks[most] / peaks[fewest]:.2f}"
        )
    if args.out:
        write_json_atomic(Path(args.out), results)


if __name__ == "__main__":
    main()
