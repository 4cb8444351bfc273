"""Answering a read sentence exactly on lesion candidates' measured attributes.

:func:`answer_query` takes the :class:`custom.referral.query.ReadQuery` of a sentence and the candidates of a volume
(their attribute dicts: ``volume_ml``, ``longest_axial_diameter_mm``, ``centroid_ras_mm``, ``mean_hu``, ``contrast_hu``,
``lobe``, ``segment``, ``dome_distance_mm``, ``kind`` when known; the liver frame when known) and answers it with
the rules that generated the targets (:func:`custom.data.expressions.evaluate`):

1. filters, each a three-valued membership per candidate (+1 passes, -1 fails, 0 too close to call): lobe and
   Couinaud segment by the centroid's side of the region planes, density by the contrast to the liver against
   :data:`custom.data.geometry.DENSITY_THRESHOLD_HU`, lesion type by the ``kind`` label when the candidate has one
   and by its mean HU otherwise (:func:`measured_kind`), size by the longest axial diameter (within
   :data:`custom.data.expressions.DIAMETER_MATCH_MM` of the stated size, or the nearest one within
   :data:`custom.data.expressions.DIAMETER_EXCLUDE_MM` when none is that close; "larger / smaller than"), and the
   excluded attributes ("not in the right lobe") taken away;
2. among those that pass, the candidates that may be real lesions (``credible``: the caller's judgement from the
   detector, the learned scorer and the text-conditioned evidence: a candidate both reject is a false detection
   more often than a lesion, and must not win a "largest");
3. the selector over what is left: the largest / smallest by volume, the upper- / lower-most, most anterior /
   posterior, right- / left-most by the centroid in the patient's RAS frame, the closest to the dome, the brightest
   / darkest by mean HU, with the ordinal ("the second largest") and the count ("the two largest"); "all" every
   one (the ``support`` of the caller keeps the best ones when more pass than the sentence counts); a single
   reference ("the cyst in segment 7") the one that passes, or the best supported one when several do;
   "not present" when nothing passes.

The answer says why: the candidates that passed each step, and a sentence (``explanation``) such as "largest of the
3 hypodense lesions in the right lobe: 12.4 ml against 3.1 and 0.8 ml" or "no hyperdense lesion in the left lobe;
the left lobe holds 1 hypodense lesion". Candidates are numbered from 1 in the text, as in the record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from custom.data.expressions import DIAMETER_EXCLUDE_MM, DIAMETER_MATCH_MM, POSITIONAL, RANK_MARGIN_MM, VOLUME_RATIO
from custom.data.geometry import DENSITY_THRESHOLD_HU, REGION_CONDITIONS, LiverFrame
from custom.referral.query import ReadQuery

__all__ = [
    "CYST_MAX_HU",
    "QueryAnswer",
    "answer_query",
    "filter_steps",
    "measured_kind",
    "membership",
    "rank_values",
    "describe",
]

#: A hypodense lesion whose mean HU is at most this is water-like: a cyst; above it, a solid (metastatic) lesion.
#: Chosen on the training and validation splits' lesion attributes (cysts 5-33 HU but for two tiny ones,
#: metastases 35-74 HU); :data:`KIND_MARGIN_HU` either side is too close to call.
CYST_MAX_HU = 34.0
KIND_MARGIN_HU = 3.0
NOUNS = {None: ("lesion", "lesions"), "cyst": ("cyst", "cysts"), "metastasis": ("metastasis", "metastases")}
NOUNS["tumour"] = ("tumour", "tumours")
#: Selector -> (how the ranking value is said, its unit, +1 when the largest value wins).
RANKS = {
    "largest": ("volume", "ml", 1),
    "smallest": ("volume", "ml", -1),
    "brightest": ("mean density", "HU", 1),
    "darkest": ("mean density", "HU", -1),
    **{
        name: (
            "distance from the dome" if axis == "dome" else f"RAS {axis}",
            "mm",
            direction,
        )
        for name, (axis, direction) in POSITIONAL.items()
    },
}


@dataclass
class QueryAnswer:
    """What :func:`answer_query` decided.

    ``chosen``: 0-based indices of the referred candidates (empty: not present); ``steps``: one dict per filter or
    selection step, ``{"step", "passed": [1-based ids], "uncertain": [...]}``; ``explanation``: one sentence;
    ``reason``: why "not present" (None when found); ``tie_broken``: the learned support chose among candidates the
    query could not tell apart; ``why``: per candidate (0-based) a short phrase for the record.
    """

    chosen: list[int]
    steps: list[dict] = field(default_factory=list)
    explanation: str = ""
    reason: str | None = None
    tie_broken: bool = False
    why: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "chosen": [i + 1 for i in self.chosen],
            "steps": self.steps,
            "explanation": self.explanation,
            **({"reason": self.reason} if self.reason else {}),
            "tie_broken": self.tie_broken,
        }


# ---------------------------------------------------------------------------------------------- memberships
def _sign(value: float, margin: float) -> int:
    """+1 when ``value`` clears ``margin`` upwards, -1 downwards, 0 in between (a margin of 0 decides every value
    but exactly 0, which counts as +1 as the region planes do)."""
    if margin <= 0:
        return 1 if value >= 0 else -1
    return 1 if value >= margin else -1 if value <= -margin else 0


def measured_kind(
    attributes: Mapping, margin_hu: float = KIND_MARGIN_HU, cyst_max_hu: float = CYST_MAX_HU
) -> dict[str, int]:
    """Lesion type memberships from the measured HU: ``{"cyst": m, "metastasis": m, "tumour": m}``, m in {+1, 0, -1}.

    A hypodense lesion (contrast to the liver at or below -:data:`DENSITY_THRESHOLD_HU`) is a cyst when its mean HU
    is at most ``cyst_max_hu`` and solid (metastasis, tumour) above it, 0 within ``margin_hu`` of it; a hyperdense
    lesion is solid, not a cyst nor a (hypodense) metastasis; without HU every type is 0.
    """
    mean_hu, contrast = attributes.get("mean_hu"), attributes.get("contrast_hu")
    if mean_hu is None or contrast is None:
        return {"cyst": 0, "metastasis": 0, "tumour": 0}
    if contrast >= DENSITY_THRESHOLD_HU:
        return {"cyst": -1, "metastasis": -1, "tumour": 1}
    if contrast > -DENSITY_THRESHOLD_HU:
        return {"cyst": -1, "metastasis": 0, "tumour": 0}  # isodense: solid if anything, type unclear
    solid = _sign(float(mean_hu) - cyst_max_hu, margin_hu)
    return {"cyst": -solid, "metastasis": solid, "tumour": solid}


def membership(name: str, value, attributes: Mapping, frame: LiverFrame | None, margins: Mapping) -> int:
    """Whether one candidate passes one filter: +1, -1, or 0 when it is within the filter's margin.

    ``name``: ``lobe`` / ``segment`` (``value`` 'right' / 'left' / 2..8), ``density`` ('hypodense' / 'hyperdense'),
    ``kind`` ('cyst' / 'metastasis' / 'tumour'). ``attributes``: the candidate's measured attributes; ``frame``:
    the liver frame (None: the ``lobe`` / ``segment`` attributes decide); ``margins``: ``location_mm``,
    ``density_hu``, ``kind_hu`` (0: the sign decides, as the targets' generator does beyond its margins) and
    ``cyst_max_hu`` (:func:`measured_kind`).
    """
    if name in ("lobe", "segment"):
        if frame is None:
            known = attributes.get(name)
            return 0 if known is None else 1 if str(known) == str(value) else -1
        offsets = frame.plane_offsets(attributes["centroid_ras_mm"])
        margin = float(margins.get("location_mm", 0.0))
        return min(_sign(sign * offsets[plane], margin) for plane, sign in REGION_CONDITIONS[str(value)])
    if name == "density":
        contrast = attributes.get("contrast_hu")
        if contrast is None:
            return 0
        signed = -float(contrast) if value == "hypodense" else float(contrast)
        return _sign(signed - DENSITY_THRESHOLD_HU, float(margins.get("density_hu", 0.0)))
    if name == "kind":
        label = attributes.get("kind")
        if label is not None and label != "indeterminate":
            return 1 if label == value else -1
        margin, threshold = (
            float(margins.get("kind_hu", KIND_MARGIN_HU)),
            float(margins.get("cyst_max_hu", CYST_MAX_HU)),
        )
        return measured_kind(attributes, margin, threshold).get(str(value), 0)
    raise ValueError(f"unknown filter {name!r}")


def _diameter_errors(attributes: Sequence[Mapping], diameter_mm: float) -> np.ndarray:
    return np.array([abs(float(a.get("longest_axial_diameter_mm", np.nan)) - diameter_mm) for a in attributes])


# ---------------------------------------------------------------------------------------------- words
def _place(name: str | None, value) -> str:
    if name == "lobe":
        return f"in the {value} lobe"
    if name == "segment":
        return f"in segment {value}"
    return ""


def _size_words(read: ReadQuery) -> str:
    if read.diameter_mm is None:
        return ""
    millimetres = f"{read.diameter_mm:g} mm"
    if read.size_compare == ">":
        return f"larger than {millimetres}"
    if read.size_compare == "<":
        return f"smaller than {millimetres}"
    return f"of about {millimetres}"


def describe(read: ReadQuery, count: int = 1, with_place: bool = True) -> str:
    """The lesions the sentence's filters describe, as a noun phrase for ``count`` of them: "hypodense lesion in
    the right lobe", "cysts in segment 7 of about 30 mm"."""
    query = read.query
    singular, plural = NOUNS.get(query.kind, (str(query.kind), f"{query.kind}s"))
    words = [query.density, singular if count == 1 else plural]
    if with_place and query.segment is not None:
        words.append(_place("segment", query.segment))
    elif with_place and query.lobe is not None:
        words.append(_place("lobe", query.lobe))
    words.append(_size_words(read))
    for name, value in read.excluded:
        words.append(f"not {_place(name, value) or value}" if name != "diameter_cm" else f"not about {value} cm")
    return " ".join(w for w in words if w)


def _ids(indices) -> list[int]:
    return [int(i) + 1 for i in indices]


def _list(values: Sequence[str]) -> str:
    values = list(values)
    if not values:
        return ""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _type_of(attributes: Mapping, settings: Mapping) -> str:
    """What a candidate is by type: its label when it has one, else the type its HU says
    (:func:`measured_kind`), "hyperdense lesion" for a hyperdense one, "lesion of unclear type" otherwise."""
    label = attributes.get("kind")
    if label in ("cyst", "metastasis", "tumour"):
        return label
    if label == "hyperdense" or attributes.get("density") == "hyperdense":
        return "hyperdense lesion"
    margin, threshold = float(settings.get("kind_hu", KIND_MARGIN_HU)), float(settings.get("cyst_max_hu", CYST_MAX_HU))
    kinds = measured_kind(attributes, margin, threshold)
    return "cyst" if kinds["cyst"] > 0 else "metastasis" if kinds["metastasis"] > 0 else "lesion of unclear type"


def _holding(attributes: Sequence[Mapping], indices: Sequence[int], by_type: bool, settings: Mapping) -> str:
    """What a set of candidates is, by density ("1 hypodense lesion and 2 hyperdense lesions") or, ``by_type``, by
    lesion type ("1 metastasis and 1 cyst")."""
    counts: dict[str, int] = {}
    for index in indices:
        if by_type:
            name = _type_of(attributes[index], settings)
        else:
            name = f"{attributes[index].get('density') or 'unmeasured'} lesion"
        counts[name] = counts.get(name, 0) + 1
    plural = {"cyst": "cysts", "metastasis": "metastases", "tumour": "tumours"}
    words = [
        f"{n} {name if n == 1 else plural.get(name, name.replace('lesion', 'lesions'))}" for name, n in counts.items()
    ]
    return _list(words)


# ---------------------------------------------------------------------------------------------- steps
def filter_steps(read: ReadQuery) -> list[tuple[str, object]]:
    """The sentence's filters in the order they are applied: place (segment, else lobe), lesion type, density."""
    query = read.query
    steps = []
    if query.segment is not None:
        steps.append(("segment", query.segment))
    elif query.lobe is not None:
        steps.append(("lobe", query.lobe))
    if query.kind is not None:
        steps.append(("kind", query.kind))
    if query.density is not None:
        steps.append(("density", query.density))
    return steps


def _size_filter(read: ReadQuery, attributes: Sequence[Mapping], alive: list[int]) -> tuple[list[int], list[int]]:
    """(passing, uncertain) candidates of the stated size among ``alive``: within :data:`DIAMETER_MATCH_MM`; when
    none is, the nearest one closer than :data:`DIAMETER_EXCLUDE_MM`; "larger / smaller than" by the diameter."""
    errors = _diameter_errors(attributes, float(read.diameter_mm))
    diameters = np.array([float(a.get("longest_axial_diameter_mm", np.nan)) for a in attributes])
    if read.size_compare == ">":
        return [i for i in alive if diameters[i] > read.diameter_mm], []
    if read.size_compare == "<":
        return [i for i in alive if diameters[i] < read.diameter_mm], []
    close = [i for i in alive if errors[i] <= DIAMETER_MATCH_MM]
    near = [i for i in alive if DIAMETER_MATCH_MM < errors[i] < DIAMETER_EXCLUDE_MM]
    if close or not near:
        return close, near
    return [min(near, key=lambda i: errors[i])], near


def rank_values(select: str, attributes: Sequence[Mapping], frame: LiverFrame | None) -> np.ndarray:
    """(K,) the value each candidate is ranked by for ``select`` (see :data:`RANKS`), larger-is-first after
    multiplying by the selector's direction."""
    values = []
    for item in attributes:
        if select in ("largest", "smallest"):
            values.append(float(item["volume_ml"]))
        elif select in ("brightest", "darkest"):
            values.append(float(item.get("mean_hu", np.nan)))
        elif POSITIONAL[select][0] == "dome":
            distance = item.get("dome_distance_mm")
            if distance is None and frame is not None:
                distance = frame.dome_distance(item["centroid_ras_mm"])
            values.append(np.nan if distance is None else float(distance))
        else:
            values.append(float(item["centroid_ras_mm"]["xyz".index(POSITIONAL[select][0])]))
    return np.asarray(values, dtype=np.float64)


def _ranked(select: str, attributes, frame, indices: list[int]) -> tuple[list[int], np.ndarray]:
    """``indices`` in the selector's order (the winner first; unmeasured values last) and the ranking values."""
    values = rank_values(select, attributes, frame)
    direction = RANKS[select][2]
    keyed = np.where(np.isnan(values), -np.inf, direction * values)
    return sorted(indices, key=lambda i: (-keyed[i], i)), values


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}" if unit == "ml" else f"{value:.0f} {unit}"


