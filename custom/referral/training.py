"""Train the referral scorer on the detector's own candidates and on the ground-truth lesions.

Usage: ``python -m custom.referral.training [--out runs/referral/referral_scorer.pt] [--extra_cases 96] [--epochs 80]
[--seed 0] [--checkpoint <weights>] [--dataset_dir <dataset>] [--set KEY=VALUE ...]`` from the repository root;
evaluate the result with ``--referral_scorer_path <file>`` on the evaluation and inference configs, or write it over
``bundle/models/referral_scorer.pt`` to ship it.

1. **Samples.** Every case of the training and validation splits of the default dataset or ``--dataset_dir``
   (and ``--extra_cases`` cases generated with another seed, as the segmentation training recipe adds them) goes
   through the evaluation config's own pipeline (``--config_file``: volume preprocessing, liver-focused inferer,
   text-free outputs and :class:`custom.referral.choose.LesionCandidatesd` once per case) with the shipped
   segmentation weights;
   each expression adds its referring pass. An expression gives two samples: the detector's candidates (a
   candidate is referred when it stands for a referred lesion,
   :func:`custom.detection.candidates.match_candidates`), so the scorer learns the detector's mistakes, and the
   ground-truth lesions measured the same way (the same predicted liver, the same evidence maps), so it learns what the
   words mean on clean sets. Samples are cached under ``--cache_dir``/referral_samples, keyed by the weights, the
   candidate settings, the datalist and the split.
2. **Training.** :class:`custom.networks.scorer.CandidateScorer` with binary cross-entropy on every candidate and
   on the "none of them" output, AdamW and a cosine schedule.
3. **Selection.** After every epoch the validation split's detector samples are answered as the bundle answers
   them (:func:`custom.referral.choose.choose_candidates`) and scored by 3D Dice per expression (computed exactly from
   each candidate's overlap with the referred lesions); the best epoch is kept and the "none" threshold that gives
   the best validation Dice is printed, for ``referral#none_threshold`` in the configs.

Written: the scorer's ``state_dict`` with its ``settings``, ``feature_names`` and the sha256 of the segmentation
weights whose candidates it learnt (``segmentation_sha256``)
(:func:`custom.referral.choose.load_scorer` reads it). Printed as it goes (also into a log file): a line every 10 cases
collected and every tenth of the epochs (loss, validation 3D Dice), with the time taken and left. Printed at the end:
the cost, validation 3D Dice, negatives answered empty and positives hit, and the validation 3D Dice of choosing exactly
the candidates that stand for referred lesions (the ceiling these candidates allow).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, ResampleToMatch

from custom.atomic_files import atomic_write
from custom.clinical.writers import file_sha256
from custom.data.datalist import load_datalist
from custom.data.default_dataset import extra_training_cases
from custom.data.geometry import measure_lesions
from custom.detection.candidates import (
    FEATURE_NAMES,
    candidate_evidence,
    candidate_feature_table,
    match_candidates,
    with_liver_fractions,
)
from custom.detection.postprocessing import PerVolumeOutputsd
from custom.networks.scorer import CandidateScorer
from custom.networks.weights import load_weights
from custom.options import config_dir
from custom.referral.choose import LesionCandidatesd, choose_candidates, full_candidate_map
from custom.runtime import ProgressLog, format_duration
from custom.user_inputs import add_set_option

SCORER_SETTINGS = {"dim": 128, "heads": 4, "layers": 2, "dropout": 0.1}


def _print(line: str) -> None:
    """A line on stdout at once, so a log file shows the progress while the run goes on."""
    print(line, flush=True)


def _means(labels: np.ndarray, values: np.ndarray) -> list[float]:
    return [item["evidence_mean"] for item in candidate_evidence(labels, values)]


def collect_case(case: dict, parts: dict) -> list[dict]:
    """The detector and ground-truth samples of every expression of one case (see the module docstring)."""
    network, inferer, device = parts["network"], parts["inferer"], parts["device"]
    item = parts["volume_preprocessing"]({k: case[k] for k in ("image", "lesions", "case_id") if k in case})
    with torch.no_grad():
        text_free = inferer(item["image"][None].to(device), network)
    outputs = parts["per_volume"]({**item, "pred": text_free[0].cpu()})
    candidates = outputs[parts["candidates_key"]]
    # everything on the network grid, where the bundle finds and measures its candidates
    lesions = ResampleToMatch(mode="nearest")(item["lesions"], img_dst=item["image"])
    instance_map = np.asarray(lesions[0]).round().astype(np.int32)
    candidate_map = full_candidate_map(candidates, instance_map.shape)
    lesions_prob = np.asarray(outputs["lesions_prob"][0])
    liver = np.asarray(outputs["liver_prob"][0]) >= 0.5
    affine = np.asarray(outputs["lesions_prob"].affine, dtype=np.float64)
    hounsfield = np.asarray(item[parts["hounsfield_key"]][0])
    truth, truth_case = measure_lesions(instance_map, affine, hounsfield, liver)
    truth = [with_liver_fractions(a, truth_case["liver_frame"]) for a in truth]
    truth_ids = [int(a["id"]) for a in truth]
    truth_detection = _means(instance_map, lesions_prob)
    matches = np.asarray(match_candidates(candidate_map, instance_map))
    sizes = np.bincount(candidate_map.ravel(), minlength=candidate_map.max(initial=0) + 1)[1:]
    truth_sizes = np.bincount(instance_map.ravel(), minlength=instance_map.max(initial=0) + 1)[1:]
    samples = []
    for expression in case.get("expressions", []):
        targets = {int(t) for t in expression["targets"]}
        data = parts["expression_preprocessing"]({**item, "text": expression["text"], "targets": sorted(targets)})
        with torch.no_grad():
            logits = inferer(
                item["image"][None].to(device),
                network,
                input_ids=data["input_ids"][None].to(device),
                attention_mask=data["attention_mask"][None].to(device),
            )
        referred = np.asarray(parts["per_volume"]({**data, "pred": logits[0].cpu()})["pred"][0])
        target_mask = np.isin(instance_map, sorted(targets)) if targets else np.zeros(instance_map.shape, bool)
        overlaps = np.bincount(candidate_map[target_mask], minlength=candidate_map.max(initial=0) + 1)[1:]
        common = {"text": expression["text"], "kind": expression["kind"], "case_id": case["case_id"]}
        samples.append(
            {
                **common,
                "source": "detected",
                "features": candidate_feature_table(
                    candidates["attributes"], candidate_evidence(candidate_map, referred), candidates["detection"]
                ),
                "targets": np.isin(matches, sorted(targets)).astype(np.float32) if targets else np.zeros(len(matches)),
                "sizes": sizes.astype(np.float64),
                "overlaps": overlaps.astype(np.float64),
                "target_voxels": float(target_mask.sum()),
            }
        )
        samples.append(
            {
                **common,
                "source": "ground_truth",
                "features": candidate_feature_table(
                    truth, _evidence_by_id(instance_map, referred, truth_ids), truth_detection
                ),
                "targets": np.asarray([float(i in targets) for i in truth_ids], np.float32),
                "sizes": truth_sizes[np.asarray(truth_ids, int) - 1].astype(np.float64) if truth_ids else np.zeros(0),
                "overlaps": np.asarray([truth_sizes[i - 1] if i in targets else 0.0 for i in truth_ids], np.float64),
                "target_voxels": float(target_mask.sum()),
            }
        )
    return samples


def _evidence_by_id(instance_map: np.ndarray, referred: np.ndarray, ids: list[int]) -> list[dict]:
    evidence = candidate_evidence(instance_map, referred)
    return [evidence[i - 1] for i in ids]


def pipeline_parts(config_file: str, checkpoint: str | None, overrides: dict | None = None) -> dict:
    """The network (with its weights), transforms and inferer of an evaluation config."""
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({"bundle_root": str(config_dir().parent), **(overrides or {})})
    network = parser.get_parsed_content("network")
    checkpoint = checkpoint or parser.get_parsed_content("checkpoint")
    load_weights(network, checkpoint)
    per_volume = parser.get_parsed_content("per_volume_outputs") if "per_volume_outputs" in parser else None
    finders = [t for t in getattr(per_volume, "transforms", Compose([])).transforms if isinstance(t, LesionCandidatesd)]
    if not isinstance(per_volume, PerVolumeOutputsd) or not finders:
        raise SystemExit(
            "error: the evaluation config has no per_volume_outputs (custom.detection.postprocessing."
            "PerVolumeOutputsd holding a custom.referral.choose.LesionCandidatesd step). Use "
            "bundle/configs/evaluate.json or a config derived from it."
        )
    finder, inferer = finders[0], parser.get_parsed_content("inferer")
    settings = {  # what the samples depend on besides the weights
        "candidate_threshold": finder.threshold,
        "min_voxels": finder.min_voxels,
        "split_depth_mm": finder.split_depth_mm,
        "context_slices": getattr(inferer, "context_slices", 0),
        "grid": "network",  # candidates found and measured on the network grid
    }
    if getattr(inferer, "coarse_factor", None) is not None:  # the text-free pass on the coarse liver's box
        settings["coarse"] = [inferer.coarse_factor, inferer.coarse_step_mm, inferer.coarse_margin_mm]
    return {
        "parser": parser,
        "checkpoint": str(checkpoint),
        "settings": settings,
        "network": network.eval().to(parser.get_parsed_content("device")),
        "device": parser.get_parsed_content("device"),
        "inferer": inferer,
        "volume_preprocessing": Compose(parser.get_parsed_content("volume_preprocessing")),
        "expression_preprocessing": Compose(parser.get_parsed_content("expression_preprocessing")),
        "per_volume": per_volume,
        "candidates_key": finder.candidates_key,
        "hounsfield_key": finder.image_key,
        "datalist": parser.get_parsed_content("datalist"),
        "max_tokens": parser.get_parsed_content("max_tokens"),
    }


def collect_split(parts: dict, split: str, cache_dir: Path, extra_cases: int = 0) -> list[dict]:
    """The samples of every case of ``split`` (``"extra"``: the ``extra_cases`` generated with another seed, as the
    training recipe adds them), from the cache when the same weights and candidate settings made them."""
    hasher = hashlib.sha256(Path(parts["checkpoint"]).read_bytes())
    if parts.get("settings"):
        hasher.update(json.dumps(parts["settings"], sort_keys=True).encode())
    if split != "extra":  # the same split name of another dataset, or of a re-imported one
        hasher.update(Path(parts["datalist"]).read_bytes())
    digest = hasher.hexdigest()[:12]
    name = f"extra{extra_cases}" if split == "extra" else split
    path = cache_dir / "referral_samples" / f"{name}_{digest}.pt"
    if path.is_file():
        samples = torch.load(path, weights_only=False)
        _print(f"{name}: {len(samples) // 2} expressions from the cache {path}")
        return samples
    samples = []
    if split == "extra":
        cases = extra_training_cases(cache_dir, extra_cases)
    else:
        cases = load_datalist(parts["datalist"], split)
    progress = ProgressLog(len(cases), f"collecting {name} samples", "cases", every=10, log=_print)
    for case in cases:
        samples += collect_case(case, parts)
        progress.update()
    atomic_write(path, lambda tmp: torch.save(samples, tmp), overwrite=True)
    elapsed = format_duration(time.perf_counter() - progress.start)
    _print(f"{name}: {len(samples) // 2} expressions collected in {elapsed}")
    return samples


def encode_texts(texts: list[str], text_encoder, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word features (S, T, E) and word masks (S, T) of ``texts``, as the bundle's tokeniser pads them."""
    words, masks = [], []
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            tokens = text_encoder.tokenize(texts[start : start + 256], max_length=max_tokens)
            words.append(text_encoder(**tokens)[0])
            masks.append(tokens["attention_mask"].bool())
    return torch.cat(words), torch.cat(masks)


