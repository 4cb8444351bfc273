"""All outputs of one (case, expression) in one call: the component an inference config uses.

``ReferringOutputWriter`` takes the loaded image (a ``MetaTensor`` from ``LoadClinicalImaged``/``load_ct_ras``,
usually RAS-oriented), the probabilities on the same grid and the expression, decides "found" / "not present" with a
:class:`NotPresentRule`, and writes into ``<output_dir>/<case_id>/``:

- ``<expression_id>_mask.nii.gz`` (NIfTI input) or ``<expression_id>_seg.dcm`` (DICOM input), in the input geometry
  (a DICOM series without a Frame of Reference UID, which DICOM-SEG requires, gets the NIfTI mask and a note in the
  record);
- ``<expression_id>.json``: the record of :func:`build_record`;
- ``<expression_id>_overlay.png`` (key slice) and, optionally, ``<expression_id>_montage.png``.

Existing outputs are detected before anything is written, and the files of one call are published together: every
file is first written completely under a hidden temporary folder, then moved into place; if any step fails, none of
them is left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys

from custom.clinical.dicom_series import is_nifti_path, ras_mask_to_source_frames
from custom.clinical.errors import OutputExistsError, OutputWriteError, ProtectedInputError
from custom.clinical.geometry import as_binary_uint8, ras_view
from custom.clinical.measurements import build_record
from custom.clinical.not_present import NotPresentRule
from custom.clinical.writers import (
    DEFAULT_WINDOW,
    file_sha256,
    write_dicom_seg,
    write_json_record,
    write_montage,
    write_nifti_mask,
    write_overlay_png,
)
from custom.user_inputs import as_bool

__all__ = ["ReferringOutputWriter", "SaveReferringOutputsd", "case_id_of", "expression_slug", "process_alive"]


def expression_slug(expression: str, max_length: int = 48) -> str:
    """File-name-safe identifier of an expression: lowercase words joined by '_' plus a short hash of the text."""
    words = re.sub(r"[^a-z0-9]+", "_", expression.lower()).strip("_")[:max_length].strip("_") or "expression"
    return f"{words}-{hashlib.sha1(expression.encode('utf-8')).hexdigest()[:6]}"


#: Hidden folder in which one call stages its outputs before publishing them: ``.lsms-<pid>-<random>.tmp``.
STAGING_PATTERN = re.compile(r"^\.lsms-(?:(\d+)-)?[0-9a-f]{12}\.tmp$")
#: A staging folder without a process id (written by an older version) is removed once it is this old.
STALE_STAGING_S = 3600.0


def file_provenance(provenance: Mapping) -> dict:
    """``provenance`` with each file path under ``weights`` and ``referral_scorer`` replaced by ``{"file": name,
    "sha256": digest}`` (a missing file keeps its name and a null digest); other entries as given."""
    described = {}
    for key, value in provenance.items():
        if key in ("weights", "referral_scorer") and value:
            path = Path(str(value))
            described[key] = {"file": path.name, "sha256": file_sha256(path) if path.is_file() else None}
        else:
            described[key] = value
    return described


def check_case_folder(folder: Path) -> None:
    """Refuse a case folder that is a symbolic link (outputs would land wherever it points) or not a folder."""
    if folder.is_symlink():
        raise ProtectedInputError(
            f"The case folder '{folder}' is a symbolic link to '{os.path.realpath(folder)}'; outputs are written into "
            "real folders only. Remove the link, or pass another --output_dir."
        )
    if folder.exists() and not folder.is_dir():
        raise ProtectedInputError(
            f"'{folder}' is a file where a case folder goes. Move it, or pass another --output_dir."
        )


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` left by a process that was killed while writing (its id no longer
    runs); return them."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = STAGING_PATTERN.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = match.group(1)
        stale = not process_alive(int(pid)) if pid else time.time() - entry.stat().st_mtime > STALE_STAGING_S
        if stale and int(pid or 0) != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _safe_name(name: str) -> str:
    """A single path component (no separators, no leading dots)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).lstrip(".")
    return cleaned or "case"


