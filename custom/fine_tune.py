"""Fine-tune the model on your own labelled CT and compare it with the weights it started from, on your held-out cases.

Usage, from the repository root (or a packaged bundle's folder)::

    python -m custom.data.import_labelled --src /path/to/labelled_ct --out datasets/site
    python -m custom.fine_tune --dataset_dir datasets/site --run_dir runs/fine_tune

Three steps, each the bundle's own command, printed before it runs, in one run folder (``--run_dir``):

1. **Segmentation network**: ``monai.bundle run training`` from ``--initial_weights`` (the shipped ``model.pt``) on
   the dataset's training split, its validation split choosing the best epoch, with ``--replay_cases`` generated
   phantom cases added so that a few real cases do not wipe out what the phantom taught. The dataset's cases are
   cached on disk as liver-centred crops (``--dataset_cache disk``), so memory does not grow with the number of
   cases (the cache is removed when the step ends); mixed precision is used where CUDA is present. Writes
   ``<run_dir>/models/model.pt``.
2. **Referral scorer**: ``custom.referral.training`` on the new weights' own candidates of the dataset's training
   and validation splits (and the replay cases). Writes ``<run_dir>/models/referral_scorer.pt``.
3. **Comparison**: ``monai.bundle run evaluating`` on the dataset's held-out test split, once with the initial
   weights and scorer and once with the fine-tuned pair, the same metrics for both. Prints the table and writes
   ``<run_dir>/comparison.json`` (``initial``, ``fine_tuned``: the evaluation summaries; ``better``: whether the
   fine-tuned pair has the higher 3D Dice per expression).

Nothing is published: the bundle's weights change only with ``python -m custom.training publish --run_dir <run_dir>``
(the model and its scorer, checked to be trained for it). ``--resume true`` continues an interrupted run: step 1
from its last saved epoch (skipped when it has trained every epoch), step 2 unless the run's scorer was trained for
the run's model, and step 3. A few training options may be added as ``--name value`` and go to the training command
(:data:`TRAINING_ONLY`, e.g. ``--batch_cases 4``; ``bundle/docs/options.md`` describes them). The cost of the
default schedule is in ``docs/experiments.md``; on a GPU, the same command uses it with mixed precision.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from custom.atomic_files import atomic_write
from custom.clinical.writers import file_sha256
from custom.data.datalist import load_datalist
from custom.errors import InputError
from custom.options import config_dir
from custom.training import MODEL_FILE, SCORER_FILE, STATE_FILE
from custom.user_inputs import as_bool

__all__ = ["COMPARED", "FineTuneError", "compare", "fine_tune", "main"]

#: Evaluation summary figures compared, with whether higher is better.
COMPARED = {
    "dice_3d": True,
    "mIoU": True,
    "oIoU": True,
    "instance_f1": True,
    "negatives_empty_rate": True,
    "false_positives_per_case": False,
}
COMPARISON_FILE = "comparison.json"
#: The training's disk cache of liver-centred crops in the run folder (``crop_cache_dir`` of ``train.json``).
CROPS_FOLDER = "training_crops"


class FineTuneError(InputError, ValueError):
    """A dataset or run folder that cannot be fine-tuned on; the message names the fix."""


def check_dataset(dataset_dir: Path) -> dict[str, int]:
    """The number of cases of each split of ``dataset_dir``'s datalist; refused when a split the recipe needs is
    empty (training to learn from, validation to choose the epoch, test to compare on)."""
    datalist = dataset_dir / "datalist.json"
    if not datalist.is_file():
        raise FineTuneError(
            f"--dataset_dir '{dataset_dir}' has no datalist.json. Import your labelled CT first with "
            "python -m custom.data.import_labelled --src <folder> --out <dataset>."
        )
    counts = {split: len(load_datalist(datalist, split)) for split in ("training", "validation", "test")}
    empty = [split for split, count in counts.items() if count == 0]
    if empty:
        raise FineTuneError(
            f"The dataset '{dataset_dir}' has no {' and no '.join(empty)} case. Fine-tuning needs all three splits "
            "(at least 3 labelled cases); import more cases."
        )
    return counts


def _run(command: list[str], log: Path) -> None:
    """Run one step, its output shown and appended to ``log``; a failed step stops the recipe."""
    print("$ " + " ".join(command), flush=True)
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            out.write(line)
        code = process.wait()
    if code:
        raise FineTuneError(
            f"The step above failed (exit {code}); its output is in {log}. Fix what it names and rerun."
        )


def training_command(args, bundle: Path, run_dir: Path) -> list[str]:
    """``monai.bundle run training`` from the initial weights on the dataset, into ``run_dir``."""
    val_interval = max(1, args.epochs // 4)
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(bundle / "configs" / "train.json"),
        "--bundle_root", str(bundle),
        "--dataset_dir", str(args.dataset_dir),
        "--initial_weights", str(args.initial_weights),
        "--run_dir", str(run_dir),
        "--epochs", str(args.epochs),
        "--val_interval", str(val_interval),
        "--save_interval", "1",
        "--learning_rate", str(args.learning_rate),
        "--replay_cases", str(args.replay_cases),
        "--cache_dir", str(args.cache_dir),
        "--resume", str(args.resume and (run_dir / "models" / STATE_FILE).is_file()).lower(),
        "--progress", "false",
        *args.training_options,
    ]  # fmt: skip


def referral_command(args, bundle: Path, run_dir: Path) -> list[str]:
    """``custom.referral.training`` on the fine-tuned weights' candidates of the dataset."""
    return [
        sys.executable, "-m", "custom.referral.training",
        "--config_file", _evaluation_config(bundle),
        "--dataset_dir", str(args.dataset_dir),
        "--checkpoint", str(run_dir / "models" / MODEL_FILE),
        "--extra_cases", str(args.replay_cases),
        "--epochs", str(args.referral_epochs),
        "--cache_dir", str(args.cache_dir),
        "--out", str(run_dir / "models" / SCORER_FILE),
    ]  # fmt: skip


