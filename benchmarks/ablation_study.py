"""Ablations and text-free baselines of LSMS-tiny, each trained and evaluated the same way.

Usage: ``python -m benchmarks.ablation_study [--epochs 30] [--variants NAME ...] [--out outputs/study]``
from the repository root. For every variant it runs ``python -m monai.bundle run training`` with
``bundle/configs/train.json`` and then ``python -m monai.bundle run evaluating`` with
``bundle/configs/evaluate.json`` on the test split, both with the recipe of ``BASE_TRAIN`` / ``BASE_EVALUATE`` (that
of the 0.2 weights) and the overrides listed in ``VARIANTS`` (no other difference: same data, epochs, optimiser,
schedule and evaluation). The weights of the last epoch are
evaluated (no validation-based checkpoint choice). A variant whose ``model.pt`` / ``test_summary.json``
already exists under ``--out`` is not run again, so an interrupted study resumes.

It prints, per variant, the training cost (wall time, steps, slices per second, peak RSS of the training
process), trainable parameters and GFLOPs per 192x192 slice, then the results table of
``benchmarks.results_table``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from benchmarks.network_cost import count_flops, parameters
from benchmarks.results_table import table

TRAIN_CONFIG = "bundle/configs/train.json"
EVALUATE_CONFIG = ("bundle/configs/inference.json", "bundle/configs/evaluate.json")  # layered

ALL_LESIONS_TARGET = {  # replaces ReferredMaskd: every lesion of the case is the target, whatever the text says
    "_target_": "Lambdad",
    "keys": "lesions",
    "func": "$lambda lesions: (lesions > 0).float()",
    "overwrite": "label",
}
NO_TEXT_TRAIN = {"train#random_transforms#1": ALL_LESIONS_TARGET, "train#prepare_batch#text_keys": {}}
NO_TEXT_EVALUATE = {"prepare_batch#text_keys": {}}
UNET_2D = {  # the text-free MONAI baseline, sized as in benchmarks.network_cost
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 2,
    "in_channels": "$len(@windows) * (2 * @context_slices + 1)",
    "out_channels": 1,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}

#: The recipe the variants share, that of the 0.2 weights: one output channel, 2.0 mm whole slices, the default
#: dataset's 72 training cases, and the not-present operating point calibrated for those weights.
BASE_TRAIN = {
    "out_channels": 1,
    "in_plane_spacing": 2.0,
    "context_slices": 0,
    "slice_size": [192, 192],
    "extra_cases": 0,
    "lesion_slices": False,
}
BASE_EVALUATE = {
    "out_channels": 1,
    "in_plane_spacing": 2.0,
    "context_slices": 0,
    "not_present_rule#min_max_probability": 1e-06,
    "not_present_rule#min_volume_ml": 0.013676,
    "referral#method": "rule",
}

# name -> (overrides of train.json, overrides of evaluate.json), on top of BASE_TRAIN and BASE_EVALUATE
VARIANTS: dict[str, tuple[dict, dict]] = {
    "lsms_tiny": ({}, {}),
    "no_multi_kernel": ({"network_def#use_multi_kernel": False}, {"network_def#use_multi_kernel": False}),
    "fpn_decoder": ({"network_def#decoder": "fpn"}, {"network_def#decoder": "fpn"}),
    "no_contrastive": ({"loss#contrastive_weight": 0.0}, {}),
    "no_text_all_lesions": (NO_TEXT_TRAIN, NO_TEXT_EVALUATE),
    "unet_all_lesions": (
        {**NO_TEXT_TRAIN, "network_def": UNET_2D, "train#prepare_batch#network_kwargs": {}},
        # UNet needs sides divisible by 16: slide a 192x192 window (its training size) over each slice
        {**NO_TEXT_EVALUATE, "network_def": UNET_2D, "inferer#roi_size": [192, 192]},
    ),
}


def handler_index(target: str) -> int:
    """Position of the train handler whose ``_target_`` is ``target`` in train.json."""
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    return next(i for i, handler in enumerate(parser["train"]["handlers"]) if handler["_target_"] == target)


def final_checkpoint_saver() -> dict:
    """Train handler that replaces the ValidationHandler: saves the last epoch's weights as ``model.pt``."""
    return {
        "_target_": "CheckpointSaver",
        "save_dir": "@ckpt_dir",
        "save_dict": {"model": "$ShippedWeights(@network)"},
        "save_final": True,
        "final_filename": "model.pt",
    }


def run_bundle(
    run_id: str, config: str | tuple[str, ...], overrides: dict, args_file: Path, log_file: Path
) -> tuple[float, int]:
    """Run ``python -m monai.bundle run run_id`` with ``overrides``; returns (wall seconds, peak RSS in bytes)."""
    args_file.write_text(json.dumps(overrides, indent=2))
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config if isinstance(config, str) else str(list(config)),
        "--args_file",
        str(args_file),
    ]
    start = time.perf_counter()
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"'{' '.join(command)}' failed; see {log_file}")
    return wall, usage.ru_maxrss * 1024


