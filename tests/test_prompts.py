"""Inference inputs: prompt checks and the (image, prompt) lists behind --image, --dataset_dir and --datalist."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from custom.prompts import PromptError, check_prompt, prompt_items

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_is_stripped_and_empty_or_long_prompts_are_refused():
    assert check_prompt("  the largest cyst ") == "the largest cyst"
    with pytest.raises(PromptError, match="empty"):
        check_prompt("   ")
    with pytest.raises(PromptError, match="more than the 32"):
        check_prompt("lesion " * 40)
    with pytest.raises(PromptError, match="must be text"):
        check_prompt(3)


def test_prompt_items_from_image_folder_and_pair_list(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    items = prompt_items(None, "all cysts", dataset_dir=str(tmp_path))
    assert [Path(i["image"]).name for i in items] == ["a.nii.gz", "series"]
    assert all(i["text"] == "all cysts" for i in items)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"image": "a.nii.gz", "prompt": "the smallest lesion"}]))
    assert prompt_items(None, None, datalist=str(pairs)) == [
        {"image": str(tmp_path / "a.nii.gz"), "text": "the smallest lesion"}
    ]
    assert prompt_items(str(tmp_path / "a.nii.gz"), "x")[0]["text"] == "x"


def test_prompt_items_name_the_problem(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        prompt_items(str(tmp_path / "missing.nii.gz"), "a lesion")
    with pytest.raises(PromptError, match="No image given"):
        prompt_items(None, "a lesion")
    with pytest.raises(PromptError, match="holds no .nii"):
        prompt_items(None, "a lesion", dataset_dir=str(tmp_path))
    bad = tmp_path / "pairs.json"
    bad.write_text(json.dumps({"image": "a.nii.gz"}))
    with pytest.raises(PromptError, match="JSON list"):
        prompt_items(None, None, datalist=str(bad))


def test_network_cost_benchmark_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.network_cost", "--sizes", "64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lsms_tiny")]
    assert len(rows) == 1 and float(rows[0].split("|")[2]) > 3.0  # trainable parameters in millions


def test_prompt_items_count_tokens_with_the_networks_tokenizer_and_limit(tmp_path):
    from custom.text import default_text_model_path

    image = tmp_path / "a.nii.gz"
    image.write_bytes(b"")
    path = str(default_text_model_path())
    assert prompt_items(str(image), "the largest cyst", text_model_path=path)[0]["text"] == "the largest cyst"
    with pytest.raises(PromptError, match="more than the 4"):
        prompt_items(str(image), "the largest hypodense lesion in the right lobe", text_model_path=path, max_tokens=4)
