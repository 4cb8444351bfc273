"""Real anatomy with inserted lesions: what the bundle finds in a real liver it has never been trained on.

No labelled real liver lesion can be redistributed, so the lesions are synthetic, inserted into the liver of a real
CT (:mod:`custom.data.lesion_insertion`): by default the TotalSegmentator example CT (``data/realct/``, pelvis to
the middle of the liver, 3 mm), which is never used for training. ``--cases`` variants of it, each with its own
lesions (seeded by ``--seed``), are written once into ``cache/`` as a dataset and evaluated with the evaluation
config, as ``benchmarks.lesion_detection`` does (text-free lesions matched with Dice >= 0.1, false-positive
components, liver Dice, and the referring 3D Dice per expression over the expressions generated from the inserted
lesions' measured geometry).

    python -m benchmarks.real_anatomy [--checkpoint runs/<run>/models/model.pt] [--out results.json] \
        [--set harmonisation#liver_phase=true]

It prints the figures of the targets for real anatomy: lesion recall for lesions of at least 1 ml and under 1 ml,
false-positive components per case, liver Dice, 3D Dice per expression.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import lesion_detection
from custom.data.lesion_insertion import write_inserted_dataset
from custom.user_inputs import add_set_option

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "realct"
SOURCES = {"totalseg": (REAL / "totalseg_example_ct.nii.gz", REAL / "totalseg_liver.nii.gz")}


def ensure_dataset(source: str, cases: int, seed: int, cache_dir: Path) -> Path:
    """The inserted-lesion dataset of ``source`` (written on first use); returns its folder."""
    folder = cache_dir / f"real_anatomy_{source}_n{cases}_seed{seed}"
    if not (folder / "datalist.json").is_file():
        image, liver = SOURCES[source]
        write_inserted_dataset(image, liver, folder, cases, seed=seed, split="test")
    return folder


def headline(results: dict) -> dict:
    """The figures of the real-anatomy targets from a ``lesion_detection.evaluate_split`` result."""
    detection = results["detection"]
    overall = detection["by_density_and_size"]["all"]
    referring = results["referring"]["overall"] if results.get("referring") else {}
    return {
        "cases": detection["cases"],
        "lesions": overall["all"]["lesions"],
        "recall_at_least_1ml": overall[">=1ml"]["recall"],
        "lesions_at_least_1ml": overall[">=1ml"]["lesions"],
        "recall_under_1ml": _recall_under_1ml(results["lesions"]),
        "lesions_under_1ml": sum(1 for lesion in results["lesions"] if lesion["volume_ml"] < 1.0),
        "false_positives_per_case": detection["false_positives_per_case"],
        "liver_dice": detection["liver_dice"],
        "dice_3d_per_expression": referring.get("dice_3d"),
        "expressions": referring.get("expressions"),
    }


def _recall_under_1ml(lesions: list[dict]) -> float:
    small = [lesion for lesion in lesions if lesion["volume_ml"] < 1.0]
    return sum(lesion["dice"] >= 0.1 for lesion in small) / len(small) if small else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", default=lesion_detection.EVALUATION_CONFIG)
    parser.add_argument("--checkpoint", default=None, help="weights (default: the config's, the shipped model.pt)")
    parser.add_argument("--source", default="totalseg", choices=sorted(SOURCES))
    parser.add_argument("--cases", type=int, default=8, help="variants of the real CT, each with its own lesions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    add_set_option(parser, "a config setting, e.g. harmonisation#liver_phase=true")
    args = parser.parse_args(argv)
    dataset = ensure_dataset(args.source, args.cases, args.seed, Path(args.cache_dir))
    config = lesion_detection.build(
        args.config_file, {"bundle_root": str(ROOT / "bundle"), **dict(args.overrides), "dataset_dir": str(dataset)}
    )
    checkpoint = args.checkpoint or config.get_parsed_content("checkpoint")
    results = lesion_detection.evaluate_split(config, checkpoint, "test", True)
    summary = headline(results)
    print(lesion_detection.report(results))
    print()
    print(f"real anatomy ({args.source}, {summary['cases']} variants with inserted lesions, never trained on):")
    print(f"  lesion recall, >= 1 ml: {summary['recall_at_least_1ml']:.3f} ({summary['lesions_at_least_1ml']} lesions)")
    print(f"  lesion recall, < 1 ml: {summary['recall_under_1ml']:.3f} ({summary['lesions_under_1ml']} lesions)")
    print(f"  false-positive components per case: {summary['false_positives_per_case']:.2f}")
    print(f"  liver Dice: {summary['liver_dice']:.4f}")
    print(f"  3D Dice per expression: {summary['dice_3d_per_expression']:.4f} ({summary['expressions']} expressions)")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
