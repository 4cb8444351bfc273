"""The sentence reader (custom.referral.query): targets on the hand-written sentence file, and focused readings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.query_reading import (
    expected_reading,
    grammar_wordings,
    load_sentences,
    names_other_organ,
    score,
    wording_key,
)
from custom.data.expressions import SELECTORS, Query, candidate_queries, render
from custom.data.paraphrases import paraphrase
from custom.referral.query import READ_SELECTORS, ReadQuery, read_query


@pytest.fixture(scope="module")
def entries():
    return load_sentences()


@pytest.fixture(scope="module")
def result(entries):
    return score(entries)


def test_sentence_file_meets_the_targets(entries, result):
    assert result["count"] >= 260
    assert result["exact"] >= 0.95, result["misses"]
    assert result["organ_all"] >= 0.98, result["misses"]
    assert result["other_count"] >= 50 and result["organ_other"] >= 0.98, result["misses"]
    assert result["neighbour_count"] >= 20 and result["organ_neighbour"] >= 0.98, result["misses"]
    holdout = [e for e in entries if e["batch"] == "holdout"]
    assert len(holdout) >= 50 and score(holdout)["exact"] >= 0.95


def test_the_targets_can_fail(entries):
    """A reader that reads nothing misses the targets by far."""
    blank = score(entries, reader=lambda text: ReadQuery(text=text))
    assert blank["exact"] < 0.2 and blank["organ_other"] == 0.0


def test_sentence_file_covers_every_field(entries):
    expected = [expected_reading(e) for e in entries]
    selects = {x["extra_select"] or x["query"]["select"] for x in expected}
    assert selects >= set(READ_SELECTORS)
    assert {x["query"].get("lobe") for x in expected} >= {"right", "left"}
    assert {x["query"].get("segment") for x in expected} >= set(range(2, 9))
    assert {x["query"].get("kind") for x in expected} >= {"cyst", "metastasis", "tumour"}
    assert {x["query"].get("density") for x in expected} >= {"hypodense", "hyperdense"}
    assert len({x["query"].get("diameter_cm") for x in expected}) >= 5
    assert {x["size_compare"] for x in expected} >= {">", "<"}
    assert {x["count"] for x in expected} >= {2, 3}
    assert sum(x["question"] for x in expected) >= 15
    assert sum(x["negated"] for x in expected) >= 10
    assert sum(x["ordinal"] is not None for x in expected) >= 5
    assert sum(bool(x["unread"]) for x in expected) >= 20
    other = [e for e, x in zip(entries, expected) if x["organ"] != "liver"]
    assert len(other) >= 50 and len({x["organ"] for x in expected}) >= 15
    assert sum(1 for e in other if expected_reading(e)["lesion_word"]) >= 40  # "the splenic cyst", "renal lesion"
    assert sum(1 for e, x in zip(entries, expected) if x["organ"] == "liver" and names_other_organ(e["text"])) >= 20


def test_sentence_file_is_mostly_in_new_wordings(entries):
    wordings = grammar_wordings()
    assert len(wordings) > 10_000
    produced = [e for e in entries if wording_key(e["text"]) in wordings]
    assert 1 - len(produced) / len(entries) >= 0.7
    assert all(e["style"] != "new" for e in produced), [e["text"] for e in produced if e["style"] == "new"]
    # the check recognises the grammars' own wordings
    styled = [e for e in entries if e["style"] != "new"]
    assert sum(wording_key(e["text"]) in wordings for e in styled) >= 0.8 * len(styled)
    sample = render(Query(select="largest", kind="cyst", lobe="left"), [1], np.random.default_rng(3))[0]
    assert wording_key(sample.upper() + "!") in wordings


def test_both_grammars_are_read_as_their_query():
    rng = np.random.default_rng(0)
    for query in candidate_queries(("cyst", "metastasis", "tumour")):
        for targets in ([], [1, 2, 3]) if query.select == "all" else ([], [1]):
            text, stated = render(query, targets, rng)
            read = read_query(text)
            assert (read.query, read.count, read.organ, read.unread) == (query, stated, "liver", ()), text
            said = paraphrase(query.to_dict(), targets, rng)
            read = read_query(said)
            assert (read.query, read.organ, read.unread) == (query, "liver", ()), said


@pytest.mark.parametrize(
    "text, organ",
    [
        ("the splenic cyst", "spleen"),
        ("a nodule in the right lung", "lung"),
        ("renal lesion", "kidney"),
        ("bone metastasis in L2", "bone"),
        ("the pancreatic mass", "pancreas"),
        ("the cerebral metastasis", "brain"),
        ("the intracranial mass", "brain"),
        ("the left adrenal nodule", "adrenal"),
        ("the cholecystic lesion", "gallbladder"),
        ("the duodenal mass", "bowel"),
        ("the gastric lesion", "stomach"),
        ("the nodal mass", "lymph node"),
        ("the pericardial cyst", "heart"),
        ("the vertebral lesion", "bone"),
        ("the rib lesion", "bone"),
        ("the osseous lesion", "bone"),
        ("the lesion in the right upper lobe", "lung"),
        ("the hepatic cyst", "liver"),
        ("the hepatocellular carcinoma", "liver"),
        ("the largest lesion", "liver"),
        ("the cyst in the right lobe", "liver"),
        ("the lesion in segment 6", "liver"),
        ("the liver lesion near the spleen", "liver"),
        ("the renal cyst adjacent to the liver", "kidney"),
    ],
)
def test_organ_words(text, organ):
    assert read_query(text).organ == organ


@pytest.mark.parametrize(
    "text, unread",
    [
        ("a lesion near the gallbladder fossa", ("near the gallbladder fossa",)),
        ("the lesion adjacent to the kidney", ("adjacent to the kidney",)),
        ("the lesion abutting the gallbladder", ("abutting the gallbladder",)),
        ("the lesion in the gallbladder fossa", ("gallbladder fossa",)),
        ("the lesion posterior to the right kidney", ("posterior to the right kidney",)),
        ("the metastasis from a colon primary", ("colon primary",)),
        ("the colorectal metastasis", ("colorectal",)),
        ("the cyst between the stomach and the spleen", ("between the stomach and the spleen",)),
    ],
)
def test_a_neighbour_organ_leaves_the_lesion_in_the_liver_and_is_reported(text, unread):
    read = read_query(text)
    assert read.organ == "liver" and read.in_scope
    assert read.unread == unread and not read.fully_read
    assert read.query.select == "only"  # "posterior to" is a relation, not the most posterior lesion


def test_the_organ_a_lesion_grows_from_is_its_organ():
    assert read_query("the mass arising from the left kidney").organ == "kidney"
    assert read_query("the lesion closest to the top of the liver").unread == ()


@pytest.mark.parametrize(
    "text, segment",
    [
        ("the lesion in S8", 8),
        ("the lesion in s2", 2),
        ("the cyst in seg VII", 7),
        ("the cyst in seg. 3", 3),
        ("the met in segment seven", 7),
        ("the lesion in the seventh segment", 7),
        ("a lesion in Couinaud 6", 6),
        ("the lesion in Couinaud segment V", 5),
        ("the nodule in segment IVb", 4),
        ("segments 6", 6),
        ("the lesion in segment-5", 5),
        ("the S4 metastasis", 4),
        ("the lesion in the left medial segment", 4),
    ],
)
def test_shorthand_segments(text, segment):
    assert read_query(text).query.segment == segment


def test_segments_the_query_cannot_hold():
    caudate = read_query("the lesion in the caudate lobe")
    assert caudate.query.segment is None and any("caudate" in note for note in caudate.notes)
    assert read_query("the lesion in segment 1").query.segment is None
    several = read_query("the lesion in segments 6 and 7")
    assert (several.query.segment, several.query.lobe) == (None, "right") and several.notes
    assert read_query("segment two lesions in the left lobe").count == 2  # the command, not segment 2
    assert read_query("the rib metastasis in S2").query.segment is None  # lobes and segments are liver anatomy


@pytest.mark.parametrize(
    "text, diameter_cm, diameter_mm, compare",
    [
        ("the 2 cm lesion", 2, 20.0, None),
        ("the 2-cm met", 2, 20.0, None),
        ("the 2cm met", 2, 20.0, None),
        ("the 20 mm lesion", 2, 20.0, None),
        ("the 2.5 cm lesion", 3, 25.0, None),
        ("the 4 x 3 cm mass", 4, 40.0, None),
        ("the three-centimetre cyst", 3, 30.0, None),
        ("lesions larger than 2 cm", None, 20.0, ">"),
        ("a cyst under 15 mm", None, 15.0, "<"),
        ("the subcentimetre lesion", None, 10.0, "<"),
        ("the lesion in segment 2", None, None, None),
    ],
)
def test_sizes(text, diameter_cm, diameter_mm, compare):
    read = read_query(text)
    assert (read.query.diameter_cm, read.diameter_mm, read.size_compare) == (diameter_cm, diameter_mm, compare)


@pytest.mark.parametrize(
    "text, select",
    [
        ("the biggest lesion", "largest"),
        ("of the cysts in the right lobe, the biggest one", "largest"),
        ("the larger of the two cysts", "largest"),
        ("the tiniest met", "smallest"),
        ("the topmost lesion", "uppermost"),
        ("the most cephalad lesion", "uppermost"),
        ("the bottom cyst", "lowest"),
        ("the lowest-lying lesion", "lowest"),
        ("the most ventral lesion", "most_anterior"),
        ("the front one", "most_anterior"),
        ("the lesion furthest back", "most_posterior"),
        ("the rightmost lesion", "rightmost"),
        ("the right-most lesion", "rightmost"),
        ("the lesion furthest to the patient's right", "rightmost"),
        ("the lesion on the left", "leftmost"),
        ("the lesion right under the dome", "closest_to_dome"),
        ("the lesion closest to the diaphragm", "closest_to_dome"),
        ("the lesion in the right lobe", "only"),
        ("the solitary cyst", "only"),
        ("all lesions", "all"),
        ("the cysts", "all"),
        ("every met", "all"),
        ("both lesions", "all"),
        ("the brightest lesion", "brightest"),
        ("the most hypodense lesion", "darkest"),
        ("the lesion with the lowest attenuation", "darkest"),
        ("the right-most hypodense lesion", "rightmost"),
    ],
)
def test_selectors(text, select):
    assert read_query(text).select == select


def test_brightness_ordinals_and_counts():
    brightest = read_query("the brightest cyst")
    assert (brightest.query.select, brightest.extra_select, brightest.query.kind) == ("only", "brightest", "cyst")
    second = read_query("the second largest lesion")
    assert (second.query.select, second.ordinal) == ("largest", 2)
    assert read_query("the 2nd lesion from the top").ordinal == 2
    assert read_query("the two largest mets").count == 2
    assert read_query("the larger of the two cysts").count is None
    assert read_query("the three cysts").count == 3
    assert read_query("both cysts").count == 2


def test_negation_and_questions():
    read = read_query("the lesion that is not in the right lobe")
    assert read.negated and dict(read.excluded) == {"lobe": "right"} and read.query.lobe is None
    read = read_query("all lesions other than the cyst")
    assert dict(read.excluded) == {"kind": "cyst"} and read.query == Query(select="all")
    read = read_query("is there a hyperdense lesion in segment 2?")
    assert read.question and read.query == Query(segment=2, density="hyperdense") and not read.negated
    assert read_query("any mets?").question and read_query("Any mets?").query.select == "all"
    assert not read_query("which lesion is the largest?").question
    assert not read_query("could you show me the largest cyst?").question


def test_typos_capitals_and_unread_words():
    read = read_query("the hypodence lesion in segmnet 6")
    assert read.query == Query(segment=6, density="hypodense") and len(read.notes) == 2
    assert read_query("THE LARGEST CYST IN SEGMENT 6!").query == Query(select="largest", kind="cyst", segment=6)
    calcified = read_query("the calcified lesion with a central scar")
    assert calcified.unread == ("calcified", "central scar") and calcified.lesion_word
    nothing = read_query("hello there")
    assert not nothing.lesion_word and nothing.query == Query() and nothing.unread == ("hello",)


def test_result_is_frozen_and_json_ready():
    read = read_query("the second largest hypodense met not in the left lobe, S6?")
    data = json.loads(json.dumps(read.to_dict()))
    assert data["query"] == {"select": "largest", "segment": 6, "kind": "metastasis", "density": "hypodense"}
    assert data["excluded"] == {"lobe": "left"} and data["ordinal"] == 2 and data["question"]
    assert read_query(read.text) == read  # deterministic
    with pytest.raises(AttributeError):
        read.organ = "spleen"
    assert set(READ_SELECTORS) == set(SELECTORS) | {"brightest", "darkest"}
