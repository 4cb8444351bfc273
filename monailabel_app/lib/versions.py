"""The weights versions the app keeps: one folder per training run, and a pointer to the one it serves.

Layout under the app's model folder (``--conf model_dir``; default ``monailabel_app/model``)::

    lsms/versions/v<N>/models/model.pt              the fine-tuned segmentation weights (python -m custom.fine_tune)
    lsms/versions/v<N>/models/referral_scorer.pt    the referral scorer retrained on them
    lsms/versions/v<N>/comparison.json              the weights it started from and these, on the held-out studies
    lsms/versions/v<N>/version.json                 the run: studies, options, metrics, whether it was served
    lsms/current.json                               {"version": "v<N>", ...}: the version served; none: the bundle's

Version numbers only grow and a version folder is never reused. ``current.json`` is replaced atomically, so an
inference reads either the old pointer or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

#: The name of a version folder: ``v1``, ``v2``, ...
VERSION_NAME = re.compile(r"v([1-9][0-9]{0,8})")
#: The ``weights_version`` of the bundle's own weights.
BUNDLE = "bundle"
MODEL_FILE, SCORER_FILE = "model.pt", "referral_scorer.pt"
COMPARISON, RECORD, POINTER = "comparison.json", "version.json", "current.json"


@dataclass(frozen=True)
class Weights:
    """A pair of weights files the bundle can run: ``version`` (``v<N>`` or ``bundle``) and its ``models`` folder."""

    version: str
    models_dir: Path

    @property
    def model(self) -> Path:
        return self.models_dir / MODEL_FILE

    @property
    def scorer(self) -> Path:
        return self.models_dir / SCORER_FILE


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``; None when the file is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict, overwrite: bool = False) -> Path:
    """Write ``value`` to ``path`` whole or not at all (``custom.atomic_files.atomic_write``)."""
    from custom.atomic_files import atomic_write

    text = json.dumps(value, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)


def now() -> str:
    """The local time as ``YYYY-MM-DD HH:MM:SS`` (as MONAI Label stamps its tasks)."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


class VersionStore:
    """The versions folder of one model and its served-version pointer (module doc).

    Args:
        root: ``<model_dir>/lsms``.
        bundle_models: the bundle's ``models`` folder (served while no version is).
    """

    def __init__(self, root: os.PathLike, bundle_models: os.PathLike):
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.pointer = self.root / POINTER
        self.bundle = Weights(BUNDLE, Path(bundle_models))

    # ------------------------------------------------------------------ reading
    def names(self) -> List[str]:
        """The version folders, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and VERSION_NAME.fullmatch(p.name)]
        return sorted(found, key=lambda name: int(name[1:]))

    def weights(self, name: str) -> Weights:
        """The weights of version ``name`` (not checked)."""
        return Weights(name, self.versions_dir / name / "models")

    def served_name(self) -> Optional[str]:
        """The version ``current.json`` names, when its two weights files are there; None otherwise (logged)."""
        if not self.pointer.exists():
            return None
        name = (read_json(self.pointer) or {}).get("version")
        if not isinstance(name, str) or not VERSION_NAME.fullmatch(name):
            logger.warning(f"{self.pointer} names no version ({name!r}); serving the bundle's weights.")
            return None
        weights = self.weights(name)
        if not (weights.model.is_file() and weights.scorer.is_file()):
            logger.warning(f"{self.pointer} names {name}, whose weights files are missing; serving the bundle's.")
            return None
        return name

    def served(self) -> Weights:
        """The weights to answer with now: the served version's, else the bundle's."""
        name = self.served_name()
        return self.weights(name) if name else self.bundle

    def describe(self, name: str) -> Dict[str, Any]:
        """What ``stats()`` lists of version ``name``: its run record, or its comparison, or 'incomplete'."""
        folder = self.versions_dir / name
        record = read_json(folder / RECORD)
        if record is None:
            comparison = read_json(folder / COMPARISON)
            record = {"version": name, "status": "incomplete" if comparison is None else "unrecorded"}
            if comparison is not None:
                record.update(metrics_of(comparison))
        return record

    def stats(self) -> Dict[str, Any]:
        """The served version (``bundle`` when none) and every version with its metrics, newest first."""
        served = self.served_name()
        versions = [dict(self.describe(name), served=name == served) for name in reversed(self.names())]
        current = next((v for v in versions if v["served"]), None)
        return {
            "served": served or BUNDLE,
            "best_metric": current.get("fine_tuned") if current else None,  # what 3D Slicer shows as accuracy
            "metric": "dice_3d",
            "versions": versions,
        }

    # ------------------------------------------------------------------ writing
    def new_version(self) -> Tuple[str, Path]:
        """Reserve the next version: (``v<N>``, its new empty folder). N is one more than the largest so far."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        names = self.names()
        number = int(names[-1][1:]) + 1 if names else 1
        while True:
            folder = self.versions_dir / f"v{number}"
            try:
                folder.mkdir()  # fails if another run took this number
            except FileExistsError:
                number += 1
                continue
            return folder.name, folder

    def record(self, name: str, record: Dict[str, Any]) -> Path:
        """Write version ``name``'s run record (once: a version's record is never replaced)."""
        return write_json(self.versions_dir / name / RECORD, record)

    def serve(self, name: str, details: Optional[Dict[str, Any]] = None) -> Path:
        """Make version ``name`` the served one (``current.json`` replaced atomically)."""
        weights = self.weights(name)
        if not (weights.model.is_file() and weights.scorer.is_file()):
            raise FileNotFoundError(f"Version {name} has no {MODEL_FILE} and {SCORER_FILE} in {weights.models_dir}.")
        return write_json(self.pointer, {"version": name, "since": now(), **(details or {})}, overwrite=True)


def metrics_of(comparison: Dict[str, Any]) -> Dict[str, Any]:
    """The headline of a ``comparison.json``: metric, initial and fine-tuned value, and ``better``."""
    metric = comparison.get("metric", "dice_3d")
    return {
        "metric": metric,
        "initial": (comparison.get("initial") or {}).get(metric),
        "fine_tuned": (comparison.get("fine_tuned") or {}).get(metric),
        "better": comparison.get("better"),
    }
