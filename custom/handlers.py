"""Ignite handlers: per-expression scores to CSV and a summary to JSON; input errors passed on without a traceback."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import min_version, optional_import

from custom.clinical.writers import atomic_write
from custom.metrics import ExpressionScores, score_expression, summarize

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["FoldBatchNorms", "InputErrorHandler", "ReferringResultsWriter"]


class InputErrorHandler:
    """Raise an engine's exception at once, so that an input error (:class:`custom.errors.InputError`) reaches the
    user as its own message instead of after ``StatsHandler``'s logged traceback.

    Attach it before ``StatsHandler`` (ignite calls the ``EXCEPTION_RAISED`` handlers in order). Any other error is
    raised too, and Python prints its traceback as usual.
    """

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    @staticmethod
    def exception_raised(engine, error: Exception) -> None:
        raise error


class FoldBatchNorms:
    """Fold the network's batch norms and layer scales into its convolutions
    (:func:`custom.networks.folding.fold_batch_norms`) when the engine starts, for inference and evaluation with
    fixed weights: the same outputs within float rounding, fewer passes over the feature maps.

    Attach it after ``CheckpointLoader`` (ignite calls the ``STARTED`` handlers in order), so the loaded weights are
    folded; never on a network that is trained.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine) -> None:
        from custom.networks.folding import fold_batch_norms

        fold_batch_norms(self.network)


def _array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class ReferringResultsWriter:
    """Scores every (case, expression) an evaluator sees and writes the results when the run completes.

    Each decollated item must hold ``pred`` (1, ...) binary mask and ``label`` (1, ...) referred-target mask in
    the geometry of ``instance_key`` (the lesion instance map, a MetaTensor whose affine names the axial axis),
    and the strings ``case_id``, ``text``, ``kind``; the "not present" ``decision`` features (maximum probability,
    predicted volume) are recorded when present, for calibrating the rule on the validation split.
    Writes ``<output_dir>/<prefix>_expressions.csv`` and
    ``<prefix>_summary.json`` (DESIGN section 6 metrics, overall and per kind), gathering across DDP ranks and
    writing on rank 0 only. The summary is also kept in ``engine.state.metrics["referring_summary"]``.

    Why not MONAI's ``MetricsSaver``: it writes the scalars of ``engine.state.metrics`` and, per metric, one row of
    numbers per image (``metric_details``, (batch, channel) arrays) keyed by the image's file name, with summaries
    over all rows (mean, median, percentiles). Here one image carries a dozen expressions, so the file name is not a
    row's key; a row holds text (case, expression, kind), lesion-wise counts and the "not present" features; and the
    summary is grouped by expression kind and counts lesions over the split (DESIGN section 6), which those
    summary operations cannot express. The files are also written atomically, so a rerun never leaves half a CSV.
    """

    def __init__(self, output_dir: str, prefix: str = "evaluation", instance_key: str = "lesions") -> None:
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.instance_key = instance_key
        self.scores: list[ExpressionScores] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.scores = []

    def collect(self, engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output):
            instances = item[self.instance_key]
            instance_map = _array(instances)[0]
            label = _array(output["label"])[0] > 0
            targets = sorted(int(t) for t in np.unique(instance_map[label]) if t > 0)
            decision = output.get("decision") or {}
            self.scores.append(
                score_expression(
                    _array(output["pred"])[0] > 0.5,
                    instance_map,
                    targets,
                    _array(instances.affine),
                    case_id=str(item.get("case_id", "")),
                    text=str(item.get("text", "")),
                    kind=str(item.get("kind", "")),
                    features=decision.get("features"),
                    selector=str(item.get("selector", "")),
                )
            )

    def _gathered(self) -> list[ExpressionScores]:
        if not (dist.is_available() and dist.is_initialized()):
            return self.scores
        parts: list[list[ExpressionScores]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(parts, self.scores)
        return [s for part in parts for s in part]

    def write(self, engine) -> None:
        scores = self._gathered()
        summary = summarize(scores)
        engine.state.metrics["referring_summary"] = summary
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [s.row() for s in scores]
        csv_path = self.output_dir / f"{self.prefix}_expressions.csv"
        atomic_write(csv_path, lambda tmp: write_csv(tmp, rows), overwrite=True)
        summary_path = self.output_dir / f"{self.prefix}_summary.json"
        text = json.dumps(finite_or_null(summary), indent=4, allow_nan=False) + "\n"
        atomic_write(summary_path, lambda tmp: tmp.write_text(text), overwrite=True)
        overall = summary["overall"]
        self.logger.info(
            f"{len(scores)} expressions: 3D Dice {overall['dice_3d']:.4f}, negatives empty "
            f"{overall['negatives_empty_rate']:.3f}, positive hit rate {overall['positive_hit_rate']:.3f}; "
            f"written to {csv_path} and {summary_path}"
        )


def finite_or_null(value):
    """``value`` with every NaN or infinite float (nested in dicts and lists) replaced by None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write rows (dicts with the same keys, in order) as a CSV with a header; no rows, an empty file."""
    with open(path, "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
