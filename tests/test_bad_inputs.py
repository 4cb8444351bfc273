"""Bad inputs through the real command line (``python -m monai.bundle run ...``), as a user would give them.

Each case asserts the exit code, that the last line printed is the bundle's own message (problem and fix), that
nothing was written or half-written into the output folder, and that every input is byte for byte unchanged. The
cases where the right answer is a result (a prompt that looks like config code, two inputs with the same file name, a
real CT without a Frame of Reference UID) assert that result instead.

Every case is its own process running ``monai/bundle/__main__.py`` as ``__main__`` with the case's ``sys.argv``,
exactly what ``python -m monai.bundle`` runs. To pay MONAI's import time (about 8 s) once, those processes are forked
from one that has imported it; an uncaught exception goes through ``sys.excepthook`` and exits with status 1, as in
a fresh interpreter. The cases in ``FRESH_INTERPRETER`` also run as separate ``python -m monai.bundle`` commands.
All cases run once, two at a time, in the module's ``results`` fixture; each test reads its case's result.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from custom.clinical import write_ct_series
from custom.clinical.outputs import expression_slug

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "bundle" / "sample" / "sample_case.nii.gz"
PROMPT = "the largest hypodense lesion"
#: Fast settings for the cases that run the model (coarse in-plane spacing).
FAST = ["--in_plane_spacing", "4.0"]
#: A prompt that would create the folder ``{marker}`` if it were run as Python (kept short: 32 tokens at most).
INJECTION = "$__import__('os').mkdir('{marker}')"
CASE_TIMEOUT_S = 600


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden files included), by relative path."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------- inputs
def small_ct() -> tuple[np.ndarray, np.ndarray]:
    """A few axial slices of the shipped sample CT (HU, int16) and their affine."""
    image = nib.load(SAMPLE)
    data = np.asanyarray(image.dataobj)[:, :, 20:26].astype(np.int16)
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, 20]) + image.affine[:3, 3]
    return data, affine


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    data, affine = small_ct()
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    ras_data, ras_affine = np.asanyarray(ras.dataobj).astype(np.int16), ras.affine
    save(root / "ct.nii.gz", data, affine)
    save(root / "a" / "ct.nii.gz", data, affine)
    save(root / "b" / "ct.nii.gz", data[::-1].copy(), affine)
    good = (root / "ct.nii.gz").read_bytes()
    raw = bytearray(good)
    raw[-8] ^= 0xFF  # the gzip trailer's CRC
    (root / "bad_crc.nii.gz").write_bytes(bytes(raw))
    (root / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    nib.save(nib.Nifti1Image(data, affine), str(root / "plain.nii"))
    (root / "cut.nii").write_bytes((root / "plain.nii").read_bytes()[:-5000])
    (root / "text.nii.gz").write_text("not an image\n")
    save(root / "flat.nii.gz", data[:, :, 0], affine)
    save(root / "four_d.nii.gz", np.stack([data] * 3, axis=-1), affine)
    save(root / "uint8.nii.gz", np.clip(data / 8 + 128, 0, 255).astype(np.uint8), affine)
    save(root / "mr_like.nii.gz", np.clip(data + 1024, 0, 1000).astype(np.float32), affine)
    with_nan = data.astype(np.float32)
    with_nan[10:20, 10:20, 2] = np.nan
    save(root / "nan.nii.gz", with_nan, affine)
    with_inf = data.astype(np.float32)
    with_inf[5, 5, 1] = np.inf
    save(root / "inf.nii.gz", with_inf, affine)
    save(root / "complex.nii.gz", data.astype(np.complex64), affine)
    no_spacing = bytearray((root / "plain.nii").read_bytes())
    no_spacing[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4] = 0 mm
    no_spacing[254:256] = np.zeros(1, "<i2").tobytes()  # sform_code 0: the spacing can only come from pixdim
    (root / "no_spacing.nii").write_bytes(bytes(no_spacing))
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (root / "empty_folder").mkdir()
    write_ct_series(ras_data, ras_affine, root / "series")
    write_ct_series(ras_data, ras_affine, root / "mr_series", modality="MR", rescale_intercept=0.0)
    write_ct_series(ras_data, ras_affine, root / "mixed", series_uid="1.2.3.4.1")
    write_ct_series(ras_data, ras_affine, root / "mixed", series_uid="1.2.3.4.2", series_number=2)
    gap = write_ct_series(ras_data, ras_affine, root / "gap")
    gap[len(gap) // 2].unlink()
    (root / "not_dicom").mkdir()
    (root / "not_dicom" / "slice.dcm").write_text("not DICOM\n")
    import data_store  # the PyPI package pydicom-data: real CT slices

    real = root / "no_frame_of_reference"
    real.mkdir()
    shutil.copy(Path(data_store.__file__).parent / "data" / "693_UNCI.dcm", real)
    (root / "weights.txt").write_text("not a checkpoint\n")
    torch.save({"encoder.weight": torch.zeros(3)}, root / "other_weights.pt")
    lists = {
        "not_json.json": "{ this is not json",
        "empty.json": "[]",
        "no_prompt.json": json.dumps([{"image": "ct.nii.gz"}]),
        "image_number.json": json.dumps([{"image": 12, "prompt": PROMPT}]),
        "missing_image.json": json.dumps([{"image": "nowhere.nii.gz", "prompt": PROMPT}]),
        "twice.json": json.dumps([{"image": "ct.nii.gz", "prompt": PROMPT}, {"image": "ct.nii.gz", "prompt": PROMPT}]),
        "same_names.json": json.dumps(
            [{"image": "a/ct.nii.gz", "prompt": PROMPT}, {"image": "b/ct.nii.gz", "prompt": PROMPT}]
        ),
        "prompt_code.json": json.dumps([{"image": "ct.nii.gz", "prompt": "$__import__('os').getcwd()"}]),
        "not_a_list.json": json.dumps({"image": "ct.nii.gz", "prompt": PROMPT}),
    }
    for name, text in lists.items():
        (root / name).write_text(text)
    (root / "dataset_without_images").mkdir()
    (root / "dataset_without_images" / "notes.txt").write_text("nothing\n")
    hostile_inputs(root, data, affine, ras_data, ras_affine)
    return root


def hostile_inputs(root: Path, data: np.ndarray, affine: np.ndarray, ras_data, ras_affine) -> None:
    """Inputs a hostile or careless user gives: values that are not HU, grids that are not a CT's, a pipe, a bomb."""
    inverted = nib.Nifti1Image(data, affine)
    inverted.header.set_slope_inter(-1.0, 0.0)
    nib.save(inverted, str(root / "inverted_slope.nii.gz"))
    save(root / "inverted_values.nii.gz", (-data).astype(np.int16), affine)
    save(root / "times_1e30.nii.gz", data.astype(np.float32) * np.float32(1e30), affine)
    block = np.full(data.shape, 40, np.int16)
    block[0, 0, 0] = -1000
    save(root / "constant_block.nii.gz", block, affine)
    metres, micrometres = affine.copy(), affine.copy()
    metres[:3, :3] *= 1000.0 / np.abs(affine[:3, :3]).max()
    micrometres[:3, :3] *= 0.001
    save(root / "voxels_1000mm.nii.gz", data, metres)
    save(root / "voxels_0.001mm.nii.gz", data, micrometres)
    save(root / "line.nii.gz", np.full((232, 1, 1), -1000, np.int16), affine)
    infinite_slope = bytearray((root / "plain.nii").read_bytes())
    infinite_slope[112:116] = np.array([np.inf], "<f4").tobytes()  # scl_slope
    (root / "infinite_slope.nii").write_bytes(bytes(infinite_slope))
    os.mkfifo(root / "pipe.nii.gz")
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    header.set_zooms((0.5, 0.5, 0.5))
    header.set_sform(np.diag([0.5, 0.5, 0.5, 1.0]), code=1)
    with gzip.open(root / "bomb.nii.gz", "wb", compresslevel=1) as bomb:  # declares 2 GiB, stores a few MB
        header.write_to(bomb)
        bomb.write(b"\0" * (352 - header.sizeof_hdr))
        zeros = bytes(1 << 24)
        for _ in range(128):
            bomb.write(zeros)
    (root / "link_target").mkdir()
    files = write_ct_series(ras_data, ras_affine, root / "no_pixels")
    for file in files:
        dataset = pydicom.dcmread(file)
        del dataset.PixelData
        dataset.save_as(file)


