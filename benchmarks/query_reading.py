"""How well :func:`custom.referral.query.read_query` reads referring expressions.

Usage: ``python -m benchmarks.query_reading [--cache_dir cache] [--skip_dataset]`` from the repository root.

Printed:

1. on ``tests/data/query_sentences.json`` (hand-written sentences with their expected reading): the share read
   exactly (every compared field equal), the accuracy of each field, the organ accuracy on the sentences about
   another organ and on the liver sentences that name a neighbour organ, the share of sentences whose wording
   neither existing grammar produces, and every miss with the fields that differ;
2. on the training split of the default dataset (``custom.data.default_dataset.ensure_default_dataset``): the
   share of the stored expressions (training grammar) and of their paraphrases
   (:func:`custom.data.paraphrases.paraphrase_cases`) whose reading as a ``Query`` equals the stored ``query``,
   the share of training-grammar expressions whose read count equals the stored ``stated_count`` (a paraphrase
   keeps the stored query of the original text, so its count is not compared), and the misses. Only the training
   split is read.

The module also serves the tests: :func:`expected_reading`, :func:`compared_reading`, :func:`score` and
:func:`grammar_wordings` (every wording the two grammars can produce, enumerated exhaustively).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from custom.data.expressions import SELECTORS, Query, render
from custom.data.paraphrases import paraphrase
from custom.referral.query import ORGANS, ReadQuery, read_query

SENTENCES = Path(__file__).resolve().parents[1] / "tests" / "data" / "query_sentences.json"
FIELDS = (
    "organ",
    "query",
    "extra_select",
    "ordinal",
    "count",
    "diameter_mm",
    "size_compare",
    "excluded",
    "negated",
    "question",
    "lesion_word",
    "unread",
)
DEFAULTS = {
    "organ": "liver",
    "query": {"select": "only"},
    "extra_select": None,
    "ordinal": None,
    "count": None,
    "size_compare": None,
    "excluded": {},
    "negated": False,
    "question": False,
    "lesion_word": True,
    "unread": [],
}


def load_sentences(path: str | Path = SENTENCES) -> list[dict]:
    return json.loads(Path(path).read_text())["sentences"]


def expected_reading(entry: dict) -> dict:
    """The compared fields of a sentence-file entry, defaults filled in."""
    expected = {**DEFAULTS, **{k: v for k, v in entry.items() if k in FIELDS}}
    expected["query"] = Query.from_dict(expected["query"]).to_dict()
    if "diameter_mm" not in entry:
        diameter_cm = expected["query"].get("diameter_cm")
        expected["diameter_mm"] = None if diameter_cm is None else 10.0 * diameter_cm
    return expected


def compared_reading(read: ReadQuery) -> dict:
    """The fields of a reading that the sentence file states."""
    data = read.to_dict()
    return {name: data[name] for name in FIELDS}


def names_other_organ(text: str) -> bool:
    """Whether a sentence names an organ other than the liver (for a liver sentence: a neighbour organ)."""
    return any(pattern.search(text.lower()) for _, pattern in ORGANS[1:])


def score(entries: list[dict], reader: Callable[[str], ReadQuery] = read_query) -> dict:
    """Exact-read share, per-field accuracy, organ accuracy (all / other organs / neighbour sentences), misses."""
    rows = []
    for entry in entries:
        expected, got = expected_reading(entry), compared_reading(reader(entry["text"]))
        rows.append((entry, expected, got, [f for f in FIELDS if expected[f] != got[f]]))
    other = [r for r in rows if r[1]["organ"] != "liver"]
    neighbour = [r for r in rows if r[1]["organ"] == "liver" and names_other_organ(r[0]["text"])]
    organ_ok = lambda group: sum(r[1]["organ"] == r[2]["organ"] for r in group) / max(len(group), 1)  # noqa: E731
    return {
        "count": len(rows),
        "exact": sum(not r[3] for r in rows) / len(rows),
        "fields": {f: sum(f not in r[3] for r in rows) / len(rows) for f in FIELDS},
        "organ_all": organ_ok(rows),
        "organ_other": organ_ok(other),
        "other_count": len(other),
        "organ_neighbour": organ_ok(neighbour),
        "neighbour_count": len(neighbour),
        "misses": [(r[0]["text"], {f: (r[1][f], r[2][f]) for f in r[3]}) for r in rows if r[3]],
    }


# ---------------------------------------------------------------------------------------------- grammar wordings
class _Replay:
    """A stand-in random generator that makes the choices of a given path (then the first option) and records how
    many options each choice had, so that every path of a grammar can be walked."""

    def __init__(self, path: list[int]):
        self.path, self.sizes = path, []

    def integers(self, low, high=None, *args, **kwargs) -> int:
        size = low if high is None else high - low
        choice = self.path[len(self.sizes)] if len(self.sizes) < len(self.path) else 0
        self.sizes.append(int(size))
        return choice if high is None else low + choice

    def random(self) -> float:  # pragma: no cover - the renderers do not draw floats
        return 0.0


def _every_output(make: Callable) -> set[str]:
    outputs, stack = set(), [[]]
    while stack:
        path = stack.pop()
        replay = _Replay(path)
        result = make(replay)
        outputs.add(result[0] if isinstance(result, tuple) else result)
        for position in range(len(path), len(replay.sizes)):
            prefix = path + [0] * (position - len(path))
            stack += [prefix + [c] for c in range(1, replay.sizes[position])]
    return outputs


def wording_key(text: str) -> str:
    """A sentence with case, punctuation, numbers (digits, segment numerals, number words), a / an and the side
    (right / left) left out: two sentences with the same key use the same wording."""
    s = re.sub(r"[^a-z0-9'\- ]", " ", text.lower())
    s = re.sub(r"\b(segment|seg|s)\s*(?:ii|iii|iv|v|vi|vii|viii)\b", r"\1 #", s)
    s = re.sub(r"\d+(?:\.\d+)?|\b(?:two|three|four|five|six)\b", "#", s)
    s = re.sub(r"\ban\b", "a", s)
    s = re.sub(r"\b(?:right|left)", "side", s)
    return re.sub(r"\s+", " ", s).strip()


def grammar_wordings() -> set[str]:
    """:func:`wording_key` of every text the training grammar and the paraphrase grammar can produce.

    Numbers, articles and sides are left out of the key, so one segment, one lobe, one size, counts 2 and 3
    ("both" / "the pair of" are said of two only) and the rightmost selector for both sides cover them all; every
    other selector, every kind and every density is enumerated."""
    places = [{}, {"lobe": "right"}, {"segment": 2}]
    looks = [{}, {"kind": "cyst"}, {"kind": "metastasis"}, {"kind": "tumour"}]
    looks += [{"density": "hypodense"}, {"density": "hyperdense"}]
    selects = [{"select": s} for s in SELECTORS if s != "leftmost"] + [{"diameter_cm": 1}]
    texts = set()
    for query in (Query(**p, **lk, **sel) for p in places for lk in looks for sel in selects):
        as_dict = query.to_dict()
        for targets in [[], [1, 2], [1, 2, 3]] if query.select == "all" else [[], [1]]:
            texts |= _every_output(lambda rng: render(query, targets, rng))
            texts |= _every_output(lambda rng: paraphrase(as_dict, targets, rng))
    return {wording_key(text) for text in texts}


# ---------------------------------------------------------------------------------------------- dataset check
def grammar_agreement(cases: list[dict], with_counts: bool) -> dict:
    """Share of a split's expressions whose reading as a Query equals the stored query (and count, if asked)."""
    misses, count_misses, total = [], [], 0
    for case in cases:
        for expression in case.get("expressions", []):
            total += 1
            read = read_query(expression["text"])
            if read.query != Query.from_dict(expression["query"]):
                misses.append((expression["text"], expression["query"], read.query.to_dict()))
            if with_counts and read.count != expression["query"].get("stated_count"):
                count_misses.append((expression["text"], expression["query"].get("stated_count"), read.count))
    return {
        "count": total,
        "query": 1.0 - len(misses) / max(total, 1),
        "stated_count": 1.0 - len(count_misses) / max(total, 1) if with_counts else None,
        "misses": misses + count_misses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--sentences", default=str(SENTENCES))
    parser.add_argument("--skip_dataset", action="store_true", help="only the sentence file")
    args = parser.parse_args(argv)

    entries = load_sentences(args.sentences)
    start = time.perf_counter()
    result = score(entries)
    elapsed = time.perf_counter() - start
    wordings = grammar_wordings()
    new = [e for e in entries if wording_key(e["text"]) not in wordings]
    print(
        f"Sentence file {args.sentences}: {result['count']} sentences ({elapsed * 1e3 / result['count']:.2f} ms each)"
    )
    print(f"  wording produced by neither grammar: {len(new) / len(entries):.3f} ({len(new)})")
    print(f"  read exactly (all fields):           {result['exact']:.3f}")
    print(f"  organ, all sentences:                {result['organ_all']:.3f}")
    print(f"  organ, other-organ sentences:        {result['organ_other']:.3f} ({result['other_count']})")
    print(
        f"  organ, liver sentences naming another organ: {result['organ_neighbour']:.3f} ({result['neighbour_count']})"
    )
    for batch in sorted({e.get("batch", "") for e in entries}):
        part = score([e for e in entries if e.get("batch", "") == batch])
        print(f"  batch {batch or '-'}: {part['count']} sentences, read exactly {part['exact']:.3f}")
    print("  per field: " + ", ".join(f"{f} {v:.3f}" for f, v in result["fields"].items()))
    print(f"  misses ({len(result['misses'])}):")
    for text, diff in result["misses"]:
        print(f"    {text!r}: " + "; ".join(f"{f} expected {e!r} read {g!r}" for f, (e, g) in diff.items()))
    if args.skip_dataset:
        return

    from custom.data.datalist import load_datalist
    from custom.data.default_dataset import ensure_default_dataset
    from custom.data.paraphrases import paraphrase_cases

    cases = load_datalist(ensure_default_dataset(args.cache_dir), "training")
    for name, split_cases, with_counts in (
        ("training grammar", cases, True),
        ("paraphrase grammar", paraphrase_cases(cases), False),
    ):
        agreement = grammar_agreement(split_cases, with_counts)
        line = (
            f"Training split, {name}: {agreement['count']} expressions, Query read as stored {agreement['query']:.4f}"
        )
        if with_counts:
            line += f", stated count read {agreement['stated_count']:.4f}"
        print(line)
        for miss in agreement["misses"][:20]:
            print(f"    miss: {miss}")


if __name__ == "__main__":
    main()
