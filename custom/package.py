"""Write the bundle as MONAI model-zoo and MONAI Label users get it: one self-contained folder.

``python -m custom.package --out dist/lsms_referring_lesion_segmentation`` copies an explicit list of the bundle's
files (:data:`BUNDLE_FILES`: configs, weights, docs, sample, LICENSE, ``large_files.yml``) and the ``.py`` files of
this ``custom`` package into one folder, never anything else written under ``bundle/`` (run outputs, evaluations,
patient results), and sets every config's ``bundle_root`` to ``"."``, so that the folder runs on its own, like a zoo
bundle, from inside it::

    cd dist/lsms_referring_lesion_segmentation
    python -m monai.bundle run inference --config_file configs/inference.json --image ct.nii.gz --prompt "..."

(``python -m`` puts the working folder, hence the bundle's ``custom/``, on ``sys.path``.) The repository stays the
only place where the components are written; the folder is generated, never edited by hand.

The output folder is checked first (symlinks resolved): never the checkout, a folder that contains it, or a folder
inside its ``bundle/``, ``custom/`` or ``.git/``. Every packaged folder holds a marker file, :data:`MARKER`;
``--overwrite`` only replaces a folder that holds it (one this command wrote), and the new folder is complete
before it takes the old one's place.

The model zoo keeps files over 1 MB out of git and lists them in the bundle's ``large_files.yml`` (path, address,
hash), which its CI downloads before checking the bundle; an existing file whose hash matches is not downloaded.
This repository keeps those files (a fresh clone runs offline) and lists them with their sha256:
``python -m custom.package --large_files [--url_base URL]`` rewrites ``bundle/large_files.yml`` after weights or
the sample change (``URL/<file name>`` is each file's address once uploaded for publishing; empty until then).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from custom.data.io import atomic_directory
from custom.errors import InputError

__all__ = [
    "BUNDLE_FILES",
    "BUNDLE_NAME",
    "LARGE_FILE_BYTES",
    "MARKER",
    "PackageError",
    "PackageExistsError",
    "check_output_folder",
    "large_files",
    "package_bundle",
    "packaged_files",
    "write_large_files",
]

REPOSITORY = Path(__file__).resolve().parents[1]
#: Folder name of the packaged bundle (the model-zoo name).
BUNDLE_NAME = "lsms_referring_lesion_segmentation"
#: What is shipped from ``bundle/``: (glob pattern relative to ``bundle/``, required). Nothing else is copied.
BUNDLE_FILES = (
    ("LICENSE", True),
    ("large_files.yml", True),
    ("configs/*.json", True),
    ("configs/logging.conf", False),
    ("models/model.pt", True),
    ("models/referral_scorer.pt", True),
    ("docs/README.md", True),
    ("docs/options.md", True),
    ("docs/data_license.txt", False),
    ("docs/images/*.png", False),
    ("sample/sample.json", True),
    ("sample/sample_case.nii.gz", True),
)
#: Marker file in every packaged folder: ``--overwrite`` only replaces a folder that holds it.
MARKER = ".lsms-package"
MARKER_TEXT = "Written by python -m custom.package; python -m custom.package --overwrite may replace this folder.\n"
#: Folders of the repository that packaging never writes into or replaces.
PROTECTED = ("bundle", "custom", ".git")


#: Files above this size are listed in ``large_files.yml`` (the model zoo's pre-commit limit, 1024 kB).
LARGE_FILE_BYTES = 1024 * 1024
LARGE_FILES_NAME = "large_files.yml"


def large_files(bundle_dir: str | Path, url_base: str = "") -> list[dict]:
    """Entries of ``large_files.yml`` for every file of ``bundle_dir`` over :data:`LARGE_FILE_BYTES`: ``path``
    (relative, POSIX), ``url`` (``url_base/<name>`` or empty), ``hash_val`` (sha256) and ``hash_type``."""
    bundle_dir = Path(bundle_dir)
    entries = []
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.stat().st_size > LARGE_FILE_BYTES):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        url = f"{url_base.rstrip('/')}/{path.name}" if url_base else ""
        entries.append({"path": path.relative_to(bundle_dir).as_posix(), "url": url,
                        "hash_val": digest.hexdigest(), "hash_type": "sha256"})  # fmt: skip
    return entries


def write_large_files(bundle_dir: str | Path = REPOSITORY / "bundle", url_base: str = "") -> Path:
    """Write ``<bundle_dir>/large_files.yml`` in the model zoo's layout (see :func:`large_files`)."""
    lines = ["large_files:"]
    for entry in large_files(bundle_dir, url_base):
        lines.append(f'- path: "{entry["path"]}"')
        lines.extend(f'  {key}: "{entry[key]}"' for key in ("url", "hash_val", "hash_type"))
    out = Path(bundle_dir) / LARGE_FILES_NAME
    out.write_text("\n".join(lines) + "\n")
    return out


class PackageError(InputError, ValueError):
    """An output folder packaging must not write, or a bundle file that is missing; the message names the fix."""


class PackageExistsError(InputError, FileExistsError):
    """The output folder exists and ``--overwrite`` was not given."""


