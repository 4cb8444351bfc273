"""Clinical inputs and outputs of referring lesion segmentation.

Inputs: a CT DICOM series folder or a NIfTI file, read into Hounsfield units and oriented to RAS
(:mod:`custom.clinical.dicom_series`). Outputs per (case, expression): the mask in the input's geometry (NIfTI or
DICOM-SEG), a JSON record with per-lesion measurements, and PNG overlays (:mod:`custom.clinical.writers`,
:mod:`custom.clinical.measurements`, :mod:`custom.clinical.outputs`), with a calibrated "not present" decision
(:mod:`custom.clinical.not_present`).
"""

from custom.clinical.dicom_export import write_ct_series
from custom.clinical.dicom_series import (
    ClinicalInputWarning,
    CTSeriesReader,
    LoadClinicalImaged,
    load_clinical_image,
    load_ct_ras,
    ras_mask_to_source_frames,
    read_source_datasets,
)
from custom.clinical.errors import (
    ClinicalInputError,
    GeometryMismatchError,
    InvalidGeometryError,
    MissingSliceError,
    MixedSeriesError,
    NoImageError,
    NotCTError,
    OutputExistsError,
    ProtectedInputError,
)
from custom.clinical.measurements import build_record, measure_lesions, voxel_volume_ml
from custom.clinical.not_present import Calibration, Decision, NotPresentRule, calibrate, evaluate_rule
from custom.clinical.outputs import ReferringOutputWriter, SaveReferringOutputsd
from custom.clinical.writers import (
    atomic_write,
    write_dicom_seg,
    write_json_record,
    write_montage,
    write_nifti_mask,
    write_overlay_png,
)

__all__ = [
    "CTSeriesReader",
    "Calibration",
    "ClinicalInputError",
    "ClinicalInputWarning",
    "Decision",
    "GeometryMismatchError",
    "InvalidGeometryError",
    "LoadClinicalImaged",
    "MissingSliceError",
    "MixedSeriesError",
    "NoImageError",
    "NotCTError",
    "NotPresentRule",
    "OutputExistsError",
    "ProtectedInputError",
    "ReferringOutputWriter",
    "SaveReferringOutputsd",
    "atomic_write",
    "build_record",
    "calibrate",
    "evaluate_rule",
    "load_clinical_image",
    "load_ct_ras",
    "measure_lesions",
    "ras_mask_to_source_frames",
    "read_source_datasets",
    "voxel_volume_ml",
    "write_ct_series",
    "write_dicom_seg",
    "write_json_record",
    "write_montage",
    "write_nifti_mask",
    "write_overlay_png",
]
