"""Inference speed and memory on CPU: network per slice, the whole workflow, and its stages.

Usage: ``python -m benchmarks.inference_speed [--slices 120 300] [--prompts 5] [--repeats 3] [--skip_network]`` from
the repository root. In one run it prints

- ms per slice of LSMS-tiny (with an expression; batch norms and layer scales folded, as inference runs it) and of
  MONAI's 2D UNet (16-256, 2 residual units) at 256x256, batch 1 and 32, and their ratio (best of 5 passes, the
  networks timed in turn);
- the wall time of ``python -c "import monai"``, which every ``python -m monai.bundle`` command pays first;
- for generated 512x512 CTs of each ``--slices`` count (the bundle's sample case resampled to 0.66 mm in-plane and
  1.6 mm slices, written as NIfTI; nothing is downloaded): wall time and peak resident memory of
  ``python -m monai.bundle run inference`` with one prompt and with ``--prompts`` prompts on the same volume (one
  ``--datalist``), each in a fresh process, and the seconds inside the workflow (medians of ``--repeats`` processes);
- the time of each stage of the one-prompt run (load, resample, scanner corrections, window and tokenise, liver
  location by the coarse pass, text-free pass, referring pass, liver region, lesion candidates, referral, writing),
  measured in-process on the same inputs.

The allocator is set as the inference workflow sets it (``custom.runtime.keep_freed_memory``). Figures depend on
the machine and on what else runs on it: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage

from custom.networks import BertTextEncoder, lsms_tiny
from custom.networks.folding import fold_batch_norms
from custom.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "bundle" / "sample" / "sample_case.nii.gz"
PROMPTS = [
    "the largest hypodense lesion",
    "all lesions in the right lobe",
    "the smallest cyst",
    "a hyperdense lesion in the left lobe",
    "the uppermost metastasis",
]


def ms_per_slice(networks: dict[str, tuple[torch.nn.Module, dict]], batch: int, size: int, repeats: int = 5):
    """``{name: ms per slice}``, the best of ``repeats`` timed forward passes (after one warm-up) of each network,
    timed in turn (one pass of each per round), so that a slower or faster spell of the machine reaches all of
    them; ``networks`` maps a name to the network and its keyword inputs (the tokenised expression)."""
    image = torch.rand(batch, 2, size, size)
    best = dict.fromkeys(networks, float("inf"))
    with torch.inference_mode():
        for network, inputs in networks.values():
            network.eval()
            network(image, **inputs)
        for _ in range(repeats):
            for name, (network, inputs) in networks.items():
                start = time.perf_counter()
                network(image, **inputs)
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000.0 * seconds / batch for name, seconds in best.items()}


def network_rows(size: int = 256) -> list[str]:
    text_encoder = BertTextEncoder()
    # folded for inference, as the inference and evaluation workflows run it (custom.handlers.FoldBatchNorms)
    lsms = fold_batch_norms(lsms_tiny(in_channels=2, out_channels=3, text_encoder=text_encoder))
    lsms_nchw = fold_batch_norms(
        lsms_tiny(in_channels=2, out_channels=3, text_encoder=text_encoder, channels_last=False)
    )
    unet = UNet(2, 2, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    tokens = text_encoder.tokenize(PROMPTS[:1])
    rows = [
        "| batch | LSMS-tiny ms/slice | UNet ms/slice | ratio | LSMS-tiny in NCHW layout ms/slice | its ratio |",
        "|---|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        ms = ms_per_slice({"lsms": (lsms, tokens), "unet": (unet, {}), "nchw": (lsms_nchw, tokens)}, batch, size)
        cells = [
            f"{ms['lsms']:.1f}",
            f"{ms['unet']:.1f}",
            f"{ms['lsms'] / ms['unet']:.2f}",
            f"{ms['nchw']:.1f}",
            f"{ms['nchw'] / ms['unet']:.2f}",
        ]
        rows.append(f"| {batch} | " + " | ".join(cells) + " |")
    return rows


def generated_ct(slices: int, folder: Path) -> Path:
    """The sample case resampled to 512x512x``slices`` (0.66 mm in-plane, 1.6 mm slices), as NIfTI."""
    path = folder / f"ct_512x512x{slices}.nii.gz"
    if path.exists():
        return path
    source = nib.load(str(SAMPLE))
    hu = np.asarray(source.dataobj, dtype=np.float32)
    zoom = (512 / hu.shape[0], 512 / hu.shape[1], slices / hu.shape[2])
    resampled = ndimage.zoom(hu, zoom, order=1).astype(np.int16)
    affine = source.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(zoom)
    nib.save(nib.Nifti1Image(resampled, affine), str(path))
    return path


def run_process(command: list[str]) -> tuple[float, float, str]:
    """Run ``python <command>`` in a fresh process from the repository root; (wall s, peak RSS GB, output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} failed:\n{result.stderr[-3000:]}")
    # ru_maxrss of children is the largest child so far: report it only when this child raised it
    return wall, max(peak, before) / 1024**2, result.stdout + result.stderr


def workflow_seconds(output: str) -> float:
    """Seconds of the engine run, from the evaluator's "Engine run finished" log line."""
    for line in output.splitlines():
        if "Engine run finished. Time taken:" in line:
            h, m, s = line.rsplit(" ", 1)[-1].split(":")
            return 3600 * int(h) + 60 * int(m) + float(s)
    return float("nan")