def _amounts(values: Sequence[float], unit: str) -> str:
    """Values said with their unit once: "3.1 and 0.8 ml"."""
    return _list([_fmt(v, unit).removesuffix(f" {unit}") for v in values]) + f" {unit}"


# ---------------------------------------------------------------------------------------------- the answer
def answer_query(
    read: ReadQuery,
    attributes: Sequence[Mapping],
    frame: LiverFrame | Mapping | None = None,
    credible: Sequence[bool] | None = None,
    support: Sequence[float] | None = None,
    settings: Mapping | None = None,
    selected: Sequence[bool] | None = None,
) -> QueryAnswer:
    """Answer a read sentence on the candidates.

    Args:
        read: the sentence as read (:func:`custom.referral.query.read_query`); its organ is not checked here.
        attributes: one measured attribute dict per candidate (see the module docstring).
        frame: the liver frame (:class:`custom.data.geometry.LiverFrame` or its dict); None: the ``lobe`` and
            ``segment`` attributes decide the place.
        credible: per candidate, whether it may be a real lesion (None: all may); others never answer.
        support: per candidate, how strongly the learned parts point at it for this sentence (the scorer's score,
            the text-conditioned evidence); it chooses only where the query leaves the choice open: several
            candidates for a single reference, more than the sentence counts, a filter too close to call.
        settings: the margins of :func:`membership` (``location_mm``, ``density_hu``, ``kind_hu``, ``cyst_max_hu``;
            default 0, 0, :data:`KIND_MARGIN_HU`, :data:`CYST_MAX_HU`), ``open_support`` (the support a candidate too
            close to call for a filter needs to be taken when none passes clearly; default 0.5) and ``near_ties``
            ("scorer": in a superlative, the candidates that rank within the targets' generator's margin of the
            winner (:data:`custom.data.expressions.VOLUME_RATIO`, :data:`custom.data.expressions.RANK_MARGIN_MM`),
            which the measurement cannot tell apart, are all chosen when two or more of them are ``selected``;
            "off", the default: the measured winner).
        selected: per candidate, whether the learned scorer picks it for this sentence on its own (None: none).

    Returns:
        the :class:`QueryAnswer`.
    """
    frame = LiverFrame.from_dict(frame) if isinstance(frame, Mapping) else frame
    settings = dict(settings or {})
    count = len(attributes)
    support = np.zeros(count) if support is None else np.asarray(support, dtype=np.float64)
    selected = np.zeros(count, bool) if selected is None else np.asarray(selected, dtype=bool)
    alive = list(range(count))
    steps: list[dict] = []
    why: dict[int, str] = {}

    def record(step: str, before: list[int], kept: list[int], uncertain: Sequence[int] = ()) -> None:
        steps.append({"step": step, "passed": _ids(kept), "uncertain": _ids(uncertain)})
        for index in before:
            if index not in kept:
                why.setdefault(index, f"fails: {step}")

    for name, value in filter_steps(read):
        answers = {i: membership(name, value, attributes[i], frame, settings) for i in alive}
        kept = [i for i in alive if answers[i] > 0]
        uncertain = [i for i in alive if answers[i] == 0]
        kept += _open_choice(uncertain, kept, support, float(settings.get("open_support", 0.5)))
        record(f"{name} {value}", alive, kept, uncertain)
        alive = kept
    if read.diameter_mm is not None:
        kept, uncertain = _size_filter(read, attributes, alive)
        record(_size_words(read), alive, kept, uncertain)
        alive = kept
    for name, value in read.excluded:
        if name in ("lobe", "segment", "kind", "density"):
            kept = [i for i in alive if membership(name, value, attributes[i], frame, settings) < 0]
            record(f"not {name} {value}", alive, kept)
            alive = kept
    set_aside: list[int] = []
    if credible is not None:
        kept = [i for i in alive if credible[i]]
        set_aside = [i for i in alive if not credible[i]]
        steps.append({"step": "supported by the scorer or the evidence", "passed": _ids(kept), "uncertain": []})
        for index in alive:
            if index not in kept:
                why.setdefault(index, "set aside: the scorer and the text-conditioned evidence both reject it")
        alive = kept
    if not alive:
        return _not_present(read, attributes, frame, steps, why, settings, set_aside)
    near_ties = settings.get("near_ties", "off") == "scorer"
    return _select(read, attributes, frame, alive, support, selected if near_ties else None, steps, why)


