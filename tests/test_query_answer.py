"""The read sentence answered exactly on lesion candidates' measured attributes (custom.referral.answer)."""

from __future__ import annotations

import numpy as np
import pytest

from custom.data.expressions import LesionTable, candidate_queries, render
from custom.data.geometry import LiverFrame
from custom.referral.answer import answer_query, measured_kind
from custom.referral.query import read_query

#: A liver 200 mm wide (x -100..100), 120 mm deep (y -60..60), 140 mm high (z -240..-100): the Cantlie plane lies
#: at x = 100 - 0.55 * 200 = -10 (right lobe: x > -10), the right sector plane at y = -60 + 0.5 * 120 = 0.
FRAME = LiverFrame((-100.0, 100.0), (-60.0, 60.0), (-240.0, -100.0), (20.0, 10.0, -100.0))


def lesion(number, x, y, z, volume, diameter, hu, contrast, kind=None):
    """A candidate's measured attributes (liver at ``hu - contrast`` HU)."""
    return {
        "id": number,
        "kind": kind,
        "centroid_ras_mm": [x, y, z],
        "volume_ml": volume,
        "longest_axial_diameter_mm": diameter,
        "mean_hu": hu,
        "contrast_hu": contrast,
        "density": "hypodense" if contrast <= -15 else "hyperdense" if contrast >= 15 else "isodense",
        "dome_distance_mm": FRAME.dome_distance([x, y, z]),
    }


#: Three hypodense lesions in the right lobe (12.4, 3.1, 0.8 ml), a hypodense cyst in the left lobe, and a hyperdense
#: lesion in the right lobe.
LESIONS = [
    lesion(1, 60.0, 20.0, -150.0, 12.4, 31.0, 50.0, -50.0),  # metastasis (solid, 50 HU)
    lesion(2, 30.0, -30.0, -200.0, 3.1, 19.0, 10.0, -90.0),  # cyst (water)
    lesion(3, 80.0, 10.0, -120.0, 0.8, 11.0, 55.0, -45.0),  # metastasis
    lesion(4, -60.0, 30.0, -160.0, 2.0, 16.0, 8.0, -92.0),  # cyst, left lobe
    lesion(5, 20.0, -40.0, -130.0, 6.0, 24.0, 170.0, 70.0),  # hyperdense, right lobe
]


def answer(text, lesions=LESIONS, **kwargs):
    return answer_query(read_query(text), lesions, FRAME, **kwargs)


def test_largest_of_the_filtered_lesions_with_the_volumes_that_decide_it():
    result = answer("the largest hypodense lesion in the right lobe")
    assert result.chosen == [0]
    assert (
        result.explanation
        == "largest of the 3 hypodense lesions in the right lobe: volume 12.4 ml against 3.1 and 0.8 ml"
    )
    lobe, density = result.steps[0], result.steps[1]
    assert lobe == {"step": "lobe right", "passed": [1, 2, 3, 5], "uncertain": []}
    assert density["passed"] == [1, 2, 3]
    assert result.steps[-1] == {"step": "select largest", "passed": [1], "uncertain": []}


def test_not_present_says_what_the_place_holds_instead():
    result = answer("a hyperdense lesion in the left lobe")
    assert result.chosen == [] and result.reason == result.explanation
    assert result.explanation == "no hyperdense lesion in the left lobe; the left lobe holds 1 hypodense lesion"
    cyst = answer("is there a cyst in segment 8?")  # segment 8 (right, anterior, upper) holds lesions 1 and 3
    assert cyst.chosen == [] and cyst.explanation == "no cyst in segment 8; segment 8 holds 2 metastases"
    size = answer("a 5 cm hyperdense lesion").explanation
    assert size.endswith("1 hyperdense lesion; the lesions measure 31, 19, 11, 16 and 24 mm")


def test_positional_selectors_use_the_patient_frame():
    assert answer("the rightmost lesion").chosen == [2]  # largest RAS x
    assert answer("the leftmost lesion").chosen == [3]
    assert answer("the most anterior lesion").chosen == [3]
    assert answer("the most posterior lesion").chosen == [4]
    assert answer("the uppermost lesion").chosen == [2]
    assert answer("the lowest hypodense lesion").chosen == [1]
    assert answer("the lesion closest to the dome").chosen == [4]  # (20, -40, -130): 56 mm from (20, 10, -100)


def test_ordinal_count_brightness_exclusion_and_size():
    assert answer("the second largest lesion").chosen == [4]
    assert answer("the two largest lesions").chosen == [0, 4]
    assert answer("the brightest lesion").chosen == [4]
    assert answer("the darkest hypodense lesion in the right lobe").chosen == [1]
    assert answer("the largest lesion not in the right lobe").chosen == [3]
    assert answer("the 3 cm lesion").chosen == [0]  # 31 mm
    assert answer("all lesions larger than 2 cm").chosen == [0, 4]
    assert answer("the 5 cm lesion").chosen == []  # 24 and 31 mm are 19 mm or more off
    assert answer("the 3.6 cm lesion").chosen == [0]  # none within 3 mm: the nearest within 8 mm (31 mm)


