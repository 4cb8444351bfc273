"""Training and publishing never destroy what they do not own.

- A training run folder must be a folder of its own: ``check_run_dir`` refuses the filesystem root, the user's
  home, the checkout (or a folder containing it) and anything inside the bundle or its code, before anything is
  created, also through the real command line (``python -m monai.bundle run training ...``).
- ``python -m custom.training publish`` keeps every model it replaces in the run folder, under a name of its own
  that is never overwritten; publishing the weights that are shipped already changes nothing; a run without a model
  is refused with a message naming publish's own options.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom import training
from custom.training import RunFolderError, check_run_dir, publish_weights, unsafe_folder_reason

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FIX = "--run_dir runs/<name>"
KEPT_NAME = re.compile(r"model-\d{8}T\d{6}Z-([0-9a-f]{12})(-\d+)?\.pt")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (empty if it does not exist)."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- training run folder
def bad_run_dirs(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Run folders that training must refuse, by kind (the home folder is a temporary one, through HOME)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "link").symlink_to(ROOT / "bundle")
    return {
        "filesystem root": Path("/"),
        "home": home,
        "checkout": ROOT,
        "folder containing the checkout": ROOT.parent,
        "shipped models": ROOT / "bundle" / "models",
        "bundle": ROOT / "bundle",
        "code": ROOT / "custom" / "run",
        "symlink into the bundle": tmp_path / "link" / "models",
    }


KINDS = [
    "filesystem root",
    "home",
    "checkout",
    "folder containing the checkout",
    "shipped models",
    "bundle",
    "code",
    "symlink into the bundle",
]


@pytest.mark.parametrize("kind", KINDS)
def test_check_run_dir_refuses_a_folder_that_is_not_the_runs_own(kind, tmp_path, monkeypatch):
    run_dir = bad_run_dirs(tmp_path, monkeypatch)[kind]
    with pytest.raises(RunFolderError, match=re.escape(FIX)) as raised:
        check_run_dir(f"{run_dir}/models", False, run_dir=str(run_dir), output_dir=f"{run_dir}/logs")
    assert str(raised.value).startswith(f"--run_dir '{run_dir}' ")
    assert unsafe_folder_reason(run_dir) is not None


def test_check_run_dir_without_run_dir_checks_the_checkpoint_folders_parent():
    """multi_gpu_train.json calls it with the checkpoint folder only."""
    with pytest.raises(RunFolderError, match="bundle's own files"):
        check_run_dir(ROOT / "bundle" / "models" / "models")
    with pytest.raises(RunFolderError, match="--ckpt_dir"):
        check_run_dir(ROOT / "custom" / "models", run_dir=ROOT / "runs" / "x")


def test_check_run_dir_accepts_a_folder_of_the_runs_own_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "first"
    assert check_run_dir(run_dir / "models", "false", run_dir=run_dir, output_dir=run_dir / "logs") is False
    assert unsafe_folder_reason(ROOT / "runs" / "training") is None
    assert not (tmp_path / "runs").exists()


def test_in_a_packaged_bundle_its_shipped_folders_are_refused_and_runs_are_not(tmp_path):
    packaged = tmp_path / "lsms"
    for name in ("configs", "models", "docs", "sample", "custom"):
        (packaged / name).mkdir(parents=True)
    assert "own files" in unsafe_folder_reason(packaged / "models", root=packaged)
    assert "checkout" in unsafe_folder_reason(packaged, root=packaged)
    assert unsafe_folder_reason(packaged / "runs" / "training", root=packaged) is None


#: Real command-line runs (about 5 s each, run together).
CLI_KINDS = ["shipped models", "checkout", "home", "symlink into the bundle"]


def test_training_command_refuses_a_bad_run_dir_before_creating_anything(tmp_path, monkeypatch):
    """``python -m monai.bundle run training --run_dir <bad>``: exit 1, the fix on the last stderr line, and no
    logs/ or models/ folder (nor anything else) created in the refused folder."""
    folders = bad_run_dirs(tmp_path, monkeypatch)
    for kind in CLI_KINDS:  # the check itself first, so that a broken check never lets training write there
        assert unsafe_folder_reason(folders[kind]) is not None, kind
    empty = tmp_path / "no_dataset"
    empty.mkdir()
    env = {**os.environ, **ENV}
    before = {kind: digest_tree(folders[kind]) for kind in CLI_KINDS if kind != "checkout"}  # not all of .venv
    new = {
        kind: [folders[kind] / n for n in ("logs", "models") if not (folders[kind] / n).exists()] for kind in CLI_KINDS
    }
    try:
        processes = {
            kind: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "monai.bundle",
                    "run",
                    "training",
                    "--config_file",
                    "bundle/configs/train.json",
                    "--run_dir",
                    str(folders[kind]),
                    "--dataset_dir",
                    str(empty),
                    "--epochs",
                    "1",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for kind in CLI_KINDS
        }
        for kind, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert process.returncode == 1, (kind, stderr[-3000:])
            assert lines[-1].startswith(f"error: --run_dir '{folders[kind]}' ") and lines[-1].endswith(f"{FIX}."), (
                kind,
                stderr[-3000:],
            )
            assert "Traceback" not in stderr + stdout
            if kind in before:
                assert digest_tree(folders[kind]) == before[kind], f"{kind}: a refused run wrote files"
            assert not [p for p in new[kind] if p.exists()], f"{kind}: a refused run created folders"
    finally:  # only what a refused run must not have created
        for paths in new.values():
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ publish
def weights(path: Path, value: float) -> Path:
    """A small weights file (a state dict of tensors) whose content depends on ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"layer.weight": torch.full((4,), value)}, path)
    return path


