"""MONAI Label train task: fine-tune the served weights on the studies labelled in 3D Slicer, keep every version.

``POST /train/lsms`` (with ``--conf training true``) makes MONAI Label start a training process that calls
:class:`LSMSFineTune` with the studies datastore. A run:

1. takes the studies with a ``final`` label (3D Slicer's *Submit Label*: a NIfTI label map, 1 = liver, 2 = lesion),
   at least :data:`MIN_STUDIES` of them;
2. stages them in the LiTS layout (``volume-<id>.nii.gz`` / ``segmentation-<id>.nii.gz``, links to the datastore's
   files) and imports them as a referring dataset (``custom.data.import_labelled``, seed fixed);
3. puts each study in the same split in every run (``splits.json``): a study held out for the test once is never
   trained on, so each version is compared on studies neither weights were trained on;
4. runs ``python -m custom.fine_tune`` into a new version folder, starting from the served weights;
5. keeps the version with its ``comparison.json`` and run record, and serves it only when ``better`` is true: its
   ``dice_3d`` on the held-out test studies is higher than that of the weights it started from.

See ``lib/versions.py`` for the folders and README.md, "Training on submitted labels".
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.versions import COMPARISON, VersionStore, metrics_of, now, read_json, write_json

logger = logging.getLogger(__name__)

#: The request options of a run: name -> (default, least, most). Whole numbers only.
TRAIN_OPTIONS: Dict[str, Tuple[int, int, int]] = {
    "epochs": (40, 1, 1000),
    "referral_epochs": (40, 1, 1000),
    "replay_cases": (32, 0, 1000),
}
#: What each option means (``/info``, README).
OPTION_HELP = {
    "epochs": "epochs of fine-tuning the segmentation network on the labelled training studies",
    "referral_epochs": "epochs of retraining the referral scorer on the fine-tuned network's candidates",
    "replay_cases": "generated cases of the original training data mixed in, so that the network keeps what it knew",
}
#: Request keys that are not options: MONAI Label's client id, and what its train process adds to the request.
CLIENT_KEYS = frozenset({"client_id"})
RUN_KEYS = frozenset({"model", "gpus", "local_rank"}) | CLIENT_KEYS

LABEL_TAG = "final"
MIN_STUDIES = 3
SPLITS = ("training", "validation", "test")
#: Target fractions of the splits (those of custom.data.import_labelled); validation and test get a study first.
SPLIT_FRACTIONS = (0.75, 0.125, 0.125)
SEED = 0
NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
FINE_TUNE = ("-m", "custom.fine_tune")


class TrainOptionError(ValueError):
    """A request option of the train task that is unknown or out of range (HTTP 422)."""


class TrainingError(RuntimeError):
    """A run that cannot go on: its message names the problem and the fix, in one line."""


# ---------------------------------------------------------------------------------------------- request options
def option_value(name: str, value: Any) -> int:
    """``value`` of option ``name`` as a whole number within its range; :class:`TrainOptionError` otherwise."""
    _, least, most = TRAIN_OPTIONS[name]
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", value):
        number = int(value)
    if number is None or not least <= number <= most:
        raise TrainOptionError(
            f"Training option '{name}' is {value!r}; it must be a whole number from {least} to {most}."
        )
    return number


def train_options(params: Optional[Mapping[str, Any]], ignored: frozenset = CLIENT_KEYS) -> Dict[str, int]:
    """The options of a train request (``params``, a JSON object), defaults filled in.

    Keys in ``ignored`` are skipped; any other unknown key raises :class:`TrainOptionError`.
    """
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise TrainOptionError(
            f"The training request must be a JSON object of options, not {type(params).__name__}; send e.g. "
            '{"epochs": 5}.'
        )
    unknown = sorted(str(key) for key in params if key not in TRAIN_OPTIONS and key not in ignored)
    if unknown:
        raise TrainOptionError(
            f"Unknown training option(s) {', '.join(repr(k) for k in unknown[:3])}. This trainer takes "
            f"{', '.join(TRAIN_OPTIONS)} (see GET /info/, trainers.lsms)."
        )
    return {name: option_value(name, params.get(name, default)) for name, (default, _, _) in TRAIN_OPTIONS.items()}


def train_options_problem(params: Any) -> Optional[str]:
    """Why ``params`` are not options of a train request, or None (the guard answers it with 422)."""
    try:
        train_options(params)
    except TrainOptionError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------------------------------- labelled studies
@dataclass(frozen=True)
class LabelledStudy:
    """A study of the datastore with a ``final`` label: its id, CT file and label file."""

    study_id: str
    image: Path
    label: Path


def _file_problem(path: str, what: str) -> Optional[str]:
    """Why ``path`` (a study's CT or label) cannot be trained on, or None."""
    if not path or not os.path.isfile(path):
        return f"its {what} file is missing"
    if not NIFTI.search(path):
        return (
            f"its {what} is {Path(path).name}, not NIfTI; the trainer reads .nii.gz CTs and label maps (1 = liver, "
            "2 = lesion): submit it as .nii.gz"
        )
    return None


def labelled_studies(datastore: Datastore) -> Tuple[List[LabelledStudy], List[Dict[str, str]]]:
    """The studies with a ``final`` label that can be read, and the others as ``{"study", "reason"}``."""
    usable, skipped = [], []
    for study_id in sorted(datastore.list_images()):
        label = datastore.get_label_uri(study_id, LABEL_TAG)
        if not label:
            continue
        image = datastore.get_image_uri(study_id)
        problem = _file_problem(image, "CT") or _file_problem(label, "label")
        if problem:
            skipped.append({"study": study_id, "reason": problem})
        else:
            usable.append(LabelledStudy(study_id, Path(image), Path(label)))
    return usable, skipped


def check_enough(studies: List[LabelledStudy], skipped: List[Dict[str, str]], least: int = MIN_STUDIES) -> None:
    """:class:`TrainingError` when fewer than ``least`` studies can be trained on."""
    if len(studies) >= least:
        return
    why = "; ".join(f"{s['study']}: {s['reason']}" for s in skipped)
    raise TrainingError(
        f"Training needs at least {least} studies with a '{LABEL_TAG}' label (one each for training, validation "
        f"and the held-out test); {len(studies)} can be used" + (f" (not used: {why})" if why else "") + ". Label "
        "more studies in 3D Slicer (Submit Label: 1 = liver, 2 = lesion) and train again."
    )


def _suffix(path: Path) -> str:
    return NIFTI.search(path.name).group(0).lower()


def _stage_names(studies: List[LabelledStudy]) -> Dict[str, str]:
    """study id -> a file-name-safe, unique name for the staged files."""
    names, used = {}, set()
    for study in studies:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", study.study_id).strip("._") or "study"
        name, number = base, 2
        while name in used:
            name, number = f"{base}_{number}", number + 1
        used.add(name)
        names[study.study_id] = name
    return names


def stage_lits(studies: List[LabelledStudy], folder: Path) -> Dict[str, LabelledStudy]:
    """Link the studies into ``folder`` in the LiTS layout; returns the importer's case id -> study."""
    folder.mkdir(parents=True)
    cases = {}
    for study_id, name in _stage_names(studies).items():
        study = next(s for s in studies if s.study_id == study_id)
        for kind, source in (("volume", study.image), ("segmentation", study.label)):
            link = folder / f"{kind}-{name}{_suffix(source)}"
            try:
                link.symlink_to(source)
            except OSError:  # a file system without links
                shutil.copyfile(source, link)
        cases[f"lits_{name}"] = study
    return cases


def _readable(text: str, staged: Path, cases: Dict[str, LabelledStudy]) -> str:
    """``text`` of the importer with the staged files named by their datastore files and ids."""
    for case_id, study in cases.items():
        name = case_id[len("lits_") :]
        for kind, source in (("volume", study.image), ("segmentation", study.label)):
            text = text.replace(str(staged / f"{kind}-{name}{_suffix(source)}"), str(source))
        text = text.replace(case_id, study.study_id)
    return text.replace(str(staged), "the labelled studies")


def import_studies(staged: Path, dataset: Path, cases: Dict[str, LabelledStudy]) -> Tuple[Path, dict]:
    """Import the staged studies (``custom.data.import_labelled``); (datalist path, import report).

    A study the importer refuses is left out (the report says why); fewer than :data:`MIN_STUDIES` imported is a
    :class:`TrainingError` naming each refused study and its reason.
    """
    from custom.data.import_labelled import DatasetImportError, import_labelled

    try:
        return import_labelled(staged, dataset, layout="lits", seed=SEED, progress=False)
    except DatasetImportError as err:
        refused = (err.report or {}).get("refused", [])
        reasons = "; ".join(f"{r['case_id']}: {r['reason']}" for r in refused)
        detail = f" Refused: {reasons}" if reasons else ""
        raise TrainingError(
            _readable(
                f"The labelled studies could not be used for training: {err}{detail} Correct the labels in 3D "
                "Slicer (1 = liver, 2 = lesion, on the study's grid) and train again.",
                staged,
                cases,
            )
        ) from err


# ---------------------------------------------------------------------------------------------- splits
def assign_splits(study_ids: Sequence[str], known: Mapping[str, str]) -> Dict[str, str]:
    """A split for each study: the one it had (``known``), else the one furthest below its target share.

    Validation and test get a study first when they have none. Deterministic: new studies are taken in order.
    """
    splits = {sid: known[sid] for sid in study_ids if known.get(sid) in SPLITS}
    for sid in sorted(set(study_ids) - set(splits)):
        counts = {name: sum(1 for s in splits.values() if s == name) for name in SPLITS}
        empty = [name for name in ("validation", "test") if counts[name] == 0]
        if empty:
            splits[sid] = empty[0]
            continue
        total = len(splits) + 1
        splits[sid] = max(SPLITS, key=lambda name: SPLIT_FRACTIONS[SPLITS.index(name)] * total - counts[name])
    return splits


def resplit_datalist(datalist_path: Path, splits: Mapping[str, str], cases: Mapping[str, LabelledStudy]) -> dict:
    """Put each case of the imported datalist in its study's split (``splits``); returns split -> study ids.

    :class:`TrainingError` when a split is left without a study.
    """
    from custom.data.io import write_json_atomic

    datalist = read_json(datalist_path) or {}
    records = [record for name in SPLITS for record in datalist.get(name, [])]
    regrouped: Dict[str, list] = {name: [] for name in SPLITS}
    for record in records:
        regrouped[splits[cases[record["case_id"]].study_id]].append(record)
    empty = [name for name in SPLITS if not regrouped[name]]
    if empty:
        raise TrainingError(
            f"No labelled study is left for the {' and '.join(empty)} split (its studies were removed or refused); "
            "each study keeps its split across runs. Label one more study in 3D Slicer and train again."
        )
    datalist.update(regrouped)
    write_json_atomic(datalist_path, datalist)
    return {name: sorted(cases[r["case_id"]].study_id for r in regrouped[name]) for name in SPLITS}


# ---------------------------------------------------------------------------------------------- fine-tuning
def run_streamed(command: Sequence[str], cwd: Path, keep: int = 40) -> Tuple[int, List[str]]:
    """Run ``command``, its output copied line by line to this process's output; (exit code, last lines)."""
    logger.info(f"Running: {' '.join(map(str, command))}")
    tail: deque = deque(maxlen=keep)
    process = subprocess.Popen(
        list(map(str, command)), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    with process.stdout:
        for line in process.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip())
    return process.wait(), list(tail)


def failure_line(lines: List[str]) -> str:
    """The ``error: ...`` line of a failed command's output, else its last line."""
    errors = [line for line in lines if line.startswith("error:")]
    text = errors[-1] if errors else next((line for line in reversed(lines) if line.strip()), "no output")
    return text[len("error:") :].strip() if text.startswith("error:") else text.strip()


def read_comparison(run_dir: Path) -> Dict[str, Any]:
    """``run_dir/comparison.json`` of a finished fine-tuning; :class:`TrainingError` when it is not usable."""
    comparison = read_json(run_dir / COMPARISON)
    usable = (
        comparison is not None
        and isinstance(comparison.get("better"), bool)
        and isinstance(comparison.get("initial"), dict)
        and isinstance(comparison.get("fine_tuned"), dict)
    )
    if not usable:
        raise TrainingError(
            f"The fine-tuning wrote no usable {run_dir / COMPARISON} (initial, fine_tuned, better); this version is "
            "kept but not served. Read the training log (GET /train/) and train again."
        )
    return comparison


def _remove_stale_work(work_root: Path) -> None:
    """Remove the work folders of runs whose process has ended (stopped runs leave theirs)."""
    from custom.clinical.outputs import process_alive

    if not work_root.is_dir():
        return
    for folder in work_root.glob("run-*"):
        pid = folder.name.split("-")[1] if folder.name.count("-") >= 2 else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the task
class LSMSFineTune(TrainTask):
    """Fine-tune the served weights on the labelled studies; keep the version, serve it when better (module doc).

    Args:
        bundle_path: the bundle folder (its configs; its ``models`` are the weights served while no version is).
        store: the versions folder and served-version pointer (:class:`lib.versions.VersionStore`).
        code_root: the folder holding the ``custom`` package (the commands run there).
        command: the fine-tuning command before its options; default ``python -m custom.fine_tune``.
    """

    def __init__(self, bundle_path: str, store: VersionStore, code_root: str, command: Optional[Sequence[str]] = None):
        super().__init__(
            "Fine-tune the served weights on the studies with a 'final' label (1 = liver, 2 = lesion; at least "
            f"{MIN_STUDIES}); the new version is served when its Dice on the held-out test studies is higher."
        )
        self.bundle_path = Path(bundle_path)
        self.store = store
        self.code_root = Path(code_root)
        self.command = list(command) if command else [sys.executable, *FINE_TUNE]

    # ------------------------------------------------------------------ MONAI Label interface
    def config(self) -> Dict[str, int]:
        """The request options and their defaults (3D Slicer shows them as editable training options)."""
        return {name: default for name, (default, _, _) in TRAIN_OPTIONS.items()}

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["options"] = {
            name: {"default": default, "min": least, "max": most, "help": OPTION_HELP[name]}
            for name, (default, least, most) in TRAIN_OPTIONS.items()
        }
        info["label_tag"] = LABEL_TAG
        info["min_studies"] = MIN_STUDIES
        info["served"] = self.store.served().version
        return info

    def stats(self) -> Dict[str, Any]:
        """The served version and every version with its metrics (``/info``'s ``train_stats``)."""
        return self.store.stats()

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        _print_training_errors_as_one_line()
        options = train_options(request, ignored=RUN_KEYS)
        studies, skipped = labelled_studies(datastore)
        check_enough(studies, skipped)
        work_root = self.store.root / "work"
        _remove_stale_work(work_root)
        work = work_root / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            return self._run(options, studies, skipped, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ one run
    def _dataset(self, studies: List[LabelledStudy], work: Path) -> Tuple[Path, dict, dict]:
        """Stage, import and split the studies; (dataset folder, split -> study ids, import report)."""
        cases = stage_lits(studies, work / "staged")
        datalist, report = import_studies(work / "staged", work / "dataset", cases)
        imported = [cases[case["case_id"]].study_id for case in report["cases"]]
        splits_path = self.store.root / "splits.json"
        splits = assign_splits(imported, read_json(splits_path) or {})
        by_split = resplit_datalist(datalist, splits, cases)
        write_json(splits_path, {**(read_json(splits_path) or {}), **splits}, overwrite=True)
        refused = [
            {"study": cases[r["case_id"]].study_id, "reason": _readable(r["reason"], work / "staged", cases)}
            for r in report["refused"]
            if r["case_id"] in cases
        ]
        return datalist.parent, by_split, {"refused": refused, "lesions": report["lesions"]["total"]}

    def _fine_tune(self, dataset: Path, run_dir: Path, initial, options: Dict[str, int]) -> Tuple[int, List[str]]:
        """Run the fine-tuning command into ``run_dir``; (exit code, last output lines)."""
        command = self.command + [
            "--dataset_dir", dataset, "--run_dir", run_dir,
            "--initial_weights", initial.model, "--initial_scorer", initial.scorer,
            "--epochs", options["epochs"], "--referral_epochs", options["referral_epochs"],
            "--replay_cases", options["replay_cases"], "--bundle_dir", self.bundle_path,
            "--cache_dir", self.store.root / "cache",  # generated replay cases, kept for the next runs
        ]  # fmt: skip
        return run_streamed(command, self.code_root)

    def _run(self, options, studies, skipped, work: Path) -> Dict[str, Any]:
        """Prepare the dataset, fine-tune into a new version, record it and serve it when better."""
        work.mkdir(parents=True)
        dataset, by_split, imported = self._dataset(studies, work)
        initial = self.store.served()
        name, run_dir = self.store.new_version()
        record: Dict[str, Any] = {
            "version": name,
            "started": now(),
            "initial_weights": initial.version,
            "options": options,
            "studies": by_split,
            "not_used": skipped + imported["refused"],
        }
        logger.info(f"Training {name} from the {initial.version} weights on {by_split} with {options}")
        code, lines = self._fine_tune(dataset, run_dir, initial, options)
        record["finished"] = now()
        if code != 0:
            self.store.record(name, {**record, "status": "failed", "error": failure_line(lines)})
            raise TrainingError(f"Fine-tuning {name} failed: {failure_line(lines)}")
        try:
            comparison = read_comparison(run_dir)
        except TrainingError as err:
            self.store.record(name, {**record, "status": "failed", "error": str(err)})
            raise
        record.update(status="done", **metrics_of(comparison), promoted=comparison["better"])
        self.store.record(name, record)
        if comparison["better"]:
            self.store.serve(name, {"replaces": initial.version, **metrics_of(comparison)})
        served = self.store.served().version
        logger.info(
            f"{name}: {record['metric']} {record['initial']} ({initial.version}) -> {record['fine_tuned']} on "
            f"{len(by_split['test'])} held-out test stud{'y' if len(by_split['test']) == 1 else 'ies'}; "
            f"serving {served}"
        )
        return {**record, "served": served}


def _print_training_errors_as_one_line() -> None:
    """Make this process end a :class:`TrainingError` with one ``error: <message>`` line (no traceback).

    MONAI Label runs each training in its own process and shows its last output lines as the task's details.
    """
    previous = sys.excepthook
    if getattr(previous, "_lsms_training", False):
        return

    def hook(kind, error, tb):
        if isinstance(error, (TrainingError, TrainOptionError)):
            sys.stdout.flush()
            print(f"error: {error}", file=sys.stderr, flush=True)
            return
        previous(kind, error, tb)

    hook._lsms_training = True
    sys.excepthook = hook
