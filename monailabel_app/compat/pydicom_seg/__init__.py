"""``pydicom_seg`` for MONAI Label 0.8.5 on pydicom 3 and numpy 2.

MONAI Label 0.8.5 imports ``pydicom_seg`` at server start (``monailabel.datastore.utils.convert``). The last
release of pydicom-seg (0.4.1) imports ``pydicom._storage_sopclass_uids``, which pydicom 3 removed, and pins
``numpy<2``; this repository's core environment needs pydicom 3 (highdicom) and numpy 2. The ``pydicom-seg-rb``
fork is the same code with that import fixed (``pydicom.uid.SegmentationStorage``) and numpy 2 allowed, under
its own import name. This package only re-exports the fork under the name MONAI Label imports, submodules
included. Remove it once MONAI Label or pydicom-seg ship a pydicom-3-compatible release.
"""

import importlib
import sys

import pydicom_seg_rb as _impl
from pydicom_seg_rb import *  # noqa: F401,F403
from pydicom_seg_rb import __all__, __version__  # noqa: F401

for _name in (
    "dicom_utils",
    "reader",
    "reader_utils",
    "segmentation_dataset",
    "template",
    "typing",
    "writer",
    "writer_utils",
):
    _module = importlib.import_module(f"{_impl.__name__}.{_name}")
    sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
