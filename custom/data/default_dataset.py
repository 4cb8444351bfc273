"""The embedded default dataset: generated once into a cache folder, reused afterwards.

``ensure_default_dataset(cache_dir)`` returns ``cache_dir/lsms_synthetic_v<version>_n<cases>_seed<seed>/datalist.json``
(generator options other than the defaults add a short hash of them to the folder name).
The first caller generates it (a log line every tenth of the cases, :func:`custom.data.synthetic.generate_dataset`)
under an exclusive lock (``filelock.FileLock``, so two processes, e.g. two DDP ranks, never both write it); the others
wait for the lock and then reuse the result. Generation writes to a temporary folder and renames it into place, so an
interrupted run leaves no half-written dataset behind; the temporary folder of a killed run is removed by the next
one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from filelock import FileLock

from custom.runtime import format_duration

from .datalist import SPLITS, load_datalist
from .synthetic import DATASET_VERSION, DEFAULT_NUM_CASES, generate_dataset

__all__ = ["DEFAULT_SEED", "default_dataset_dir", "ensure_default_dataset", "extra_training_cases"]

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0
LOCK_TIMEOUT_S = 900.0


def default_dataset_dir(
    cache_dir: str | Path, num_cases: int = DEFAULT_NUM_CASES, seed: int = DEFAULT_SEED, options: dict | None = None
) -> Path:
    """Folder of the default dataset inside ``cache_dir``; generator ``options`` add a hash of them to its name."""
    name = f"lsms_synthetic_v{DATASET_VERSION}_n{num_cases}_seed{seed}"
    if options:
        name += "_" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).absolute() / name


def remove_stale_temporaries(dataset_dir: Path) -> list[Path]:
    """Delete the temporary folders an interrupted generation of ``dataset_dir`` left beside it.

    Call it only while holding the dataset's lock: then no other process is writing one of them.
    """
    stale = sorted(dataset_dir.parent.glob(f".{dataset_dir.name}.tmp-*")) + sorted(
        dataset_dir.parent.glob(f".{dataset_dir.name}.old-*")
    )
    for folder in stale:
        logger.info("Removing %s, left by an interrupted dataset generation", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def ensure_default_dataset(
    cache_dir: str | Path,
    num_cases: int = DEFAULT_NUM_CASES,
    seed: int = DEFAULT_SEED,
    workers: int = 1,
    options: dict | None = None,
) -> Path:
    """Path of the default synthetic datalist under ``cache_dir``; generates it on first use.

    ``options``: generator options (:func:`custom.data.synthetic.generate_dataset`), e.g. other lesion kind weights
    or diameter ranges. Safe to call from several processes at once: one generates, the others wait and reuse it.
    """
    options = dict(options or {})
    dataset_dir = default_dataset_dir(cache_dir, num_cases, seed, options)
    datalist = dataset_dir / "datalist.json"
    if datalist.is_file():
        return datalist
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dataset_dir.with_name(dataset_dir.name + ".lock"), timeout=LOCK_TIMEOUT_S):
        if datalist.is_file():  # another process finished it while we waited
            return datalist
        remove_stale_temporaries(dataset_dir)
        logger.info("Generating the default synthetic dataset (%d cases) in %s", num_cases, dataset_dir)
        start = time.perf_counter()
        path = generate_dataset(dataset_dir, num_cases=num_cases, seed=seed, workers=workers, overwrite=True, **options)
        elapsed = format_duration(time.perf_counter() - start)
        logger.info("Generated the default dataset (%d cases) in %s: %s", num_cases, elapsed, path)
    return path


def extra_training_cases(
    cache_dir: str | Path, num_cases: int, seed: int = 1, options: dict | None = None
) -> list[dict]:
    """Cases of a second generated dataset (its own ``seed``), every split of it, to add to the training split.

    A generated dataset of ``num_cases`` with a seed other than the default dataset's, so none of its cases is one
    of the default validation or test cases; ``options`` are its generator options (e.g. more small or hyperdense
    lesions than the default dataset has). Case ids are prefixed with ``seed<seed>-`` so they stay distinct from
    the default ones. ``num_cases == 0`` gives an empty list.
    """
    if num_cases <= 0:
        return []
    if seed == DEFAULT_SEED:
        raise ValueError(f"extra training cases need a seed other than the default dataset's ({DEFAULT_SEED}).")
    datalist = ensure_default_dataset(cache_dir, num_cases=num_cases, seed=seed, options=options)
    cases = []
    for split in SPLITS:
        for case in load_datalist(datalist, split):
            cases.append({**case, "case_id": f"seed{seed}-{case['case_id']}"})
    return cases
