"""The candidate-level referral alone: a scorer trained and evaluated on ground-truth lesions as the candidates.

Usage: ``python -m benchmarks.referral_upper_bound [--extra_cases 192] [--epochs 60] [--seed 0]`` from the
repository root.

Every case's candidates are its ground-truth lesions, described as a detected candidate would be
(:func:`custom.detection.candidates.candidate_features` of the datalist's ``lesion_attributes`` and the liver-frame
fractions; no text-conditioned evidence, which needs the segmentation network), and every expression is encoded by
the bundle's frozen text encoder. :class:`custom.networks.scorer.CandidateScorer` is trained on the training split
(plus ``--extra_cases`` generated with another seed, as the training recipe does) and the epoch with the best
validation 3D Dice is kept. The answer to an expression is "not present" when the none output is at least 0.5,
otherwise the candidates at or above 0.5 (the highest one when none is). Printed for the validation and test
splits: the share of expressions answered with exactly the referred set and the 3D Dice per expression that answer
would give with perfect masks (the lesions' volumes; an empty answer to a negative scores 1), overall and by kind.
It is the ceiling of the referral step once every lesion is found and segmented, and it says how much of the
referring task the expression and the lesions' measured attributes settle.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from custom.data.datalist import SPLITS, load_datalist
from custom.data.default_dataset import ensure_default_dataset, extra_training_cases
from custom.detection.candidates import FEATURE_NAMES, candidate_features, with_liver_fractions
from custom.networks import BertTextEncoder
from custom.networks.scorer import CandidateScorer


def case_features(case: dict) -> tuple[np.ndarray, list[int], list[float]]:
    """(N, F) features of a case's ground-truth lesions, their ids and volumes."""
    rows, ids, volumes = [], [], []
    for lesion in case["lesion_attributes"]:
        rows.append(candidate_features(with_liver_fractions(lesion, case.get("liver_frame"))))
        ids.append(int(lesion["id"]))
        volumes.append(float(lesion["volume_ml"]))
    return np.stack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)), np.float32), ids, volumes


def build_samples(cases: list[dict], encoder: BertTextEncoder, max_candidates: int) -> dict:
    """Padded tensors of every (case, expression) of ``cases``."""
    features, masks, targets, volumes, texts, kinds = [], [], [], [], [], []
    for case in cases:
        rows, ids, vols = case_features(case)
        rows, ids, vols = rows[:max_candidates], ids[:max_candidates], vols[:max_candidates]
        padded = np.zeros((max_candidates, len(FEATURE_NAMES)), np.float32)
        padded[: len(rows)] = rows
        for expression in case["expressions"]:
            referred = {int(t) for t in expression["targets"]}
            features.append(padded)
            masks.append([i < len(ids) for i in range(max_candidates)])
            targets.append([float(i < len(ids) and ids[i] in referred) for i in range(max_candidates)])
            volumes.append(vols + [0.0] * (max_candidates - len(vols)))
            texts.append(expression["text"])
            kinds.append(expression["kind"])
    words, word_masks = [], []
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            tokens = encoder.tokenize(texts[start : start + 256])
            words.append(encoder(**tokens)[0])
            word_masks.append(tokens["attention_mask"].bool())
    return {
        "features": torch.as_tensor(np.stack(features)),
        "mask": torch.as_tensor(masks),
        "targets": torch.as_tensor(targets),
        "volumes": torch.as_tensor(volumes),
        "words": torch.cat(words),
        "word_mask": torch.cat(word_masks),
        "kinds": kinds,
    }


def answer(scorer: CandidateScorer, samples: dict) -> torch.Tensor:
    """(S, N) bool chosen candidates of every sample (all False for "not present")."""
    scorer.eval()
    with torch.no_grad():
        logits, none = scorer(samples["features"], samples["mask"], samples["words"], samples["word_mask"])
    chosen = logits.sigmoid() >= 0.5
    best = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).bool() & samples["mask"]
    chosen = torch.where(chosen.any(1, keepdim=True), chosen, best)
    return chosen & (none.sigmoid() < 0.5)[:, None]


def score(chosen: torch.Tensor, samples: dict) -> dict:
    """Exact-set share and perfect-mask 3D Dice per expression, overall and by kind."""
    targets = samples["targets"].bool()
    volumes = samples["volumes"]
    overlap = (volumes * (chosen & targets)).sum(1)
    total = (volumes * chosen).sum(1) + (volumes * targets).sum(1)
    both_empty = ~chosen.any(1) & ~targets.any(1)
    dice = torch.where(both_empty, torch.ones_like(total), 2 * overlap / total.clamp_min(1e-9))
    exact = (chosen == targets).all(1).float()
    by_kind = defaultdict(list)
    for index, kind in enumerate(samples["kinds"]):
        by_kind[kind].append(index)
    return {
        "expressions": len(samples["kinds"]),
        "exact": float(exact.mean()),
        "dice_3d": float(dice.mean()),
        "by_kind": {k: (float(dice[i].mean()), len(i)) for k, i in sorted(by_kind.items())},
    }


def train(samples: dict, validation: dict, epochs: int, seed: int, batch_size: int = 64) -> CandidateScorer:
    torch.manual_seed(seed)
    scorer = CandidateScorer(len(FEATURE_NAMES), samples["words"].shape[-1])
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    best, best_state = -1.0, None
    count = len(samples["kinds"])
    for _ in range(epochs):
        scorer.train()
        for batch in torch.randperm(count).split(batch_size):
            logits, none = scorer(
                samples["features"][batch], samples["mask"][batch], samples["words"][batch], samples["word_mask"][batch]
            )
            mask, targets = samples["mask"][batch], samples["targets"][batch]
            loss = bce(logits[mask], targets[mask]) + bce(none, (targets.sum(1) == 0).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        dice = score(answer(scorer, validation), validation)["dice_3d"]
        if dice > best:
            best, best_state = dice, {k: v.clone() for k, v in scorer.state_dict().items()}
    scorer.load_state_dict(best_state)
    return scorer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default="cache")
    parser.add_argument("--extra_cases", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    datalist = ensure_default_dataset(args.cache_dir)
    cases = {split: load_datalist(datalist, split) for split in SPLITS}
    cases["training"] += extra_training_cases(args.cache_dir, args.extra_cases)
    max_candidates = max(len(c["lesion_attributes"]) for split in SPLITS for c in cases[split])
    encoder = BertTextEncoder().eval()
    samples = {split: build_samples(cases[split], encoder, max_candidates) for split in SPLITS}
    scorer = train(samples["training"], samples["validation"], args.epochs, args.seed)
    print(
        f"candidate scorer on ground-truth lesions: {len(samples['training']['kinds'])} training expressions, "
        f"{args.epochs} epochs, {time.perf_counter() - start:.0f} s"
    )
    for split in ("validation", "test"):
        result = score(answer(scorer, samples[split]), samples[split])
        kinds = ", ".join(f"{k} {d:.3f} ({n})" for k, (d, n) in result["by_kind"].items())
        print(
            f"{split}: {result['expressions']} expressions, exact referred set {result['exact']:.3f}, "
            f"3D Dice with perfect masks {result['dice_3d']:.3f}; by kind: {kinds}"
        )


if __name__ == "__main__":
    main()
