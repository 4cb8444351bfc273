"""Markdown table of evaluation summaries side by side (the performance section of the bundle docs).

Usage: ``python -m benchmarks.results_table NAME=bundle/eval/test_summary.json [NAME=...]``; each summary is the
``<prefix>_summary.json`` written by ``python -m monai.bundle run evaluating``.
"""

from __future__ import annotations

import argparse
import json
import math

from custom.metrics import EXPRESSION_KINDS

OVERALL = [
    ("3D Dice", "dice_3d"),
    ("mIoU", "mIoU"),
    ("oIoU", "oIoU"),
    ("P@0.5", "P@0.5"),
    ("P@0.7", "P@0.7"),
    ("P@0.9", "P@0.9"),
    ("negatives empty", "negatives_empty_rate"),
    ("positives hit", "positive_hit_rate"),
    ("lesion hit rate", "lesion_hit_rate"),
    ("lesion F1", "instance_f1"),
    ("FP / case", "false_positives_per_case"),
    ("FP / expression", "false_positives_per_expression"),
]

#: Selectors get a row when at least this many expressions of the first summary carry them.
MIN_SELECTOR_EXPRESSIONS = 4


def _cell(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table(summaries: dict[str, dict]) -> str:
    """Rows: metrics (overall, then 3D Dice per expression kind and per selector held by at least
    ``MIN_SELECTOR_EXPRESSIONS`` expressions, with their count); columns: the named summaries."""
    names = list(summaries)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key in OVERALL:
        lines.append(f"| {label} | " + " | ".join(_cell(summaries[n]["overall"].get(key)) for n in names) + " |")
    for kind in EXPRESSION_KINDS:
        cells = [_cell(summaries[n]["by_kind"].get(kind, {}).get("dice_3d")) for n in names]
        lines.append(f"| 3D Dice, {kind} | " + " | ".join(cells) + " |")
    selectors = summaries[names[0]].get("by_selector", {})
    for selector, first in selectors.items():
        if first["expressions"] >= MIN_SELECTOR_EXPRESSIONS:
            cells = [_cell(summaries[n].get("by_selector", {}).get(selector, {}).get("dice_3d")) for n in names]
            lines.append(f"| 3D Dice, selector {selector} ({first['expressions']}) | " + " | ".join(cells) + " |")
    counts = [str(summaries[n]["overall"]["expressions"]) for n in names]
    lines.append("| expressions | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", help="NAME=path/to/summary.json")
    args = parser.parse_args()
    summaries = {}
    for entry in args.summaries:
        name, _, path = entry.partition("=")
        with open(path) as handle:
            summaries[name] = json.load(handle)
    print(table(summaries))


if __name__ == "__main__":
    main()