def _open_choice(uncertain: list[int], kept: list[int], support: np.ndarray, needed: float) -> list[int]:
    """Of the candidates too close to call for a filter, those the learned support takes: none when others pass
    clearly, else the best supported one when its support reaches ``needed``."""
    if kept or not uncertain:
        return []
    best = max(uncertain, key=lambda i: support[i])
    return [best] if support[best] >= needed else []


def _near_ties(select: str, order: list[int], values: np.ndarray, selected: np.ndarray | None) -> list[int]:
    """The winner of a superlative (``order[0]``) and the candidates ranked within the targets' generator's margin
    of it (volume ratio under :data:`custom.data.expressions.VOLUME_RATIO`, position within
    :data:`custom.data.expressions.RANK_MARGIN_MM`), when the scorer ``selected`` two or more of them: those; else
    the winner alone. Brightness has no such margin: the winner alone."""
    if selected is None or select in ("brightest", "darkest") or len(order) < 2:
        return order[:1]

    def close(i: int) -> bool:
        if select in ("largest", "smallest"):
            ratio = np.log(max(values[i], 1e-9)) - np.log(max(values[order[0]], 1e-9))
            return abs(ratio) < np.log(VOLUME_RATIO)
        return abs(values[i] - values[order[0]]) < RANK_MARGIN_MM

    tied = [i for i in order if close(i)]
    picked = [i for i in tied if selected[i]]
    return picked if len(picked) >= 2 else order[:1]


