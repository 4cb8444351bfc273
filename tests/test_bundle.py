"""The bundle's configs as MONAI workflows: training, sliding evaluation, inference, CLI, metadata, export, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from custom.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
SCHEMA = (
    ROOT / "tests" / "schemas" / "meta_schema_20240725.json"
)  # the MONAI bundle metadata schema, shipped for offline checks
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
#: The evaluation workflow: evaluate.json layered on inference.json.
EVALUATE = ("inference.json", "evaluate.json")

#: Small and fast: coarse in-plane spacing, small slices, one epoch.
TINY = {"in_plane_spacing": 4.0, "num_workers": 0}
TINY_TRAIN = {
    **TINY,
    "slice_size": [96, 96],
    "epochs": 1,
    "val_interval": 1,
    "batch_cases": 2,
    "slices_per_expression": 2,
    "max_val_expressions": 2,
}


def workflow(config: str | tuple[str, ...], workflow_type: str, **overrides) -> ConfigWorkflow:
    """The workflow of ``config``, a config file of bundle/configs or several merged in order."""
    names = (config,) if isinstance(config, str) else config
    return ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in names],
        meta_file=META,
        logging_file=LOGGING,
        workflow_type=workflow_type,
        **overrides,
    )


def run_workflow(flow: ConfigWorkflow) -> None:
    flow.initialize()
    assert flow.check_properties() == []
    flow.run()
    flow.finalize()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_cases=4, seed=3).parent


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    flow = workflow(
        "train.json",
        "train",
        dataset_dir=str(dataset),
        run_dir=str(out),
        **TINY_TRAIN,
    )
    run_workflow(flow)
    return out / "models" / "model.pt"


def test_training_workflow_writes_a_small_checkpoint_without_the_frozen_text_encoder(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    assert state and not any(k.startswith("text_encoder.") for k in state)
    assert checkpoint.stat().st_size < 25 * 2**20
    assert list((checkpoint.parent.parent / "logs").glob("events.out.tfevents.*"))


def test_evaluation_workflow_writes_per_expression_results_and_summary(dataset, checkpoint, tmp_path):
    flow = workflow(
        EVALUATE,
        "infer",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        checkpoint=str(checkpoint),
        max_expressions=3,
        **TINY,
    )
    run_workflow(flow)
    rows = (tmp_path / "test_expressions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    assert "max_probability" in rows[0] and "dice_3d" in rows[0] and "selector" in rows[0]
    text = (tmp_path / "test_summary.json").read_text()
    summary = json.loads(text)
    assert text == json.dumps(summary, indent=4) + "\n"  # the bundle's JSON style: it may be shipped in eval/
    assert summary["overall"]["expressions"] == 3
    for key in ("dice_3d", "mIoU", "oIoU", "P@0.5", "P@0.9", "negatives_empty_rate", "lesion_hit_rate", "instance_f1"):
        assert key in summary["overall"]


def lps_copy(source: Path, target: Path) -> Path:
    """The same volume written in LPS: x and y axes flipped, affine adjusted, voxels unchanged in the world."""
    image = nib.load(source)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [image.shape[0] - 1, image.shape[1] - 1]
    data = np.asanyarray(image.dataobj)[::-1, ::-1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), image.affine @ flip), target)
    return target


@pytest.mark.parametrize("orientation", ["as stored", "LPS"])
def test_inference_mask_has_the_input_geometry(dataset, checkpoint, tmp_path, orientation):
    datalist = json.loads((dataset / "datalist.json").read_text())
    case = datalist["test"][0]
    image = dataset / case["image"]
    if orientation == "LPS":
        image = lps_copy(image, tmp_path / "case_lps.nii.gz")
    prompt = case["expressions"][0]["text"]
    flow = workflow(
        "inference.json",
        "infer",
        image=str(image),
        prompt=prompt,
        output_dir=str(tmp_path / "out"),
        checkpoint=str(checkpoint),
        **TINY,
    )
    run_workflow(flow)
    masks = list((tmp_path / "out").rglob("*_mask.nii.gz"))
    records = list((tmp_path / "out").rglob("*.json"))
    assert len(masks) == 1 and len(records) == 1 and list((tmp_path / "out").rglob("*_overlay.png"))
    source, mask = nib.load(image), nib.load(masks[0])
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(mask.header.get_zooms(), source.header.get_zooms(), atol=1e-6)
    record = json.loads(records[0].read_text())
    assert record["expression"] == prompt and isinstance(record["found"], bool)


def test_inference_refuses_an_empty_prompt_with_a_clear_message(checkpoint, tmp_path):
    from custom.prompts import PromptError

    flow = workflow(
        "inference.json", "infer", prompt="  ", output_dir=str(tmp_path), checkpoint=str(checkpoint), **TINY
    )
    with pytest.raises(Exception) as raised:  # checked in initialize, before the network is built
        flow.initialize()
    chain = [raised.value]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    assert any(isinstance(e, PromptError) and "prompt is empty" in str(e) for e in chain)


def test_metadata_is_valid_against_the_bundle_schema():
    verify_metadata(meta_file=META, filepath=str(SCHEMA))


def test_network_input_and_output_match_the_metadata():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=str(CONFIGS / "inference.json"))


def test_torchscript_export_equals_eager_with_text_inputs(checkpoint, tmp_path):
    from monai.bundle import ConfigParser

    from custom.export import export_torchscript
    from custom.networks import ShippedWeights

    exported = tmp_path / "model.ts"
    export_torchscript(str(CONFIGS / "inference.json"), str(checkpoint), str(exported), META)
    loaded = torch.jit.load(str(exported))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    eager = parser.get_parsed_content("network_def").eval()
    ShippedWeights(eager).load_state_dict(torch.load(checkpoint, weights_only=True))
    tokens = eager.text_encoder.tokenize(["the smallest cyst in the left lobe", "all lesions"])
    image = torch.rand(2, parser.get_parsed_content("network_def#in_channels"), 192, 192)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, tokens["input_ids"], tokens["attention_mask"]), eager(image, **tokens))


def cli(*args: str, timeout: int = 600, runner: tuple[str, ...] = (sys.executable, "-m", "monai.bundle")):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*runner, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ddp_runner(port: int) -> tuple[str, ...]:
    """``torchrun`` with two processes running ``python -m monai.bundle``."""
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
            "monai.bundle")  # fmt: skip


def overrides(values: dict) -> list[str]:
    return [item for k, v in values.items() for item in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]


@pytest.mark.parametrize("run_id", ["training", None], ids=["run training", "run"])
def test_command_line_training_with_legacy_id_and_run(dataset, tmp_path, run_id):
    args = ["run"] + ([run_id] if run_id else []) + ["--config_file", "bundle/configs/train.json"]
    cli(
        *args,
        *overrides(
            {
                **TINY_TRAIN,
                "dataset_dir": str(dataset),
                "run_dir": str(tmp_path),
            }
        ),
    )
    assert (tmp_path / "models" / "model.pt").is_file()


def test_two_process_ddp_training_ends_with_one_checkpoint(dataset, tmp_path):
    config = "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']"
    runner = ddp_runner(port=29533)
    cli(
        "run",
        "--config_file",
        config,
        *overrides(
            {
                **TINY_TRAIN,
                "batch_cases": 1,
                "dataset_dir": str(dataset),
                "run_dir": str(tmp_path),
            }
        ),
        runner=runner,
    )
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt", "training_state.pt"]


SHIPPED = ROOT / "bundle" / "models" / "model.pt"


def read_seg_frames(path: Path) -> tuple[np.ndarray, list[str]]:
    """(frames, rows, columns) of a binary DICOM-SEG and the SOPInstanceUIDs each frame refers to."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [uid for _, _, uid in seg.get_source_image_uids()]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    return pixels[..., 0], uids


