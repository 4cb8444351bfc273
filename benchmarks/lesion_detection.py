"""Evaluate one split in one run: text-free lesion detection and referring segmentation, per-volume work once.

Usage::

    python -m benchmarks.lesion_detection [--split test] [--checkpoint bundle/models/model.pt] \
        [--set in_plane_spacing=1.5 --set out_channels=3] [--out bundle/eval/test_detection.json]

Each case is loaded, resampled and windowed once (the evaluation config's ``volume_preprocessing``); the liver
focused inferer's text-free pass (liver and all-lesion channels) runs once and is shared by every expression of
the case, and so are its post-processed text-free outputs and liver region (``PerVolumeOutputsd``); each
expression then adds its referring pass (inside the liver's box) and the post-processing of its referred-lesion
channel. The network,
transforms, inferer and referral step are the ones ``python -m monai.bundle run evaluating`` builds from
``--config_file``, and the expressions are scored with the same metrics (``custom.metrics``).

Detection is scored on the input grid of the labels: the text-free outputs and the candidates, found on the network
grid, are brought back to it (:func:`text_free_on_input_grid`), as the answers are.

Printed (and written to ``--out`` as JSON): lesion recall (Dice >= 0.1 with the predicted components that touch
the lesion) and mean per-lesion Dice by density and size (< 1, 1-5, > 5 ml), false-positive components (touching
no lesion) per case, liver Dice, the referring summary (3D Dice per expression overall and per kind, negatives
answered empty ...) and the wall time of the whole evaluation. The JSON also lists every lesion (``lesions``: case,
id, density, volume, Dice, found, the share of its voxels predicted, ``covered``, and the highest all-lesion
probability over it, ``max_probability``), which tells a missed lesion merged with a neighbour from one not seen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImage
from scipy import ndimage

from custom.data.datalist import load_datalist
from custom.detection.postprocessing import LiverRegiond, PerVolumeOutputsd, largest_component
from custom.handlers import write_csv
from custom.metrics import (
    SIZE_BINS,
    dice_3d,
    match_candidate_detections,
    match_detections,
    score_expression,
    summarize,
    summarize_detection,
)
from custom.networks.folding import fold_batch_norms
from custom.networks.weights import load_weights
from custom.referral.choose import LesionCandidatesd, full_candidate_map
from custom.user_inputs import add_set_option

ROOT = Path(__file__).resolve().parents[1]
#: evaluate.json layered on inference.json, as one ``--config_file`` value (ConfigParser reads comma-separated files).
EVALUATION_CONFIG = ",".join(str(ROOT / "bundle" / "configs" / name) for name in ("inference.json", "evaluate.json"))


def build(config_file: str, overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(overrides)
    return parser


def load_network(parser: ConfigParser, checkpoint: str) -> torch.nn.Module:
    """The config's network with ``checkpoint``, folded for inference as the evaluation workflow folds it."""
    return fold_batch_norms(load_weights(parser.get_parsed_content("network"), checkpoint))


def _split_postprocessing(postprocessing: Compose) -> tuple[PerVolumeOutputsd, Compose]:
    """The config's post-processing of the output channels (text-free ones once per volume) and the rest (the
    referral)."""
    transforms = list(postprocessing.transforms)
    per_volume = transforms[0] if transforms else None
    if not isinstance(per_volume, PerVolumeOutputsd) or not any(
        isinstance(t, LiverRegiond) for t in per_volume.transforms.transforms
    ):
        raise SystemExit(
            "error: the evaluation config's post-processing does not start with custom.detection.postprocessing."
            "PerVolumeOutputsd holding a LiverRegiond step, so it gives no text-free liver and lesion outputs. Use "
            "bundle/configs/evaluate.json layered on inference.json, or a config derived from them."
        )
    return per_volume, Compose(transforms[1:])