def process_rows(slices: list[int], prompts: int, folder: Path, repeats: int) -> list[str]:
    """One row per CT size and prompt count: the median of ``repeats`` fresh processes (wall and workflow seconds),
    and the largest peak RSS; a first row times ``import monai`` alone, which every ``python -m monai.bundle``
    command pays before any bundle code runs."""
    rows = ["| CT | prompts | process wall (s) | workflow (s) | peak RSS (GB) |", "|---|---|---|---|---|"]
    imports = [run_process(["-c", "import monai"])[0] for _ in range(repeats)]
    rows.append(f'| (`python -c "import monai"` alone) | | {statistics.median(imports):.1f} | | |')
    for count in slices:
        image = generated_ct(count, folder)
        for n in (1, prompts):
            out = folder / f"out_{count}_{n}"
            args = ["-m", "monai.bundle", "run", "inference", "--config_file", "bundle/configs/inference.json"]
            args += ["--output_dir", str(out), "--overwrite", "true"]
            if n == 1:
                args += ["--image", str(image), "--prompt", PROMPTS[0]]
            else:
                datalist = folder / f"datalist_{count}.json"
                datalist.write_text(json.dumps([{"image": str(image), "prompt": prompt} for prompt in PROMPTS[:n]]))
                args += ["--datalist", str(datalist)]
            runs = [run_process(args) for _ in range(repeats)]
            wall = statistics.median(run[0] for run in runs)
            workflow = statistics.median(workflow_seconds(run[2]) for run in runs)
            peak_gb = max(run[1] for run in runs)
            rows.append(f"| 512x512x{count} | {n} | {wall:.1f} | {workflow:.1f} | {peak_gb:.2f} |")
    return rows


def leaf_transforms(transform) -> list:
    """The transforms a (nested) ``Compose`` or ``PerVolumeOutputsd`` runs, innermost first-level ones only."""
    from monai.transforms import Compose

    from custom.detection.postprocessing import PerVolumeOutputsd

    if isinstance(transform, PerVolumeOutputsd):
        return leaf_transforms(transform.transforms)
    if isinstance(transform, Compose):
        return [leaf for inner in transform.transforms for leaf in leaf_transforms(inner)]
    return [transform]


def stage_rows(image: Path, folder: Path) -> list[str]:
    """Seconds per stage of one prompt, timed in-process around the config's own components."""
    from monai.bundle import ConfigWorkflow

    from custom.detection.inferers import ReferringSliceInferer

    totals: dict[str, float] = defaultdict(float)

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return wrapper

    stage_of = {
        "LoadClinicalImaged": "load",
        "Orientationd": "resample",
        "Spacingd": "resample",
        "ThickenSlicesd": "resample",
        "HarmoniseHUd": "scanner corrections",
        "HUWindowd": "window and tokenise",
        "Tokenized": "window and tokenise",
        "Activationsd": "activation",
        "AnswerToInputGridd": "back to the input grid",
        "Invertd": "back to the input grid",
        "BoxInvertd": "back to the input grid",
        "CopyItemsd": "copies",
        "CompactCopyd": "copies",
        "ApplyNotPresentRuled": "referral",
        "LiverRegiond": "liver region",
        "LesionCandidatesd": "lesion candidates",
        "CandidateReferrald": "referral",
        "SelectReferredComponentsd": "referral",
        "SaveReferringOutputsd": "writing",
    }
    flow = ConfigWorkflow(
        config_file=str(ROOT / "bundle/configs/inference.json"),
        workflow_type="infer",
        image=str(image),
        prompt=PROMPTS[0],
        output_dir=str(folder / "stages"),
        overwrite=True,
    )
    flow.initialize()
    for key in ("preprocessing", "postprocessing"):  # time every transform class of the pipeline where it is defined
        for cls in {type(transform) for transform in leaf_transforms(flow.parser.get_parsed_content(key))}:
            cls.__call__ = timed(stage_of.get(cls.__name__, "other"), cls.__call__)
    inferer: ReferringSliceInferer = flow.parser.get_parsed_content("inferer")
    inferer.read_inputs = timed("text-free pass", inferer.read_inputs)  # what the inferer calls for the text-free pass
    inferer._coarse_liver = timed("liver location (coarse pass)", inferer._coarse_liver)
    inferer._slide = timed("referring pass", inferer._slide)
    start = time.perf_counter()
    flow.run()
    total = time.perf_counter() - start
    flow.finalize()
    totals["referring pass"] -= totals.get("text-free pass", 0.0)  # the text-free pass slides through _slide too
    totals["text-free pass"] -= totals.get("liver location (coarse pass)", 0.0)  # ... and holds the coarse pass
    rows = ["| stage | seconds |", "|---|---|"]
    rows += [f"| {name} | {seconds:.2f} |" for name, seconds in totals.items()]
    rows.append(f"| whole workflow run | {total:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[120, 300])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per row, whose median is reported (default 3)"
    )
    parser.add_argument("--skip_network", action="store_true", help="leave out the per-slice network timing")
    parser.add_argument("--work_dir", default=None, help="where the generated CTs and outputs go (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    keep_freed_memory()  # as the inference workflow sets its allocator (its `keep_freed_memory` option)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.work_dir or temporary).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        if not args.skip_network:
            print("\n".join(["Network, 256x256 slices, 2 channels, inference mode:", *network_rows(), ""]))
        print(
            "\n".join(
                [
                    "Inference workflow (fresh process each):",
                    *process_rows(args.slices, args.prompts, folder, args.repeats),
                ]
            )
        )
        image = generated_ct(args.slices[0], folder)
        print(
            "\n".join(
                ["", f"Stages of one prompt on 512x512x{args.slices[0]} (in-process):", *stage_rows(image, folder)]
            )
        )


if __name__ == "__main__":
    main()