def case_id_of(source: str) -> str:
    """Case id of an input path: its file name without the image suffix (a series folder's name)."""
    name = Path(str(source).rstrip("/\\")).name or "case"
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _ras_view(volume, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` (a channel-first (1, X, Y, Z) or (X, Y, Z) ``MetaTensor``) as a numpy (X, Y, Z) view in RAS
    orientation and its RAS affine (:func:`custom.clinical.geometry.ras_view`: nothing of its size is copied)."""
    if not isinstance(volume, MetaTensor):
        raise TypeError(f"{name} must be a MONAI MetaTensor (it carries the affine), got {type(volume).__name__}.")
    array = volume.detach().cpu().numpy()
    return ras_view(array[0] if array.ndim == 4 else array, volume.affine.numpy())


def _nifti_reference(meta: Mapping):
    """The input grid a NIfTI output is written on: the input file when it is NIfTI (its header kept), else the
    ``(affine, shape)`` the loader recorded."""
    source = str(meta.get("filename_or_obj", ""))
    if is_nifti_path(source) and Path(source).is_file():
        return source
    return meta[MetaKeys.ORIGINAL_AFFINE], meta[MetaKeys.SPATIAL_SHAPE]


class ReferringOutputWriter:
    """Decide, measure and write every output of one (case, expression).

    Args:
        output_dir: root folder of the outputs (one sub-folder per case).
        rule: the "not present" rule or its parameters (a JSON-config mapping); default ``NotPresentRule()``.
        overwrite: replace existing outputs; otherwise ``OutputExistsError`` before anything is written.
        montage: also write a montage of the referred slices.
        window: CT display window (centre, width) in HU for the PNGs.
        algorithm_version: model version written into the DICOM-SEG algorithm identification.
        provenance: what produced the answers, kept in every record as ``bundle``: ``version`` as given, and, for
            the files named under ``weights`` and ``referral_scorer``, their sha256 (:func:`file_provenance`).
    """

    def __init__(
        self,
        output_dir: str | Path,
        rule: NotPresentRule | Mapping | None = None,
        overwrite: bool = False,
        montage: bool = False,
        window: tuple[float, float] = DEFAULT_WINDOW,
        algorithm_version: str = "1.0",
        provenance: Mapping | None = None,
    ):
        self.provenance = file_provenance(provenance) if provenance else None
        self.output_dir = Path(output_dir)
        self.rule = rule if isinstance(rule, NotPresentRule) else NotPresentRule(**dict(rule or {}))
        self.overwrite = as_bool(overwrite, "overwrite")
        self.montage = as_bool(montage, "montage")
        self.window = tuple(window)
        self.algorithm_version = algorithm_version

    def output_paths(self, case_id: str, expression_id: str, dicom: bool, candidates: bool = False) -> dict[str, Path]:
        """The files one call writes, by kind."""
        folder = self.output_dir / _safe_name(case_id)
        stem = _safe_name(expression_id)
        paths = {
            "mask": folder / (f"{stem}_seg.dcm" if dicom else f"{stem}_mask.nii.gz"),
            "record": folder / f"{stem}.json",
            "overlay": folder / f"{stem}_overlay.png",
        }
        if self.montage:
            paths["montage"] = folder / f"{stem}_montage.png"
        if candidates:
            paths["candidates"] = folder / f"{stem}_candidates.nii.gz"
        return paths

    def _check_free(self, paths: Mapping[str, Path]) -> None:
        if self.overwrite:
            return
        for path in paths.values():
            if path.exists():
                raise OutputExistsError(path)

    def __call__(
        self,
        image: MetaTensor,
        probabilities: MetaTensor,
        expression: str,
        mask: MetaTensor | None = None,
        case_id: str | None = None,
        expression_id: str | None = None,
        region: Mapping | None = None,
        decision: Mapping | None = None,
        referral: Mapping | None = None,
        harmonisation: Mapping | None = None,
        candidate_map: MetaTensor | None = None,
    ) -> dict:
        """Write the outputs; return ``{"record": ..., "paths": {kind: path}}``.

        Args:
            image: (1, X, Y, Z) HU image with its metadata (``original_affine``, ``spatial_shape``, and for DICOM
                ``source_files``), on the pipeline grid.
            probabilities: (1, X, Y, Z) probabilities after sigmoid on the same grid.
            expression: the referring expression.
            mask: optional referred mask on the same grid (e.g. after the volume-level referral step); by default
                the rule's voxel threshold of ``probabilities``. It is emptied when the rule says "not present".
            case_id: sub-folder name; defaults to the input's file or folder name.
            expression_id: file stem; defaults to :func:`expression_slug`.
            region: the liver region the answer was restricted to
                (``custom.detection.postprocessing.liver_region``), kept in the record as ``liver_region``; a note
                says so when no liver was found.
            decision: a decision already taken (``found``, ``confidence`` ...; the learned referral's,
                :class:`custom.referral.choose.CandidateReferrald`), used instead of the not-present rule.
            referral: how the answer was chosen (every candidate with its score), kept in the record as ``referral``.
            harmonisation: what was corrected before the network read the image (``custom.harmonisation``), kept
                in the record as ``input_harmonisation``; its ``notes`` join the record's notes.
            candidate_map: the lesion candidates as a label map on the same grid, value ``k`` the record's
                ``referral.candidates`` number ``k``; written as ``<expression>_candidates.nii.gz`` (NIfTI in the
                input's geometry, whatever the input's format) for a viewer to offer each candidate.
        """
        meta = image.meta
        dicom_seg = bool(meta.get("source_files")) and bool(meta.get("FrameOfReferenceUID"))
        case_id = case_id or case_id_of(str(meta.get("filename_or_obj", "case")))
        stem = expression_id or expression_slug(expression)
        paths = self.output_paths(case_id, stem, dicom_seg, candidates=candidate_map is not None)
        self._check_free(paths)
        folder = paths["mask"].parent
        check_case_folder(folder)
        remove_stale_staging(folder)
        new_folder = not folder.exists()
        staging = folder / f".lsms-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
        staged = {kind: staging / path.name for kind, path in paths.items()}
        published = False
        try:
            record = self._write_all(
                image,
                probabilities,
                expression,
                mask,
                meta,
                case_id,
                paths,
                staged,
                region,
                decision,
                referral,
                harmonisation,
                candidate_map,
            )
            self._publish(staged, paths)
            published = True
        except OSError as err:
            if isinstance(err, (OutputExistsError, ProtectedInputError)) or err.errno is None:
                raise
            raise OutputWriteError(folder, err) from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if new_folder and not published and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return {"record": record, "paths": paths}

    def _write_all(
        self,
        image,
        probabilities,
        expression,
        mask,
        meta,
        case_id,
        paths,
        staged,
        region=None,
        decision=None,
        referral=None,
        harmonisation=None,
        candidate_map=None,
    ) -> dict:
        """Write every output under its staged name; return the record."""
        image_ras, affine = _ras_view(image, "image")
        probs_ras, _ = _ras_view(probabilities, "probabilities")
        if decision is None:
            decision = self.rule.decide(probs_ras, affine)
        found = bool(decision["found"] if isinstance(decision, Mapping) else decision.found)
        if not found:  # first axis fastest, as NIfTI stores it: written after axis flips only
            referred = np.zeros(image_ras.shape, np.uint8, order="F")
        elif mask is None:
            referred = (probs_ras >= self.rule.voxel_threshold).view(np.uint8)
        else:
            referred = as_binary_uint8(_ras_view(mask, "mask")[0])

        self._write_mask(referred, affine, meta, staged["mask"], expression)
        if candidate_map is not None:
            labels, labels_affine = _ras_view(candidate_map, "candidate_map")
            reference = _nifti_reference(meta)
            write_nifti_mask(labels, reference, staged["candidates"], mask_affine=labels_affine, labels=True)
        notes = []
        if meta.get("source_files") and not meta.get("FrameOfReferenceUID"):
            notes.append(
                "The DICOM series has no Frame of Reference UID, which a DICOM-SEG must reference; the mask is "
                "written as NIfTI in the series' own grid instead."
            )
        if region is not None and not region.get("liver_found", True):
            reason = region.get("scope", {}).get("reason")
            notes.append(
                (f"Out of scope, {reason}" if reason else "No liver found in this image")
                + ", so no lesion is answered: this model answers about liver lesions only. Check that the image is "
                "an abdominal CT that shows the liver."
            )
        harmonisation = dict(harmonisation or {})
        notes += [str(note) for note in harmonisation.pop("notes", None) or []]
        record = build_record(
            expression,
            referred,
            image_ras,
            affine,
            probs_ras,
            decision,
            source_affine=meta.get(MetaKeys.ORIGINAL_AFFINE),
            slice_numbers=meta.get("source_instance_numbers"),
            extra={
                "case_id": case_id,
                "input": str(meta.get("filename_or_obj", "")),
                "outputs": {kind: path.name for kind, path in paths.items()},
                **({"liver_region": dict(region)} if region is not None else {}),
                **({"referral": dict(referral)} if referral is not None else {}),
                **({"input_harmonisation": harmonisation} if harmonisation else {}),
                **({"notes": notes} if notes else {}),
                **({"bundle": self.provenance} if self.provenance else {}),
            },
        )
        write_json_record(record, staged["record"])
        title = self._title(expression, record)
        slices = {
            "source_affine": meta.get(MetaKeys.ORIGINAL_AFFINE),
            "slice_numbers": meta.get("source_instance_numbers"),
        }
        write_overlay_png(image_ras, referred, staged["overlay"], title, affine=affine, window=self.window, **slices)
        if self.montage:
            write_montage(image_ras, referred, staged["montage"], title, affine=affine, window=self.window, **slices)
        return record

    def _publish(self, staged: Mapping[str, Path], paths: Mapping[str, Path]) -> None:
        """Move every staged file into place; on any failure remove the ones already moved."""
        done: list[Path] = []
        try:
            for kind, target in paths.items():
                if self.overwrite:
                    os.replace(staged[kind], target)
                else:
                    try:
                        os.link(staged[kind], target)  # fails if the target appeared since the first check
                    except FileExistsError:
                        raise OutputExistsError(target) from None
                done.append(target)
        except BaseException:
            for target in done:
                target.unlink(missing_ok=True)
            raise

    def _write_mask(self, referred: np.ndarray, affine: np.ndarray, meta: Mapping, path: Path, expression: str):
        if meta.get("source_files") and meta.get("FrameOfReferenceUID"):
            frames = ras_mask_to_source_frames(referred, meta, ras_affine=affine)
            return write_dicom_seg(
                frames,
                meta["source_files"],
                path,
                description=expression,
                algorithm_version=self.algorithm_version,
                overwrite=self.overwrite,
            )
        return write_nifti_mask(referred, _nifti_reference(meta), path, mask_affine=affine, overwrite=self.overwrite)

    @staticmethod
    def _title(expression: str, record: Mapping) -> str:
        if not record["found"]:
            return f'"{expression}": not present (confidence {record["confidence"]:.2f})'
        return (
            f'"{expression}": {record["n_lesions"]} lesion(s), {record["total_volume_ml"]:.1f} ml '
            f"(confidence {record['confidence']:.2f})"
        )


class SaveReferringOutputsd(MapTransform):
    """Dictionary transform (post-processing) around :class:`ReferringOutputWriter`.

    Reads the image, probabilities, expression (and optional mask, case id, liver region, a decision already taken
    and how the referral chose) from the data dictionary of one decollated item, writes the outputs, and stores the
    record under ``record_key``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        image_key: str = "image",
        prob_key: str = "pred",
        expression_key: str = "text",
        mask_key: str | None = None,
        case_id_key: str | None = "case_id",
        record_key: str = "record",
        region_key: str | None = "liver_region",
        decision_key: str | None = "decision",
        referral_key: str | None = "referral",
        harmonisation_key: str | None = "input_harmonisation",
        candidate_map_key: str | None = "candidate_map",
        rule: NotPresentRule | Mapping | None = None,
        overwrite: bool = False,
        montage: bool = False,
        window: tuple[float, float] = DEFAULT_WINDOW,
        provenance: Mapping | None = None,
    ):
        super().__init__(keys=[image_key, prob_key])
        self.harmonisation_key, self.candidate_map_key = harmonisation_key, candidate_map_key
        self.writer = ReferringOutputWriter(output_dir, rule, overwrite, montage, window, provenance=provenance)
        self.image_key, self.prob_key, self.expression_key = image_key, prob_key, expression_key
        self.mask_key, self.case_id_key, self.record_key = mask_key, case_id_key, record_key
        self.region_key, self.decision_key, self.referral_key = region_key, decision_key, referral_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        result = self.writer(
            d[self.image_key],
            d[self.prob_key],
            str(d[self.expression_key]),
            mask=d.get(self.mask_key) if self.mask_key else None,
            case_id=str(d[self.case_id_key]) if self.case_id_key and d.get(self.case_id_key) else None,
            region=d.get(self.region_key) if self.region_key else None,
            decision=d.get(self.decision_key) if self.decision_key else None,
            referral=d.get(self.referral_key) if self.referral_key else None,
            harmonisation=d.get(self.harmonisation_key) if self.harmonisation_key else None,
            candidate_map=d.get(self.candidate_map_key) if self.candidate_map_key else None,
        )
        d[self.record_key] = result["record"]
        return d