def text_free_on_input_grid(outputs: dict, item: dict, preprocessing: Compose, threshold: float = 0.5) -> dict:
    """The text-free outputs of the network grid on the input grid the labels lie on.

    ``lesions`` (X', Y', Z') all-lesion probabilities (the text-free channel, or channel 0 of a 1-channel network run
    without text) and ``liver`` (its liver probabilities, when the network has them) are resampled bilinearly, as the
    answers are; ``candidates`` (the candidate map, when the pipeline makes one) takes the nearest network voxel's
    candidate where the resampled all-lesion probability reaches ``threshold``.
    """

    def inverted(channels: list[torch.Tensor], nearest: bool) -> np.ndarray:
        stacked = MetaTensor(torch.stack(channels), meta=item["image"].meta)
        invert = Invertd("stacked", preprocessing, orig_keys="image", nearest_interp=nearest)
        return np.asarray(invert({**item, "stacked": stacked})["stacked"])

    names = [name for name in ("lesions_prob", "liver_prob") if name in outputs] or ["pred"]
    smooth = inverted([torch.as_tensor(outputs[name])[0].float() for name in names], nearest=False)
    back = {"lesions": smooth[0]}
    if "liver_prob" in names:
        back["liver"] = smooth[1]
    candidates = outputs.get("lesion_candidates")
    if candidates is not None:
        candidate_map = full_candidate_map(candidates, tuple(outputs[names[0]].shape[1:]))
        labels = inverted([torch.as_tensor(candidate_map, dtype=torch.float32)], nearest=True)[0]
        back["candidates"] = np.where(back["lesions"] >= threshold, labels.round().astype(np.int32), 0)
    return back


def evaluate_split(
    parser: ConfigParser, checkpoint: str, split: str, referring: bool = True, max_cases: int | None = None
) -> dict:
    """Detection and referring results of one split (see the module docstring); ``max_cases`` keeps the first ones."""
    network = load_network(parser, checkpoint)
    volume_preprocessing = Compose(parser.get_parsed_content("volume_preprocessing"))
    expression_preprocessing = Compose(parser.get_parsed_content("expression_preprocessing"))
    inferer = parser.get_parsed_content("inferer")
    text_free_post, referral_post = _split_postprocessing(parser.get_parsed_content("postprocessing"))
    finders = [t for t in text_free_post.transforms.transforms if isinstance(t, LesionCandidatesd)]
    candidate_threshold = finders[0].threshold if finders else 0.5
    device = parser.get_parsed_content("device")
    network.to(device)
    loader = LoadImage(image_only=True, ensure_channel_first=True)

    lesions_found, false_positives, liver_dice, liver_dice_largest, scores = [], [], [], [], []
    by_candidates, candidate_false_positives = [], []
    start = time.perf_counter()
    cases = load_datalist(parser.get_parsed_content("datalist"), split)[:max_cases]
    for case in cases:
        item = volume_preprocessing({k: case[k] for k in ("image", "lesions", "case_id") if k in case})
        image = item["image"]
        instances = item["lesions"]
        instance_map = np.asarray(instances[0]).astype(np.int64)
        affine = np.asarray(instances.affine)
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
        with torch.no_grad():
            text_free = inferer(image[None].to(device), network)
        outputs = text_free_post({**item, "pred": text_free[0].cpu()})
        on_input = text_free_on_input_grid(outputs, item, volume_preprocessing, candidate_threshold)
        lesions, false_positive_count = match_detections(on_input["lesions"] >= 0.5, instance_map, voxel_ml)
        density = {a["id"]: a.get("density", "unknown") for a in case.get("lesion_attributes", [])}
        highest = ndimage.maximum(on_input["lesions"], instance_map, [lesion["id"] for lesion in lesions])
        lesions_found += [
            {
                **lesion,
                "density": density.get(lesion["id"], "unknown"),
                "case_id": case["case_id"],
                "max_probability": float(value),
            }
            for lesion, value in zip(lesions, np.atleast_1d(highest))
        ]
        false_positives.append(false_positive_count)
        if "candidates" in on_input:
            lesions, false_positive_count = match_candidate_detections(on_input["candidates"], instance_map, voxel_ml)
            by_candidates += [{**lesion, "density": density.get(lesion["id"], "unknown")} for lesion in lesions]
            candidate_false_positives.append(false_positive_count)
        if case.get("liver") and "liver" in on_input:
            liver = np.asarray(loader(case["liver"])[0]) > 0
            predicted = on_input["liver"] >= 0.5
            liver_dice.append(dice_3d(predicted, liver))
            largest = largest_component(predicted)  # the liver the region is built from
            liver_dice_largest.append(dice_3d(largest if largest is not None else predicted, liver))
        if not referring:
            continue
        for expression in case.get("expressions", []):
            targets = [int(t) for t in expression["targets"]]
            data = expression_preprocessing(
                {**item, "text": expression["text"], "targets": targets, "kind": expression["kind"]}
            )
            with torch.no_grad():
                logits = inferer(
                    image[None].to(device),
                    network,
                    input_ids=data["input_ids"][None].to(device),
                    attention_mask=data["attention_mask"][None].to(device),
                )
            result = referral_post(text_free_post({**data, "pred": logits[0].cpu()}))
            decision = result.get("decision") or {}
            scores.append(
                score_expression(
                    np.asarray(result["pred"][0]) > 0.5,
                    instance_map,
                    targets,
                    affine,
                    case_id=case["case_id"],
                    text=expression["text"],
                    kind=expression["kind"],
                    features=decision.get("features"),
                    selector=str((expression.get("query") or {}).get("select", "")),
                )
            )
    seconds = time.perf_counter() - start
    return {
        "split": split,
        "checkpoint": str(checkpoint),
        "seconds": seconds,
        "detection": summarize_detection(lesions_found, false_positives, liver_dice),
        "liver_dice_largest_component": float(np.mean(liver_dice_largest)) if liver_dice_largest else float("nan"),
        "candidates": summarize_detection(by_candidates, candidate_false_positives, liver_dice)
        if candidate_false_positives
        else None,
        "lesions": lesions_found,
        "referring": summarize(scores) if referring else None,
        "expressions": [score.row() for score in scores],
    }