def evaluation_command(args, bundle: Path, weights: Path, scorer: Path, output_dir: Path) -> list[str]:
    """``monai.bundle run evaluating`` of one weights and scorer pair on the dataset's test split."""
    return [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", repr([str(bundle / "configs" / name) for name in ("inference.json", "evaluate.json")]),
        "--bundle_root", str(bundle),
        "--dataset_dir", str(args.dataset_dir),
        "--split", "test",
        "--checkpoint", str(weights),
        "--referral_scorer_path", str(scorer),
        "--output_dir", str(output_dir),
    ]  # fmt: skip


def _evaluation_config(bundle: Path) -> str:
    return ",".join(str(bundle / "configs" / name) for name in ("inference.json", "evaluate.json"))


def compare(initial: dict, fine_tuned: dict) -> dict:
    """The comparison record of two evaluation summaries (their ``overall`` parts) of the same split."""
    return {
        "split": "test",
        "metric": "dice_3d",
        "initial": initial,
        "fine_tuned": fine_tuned,
        "better": bool(fine_tuned["dice_3d"] > initial["dice_3d"]),
    }


def format_comparison(comparison: dict) -> str:
    """The comparison as a table, a figure per line, and the verdict."""
    lines = [f"{'held-out test split':<26}{'initial':>10}{'fine-tuned':>12}"]
    for name, higher_is_better in COMPARED.items():
        before, after = comparison["initial"].get(name), comparison["fine_tuned"].get(name)
        if before is None or after is None:
            continue
        arrow = "" if math.isclose(before, after) else ("+" if (after > before) == higher_is_better else "-")
        lines.append(f"{name:<26}{before:>10.4f}{after:>12.4f} {arrow}")
    lines.append(f"{'expressions':<26}{comparison['initial'].get('expressions', 0):>10}")
    verdict = "better" if comparison["better"] else "not better"
    lines.append(f"fine-tuned pair: {verdict} than the initial one on 3D Dice per expression")
    return "\n".join(lines)


