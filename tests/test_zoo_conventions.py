"""The bundle folder follows the MONAI model zoo's pre-commit rules and large-file listing, as its CI reads them.

The zoo's ``.pre-commit-config.yaml`` formats JSON with ``pretty-format-json --indent=4 --no-sort-keys``, ends every
file with one newline, strips trailing whitespace (weights excepted) and refuses files over 1024 kB; such files are
listed in ``large_files.yml``, which its CI hands to ``monai.apps.utils.download_url`` (an existing file whose hash
matches is kept, not downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.apps.utils import download_url
from monai.bundle import ConfigParser

from custom.package import LARGE_FILE_BYTES, large_files

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
BINARY_SUFFIXES = (".pt", ".ts", ".gz", ".png", ".nii", ".dcm")
TEXT_FILES = sorted(p for p in BUNDLE.rglob("*") if p.is_file() and not p.name.endswith(BINARY_SUFFIXES))
JSON_FILES = sorted(BUNDLE.rglob("*.json"))


def listed_large_files() -> list[dict]:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "large_files.yml"))
    return parser["large_files"]


def test_large_files_yml_lists_every_file_over_1mb_with_its_current_hash():
    listed = {entry["path"]: entry for entry in listed_large_files()}
    actual = {entry["path"]: entry for entry in large_files(BUNDLE)}
    assert set(listed) == set(actual), "rewrite the list with: python -m custom.package --large_files"
    for path, entry in actual.items():
        assert listed[path]["hash_type"] == "sha256"
        assert listed[path]["hash_val"] == entry["hash_val"], f"{path} changed: python -m custom.package --large_files"
    assert all((BUNDLE / path).stat().st_size > LARGE_FILE_BYTES for path in listed)


def test_the_zoo_download_step_keeps_the_listed_files():
    for entry in listed_large_files():
        path = BUNDLE / entry["path"]
        before = path.stat().st_mtime_ns
        download_url(url=entry["url"], filepath=path, hash_val=entry["hash_val"], hash_type=entry["hash_type"])
        assert path.stat().st_mtime_ns == before


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(BUNDLE)))
def test_json_is_formatted_as_pretty_format_json_writes_it(path):
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=4) + "\n"


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(BUNDLE)))
def test_text_files_end_with_one_newline_and_no_trailing_spaces(path):
    text = path.read_text()
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert not [n for n, line in enumerate(text.splitlines(), 1) if line != line.rstrip()]