@pytest.fixture()
def bundle(tmp_path) -> Path:
    """A bundle folder with shipped weights of value 1."""
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / "metadata.json").write_text("{}\n")
    weights(folder / "models" / "model.pt", 1.0)
    return folder


def publish(run_dir: Path, bundle: Path) -> int:
    return training.main(["publish", "--run_dir", str(run_dir), "--bundle_dir", str(bundle)])


def kept_models(run_dir: Path) -> dict[str, str]:
    """{file name: sha256} of the models kept in ``run_dir``."""
    folder = run_dir / "models" / "replaced"
    return {p.name: sha256(p) for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_publishing_a_run_twice_keeps_the_model_it_replaced(bundle, tmp_path, caplog):
    shipped = sha256(bundle / "models" / "model.pt")
    run = tmp_path / "runs" / "a"
    model = weights(run / "models" / "model.pt", 2.0)
    with caplog.at_level("WARNING"):
        assert publish(run, bundle) == 0
    kept = kept_models(run)
    assert list(kept.values()) == [shipped]
    name = next(iter(kept))
    assert KEPT_NAME.fullmatch(name) and KEPT_NAME.fullmatch(name).group(1) == shipped[:12]
    assert str(run / "models" / "replaced" / name) in caplog.text, "publish does not say where the replaced model is"
    assert sha256(bundle / "models" / "model.pt") == sha256(model)

    caplog.clear()
    with caplog.at_level("WARNING"):
        assert publish(run, bundle) == 0  # the same weights again
    assert "nothing was changed" in caplog.text
    assert kept_models(run) == kept, "publishing the shipped weights again changed the kept models"
    assert sha256(bundle / "models" / "model.pt") == sha256(model)

    other = tmp_path / "runs" / "b"
    weights(other / "models" / "model.pt", 3.0)
    assert publish(other, bundle) == 0
    assert list(kept_models(other).values()) == [sha256(model)]
    assert kept_models(run) == kept


def test_a_kept_model_is_never_overwritten(bundle, tmp_path, monkeypatch):
    shipped = sha256(bundle / "models" / "model.pt")
    monkeypatch.setattr(training, "_utc_stamp", lambda: "20250101T000000Z")
    run = tmp_path / "run"
    weights(run / "models" / "model.pt", 2.0)
    taken = run / "models" / "replaced" / f"model-20250101T000000Z-{shipped[:12]}.pt"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"a file that happens to have the name\n")
    publish_weights(run, bundle)
    assert taken.read_bytes() == b"a file that happens to have the name\n"
    assert kept_models(run)[f"model-20250101T000000Z-{shipped[:12]}-2.pt"] == shipped


@pytest.mark.parametrize("content", [None, b"not weights\n"], ids=["no model", "not a weights file"])
def test_publishing_a_run_without_a_model_names_publishs_own_options(content, bundle, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    if content is not None:
        (run / "models" / "model.pt").write_bytes(content)
    before = digest_tree(bundle)
    assert publish(run, bundle) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--run_dir" in last and "--checkpoint" not in last, last
    assert digest_tree(bundle) == before and kept_models(run) == {}


def test_publishing_into_a_folder_that_is_not_a_bundle_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    weights(run / "models" / "model.pt", 2.0)
    assert publish(run, tmp_path / "nowhere") == 1
    assert (
        "--bundle_dir (bundle in the repository, . inside a packaged bundle)"
        in capsys.readouterr().err.strip().splitlines()[-1]
    )
    assert not (tmp_path / "nowhere").exists()


def test_a_schedule_without_validation_is_warned_about(caplog):
    from custom.training import check_schedule

    with caplog.at_level("WARNING", logger="custom.training"):
        assert not check_schedule(2, 28)
    assert "no validation runs" in caplog.text and "--val_interval 2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="custom.training"):
        assert check_schedule(56, 28)
    assert not caplog.text


def test_summaries_write_null_never_nan(tmp_path):
    import json

    from custom.handlers import finite_or_null

    text = json.dumps(finite_or_null({"rate": float("nan"), "by_kind": {"x": [1.5, float("inf")]}}), allow_nan=False)
    assert json.loads(text) == {"rate": None, "by_kind": {"x": [1.5, None]}}
