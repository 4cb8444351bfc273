"""Write a HU volume as a classic single-frame CT DICOM series (for demos, viewers and tests).

The series is real DICOM (CT Image Storage, explicit VR little endian) with the tags a PACS or highdicom expects:
patient/study/series identity, frame of reference, geometry, and RescaleSlope/Intercept.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from custom.clinical.errors import OutputExistsError

__all__ = ["write_ct_series"]


def _lps_affine(affine_ras: np.ndarray) -> np.ndarray:
    """The same grid's affine in LPS world coordinates."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine_ras, dtype=np.float64)


def _check_slice_stack_geometry(affine_lps: np.ndarray) -> None:
    """Raise unless the in-plane axes are orthogonal and the slice axis is along their normal (no shear)."""
    col_i, col_j, col_k = (affine_lps[:3, n] for n in range(3))
    normal = np.cross(col_i, col_j)
    if abs(col_i @ col_j) > 1e-6 * np.linalg.norm(col_i) * np.linalg.norm(col_j) or np.linalg.norm(
        np.cross(normal, col_k)
    ) > 1e-6 * np.linalg.norm(normal) * np.linalg.norm(col_k):
        raise ValueError("The affine must have orthogonal in-plane axes and a slice axis along their normal.")


def _stored_values(volume_hu: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Stored pixel values (uint16 if all non-negative, else int16) and PixelRepresentation."""
    stored = np.rint((np.asarray(volume_hu, dtype=np.float64) - intercept) / slope)
    if stored.min() >= 0 and stored.max() <= np.iinfo(np.uint16).max:
        return stored.astype(np.uint16), 0
    if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
        raise ValueError("HU values do not fit in 16 bits with this slope/intercept.")
    return stored.astype(np.int16), 1


def _base_dataset(path: Path, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    return ds


def write_ct_series(
    volume_hu: np.ndarray,
    affine_ras: np.ndarray,
    folder: str | Path,
    *,
    modality: str = "CT",
    patient_id: str = "LSMS-SYNTH-0001",
    patient_name: str = "Synthetic^Case",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "synthetic abdomen CT",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    descending_instance_numbers: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``volume_hu`` (X, Y, Z) with RAS ``affine_ras`` as one DICOM file per slice ``k`` into ``folder``.

    Frame ``k`` holds ``volume_hu[:, :, k].T`` (rows along Y, columns along X). Files are named by their
    SOPInstanceUID, so their name order says nothing about their position. InstanceNumber runs opposite to ``k``
    when ``descending_instance_numbers`` (as many scanners number from head to feet).

    Returns:
        the written paths, in slice order ``k``.
    """
    folder = Path(folder)
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"Expected a 3D volume (X, Y, Z), got shape {volume.shape}.")
    affine_lps = _lps_affine(affine_ras)
    _check_slice_stack_geometry(affine_lps)
    stored, pixel_representation = _stored_values(volume, rescale_slope, rescale_intercept)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = generate_uid()
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    row_cosines, column_cosines = affine_lps[:3, 0] / spacing[0], affine_lps[:3, 1] / spacing[1]
    now = datetime.datetime.now()
    paths = []
    n_slices = volume.shape[2]
    for k in range(n_slices):
        sop_uid = generate_uid()
        path = folder / f"{sop_uid}.dcm"
        if path.exists() and not overwrite:
            raise OutputExistsError(path)
        ds = _base_dataset(path, sop_uid)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = study_uid, "1", "", ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, series_number
        ds.SeriesDescription, ds.Manufacturer = series_description, "LSMS synthetic"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = n_slices - k if descending_instance_numbers else k + 1
        ds.AcquisitionNumber = 1
        position = (affine_lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cosines, *column_cosines)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # (between rows, between columns)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SliceLocation = f"{position[2]:.6f}"
        ds.KVP = "120"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = pixel_representation
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{rescale_intercept:g}", f"{rescale_slope:g}", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
