"""Write the bundle as MONAI model-zoo and MONAI Label users get it: one self-contained folder.

``python -m custom.package --out dist/lsms_referring_lesion_segmentation`` copies ``bundle/`` (configs, models,
docs, sample, LICENSE) and this ``custom`` package into one folder and sets every config's ``bundle_root`` to ``"."``,
so that the folder runs on its own, like a zoo bundle, from inside it::

    cd dist/lsms_referring_lesion_segmentation
    python -m monai.bundle run inference --config_file configs/inference.json --image ct.nii.gz --prompt "..."

(``python -m`` puts the working folder, hence the bundle's ``custom/``, on ``sys.path``.) The repository stays the
only place where the components are written; the folder is generated, never edited by hand.

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

__all__ = ["BUNDLE_NAME", "LARGE_FILE_BYTES", "large_files", "package_bundle", "write_large_files"]

REPOSITORY = Path(__file__).resolve().parents[1]
#: Folder name of the packaged bundle (the model-zoo name).
BUNDLE_NAME = "lsms_referring_lesion_segmentation"
#: What is never copied: run outputs, caches and byte code.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "eval", ".*")


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


def package_bundle(out: str | Path, overwrite: bool = False, repository: str | Path = REPOSITORY) -> Path:
    """Write the self-contained bundle into ``out`` (a new folder; ``overwrite`` replaces an existing one)."""
    repository, out = Path(repository), Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"'{out}' exists already; pass another --out, or --overwrite to replace it.")
        shutil.rmtree(out)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(repository / "bundle", staging, ignore=IGNORED)
    shutil.copytree(repository / "custom", staging / "custom", ignore=IGNORED)
    for config in sorted((staging / "configs").glob("*.json")):
        content = json.loads(config.read_text())
        if "bundle_root" in content:
            content["bundle_root"] = "."
            config.write_text(json.dumps(content, indent=4) + "\n")
    staging.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custom.package", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"dist/{BUNDLE_NAME}", help=f"output folder (default dist/{BUNDLE_NAME})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--large_files", action="store_true", help=f"rewrite bundle/{LARGE_FILES_NAME} and stop")
    parser.add_argument("--url_base", default="", help=f"address of the uploaded large files ({LARGE_FILES_NAME})")
    args = parser.parse_args(argv)
    if args.large_files:
        print(f"Wrote {write_large_files(url_base=args.url_base)}")
        return 0
    try:
        path = package_bundle(args.out, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote the bundle to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