def _select(read, attributes, frame, alive, support, selected, steps, why) -> QueryAnswer:
    """Apply the selector to the candidates that passed every filter (``alive``, not empty)."""
    select = read.select
    phrase = describe(read, len(alive))
    tie_broken = False
    if select in RANKS:
        order, values = _ranked(select, attributes, frame, alive)
        start = max((read.ordinal or 1) - 1, 0)
        take = max(read.count or 1, 1)
        chosen = order[start : start + take] if start < len(order) else []
        if start == 0 and take == 1 and (tied := _near_ties(select, order, values, selected)) != chosen:
            chosen, tie_broken = tied, True
        words, unit, _ = RANKS[select]
        label = "closest to the dome" if select == "closest_to_dome" else select.replace("_", " ")
        if read.ordinal and read.ordinal > 1:
            label = f"{_ordinal(read.ordinal)} {label}"
        if not chosen:
            reason = f"there is no {label} {describe(read)}: only {len(order)} {phrase}"
            return QueryAnswer([], steps, reason, reason, False, why)
        rest = [values[i] for i in order if i not in chosen]
        shown = _amounts([values[i] for i in chosen], unit)
        if len(order) == 1:
            explanation = f"the only {describe(read)} (candidate {chosen[0] + 1}, {words} {shown})"
        else:
            explanation = f"{label} of the {len(order)} {phrase}: {words} {shown}"
            explanation += f" against {_amounts(rest, unit)}" if rest else ""
        if tie_broken:
            explanation += "; too close to tell apart by measurement, the ones the scorer picks are taken"
        for index in order:
            why.setdefault(index, f"{label}" if index in chosen else f"passes the filters, not the {label}")
    elif select == "all" or (select == "only" and read.question):
        chosen = list(alive)
        if read.count and len(chosen) > read.count:
            chosen = sorted(chosen, key=lambda i: -support[i])[: read.count]
            tie_broken = True
        volumes = _amounts([float(attributes[i]["volume_ml"]) for i in chosen], "ml")
        listed = _list([str(i + 1) for i in chosen])
        explanation = f"all {len(chosen)} {describe(read, len(chosen))}: candidates {listed} ({volumes})"
        if read.count and read.count != len(chosen):
            explanation += f"; the sentence counts {read.count}"
        for index in alive:
            why.setdefault(index, "passes the filters" if index in chosen else "passes, less supported than the others")
    else:  # a single reference
        chosen = [max(alive, key=lambda i: (support[i], -i))]
        volume = _fmt(float(attributes[chosen[0]]["volume_ml"]), "ml")
        if len(alive) == 1:
            explanation = f"the only {describe(read)}: candidate {chosen[0] + 1} ({volume})"
        else:
            tie_broken = True
            scores = _list([f"{support[i]:.2f}" for i in sorted(alive, key=lambda i: -support[i])])
            explanation = (
                f"{len(alive)} {phrase} pass the filters (candidates {_list([str(i + 1) for i in alive])}); "
                f"the best supported by the scorer and the evidence is candidate {chosen[0] + 1} ({volume}; "
                f"support {scores})"
            )
        for index in alive:
            why.setdefault(index, "the one referred" if index in chosen else "passes, less supported")
    steps.append({"step": f"select {read.select}", "passed": _ids(chosen), "uncertain": []})
    return QueryAnswer(sorted(chosen), steps, explanation, None, tie_broken, why)


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}.get(n, f"{n}th")


