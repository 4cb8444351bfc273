"""Calibrate the "not present" rule on a validation evaluation and report it on a test evaluation.

Reads the per-expression CSV of ``monai.bundle run evaluating`` (columns ``targets``, ``max_probability``,
``volume_ml``), chooses the operating point on the validation rows with :func:`custom.clinical.not_present.calibrate`,
writes it into the ``not_present_rule`` of the given bundle configs and prints sensitivity and specificity on
the test rows::

    python -m monai.bundle run evaluating --config_file bundle/configs/evaluate.json --split validation
    python -m custom.clinical.calibrate --validation bundle/eval/validation_expressions.csv \\
        --test bundle/eval/test_expressions.csv --write bundle/configs/inference.json bundle/configs/evaluate.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from custom.clinical.not_present import NotPresentRule, calibrate, evaluate_rule
from custom.clinical.writers import atomic_write

__all__ = ["read_features", "write_rule"]


def read_features(csv_path: str | Path) -> tuple[list[dict], list[dict]]:
    """(positives, negatives) feature dicts of an evaluation CSV; negatives are rows with no targets."""
    positives, negatives = [], []
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if "max_probability" not in row:
                raise ValueError(f"{csv_path} has no 'max_probability' column; re-run the evaluation of this bundle.")
            features = {"max_probability": float(row["max_probability"]), "volume_ml": float(row["volume_ml"])}
            (positives if row["targets"].strip() else negatives).append(features)
    return positives, negatives


def write_rule(rule: NotPresentRule, config_path: str | Path) -> None:
    """Set ``not_present_rule`` of a JSON bundle config to ``rule`` (other content unchanged)."""
    path = Path(config_path)
    config = json.loads(path.read_text())
    if "not_present_rule" not in config:
        raise ValueError(f"{path} has no 'not_present_rule' entry to update.")
    config["not_present_rule"] = {k: round(v, 6) for k, v in rule.to_dict().items()}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=4) + "\n"), overwrite=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation", required=True, help="per-expression CSV of the validation evaluation")
    parser.add_argument("--test", help="per-expression CSV of the test evaluation (report only)")
    parser.add_argument("--objective", choices=("youden", "specificity"), default="specificity")
    parser.add_argument("--min_specificity", type=float, default=0.9)
    parser.add_argument("--write", nargs="*", default=[], help="bundle configs whose not_present_rule is updated")
    args = parser.parse_args(argv)
    positives, negatives = read_features(args.validation)
    calibration = calibrate(positives, negatives, objective=args.objective, min_specificity=args.min_specificity)
    print("operating point:", json.dumps(calibration.rule.to_dict()))
    print(
        f"validation: sensitivity {calibration.sensitivity:.3f}, specificity {calibration.specificity:.3f} "
        f"({calibration.n_positives} positive, {calibration.n_negatives} negative expressions)"
    )
    if args.test:
        report = evaluate_rule(calibration.rule, *read_features(args.test))
        print(
            f"test: sensitivity {report['sensitivity']:.3f} ({report['true_positives']}/{report['n_positives']}), "
            f"specificity {report['specificity']:.3f} ({report['true_negatives']}/{report['n_negatives']})"
        )
    for config in args.write:
        write_rule(calibration.rule, config)
        print(f"written to {config}")


if __name__ == "__main__":
    main()
