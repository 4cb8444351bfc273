"""Datalist loading, flattening, and named errors for malformed datalists."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.data.datalist import DatalistError, expand_expressions, load_datalist, validate_datalist


def test_load_gives_absolute_existing_paths_and_all_fields(small_dataset):
    data = json.loads(small_dataset.read_text())
    for split in ("training", "validation", "test"):
        cases = load_datalist(small_dataset, split)
        assert [c["case_id"] for c in cases] == [c["case_id"] for c in data[split]]
        for case in cases:
            for key in ("image", "lesions", "liver"):
                assert Path(case[key]).is_absolute() and Path(case[key]).is_file()
            assert case["expressions"] and "lesion_attributes" in case
    with pytest.raises(ValueError, match="there is no split .train."):
        load_datalist(small_dataset, "train")


def test_expand_expressions_gives_one_item_per_expression(small_dataset):
    cases = load_datalist(small_dataset, "training")
    items = expand_expressions(cases)
    assert len(items) == sum(len(c["expressions"]) for c in cases)
    first = items[0]
    assert set(first) == {
        "image",
        "lesions",
        "liver",
        "case_id",
        "text",
        "targets",
        "kind",
        "selector",
        "expression_id",
    }
    assert [item["selector"] for item in items[:3]] == [
        (e.get("query") or {}).get("select", "") for e in cases[0]["expressions"][:3]
    ]
    assert first["text"] == cases[0]["expressions"][0]["text"] and first["case_id"] == cases[0]["case_id"]
    assert all(isinstance(t, int) for item in items for t in item["targets"])
    assert {item["kind"] for item in items} <= {"location", "size", "density", "count", "negative"}
    no_liver = expand_expressions([{k: v for k, v in cases[0].items() if k != "liver"}])
    assert "liver" not in no_liver[0]


@pytest.fixture()
def absolute_datalist(small_dataset):
    """The small dataset's datalist with absolute paths, as a dict to break."""
    data = json.loads(small_dataset.read_text())
    for split in ("training", "validation", "test"):
        for case in data[split]:
            for key in ("image", "lesions", "liver"):
                case[key] = str(small_dataset.parent / case[key])
    return data


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(DatalistError) as info:
        validate_datalist(path)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_valid_datalist_passes(absolute_datalist, tmp_path):
    assert validate_datalist(write(tmp_path, absolute_datalist))["training"]


def test_missing_file_is_named(absolute_datalist, tmp_path):
    case = absolute_datalist["training"][0]
    case["lesions"] = str(tmp_path / "nowhere" / "case.nii.gz")
    message = problems_of(write(tmp_path, absolute_datalist))
    assert f"case '{case['case_id']}'" in message and "lesions file" in message and "not found" in message


def test_relative_paths_start_at_the_datalist_folder(small_dataset, tmp_path):
    data = json.loads(small_dataset.read_text())
    message = problems_of(write(tmp_path, data))  # relative paths now point inside tmp_path
    assert "not found" in message and "relative paths start at the datalist's folder" in message


def test_shape_and_affine_mismatch_are_named(absolute_datalist, tmp_path):
    first, second = absolute_datalist["training"][:2]
    liver = nib.load(first["liver"])
    data = np.asarray(liver.dataobj)
    nib.save(nib.Nifti1Image(data[:-1], liver.affine), str(tmp_path / "short.nii.gz"))
    shifted = liver.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(nib.load(second["lesions"]).dataobj), shifted), str(tmp_path / "moved.nii.gz"))
    first["liver"] = str(tmp_path / "short.nii.gz")
    second["lesions"] = str(tmp_path / "moved.nii.gz")
    message = problems_of(write(tmp_path, absolute_datalist))
    assert (
        f"case '{first['case_id']}'" in message and "liver shape" in message and "differs from image shape" in message
    )
    assert f"case '{second['case_id']}'" in message and "lesions affine differs" in message


def test_absent_target_id_is_named(absolute_datalist, tmp_path):
    case = absolute_datalist["validation"][0]
    case["expressions"][0]["targets"] = [42]
    case["expressions"][0]["kind"] = "size"
    message = problems_of(write(tmp_path, absolute_datalist))
    assert f"case '{case['case_id']}'" in message and "target id(s) [42] do not occur" in message


def test_duplicate_case_ids_and_empty_splits_are_named(absolute_datalist, tmp_path):
    duplicate = copy.deepcopy(absolute_datalist["training"][0])
    absolute_datalist["test"].append(duplicate)
    absolute_datalist["validation"] = []
    message = problems_of(write(tmp_path, absolute_datalist))
    assert f"case '{duplicate['case_id']}'" in message and "duplicate case id" in message
    assert "split 'validation': empty" in message


def test_same_image_under_two_case_ids_is_named(absolute_datalist, tmp_path):
    twin = copy.deepcopy(absolute_datalist["training"][0])
    twin["case_id"] = "twin"
    absolute_datalist["test"].append(twin)
    message = problems_of(write(tmp_path, absolute_datalist))
    assert "case 'twin'" in message and "is also used by case" in message


def test_bad_expression_fields_are_named(absolute_datalist, tmp_path):
    case = absolute_datalist["training"][1]
    case["expressions"][0]["kind"] = "shape"
    case["expressions"][1]["targets"] = "1"
    case["expressions"][2]["text"] = ""
    case["expressions"][3]["targets"], case["expressions"][3]["kind"] = [], "size"
    message = problems_of(write(tmp_path, absolute_datalist))
    where = f"case '{case['case_id']}' (training[1])"
    assert f"{where}, expression 0: 'kind' is 'shape'" in message
    assert f"{where}, expression 1: 'targets' must be a list" in message
    assert f"{where}, expression 2: 'text' is missing or empty" in message
    assert f"{where}, expression 3: kind 'size' does not match targets []" in message


def test_unreadable_datalists_are_named(tmp_path):
    with pytest.raises(DatalistError, match="does not exist"):
        validate_datalist(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"training": [')
    with pytest.raises(DatalistError, match="not valid JSON"):
        validate_datalist(broken)
    with pytest.raises(DatalistError, match="split 'training': missing"):
        validate_datalist(write(tmp_path, {"validation": [], "test": []}))