def _trained_every_epoch(run_dir: Path, epochs: int) -> bool:
    """Whether the run's saved training state has finished ``epochs`` epochs (step 1 has nothing left to do)."""
    state_file = run_dir / "models" / STATE_FILE
    if not state_file.is_file():
        return False
    try:
        trainer = torch.load(state_file, map_location="cpu", weights_only=False).get("trainer", {})
    except Exception:  # a damaged state: step 1 runs and its own check names the problem
        return False
    return bool(trainer.get("epoch_length")) and trainer.get("iteration", 0) // trainer["epoch_length"] >= epochs


def _scorer_is_for_model(run_dir: Path) -> bool:
    """Whether the run's scorer was trained on the candidates of the run's model (step 2 has nothing left to do)."""
    model, scorer = run_dir / "models" / MODEL_FILE, run_dir / "models" / SCORER_FILE
    if not (model.is_file() and scorer.is_file()):
        return False
    try:
        trained_for = torch.load(scorer, map_location="cpu", weights_only=True).get("segmentation_sha256")
    except Exception:
        return False
    return trained_for == file_sha256(model)


def _summary(output_dir: Path) -> dict:
    """The ``overall`` figures the evaluation wrote into ``output_dir``."""
    path = output_dir / "test_summary.json"
    try:
        overall = json.loads(path.read_text())["overall"]
    except (OSError, ValueError, KeyError) as err:
        raise FineTuneError(
            f"The evaluation wrote no usable summary ({path}: {err}). Rerun with --resume true."
        ) from err
    if overall.get("dice_3d") is None:
        raise FineTuneError(f"The evaluation in {path} scored no expression; the test split needs expressions.")
    return overall


