"""Ignite handlers: per-expression scores to CSV and a summary to JSON; input errors passed on without a traceback;
one line per answered prompt and what an inference run wrote; the loss terms and learning rate for TensorBoard."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.handlers import from_engine
from monai.utils import min_version, optional_import

from custom.clinical.outputs import ReferringOutputWriter
from custom.clinical.writers import atomic_write
from custom.metrics import ExpressionScores, score_expression, summarize
from custom.runtime import format_duration
from custom.user_inputs import as_bool

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["AnswerReport", "FoldBatchNorms", "InputErrorHandler", "ReferringResultsWriter", "TrainingScalars"]


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
    Writes ``<output_dir>/<prefix>_expressions.csv`` and ``<prefix>_summary.json`` (the metrics of
    :mod:`custom.metrics`, overall and per kind), gathering across DDP ranks and writing on rank 0 only. The
    summary is also kept in ``engine.state.metrics["referring_summary"]``.

    Why not MONAI's ``MetricsSaver``: it writes the scalars of ``engine.state.metrics`` and, per metric, one row of
    numbers per image (``metric_details``, (batch, channel) arrays) keyed by the image's file name, with summaries
    over all rows (mean, median, percentiles). Here one image carries a dozen expressions, so the file name is not a
    row's key; a row holds text (case, expression, kind), lesion-wise counts and the "not present" features; and the
    summary is grouped by expression kind and counts lesions over the split, which those
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


def answer_line(record: Mapping, seconds: float) -> str:
    """One answered prompt: ``case_001 "the largest lesion": found, 2 lesions, confidence 0.91, 3.4 s`` (not
    present: with the reason the answer gives, if any)."""
    if record.get("found"):
        count = int(record.get("n_lesions", 0))
        answer = f"found, {count} lesion{'' if count == 1 else 's'}"
    else:
        reason = (record.get("decision") or {}).get("reason")
        answer = "not present" + (f" ({reason})" if reason else "")
    confidence = record.get("confidence")
    confidence = "confidence n/a" if confidence is None else f"confidence {float(confidence):.2f}"
    return f'{record.get("case_id", "")} "{record.get("expression", "")}": {answer}, {confidence}, {seconds:.1f} s'


def written_files(output_dir: str | Path, record: Mapping) -> list[Path]:
    """The files of one record's answer, as :class:`custom.clinical.ReferringOutputWriter` names them."""
    names = record.get("outputs") or {}
    if "record" not in names:
        return []
    writer = ReferringOutputWriter(output_dir, montage="montage" in names)
    dicom = str(names.get("mask", "")).endswith(".dcm")
    stem = names["record"].removesuffix(".json")
    return list(writer.output_paths(str(record["case_id"]), stem, dicom).values())


def wrote_line(output_dir: str | Path, files: Sequence[Path], answers: int, shown: int = 3) -> str:
    """What a run wrote: ``wrote 1 answer (3 files) in out/case_001: a_mask.nii.gz, a.json, a_overlay.png``, or for
    several case folders ``wrote 12 answers (36 files) in 4 folders under out: case_001, case_002, case_003 and 1
    more``."""
    if not files:
        return f"wrote nothing to {output_dir}"
    head = f"wrote {answers} answer{'' if answers == 1 else 's'} ({len(files)} files)"
    folders = list(dict.fromkeys(path.parent for path in files))
    if len(folders) == 1:
        return f"{head} in {folders[0]}: {', '.join(path.name for path in files)}"
    names = ", ".join(folder.name for folder in folders[:shown])
    more = f" and {len(folders) - shown} more" if len(folders) > shown else ""
    return f"{head} in {len(folders)} folders under {output_dir}: {names}{more}"


class AnswerReport:
    """Log a line per answered prompt of an inference run, with its place in the run, and a last line naming what
    the run wrote::

        [2/12] case_001 "the largest hypodense lesion": found, 2 lesions, confidence 0.91, 3.4 s
        ...
        wrote 12 answers (36 files) in 4 folders under outputs: case_001, case_002, case_003 and 1 more

    Reads the record that ``custom.clinical.SaveReferringOutputsd`` leaves under ``record_key`` in each decollated
    output. The seconds of a prompt are its iteration's (the first prompt of an image includes loading it).
    Without ``engine_lines`` the engine's own INFO lines (run started, epoch complete, run finished: nothing about
    the answers) are left out, so the run ends with the "wrote" line; its warnings and errors still show. With
    ``enabled`` false it attaches nothing (evaluation, which writes no answers, layers ``report_answers: false``).
    """

    def __init__(
        self, output_dir: str | Path, record_key: str = "record", engine_lines: bool = False, enabled: bool = True
    ) -> None:
        self.enabled = as_bool(enabled, "enabled")
        self.output_dir = Path(output_dir)
        self.record_key = record_key
        self.engine_lines = as_bool(engine_lines, "engine_lines")
        self.logger = logging.getLogger(__name__)
        self.files: list[Path] = []
        self.answers = 0
        self.run_started = self.started = time.perf_counter()

    def attach(self, engine) -> None:
        if not self.enabled:  # e.g. evaluation, which writes no answers
            return
        if not self.engine_lines:
            engine.logger.setLevel(max(engine.logger.level, logging.WARNING))
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self.start_iteration)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.report)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def reset(self, engine=None) -> None:
        self.files, self.answers = [], 0
        self.run_started = time.perf_counter()

    def start_iteration(self, engine=None) -> None:
        self.started = time.perf_counter()

    @staticmethod
    def _total(engine) -> int | None:
        """Number of items the run answers: its data loader's dataset's (or data's) length, if it has one."""
        data = getattr(engine, "data_loader", None) or engine.state.dataloader
        try:
            return len(getattr(data, "dataset", data))
        except TypeError:
            return None

    def report(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        records = [o[self.record_key] for o in outputs if isinstance(o, Mapping) and self.record_key in o]
        seconds = (time.perf_counter() - self.started) / max(1, len(records))
        total = self._total(engine)
        for record in records:
            self.answers += 1
            self.files += written_files(self.output_dir, record)
            place = f"[{self.answers}/{total}]" if total else f"[{self.answers}]"
            self.logger.info(f"{place} {answer_line(record, seconds)}")

    def finish(self, engine=None) -> None:
        elapsed = format_duration(time.perf_counter() - self.run_started)
        self.logger.info(f"{wrote_line(self.output_dir, self.files, self.answers)} ({elapsed})")


class TrainingScalars:
    """``output_transform`` of MONAI's ``TensorBoardStatsHandler`` that gives, per iteration, the loss
    (``train_loss``), each of its terms (``loss/<term>``, :meth:`custom.losses.LSMSLoss.weighted_terms`) and the
    learning rate of each parameter group (``learning_rate``; ``learning_rate/<k>`` when there are several)."""

    def __init__(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_tag: str = "train_loss") -> None:
        self.loss, self.optimizer, self.loss_tag = loss, optimizer, loss_tag

    def __call__(self, output) -> dict[str, float]:
        scalars = {self.loss_tag: float(from_engine(["loss"], first=True)(output))}
        scalars.update({f"loss/{name}": float(value) for name, value in getattr(self.loss, "terms", {}).items()})
        groups = self.optimizer.param_groups
        for k, group in enumerate(groups):
            scalars["learning_rate" if len(groups) == 1 else f"learning_rate/{k}"] = float(group["lr"])
        return scalars
