"""Embedded synthetic referring dataset: phantoms, lesion attributes, expressions, NIfTI files and the datalist.

Usage::

    python -m custom.data.synthetic --out DIR [--cases N] [--seed S] [--workers W] [--overwrite]

or :func:`generate_dataset` from Python. The output folder holds ``images/``, ``lesions/``, ``liver/``
(NIfTI, gzip) and ``datalist.json`` with relative paths; it is written to a temporary folder first and renamed
into place. The same seed gives the same bytes, whatever the number of worker processes.

Each case is drawn by :mod:`custom.data.phantom`, saved in its storage orientation (most in RAS, some in LPS
or LAS on purpose), measured back from the saved arrays in RAS world coordinates by
:mod:`custom.data.geometry`, and given expressions by :mod:`custom.data.expressions`.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from custom.runtime import ProgressLog

from .expressions import EXPRESSION_KINDS, generate_expressions
from .geometry import axial_axis, measure_lesions
from .io import atomic_directory, progress_bar, reorient, write_json_atomic, write_nifti
from .phantom import PhantomOptions, render_phantom

__all__ = ["DEFAULT_NUM_CASES", "DEFAULT_ORIENTATIONS", "DATASET_VERSION", "generate_case", "generate_dataset"]

logger = logging.getLogger(__name__)

DEFAULT_NUM_CASES = 96
DATASET_VERSION = "1"
#: Storage orientation of a case -> probability.
DEFAULT_ORIENTATIONS = {"RAS": 0.6, "LPS": 0.3, "LAS": 0.1}
DEFAULT_SPLIT_FRACTIONS = (0.75, 0.125, 0.125)
SPLITS = ("training", "validation", "test")

_RNG_PHANTOM, _RNG_ORIENTATION, _RNG_EXPRESSIONS, _RNG_SPLITS = 0, 1, 2, 3


def case_id_of(index: int) -> str:
    return f"case_{index:03d}"


def _phantom_options(options: dict) -> PhantomOptions:
    names = {f.name for f in fields(PhantomOptions)}
    return PhantomOptions(**{k: v for k, v in options.items() if k in names})


def _choose_orientation(seed: int, index: int, orientations: dict[str, float]) -> str:
    codes = sorted(orientations)
    weights = np.array([orientations[c] for c in codes], float)
    rng = np.random.default_rng([seed, index, _RNG_ORIENTATION])
    return codes[int(rng.choice(len(codes), p=weights / weights.sum()))]


def generate_case(
    out_dir: str | Path,
    index: int,
    seed: int = 0,
    orientation: str | None = None,
    orientations: dict[str, float] | None = None,
    num_expressions: tuple[int, int] = (10, 20),
    negative_share: float = 0.17,
    **phantom_options,
) -> dict:
    """Draw, save and describe case ``index`` of the dataset with ``seed``; returns its datalist record.

    ``orientation`` forces the storage orientation (e.g. 'LPS'); by default it is drawn from ``orientations``.
    The voxel data, lesion attributes and expressions do not depend on the storage orientation.
    """
    out_dir = Path(out_dir)
    case_id = case_id_of(index)
    phantom = render_phantom(np.random.default_rng([seed, index, _RNG_PHANTOM]), _phantom_options(phantom_options))
    orientation = orientation or _choose_orientation(seed, index, orientations or DEFAULT_ORIENTATIONS)
    arrays = {}
    for key, dtype in (("image", np.int16), ("lesions", np.uint8), ("liver", np.uint8)):
        arrays[key], affine = reorient(getattr(phantom, key).astype(dtype), phantom.affine, orientation)
    record = {"case_id": case_id}
    for key in ("image", "lesions", "liver"):
        (out_dir / key if key != "image" else out_dir / "images").mkdir(parents=True, exist_ok=True)
        relative = f"{'images' if key == 'image' else key}/{case_id}.nii.gz"
        write_nifti(out_dir / relative, arrays[key], affine)
        record[key] = relative
    attributes, case_info = measure_lesions(arrays["lesions"], affine, arrays["image"], arrays["liver"], phantom.kinds)
    expressions = generate_expressions(
        attributes,
        case_info["liver_frame"],
        np.random.default_rng([seed, index, _RNG_EXPRESSIONS]),
        num_expressions=num_expressions,
        negative_share=negative_share,
    )
    for number, expression in enumerate(expressions):
        expression["id"] = f"{case_id}-{number:02d}"
    record.update(
        orientation=orientation,
        phase=phantom.phase,
        shape=list(arrays["image"].shape),
        spacing_mm=[round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        num_slices=int(arrays["image"].shape[axial_axis(affine)]),
        liver_hu=case_info["liver_hu"],
        liver_frame=case_info["liver_frame"],
        lesion_attributes=attributes,
        expressions=[{k: e[k] for k in ("id", "text", "targets", "kind", "query")} for e in expressions],
    )
    return record


def split_cases(case_ids: list[str], seed: int, fractions=DEFAULT_SPLIT_FRACTIONS) -> dict[str, list[str]]:
    """Case-level training / validation / test split; validation and test get at least one case each."""
    if len(case_ids) < 3:
        raise ValueError(f"A dataset needs at least 3 cases for its three splits, got {len(case_ids)}.")
    order = np.random.default_rng([seed, _RNG_SPLITS]).permutation(len(case_ids))
    n_val = max(1, int(round(fractions[1] * len(case_ids))))
    n_test = max(1, int(round(fractions[2] * len(case_ids))))
    n_train = len(case_ids) - n_val - n_test
    if n_train < 1:
        raise ValueError(f"Split fractions {fractions} leave no training case out of {len(case_ids)}.")
    parts = np.split(order, [n_train, n_train + n_val])
    return {name: [case_ids[i] for i in sorted(part)] for name, part in zip(SPLITS, parts)}


def _generate_one(args):
    out_dir, index, seed, kwargs = args
    return generate_case(out_dir, index, seed, **kwargs)


def _counted(record: dict, bar, lines: ProgressLog) -> dict:
    """``record``, after counting it on the progress bar and in the progress lines."""
    bar.update()
    lines.update()
    return record


def _check_options(options: dict) -> None:
    known = {f.name for f in fields(PhantomOptions)} | {"orientations", "num_expressions", "negative_share"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown} for generate_dataset; known options: {sorted(known)}.")


def generate_dataset(
    out_dir: str | Path,
    num_cases: int = DEFAULT_NUM_CASES,
    seed: int = 0,
    workers: int = 1,
    split_fractions=DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> Path:
    """Generate the synthetic referring dataset into ``out_dir``; returns the path of ``out_dir/datalist.json``.

    Args:
        out_dir: output folder; written atomically (an existing non-empty folder needs ``overwrite=True``).
        num_cases: number of cases (at least 3).
        seed: random seed; the same seed gives the same files byte for byte.
        workers: worker processes (the result does not depend on it).
        split_fractions: case shares of training, validation and test.
        overwrite: replace an existing ``out_dir``.
        progress: show a progress bar (only on a terminal). A log line (``logging`` INFO) every tenth of the
            cases gives the count, the time taken and the time left, also in a log file.
        options: ``orientations`` (axcodes -> probability), ``num_expressions`` (min, max per case),
            ``negative_share``, and the fields of :class:`custom.data.phantom.PhantomOptions`
            (``spacing_xy``, ``slice_thickness``, ``lesion_count_weights``, ``kind_weights``, ...).
    """
    _check_options(options)
    splits = split_cases([case_id_of(i) for i in range(num_cases)], seed, split_fractions)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        jobs = [(tmp, index, seed, options) for index in range(num_cases)]
        bar = progress_bar(total=num_cases, desc="Generating cases", unit="case", enabled=progress)
        lines = ProgressLog(num_cases, "generating cases", "cases", log=logger.info)
        with bar:
            if workers > 1:
                with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                    records = [_counted(record, bar, lines) for record in pool.map(_generate_one, jobs)]
            else:
                records = [_counted(_generate_one(job), bar, lines) for job in jobs]
        by_id = {record["case_id"]: record for record in records}
        datalist = {
            "name": "LSMS synthetic referring liver lesions",
            "description": "Synthetic abdominal CT phantoms with liver lesions and referring expressions "
            "generated from measured geometry (custom.data.synthetic).",
            "modality": "CT",
            "version": DATASET_VERSION,
            "generator": {"module": "custom.data.synthetic", "seed": seed, "num_cases": num_cases},
            "expression_kinds": list(EXPRESSION_KINDS),
            **{name: [by_id[case_id] for case_id in ids] for name, ids in splits.items()},
        }
        write_json_atomic(Path(tmp) / "datalist.json", datalist)
    return Path(out_dir).absolute() / "datalist.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic referring liver lesion dataset.")
    parser.add_argument("--out", required=True, help="output folder (created; must not hold other files)")
    parser.add_argument("--cases", type=int, default=DEFAULT_NUM_CASES, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    path = generate_dataset(
        args.out, args.cases, args.seed, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress
    )
    print(f"Generated {args.cases} cases in {time.perf_counter() - start:.1f} s: {path}")


if __name__ == "__main__":
    main()