def test_lesion_type_from_the_label_or_from_the_measured_hounsfield_units():
    assert answer("the cyst in the right lobe").chosen == [1]  # 10 HU: water
    assert answer("all metastases").chosen == [0, 2]
    assert answer("all cysts").chosen == [1, 3]
    assert measured_kind({"mean_hu": 35.0, "contrast_hu": -60.0})["cyst"] == 0  # too close to call
    assert measured_kind({"mean_hu": 150.0, "contrast_hu": 60.0}) == {"cyst": -1, "metastasis": -1, "tumour": 1}
    labelled = [dict(item, kind="cyst") for item in LESIONS[:1]]
    assert answer("the cyst", labelled).chosen == [0]  # a label, where known, is the type


def test_candidates_that_are_no_lesion_never_win_and_support_settles_what_the_query_leaves_open():
    false_positive = lesion(6, 40.0, 0.0, -140.0, 40.0, 50.0, 40.0, -60.0)  # the largest, but not a lesion
    lesions = [*LESIONS, false_positive]
    credible = [True] * 5 + [False]
    result = answer("the largest lesion", lesions, credible=credible)
    assert result.chosen == [0] and "set aside" in result.why[5]
    assert answer("the largest lesion", lesions).chosen == [5]  # without the judgement it would win
    alone = answer("the largest lesion", [false_positive], credible=[False])
    assert alone.chosen == [] and alone.explanation.endswith(
        "candidate 1 passes the filters, but the scorer and the text-conditioned evidence both reject it"
    )
    support = np.array([0.1, 0.2, 1.6, 0.0, 0.0])
    several = answer("the metastasis in the right lobe", support=support)  # two pass: the better supported one
    assert several.chosen == [2] and several.tie_broken and "support" in several.explanation
    assert answer("the three hypodense lesions in the right lobe", support=support).chosen == [0, 1, 2]
    assert answer("the two metastases", support=support).chosen == [0, 2]


def random_lesions(rng: np.random.Generator, count: int) -> list[dict]:
    """``count`` lesions at random places in :data:`FRAME` with random sizes, densities and types."""
    lesions = []
    for number in range(1, count + 1):
        kind = str(rng.choice(["cyst", "metastasis", "hyperdense"]))
        hu, contrast = {"cyst": (10.0, -90.0), "metastasis": (50.0, -50.0), "hyperdense": (170.0, 70.0)}[kind]
        diameter = float(rng.uniform(6, 60))
        point = [rng.uniform(-95, 95), rng.uniform(-55, 55), rng.uniform(-235, -105)]
        lesions.append(lesion(number, *point, diameter**3 * 5e-4, diameter, hu, contrast, kind))
    return lesions


@pytest.mark.parametrize("kind_from", ["label", "measured"])
def test_the_answer_reproduces_the_targets_of_every_clear_cut_query_of_the_grammar(kind_from):
    """Every query the expression grammar makes, rendered to text, read and answered, gives the targets
    custom.data.expressions.evaluate computes from the same attributes (the rules are the same)."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(12):
        lesions = random_lesions(rng, int(rng.integers(1, 6)))
        table = LesionTable(lesions, FRAME)
        seen = [dict(item, kind=None) for item in lesions] if kind_from == "measured" else lesions
        for query in candidate_queries():
            targets = table.evaluate(query)
            if targets is None or (query.select == "all" and len(targets) == 1):
                continue  # not clear-cut; "all" of one lesion renders with a count the grammar does not state
            text, _ = render(query, targets, rng)
            result = answer_query(read_query(text), seen, FRAME)
            assert sorted(lesions[i]["id"] for i in result.chosen) == targets, (text, targets, result.explanation)
            checked += 1
    assert checked > 1000


def test_near_ties_of_a_superlative_go_to_the_scorer_only_when_asked():
    halves = [
        lesion(1, 40.0, 0.0, -150.0, 10.0, 27.0, 10.0, -90.0),
        lesion(2, 45.0, 5.0, -160.0, 9.0, 26.0, 12.0, -88.0),
    ]
    lesions = [*halves, lesion(3, -50.0, 0.0, -150.0, 2.0, 16.0, 10.0, -90.0)]
    selected = [True, True, False]  # a lesion split in two: the scorer picks both halves
    settings = {"near_ties": "scorer"}
    both = answer("the largest cyst", lesions, selected=selected, settings=settings)
    assert both.chosen == [0, 1] and both.tie_broken and "too close to tell apart" in both.explanation
    assert answer("the largest cyst", lesions, selected=selected).chosen == [0]  # off: the measured winner
    assert answer("the largest cyst", lesions, selected=[True, False, False], settings=settings).chosen == [0]
