"""Import labelled CT as a referring dataset, with an import report.

Usage::

    python -m custom.data.import_labelled --src DIR --out DIR [--layout auto|lits|msd|ircadb|dicom_seg|slicer]
        [--min-volume-ml X] [--seed S] [--test-cases ID [ID ...]] [--copy-images] [--overwrite] [--no-progress]

The layouts are those of :mod:`custom.data.importers` (``auto`` detects the layout and says which). Every case is
converted as a LiTS / MSD case is (:func:`custom.data.convert_lits.write_case`: lesion instances from the tumour
masks' 26-connected components, the liver mask, measured lesion attributes and generated expressions), and the
dataset is written like ``convert_lits`` writes it: atomically, never over an existing folder unless
``--overwrite``, with ``datalist.json`` and ``import_report.json``.

A case that cannot be used is refused with its reason, and the others go on: unreadable files, masks off the CT's
grid, unknown label values, no liver label, an empty liver, a lesion apart from the liver. Lesion voxels outside
the liver mask but next to it (a lesion painted over the liver's edge, or carved out of the liver segment) are
added to the liver, as a LiTS label map counts its tumours as liver, and the report says so.

The report (``import_report.json`` and the printed summary): cases imported, lesions by size (<1 ml, 1-10 ml,
>=10 ml) and density (hypodense, isodense, hyperdense from the lesion attributes; unmeasured without a liver
reference), expressions by kind, notes per case, and each refused case with its problem and reason.

Splits: training, validation and test at random (``--seed``), or, with ``--test-cases``, the cases named form the
held-out test split (patients kept for the comparison after fine-tuning, ``python -m custom.fine_tune``) and the
others are split into training and validation.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from custom.errors import InputError

from .convert_lits import DEFAULT_MIN_VOLUME_ML, ConversionError, lesion_instances, write_case
from .expressions import EXPRESSION_KINDS
from .importers import LAYOUTS, CaseSource, Refusal, attach_lesions_to_liver, detect_layout, find_sources, read_case
from .io import atomic_directory, progress_bar, write_json_atomic
from .synthetic import DEFAULT_SPLIT_FRACTIONS, split_cases

__all__ = ["DatasetImportError", "import_labelled", "format_report", "main"]

SIZE_BINS = (("<1 ml", 0.0, 1.0), ("1-10 ml", 1.0, 10.0), (">=10 ml", 10.0, math.inf))
DENSITIES = ("hypodense", "isodense", "hyperdense", "unmeasured")
#: The fix named when every case was refused for the same kind of problem.
FIXES = {
    "grid": "save every mask on its CT's grid (same voxels and slices) and run again",
    "labels": "remap the labels to 0 background, 1 liver, 2 tumour (or name the segments) and run again",
    "no_liver": "name each case's liver mask or segment 'liver' and run again",
    "empty_liver": "draw the liver in each case and run again",
    "lesion_outside_liver": "correct the lesion and liver masks named above and run again",
    "unpaired": "put each label beside its CT and run again",
    "ambiguous": "keep one CT and one label per case folder and run again",
    "unreadable": "re-export the files named above and run again",
}
MIN_CASES = 3


class DatasetImportError(InputError, ValueError):
    """No dataset written: the source, the output folder, or the cases could not be used. ``report`` holds the
    import report when cases were read."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def _read_and_check(source: CaseSource, min_volume_ml: float):
    """(LabelledCT, lesion instance map (H, W, D), components dropped as too small) of one case; raises
    :class:`ConversionError` (with its ``problem``) for a case to refuse."""
    case = read_case(source)
    voxel_ml = abs(np.linalg.det(np.asarray(case.affine, float)[:3, :3])) / 1000.0
    instances, dropped = lesion_instances(case.lesions or [np.zeros(case.hu.shape, bool)], voxel_ml, min_volume_ml)
    attach_lesions_to_liver(case, instances)
    if dropped:
        case.notes.append(f"{dropped} lesion component(s) smaller than {min_volume_ml} ml dropped")
    return case, instances


def _refusal(source: CaseSource, error: Exception) -> Refusal:
    """The refusal of a case from the error that stopped it (a named error keeps its message and kind)."""
    if isinstance(error, ConversionError):
        problem, reason = error.problem, str(error)
    elif isinstance(error, InputError):
        problem, reason = "unreadable", str(error)
    else:
        problem = "unreadable"
        reason = (
            f"Cannot read {source.label} with {source.image} ({type(error).__name__}: {error}); re-export the "
            "files or leave the case out."
        )
    return Refusal(source.case_id, str(source.image), str(source.label), problem, " ".join(reason.split()))


def _size_bin(volume_ml: float) -> str:
    return next(name for name, low, high in SIZE_BINS if low <= volume_ml < high)


