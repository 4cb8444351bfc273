"""The studies datastore as the app hands it to MONAI Label: read freely, written only when allowed.

MONAI Label's datastore endpoints (``PUT``/``DELETE /datastore/image``, ``/datastore/label``, their ``/info``) and
``save_label`` of an inference write files named after the ids and tags a client sends, with no check:
``image=../../x`` writes outside the studies folder. :class:`GuardedDatastore` refuses every write unless the
server runs with ``--conf datastore_writes true``, and even then refuses ids and tags that are not plain names.
The app's request guard (``lib/guard.py``) refuses the same requests before their body is read; this class is the
last check, also for writes that MONAI Label makes by itself on a client's behalf.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Dict, Optional

from fastapi import HTTPException

#: A plain name: a letter or digit, then letters, digits, '.', '_' or '-'; no '..'; at most 128 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: File types stored by a write (what the bundle reads as a CT study, and the label formats of 3D Slicer).
IMAGE_EXTENSIONS = (".nii.gz", ".nii")
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")

WRITES_OFF = (
    "Changing the datastore over HTTP is off: this request would write or delete files in the studies folder. "
    "Start the server with --conf datastore_writes true to allow it."
)


def name_problem(value: Any, what: str) -> Optional[str]:
    """Why ``value`` is not a plain study id or label tag (no folder, no '..', no leading dot), or None."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value) and ".." not in value:
        return None
    return (
        f"The {what} {value!r} is not a plain name. Use letters, digits, '.', '_' and '-' only, starting with a "
        "letter or digit, without '..' or '/' (at most 128 characters)."
    )


def info_problem(info: Any, field: str) -> Optional[str]:
    """Why the info of a write (its ``params`` or ``info`` form field) is not a JSON object, or None."""
    if info is None or isinstance(info, dict):
        return None
    return f"The form field '{field}' must be a JSON object, not {type(info).__name__}. Send {{...}}."


def check_info(info: Any, field: str) -> None:
    """Raise HTTP 422 when ``info`` is not a JSON object (see :func:`info_problem`)."""
    problem = info_problem(info, field)
    if problem:
        raise HTTPException(status_code=422, detail=problem)


def check_name(value: Any, what: str) -> None:
    """Raise HTTP 422 when ``value`` is not a plain name (see :func:`name_problem`)."""
    problem = name_problem(value, what)
    if problem:
        raise HTTPException(status_code=422, detail=problem)


class GuardedDatastore:
    """A datastore whose writes are refused (HTTP 403) unless ``writes``, with plain names and known ids only.

    Reads (``list_images``, ``get_image_uri``, ``status``, ...) go to the wrapped datastore unchanged. MONAI Label
    cleans up the uploaded copy of a refused file only when a request succeeds, so a refused upload is removed here.

    Args:
        store: the datastore MONAI Label built for ``--studies``.
        writes: allow writes (``--conf datastore_writes true``).
    """

    def __init__(self, store, writes: bool = False):
        self._store = store
        self._writes = bool(writes)

    def __getattr__(self, name: str):
        if name == "_store":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._store, name)

    # ------------------------------------------------------------------ checks
    def _allowed(self, upload: Optional[str] = None) -> None:
        """Refuse a write when writes are off (removing the refused upload)."""
        if not self._writes:
            _discard(upload)
            raise HTTPException(status_code=403, detail=WRITES_OFF)

    def _known_image(self, image_id: str, upload: Optional[str] = None) -> None:
        """Refuse an id that is not a plain name (422) or not a study of the datastore (404)."""
        problem, status = name_problem(image_id, "study id"), 422
        if problem is None and image_id not in set(self._store.list_images()):
            problem, status = f"Study '{image_id}' is not in the datastore. See GET /datastore/?output=all.", 404
        if problem:
            _discard(upload)
            raise HTTPException(status_code=status, detail=problem)

    def _known_label(self, label_id: str, tag: str) -> None:
        """Refuse a label id or tag that is not a plain name (422) or not a label of the datastore (404)."""
        check_name(label_id, "label id")
        check_name(tag, "label tag")
        if not self._store.get_label_uri(label_id, tag):
            raise HTTPException(status_code=404, detail=f"No label '{label_id}' with tag '{tag}' in the datastore.")

    # ------------------------------------------------------------------ writes
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """Store a new study (or replace one) under a plain id, from a NIfTI file."""
        self._allowed(image_filename)
        _check_upload(image_filename, name_problem(image_id, "study id"), IMAGE_EXTENSIONS, "study", image_info)
        return self._store.add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        """Delete a study of the datastore and its labels."""
        self._allowed()
        self._known_image(image_id)
        return self._store.remove_image(image_id)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Store a label of a study under a plain tag."""
        self._allowed(label_filename)
        self._known_image(image_id, label_filename)
        _check_upload(label_filename, name_problem(label_tag, "label tag"), LABEL_EXTENSIONS, "label", label_info)
        return self._store.save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Delete a label of the datastore."""
        self._allowed()
        self._known_label(label_id, label_tag)
        return self._store.remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        """Change the info of a study (kept in the datastore's index file in the studies folder)."""
        self._allowed()
        self._known_image(image_id)
        check_info(info, "info")
        return self._store.update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        """Change the info of a label."""
        self._allowed()
        self._known_label(label_id, label_tag)
        check_info(info, "info")
        return self._store.update_label_info(label_id, label_tag, info)

    def set_name(self, name: str) -> None:
        """Rename the dataset (kept in the datastore's index file)."""
        self._allowed()
        return self._store.set_name(name)

    def set_description(self, description: str) -> None:
        """Describe the dataset (kept in the datastore's index file)."""
        self._allowed()
        return self._store.set_description(description)


def _extension_problem(path: str, extensions, what: str) -> Optional[str]:
    """Why the uploaded file ``path`` is not of a stored type, or None."""
    if str(path).lower().endswith(extensions):
        return None
    return f"The {what} file must be {' or '.join(extensions)}. Upload it with one of these extensions."


def _check_upload(upload: str, name: Optional[str], extensions, what: str, info: Any) -> None:
    """Refuse (422, the upload deleted) an upload whose name problem ``name``, file extension or ``params`` is bad."""
    problem = name or _extension_problem(upload, extensions, what) or info_problem(info, "params")
    if problem:
        _discard(upload)
        raise HTTPException(status_code=422, detail=problem)


def _discard(upload: Optional[str]) -> None:
    """Remove MONAI Label's temporary copy of a refused upload (only a file in the temporary folder)."""
    if not upload:
        return
    path = os.path.realpath(upload)
    if os.path.dirname(path) == os.path.realpath(tempfile.gettempdir()) and os.path.isfile(path):
        os.remove(path)
