"""The options tables (custom/options.py) against the configs, the document made from them, ``--help`` and a bundle
folder copied without its code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from custom.options import (
    OPTIONS,
    WORKFLOWS,
    config_dir,
    document,
    main,
    merged_config,
    options_of,
    rows,
    settable_ids,
    workflow_of,
)
from custom.user_inputs import _other_workflows_option

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
DOCUMENT = ROOT / "bundle" / "docs" / "options.md"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def config_of(workflow) -> dict:
    return merged_config([CONFIGS / name for name in workflow.files])


def node(config: dict, id: str):
    for key in id.split("#"):
        config = config[key]
    return config


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_every_setting_is_an_option_of_its_workflow_or_refused_as_another_ones(workflow):
    described = {option.id for option in options_of(workflow)}
    for id in settable_ids(config_of(workflow)):
        if id not in described:  # evaluation holds inference's settings: those are refused there
            assert _other_workflows_option(id.replace("#", "::"), workflow), f"--{id} of {workflow.name} is undescribed"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_every_option_is_a_setting_of_its_workflow(workflow):
    config = config_of(workflow)
    for option in options_of(workflow):
        node(config, option.id)  # KeyError: an option the configs do not hold


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_the_guards_tables_name_options_of_the_workflow(workflow):
    config, described = config_of(workflow), {option.id for option in options_of(workflow)}
    named = [*config.get("user_data", []), *config.get("option_limits", {}), *config.get("optional_options", [])]
    assert set(named) <= described


def test_each_option_is_described_once_per_workflow():
    pairs = [(option.id, workflow) for option in OPTIONS for workflow in option.workflows]
    assert len(pairs) == len(set(pairs))
    assert all(option.meaning.strip() and "|" not in option.meaning for option in OPTIONS)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_the_tables_show_the_configs_defaults(workflow):
    config = config_of(workflow)
    for name, default, _ in rows(workflow, config):
        assert json.loads(default) == node(config, name[2:])


def test_the_workflow_is_told_by_its_config_files():
    assert workflow_of(["bundle/configs/inference.json"]).name == "inference"
    assert workflow_of(["bundle/configs/inference.json", "bundle/configs/evaluate.json", "x/multi_gpu_evaluate.json"])
    assert workflow_of(["configs/train.json", "configs/multi_gpu_train.json"]).name == "training"
    assert workflow_of(["mine.json"]) is None


def test_the_committed_document_is_the_generated_one(tmp_path):
    assert config_dir() == CONFIGS
    assert DOCUMENT.read_text() == document(), "rewrite it: python -m custom.options --write bundle/docs/options.md"
    stale = tmp_path / "options.md"
    stale.write_text(document().replace("| `--image` |", "| `--images` |"))
    assert main(["--check", str(stale)]) == 1 and main(["--check", str(DOCUMENT)]) == 0


def monai_bundle(*args: str, cwd: Path = ROOT, env: dict = ENV) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_help_prints_the_workflows_table_before_any_work(workflow):
    files = [f"bundle/configs/{name}" for name in workflow.files]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    # a weights file that does not exist and an unknown option: --help answers before either is looked at
    done = monai_bundle(workflow.run_id, "--config_file", config_file, "--checkpoint", "nowhere.pt", "--typo", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "error:" not in done.stderr
    printed = done.stdout
    for option in options_of(workflow):
        assert f"  --{option.id} (default: " in printed
    other = {o.id for o in OPTIONS} - {o.id for o in options_of(workflow)}
    assert not [id for id in other if f"  --{id} (default: " in printed]


@pytest.mark.parametrize("workflow", WORKFLOWS[:2], ids=lambda w: w.name)
def test_a_bundle_folder_without_its_code_says_how_to_package_it(workflow, tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "bundle" / "configs")  # the bundle folder alone, not the repository
    files = [f"bundle/configs/{name}" for name in workflow.files]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    done = monai_bundle(workflow.run_id, "--config_file", config_file, cwd=tmp_path, env=env)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No module named 'custom'") and "python -m custom.package --out <folder>" in last
