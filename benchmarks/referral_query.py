"""The referral that reads the sentence, alone: answered on ground-truth lesions as the candidates.

Usage, from the repository root::

    python -m benchmarks.referral_query [--split validation test] [--kind measured label]
    python -m benchmarks.referral_query --other_organs_out cache/other_organs_test

Every expression of a split is read (:func:`custom.referral.query.read_query`) and answered exactly on the case's
ground-truth lesions (the datalist's ``lesion_attributes`` and ``liver_frame``, described as a detected candidate
is) by :func:`custom.referral.answer.answer_query`, with no learned scorer or evidence (all are real lesions, no
support). Printed per split, for the datalist's own wordings and for the same meanings said by the second grammar
(:mod:`custom.data.paraphrases`): the share of expressions answered with exactly the referred set, the 3D Dice per
expression that answer gives with perfect masks (volumes; an empty answer to a negative scores 1), by kind and by
selector, and the share of negatives answered empty. ``--kind measured`` tells a cyst from a metastasis by its
mean HU (:func:`custom.referral.answer.measured_kind`), as for a detected candidate; ``--kind label`` uses the
datalist's lesion type. A sentence that is not fully read (``unread`` words or no lesion word) would go to the
learned scorer in the bundle; here it is counted and answered "not present".

``--other_organs_out DIR`` writes ``DIR/datalist.json``: the test split's cases, each with expressions about
another organ (:data:`OTHER_ORGAN_SENTENCES`, wordings neither grammar makes), every one of which must be answered
"not present"; evaluate it with ``python -m monai.bundle run evaluating --config_file
"['bundle/configs/inference.json','bundle/configs/evaluate.json']" --dataset_dir DIR`` (the negatives' share
answered empty is the figure), and the share read as another organ is printed here.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from custom.data.datalist import load_datalist
from custom.data.default_dataset import ensure_default_dataset
from custom.data.paraphrases import paraphrase_cases
from custom.detection.candidates import with_liver_fractions
from custom.referral.answer import answer_query
from custom.referral.query import read_query

__all__ = ["OTHER_ORGAN_SENTENCES", "answer_on_truth", "score_split", "other_organ_datalist"]

#: Sentences about organs other than the liver, in wordings neither expression grammar makes.
OTHER_ORGAN_SENTENCES = (
    "the largest splenic cyst",
    "is there a 2 cm lesion in the left kidney?",
    "segment the hypodense lesion in the pancreatic head",
    "the rightmost renal cyst",
    "the lytic lesion in the L3 vertebral body",
    "highlight the adrenal adenoma",
    "the hyperdense focus in the spleen",
    "metastases to both lungs",
    "the biggest pulmonary nodule in the right lower lobe",
    "the renal mass on the right",
    "the cystic lesion of the pancreatic tail",
    "the polyp in the gallbladder",
    "a splenic infarct",
    "the uppermost lung nodule",
    "the lesion in the upper pole of the right kidney",
    "the enhancing mass of the left kidney",
    "the enlarged retroperitoneal node",
    "the pelvic lymph node",
    "the left ovarian cyst",
    "the tumour in the sigmoid colon",
    "the rectal mass",
    "the lesion along the bladder wall",
    "the nodule in the left lobe of the thyroid",
    "the mass in the left breast",
    "the sclerotic metastasis in the sacrum",
    "the prostatic nodule on the right",
    "the brain metastasis in the left temporal lobe",
    "the vertebral hemangioma",
    "the splenic hemangioma",
    "the largest lung metastasis",
    "all renal cysts",
    "both adrenal nodules",
    "the two cysts in the right kidney",
    "the cyst in the pancreas",
    "the mass in the head of the pancreas",
    "the small bowel lesion",
    "the mass in the stomach wall",
    "the esophageal mass",
    "the omental deposit",
    "the peritoneal implant",
    "the subcutaneous nodule in the back",
    "the lesion in the left psoas muscle",
    "the nodule at the left lung base",
    "the 15 mm splenic lesion",
    "the smallest kidney lesion",
    "show me the bone lesion in the iliac wing",
    "any lesion in the spleen?",
    "find the hypoattenuating lesion of the spleen",
    "the darkest renal lesion",
    "the most posterior pulmonary nodule",
    "the heart mass",
    "the nodule in the right adrenal gland",
    "the cyst of the left kidney lower pole",
    "the splenic lesion near the liver dome",
)


def answer_on_truth(case: dict, text: str, kind: str = "measured") -> tuple[list[int], bool]:
    """(the lesion ids answered to ``text`` on the case's ground-truth lesions, whether the sentence was fully read
    and about the liver); ``kind='measured'`` hides the lesion type labels so that the HU tells the type."""
    read = read_query(text)
    lesions = [with_liver_fractions(lesion, case.get("liver_frame")) for lesion in case["lesion_attributes"]]
    if kind == "measured":
        lesions = [{**lesion, "kind": None} for lesion in lesions]
    if read.organ != "liver" or not read.lesion_word or read.unread:
        return [], read.organ == "liver" and read.lesion_word and not read.unread
    answer = answer_query(read, lesions, case.get("liver_frame"))
    return sorted(int(lesions[i]["id"]) for i in answer.chosen), True


def _dice(case: dict, chosen: list[int], targets: list[int]) -> float:
    """3D Dice with perfect masks: the lesions' volumes; two empty sets score 1."""
    volume = {int(lesion["id"]): float(lesion["volume_ml"]) for lesion in case["lesion_attributes"]}
    chosen, targets = set(chosen), set(targets)
    if not chosen and not targets:
        return 1.0
    overlap = sum(volume[i] for i in chosen & targets)
    return 2.0 * overlap / max(sum(volume[i] for i in chosen) + sum(volume[i] for i in targets), 1e-9)


