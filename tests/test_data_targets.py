"""Every generated expression's targets match the geometry, recomputed here from the NIfTI files alone.

The recomputation below shares no code with custom.data.geometry / expressions: only the documented region
fractions and density threshold (the specification) are imported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine
from scipy.spatial.distance import pdist

from custom.data import geometry as spec
from custom.data.convert_lits import convert_lits
from custom.data.synthetic import generate_dataset

ROMAN = {2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}
NUMBERS = {"two": 2, "both": 2, "three": 3, "four": 4, "five": 5, "six": 6}
SELECT_WORDS = {
    "largest": ("largest", "biggest"),
    "smallest": ("smallest", "tiniest"),
    "uppermost": ("uppermost", "superior", "highest", "cranial"),
    "lowest": ("lowest", "inferior", "caudal"),
    "most_anterior": ("anterior", "frontmost", "ventral"),
    "most_posterior": ("posterior", "dorsal", "rearmost"),
    "rightmost": ("right",),
    "leftmost": ("left",),
    "closest_to_dome": ("dome",),
}
KIND_WORDS = {"cyst": ("cyst",), "metastasis": ("metasta",), "tumour": ("tumour", "solid")}
DENSITY_WORDS = {
    "hypodense": ("hypodense", "low-density", "hypoattenuating"),
    "hyperdense": ("hyperdense", "high-density", "hyperattenuating", "bright"),
}


def boundary(section: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with at least one 4-neighbour outside it."""
    padded = np.pad(section, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return section & ~inner


def axial_diameter(mask: np.ndarray, affine: np.ndarray) -> float:
    """Largest distance between pixel corners on any axial section, in world millimetres."""
    axis = int(np.argmax(np.abs(affine[2, :3])))
    plane = [a for a in range(3) if a != axis]
    best = 0.0
    for k in np.unique(np.nonzero(mask)[axis]):
        pixels = np.argwhere(boundary(np.take(mask, k, axis=axis)))
        ijk = np.zeros((len(pixels), 3))
        ijk[:, plane] = pixels
        ijk[:, axis] = k
        centres = apply_affine(affine, ijk)[:, :2]
        corners = np.concatenate(
            [centres + 0.5 * (a * affine[:2, plane[0]] + b * affine[:2, plane[1]]) for a in (-1, 1) for b in (-1, 1)]
        )
        best = max(best, float(pdist(corners).max()))
    return best


def region(centroid, low, high) -> tuple[str, int]:
    """(lobe, segment) of a RAS point from the liver bounding box, as documented in custom.data.geometry."""
    lateral = (high[0] - centroid[0]) / (high[0] - low[0])  # +x is the patient's right
    vertical = (centroid[2] - low[2]) / (high[2] - low[2])
    anterior = (centroid[1] - low[1]) / (high[1] - low[1])
    if lateral < spec.CANTLIE_FRACTION:
        upper, front = vertical >= spec.PORTAL_FRACTION, anterior >= spec.RIGHT_SECTOR_FRACTION
        return "right", {(True, True): 8, (True, False): 7, (False, True): 5, (False, False): 6}[(upper, front)]
    if lateral < spec.FALCIFORM_FRACTION:
        return "left", 4
    return "left", 2 if vertical >= spec.LEFT_PORTAL_FRACTION else 3


def measure_case(case: dict, base: Path) -> dict[int, dict]:
    """Facts of every lesion of a case, straight from its NIfTI files."""
    lesions_image = nib.load(str(base / case["lesions"]))
    affine = lesions_image.affine
    lesions = np.asarray(lesions_image.dataobj).astype(int)
    liver = np.asarray(nib.load(str(base / case["liver"])).dataobj) > 0
    hu = np.asarray(nib.load(str(base / case["image"])).dataobj, dtype=float)
    liver_points = apply_affine(affine, np.argwhere(liver))
    low, high = liver_points.min(0), liver_points.max(0)
    dome = liver_points[liver_points[:, 2] > high[2] - 1e-3].mean(0)
    liver_hu = np.median(hu[liver & (lesions == 0)])
    facts = {}
    for lesion_id in np.unique(lesions[lesions > 0]):
        mask = lesions == lesion_id
        centroid = apply_affine(affine, np.argwhere(mask)).mean(0)
        lobe, segment = region(centroid, low, high)
        facts[int(lesion_id)] = {
            "centroid": centroid,
            "volume": mask.sum() * abs(np.linalg.det(affine[:3, :3])),
            "diameter": axial_diameter(mask, affine),
            "mean_hu": hu[mask].mean(),
            "contrast": hu[mask].mean() - liver_hu,
            "dome": float(np.linalg.norm(centroid - dome)),
            "lobe": lobe,
            "segment": segment,
        }
    return facts


def passes(fact: dict, kind: str, query: dict) -> bool:
    if "lobe" in query and fact["lobe"] != query["lobe"]:
        return False
    if "segment" in query and fact["segment"] != query["segment"]:
        return False
    if "kind" in query and kind != query["kind"]:
        return False
    if query.get("density") == "hypodense" and not fact["contrast"] <= -spec.DENSITY_THRESHOLD_HU:
        return False
    if query.get("density") == "hyperdense" and not fact["contrast"] >= spec.DENSITY_THRESHOLD_HU:
        return False
    if "diameter_cm" in query and not abs(fact["diameter"] - 10 * query["diameter_cm"]) <= 5:
        return False
    return True


RANK_KEYS = {
    "largest": lambda f: f["volume"],
    "smallest": lambda f: -f["volume"],
    "uppermost": lambda f: f["centroid"][2],
    "lowest": lambda f: -f["centroid"][2],
    "most_anterior": lambda f: f["centroid"][1],
    "most_posterior": lambda f: -f["centroid"][1],
    "rightmost": lambda f: f["centroid"][0],
    "leftmost": lambda f: -f["centroid"][0],
    "closest_to_dome": lambda f: -f["dome"],
}


def expected_targets(query: dict, facts: dict[int, dict], kinds: dict[int, str]) -> list[int]:
    chosen = [i for i in sorted(facts) if passes(facts[i], kinds[i], query)]
    select = query.get("select", "only")
    if select in ("only", "all") or not chosen:
        return chosen
    return [max(chosen, key=lambda i: RANK_KEYS[select](facts[i]))]


def check_text(text: str, query: dict, targets: list[int]) -> None:
    """The sentence names what the query means."""
    if "lobe" in query:
        assert f"{query['lobe']} " in text and "lobe" in text, (text, query)
    if "segment" in query:
        assert re.search(rf"segment ({query['segment']}|{ROMAN[query['segment']]})\b", text), (text, query)
    if "kind" in query:
        assert any(w in text for w in KIND_WORDS[query["kind"]]), (text, query)
    if "density" in query:
        assert any(w in text for w in DENSITY_WORDS[query["density"]]), (text, query)
    if "diameter_cm" in query:
        assert f"{query['diameter_cm']} cm" in text, (text, query)
    if query.get("select", "only") in SELECT_WORDS:
        assert any(w in text for w in SELECT_WORDS[query["select"]]), (text, query)
    if "stated_count" in query:
        stated = [NUMBERS[w] for w in re.findall(r"\b(two|both|three|four|five|six)\b", text)]
        assert stated == [len(targets)], (text, targets)


def check_datalist(path: Path, kind_of) -> dict:
    """Assert every expression of a datalist against the recomputed geometry; returns coverage counters."""
    data = json.loads(path.read_text())
    seen = {"selects": set(), "kinds": set(), "expressions": 0, "lesions": 0}
    for split in ("training", "validation", "test"):
        for case in data[split]:
            facts = measure_case(case, path.parent)
            kinds = {a["id"]: kind_of(a, facts) for a in case["lesion_attributes"]}
            assert sorted(kinds) == sorted(facts), case["case_id"]
            seen["lesions"] += len(facts)
            for expression in case["expressions"]:
                query, targets = expression["query"], expression["targets"]
                assert targets == expected_targets(query, facts, kinds), (case["case_id"], expression)
                assert (expression["kind"] == "negative") == (not targets), expression
                check_text(expression["text"], query, targets)
                seen["selects"].add(query.get("select", "only"))
                seen["kinds"].add(expression["kind"])
                seen["expressions"] += 1
    return seen


@pytest.fixture(scope="module")
def coverage_dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("coverage") / "data", num_cases=10, seed=5)