def build_report(src: Path, out: Path, layout: str, detected: str, found: int, cases: list[dict], refusals, options):
    """The import report (a JSON-ready dict) from the imported cases' records and details and the refusals."""
    attributes = [a for case in cases for a in case["record"]["lesion_attributes"]]
    expressions = [e for case in cases for e in case["record"]["expressions"]]
    sizes = Counter(_size_bin(a["volume_ml"]) for a in attributes)
    densities = Counter(a.get("density") or "unmeasured" for a in attributes)
    kinds = Counter(e["kind"] for e in expressions)
    return {
        "source": str(src.absolute()),
        "dataset": str(out),
        "layout": layout,
        "layout_detected_from": detected or None,
        **options,
        "cases_found": found,
        "cases_imported": len(cases),
        "cases_refused": len(refusals),
        "lesions": {
            "total": len(attributes),
            "by_size": {name: sizes.get(name, 0) for name, _, _ in SIZE_BINS},
            "by_density": {name: densities.get(name, 0) for name in DENSITIES},
        },
        "expressions": {"total": len(expressions), "by_kind": {k: kinds.get(k, 0) for k in EXPRESSION_KINDS}},
        "refused_by_problem": dict(sorted(Counter(r.problem for r in refusals).items())),
        "cases": [{k: v for k, v in case.items() if k != "record"} for case in cases],
        "refused": [vars(r) for r in sorted(refusals, key=lambda r: r.case_id)],
    }


def _case_details(source: CaseSource, case, record: dict, split: str) -> dict:
    return {
        "case_id": source.case_id,
        "split": split,
        "image": str(source.image),
        "label": str(source.label),
        "lesions": len(record["lesion_attributes"]),
        "lesion_volumes_ml": [a["volume_ml"] for a in record["lesion_attributes"]],
        "expressions": len(record["expressions"]),
        "notes": list(case.notes),
        "record": record,
    }


def _nothing_imported(src: Path, refusals: list[Refusal]) -> str:
    counts = Counter(r.problem for r in refusals)
    listed = ", ".join(f"{n} {problem}" for problem, n in sorted(counts.items()))
    fix = FIXES.get(next(iter(counts)), "") if len(counts) == 1 else ""
    fix = fix or "fix the problem named for each case above and run again"
    return f"None of the {len(refusals)} case(s) under {src} could be imported ({listed}; reasons above); {fix}."


def import_labelled(
    src: str | Path,
    out: str | Path,
    layout: str = "auto",
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    seed: int = 0,
    copy_images: bool = False,
    split_fractions=DEFAULT_SPLIT_FRACTIONS,
    overwrite: bool = False,
    progress: bool = True,
    test_cases: list[str] | None = None,
) -> tuple[Path, dict]:
    """Import the labelled CT under ``src`` as a dataset in ``out``; returns (``out/datalist.json``, the report).

    ``test_cases``: case ids that form the test split (held out); the others are split into training and validation.

    Raises :class:`DatasetImportError` (with the report) when no case, or fewer than 3, could be imported; nothing
    is written then.
    """
    src, final_dir = Path(src), Path(out).absolute()
    if not src.is_dir():
        raise DatasetImportError(f"Source folder {src} does not exist; pass the folder of the labelled CT with --src.")
    if final_dir.exists() and any(final_dir.iterdir()) and not overwrite:
        raise DatasetImportError(
            f"Output folder {final_dir} already exists and is not empty; choose another folder, or pass --overwrite "
            "(overwrite=True in Python) to replace it."
        )
    detected = ""
    if layout == "auto":
        layout, detected = detect_layout(src)
    sources, refusals = find_sources(src, layout)
    found_ids = [source.case_id for source in sources] + [refusal.case_id for refusal in refusals]
    if test_cases and (unknown := sorted(set(test_cases) - set(found_ids))):
        raise DatasetImportError(
            f"--test-cases names {', '.join(unknown)}, which is not a case under {src}. Pass ids of its cases: "
            f"{', '.join(found_ids)}."
        )
    options = {"min_volume_ml": min_volume_ml, "seed": seed, "copy_images": copy_images}
    options["test_cases"] = sorted(test_cases or [])
    found = len(sources) + len(refusals)
    with atomic_directory(final_dir, overwrite=overwrite) as tmp:
        done = []
        for index, source in enumerate(progress_bar(sources, desc="Importing cases", unit="case", enabled=progress)):
            try:
                case, instances = _read_and_check(source, min_volume_ml)
            except Exception as error:  # a user's file can fail in many ways: the case is refused, the rest go on
                refusals.append(_refusal(source, error))
                continue
            rng = np.random.default_rng([seed, index])
            record = write_case(source.case_id, case, instances, Path(tmp), final_dir, rng, copy_images)
            done.append(_case_details(source, case, record, ""))
        report = build_report(src, final_dir, layout, detected, found, done, refusals, options)
        if not done:
            raise DatasetImportError(
                _nothing_imported(src, refusals) if refusals else f"No case found under {src} ({layout} layout).",
                report,
            )
        if len(done) < MIN_CASES:
            raise DatasetImportError(
                f"Only {len(done)} case(s) could be imported from {src}; a dataset needs at least {MIN_CASES} (one "
                "each for training, validation and test). Add cases, or fix the refused ones, and run again.",
                report,
            )
        splits = held_out_splits([case["case_id"] for case in done], test_cases, seed, split_fractions, report)
        split_of = {case_id: name for name, ids in splits.items() for case_id in ids}
        for case, entry in zip(done, report["cases"]):
            entry["split"] = case["split"] = split_of[case["case_id"]]
        records = {case["case_id"]: case["record"] for case in done}
        datalist = {
            "name": f"Referring liver lesions imported from {src.name}",
            "description": f"Labelled CT ({layout} layout) as lesion instances with generated referring expressions "
            "(custom.data.import_labelled).",
            "modality": "CT",
            "generator": {"module": "custom.data.import_labelled", "source": str(src.absolute()), "layout": layout}
            | {"seed": seed, "min_volume_ml": min_volume_ml, "test_cases": sorted(test_cases or [])},
            "expression_kinds": list(EXPRESSION_KINDS),
            **{name: [records[case_id] for case_id in ids] for name, ids in splits.items()},
        }
        write_json_atomic(Path(tmp) / "datalist.json", datalist)
        write_json_atomic(Path(tmp) / "import_report.json", report)
    return final_dir / "datalist.json", report


