"""The referring datalist: loading, validation, one item per expression.

A datalist is a JSON object with case lists under ``training``, ``validation`` and ``test``. A case holds
``image`` and ``lesions`` (instance map: 0 background, 1..K one id per lesion), optionally ``liver``,
``case_id`` and ``lesion_attributes``, and ``expressions``: ``{"text", "targets", "kind"}`` with ``targets`` a
list of lesion ids (empty: no such lesion) and ``kind`` one of ``location``, ``size``, ``density``, ``count``,
``negative``. Relative paths are relative to the folder of the datalist file.

:func:`validate_datalist` reports every problem at once in a :class:`DatalistError` whose lines name the case,
the problem and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data.utils import pickle_hashing

from custom.errors import InputError

from .expressions import EXPRESSION_KINDS

__all__ = [
    "SPLITS",
    "DatalistError",
    "load_datalist",
    "validate_datalist",
    "expand_expressions",
    "read_datalist",
    "file_state_hashing",
]

SPLITS = ("training", "validation", "test")
FILE_KEYS = ("image", "lesions", "liver")
AFFINE_TOLERANCE_MM = 1e-3


class DatalistError(InputError, ValueError):
    """A referring datalist that cannot be used; the message lists each problem with its case and fix."""

    def __init__(self, path, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        if len(self.problems) == 1:
            super().__init__(f"Datalist {path}: {self.problems[0]}.")
            return
        super().__init__(f"Datalist {path} has {len(self.problems)} problem(s):\n  - " + "\n  - ".join(shown) + more)


def read_datalist(path: str | Path) -> dict:
    """Parse the JSON of a datalist, with a clear error when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(
            path,
            [
                "the file does not exist; generate one with 'python -m custom.data.synthetic "
                "--out DIR' or convert a dataset with 'python -m custom.data.convert_lits'"
            ],
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError(path, [f"not valid JSON ({err}); fix the syntax at line {err.lineno}"]) from err
    if not isinstance(data, dict):
        raise DatalistError(
            path, ["the top level must be a JSON object with 'training', 'validation' and 'test' lists"]
        )
    return data


def case_id_of(case: dict, split: str, index: int) -> str:
    """The case's ``case_id``, else the image file name without extension, else its position."""
    if case.get("case_id"):
        return str(case["case_id"])
    image = case.get("image")
    if isinstance(image, str) and image:
        name = Path(image).name
        for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name
    return f"{split}[{index}]"


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _check_expression(where: str, number: int, expression, problems: list[str]) -> list[int]:
    """Check one expression's fields; returns its integer target ids."""
    label = f"{where}, expression {number}"
    if not isinstance(expression, dict):
        problems.append(f"{label}: must be an object with 'text', 'targets' and 'kind'")
        return []
    if not isinstance(expression.get("text"), str) or not expression["text"].strip():
        problems.append(f"{label}: 'text' is missing or empty; give the referring sentence")
    targets = expression.get("targets")
    if not isinstance(targets, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in targets
    ):
        problems.append(
            f"{label}: 'targets' must be a list of positive lesion ids (use [] for 'no such lesion'), got {targets!r}"
        )
        targets = []
    kind = expression.get("kind")
    if kind not in EXPRESSION_KINDS:
        problems.append(f"{label}: 'kind' is {kind!r}; use one of {', '.join(EXPRESSION_KINDS)}")
    elif (kind == "negative") != (not targets):
        problems.append(
            f"{label}: kind {kind!r} does not match targets {targets}; 'negative' is for expressions "
            "with no target, and only for them"
        )
    return list(targets)


def _header(path: Path):
    image = nib.load(str(path))
    return image.shape[:3], image.affine


def _check_files(where: str, case: dict, base: Path, check_targets: bool, targets: set[int], problems: list[str]):
    paths = {}
    for key in FILE_KEYS:
        if key not in case or case[key] in (None, ""):
            if key != "liver":
                problems.append(f"{where}: no '{key}' entry; add the path of the {key} NIfTI file")
            continue
        if not isinstance(case[key], str):
            problems.append(f"{where}: '{key}' must be a file path string, got {type(case[key]).__name__}")
            continue
        path = _resolve(base, case[key])
        if not path.is_file():
            problems.append(
                f"{where}: {key} file '{case[key]}' not found (looked for {path}); fix the path "
                "(relative paths start at the datalist's folder) or regenerate the dataset"
            )
            continue
        paths[key] = path
    if "image" not in paths:
        return
    try:
        headers = {key: _header(path) for key, path in paths.items()}
    except Exception as err:  # nibabel raises several types for unreadable files
        problems.append(f"{where}: cannot read the NIfTI header ({err}); re-export the file")
        return
    shape, affine = headers["image"]
    for key in ("lesions", "liver"):
        if key not in headers:
            continue
        other_shape, other_affine = headers[key]
        if tuple(other_shape) != tuple(shape):
            problems.append(
                f"{where}: {key} shape {tuple(other_shape)} differs from image shape {tuple(shape)}; "
                f"resample the {key} onto the image grid"
            )
        elif not np.allclose(other_affine, affine, atol=AFFINE_TOLERANCE_MM):
            problems.append(
                f"{where}: {key} affine differs from the image affine (orientation, spacing or origin); "
                f"save the {key} with the image's affine"
            )
    if check_targets and targets and "lesions" in paths:
        present = set(np.unique(np.asarray(nib.load(str(paths["lesions"])).dataobj)).astype(int).tolist())
        missing = sorted(targets - present)
        if missing:
            problems.append(
                f"{where}: target id(s) {missing} do not occur in the lesion instance map "
                f"'{case['lesions']}' (ids present: {sorted(present - {0})}); fix the targets or the map"
            )


def _check_case(where: str, case, base: Path, check_files: bool, check_targets: bool, problems: list[str]) -> None:
    if not isinstance(case, dict):
        problems.append(f"{where}: a case must be an object with 'image', 'lesions' and 'expressions'")
        return
    expressions = case.get("expressions")
    targets: set[int] = set()
    if not isinstance(expressions, list):
        problems.append(f"{where}: 'expressions' must be a list of {{'text', 'targets', 'kind'}} objects")
    else:
        for number, expression in enumerate(expressions):
            targets.update(_check_expression(where, number, expression, problems))
    if check_files:
        _check_files(where, case, base, check_targets, targets, problems)


def validate_datalist(
    path: str | Path,
    splits=SPLITS,
    check_files: bool = True,
    check_targets: bool = True,
) -> dict:
    """Check a referring datalist; returns the parsed JSON or raises :class:`DatalistError` listing every problem.

    Checks: JSON shape; each of ``splits`` present and non-empty; unique case ids across all splits (and no
    image used by two cases); expression fields; with ``check_files``, that files exist and that lesion and
    liver masks share the image's shape and affine; with ``check_targets``, that every target id occurs in the
    lesion instance map (reads the maps).
    """
    path = Path(path)
    data = read_datalist(path)
    base = path.parent.absolute()
    problems: list[str] = []
    for split in splits:
        if split not in data:
            problems.append(f"split '{split}': missing; add a '{split}' list of cases")
        elif not isinstance(data[split], list) or not data[split]:
            problems.append(f"split '{split}': empty or not a list; put at least one case in it")
    seen_ids: dict[str, str] = {}
    seen_images: dict[str, str] = {}
    for split in SPLITS:
        cases = data.get(split)
        if not isinstance(cases, list):
            continue
        for index, case in enumerate(cases):
            case_id = case_id_of(case, split, index) if isinstance(case, dict) else f"{split}[{index}]"
            where = f"case '{case_id}' ({split}[{index}])"
            if case_id in seen_ids:
                problems.append(
                    f"{where}: duplicate case id, also in {seen_ids[case_id]}; give every case a unique "
                    "'case_id' (splits are by case)"
                )
            seen_ids.setdefault(case_id, f"{split}[{index}]")
            if isinstance(case, dict) and isinstance(case.get("image"), str):
                image = str(_resolve(base, case["image"]).resolve())
                if image in seen_images and seen_images[image] != case_id:
                    problems.append(
                        f"{where}: image '{case['image']}' is also used by case '{seen_images[image]}'; "
                        "a patient must appear in one case only"
                    )
                seen_images.setdefault(image, case_id)
            _check_case(where, case, base, check_files and split in splits, check_targets, problems)
    if problems:
        raise DatalistError(path, problems)
    return data


def load_datalist(
    path: str | Path, split: str = "training", validate: bool = True, check_targets: bool = True
) -> list[dict]:
    """Cases of one split with absolute file paths and a ``case_id``, validated first.

    Each item keeps every field of the case (``expressions``, ``lesion_attributes`` ...); ``image``,
    ``lesions`` and ``liver`` become absolute paths.
    """
    if split not in SPLITS:
        raise DatalistError(path, [f"there is no split '{split}'; pass --split with one of {', '.join(SPLITS)}"])
    path = Path(path)
    data = validate_datalist(path, splits=(split,), check_targets=check_targets) if validate else read_datalist(path)
    base = path.parent.absolute()
    items = []
    for index, case in enumerate(data.get(split) or []):
        item = dict(case)
        item["case_id"] = case_id_of(case, split, index)
        for key in FILE_KEYS:
            if item.get(key):
                item[key] = str(_resolve(base, item[key]))
        items.append(item)
    return items


def expand_expressions(cases: list[dict]) -> list[dict]:
    """One flat item per (case, expression).

    Keys: ``image``, ``lesions``, ``liver`` (when the case has one), ``case_id``, ``text``, ``targets`` (list of
    int), ``kind``, ``selector`` (the ``select`` of the expression's ``query`` when it has one: ``largest``,
    ``leftmost``, ``all``, ``only`` ...; ``""`` otherwise) and ``expression_id`` (the expression's ``id`` or
    ``<case_id>-<n>``).
    """
    items = []
    for case in cases:
        for number, expression in enumerate(case.get("expressions") or []):
            item = {key: case[key] for key in ("image", "lesions", "liver") if case.get(key)}
            item.update(
                case_id=case.get("case_id", ""),
                text=expression["text"],
                targets=[int(t) for t in expression["targets"]],
                kind=expression["kind"],
                selector=str((expression.get("query") or {}).get("select", "")),
                expression_id=expression.get("id", f"{case.get('case_id', '')}-{number:02d}"),
            )
            items.append(item)
    return items


def shuffle_texts(items: list[dict], seed: int | None) -> list[dict]:
    """Give each (case, expression) item the text of an item from another case (targets unchanged).

    The "shuffled text" control of the evaluation: a model that reads the text should lose accuracy. ``seed=None``
    returns ``items`` unchanged. With a single case the texts are permuted within it.
    """
    if seed is None:
        return items
    rng = np.random.default_rng(seed)
    shuffled = []
    for item in items:
        others = [o for o in items if o["case_id"] != item["case_id"]] or items
        donor = others[int(rng.integers(len(others)))]
        shuffled.append({**item, "text": donor["text"]})
    return shuffled


def file_state_hashing(item: dict) -> bytes:
    """Cache key of a datalist case for MONAI's ``PersistentDataset``: the case itself and the size and modification
    time of each of its files, so that a file replaced under the same path (a re-imported dataset) is read again
    instead of its stale cached crop."""
    stamps = {}
    for key in FILE_KEYS:
        value = item.get(key)
        if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
            status = os.stat(value)
            stamps[key] = [status.st_size, status.st_mtime_ns]
    return pickle_hashing({"case": item, "files": stamps})
