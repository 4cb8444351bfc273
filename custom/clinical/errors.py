"""Named errors of the clinical inputs and outputs.

Every error says what is wrong with which file and how to fix it. Input errors derive from
:class:`ClinicalInputError` (a ``ValueError``) so that a caller can catch all bad-input cases at once.
"""

from __future__ import annotations

from custom.errors import InputError, OutputExistsError, ProtectedInputError

__all__ = [
    "ClinicalInputError",
    "NoImageError",
    "MixedSeriesError",
    "MissingSliceError",
    "NotCTError",
    "InvalidValuesError",
    "InvalidGeometryError",
    "GeometryMismatchError",
    "OutputExistsError",
    "ProtectedInputError",
    "OutputWriteError",
]


class ClinicalInputError(InputError, ValueError):
    """An input volume that cannot be used as given."""


class NoImageError(ClinicalInputError):
    """No readable image: a missing path, a non-image file, or a folder without DICOM images."""


class MixedSeriesError(ClinicalInputError):
    """Several DICOM series in one input and none selected with ``series_uid``."""


class MissingSliceError(ClinicalInputError):
    """A gap in the slice positions of a DICOM series."""


class NotCTError(ClinicalInputError):
    """A DICOM series whose modality is not CT (its values would not be Hounsfield units)."""


class InvalidValuesError(ClinicalInputError):
    """A volume with NaN or infinite voxels."""


class InvalidGeometryError(ClinicalInputError):
    """Slices that do not form one regular volume: missing or differing orientation, spacing or size,
    or several slices at the same position."""


class GeometryMismatchError(ValueError):
    """A mask whose grid does not match the grid of the image it should be written for."""


class OutputWriteError(InputError, OSError):
    """Outputs that the file system refused to take (a full disk, a read-only or vanished folder); nothing of them
    was published."""

    def __init__(self, folder, error: OSError):
        super().__init__(
            f"The outputs could not be written to '{folder}' ({error.strerror or type(error).__name__}); nothing of "
            "them was kept. Free space or pass a writable --output_dir, and run again."
        )
        self.folder = str(folder)