# ---------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    kind: str
    args: list[str]
    last_line: str = ""  # expected in the last line printed (refusals)
    code: int = 1
    config: str = "inference"
    prepare: Callable[[Path, Path], None] | None = None  # (inputs, out) -> None, before the run
    check: Callable[[Path, Path, Path], None] | None = None  # (inputs, out, marker) -> None, after a successful run
    fast: bool = True
    prompt: bool = True  # inference with --image or --dataset_dir gets --prompt PROMPT unless given
    notes: dict = field(default_factory=dict)


def existing_outputs(inputs: Path, out: Path) -> None:
    (out / "ct").mkdir(parents=True)
    (out / "ct" / f"{expression_slug(PROMPT)}.json").write_text('{"kept": true}\n')


def record_of(out: Path) -> dict:
    records = list(out.rglob("*.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


def verbatim(text: str):
    def check(inputs: Path, out: Path, marker: Path) -> None:
        assert not marker.exists(), "the prompt was executed"
        assert record_of(out)["expression"] == text.format(marker=marker)
        assert len(list(out.rglob("*_mask.nii.gz"))) == 1 and len(list(out.rglob("*_overlay.png"))) == 1

    return check


def same_names_kept_apart(inputs: Path, out: Path, marker: Path) -> None:
    records = sorted(out.rglob("*.json"))
    assert len(records) == 2 and records[0].parent != records[1].parent
    assert {json.loads(r.read_text())["input"] for r in records} == {
        str(inputs / "a" / "ct.nii.gz"),
        str(inputs / "b" / "ct.nii.gz"),
    }


def nifti_for_dicom_without_frame_of_reference(inputs: Path, out: Path, marker: Path) -> None:
    record = record_of(out)
    assert any("Frame of Reference" in note for note in record["notes"])
    masks = list(out.rglob("*_mask.nii.gz"))
    assert len(masks) == 1 and not list(out.rglob("*.dcm"))
    assert nib.load(masks[0]).shape[:2] == (512, 512)


def linked_case(inputs: Path, out: Path) -> None:
    """The case folder ``out/ct`` is a symbolic link to a folder among the inputs (which must stay unchanged)."""
    out.mkdir(parents=True)
    (out / "ct").symlink_to(inputs / "link_target", target_is_directory=True)


def stale_staging(out: Path) -> Path:
    """A staging folder of a process id that no longer runs (above Linux's largest pid)."""
    return out / "ct" / f".lsms-{(1 << 22) + 7}-0123456789ab.tmp"


def stale_staging_removed(inputs: Path, out: Path, marker: Path) -> None:
    verbatim(PROMPT)(inputs, out, marker)
    assert not stale_staging(out).exists(), "the staging folder of a killed run was left in place"


def run_dir_with_model(inputs: Path, out: Path) -> None:
    (out / "run" / "models").mkdir(parents=True)
    shutil.copy(ROOT / "bundle" / "models" / "model.pt", out / "run" / "models" / "model.pt")


IMG = "{inputs}/ct.nii.gz"
CASES = [
    # prompts: data, never code
    Case(
        "prompt that is a Python expression", ["--image", IMG, "--prompt", INJECTION], code=0, check=verbatim(INJECTION)
    ),
    Case(
        "prompt that is a config reference",
        ["--image", IMG, "--prompt", "@checkpoint"],
        code=0,
        check=verbatim("@checkpoint"),
    ),
    Case(
        "prompt given as the MONAI Label option, a Python expression",
        ["--image", IMG, "--displayable_configs#prompt", INJECTION],
        code=0,
        check=verbatim(INJECTION),
    ),
    Case("prompt that looks like a number", ["--image", IMG, "--prompt", "1"], code=0, check=verbatim("1")),
    Case("empty prompt", ["--image", IMG, "--prompt", ""], "The prompt is empty"),
    Case("blank prompt", ["--image", IMG, "--prompt", "   "], "The prompt is empty"),
    Case("prompt over the token limit", ["--image", IMG, "--prompt", " ".join(["hypodense lesion"] * 40)], "tokens"),
    # image files
    Case("image path that does not exist", ["--image", "{inputs}/nowhere.nii.gz"], "does not exist"),
    Case("nii.gz with a corrupted CRC", ["--image", "{inputs}/bad_crc.nii.gz"], "damaged gzip file"),
    Case("truncated nii.gz", ["--image", "{inputs}/truncated.nii.gz"], "damaged gzip file"),
    Case("truncated nii", ["--image", "{inputs}/cut.nii"], "cut short"),
    Case("text file named .nii.gz", ["--image", "{inputs}/text.nii.gz"], "damaged gzip file"),
    Case("2D image", ["--image", "{inputs}/flat.nii.gz"], "one 3D CT volume"),
    Case("4D image", ["--image", "{inputs}/four_d.nii.gz"], "one 3D CT volume"),
    Case("uint8 image", ["--image", "{inputs}/uint8.nii.gz"], "not a CT in HU"),
    Case("MR-like values 0..1000", ["--image", "{inputs}/mr_like.nii.gz"], "not a CT in Hounsfield units"),
    Case("NaN voxels", ["--image", "{inputs}/nan.nii.gz"], "NaN or infinite voxel"),
    Case("infinite voxels", ["--image", "{inputs}/inf.nii.gz"], "NaN or infinite voxel"),
    Case("complex-valued voxels", ["--image", "{inputs}/complex.nii.gz"], "complex"),
    Case("NIfTI without voxel sizes", ["--image", "{inputs}/no_spacing.nii"], "voxel sizes [0.0, 0.0, 0.0] mm"),
    Case("not an image format", ["--image", "{inputs}/picture.png"], "neither a NIfTI file"),
    Case("folder without images", ["--image", "{inputs}/empty_folder"], "No DICOM image found"),
    # DICOM series
    Case("MR DICOM series", ["--image", "{inputs}/mr_series"], "require_ct"),
    Case("two series, none chosen", ["--image", "{inputs}/mixed"], "series_uid"),
    Case("series uid that is not there", ["--image", "{inputs}/mixed", "--series_uid", "9.9.9"], "9.9.9"),
    Case("series with a missing slice", ["--image", "{inputs}/gap"], "missing"),
    Case("files named .dcm that are not DICOM", ["--image", "{inputs}/not_dicom"], "No DICOM image found"),
    Case(
        "real CT without a Frame of Reference UID",
        ["--image", "{inputs}/no_frame_of_reference"],
        code=0,
        check=nifti_for_dicom_without_frame_of_reference,
    ),
    # output folders
    Case("output folder is a file", ["--image", IMG, "--output_dir", "{inputs}/weights.txt"], "is a file"),
    Case(
        "output folder cannot be created", ["--image", IMG, "--output_dir", "/proc/lsms_outputs"], "cannot be written"
    ),
    Case(
        "output folder inside the input series",
        ["--image", "{inputs}/series", "--output_dir", "{inputs}/series/out"],
        "inside the input series folder",
    ),
    Case(
        "output folder is the series' parent",
        ["--image", "{inputs}/series", "--output_dir", "{inputs}"],
        "never written into an input",
    ),
    Case("outputs exist already", ["--image", IMG], "exists already", prepare=existing_outputs),
    Case(
        "--overwrite false with existing outputs",
        ["--image", IMG, "--overwrite", "false"],
        "exists already",
        prepare=existing_outputs,
    ),
    Case(
        "--overwrite no with existing outputs",
        ["--image", IMG, "--overwrite", "no"],
        "exists already",
        prepare=existing_outputs,
    ),
    Case("--overwrite maybe", ["--image", IMG, "--overwrite", "maybe"], "must be true or false"),
    # prompt lists and folders
    Case("datalist that does not exist", ["--datalist", "{inputs}/nowhere.json"], "does not exist"),
    Case("datalist that is not JSON", ["--datalist", "{inputs}/not_json.json"], "not valid JSON"),
    Case("empty datalist", ["--datalist", "{inputs}/empty.json"], "is empty"),
    Case("datalist that is not a list", ["--datalist", "{inputs}/not_a_list.json"], "JSON list"),
    Case("datalist entry without a prompt", ["--datalist", "{inputs}/no_prompt.json"], "JSON list"),
    Case("datalist image that is a number", ["--datalist", "{inputs}/image_number.json"], "image path as text"),
    Case("datalist image that does not exist", ["--datalist", "{inputs}/missing_image.json"], "does not exist"),
    Case("datalist pair listed twice", ["--datalist", "{inputs}/twice.json"], "listed twice"),
    Case(
        "datalist prompt that is a Python expression",
        ["--datalist", "{inputs}/prompt_code.json"],
        code=0,
        check=verbatim("$__import__('os').getcwd()"),
    ),
    Case(
        "two inputs with the same file name",
        ["--datalist", "{inputs}/same_names.json", "--overwrite", "true"],
        code=0,
        check=same_names_kept_apart,
    ),
    Case("dataset folder that does not exist", ["--dataset_dir", "{inputs}/nowhere"], "does not exist"),
    Case("dataset folder without images", ["--dataset_dir", "{inputs}/dataset_without_images"], "holds no .nii"),
    # options
    Case("misspelt option", ["--image", IMG, "--promt", PROMPT], "Did you mean --prompt?"),
    Case(
        "misspelt nested option", ["--image", IMG, "--referral#thresold", "0.3"], "Did you mean --referral#threshold?"
    ),
    Case("number option given text", ["--image", IMG, "--in_plane_spacing", "abc"], "must be a number"),
    Case("nested number option given text", ["--image", IMG, "--referral#threshold", "abc"], "must be a number"),
    Case("whole-number option given a fraction", ["--image", IMG, "--max_tokens", "3.5"], "whole number"),
    Case("number option that cannot be off given null", ["--image", IMG, "--in_plane_spacing", "null"], "a number"),
    Case(
        "candidate splitting turned off with null",
        ["--image", IMG, "--referral#split_depth_mm", "null"],
        code=0,
        check=verbatim(PROMPT),
    ),
    Case("negative in-plane spacing", ["--image", IMG, "--in_plane_spacing", "-2"], "--in_plane_spacing must be from"),
    Case("threshold above 1", ["--image", IMG, "--referral#threshold", "1.5"], "--referral#threshold must be from 0.0"),
    Case(
        "referral method that does not exist", ["--image", IMG, "--referral#method", "oracle"], "must be one of scorer"
    ),
    Case(
        "referral scorer file that does not exist",
        ["--image", IMG, "--referral_scorer_path", "{inputs}/nowhere.pt"],
        "--referral_scorer_path with the path",
    ),
    Case(
        "referral scorer file that is a text file",
        ["--image", IMG, "--referral_scorer_path", "{inputs}/weights.txt"],
        "not a referral scorer file",
    ),
    Case(
        "prompt with # and @ inside",
        ["--image", IMG, "--prompt", "lesion #2 @ segment 4"],
        code=0,
        check=verbatim("lesion #2 @ segment 4"),
    ),
    Case("CUDA device on a CPU-only machine", ["--image", IMG, "--device", "cuda"], "no CUDA GPU", fast=False),
    Case("device name that does not exist", ["--image", IMG, "--device", "quantum"], "not a device name", fast=False),
    # checkpoints
    Case(
        "checkpoint that is a text file",
        ["--image", IMG, "--checkpoint", "{inputs}/weights.txt"],
        "not a PyTorch weights file",
    ),
    Case("checkpoint that does not exist", ["--image", IMG, "--checkpoint", "{inputs}/nowhere.pt"], "does not exist"),
    Case(
        "checkpoint of another network",
        ["--image", IMG, "--checkpoint", "{inputs}/other_weights.pt"],
        "does not match the network",
    ),
    # command-line values other than the prompt are data too
    Case(
        "checkpoint given as Python",
        ["--image", IMG, "--checkpoint", "$__import__('os').mkdir('{marker}') or 'x.pt'"],
        "--checkpoint is given",
    ),
    Case("device given as Python", ["--image", IMG, "--device", "$__import__('os').mkdir('{marker}')"], "config code"),
    Case("overwrite given as Python", ["--image", IMG, "--overwrite", "$True"], "config code"),
    Case(
        "debug given as Python",
        ["--image", IMG, "--debug", "$__import__('os').mkdir('{marker}')"],
        "--debug must be true or false",
    ),
    Case("checkpoint given as a reference", ["--image", IMG, "--checkpoint", "@sample_image"], "config code"),
    Case("text model folder that is not one", ["--image", IMG, "--text_model_path", "/etc"], "not a Hugging Face"),
    # inputs that would be ignored
    Case("datalist and image both given", ["--image", IMG, "--datalist", "{inputs}/twice.json"], "both given"),
    Case("dataset folder and image both given", ["--image", IMG, "--dataset_dir", "{inputs}/a"], "both given"),
    Case("datalist with a prompt", ["--datalist", "{inputs}/twice.json", "--prompt", PROMPT], "--prompt is given"),
    Case("image without a prompt", ["--image", IMG], "without --prompt", prompt=False),
    Case("prompt of one huge word", ["--image", IMG, "--prompt", "\U0001f600" * 10000], "characters"),
    Case("prompt of one long word", ["--image", IMG, "--prompt", "a" * 500], "characters"),
    # values that are not CT in HU, grids that are not a CT's
    Case("NIfTI with a negative scl_slope", ["--image", "{inputs}/inverted_slope.nii.gz"], "negative scl_slope"),
    Case("CT with its values inverted", ["--image", "{inputs}/inverted_values.nii.gz"], "inverted"),
    Case("CT times 1e30", ["--image", "{inputs}/times_1e30.nii.gz"], "not a CT in Hounsfield units"),
    Case("constant block with one air voxel", ["--image", "{inputs}/constant_block.nii.gz"], "one value"),
    Case("NIfTI with an infinite scl_slope", ["--image", "{inputs}/infinite_slope.nii"], "scl_slope inf"),
    Case("voxels of 1000 mm", ["--image", "{inputs}/voxels_1000mm.nii.gz"], "more than any body"),
    Case("voxels of 0.001 mm", ["--image", "{inputs}/voxels_0.001mm.nii.gz"], "not the images of a CT"),
    Case("a 232x1x1 volume", ["--image", "{inputs}/line.nii.gz"], "not the images of a CT"),
    Case("a pipe named .nii.gz", ["--image", "{inputs}/pipe.nii.gz"], "not a regular file"),
    Case("gzip bomb declaring 1024^3 voxels", ["--image", "{inputs}/bomb.nii.gz"], "no CT is"),
    Case("DICOM slices without pixel data", ["--image", "{inputs}/no_pixels"], "holds no pixel data"),
    # output folders the bundle owns, and folders that lead elsewhere
    Case("empty output folder name", ["--image", IMG, "--output_dir", ""], "output folder is empty"),
    Case("output folder is the bundle", ["--image", IMG, "--output_dir", "bundle"], "bundle's own files"),
    Case(
        "output folder is the shipped weights' folder",
        ["--image", IMG, "--output_dir", "bundle/models"],
        "bundle's own files",
    ),  # fmt: skip
    Case("output folder is the checkout", ["--image", IMG, "--output_dir", "."], "bundle's own files"),
    Case(
        "case folder that is a symbolic link", ["--image", IMG], "symbolic link", prepare=lambda i, o: linked_case(i, o)
    ),
    Case(
        "output file that is a folder, with --overwrite true",
        ["--image", IMG, "--overwrite", "true"],
        "exists as a folder",
        prepare=lambda inputs, out: (out / "ct" / f"{expression_slug(PROMPT)}_mask.nii.gz").mkdir(parents=True),
    ),
    Case(
        "staging folder left by a killed run",
        ["--image", IMG],
        code=0,
        prepare=lambda inputs, out: stale_staging(out).mkdir(parents=True),
        check=lambda inputs, out, marker: stale_staging_removed(inputs, out, marker),
    ),
    # training and evaluation
    Case(
        "training --epochs abc",
        ["--epochs", "abc", "--run_dir", "{out}/run"],
        "--epochs must be a whole number",
        config="train",
        fast=False,
    ),
    Case(
        "training --epochs 0",
        ["--epochs", "0", "--run_dir", "{out}/run"],
        "--epochs must be at least 1",
        config="train",
        fast=False,
    ),
    Case(
        "training option whose default is null given text",
        ["--max_train_cases", "abc", "--run_dir", "{out}/run"],
        "--max_train_cases must be a whole number",
        config="train",
        fast=False,
    ),
    Case(
        "training --resume without a saved run",
        ["--resume", "true", "--run_dir", "{out}/run"],
        "Nothing to resume",
        config="train",
        fast=False,
    ),
    Case(
        "training over an existing run",
        ["--run_dir", "{out}/run"],
        "holds a training run already",
        config="train",
        prepare=run_dir_with_model,
        fast=False,
    ),
    Case(
        "evaluation of a split that does not exist",
        ["--dataset_dir", "{inputs}", "--split", "tests"],
        "no split 'tests'",
        config="evaluate",
        fast=False,
    ),
    Case(
        "evaluation given an option of inference",
        ["--prompt", PROMPT],
        "--prompt is an option of inference, not of evaluation",
        config="evaluate",
        fast=False,
    ),
    Case(
        "evaluation of a dataset without a datalist",
        ["--dataset_dir", "{inputs}/empty_folder"],
        "does not exist",
        config="evaluate",
        fast=False,
    ),
]


#: ``--config_file`` of each workflow: evaluation layers evaluate.json on inference.json.
CONFIG_FILES = {
    "inference": "bundle/configs/inference.json",
    "evaluate": "['bundle/configs/inference.json','bundle/configs/evaluate.json']",
    "train": "bundle/configs/train.json",
}
#: Cases that also run as fresh ``python -m monai.bundle`` commands (no fork).
FRESH_INTERPRETER = ("prompt that is a Python expression", "misspelt option", "NaN voxels")
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli_args(case: Case, inputs: Path, out: Path, marker: Path) -> list[str]:
    values = {"inputs": inputs, "out": out, "marker": marker}
    args = [a.format(**values) for a in case.args]
    if case.config == "inference" and "--output_dir" not in args:
        args += ["--output_dir", str(out)]
    prompted = {"--prompt", "--displayable_configs#prompt", "--datalist"} & set(args)
    if case.config == "inference" and case.prompt and not prompted and {"--image", "--dataset_dir"} & set(args):
        args += ["--prompt", PROMPT]
    if case.fast and case.config == "inference" and FAST[0] not in args:
        args += FAST
    return ["run", "--config_file", CONFIG_FILES[case.config], *args]


def _child(args: list[str], log: Path) -> None:
    """In a forked process: ``python -m monai.bundle <args>`` with output to ``log``; never returns."""
    code = 1
    try:
        # GNU OpenMP is not fork-safe: a child forked from a process that has run parallel tensor work hangs at its
        # first parallel region. One thread per case, as PyTorch's DataLoader workers do (cases run two at a time).
        torch.set_num_threads(1)
        signal.alarm(CASE_TIMEOUT_S)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
        os.chdir(ROOT)
        os.environ.update(ENV)
        sys.argv = ["monai.bundle", *args]
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


@dataclass
class Result:
    returncode: int
    stdout: str


def run_cases(jobs: list[tuple[str, list[str], Path]], parallel: int = 2) -> dict[str, Result]:
    """Fork one process per job (``parallel`` at a time, from this single thread); {name: Result}."""
    import monai.bundle  # noqa: F401  (imported once, before forking)

    import custom.clinical  # noqa: F401
    import custom.networks  # noqa: F401

    pending, running, done = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, args, log = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(args, log)
            running[pid] = (name, log)
        pid, status = os.wait()
        name, log = running.pop(pid)
        done[name] = Result(os.waitstatus_to_exitcode(status), log.read_text(errors="replace"))
    return done


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory):
    """Run every case once; return {kind: (result, out, marker, (inputs before, outputs before))}."""
    shipped = digest_tree(ROOT / "bundle" / "models")
    jobs, state = [], {}
    for case in CASES:
        work = tmp_path_factory.mktemp("case")
        out, marker = work / "out", Path(f"/tmp/x{os.getpid()}{len(state)}")
        if case.prepare is not None:
            case.prepare(inputs, out)
        state[case.kind] = (out, marker, (digest_tree(inputs), digest_tree(out)))
        jobs.append((case.kind, cli_args(case, inputs, out, marker), work / "log.txt"))
    found = run_cases(jobs)
    assert digest_tree(ROOT / "bundle" / "models") == shipped
    return {kind: (found[kind], *state[kind]) for kind in state}


@pytest.mark.parametrize("kind", FRESH_INTERPRETER)
def test_fresh_interpreter_gives_the_same_answer(kind, inputs, tmp_path):
    """The forked runs above answer as a fresh ``python -m monai.bundle`` does."""
    case = next(c for c in CASES if c.kind == kind)
    out, marker = tmp_path / "out", Path(f"/tmp/x{os.getpid()}f")
    before = digest_tree(inputs)
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *cli_args(case, inputs, out, marker)], cwd=ROOT,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=CASE_TIMEOUT_S)  # fmt: skip
    check_result(case, Result(result.returncode, result.stdout), inputs, out, marker, before, {})


def check_result(case: Case, result: Result, inputs: Path, out: Path, marker: Path, inputs_before, out_before):
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == case.code, result.stdout[-3000:]
    assert digest_tree(inputs) == inputs_before, "an input was changed"
    assert not marker.exists(), "user text was executed"
    if case.code == 0:
        case.check(inputs, out, marker)
    else:
        assert lines[-1].startswith("error: ") and case.last_line in lines[-1], result.stdout[-3000:]
        assert "Traceback" not in result.stdout, result.stdout[-3000:]
        assert digest_tree(out) == out_before, "a refused run wrote or changed outputs"
    leftovers = [p for p in out.rglob(".*") if p.name.startswith((".lsms-", ".tmp"))] if out.exists() else []
    assert not leftovers, leftovers


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input_gets_a_clear_answer(case, results, inputs):
    result, out, marker, (inputs_before, out_before) = results[case.kind]
    check_result(case, result, inputs, out, marker, inputs_before, out_before)


def test_the_matrix_covers_at_least_forty_kinds():
    assert len({c.kind for c in CASES}) == len(CASES) >= 40