def fine_tune(args) -> dict:
    """The three steps of the module docstring; returns the comparison record."""
    bundle = Path(args.bundle_dir).resolve() if args.bundle_dir else config_dir().parent
    if not (bundle / "configs" / "train.json").is_file():
        raise FineTuneError(f"--bundle_dir '{bundle}' is not a bundle folder (no configs/train.json). Pass the bundle "
                            "folder, or leave --bundle_dir out.")  # fmt: skip
    run_dir, dataset_dir = Path(args.run_dir).resolve(), Path(args.dataset_dir).resolve()
    args.dataset_dir = dataset_dir
    counts = check_dataset(dataset_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FineTuneError(f"--run_dir '{run_dir}' is a file. Pass a new folder.")
    for given in (args.initial_weights, args.initial_scorer):
        if not Path(given).is_file():
            raise FineTuneError(f"'{given}' is not a file. Pass an existing weights file (the shipped ones are in "
                                f"{bundle / 'models'}).")  # fmt: skip
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise FineTuneError(
            f"--run_dir '{run_dir}' holds files already; a fine-tune never overwrites a run. Pass a new --run_dir, "
            "or --resume true to continue this one."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "fine_tune.log"
    print(
        f"fine-tuning on {dataset_dir}: {counts['training']} training, {counts['validation']} validation and "
        f"{counts['test']} held-out test cases, {args.replay_cases} replay cases; run folder {run_dir}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        if not (args.resume and _trained_every_epoch(run_dir, args.epochs)):
            _run(training_command(args, bundle, run_dir), log)
    finally:  # the crops are the training's disk cache; a resumed step 1 crops its cases again
        shutil.rmtree(run_dir / CROPS_FOLDER, ignore_errors=True)
    trained = time.perf_counter()
    if not (args.resume and _scorer_is_for_model(run_dir)):
        _run(referral_command(args, bundle, run_dir), log)
    scored = time.perf_counter()
    pairs = {
        "initial": (Path(args.initial_weights).resolve(), Path(args.initial_scorer).resolve()),
        "fine_tuned": (run_dir / "models" / MODEL_FILE, run_dir / "models" / SCORER_FILE),
    }
    summaries = {}
    for name, (weights, scorer) in pairs.items():
        output_dir = run_dir / "eval" / name
        _run(evaluation_command(args, bundle, weights, scorer, output_dir), log)
        summaries[name] = _summary(output_dir)
    comparison = compare(summaries["initial"], summaries["fine_tuned"])
    comparison["cases"] = counts
    comparison["seconds"] = {
        "segmentation": round(trained - start, 1),
        "referral": round(scored - trained, 1),
        "comparison": round(time.perf_counter() - scored, 1),
    }
    text = json.dumps(comparison, indent=2) + "\n"
    atomic_write(run_dir / COMPARISON_FILE, lambda tmp: tmp.write_text(text), overwrite=True)
    print(format_comparison(comparison))
    seconds = comparison["seconds"]
    print(
        f"cost: segmentation {seconds['segmentation']:.0f} s, referral {seconds['referral']:.0f} s, comparison "
        f"{seconds['comparison']:.0f} s; written: {run_dir / COMPARISON_FILE}\n"
        f"publish it (the model and its scorer) with: python -m custom.training publish --run_dir {run_dir} "
        f"--bundle_dir {bundle}"
    )
    return comparison


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    bundle = config_dir().parent
    parser = argparse.ArgumentParser(
        prog="python -m custom.fine_tune", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--dataset_dir", required=True, help="an imported dataset (datalist.json with 3 splits)")
    parser.add_argument("--run_dir", default="runs/fine_tune", help="the run folder (new, or --resume true)")
    parser.add_argument("--initial_weights", default=str(bundle / "models" / MODEL_FILE), help="weights to start from")
    parser.add_argument(
        "--initial_scorer", default=str(bundle / "models" / SCORER_FILE), help="referral scorer compared against"
    )
    parser.add_argument("--epochs", type=int, default=40, help="segmentation epochs (a pass over the training cases)")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="segmentation learning rate")
    parser.add_argument("--referral_epochs", type=int, default=40, help="referral scorer epochs")
    parser.add_argument("--replay_cases", type=int, default=32, help="generated phantom cases added to training")
    parser.add_argument("--cache_dir", default="cache", help="where generated cases and disk caches are kept")
    parser.add_argument("--bundle_dir", default=None, help="the bundle folder (default: this code's bundle)")
    parser.add_argument("--resume", type=lambda v: as_bool(v, "resume"), default=False, help="continue a run")
    args, args.training_options = parser.parse_known_args(argv)
    _check_training_options(parser, args.training_options)
    for name in ("epochs", "referral_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.replay_cases < 0:
        parser.error(f"--replay_cases must be 0 or more, got {args.replay_cases}")
    return args


#: Training options that may be passed on (``--name value``): they change how the network is trained, not what it
#: takes in or where anything is written, so the referral and comparison steps stay consistent with step 1.
TRAINING_ONLY = (
    "batch_cases", "slices_per_expression", "max_val_expressions", "num_workers", "negative_ratio", "text_free_prob",
    "dense_weight", "small_lesion_weight", "augment", "dataset_cache", "max_train_cases", "seed",
)  # fmt: skip


def _check_training_options(parser: argparse.ArgumentParser, options: list[str]) -> None:
    """Other options go to the training command as ``--name value`` pairs, the names of :data:`TRAINING_ONLY` only."""
    names = [option[2:] for option in options[::2]]
    if len(options) % 2 or not all(option.startswith("--") for option in options[::2]):
        parser.error(
            f"unexpected arguments {' '.join(options)}; options for the training command go as --name value pairs, "
            "e.g. --batch_cases 4"
        )
    refused = [name for name in names if name not in TRAINING_ONLY]
    if refused:
        parser.error(
            f"--{refused[0]} is not an option the fine-tune passes on to training (it would make the referral and "
            f"comparison steps disagree with it, or is set by the fine-tune itself); pass one of "
            f"{', '.join('--' + n for n in TRAINING_ONLY)}, or see --help"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        fine_tune(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