def batch_tensors(samples: list[dict], words: torch.Tensor, word_mask: torch.Tensor) -> dict:
    """Padded tensors of ``samples`` (S, N, F) features, (S, N) mask and targets, and their words."""
    count = max([len(s["targets"]) for s in samples] + [1])
    features = torch.zeros(len(samples), count, len(FEATURE_NAMES))
    mask = torch.zeros(len(samples), count, dtype=torch.bool)
    targets = torch.zeros(len(samples), count)
    for index, sample in enumerate(samples):
        n = len(sample["targets"])
        features[index, :n] = torch.as_tensor(sample["features"])
        mask[index, :n] = True
        targets[index, :n] = torch.as_tensor(sample["targets"])
    return {"features": features, "mask": mask, "targets": targets, "words": words, "word_mask": word_mask}


@torch.no_grad()
def predict(scorer: CandidateScorer, tensors: dict) -> tuple[np.ndarray, np.ndarray]:
    """(S, N) candidate probabilities (0 where padded) and (S,) "none" probabilities."""
    scorer.eval()
    logits, none = scorer(tensors["features"], tensors["mask"], tensors["words"], tensors["word_mask"])
    return logits.sigmoid().nan_to_num(0.0).numpy(), none.sigmoid().numpy()


def answer_scores(
    samples: list[dict], probabilities: np.ndarray, none: np.ndarray, none_threshold: float, select_threshold=0.5
) -> dict:
    """3D Dice per expression of the bundle's answers to ``samples``, overall and by kind, negatives answered empty
    and positives hit (every referred lesion overlapped)."""
    dice, by_kind, empty, hit = [], defaultdict(list), [], []
    for sample, row, p_none in zip(samples, probabilities, none):
        chosen = choose_candidates(row[: len(sample["targets"])], float(p_none), none_threshold, select_threshold)
        predicted = float(sample["sizes"][chosen].sum())
        overlap = float(sample["overlaps"][chosen].sum())
        total = predicted + sample["target_voxels"]
        value = 1.0 if total == 0 else 2.0 * overlap / total
        dice.append(value)
        by_kind[sample["kind"]].append(value)
        if sample["target_voxels"] == 0:
            empty.append(predicted == 0)
        else:
            hit.append(overlap > 0)
    return {
        "dice_3d": float(np.mean(dice)),
        "by_kind": {kind: float(np.mean(values)) for kind, values in sorted(by_kind.items())},
        "negatives_empty": float(np.mean(empty)) if empty else float("nan"),
        "positives_hit": float(np.mean(hit)) if hit else float("nan"),
        "expressions": len(samples),
    }