def score_split(cases: list[dict], kind: str = "measured") -> dict:
    """Exact-set share, perfect-mask 3D Dice overall / by kind / by selector, negatives answered empty, sentences
    not fully read, and the misses (text, targets, answer) of one split's cases."""
    dice, exact, unread, misses = [], [], 0, []
    by_kind, by_selector = defaultdict(list), defaultdict(list)
    negatives = []
    for case in cases:
        for expression in case["expressions"]:
            targets = sorted(int(t) for t in expression["targets"])
            chosen, read_fully = answer_on_truth(case, expression["text"], kind)
            unread += not read_fully
            value = _dice(case, chosen, targets)
            dice.append(value)
            exact.append(chosen == targets)
            by_kind[expression["kind"]].append(value)
            by_selector[(expression.get("query") or {}).get("select", "")].append(value)
            if not targets:
                negatives.append(not chosen)
            if chosen != targets:
                misses.append((case["case_id"], expression["text"], targets, chosen))
    summary = lambda values: (float(np.mean(values)), len(values))  # noqa: E731
    return {
        "expressions": len(dice),
        "exact": float(np.mean(exact)),
        "dice_3d": float(np.mean(dice)),
        "by_kind": {k: summary(v) for k, v in sorted(by_kind.items())},
        "by_selector": {k: summary(v) for k, v in sorted(by_selector.items())},
        "negatives_empty": summary(negatives),
        "not_fully_read": unread,
        "misses": misses,
    }


def _print(name: str, result: dict, show_misses: int) -> None:
    kinds = ", ".join(f"{k} {d:.3f} ({n})" for k, (d, n) in result["by_kind"].items())
    selectors = ", ".join(f"{k} {d:.3f} ({n})" for k, (d, n) in result["by_selector"].items())
    share, count = result["negatives_empty"]
    print(
        f"{name}: {result['expressions']} expressions, exact referred set {result['exact']:.3f}, 3D Dice with perfect "
        f"masks {result['dice_3d']:.3f}; negatives empty {share:.3f} ({count}); not fully read "
        f"{result['not_fully_read']}\n  by kind: {kinds}\n  by selector: {selectors}"
    )
    for case_id, text, targets, chosen in result["misses"][:show_misses]:
        print(f"  miss {case_id}: {text!r} targets {targets} answered {chosen}")


def other_organ_datalist(cases: list[dict], out: Path) -> Path:
    """Write ``out/datalist.json``: ``cases`` (absolute paths) with :data:`OTHER_ORGAN_SENTENCES` dealt out over
    them in turn as "not present" expressions (kind ``negative``); returns its path."""
    keep = ("image", "lesions", "liver", "lesion_attributes", "liver_frame", "case_id")
    test = [{**{k: case[k] for k in keep if k in case}, "expressions": []} for case in cases]
    for index, text in enumerate(OTHER_ORGAN_SENTENCES):
        case = test[index % len(test)]
        number = len(case["expressions"])
        case["expressions"].append(
            {"id": f"{case['case_id']}-organ{number:02d}", "text": text, "targets": [], "kind": "negative"}
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "datalist.json"
    path.write_text(json.dumps({"training": [], "validation": [], "test": test}, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--split", nargs="+", default=["validation", "test"])
    parser.add_argument("--kind", nargs="+", default=["measured", "label"], choices=("measured", "label"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the paraphrases")
    parser.add_argument("--misses", type=int, default=5, help="misses printed per result")
    parser.add_argument("--other_organs_out", default=None, help="write the other-organ datalist here and stop")
    args = parser.parse_args(argv)
    datalist = ensure_default_dataset(args.cache_dir)
    if args.other_organs_out:
        path = other_organ_datalist(load_datalist(datalist, "test"), Path(args.other_organs_out))
        other = sum(read_query(text).organ != "liver" for text in OTHER_ORGAN_SENTENCES)
        print(
            f"{len(OTHER_ORGAN_SENTENCES)} other-organ expressions over the test cases written to {path}; read as "
            f"another organ: {other}/{len(OTHER_ORGAN_SENTENCES)} = {other / len(OTHER_ORGAN_SENTENCES):.3f}"
        )
        for text in OTHER_ORGAN_SENTENCES:
            if read_query(text).organ == "liver":
                print(f"  read as the liver: {text!r}")
        return
    for split in args.split:
        cases = load_datalist(datalist, split)
        for wording, items in (("datalist wording", cases), ("paraphrases", paraphrase_cases(cases, args.seed))):
            for kind in args.kind:
                _print(f"{split}, {wording}, kind {kind}", score_split(items, kind), args.misses)


if __name__ == "__main__":
    main()
