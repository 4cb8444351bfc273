"""Referring expressions in wordings the training grammar never uses, for testing how far the referral generalises.

Every expression of a datalist split keeps its meaning (its ``query`` and therefore its ``targets``) and is said
again by a second grammar whose templates, nouns, place phrases and commands are all absent from
:mod:`custom.data.expressions`: other word order ("of the cysts in the right lobe, the biggest one"), synonyms
("solitary", "cephalad", "hemiliver"), clinical shorthand ("S8", "seg VII", "30 mm", "mets", "hypoenhancing"),
questions ("is there ...?"). Usage::

    python -m custom.data.paraphrases [--split test] [--out cache/paraphrased_test]

writes a dataset folder whose ``datalist.json`` holds that split's cases (absolute image paths) with the
paraphrased expressions, and prints a sample; evaluate it with ``python -m monai.bundle run evaluating
--config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json']" --dataset_dir cache/paraphrased_test``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .datalist import load_datalist
from .default_dataset import ensure_default_dataset
from .expressions import NUMBER_WORDS, Query, _choose, _noun, _place

__all__ = ["paraphrase", "paraphrase_cases"]

NOUNS = {
    None: (
        ("focal abnormality", "focal abnormalities"),
        ("liver nodule", "liver nodules"),
        ("hepatic focus", "hepatic foci"),
    ),
    ("kind", "cyst"): (
        ("cystic focus", "cystic foci"),
        ("fluid-filled lesion", "fluid-filled lesions"),
        ("liver cyst", "liver cysts"),
    ),
    ("kind", "metastasis"): (
        ("met", "mets"),
        ("metastatic deposit", "metastatic deposits"),
        ("secondary", "secondaries"),
    ),
    ("kind", "tumour"): (("tumor", "tumors"), ("hepatic mass", "hepatic masses"), ("neoplasm", "neoplasms")),
    ("density", "hypodense"): (
        ("hypoenhancing lesion", "hypoenhancing lesions"),
        ("lesion of low attenuation", "lesions of low attenuation"),
        ("dark lesion", "dark lesions"),
    ),
    ("density", "hyperdense"): (
        ("hyperenhancing lesion", "hyperenhancing lesions"),
        ("lesion of high attenuation", "lesions of high attenuation"),
        ("dense lesion", "dense lesions"),
    ),
}
LOBE_PHRASES = ("within the {side} hemiliver", "of the {side} lobe", "located in the {side} half of the liver")
SEGMENT_PHRASES = ("in S{number}", "in seg {roman}", "within hepatic segment {number}", "located in segment {roman}")
SELECT_PHRASES = {
    "only": ("the solitary {n}{pp}", "the lone {n}{pp}", "the one {n}{pp}"),
    "largest": ("the {n}{pp} that is largest", "the dominant {n}{pp}", "of the {ns}{pp}, the biggest one"),
    "smallest": ("the {n}{pp} that is smallest", "the least voluminous {n}{pp}", "of the {ns}{pp}, the smallest one"),
    "uppermost": ("the most cephalad {n}{pp}", "the {n}{pp} located highest", "of the {ns}{pp}, the top one"),
    "lowest": ("the {n}{pp} located lowest", "the most caudally placed {n}{pp}", "of the {ns}{pp}, the bottom one"),
    "most_anterior": (
        "the {n}{pp} located most anteriorly",
        "the {n}{pp} nearest the front",
        "of the {ns}{pp}, the front one",
    ),
    "most_posterior": (
        "the {n}{pp} located most posteriorly",
        "the {n}{pp} nearest the back",
        "of the {ns}{pp}, the back one",
    ),
    "rightmost": (
        "the {n}{pp} farthest right",
        "the {n}{pp} lying most to the right",
        "of the {ns}{pp}, the right-most one",
    ),
    "leftmost": (
        "the {n}{pp} farthest left",
        "the {n}{pp} lying most to the left",
        "of the {ns}{pp}, the left-most one",
    ),
    "closest_to_dome": (
        "the {n}{pp} nearest to the hepatic dome",
        "the {n}{pp} right under the dome",
        "the subdiaphragmatic-most {n}{pp}",
    ),
}
DIAMETER_PHRASES = ("the {n}{pp} of approximately {k} cm", "the {k}-cm {n}{pp}", "the {mm} mm {n}{pp}")
NEGATIVE_PHRASES = ("is there a {n}{pp}?", "any evidence of a {n}{pp}", "look for a {n}{pp}")
NEGATIVE_DIAMETER_PHRASES = ("is there a {k}-cm {n}{pp}?", "look for a {mm} mm {n}{pp}")
COMMANDS = ("", "", "please outline ", "mark ", "delineate ", "contour ", "identify ")


def _indefinite(text: str) -> str:
    words = text.split(" ")
    for index, word in enumerate(words[:-1]):
        if word == "a" and (words[index + 1][:1] in "aeiou8" or words[index + 1][:2] == "11"):
            words[index] = "an"
    return " ".join(words)


def paraphrase(query: dict, targets: list[int], rng: np.random.Generator) -> str:
    """The expression of ``query`` (``Query.to_dict()``) whose evaluated targets are ``targets``, in the second
    grammar."""
    meaning = Query.from_dict(query)
    singular, plural = _noun(meaning, rng, NOUNS)
    pp = _place(meaning, rng, SEGMENT_PHRASES, LOBE_PHRASES)
    select = query.get("select", "only")
    diameter = query.get("diameter_cm")
    if select == "all":
        if targets:
            count = len(targets)
            text = _choose(
                (f"each {singular}{pp}", f"every one of the {plural}{pp}", f"the {count} {plural}{pp}")
                + (
                    (f"the pair of {plural}{pp}",)
                    if count == 2
                    else (f"all of the {NUMBER_WORDS.get(count, count)} {plural}{pp}",)
                ),
                rng,
            )
        else:
            text = _choose((f"are there {plural}{pp}?", f"any evidence of {plural}{pp}"), rng)
    elif diameter is not None:
        templates = DIAMETER_PHRASES if targets else NEGATIVE_DIAMETER_PHRASES
        text = _choose(templates, rng).format(k=diameter, mm=10 * int(diameter), n=singular, pp=pp)
    elif select == "only" and not targets:
        text = _choose(NEGATIVE_PHRASES, rng).format(n=singular, pp=pp)
    else:
        text = _choose(SELECT_PHRASES[select], rng).format(n=singular, ns=plural, pp=pp)
    if text.startswith(("the ", "each ", "every ")):
        text = _choose(COMMANDS, rng) + text
    return _indefinite(text)


def paraphrase_cases(cases: list[dict], seed: int = 0) -> list[dict]:
    """``cases`` with every expression said again in the second grammar (same ids, queries, targets, kinds)."""
    rng = np.random.default_rng(seed)
    return [
        {
            **case,
            "expressions": [
                {**expression, "text": paraphrase(expression["query"], expression["targets"], rng)}
                for expression in case.get("expressions", [])
            ],
        }
        for case in cases
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--split", default="test", choices=("training", "validation", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="dataset folder to write (default: <cache_dir>/paraphrased_<split>)"
    )
    args = parser.parse_args(argv)
    cases = paraphrase_cases(load_datalist(ensure_default_dataset(args.cache_dir), args.split), args.seed)
    out = Path(args.out or Path(args.cache_dir) / f"paraphrased_{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    keep = ("image", "lesions", "liver", "lesion_attributes", "liver_frame", "expressions", "case_id")
    datalist = {split: [] for split in ("training", "validation", "test")}
    datalist[args.split] = [{k: case[k] for k in keep if k in case} for case in cases]
    (out / "datalist.json").write_text(json.dumps(datalist, indent=1) + "\n")
    texts = [e["text"] for case in cases for e in case["expressions"]]
    print(f"{len(texts)} paraphrased expressions of the {args.split} split written to {out / 'datalist.json'}")
    for text in texts[:: max(len(texts) // 12, 1)]:
        print(f"  {text}")


if __name__ == "__main__":
    main()