def detection_rows(summary: dict) -> list[str]:
    """Recall and mean per-lesion Dice by density and size, as a markdown table."""
    lines = ["| density | size | lesions | recall (Dice >= 0.1) | mean per-lesion Dice |", "|---|---|---|---|---|"]
    for density, groups in summary["by_density_and_size"].items():
        for size in ["all", *(name for name, _, _ in SIZE_BINS), ">=1ml"]:
            g = groups[size]
            if g["lesions"]:
                lines.append(f"| {density} | {size} | {g['lesions']} | {g['recall']:.3f} | {g['mean_dice']:.3f} |")
    return lines


def report(results: dict) -> str:
    detection = results["detection"]
    lines = [
        f"split {results['split']}: {detection['cases']} cases, evaluated in {results['seconds']:.1f} s "
        f"({results['seconds'] / 60:.2f} min)",
        "",
        *detection_rows(detection),
        "",
        f"false-positive components per case: {detection['false_positives_per_case']:.2f}",
        f"liver Dice: {detection['liver_dice']:.4f} (its largest component, the liver the region is built from: "
        f"{results['liver_dice_largest_component']:.4f})",
    ]
    candidates = results.get("candidates")
    if candidates:
        lines += [
            "",
            "By lesion candidates (the instances the referral chooses from; a candidate spread over two lesions "
            "stands for one of them at most):",
            *detection_rows(candidates),
            f"candidates standing for no lesion per case: {candidates['false_positives_per_case']:.2f}",
            "",
        ]
    referring = results.get("referring")
    if referring:
        overall = referring["overall"]
        lines += [
            f"referring 3D Dice per expression: {overall['dice_3d']:.4f} ({overall['expressions']} expressions); "
            f"negatives empty {overall['negatives_empty_rate']:.3f}; positives hit {overall['positive_hit_rate']:.3f}",
            "referring 3D Dice by kind: "
            + ", ".join(f"{kind} {s['dice_3d']:.3f}" for kind, s in referring["by_kind"].items()),
            "referring 3D Dice by selector (expressions): "
            + ", ".join(
                f"{name} {s['dice_3d']:.3f} ({s['expressions']})" for name, s in referring["by_selector"].items()
            ),
            f"instance F1 {overall['instance_f1']:.3f}; false-positive components per expression "
            f"{overall['false_positives_per_expression']:.3f}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", default=EVALUATION_CONFIG)
    parser.add_argument("--split", default="test", choices=("training", "validation", "test"))
    parser.add_argument("--checkpoint", default=None, help="weights (default: the config's, the shipped model.pt)")
    parser.add_argument("--dataset_dir", default=None, help="a dataset folder with datalist.json (default: generated)")
    add_set_option(parser)
    parser.add_argument("--no_referring", action="store_true", help="text-free detection only")
    parser.add_argument("--max_cases", type=int, default=None, help="the first N cases of the split only")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--expressions_csv",
        default=None,
        help="write the per-expression rows here (the CSV of `monai.bundle run evaluating`, for calibration)",
    )
    args = parser.parse_args(argv)
    overrides = dict(args.overrides)
    if args.dataset_dir:
        overrides["dataset_dir"] = args.dataset_dir
    config = build(args.config_file, {"bundle_root": str(ROOT / "bundle"), **overrides})
    checkpoint = args.checkpoint or config.get_parsed_content("checkpoint")
    results = evaluate_split(config, checkpoint, args.split, not args.no_referring, args.max_cases)
    print(report(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=4) + "\n")
    if args.expressions_csv:
        Path(args.expressions_csv).parent.mkdir(parents=True, exist_ok=True)
        write_csv(Path(args.expressions_csv), results["expressions"])


if __name__ == "__main__":
    main()
