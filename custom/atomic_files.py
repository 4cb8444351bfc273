"""Files and folders written whole or not at all: a temporary name in the same folder, renamed into place.

:func:`atomic_write` writes one file (never replacing an existing one unless asked, never an input file);
:func:`atomic_directory` builds a whole folder (a dataset, a package) beside its final place and renames it in.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from custom.errors import OutputExistsError, ProtectedInputError

__all__ = ["atomic_directory", "atomic_write"]

PathLike = str | os.PathLike


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _temporary_name(out_path: Path) -> Path:
    """A hidden, unique name in the output folder that keeps the output's suffix (writers choose format by it)."""
    suffix = ".nii.gz" if out_path.name.lower().endswith(".nii.gz") else out_path.suffix
    return out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _publish(tmp: Path, out_path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``out_path``; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, out_path)
        return
    try:
        os.link(tmp, out_path)  # fails if out_path exists, even if it appeared after the first check
    except FileExistsError:
        raise OutputExistsError(out_path) from None
    except OSError:  # file system without hard links
        if out_path.exists():
            raise OutputExistsError(out_path) from None
        os.replace(tmp, out_path)
        return
    tmp.unlink()


def atomic_write(
    out_path: PathLike,
    write: Callable[[Path], object],
    overwrite: bool = False,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write a file through ``write(temporary_path)`` and rename it to ``out_path`` once complete.

    Args:
        out_path: the output file; its folder is created if needed.
        write: function that writes the whole file at the path it is given.
        overwrite: replace an existing ``out_path``; otherwise ``OutputExistsError``.
        protected: input files that must never be written (``ProtectedInputError``, even with ``overwrite``).

    Returns:
        ``out_path`` as a ``Path``.
    """
    out_path = Path(out_path)
    for path in protected:
        if out_path.exists() and _same_file(out_path, path):
            raise ProtectedInputError(f"Output path '{out_path}' is the input file '{path}'; choose another path.")
    if out_path.is_dir():
        raise IsADirectoryError(f"Output path '{out_path}' is a folder; give a file name.")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out_path)
    try:
        write(tmp)
        _flush_to_disk(tmp)
        _publish(tmp, out_path, overwrite)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder that replaces ``out_dir`` only when the block succeeds.

    A half-written dataset is never visible under ``out_dir``. An existing non-empty ``out_dir`` is an error
    unless ``overwrite`` is set.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {out_dir} already exists and is not empty; choose another folder "
            "or pass overwrite=True (--overwrite on the command line)."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