def network_cost(train_overrides: dict, size: int) -> tuple[int, float]:
    """(trainable parameters, GFLOPs per slice at ``size`` x ``size``) of a variant's network."""
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    for key, value in {**BASE_TRAIN, **train_overrides}.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    in_channels = len(parser.get_parsed_content("windows")) * (2 * parser.get_parsed_content("context_slices") + 1)
    text = {}
    if hasattr(net, "text_encoder") and "train#prepare_batch#text_keys" not in train_overrides:
        text = net.text_encoder.tokenize(["the largest hypodense lesion in the right lobe"], max_length=16)
    flops = count_flops(net, torch.rand(1, in_channels, size, size), **text)
    return parameters(net)[0], flops / 1e9


def run_variant(
    name: str, epochs: int, out: Path, limits: dict | None = None, foreground_prior: float | None = 0.01
) -> dict:
    """Train (unless ``model.pt`` exists) and evaluate (unless ``test_summary.json`` exists) one variant."""
    train_overrides, evaluate_overrides = VARIANTS[name]
    limits = limits or {}
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"ckpt_dir": str(directory), "output_dir": str(directory)}
    cost_file = directory / "training_cost.json"
    if not (directory / "model.pt").exists():
        train_args = {
            **paths,
            **BASE_TRAIN,
            "epochs": epochs,
            "foreground_prior": foreground_prior,
            f"train#handlers#{handler_index('ValidationHandler')}": final_checkpoint_saver(),
            **train_overrides,
        }
        if (directory / "training_state.pt").exists():  # an interrupted training of this variant
            train_args["resume"] = True
        if limits.get("max_train_cases"):
            train_args["max_train_cases"] = limits["max_train_cases"]
        wall, peak_rss = run_bundle(
            "training", TRAIN_CONFIG, train_args, directory / "train_args.json", directory / "train.log"
        )
        cost_file.write_text(json.dumps({"wall_s": wall, "peak_rss_bytes": peak_rss, "epochs": epochs}))
    if not (directory / "test_summary.json").exists():
        evaluate_args = {**paths, **BASE_EVALUATE, "split": "test", "results_prefix": "test", **evaluate_overrides}
        if limits.get("max_expressions"):
            evaluate_args["max_expressions"] = limits["max_expressions"]
        run_bundle(
            "evaluating", EVALUATE_CONFIG, evaluate_args, directory / "evaluate_args.json", directory / "evaluate.log"
        )
    return json.loads(cost_file.read_text()) if cost_file.exists() else {}


def training_slices(epochs: int, max_train_cases: int | None = None) -> tuple[int, int]:
    """(steps, slices) of ``epochs`` of training under train.json's batch and sampling settings (upper bound)."""
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    parser.update({**BASE_TRAIN, "max_train_cases": max_train_cases})
    cases = len(parser.get_parsed_content("train#data"))
    batch, per_expression = parser["batch_cases"], parser["slices_per_expression"]
    steps = epochs * -(-cases // batch)
    return steps, epochs * cases * per_expression


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("outputs/study"))
    parser.add_argument(
        "--foreground-prior",
        type=float,
        default=0.01,
        help="initial output probability of every variant (custom.networks.init_output_bias); 0: off",
    )
    parser.add_argument("--size", type=int, default=192, help="slice size for the FLOPs column")
    parser.add_argument("--max-train-cases", type=int, help="train on the first N cases only (a quick check)")
    parser.add_argument("--max-expressions", type=int, help="evaluate the first N expressions only (a quick check)")
    args = parser.parse_args()
    limits = {"max_train_cases": args.max_train_cases, "max_expressions": args.max_expressions}
    steps, slices = training_slices(args.epochs, args.max_train_cases)
    summaries, costs = {}, []
    for name in args.variants:
        cost = run_variant(name, args.epochs, args.out, limits, args.foreground_prior or None)
        trainable, gflops = network_cost(VARIANTS[name][0], args.size)
        summaries[name] = json.loads((args.out / name / "test_summary.json").read_text())
        costs.append((name, cost, trainable, gflops))
        print(f"{name}: done", flush=True)
    print(f"\n{args.epochs} epochs = {steps} steps, at most {slices} training slices per variant\n")
    print(
        f"| variant | trainable params (M) | GFLOPs/slice @{args.size}x{args.size} | training wall (min) | "
        "slices/s (at most) | peak RSS (GB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, cost, trainable, gflops in costs:
        if cost:
            timing = f"{cost['wall_s'] / 60:.1f} | {slices / cost['wall_s']:.1f} | {cost['peak_rss_bytes'] / 1e9:.1f}"
        else:
            timing = "n/a | n/a | n/a"
        print(f"| {name} | {trainable / 1e6:.2f} | {gflops:.2f} | {timing} |")
    print()
    print(table(summaries))


if __name__ == "__main__":
    main()
