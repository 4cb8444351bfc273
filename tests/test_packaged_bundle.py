"""The bundle as a model-zoo or MONAI Label user gets it: the folder written by ``python -m custom.package``, used
from inside it with the repository not importable (no PYTHONPATH, working folder outside the repository).

Packaging ships an explicit list of files (never run outputs or patient results written under ``bundle/``), never
writes into or replaces the checkout, a folder containing it or its ``bundle/``/``custom/`` (symlinks resolved), and
``--overwrite`` only replaces a folder it wrote itself (marked with ``.lsms-package``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from custom import package
from custom.package import MARKER, PackageError, check_output_folder, package_bundle

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "schemas" / "meta_schema_20240725.json"

#: Run inside the packaged bundle: load it as a workflow, verify metadata and network in/out (image, then image and
#: text), export with MONAI's ckpt_export (image path, see bundle/docs/README.md), and say where `custom` came from.
CHECKS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out

    bundle, schema = Path.cwd(), sys.argv[1]
    flow = ConfigWorkflow(config_file="configs/inference.json", workflow_type="infer")
    flow.initialize()
    assert flow.check_properties() == []
    verify_metadata(meta_file="configs/metadata.json", filepath=schema)
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json")
    tokens = {"input_ids": torch.randint(1000, 2000, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                      extra_forward_args=tokens)
    ckpt_export(net_id="network_def", filepath="models/model.ts", ckpt_file="models/model.pt",
                meta_file="configs/metadata.json", config_file="configs/inference.json", use_trace=True,
                input_shape=[1, 2, 96, 96])
    import custom
    print(json.dumps({"custom": str(Path(custom.__file__).resolve()), "exported": Path("models/model.ts").is_file()}))
    """
)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    return package_bundle(tmp_path_factory.mktemp("zoo") / "lsms")