def matched_ceiling(samples: list[dict]) -> dict:
    """:func:`answer_scores` of the answer that chooses exactly the candidates standing for referred lesions (and
    "not present" when there is none): what the referral could reach with these candidates."""
    count = max([len(s["targets"]) for s in samples] + [1])
    chosen = np.zeros((len(samples), count))
    for index, sample in enumerate(samples):
        chosen[index, : len(sample["targets"])] = sample["targets"]
    return answer_scores(samples, chosen, (chosen.sum(1) == 0).astype(float), 0.5)


def best_none_threshold(samples: list[dict], probabilities: np.ndarray, none: np.ndarray) -> tuple[float, dict]:
    """The "none" threshold (0.05 steps) with the best 3D Dice on ``samples``; ties go to 0.5's side."""
    grid = np.round(np.arange(0.05, 1.0, 0.05), 2)
    results = [(answer_scores(samples, probabilities, none, t), t) for t in grid]
    best = max(results, key=lambda r: (round(r[0]["dice_3d"], 6), -abs(r[1] - 0.5)))
    return float(best[1]), best[0]


def train_scorer(
    training: dict, validation: dict, validation_samples: list[dict], epochs: int, seed: int, batch_size: int = 64
) -> tuple[CandidateScorer, int, float]:
    """The scorer of the epoch with the best validation 3D Dice (at "none" threshold 0.5), that epoch and Dice."""
    torch.manual_seed(seed)
    scorer = CandidateScorer(len(FEATURE_NAMES), training["words"].shape[-1], **SCORER_SETTINGS)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    best = (-1.0, 0, None)
    count = training["features"].shape[0]
    progress = ProgressLog(epochs, "training the referral scorer", "epochs", log=_print)
    for epoch in range(1, epochs + 1):
        scorer.train()
        losses = []
        for batch in torch.randperm(count).split(batch_size):
            mask, targets = training["mask"][batch], training["targets"][batch]
            logits, none = scorer(
                training["features"][batch], mask, training["words"][batch], training["word_mask"][batch]
            )
            loss = bce(logits[mask], targets[mask]) + bce(none, (targets.sum(1) == 0).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        dice = answer_scores(validation_samples, *predict(scorer, validation), 0.5)["dice_3d"]
        if dice > best[0]:
            best = (dice, epoch, {k: v.clone() for k, v in scorer.state_dict().items()})
        note = f"loss {np.mean(losses):.4f}, validation 3D Dice {dice:.4f} (best {best[0]:.4f}, epoch {best[1]})"
        progress.update(note=note)
    scorer.load_state_dict(best[2])
    return scorer.eval(), best[1], best[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m custom.referral.training", description=__doc__.split("\n\n")[0])
    parser.add_argument(  # evaluate.json layered on inference.json (ConfigParser reads comma-separated files)
        "--config_file",
        default=",".join(str(config_dir() / name) for name in ("inference.json", "evaluate.json")),
    )
    parser.add_argument("--checkpoint", default=None, help="segmentation weights (default: the config's)")
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument(
        "--dataset_dir", default=None, help="a dataset folder with datalist.json (default: the generated dataset)"
    )
    parser.add_argument(
        "--out",
        default="runs/referral/referral_scorer.pt",
        help="where to write the scorer (the shipped one is bundle/models/referral_scorer.pt)",
    )
    parser.add_argument(
        "--extra_cases", type=int, default=96, help="cases of a dataset generated with another seed, added to training"
    )
    parser.add_argument("--epochs", type=int, default=80)
    add_set_option(parser, "evaluation-config overrides, e.g. --set context_slices=1 --set referral#split_depth_mm=2.0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dataset_dir and not (Path(args.dataset_dir) / "datalist.json").is_file():
        parser.error(f"--dataset_dir {args.dataset_dir} has no datalist.json; import the dataset first")
    start = time.perf_counter()
    overrides = {"cache_dir": args.cache_dir, **dict(args.overrides)}
    if args.dataset_dir:
        overrides["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    parts = pipeline_parts(args.config_file, args.checkpoint, overrides)
    samples = {split: collect_split(parts, split, Path(args.cache_dir)) for split in ("training", "validation")}
    if args.extra_cases:
        samples["training"] = samples["training"] + collect_split(
            parts, "extra", Path(args.cache_dir), args.extra_cases
        )
    collected = time.perf_counter()
    text_encoder = parts["network"].text_encoder
    tensors = {}
    for split, items in samples.items():
        words, word_mask = encode_texts([s["text"] for s in items], text_encoder, parts["max_tokens"])
        tensors[split] = batch_tensors(items, words, word_mask)
    detected = [i for i, s in enumerate(samples["validation"]) if s["source"] == "detected"]
    validation = {k: v[detected] for k, v in tensors["validation"].items()}
    validation_samples = [samples["validation"][i] for i in detected]
    scorer, epoch, _ = train_scorer(tensors["training"], validation, validation_samples, args.epochs, args.seed)
    none_threshold, result = best_none_threshold(validation_samples, *predict(scorer, validation))
    scorer_file = {
        "state_dict": scorer.state_dict(),
        "settings": SCORER_SETTINGS,
        "feature_names": list(FEATURE_NAMES),
        "segmentation_sha256": file_sha256(parts["checkpoint"]),
    }
    atomic_write(args.out, lambda tmp: torch.save(scorer_file, tmp), overwrite=True)
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in result["by_kind"].items())
    print(
        f"referral scorer: {tensors['training']['features'].shape[0]} training samples, best epoch {epoch} of "
        f"{args.epochs}; samples {collected - start:.0f} s, training {time.perf_counter() - collected:.0f} s\n"
        f"validation (detected candidates, none threshold {none_threshold}): 3D Dice {result['dice_3d']:.4f}; "
        f"negatives empty {result['negatives_empty']:.3f}; positives hit {result['positives_hit']:.3f}; {kinds}\n"
        f"validation, choosing exactly the candidates that stand for referred lesions: 3D Dice "
        f"{matched_ceiling(validation_samples)['dice_3d']:.4f}\n"
        f"written: {args.out}"
    )


if __name__ == "__main__":
    main()
