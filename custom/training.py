"""Training runs that keep what they have: their own run folder, a resumable full state, explicit publishing.

- :func:`check_run_dir` (in ``initialize`` of ``train.json``, before any folder is created): a run folder must be
  a folder of its own (not the filesystem root, the user's home, the checkout or a folder containing it, nor inside
  the bundle or its ``custom`` code); a run folder that already holds a run is only reused with ``--resume true``;
  ``--resume true`` on a folder without a saved state is refused.
- :class:`ResumableTraining` (a trainer handler): saves the network, optimiser, scheduler, trainer counters and the
  best validation metric to ``<ckpt_dir>/training_state.pt`` every ``interval`` epochs, atomically (temporary file,
  fsync, rename), and restores them when resuming. Every epoch starts from seeds derived from ``(seed, epoch)``, so
  a resumed run repeats exactly the epochs an uninterrupted run would have had.
- ``python -m custom.training publish --run_dir runs/training``: the one step that replaces the bundle's shipped
  weights (``bundle/models/model.pt``) with a run's best model, and the referral scorer with the run's own when it
  has one (``models/referral_scorer.pt``, from ``custom.fine_tune``), logged. Every replaced file is kept in the run
  folder as ``models/replaced/<model|referral_scorer>-<UTC time>-<sha256[:12]>.pt``, never over a kept one;
  publishing the files that are shipped already changes nothing.
- ``python -m custom.training widen --weights bundle/models/model.pt --windows 2 3 --out widened.pt``: a weights file
  for a network with more HU windows or neighbouring slices (``--context_slices 0 2``) that starts with the outputs
  of the original one, for ``--initial_weights`` (:func:`custom.networks.weights.widen_input_channels`).

MONAI's ``CheckpointSaver``/``CheckpointLoader`` are not used for the full state: ``CheckpointSaver`` writes through
a non-atomic ``DiskSaver`` (a kill during a save leaves a truncated file) and keeps no evaluator best metric.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.data.utils import set_rnd
from monai.utils import min_version, optional_import, set_determinism

from custom.clinical.errors import OutputExistsError
from custom.clinical.writers import atomic_write, file_sha256
from custom.errors import InputError
from custom.user_inputs import as_bool

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = [
    "PublishError",
    "ResumableTraining",
    "RunFolderError",
    "check_run_dir",
    "check_schedule",
    "check_dataset_cache",
    "keep_replaced",
    "publish_weights",
    "widen_weights",
    "STATE_FILE",
]

logger = logging.getLogger(__name__)

#: File name of the full training state inside the checkpoint folder.
STATE_FILE = "training_state.pt"
#: File name of the best model (network weights only) inside the checkpoint folder.
MODEL_FILE = "model.pt"
#: File name of the referral scorer trained for a run's model (``custom.fine_tune`` writes it beside the model).
SCORER_FILE = "referral_scorer.pt"
#: Folder of the run's checkpoint folder where ``publish`` keeps every shipped model it replaced.
REPLACED_FOLDER = "replaced"
#: The folder that holds the ``custom`` package: the repository checkout, or a packaged bundle.
CODE_ROOT = Path(__file__).resolve().parents[1]


class RunFolderError(InputError, ValueError):
    """A training run folder that cannot be used as asked (it holds a run already, or there is nothing to resume)."""


def _protected_folders(root: Path) -> list[Path]:
    """The folders of ``root`` a run must never write into: the bundle and its code (``bundle/`` and ``custom/`` of
    the repository, or the shipped folders of a packaged bundle)."""
    if (root / "bundle").is_dir():
        return [root / "bundle", root / "custom"]
    return [root / name for name in ("configs", "models", "docs", "sample", "custom")]


def _home() -> Path | None:
    """The user's home folder, resolved (None where it cannot be determined)."""
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):
        return None


def unsafe_folder_reason(folder: str | os.PathLike, root: str | os.PathLike = CODE_ROOT) -> str | None:
    """Why training must not create its folders in ``folder`` (symlinks resolved), or None where it may.

    Refused: the filesystem root, the user's home, the checkout ``root`` or a folder that contains it, and any folder
    inside the bundle or its code (:func:`_protected_folders`).
    """
    real, root = Path(folder).resolve(), Path(root).resolve()
    if real == Path(real.anchor):
        return "is the filesystem root"
    if real == _home():
        return "is your home folder"
    if real == root:
        return "is the repository checkout"
    if root.is_relative_to(real):
        return f"contains the repository checkout ('{root}')"
    for protected in _protected_folders(root):
        if real.is_relative_to(protected):
            return f"is inside the bundle's own files ('{protected}')"
    return None