@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped weights bundle/models/model.pt")
def test_dicom_series_gives_the_same_mask_as_its_nifti_twin(tmp_path):
    import pydicom

    from custom.clinical import write_ct_series

    sample = ROOT / "bundle" / "sample" / "sample_case.nii.gz"
    ras = nib.as_closest_canonical(nib.load(sample))
    files = write_ct_series(np.asanyarray(ras.dataobj).astype(np.int16), ras.affine, tmp_path / "dicom")
    prompt = json.loads((ROOT / "bundle" / "sample" / "sample.json").read_text())["prompts"][0]["text"]
    for name, image in (("nifti", sample), ("dicom", tmp_path / "dicom")):
        run_workflow(
            workflow(
                "inference.json", "infer", image=str(image), prompt=prompt, output_dir=str(tmp_path / "out" / name)
            )
        )
    nifti_mask = nib.as_closest_canonical(nib.load(next((tmp_path / "out" / "nifti").rglob("*_mask.nii.gz"))))
    nifti_ras = np.asanyarray(nifti_mask.dataobj) > 0
    frames, uids = read_seg_frames(next((tmp_path / "out" / "dicom").rglob("*_seg.dcm")))
    slice_of = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(files)}
    dicom_ras = np.zeros_like(nifti_ras)
    for frame, uid in zip(frames, uids):
        dicom_ras[:, :, slice_of[uid]] = frame.T > 0  # write_ct_series stores slice k transposed
    assert nifti_ras.any(), "the sample prompt should find its lesion"
    np.testing.assert_array_equal(dicom_ras, nifti_ras)
    records = [json.loads(next((tmp_path / "out" / n).rglob("*.json")).read_text()) for n in ("nifti", "dicom")]
    assert records[0]["found"] == records[1]["found"]
    volumes = [[lesion["volume_ml"] for lesion in record["lesions"]] for record in records]
    assert volumes[0] == pytest.approx(volumes[1], abs=2e-3)  # same voxels; DICOM keeps the spacing as decimal text


