"""Fine-tuning on a user's labelled CT: the disk cache of training crops, held-out test cases at import, the
fine-tune command (training, referral, comparison) and publishing its model with its scorer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.data.datalist import file_state_hashing, load_datalist
from custom.data.import_labelled import DatasetImportError, held_out_splits, import_labelled
from custom.data.synthetic import generate_dataset
from custom.errors import InputError
from custom.fine_tune import FineTuneError, check_dataset, compare, format_comparison
from custom.training import SCORER_FILE, check_dataset_cache, publish_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TINY = ["--batch_cases", "2", "--slices_per_expression", "2", "--max_val_expressions", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_cases=4, seed=3).parent


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_dataset_cache_accepts_memory_and_disk_and_refuses_anything_else():
    assert check_dataset_cache("memory") and check_dataset_cache("disk")
    with pytest.raises(InputError, match="--dataset_cache is 'ram'.*--dataset_cache disk"):
        check_dataset_cache("ram")


def test_file_state_hash_changes_when_a_file_is_replaced_under_the_same_path(tmp_path):
    image = tmp_path / "ct.nii"  # uncompressed: the same size before and after, only the modification time differs
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), image)
    case = {"image": str(image), "case_id": "a"}
    before, size = file_state_hashing(case), image.stat().st_size
    assert file_state_hashing(dict(case)) == before
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), image)  # same size, other values
    os.utime(image, ns=(1, 1))  # a different modification time even on a coarse clock
    assert image.stat().st_size == size
    assert file_state_hashing(case) != before
    assert file_state_hashing({**case, "case_id": "b"}) != file_state_hashing(case)


def test_disk_cache_writes_one_crop_per_training_case_in_the_run_folder(dataset, tmp_path):
    result = run(
        "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
        "--dataset_dir", str(dataset), "--run_dir", str(tmp_path / "run"), "--epochs", "1", "--val_interval", "1",
        *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    crops = list((tmp_path / "run" / "training_crops").glob("*/*.pt"))
    assert len(crops) == len(load_datalist(dataset / "datalist.json", "training"))
    crop = torch.load(crops[0], weights_only=False)
    assert crop["image"].shape[1:3] == (192, 128)  # the liver-centred crop, not the whole volume
    assert (tmp_path / "run" / "models" / "model.pt").is_file()


def test_held_out_splits_keep_the_named_cases_as_test():
    ids = [f"case_{i}" for i in range(6)]
    splits = held_out_splits(ids, ["case_1", "case_4"], seed=0, fractions=(0.75, 0.125, 0.125))
    assert splits["test"] == ["case_1", "case_4"]
    assert sorted(splits["training"] + splits["validation"]) == ["case_0", "case_2", "case_3", "case_5"]
    assert splits["training"] and splits["validation"]
    with pytest.raises(DatasetImportError, match="case_9.*not an imported case"):
        held_out_splits(ids, ["case_9"], seed=0, fractions=(0.75, 0.125, 0.125))
    with pytest.raises(DatasetImportError, match="leaves 1 case"):
        held_out_splits(ids, ids[:5], seed=0, fractions=(0.75, 0.125, 0.125))


def msd_folder(dataset: Path, out: Path) -> list[str]:
    """The cases of a generated dataset as an MSD Task03 folder (1 liver, 2 tumour); returns the case ids."""
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    ids = []
    for split in ("training", "validation", "test"):
        for case in load_datalist(dataset / "datalist.json", split):
            liver = nib.load(case["liver"])
            label = (np.asarray(liver.dataobj) > 0).astype(np.uint8)
            label[np.asarray(nib.load(case["lesions"]).dataobj) > 0] = 2
            shutil.copyfile(case["image"], out / "imagesTr" / f"{case['case_id']}.nii.gz")
            nib.save(nib.Nifti1Image(label, liver.affine), out / "labelsTr" / f"{case['case_id']}.nii.gz")
            ids.append(case["case_id"])
    return ids


def test_import_with_test_cases_holds_them_out_and_refuses_unknown_ones_before_reading(dataset, tmp_path):
    ids = msd_folder(dataset, tmp_path / "msd")
    with pytest.raises(DatasetImportError, match="--test-cases names nobody"):
        import_labelled(tmp_path / "msd", tmp_path / "refused", layout="msd", progress=False, test_cases=["nobody"])
    assert not (tmp_path / "refused").exists()
    datalist, report = import_labelled(tmp_path / "msd", tmp_path / "ds", layout="msd", progress=False,
                                       test_cases=[ids[0]])  # fmt: skip
    assert [case["case_id"] for case in load_datalist(datalist, "test")] == [ids[0]]
    assert {case["case_id"]: case["split"] for case in report["cases"]}[ids[0]] == "test"


def test_fine_tune_refuses_a_folder_without_a_datalist_and_a_used_run_folder(dataset, tmp_path):
    with pytest.raises(FineTuneError, match="has no datalist.json.*import_labelled"):
        check_dataset(tmp_path)
    assert check_dataset(dataset) == {"training": 2, "validation": 1, "test": 1}
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    result = run("-m", "custom.fine_tune", "--dataset_dir", str(dataset), "--run_dir", str(tmp_path / "used"))
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1].startswith("error: --run_dir")
    assert "--resume true" in result.stdout.strip().splitlines()[-1]


def test_comparison_says_better_only_on_a_higher_3d_dice():
    initial = {"dice_3d": 0.5, "mIoU": 0.4, "false_positives_per_case": 2.0, "expressions": 10}
    tuned = {"dice_3d": 0.6, "mIoU": 0.3, "false_positives_per_case": 1.0, "expressions": 10}
    assert compare(initial, tuned)["better"] and not compare(tuned, initial)["better"]
    table = format_comparison(compare(initial, tuned))
    assert "dice_3d" in table and "fine-tuned pair: better" in table
    assert "false_positives_per_case      2.0000      1.0000 +" in table  # fewer false positives is better


def test_fine_tune_trains_scores_compares_and_publishes_the_pair(dataset, tmp_path):
    run_dir = tmp_path / "fine_tune"
    result = run(
        "-m", "custom.fine_tune", "--dataset_dir", str(dataset), "--run_dir", str(run_dir), "--epochs", "1",
        "--referral_epochs", "1", "--replay_cases", "0", "--cache_dir", str(tmp_path / "cache"), *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert comparison["cases"] == {"training": 2, "validation": 1, "test": 1}
    for name in ("initial", "fine_tuned"):
        assert comparison[name]["expressions"] == len(
            load_datalist(dataset / "datalist.json", "test")[0]["expressions"]
        )
    assert comparison["better"] == (comparison["fine_tuned"]["dice_3d"] > comparison["initial"]["dice_3d"])
    assert "fine-tuned pair:" in result.stdout and "publish it" in result.stdout
    assert not (run_dir / "training_crops").exists()  # the crops of the training step are a cache, removed after it

    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "bundle" / "configs", bundle / "configs")
    shutil.copytree(ROOT / "bundle" / "models", bundle / "models")
    publish_weights(run_dir, bundle)
    for name in ("model.pt", SCORER_FILE):
        assert (bundle / "models" / name).read_bytes() == (run_dir / "models" / name).read_bytes()
        assert len(list((run_dir / "models" / "replaced").glob(f"{Path(name).stem}-*.pt"))) == 1


def test_publish_refuses_a_scorer_not_trained_for_the_run_model_and_writes_nothing(tmp_path):
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    (run_dir / "models").mkdir(parents=True)
    shutil.copytree(ROOT / "bundle" / "configs", bundle / "configs")
    shutil.copytree(ROOT / "bundle" / "models", bundle / "models")
    shutil.copyfile(ROOT / "bundle" / "models" / "model.pt", run_dir / "models" / "model.pt")
    scorer = torch.load(ROOT / "bundle" / "models" / SCORER_FILE, weights_only=True)
    scorer["segmentation_sha256"] = "0" * 64  # trained for other weights
    torch.save(scorer, run_dir / "models" / SCORER_FILE)
    before = {p.name: p.read_bytes() for p in (bundle / "models").iterdir() if p.is_file()}
    with pytest.raises(InputError, match="not trained on the candidates of the run's model.*--checkpoint"):
        publish_weights(run_dir, bundle)
    assert {p.name: p.read_bytes() for p in (bundle / "models").iterdir() if p.is_file()} == before
