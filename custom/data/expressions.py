"""Referring expressions generated from measured lesion attributes.

An expression is a :class:`Query` (filters plus a selector) rendered to text by a small grammar with several
paraphrases per meaning. Its ``targets`` are always the result of evaluating the query on the *measured*
attributes of the case (:func:`evaluate`), never what a template was meant to pick.

Evaluation is three-valued so that every expression is unambiguous: a lesion whose centroid lies within
``LOCATION_MARGIN_MM`` of a region plane, whose density is within ``DENSITY_MARGIN_HU`` of the threshold, or
whose diameter is neither clearly near nor clearly far from the stated size is *uncertain* for that filter;
a query for which any lesion is uncertain is not used. Superlatives need a clear winner (``RANK_MARGIN_MM``
for positions, ``VOLUME_RATIO`` for sizes).

Kind of an expression (the metrics are reported per kind) is the attribute that makes the final selection:
``negative`` when nothing matches; otherwise by the selector: ``count`` for a quantifier (all, both, every,
the three ...), ``size`` for largest / smallest / "the 3 cm lesion", ``location`` for a positional superlative
(uppermost, most anterior, rightmost, closest to the dome ...). A plain unique reference ("the cyst in the
right lobe") is ``density`` when it names the lesion type or density (cyst, metastasis, hypodense,
hyperdense ...) and ``location`` when only a lobe or segment singles the lesion out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .geometry import DENSITY_THRESHOLD_HU, REGION_CONDITIONS, LiverFrame

__all__ = [
    "EXPRESSION_KINDS",
    "SELECTORS",
    "Query",
    "evaluate",
    "expression_kind",
    "render",
    "candidate_queries",
    "generate_expressions",
]

EXPRESSION_KINDS = ("location", "size", "density", "count", "negative")

LOCATION_MARGIN_MM = 8.0
RANK_MARGIN_MM = 10.0
VOLUME_RATIO = 1.5
DENSITY_MARGIN_HU = 5.0
DIAMETER_MATCH_MM = 3.0
DIAMETER_EXCLUDE_MM = 8.0

#: Selector -> (attribute, direction) for positional superlatives; direction +1 picks the maximum.
POSITIONAL = {
    "uppermost": ("z", 1),
    "lowest": ("z", -1),
    "most_anterior": ("y", 1),
    "most_posterior": ("y", -1),
    "rightmost": ("x", 1),
    "leftmost": ("x", -1),
    "closest_to_dome": ("dome", -1),
}
SELECTORS = ("only", "all", "largest", "smallest", *POSITIONAL)


@dataclass(frozen=True)
class Query:
    """Meaning of an expression: lesions passing every filter, then the selector.

    ``select``: one of :data:`SELECTORS`; ``lobe``: 'right' / 'left'; ``segment``: Couinaud 2-8;
    ``kind``: lesion type ('cyst', 'metastasis', 'tumour'); ``density``: 'hypodense' / 'hyperdense';
    ``diameter_cm``: "the N cm lesion".
    """

    select: str = "only"
    lobe: str | None = None
    segment: int | None = None
    kind: str | None = None
    density: str | None = None
    diameter_cm: int | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Query:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    @property
    def has_filter(self) -> bool:
        return any(v is not None for v in (self.lobe, self.segment, self.kind, self.density, self.diameter_cm))


# ---------------------------------------------------------------------------------------------- evaluation
def _compare(value: float, margin: float) -> int:
    """+1 clearly positive, -1 clearly negative, 0 uncertain."""
    return 1 if value >= margin else -1 if value <= -margin else 0


def _region_membership(region: str, centroid, frame: LiverFrame | None) -> int:
    if frame is None:
        return 0
    offsets = frame.plane_offsets(centroid)
    return min(_compare(sign * offsets[plane], LOCATION_MARGIN_MM) for plane, sign in REGION_CONDITIONS[region])


def _density_membership(density: str, lesion: dict) -> int:
    contrast = lesion.get("contrast_hu")
    if contrast is None:
        return 0
    signed = -contrast if density == "hypodense" else contrast
    return _compare(signed - DENSITY_THRESHOLD_HU, DENSITY_MARGIN_HU)


def _diameter_membership(diameter_cm: int, lesion: dict) -> int:
    error = abs(lesion["longest_axial_diameter_mm"] - 10.0 * diameter_cm)
    return 1 if error <= DIAMETER_MATCH_MM else -1 if error >= DIAMETER_EXCLUDE_MM else 0


def _kind_membership(kind: str, lesion: dict) -> int:
    value = lesion.get("kind")
    if value is None or value == "indeterminate":
        return 0
    return 1 if value == kind else -1


FILTERS = ("lobe", "segment", "kind", "density", "diameter_cm")


class LesionTable:
    """Measured lesions of one case with cached three-valued answers (+1 yes, -1 no, 0 uncertain) per filter."""

    def __init__(self, lesions: list[dict], frame: LiverFrame | dict | None):
        self.lesions = list(lesions)
        self.frame = LiverFrame.from_dict(frame) if isinstance(frame, dict) else frame
        self._answers: dict[tuple[str, object], np.ndarray] = {}

    def _atom(self, name: str, value) -> np.ndarray:
        key = (name, value)
        if key not in self._answers:
            if name in ("lobe", "segment"):
                answers = [
                    _region_membership(str(value), lesion["centroid_ras_mm"], self.frame) for lesion in self.lesions
                ]
            elif name == "kind":
                answers = [_kind_membership(value, lesion) for lesion in self.lesions]
            elif name == "density":
                answers = [_density_membership(value, lesion) for lesion in self.lesions]
            else:
                answers = [_diameter_membership(value, lesion) for lesion in self.lesions]
            self._answers[key] = np.asarray(answers, dtype=np.int8).reshape(len(self.lesions))
        return self._answers[key]

    def membership(self, query: Query) -> np.ndarray:
        """(K,) answers to "does lesion k pass every filter of the query"."""
        answers = np.ones(len(self.lesions), dtype=np.int8)
        for name in FILTERS:
            value = getattr(query, name)
            if value is not None:
                answers = np.minimum(answers, self._atom(name, value))
        return answers

    def evaluate(self, query: Query) -> list[int] | None:
        answers = self.membership(query)
        if (answers == 0).any():
            return None
        passing = [lesion for lesion, answer in zip(self.lesions, answers) if answer > 0]
        ids = sorted(int(lesion["id"]) for lesion in passing)
        if query.select == "all":
            return ids
        if query.select == "only":
            return ids if len(ids) <= 1 else None
        if not passing:
            return []
        return _winner(query.select, passing, self.frame)


def _rank_value(select: str, lesion: dict, frame: LiverFrame | None) -> float | None:
    if select in ("largest", "smallest"):
        return float(np.log(max(lesion["volume_ml"], 1e-9)))
    attribute, _ = POSITIONAL[select]
    if attribute == "dome":
        return None if frame is None else frame.dome_distance(lesion["centroid_ras_mm"])
    return float(lesion["centroid_ras_mm"]["xyz".index(attribute)])


def _winner(select: str, lesions: list[dict], frame: LiverFrame | None) -> list[int] | None:
    values = [_rank_value(select, lesion, frame) for lesion in lesions]
    if any(v is None for v in values):
        return None
    direction = -1 if select == "smallest" else 1 if select == "largest" else POSITIONAL[select][1]
    order = np.argsort([-direction * v for v in values], kind="stable")
    if len(order) > 1:
        gap = direction * (values[order[0]] - values[order[1]])
        needed = np.log(VOLUME_RATIO) if select in ("largest", "smallest") else RANK_MARGIN_MM
        if gap < needed:
            return None
    return [int(lesions[order[0]]["id"])]


def evaluate(query: Query, lesions: list[dict], frame: LiverFrame | dict | None) -> list[int] | None:
    """Target ids of a query on measured lesion attributes; None when the answer is not clear-cut.

    ``only`` returns the single lesion passing the filters ([] when none, None when several); ``all`` returns
    every passing lesion; superlatives return the clear winner among the passing lesions ([] when none).
    """
    return LesionTable(lesions, frame).evaluate(query)


def expression_kind(query: Query, targets: list[int]) -> str:
    """Dominant attribute of an expression, see the module docstring."""
    if not targets:
        return "negative"
    if query.select == "all":
        return "count"
    if query.select in ("largest", "smallest") or query.diameter_cm is not None:
        return "size"
    if query.select in POSITIONAL:
        return "location"
    return "density" if query.kind is not None or query.density is not None else "location"


# ---------------------------------------------------------------------------------------------- grammar
NOUNS: dict[tuple[str, str] | None, tuple[tuple[str, str], ...]] = {
    None: (
        ("lesion", "lesions"),
        ("liver lesion", "liver lesions"),
        ("hepatic lesion", "hepatic lesions"),
        ("focal liver lesion", "focal liver lesions"),
    ),
    ("kind", "cyst"): (
        ("cyst", "cysts"),
        ("cystic lesion", "cystic lesions"),
        ("simple cyst", "simple cysts"),
        ("hepatic cyst", "hepatic cysts"),
    ),
    ("kind", "metastasis"): (
        ("metastasis", "metastases"),
        ("liver metastasis", "liver metastases"),
        ("metastatic lesion", "metastatic lesions"),
    ),
    ("kind", "tumour"): (("tumour", "tumours"), ("liver tumour", "liver tumours"), ("solid lesion", "solid lesions")),
    ("density", "hypodense"): (
        ("hypodense lesion", "hypodense lesions"),
        ("low-density lesion", "low-density lesions"),
        ("hypoattenuating lesion", "hypoattenuating lesions"),
    ),
    ("density", "hyperdense"): (
        ("hyperdense lesion", "hyperdense lesions"),
        ("high-density lesion", "high-density lesions"),
        ("hyperattenuating lesion", "hyperattenuating lesions"),
        ("bright lesion", "bright lesions"),
    ),
}
LOBE_PHRASES = (
    "in the {side} lobe",
    "in the {side} liver lobe",
    "in the {side} hepatic lobe",
    "in the {side} lobe of the liver",
)
SEGMENT_PHRASES = (
    "in segment {number}",
    "in segment {roman}",
    "in liver segment {number}",
    "in Couinaud segment {roman}",
)
ROMAN = {2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def number_word(count: int) -> str:
    """``count`` in words up to ten, in digits above (a real liver may hold dozens of lesions)."""
    return NUMBER_WORDS.get(count, str(count))


SELECT_PHRASES = {
    "only": ("the {n}{pp}", "the single {n}{pp}", "the only {n}{pp}"),
    "largest": ("the largest {n}{pp}", "the biggest {n}{pp}", "the {n}{pp} with the largest volume"),
    "smallest": ("the smallest {n}{pp}", "the tiniest {n}{pp}", "the {n}{pp} with the smallest volume"),
    "uppermost": (
        "the uppermost {n}{pp}",
        "the most superior {n}{pp}",
        "the highest {n}{pp}",
        "the most cranial {n}{pp}",
    ),
    "lowest": ("the lowest {n}{pp}", "the most inferior {n}{pp}", "the most caudal {n}{pp}"),
    "most_anterior": ("the most anterior {n}{pp}", "the frontmost {n}{pp}", "the most ventral {n}{pp}"),
    "most_posterior": ("the most posterior {n}{pp}", "the most dorsal {n}{pp}", "the rearmost {n}{pp}"),
    "rightmost": (
        "the rightmost {n}{pp}",
        "the {n}{pp} furthest to the patient's right",
        "the most right-sided {n}{pp}",
    ),
    "leftmost": ("the leftmost {n}{pp}", "the {n}{pp} furthest to the patient's left", "the most left-sided {n}{pp}"),
    "closest_to_dome": (
        "the {n}{pp} closest to the liver dome",
        "the {n}{pp} nearest the dome of the liver",
        "the {n}{pp} closest to the dome",
    ),
}
DIAMETER_PHRASES = ("the {k} cm {n}{pp}", "the {n}{pp} measuring about {k} cm", "the roughly {k} cm {n}{pp}")
NEGATIVE_PHRASES = ("a {n}{pp}", "the {n}{pp}", "any {n}{pp}")
NEGATIVE_DIAMETER_PHRASES = ("a {k} cm {n}{pp}", "the {k} cm {n}{pp}", "a {n}{pp} measuring about {k} cm")
COMMANDS = ("", "", "", "segment ", "find ", "show ", "locate ", "highlight ")


def _noun(query: Query, rng: np.random.Generator, nouns: dict = NOUNS) -> tuple[str, str]:
    key = ("kind", query.kind) if query.kind else ("density", query.density) if query.density else None
    options = nouns[key]
    return options[int(rng.integers(len(options)))]


def _place(
    query: Query,
    rng: np.random.Generator,
    segment_phrases: tuple[str, ...] = SEGMENT_PHRASES,
    lobe_phrases: tuple[str, ...] = LOBE_PHRASES,
) -> str:
    if query.segment is not None:
        template = segment_phrases[int(rng.integers(len(segment_phrases)))]
        return " " + template.format(number=query.segment, roman=ROMAN[query.segment])
    if query.lobe is not None:
        return " " + lobe_phrases[int(rng.integers(len(lobe_phrases)))].format(side=query.lobe)
    return ""


def _choose(options, rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def _count_phrase(count: int, plural: str, singular: str, pp: str, rng) -> tuple[str, int | None]:
    options = [
        (f"all {plural}{pp}", None),
        (f"every {singular}{pp}", None),
        (f"the {number_word(count)} {plural}{pp}", count),
    ]
    options.append((f"both {plural}{pp}", 2) if count == 2 else (f"all {number_word(count)} {plural}{pp}", count))
    return options[int(rng.integers(len(options)))]


def _indefinite(text: str) -> str:
    """Fix 'a' before a vowel sound ('an 8 cm lesion')."""
    if text.startswith("a ") and (text[2:3] in "aeiou8" or text[2:4] == "11"):
        return "an " + text[2:]
    return text


def render(query: Query, targets: list[int], rng: np.random.Generator) -> tuple[str, int | None]:
    """Text for a query whose evaluated targets are ``targets``; returns (text, count stated in the text or None)."""
    singular, plural = _noun(query, rng)
    pp = _place(query, rng)
    stated = None
    if query.select == "all":
        if targets:
            text, stated = _count_phrase(len(targets), plural, singular, pp, rng)
        else:
            text = _choose((f"all {plural}{pp}", f"any {plural}{pp}"), rng)
    elif query.diameter_cm is not None:
        templates = DIAMETER_PHRASES if targets else NEGATIVE_DIAMETER_PHRASES
        text = _choose(templates, rng).format(k=query.diameter_cm, n=singular, pp=pp)
    elif query.select == "only" and not targets:
        text = _choose(NEGATIVE_PHRASES, rng).format(n=singular, pp=pp)
    else:
        text = _choose(SELECT_PHRASES[query.select], rng).format(n=singular, pp=pp)
    return _indefinite(_choose(COMMANDS, rng) + text), stated


# ---------------------------------------------------------------------------------------------- sampling
def candidate_queries(kind_words=("cyst", "metastasis"), max_diameter_cm: int = 6) -> list[Query]:
    """Every query the grammar can express, in a fixed order."""
    places = [{}] + [{"lobe": side} for side in ("right", "left")] + [{"segment": s} for s in range(2, 9)]
    looks = [{}] + [{"kind": k} for k in kind_words] + [{"density": d} for d in ("hypodense", "hyperdense")]
    queries = [Query(select=select, **place, **look) for place in places for look in looks for select in SELECTORS]
    queries += [
        Query(diameter_cm=k, **place, **look)
        for place in places
        for look in looks
        for k in range(1, max_diameter_cm + 1)
    ]
    return queries


def _is_good_positive(query: Query, targets: list[int], passing_count: int) -> bool:
    if query.select == "only":
        return query.has_filter
    if query.select == "all":
        return len(targets) >= 2
    return passing_count >= 2


def _is_hard_negative(query: Query, table: LesionTable) -> bool:
    """A negative for which dropping one filter finds a lesion: it describes something that is almost there."""
    for drop in FILTERS:
        if getattr(query, drop) is not None:
            relaxed = Query(**{**asdict(query), drop: None})
            if (table.membership(relaxed) > 0).any():
                return True
    return False


def classify_candidates(lesions: list[dict], frame, kind_words=("cyst", "metastasis")) -> dict[str, list]:
    """Group the usable (query, targets) pairs of a case by expression kind.

    Negatives are split into hard ones (one filter away from an existing lesion, or any negative in a case
    without lesions), ``negative`` without and ``negative_size`` with a stated diameter, and ``negative_easy``.
    """
    table = LesionTable(lesions, frame)
    groups: dict[str, list] = {kind: [] for kind in (*EXPRESSION_KINDS, "negative_size", "negative_easy")}
    for query in candidate_queries(kind_words):
        targets = table.evaluate(query)
        if targets is None:
            continue
        if not targets:
            if query.select not in ("only", "all"):
                continue  # "a cyst in segment 3" rather than "the largest cyst in segment 3"
            if lesions and not _is_hard_negative(query, table):
                groups["negative_easy"].append((query, targets))
            else:
                groups["negative" if query.diameter_cm is None else "negative_size"].append((query, targets))
        elif _is_good_positive(query, targets, int((table.membership(query) > 0).sum())):
            groups[expression_kind(query, targets)].append((query, targets))
    return groups


NEGATIVE_POOLS = ("negative", "negative_size", "negative_easy")


def _negative_pool(groups: dict[str, list], rng: np.random.Generator) -> list:
    """Hard negatives first, two plain ones for each one with a stated diameter; easy ones when those run out."""
    if groups["negative"] and groups["negative_size"]:
        return groups["negative"] if rng.random() < 2 / 3 else groups["negative_size"]
    return groups["negative"] or groups["negative_size"] or groups["negative_easy"]


def _pick(candidates: list, used_targets: Counter, rng: np.random.Generator):
    """Remove and return a random candidate among those whose target set has been used the least."""
    least = min(used_targets[tuple(t)] for _, t in candidates)
    pool = [i for i, (_, t) in enumerate(candidates) if used_targets[tuple(t)] == least]
    choice = candidates.pop(pool[int(rng.integers(len(pool)))])
    used_targets[tuple(choice[1])] += 1
    return choice


def generate_expressions(
    lesions: list[dict],
    frame,
    rng: np.random.Generator,
    num_expressions: tuple[int, int] = (10, 20),
    negative_share: float = 0.17,
    paraphrase_probability: float = 0.15,
    kind_words=("cyst", "metastasis"),
) -> list[dict]:
    """Sample a balanced set of expressions for one case.

    Args:
        lesions: measured lesion attributes (see :func:`custom.data.geometry.measure_lesions`).
        frame: the case's liver frame (dict or :class:`LiverFrame`), or None without a liver mask.
        rng: random generator; the result is deterministic for its state.
        num_expressions: inclusive range of the number of expressions of a case with lesions
            (a case without lesions gets a third of it, all negatives).
        negative_share: share of negatives in a case with lesions.
        paraphrase_probability: chance that a chosen meaning is also written a second, different way.
        kind_words: lesion types the grammar may name.

    Returns:
        list of ``{"text", "targets", "kind", "query"}`` dicts; ``query`` may hold ``stated_count``.
    """
    groups = classify_candidates(lesions, frame, kind_words)
    low, high = num_expressions
    if not lesions:
        total = int(rng.integers(max(1, low // 3), max(1, high // 3) + 1))
        plan = {"negative": total}
    else:
        total = int(rng.integers(low, high + 1))
        available_negatives = sum(len(groups[k]) for k in NEGATIVE_POOLS)
        negatives = min(int(round(total * negative_share)), available_negatives)
        plan = {"negative": negatives}
        positive_kinds = [k for k in ("location", "size", "density", "count") if groups[k]]
        order = [positive_kinds[int(i)] for i in rng.permutation(len(positive_kinds))]
        for i in range(total - negatives):
            available = [k for k in order if len(groups[k]) > plan.get(k, 0)]
            if not available:
                break
            kind = min(available, key=lambda k: (plan.get(k, 0), order.index(k)))
            plan[kind] = plan.get(kind, 0) + 1
    used: Counter = Counter()
    chosen = []
    for kind in ("location", "size", "density", "count", "negative"):
        for _ in range(plan.get(kind, 0)):
            pool = groups[kind] if kind != "negative" else _negative_pool(groups, rng)
            if not pool:
                break
            chosen.append(_pick(pool, used, rng))
    expressions = []
    for query, targets in chosen:
        texts = [render(query, targets, rng)]
        if rng.random() < paraphrase_probability:
            for _ in range(4):
                other = render(query, targets, rng)
                if other[0] != texts[0][0]:
                    texts.append(other)
                    break
        for text, stated in texts:
            record = {
                "text": text,
                "targets": list(targets),
                "kind": expression_kind(query, targets),
                "query": query.to_dict(),
            }
            if stated is not None:
                record["query"]["stated_count"] = stated
            expressions.append(record)
    return expressions