@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped weights bundle/models/model.pt")
def test_candidate_map_numbers_every_candidate_as_the_record_does(tmp_path):
    flow = workflow(
        "inference.json", "infer", bundle_root=str(ROOT / "bundle"), output_dir=str(tmp_path), candidate_map=True
    )
    run_workflow(flow)
    (record_path,) = tmp_path.rglob("*.json")
    record = json.loads(record_path.read_text())
    (candidates,) = tmp_path.rglob("*_candidates.nii.gz")
    (mask,) = tmp_path.rglob("*_mask.nii.gz")
    assert record["outputs"]["candidates"] == candidates.name
    labels, answer = nib.load(candidates), nib.load(mask)
    assert labels.shape == answer.shape and np.allclose(labels.affine, answer.affine)
    values, answer = np.asarray(labels.dataobj), np.asarray(answer.dataobj) > 0
    numbers = {c["candidate"] for c in record["referral"]["candidates"]}
    assert len(numbers) >= 2 and set(np.unique(values).tolist()) - {0} <= numbers
    chosen = [c["candidate"] for c in record["referral"]["candidates"] if c["chosen"]]
    picked = np.isin(values, chosen)
    assert answer.any() and 2.0 * (picked & answer).sum() / (picked.sum() + answer.sum()) >= 0.98


def test_readme_first_command_runs_the_default_inference(tmp_path):
    cli("run", "inference", "--config_file", "bundle/configs/inference.json", "--output_dir", str(tmp_path))
    record = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert record["expression"] == "the largest hypodense lesion"
    assert list(tmp_path.rglob("*_mask.nii.gz")) and list(tmp_path.rglob("*_overlay.png"))
    sample = json.loads((ROOT / "bundle" / "sample" / "sample.json").read_text())
    (referred,) = [lesion for lesion in sample["lesions"] if lesion["id"] in sample["prompts"][0]["targets"]]
    assert record["found"] and record["n_lesions"] == 1  # exactly the referred lesion, nothing else
    (answer,) = record["lesions"]
    assert np.linalg.norm(np.subtract(answer["centroid_ras_mm"], referred["centroid_ras_mm"])) < 5.0
    assert answer["volume_ml"] == pytest.approx(referred["volume_ml"], rel=0.2)
    candidates = record["referral"]["candidates"]  # every candidate considered, with its score
    assert len(candidates) >= 2 and sum(c["chosen"] for c in candidates) == 1


def test_two_process_ddp_evaluation_gathers_every_expression(dataset, checkpoint, tmp_path):
    config = "['bundle/configs/inference.json','bundle/configs/evaluate.json','bundle/configs/multi_gpu_evaluate.json']"
    runner = ddp_runner(port=29534)
    cli(
        "run",
        "--config_file",
        config,
        *overrides(
            {
                **TINY,
                "dataset_dir": str(dataset),
                "output_dir": str(tmp_path),
                "checkpoint": str(checkpoint),
                "max_expressions": 5,
            }
        ),
        runner=runner,
    )
    summary = json.loads((tmp_path / "test_summary.json").read_text())
    assert summary["overall"]["expressions"] == 5
    assert len((tmp_path / "test_expressions.csv").read_text().strip().splitlines()) == 1 + 5


@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped weights bundle/models/model.pt")
def test_monai_ckpt_export_loads_the_shipped_weights_and_traces_the_image_path(tmp_path):
    """MONAI's ``ckpt_export`` traces with an image only (the text path needs ``custom.export``): it must load the
    shipped file, which leaves out the frozen pretrained text encoder, and give the eager text-free output."""
    from monai.bundle import ConfigParser, ckpt_export

    from custom.networks import ShippedWeights

    exported = tmp_path / "image_only.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(SHIPPED),
        meta_file=META,
        config_file=str(CONFIGS / "inference.json"),
        use_trace=True,
        input_shape=[1, 2, 96, 96],
    )
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    eager = parser.get_parsed_content("network_def").eval()
    ShippedWeights(eager).load_state_dict(torch.load(SHIPPED, weights_only=True))
    image = torch.rand(1, 2, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(exported))(image), eager(image))