def run_inside(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return subprocess.run([sys.executable, *args], cwd=bundle, env=env, capture_output=True, text=True, timeout=900)


def test_packaged_bundle_is_self_contained(packaged):
    assert {p.name for p in packaged.iterdir()} >= {"configs", "models", "docs", "sample", "custom", "LICENSE"}
    for config in (packaged / "configs").glob("*.json"):
        content = json.loads(config.read_text())
        assert content.get("bundle_root", ".") == "."


def test_inference_runs_from_the_packaged_bundle(packaged, tmp_path):
    done = run_inside(packaged, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
                      "--output_dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert record["expression"] == "the largest hypodense lesion" and record["found"] is True


def test_workflow_metadata_network_and_export_checks_pass_in_the_packaged_bundle(packaged):
    done = run_inside(packaged, "-c", CHECKS, str(SCHEMA))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["custom"]).is_relative_to(packaged.resolve()), "custom was imported from the repository"
    assert result["exported"]


def test_packaging_never_replaces_a_folder_unasked(packaged):
    with pytest.raises(FileExistsError):
        package_bundle(packaged)


# -------------------------------------------------------------------------------- what is shipped, where it goes
def test_the_packaged_bundle_holds_exactly_the_bundles_tracked_files_and_the_code(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "bundle"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout.strip():
        pytest.skip("not a git checkout")
    packaged = package_bundle(tmp_path / "lsms")  # a fresh one: the tests above write models/model.ts into theirs
    shipped = {p.relative_to(packaged).as_posix() for p in packaged.rglob("*") if p.is_file()}
    expected = {line.removeprefix("bundle/") for line in tracked.stdout.splitlines()}
    assert {p for p in shipped if not p.startswith("custom/")} == expected | {MARKER}
    code = {p for p in shipped if p.startswith("custom/")}
    assert code and all(p.endswith(".py") for p in code) and "custom/package.py" in code


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path (symlinks not followed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


SHIPPED = {
    "LICENSE", "large_files.yml", "configs/inference.json", "configs/logging.conf", "models/model.pt",
    "models/referral_scorer.pt", "docs/README.md", "docs/options.md", "docs/images/case.png", "sample/sample.json",
    "sample/sample_case.nii.gz", "custom/__init__.py", "custom/sub/module.py",
}  # fmt: skip
NOT_SHIPPED = {
    "outputs/case_001/the_largest_lesion_mask.nii.gz", "outputs/case_001/the_largest_lesion.json", "eval/metrics.json",
    "case_042/ct.nii.gz", "models/replaced_model.pt", "sample/patient.nii.gz", "docs/notes_on_patient_7.txt",
    "configs/.hidden.json", "custom/__pycache__/module.cpython-311.pyc", "custom/scratch.txt",
}  # fmt: skip


@pytest.fixture()
def checkout(tmp_path) -> Path:
    """A small repository layout: the files packaging ships, and run outputs and patient results beside them."""
    root = tmp_path / "checkout"
    for relative in SHIPPED | NOT_SHIPPED:
        path = root / (relative if relative.startswith("custom/") else f"bundle/{relative}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{relative}\n")
    (root / "bundle" / "configs" / "inference.json").write_text(json.dumps({"bundle_root": "bundle"}))
    return root


def test_only_the_listed_files_are_shipped_never_outputs_or_patient_results(checkout, tmp_path):
    out = package_bundle(tmp_path / "dist" / "lsms", repository=checkout)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == SHIPPED | {MARKER}
    assert json.loads((out / "configs" / "inference.json").read_text())["bundle_root"] == "."
    assert not [p for p in (tmp_path / "dist").iterdir() if p.name.startswith(".")], "a temporary folder was left"


def test_a_missing_bundle_file_stops_packaging(checkout, tmp_path):
    (checkout / "bundle" / "models" / "model.pt").unlink()
    with pytest.raises(PackageError, match="models/model.pt"):
        package_bundle(tmp_path / "out", repository=checkout)
    assert not (tmp_path / "out").exists()


#: Output folders that packaging refuses, relative to the checkout ("..": the folder that holds it).
REFUSED = ["bundle/models", "bundle", "bundle/new", "custom", ".", "..", "link_to_bundle", "link_to_checkout"]


@pytest.mark.parametrize("out", REFUSED)
def test_packaging_refuses_the_checkout_and_its_bundle_and_code(out, checkout, monkeypatch, capsys):
    (checkout / "link_to_bundle").symlink_to(checkout / "bundle" / "models")
    (checkout / "link_to_checkout").symlink_to(checkout)
    monkeypatch.setattr(package, "REPOSITORY", checkout)
    monkeypatch.chdir(checkout)
    before = digest_tree(checkout.parent)
    assert package.main(["--out", out, "--overwrite"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --out '{out}' ") and last.endswith("--out dist/lsms_referring_lesion_segmentation.")
    assert digest_tree(checkout.parent) == before


def test_overwrite_replaces_only_a_folder_that_packaging_wrote(checkout, tmp_path, capsys):
    out = package_bundle(tmp_path / "lsms", repository=checkout)
    (out / "stale.txt").write_text("from the last packaging\n")
    package_bundle(out, overwrite=True, repository=checkout)
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()

    mine = tmp_path / "mine"
    (mine / "results").mkdir(parents=True)
    (mine / "results" / "case.json").write_text("{}\n")
    (mine / MARKER).symlink_to(out / MARKER)  # a marker that is a symlink does not count
    with pytest.raises(PackageError, match=f"no {MARKER} file"):
        package_bundle(mine, overwrite=True, repository=checkout)
    assert (mine / "results" / "case.json").read_text() == "{}\n"

    link = tmp_path / "link"
    link.symlink_to(out)
    package_bundle(link, overwrite=True, repository=checkout)  # a symlink to a packaged folder: that folder
    assert link.is_symlink() and (out / MARKER).is_file()


def test_the_issue_command_leaves_the_shipped_models(tmp_path):
    """``python -m custom.package --out bundle/models --overwrite`` once removed the shipped weights."""
    with pytest.raises(PackageError):  # checked here first: a broken check must not reach the real command
        check_output_folder(ROOT / "bundle" / "models", overwrite=True)
    before = digest_tree(ROOT / "bundle" / "models")
    done = subprocess.run([sys.executable, "-m", "custom.package", "--out", "bundle/models", "--overwrite"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --out 'bundle/models' is inside the repository's bundle/ folder"), done.stderr
    assert digest_tree(ROOT / "bundle" / "models") == before
