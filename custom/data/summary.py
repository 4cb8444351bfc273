"""Summary of a referring datalist: cases, lesions, expressions by kind, share of negatives, slices per split.

Usage::

    python -m custom.data.summary DATALIST
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from .datalist import SPLITS, _resolve, read_datalist
from .expressions import EXPRESSION_KINDS
from .geometry import axial_axis

__all__ = ["summarize", "format_summary"]


def _num_slices(case: dict, base: Path) -> int:
    if "num_slices" in case:
        return int(case["num_slices"])
    image = nib.load(str(_resolve(base, case["image"])))
    return int(image.shape[axial_axis(image.affine)])


def _lesion_count(case: dict, base: Path) -> int:
    if "lesion_attributes" in case:
        return len(case["lesion_attributes"])
    lesions = np.asarray(nib.load(str(_resolve(base, case["lesions"]))).dataobj)
    return int(len(np.unique(lesions)) - (lesions.min() == 0))


def summarize(path: str | Path) -> dict[str, dict]:
    """Per split: cases, lesions, expressions (total and by kind), negative share, axial slices."""
    path = Path(path)
    data = read_datalist(path)
    base = path.parent.absolute()
    result = {}
    for split in SPLITS:
        cases = data.get(split) or []
        kinds = Counter(e["kind"] for case in cases for e in case.get("expressions", []))
        expressions = sum(kinds.values())
        result[split] = {
            "cases": len(cases),
            "lesions": sum(_lesion_count(case, base) for case in cases),
            "expressions": expressions,
            "by_kind": {kind: kinds.get(kind, 0) for kind in EXPRESSION_KINDS},
            "negative_share": kinds.get("negative", 0) / expressions if expressions else 0.0,
            "slices": sum(_num_slices(case, base) for case in cases),
        }
    return result


def format_summary(summary: dict[str, dict]) -> str:
    """A fixed-width table of :func:`summarize`'s result with a total row."""
    columns = ["cases", "lesions", "expressions", *EXPRESSION_KINDS, "neg. share", "slices"]
    rows = []
    totals = Counter()
    for split, s in summary.items():
        rows.append(
            [
                split,
                s["cases"],
                s["lesions"],
                s["expressions"],
                *s["by_kind"].values(),
                f"{100 * s['negative_share']:.1f}%",
                s["slices"],
            ]
        )
        totals.update(
            {
                "cases": s["cases"],
                "lesions": s["lesions"],
                "expressions": s["expressions"],
                "slices": s["slices"],
                **s["by_kind"],
            }
        )
    share = totals["negative"] / totals["expressions"] if totals["expressions"] else 0.0
    rows.append(
        [
            "total",
            totals["cases"],
            totals["lesions"],
            totals["expressions"],
            *(totals[k] for k in EXPRESSION_KINDS),
            f"{100 * share:.1f}%",
            totals["slices"],
        ]
    )
    header = ["split", *columns]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the summary of a referring datalist.")
    parser.add_argument("datalist", help="path of the datalist JSON")
    args = parser.parse_args(argv)
    print(f"{args.datalist}\n{format_summary(summarize(args.datalist))}")


if __name__ == "__main__":
    main()
