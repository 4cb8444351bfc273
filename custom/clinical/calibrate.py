"""Calibrate the "not present" rule on a validation evaluation and report it on a test evaluation.

Reads the per-expression CSV of ``monai.bundle run evaluating`` (columns ``targets``, ``max_probability``,
``volume_ml``), chooses the operating point on the validation rows with :func:`custom.clinical.not_present.calibrate`,
writes it into the ``not_present_rule`` of the given bundle configs and prints sensitivity and specificity on
the test rows::

    python -m monai.bundle run evaluating --split validation \\
        --config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json']"
    python -m custom.clinical.calibrate --validation bundle/eval/validation_expressions.csv \\
        --test bundle/eval/test_expressions.csv --write bundle/configs/inference.json bundle/configs/train.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from custom.clinical.not_present import NotPresentRule, calibrate, evaluate_rule
from custom.clinical.writers import atomic_write
from custom.referral.confidence import (
    ABSENT_FEATURES,
    FOUND_FEATURES,
    ConfidenceCalibration,
    answer_is_right,
    expected_calibration_error,
    fit_calibration,
)

__all__ = [
    "confidence_report",
    "read_answers",
    "read_features",
    "write_confidence_calibration",
    "write_reliability_diagram",
    "write_rule",
]


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


def read_answers(csv_path: str | Path) -> list[dict]:
    """Per-expression answers of an evaluation CSV: ``found``, ``referred``, ``dice``, the decision features and the
    ``confidence`` the evaluated configuration gave."""
    answers = []
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            if "evidence_mean" not in row:
                raise ValueError(f"{csv_path} has no 'evidence_mean' column; re-run the evaluation of this bundle.")
            names = {*FOUND_FEATURES, *ABSENT_FEATURES, "evidence_mean", "confidence"}
            answer = {name: float(row[name]) for name in names}
            answer.update(found=row["predicted_empty"] == "0", referred=bool(row["targets"].strip()),
                          dice=float(row["dice_3d"]))  # fmt: skip
            answers.append(answer)
    return answers


def confidence_report(calibration: ConfidenceCalibration, answers: list[dict]) -> dict:
    """Expected calibration error (10 bins) of ``calibration`` on ``answers``, and the found answers with confidence
    >= 0.5 whose chosen lesions have a mean text-conditioned probability below 0.1 (there should be none)."""
    confidence = [calibration(a["found"], a) for a in answers]
    right = [answer_is_right(a["found"], a["referred"], a["dice"]) for a in answers]
    report = expected_calibration_error(confidence, right)
    report["accuracy"] = float(sum(right) / max(len(right), 1))
    report["confident_without_evidence"] = sum(
        a["found"] and c >= 0.5 and a["evidence_mean"] < 0.1 for a, c in zip(answers, confidence)
    )
    return report


def write_reliability_diagram(reports: dict[str, dict], out_path: str | Path) -> Path:
    """A reliability diagram (accuracy against mean confidence per bin, the diagonal for reference) as PNG."""
    from PIL import Image, ImageDraw

    size, margin = 560, 60
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def point(confidence: float, accuracy: float) -> tuple[float, float]:
        return margin + confidence * (size - 2 * margin), size - margin - accuracy * (size - 2 * margin)

    draw.rectangle([point(0, 1), point(1, 0)], outline="black")
    draw.line([point(0, 0), point(1, 1)], fill=(160, 160, 160), width=1)
    for tick in (0.0, 0.5, 1.0):
        draw.text((point(tick, 0)[0] - 8, size - margin + 8), f"{tick:.1f}", fill="black")
        draw.text((margin - 32, point(0, tick)[1] - 6), f"{tick:.1f}", fill="black")
    draw.text((size / 2 - 60, size - 24), "mean confidence (bin)", fill="black")
    draw.text((8, 12), "share of answers right", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for n, (name, report) in enumerate(reports.items()):
        colour = colours[n % len(colours)]
        points = [point(b["confidence"], b["accuracy"]) for b in report["bins"]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for (x, y), b in zip(points, report["bins"]):
            radius = 2 + min(8, b["count"] ** 0.5)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=2)
        label = f"{name}: ECE {report['ece']:.3f}, {report['answers']} answers"
        draw.text((margin + 10, margin + 10 + 16 * n), label, fill=colour)
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: image.save(tmp, format="PNG"), overwrite=True)
    return out_path


def write_confidence_calibration(calibration: ConfidenceCalibration, config_path: str | Path) -> None:
    """Set ``referral#confidence_calibration`` of a JSON bundle config (other content unchanged)."""
    path = Path(config_path)
    config = json.loads(path.read_text())
    if "referral" not in config:
        raise ValueError(f"{path} has no 'referral' entry to update.")
    config["referral"]["confidence_calibration"] = calibration.to_dict()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=4) + "\n"), overwrite=True)


def calibrate_confidence(args) -> None:
    """``--confidence``: fit the answer confidence on the validation CSV, report it on both, write it."""
    validation = [answer for path in args.validation for answer in read_answers(path)]
    calibration = fit_calibration(validation, min_evidence=args.min_evidence)
    print("confidence calibration:", json.dumps(calibration.to_dict()))
    reports = {"validation": confidence_report(calibration, validation)}
    if args.test:
        reports["test"] = confidence_report(calibration, read_answers(args.test))
    for name, report in reports.items():
        print(
            f"{name}: expected calibration error {report['ece']:.4f} over {report['answers']} answers (10 bins), "
            f"answers right {report['accuracy']:.3f}, found with confidence >= 0.5 and evidence < 0.1: "
            f"{report['confident_without_evidence']}"
        )
        for row in report["bins"]:
            low, high = row["bin"]
            print(
                f"  {low:.1f}-{high:.1f}: confidence {row['confidence']:.3f}, right {row['accuracy']:.3f} "
                f"({row['count']})"
            )
    if args.diagram:
        print(f"reliability diagram: {write_reliability_diagram(reports, args.diagram)}")
    for config in args.write:
        write_confidence_calibration(calibration, config)
        print(f"written to {config}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--validation",
        required=True,
        nargs="+",
        help="per-expression CSV(s) of validation evaluations (several: their rows together; never the test split)",
    )
    parser.add_argument("--test", help="per-expression CSV of the test evaluation (report only)")
    parser.add_argument("--objective", choices=("youden", "specificity"), default="specificity")
    parser.add_argument("--min_specificity", type=float, default=0.9)
    parser.add_argument("--confidence", action="store_true", help="calibrate the answer confidence instead of the rule")
    parser.add_argument("--min_evidence", type=float, default=0.1, help="(--confidence) evidence below: at most 0.49")
    parser.add_argument("--diagram", help="(--confidence) write the reliability diagram (PNG) here")
    parser.add_argument("--write", nargs="*", default=[], help="bundle configs to update")
    args = parser.parse_args(argv)
    entry = "referral" if args.confidence else "not_present_rule"
    for config in args.write:  # every config checked before anything is computed or written
        if not Path(config).is_file() or entry not in json.loads(Path(config).read_text()):
            parser.error(
                f"--write {config} has no '{entry}' entry to update; pass the config that defines it "
                "(bundle/configs/inference.json: evaluate.json takes it from there)"
            )
    if args.confidence:
        calibrate_confidence(args)
        return
    rows = [read_features(path) for path in args.validation]
    positives = [row for pos, _ in rows for row in pos]
    negatives = [row for _, neg in rows for row in neg]
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
