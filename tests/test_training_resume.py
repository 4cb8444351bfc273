"""Training keeps what it has: a run killed with SIGKILL mid-epoch resumes from its last saved epoch and repeats
exactly the losses of an uninterrupted run with the same seed; the shipped weights are never touched."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from custom.data.synthetic import generate_dataset
from custom.training import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "bundle" / "models" / "model.pt"
EPOCHS = 3
LOSS_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: ([0-9.]+)")


def training_command(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
        "--dataset_dir", str(dataset), "--run_dir", str(run_dir), "--epochs", str(EPOCHS), "--val_interval", "2",
        "--batch_cases", "1", "--slices_per_expression", "2", "--slice_size", "[64, 64]", "--in_plane_spacing", "5.0",
        "--max_val_expressions", "1", *extra,
    ]  # fmt: skip


def losses(log: str) -> dict[tuple[int, int], str]:
    return {(int(e), int(i)): value for e, i, value in LOSS_LINE.findall(log)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_cases=4, seed=3).parent


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_killed_training_resumes_with_the_same_losses_and_leaves_the_shipped_weights(dataset, tmp_path):
    shipped = sha256(SHIPPED)
    full = subprocess.run(training_command(dataset, tmp_path / "full"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)  # fmt: skip
    assert full.returncode == 0, full.stdout[-3000:]
    reference = losses(full.stdout)
    assert sorted({e for e, _ in reference}) == list(range(1, EPOCHS + 1))

    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(training_command(dataset, tmp_path / "killed"), cwd=ROOT, env=ENV, stdout=log,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and process.poll() is None:
            if (2, 1) in losses(log_path.read_text(errors="replace")):  # epoch 1 saved, epoch 2 under way
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = losses(log_path.read_text(errors="replace"))
    assert (2, 1) in killed and (EPOCHS, 1) not in killed, "the run was not killed during epoch 2"
    state = torch.load(tmp_path / "killed" / "models" / STATE_FILE, map_location="cpu", weights_only=False)
    trainer = state["trainer"]  # the last epoch completed before the kill, saved whole
    assert trainer["iteration"] == trainer["epoch_length"] and set(state) >= {"network", "optimizer", "lr_scheduler"}

    again = subprocess.run(training_command(dataset, tmp_path / "killed"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 1 and "--resume true" in again.stdout.strip().splitlines()[-1]

    resumed = subprocess.run(training_command(dataset, tmp_path / "killed", "--resume", "true"), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    after = losses(resumed.stdout)
    assert sorted({e for e, _ in after}) == list(range(2, EPOCHS + 1)), "the resumed run did not start at epoch 2"
    assert after == {key: value for key, value in reference.items() if key[0] >= 2}
    assert (tmp_path / "killed" / "models" / "model.pt").is_file()
    assert sha256(SHIPPED) == shipped