def _not_present(read, attributes, frame, steps, why, settings, set_aside: Sequence[int] = ()) -> QueryAnswer:
    """ "not present", with what the liver or the named place holds instead (every candidate), and the candidates
    that passed the filters but were ``set_aside`` (both the scorer and the evidence reject them)."""
    reason = f"no {describe(read)}"
    query = read.query
    place = ("segment", query.segment) if query.segment is not None else ("lobe", query.lobe) if query.lobe else None
    lesions = list(range(len(attributes)))
    by_type = query.kind is not None
    if not lesions:
        context = "no lesion candidate is found in the liver"
    elif place is not None:
        there = [i for i in lesions if membership(*place, attributes[i], frame, {}) > 0]
        where = _place(*place).removeprefix("in ")
        holds = _holding(attributes, there, by_type, settings) if there else "no lesion candidate"
        context = f"{where} holds {holds}"
    else:
        context = f"the liver holds {_holding(attributes, lesions, by_type, settings)}"
    if read.diameter_mm is not None and lesions:
        sizes = _amounts([float(attributes[i].get("longest_axial_diameter_mm", 0)) for i in lesions], "mm")
        context += f"; the lesions measure {sizes}"
    if set_aside:
        listed = _list([str(i + 1) for i in set_aside])
        context += (
            f"; candidate{'s' if len(set_aside) > 1 else ''} {listed} pass{'' if len(set_aside) > 1 else 'es'} the "
            "filters, but the scorer and the text-conditioned evidence both reject "
            f"{'them' if len(set_aside) > 1 else 'it'}"
        )
    explanation = f"{reason}; {context}"
    return QueryAnswer([], steps, explanation, explanation, False, why)
