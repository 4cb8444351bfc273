"""Write the bundle as MONAI model-zoo and MONAI Label users get it: one self-contained folder.

``python -m custom.package --out dist/lsms_referring_lesion_segmentation`` copies ``bundle/`` (configs, models,
docs, sample, LICENSE) and this ``custom`` package into one folder and sets every config's ``bundle_root`` to ``"."``,
so that the folder runs on its own, like a zoo bundle, from inside it::

    cd dist/lsms_referring_lesion_segmentation
    python -m monai.bundle run inference --config_file configs/inference.json --image ct.nii.gz --prompt "..."

(``python -m`` puts the working folder, hence the bundle's ``custom/``, on ``sys.path``.) The repository stays the
only place where the components are written; the folder is generated, never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

__all__ = ["package_bundle", "BUNDLE_NAME"]

REPOSITORY = Path(__file__).resolve().parents[1]
#: Folder name of the packaged bundle (the model-zoo name).
BUNDLE_NAME = "lsms_referring_lesion_segmentation"
#: What is never copied: run outputs, caches and byte code.
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "eval", ".*")


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
    args = parser.parse_args(argv)
    try:
        path = package_bundle(args.out, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote the bundle to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