def _refusal(real: Path, repository: Path) -> str | None:
    """Why the resolved folder ``real`` must never be written by packaging, or None."""
    if real == repository:
        return "is the repository checkout"
    if repository.is_relative_to(real):
        return "contains the repository checkout"
    for name in PROTECTED:
        if real.is_relative_to(repository / name):
            return f"is inside the repository's {name}/ folder"
    return None


def _is_empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with nothing in it."""
    return path.is_dir() and not any(path.iterdir())


def check_output_folder(out: str | Path, overwrite: bool = False, repository: str | Path = REPOSITORY) -> Path:
    """The resolved output folder for ``out``, or :class:`PackageError` / :class:`PackageExistsError` naming the fix.

    Refused: the checkout, a folder containing it or inside its ``bundle/``, ``custom/`` or ``.git/``; an existing
    file; an existing, non-empty folder unless ``overwrite``, and even then unless it holds :data:`MARKER`.
    """
    real, repository = Path(out).resolve(), Path(repository).resolve()
    fix = f"Pass a folder of its own outside bundle/ and custom/, e.g. --out dist/{BUNDLE_NAME}"
    reason = _refusal(real, repository)
    if reason is not None:
        raise PackageError(f"--out '{out}' {reason} ('{real}'); packaging never writes or replaces it. {fix}.")
    if not real.exists() or _is_empty_folder(real):
        return real
    if not real.is_dir():
        raise PackageError(f"--out '{out}' is a file, not a folder; it is left untouched. {fix}.")
    if not overwrite:
        raise PackageExistsError(
            f"'{out}' exists already; it is left untouched. Pass another --out, or --overwrite to replace a folder "
            "that python -m custom.package wrote."
        )
    marker = real / MARKER
    if marker.is_symlink() or not marker.is_file():
        raise PackageError(
            f"'{out}' was not written by python -m custom.package (it has no {MARKER} file), so --overwrite leaves it "
            f"untouched. {fix}, or remove that folder yourself if it is yours to remove."
        )
    return real


def packaged_files(repository: str | Path = REPOSITORY) -> dict[str, Path]:
    """What a packaged bundle holds, ``{relative path: source file}``: :data:`BUNDLE_FILES` of ``bundle/`` and the
    ``.py`` files of ``custom/`` (no caches; no hidden files anywhere). A required file that is missing is a
    :class:`PackageError`."""
    repository = Path(repository)
    bundle, files = repository / "bundle", {}
    for pattern, required in BUNDLE_FILES:
        found = sorted(p for p in bundle.glob(pattern) if p.is_file() and not p.name.startswith("."))
        if required and not found:
            raise PackageError(
                f"The bundle file 'bundle/{pattern}' is missing, so the bundle cannot be packaged. Restore it "
                f"(git checkout -- bundle/{pattern}) and package again."
            )
        files.update({p.relative_to(bundle).as_posix(): p for p in found})
    code = repository / "custom"
    for path in sorted(code.rglob("*.py")):
        relative = path.relative_to(code)
        if path.is_file() and not any(part.startswith((".", "__pycache__")) for part in relative.parts):
            files[f"custom/{relative.as_posix()}"] = path
    return files


def _set_bundle_root(folder: Path) -> None:
    """Set ``bundle_root`` to ``"."`` in every config of ``folder/configs`` that has one."""
    for config in sorted((folder / "configs").glob("*.json")):
        content = json.loads(config.read_text())
        if "bundle_root" in content:
            content["bundle_root"] = "."
            config.write_text(json.dumps(content, indent=4) + "\n")


def _write_folder(staging: Path, repository: Path) -> None:
    """Copy :func:`packaged_files` into the new folder ``staging``, set ``bundle_root`` and write the marker."""
    for relative, source in packaged_files(repository).items():
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    _set_bundle_root(staging)
    (staging / MARKER).write_text(MARKER_TEXT)


def package_bundle(out: str | Path, overwrite: bool = False, repository: str | Path | None = None) -> Path:
    """Write the self-contained bundle into ``out``, a new folder; returns ``Path(out)``.

    ``overwrite`` replaces a folder this function wrote before (:func:`check_output_folder`). The folder is written
    whole under a temporary name beside ``out`` first, then moved into place.
    """
    repository = Path(REPOSITORY if repository is None else repository).resolve()
    real = check_output_folder(out, overwrite, repository)
    with atomic_directory(real, overwrite=True) as staging:  # the folder checked above may be replaced
        _write_folder(staging, repository)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom.package", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"dist/{BUNDLE_NAME}", help=f"output folder (default dist/{BUNDLE_NAME})")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder that this command wrote before"
    )
    parser.add_argument("--large_files", action="store_true", help=f"rewrite bundle/{LARGE_FILES_NAME} and stop")
    parser.add_argument("--url_base", default="", help=f"address of the uploaded large files ({LARGE_FILES_NAME})")
    args = parser.parse_args(argv)
    if args.large_files:
        print(f"Wrote {write_large_files(url_base=args.url_base)}")
        return 0
    try:
        path = package_bundle(args.out, overwrite=args.overwrite)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote the bundle to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
