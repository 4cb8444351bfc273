"""The ablation / baseline study: every variant is a valid override of the bundle configs, and the runner works."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from benchmarks.ablation_study import BASE_EVALUATE, BASE_TRAIN, EVALUATE_CONFIG, TRAIN_CONFIG, VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def parsed(config: str | tuple[str, ...], overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / name) for name in ((config,) if isinstance(config, str) else config)])
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_evaluates_the_same_network(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    train_overrides, evaluate_overrides = VARIANTS[name]
    trained = parsed(TRAIN_CONFIG, {**BASE_TRAIN, **train_overrides}).get_parsed_content("network_def").state_dict()
    evaluated = parsed(EVALUATE_CONFIG, {**BASE_EVALUATE, **evaluate_overrides}).get_parsed_content("network_def")
    evaluated = evaluated.state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in evaluated.items()}


def test_text_free_variants_withhold_text_and_target_every_lesion(monkeypatch):
    monkeypatch.chdir(ROOT)
    train_overrides, evaluate_overrides = VARIANTS["no_text_all_lesions"]
    train = parsed(TRAIN_CONFIG, train_overrides)
    lesions = torch.zeros(1, 4, 4, 2)
    lesions[0, 0, 0, 0], lesions[0, 3, 3, 1] = 1, 2
    target = train.get_parsed_content("train#random_transforms#1")({"lesions": lesions, "targets": [2]})
    assert torch.equal(target["label"], (lesions > 0).float())  # both lesions although the text names one
    batch = {
        "image": torch.zeros(1, 2, 8, 8),
        "label": torch.zeros(1, 1, 8, 8),
        "input_ids": torch.ones(1, 4, dtype=torch.long),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    for prepare_batch in (
        train.get_parsed_content("train#prepare_batch"),
        parsed(EVALUATE_CONFIG, evaluate_overrides).get_parsed_content("prepare_batch"),
    ):
        assert "input_ids" not in prepare_batch(batch)[3]
    unet = parsed(TRAIN_CONFIG, VARIANTS["unet_all_lesions"][0]).get_parsed_content("network_def")
    assert type(unet).__name__ == "UNet"


def test_study_runs_a_variant_end_to_end(tmp_path):
    command = [
        sys.executable,
        "-m",
        "benchmarks.ablation_study",
        "--epochs",
        "1",
        "--max-train-cases",
        "8",
        "--max-expressions",
        "2",
        "--out",
        str(tmp_path),
        "--variants",
        "unet_all_lesions",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "unet_all_lesions" / "test_summary.json").read_text())
    assert summary["overall"]["expressions"] == 2
    assert (tmp_path / "unet_all_lesions" / "model.pt").is_file()
    assert (
        "| unet_all_lesions | 1.63 |" in result.stdout
    )  # trainable parameters of the UNet baseline and "| 3D Dice |" in result.stdout
