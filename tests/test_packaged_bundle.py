"""The bundle as a model-zoo or MONAI Label user gets it: the folder written by ``python -m custom.package``, used
from inside it with the repository not importable (no PYTHONPATH, working folder outside the repository)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from custom.package import package_bundle

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