def _check_run_folders(folders: Mapping[str, str | os.PathLike | None]) -> None:
    """Raise :class:`RunFolderError` for the first of ``{option: folder}`` that training must not write into."""
    for option, folder in folders.items():
        if folder is None:
            continue
        reason = unsafe_folder_reason(folder)
        if reason is not None:
            raise RunFolderError(
                f"{option} '{folder}' {reason}, not a folder for a training run (it gets logs/ and models/); nothing "
                "was created. Give the run a folder of its own: --run_dir runs/<name>."
            )


def check_run_dir(
    ckpt_dir: str | os.PathLike,
    resume: Any = False,
    run_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> bool:
    """Check the run's folders before anything is created; returns ``resume``.

    Refuses (:class:`RunFolderError`) a run folder (``run_dir``, else the parent of ``ckpt_dir``), checkpoint
    folder or log folder (``output_dir``) that is not a folder of the run's own (:func:`unsafe_folder_reason`), a new
    run over a saved one, and ``resume`` without a saved state.
    """
    resume = as_bool(resume, "resume")
    folder = Path(ckpt_dir)
    run_folder = Path(run_dir) if run_dir is not None else folder.parent
    _check_run_folders({"--run_dir": run_folder, "--ckpt_dir": folder, "--output_dir": output_dir})
    saved = [p for p in (folder / STATE_FILE, folder / MODEL_FILE) if p.is_file()]
    if resume and not (folder / STATE_FILE).is_file():
        raise RunFolderError(
            f"Nothing to resume: '{folder / STATE_FILE}' does not exist. Pass the --run_dir of an interrupted run, or "
            "leave out --resume to start a new one."
        )
    if not resume and saved:
        raise RunFolderError(
            f"'{folder}' holds a training run already ({saved[0].name}); it is left untouched. Continue it with "
            "--resume true, or start a new run with --run_dir runs/<new name>."
        )
    return resume


def check_schedule(epochs: int, val_interval: int) -> bool:
    """Warn when no validation would run (``epochs < val_interval``): no best model would be saved and ``publish``
    would have nothing to publish. Returns whether a validation runs."""
    validates = int(epochs) >= int(val_interval)
    if not validates:
        logger.warning(
            f"--epochs {epochs} is below --val_interval {val_interval}: no validation runs, so no best model "
            f"(models/{MODEL_FILE}) is saved. Pass --val_interval {epochs} or more --epochs."
        )
    return validates


DATASET_CACHES = ("memory", "disk")


def check_dataset_cache(dataset_cache: str) -> bool:
    """Refuse a ``--dataset_cache`` other than ``memory`` (MONAI's ``CacheDataset``: every preprocessed training case
    held in memory) or ``disk`` (``PersistentDataset``: each case's liver-centred crop written once under
    ``crop_cache_dir`` and read back when drawn, so memory stays flat however many cases there are)."""
    if dataset_cache not in DATASET_CACHES:
        raise InputError(
            f"--dataset_cache is '{dataset_cache}', which is not a training cache. Pass --dataset_cache memory "
            "(fastest; every case held in memory) or --dataset_cache disk (for many or full-size cases)."
        )
    return True


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _BestMetric:
    """State-dict view of an evaluator's best metric and its epoch."""

    def __init__(self, evaluator) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


class ResumableTraining:
    """Trainer handler: per-epoch seeds, full-state saves every ``interval`` epochs, and restore on ``resume``.

    Args:
        save_dir: folder of ``training_state.pt``.
        objects: what to save and restore, by name (e.g. network, optimizer, lr_scheduler); each has
            ``state_dict``/``load_state_dict``. The trainer itself is added when attached.
        evaluator: the validation evaluator whose best metric is kept (optional).
        dataset: the training dataset whose random transforms are re-seeded every epoch.
        seed: base seed; epoch ``e`` starts from seed ``seed + e``.
        interval: epochs between saves (the last epoch is always saved).
        resume: restore the saved state when the trainer starts.

    Attach it after the handlers that act at the end of an epoch (validation, learning-rate schedule), so that the
    state it saves includes their effect.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        objects: Mapping[str, Any],
        evaluator=None,
        dataset=None,
        seed: int = 0,
        interval: int = 1,
        resume: Any = False,
    ) -> None:
        self.path = Path(save_dir) / STATE_FILE
        self.objects = dict(objects)
        if evaluator is not None:
            self.objects["best_metric"] = _BestMetric(evaluator)
        self.dataset = dataset
        self.seed = int(seed)
        self.interval = max(1, int(interval))
        self.resume = as_bool(resume, "resume")

    def attach(self, engine) -> None:
        self.objects["trainer"] = engine
        engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_STARTED, self.seed_epoch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _unwrapped(self, name: str):
        target = self.objects[name]
        return target.module if hasattr(target, "module") and isinstance(target, torch.nn.Module) else target

    def restore(self, engine) -> None:
        if not self.resume:
            return
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        max_epochs = engine.state.max_epochs
        for name in self.objects:
            if name not in state:
                raise RunFolderError(f"'{self.path}' has no '{name}' state; it was not written by this training.")
            self._unwrapped(name).load_state_dict(state[name])
        if engine.state.epoch >= max_epochs:
            raise RunFolderError(
                f"The saved run finished epoch {engine.state.epoch} of {max_epochs}; nothing is left to train. "
                "Raise --epochs to train further."
            )
        engine.state.max_epochs = max_epochs
        logger.info(f"Resumed training from {self.path} at epoch {engine.state.epoch}.")

    def seed_epoch(self, engine) -> None:
        seed = self.seed + int(engine.state.epoch)
        set_determinism(seed=seed)
        if self.dataset is not None:
            set_rnd(self.dataset, seed)

    def save(self, engine) -> None:
        epoch = int(engine.state.epoch)
        if (epoch % self.interval and epoch != engine.state.max_epochs) or not _is_main_process():
            return
        state = {name: self._unwrapped(name).state_dict() for name in self.objects}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp), overwrite=True)


class PublishError(InputError, ValueError):
    """A run whose model cannot be published, or a bundle folder that is not one."""


def _utc_stamp() -> str:
    """The current UTC time for file names, e.g. ``20250131T235959Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _run_model(run_dir: str | os.PathLike) -> Path:
    """The best model of the run in ``run_dir`` (``models/model.pt``), checked to hold network weights."""
    from custom.networks.weights import CheckpointError, check_checkpoint

    source = Path(run_dir) / "models" / MODEL_FILE
    if not source.is_file():
        raise PublishError(
            f"The run folder '{run_dir}' has no best model: '{source}' does not exist (training writes it at its "
            "first validation). Pass the folder of a run that has validated at least once: --run_dir runs/<name>."
        )
    try:
        check_checkpoint(source)
    except CheckpointError as err:
        raise PublishError(
            f"'{source}' holds no network weights (a PyTorch state dict of tensors), so it cannot be published. "
            "Pass the folder of a run of this bundle's training: --run_dir runs/<name>."
        ) from err
    return source


def keep_replaced(model: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Keep a copy of ``model`` as ``<run_dir>/models/replaced/<stem>-<UTC time>-<sha12>.pt`` (``model-...`` for
    ``model.pt``); returns its path.

    A kept copy is never overwritten (exclusive create); a file of the same sha256 kept already is reused.
    """
    model = Path(model)
    digest = file_sha256(model)
    folder = Path(run_dir) / "models" / REPLACED_FOLDER
    for kept in sorted(folder.glob(f"{model.stem}-*-{digest[:12]}*.pt")):
        if kept.is_file() and file_sha256(kept) == digest:
            return kept
    stamp = _utc_stamp()
    for attempt in range(1, 100):
        suffix = "" if attempt == 1 else f"-{attempt}"
        kept = folder / f"{model.stem}-{stamp}-{digest[:12]}{suffix}.pt"
        try:
            return atomic_write(kept, lambda tmp: shutil.copyfile(model, tmp), overwrite=False, protected=[model])
        except OutputExistsError:
            continue
    raise PublishError(f"Could not find a free file name in '{folder}' to keep '{model}'. Publish again.")


def _run_scorer(run_dir: str | os.PathLike) -> Path | None:
    """The referral scorer trained for the run's model (``models/referral_scorer.pt``, as ``custom.fine_tune``
    writes it), checked to load; None when the run has none."""
    from custom.referral.choose import load_scorer

    source = Path(run_dir) / "models" / SCORER_FILE
    if not source.is_file():
        return None
    retrain = (
        f"Retrain it for the run's model with python -m custom.referral.training --checkpoint "
        f"{Path(run_dir) / 'models' / MODEL_FILE} --out {source}, or remove it."
    )
    try:
        load_scorer(source)
        trained_for = torch.load(source, map_location="cpu", weights_only=True).get("segmentation_sha256")
    except Exception as err:  # a file of the run folder that is not a scorer: refuse before publishing anything
        raise PublishError(f"'{source}' is not a referral scorer ({err}), so the run cannot be published with it. "
                           f"{retrain}") from err  # fmt: skip
    if trained_for != file_sha256(Path(run_dir) / "models" / MODEL_FILE):
        raise PublishError(f"'{source}' was not trained on the candidates of the run's model, so the two cannot be "
                           f"published together. {retrain}")  # fmt: skip
    return source


def _replace(source: Path, target: Path, run_dir: str | os.PathLike) -> Path:
    """Copy ``source`` over ``target``, the replaced file kept first; an identical ``target`` changes nothing."""
    new = file_sha256(source)
    if target.is_file():
        old = file_sha256(target)
        if old == new:
            logger.warning(f"{target} is already {source} (sha256 {new[:12]}); nothing was changed.")
            return target
        kept = keep_replaced(target, run_dir)
        logger.warning(f"Replacing {target} (sha256 {old[:12]}); the replaced file is kept as {kept}.")
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), overwrite=True, protected=[source])
    logger.warning(f"Published {source} as {target} (sha256 {file_sha256(target)[:12]}).")
    return target


def _check_bundle_dir(bundle_dir: Path) -> None:
    """Refuse a ``--bundle_dir`` that is not a bundle folder (no ``configs/metadata.json``)."""
    if not (bundle_dir / "configs" / "metadata.json").is_file():
        raise PublishError(
            f"'{bundle_dir}' is not a bundle folder (it has no configs/metadata.json). Pass the bundle folder with "
            "--bundle_dir (bundle in the repository, . inside a packaged bundle)."
        )


def publish_weights(run_dir: str | os.PathLike, bundle_dir: str | os.PathLike = "bundle") -> Path:
    """Replace ``<bundle_dir>/models/model.pt`` by the best model of a run, and ``referral_scorer.pt`` by the run's
    scorer when it has one (a fine-tune's); returns the bundle's model path.

    Both files are checked before either is written. Each replaced file is kept first (:func:`keep_replaced`);
    files identical to the shipped ones change nothing.
    """
    source = _run_model(run_dir)
    scorer = _run_scorer(run_dir)
    _check_bundle_dir(Path(bundle_dir))
    target = _replace(source, Path(bundle_dir) / "models" / MODEL_FILE, run_dir)
    if scorer is not None:
        _replace(scorer, Path(bundle_dir) / "models" / SCORER_FILE, run_dir)
    return target


def widen_weights(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    windows: tuple[int, int],
    context_slices: tuple[int, int],
    overwrite: bool = False,
) -> Path:
    """Write to ``out`` the weights at ``weights`` widened to more input channels
    (:func:`custom.networks.weights.widen_input_channels`); an existing ``out`` only with ``overwrite``."""
    from custom.networks.weights import read_weights, widen_input_channels

    widened = widen_input_channels(read_weights(weights), windows, context_slices)
    target = Path(out)
    atomic_write(target, lambda tmp: torch.save(widened, tmp), overwrite=overwrite, protected=[weights])
    logger.warning(f"Wrote {target}: {windows[1]} windows, {context_slices[1]} context slices, from {weights}.")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom.training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="replace the bundle's shipped weights by a run's best model")
    publish.add_argument(
        "--run_dir", required=True, help="the training run folder (holds models/model.pt; keeps models/replaced/)"
    )
    publish.add_argument(
        "--bundle_dir", default=None, help="the bundle folder (default: this code's bundle, bundle/ in the repository)"
    )
    widen = commands.add_parser("widen", help="a weights file for more HU windows or neighbouring slices")
    widen.add_argument("--weights", default="bundle/models/model.pt", help="the weights to widen")
    widen.add_argument("--windows", type=int, nargs=2, default=(2, 2), metavar=("FROM", "TO"), help="HU windows")
    widen.add_argument(
        "--context_slices", type=int, nargs=2, default=(0, 0), metavar=("FROM", "TO"), help="neighbours on each side"
    )
    widen.add_argument("--out", required=True, help="the widened weights file to write")
    widen.add_argument("--overwrite", type=as_bool, default=False, help="replace an existing --out (true/false)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "publish":
            from custom.options import config_dir

            publish_weights(args.run_dir, args.bundle_dir or config_dir().parent)
        else:
            widen_weights(args.weights, args.out, tuple(args.windows), tuple(args.context_slices), args.overwrite)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