def held_out_splits(
    case_ids: list[str], test_cases: list[str] | None, seed: int, fractions, report: dict | None = None
) -> dict[str, list[str]]:
    """Training, validation and test case ids: at random (:func:`custom.data.synthetic.split_cases`), or with the
    ``test_cases`` named as the test split and the others split into training and validation (at least one each)."""
    if not test_cases:
        return split_cases(case_ids, seed, fractions)
    unknown = sorted(set(test_cases) - set(case_ids))
    if unknown:
        raise DatasetImportError(
            f"--test-cases names {', '.join(unknown)}, which is not an imported case (refused, see the report above). "
            f"Fix it, or hold out imported cases: {', '.join(case_ids)}.",
            report,
        )
    rest = [case_id for case_id in case_ids if case_id not in set(test_cases)]
    if len(rest) < 2:
        raise DatasetImportError(
            f"--test-cases leaves {len(rest)} case(s) for training and validation; they need at least 2. Hold out "
            "fewer cases.",
            report,
        )
    share = fractions[1] / (fractions[0] + fractions[1])
    n_val = min(len(rest) - 1, max(1, int(round(share * len(rest)))))
    order = np.random.default_rng([seed, 3]).permutation(len(rest))
    validation = {rest[i] for i in order[:n_val]}
    return {
        "training": [c for c in rest if c not in validation],
        "validation": [c for c in rest if c in validation],
        "test": [c for c in case_ids if c in set(test_cases)],
    }


def _counts(mapping: dict) -> str:
    return ", ".join(f"{key}: {value}" for key, value in mapping.items())


def format_report(report: dict, written: bool = True) -> str:
    """The printed summary of an import report."""
    detected = f", detected from {report['layout_detected_from']}" if report.get("layout_detected_from") else ""
    lesions, expressions = report["lesions"], report["expressions"]
    lines = [
        f"Imported {report['cases_imported']} of {report['cases_found']} case(s) from {report['source']} "
        f"(layout {report['layout']}{detected})" + (f" into {report['dataset']}" if written else ""),
        f"  lesions: {lesions['total']} ({_counts(lesions['by_size'])}; {_counts(lesions['by_density'])})",
        f"  expressions: {expressions['total']} ({_counts(expressions['by_kind'])})",
    ]
    notes = [(case["case_id"], note) for case in report["cases"] for note in case["notes"]]
    if notes:
        lines.append("  notes:")
        lines += [f"    - {case_id}: {note}" for case_id, note in notes]
    if report["refused"]:
        lines.append(f"  refused {len(report['refused'])} case(s):")
        lines += [f"    - {r['case_id']} [{r['problem']}]: {r['reason']}" for r in report["refused"]]
    if written:
        lines.append(f"  report: {Path(report['dataset']) / 'import_report.json'}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from custom.user_inputs import install_error_hook

    parser = argparse.ArgumentParser(description="Import labelled CT (LiTS / MSD, 3D-IRCADb, DICOM-SEG, 3D Slicer).")
    parser.add_argument("--src", required=True, help="folder of the labelled CT")
    parser.add_argument("--out", required=True, help="dataset folder to write (created; must not hold other files)")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS), help="source layout (auto: detect)")
    parser.add_argument(
        "--min-volume-ml", type=float, default=DEFAULT_MIN_VOLUME_ML, help="drop lesion components under this (ml)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and expression sampling")
    parser.add_argument(
        "--test-cases", nargs="+", default=None, metavar="ID", help="case ids held out as the test split"
    )
    parser.add_argument("--copy-images", action="store_true", help="copy NIfTI images into the dataset")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="full tracebacks for input errors")
    args = parser.parse_args(argv)
    install_error_hook(args.debug)
    start = time.perf_counter()
    try:
        _, report = import_labelled(
            args.src,
            args.out,
            args.layout,
            args.min_volume_ml,
            args.seed,
            args.copy_images,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            test_cases=args.test_cases,
        )
    except DatasetImportError as error:
        if error.report is not None:
            print(format_report(error.report, written=False), flush=True)
        raise
    print(format_report(report))
    print(f"Done in {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