def test_synthetic_targets_match_recomputed_geometry(small_dataset, coverage_dataset):
    seen = {"selects": set(), "kinds": set(), "expressions": 0}
    for path in (small_dataset, coverage_dataset):
        result = check_datalist(path, lambda attributes, facts: attributes["kind"])
        seen["selects"] |= result["selects"]
        seen["kinds"] |= result["kinds"]
        seen["expressions"] += result["expressions"]
    assert seen["kinds"] == {"location", "size", "density", "count", "negative"}
    assert len(seen["selects"]) >= 8, seen["selects"]
    assert seen["expressions"] > 100


def test_synthetic_lesion_kinds_look_like_their_kind_on_ct(coverage_dataset):
    data = json.loads(coverage_dataset.read_text())
    for case in data["training"] + data["validation"] + data["test"]:
        facts = measure_case(case, coverage_dataset.parent)
        for attributes in case["lesion_attributes"]:
            fact = facts[attributes["id"]]
            if attributes["kind"] == "cyst" and fact["volume"] > 500:  # above ~1 cm: little partial volume
                assert fact["mean_hu"] < 30, fact
            elif attributes["kind"] == "hyperdense":
                assert fact["contrast"] > 20, fact
            elif attributes["kind"] == "metastasis":
                assert fact["contrast"] < -10 and fact["mean_hu"] > 20, fact


def test_converted_targets_match_recomputed_geometry(lits_folder, tmp_path):
    folder, _ = lits_folder
    path = convert_lits(folder, tmp_path / "converted")

    def kind_from_hu(attributes, facts):  # the converter's documented rule, from the recomputed mean HU
        mean = facts[attributes["id"]]["mean_hu"]
        return "cyst" if mean <= 15 else "tumour" if mean >= 25 else "indeterminate"

    seen = check_datalist(path, kind_from_hu)
    assert seen["expressions"] > 10 and seen["lesions"] >= 3
