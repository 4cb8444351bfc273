"""Fine-tuning on imported real CT with inserted lesions, compared with the shipped weights on a held-out volume.

What a site does with its labelled CT, on the real CT the repository may redistribute (``data/realct/``):

1. **Labelled CT.** Synthetic lesions are inserted (:mod:`custom.data.lesion_insertion`) into the real livers of
   three volumes, each case a variant with its own lesions, written as an MSD Task03 folder (CT and label map,
   1 liver, 2 tumour):

   - ``ts_lower_*``: the TotalSegmentator CT up to slice 96 (pelvis to the lower half of its liver);
   - ``dcmqi_*``: dcmqi's three upper-abdominal slices, another patient and scanner;
   - ``ts_upper_*``: the TotalSegmentator CT from slice 97 (the upper half of its liver), **held out**.

2. **Import** with ``custom.data.import_labelled --test-cases ts_upper_*``: the held-out volume is the test split,
   the other cases are split into training and validation.
3. **Fine-tune and compare**: ``python -m custom.fine_tune`` on that dataset (shipped weights and scorer against the
   fine-tuned pair, on the held-out test split).

    python -m benchmarks.site_fine_tune [--run_dir runs/site_fine_tune] [--epochs 40] [--replay_cases 32]

The held-out slab is the same patient as the lower slab trained on (the only real 3D volume at hand), so its figures
say that the recipe learns real anatomy, not what it does on another patient; the validation cases that choose the
epoch are variants of volumes trained on. The fine-tuned weights are not
shipped: the real-anatomy benchmark (``benchmarks.real_anatomy``) evaluates the whole TotalSegmentator CT, which they
have partly seen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from custom import fine_tune
from custom.data.import_labelled import import_labelled
from custom.data.io import write_nifti
from custom.data.lesion_insertion import LiverCanvas, insert_into

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "realct"
#: First slice of the TotalSegmentator CT's held-out upper slab (its liver spans slices 82-111).
SPLIT_SLICE = 97
#: Source volumes: (CT, liver mask, slices kept, variants).
VOLUMES = {
    "ts_lower": (REAL / "totalseg_example_ct.nii.gz", REAL / "totalseg_liver.nii.gz", slice(0, SPLIT_SLICE), 8),
    "dcmqi": (REAL / "dcmqi_ct_3slice.nii.gz", REAL / "dcmqi_liver.nii.gz", slice(None), 4),
    "ts_upper": (REAL / "totalseg_example_ct.nii.gz", REAL / "totalseg_liver.nii.gz", slice(SPLIT_SLICE, None), 4),
}
HELD_OUT = "ts_upper"


def write_labelled_ct(folder: Path, seed: int) -> list[str]:
    """The MSD Task03 folder of every variant of :data:`VOLUMES`; returns the held-out case ids."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    held_out = []
    for number, (name, (image_path, liver_path, kept, variants)) in enumerate(VOLUMES.items()):
        ct, liver = nib.load(str(image_path)).slicer[:, :, kept], nib.load(str(liver_path)).slicer[:, :, kept]
        canvas = LiverCanvas.of(ct.get_fdata(dtype=np.float32), np.asarray(liver.dataobj) > 0, ct.affine)
        for index in range(variants):
            case_id = f"{name}_{index:02d}"
            image, label, _ = insert_into(canvas, np.random.default_rng([seed, number, index]))
            hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
            write_nifti(folder / "imagesTr" / f"{case_id}.nii.gz", hu, ct.affine)
            write_nifti(folder / "labelsTr" / f"{case_id}.nii.gz", label.astype(np.uint8), ct.affine)
            if name == HELD_OUT:
                held_out.append(case_id)
    return held_out


def ensure_dataset(cache_dir: Path, seed: int) -> Path:
    """The imported dataset (written on first use); returns its folder."""
    base = cache_dir / f"site_fine_tune_seed{seed}"
    dataset = base / "dataset"
    if not (dataset / "datalist.json").is_file():
        source = base / "labelled_ct"
        if source.exists():
            raise SystemExit(f"error: {source} exists without its dataset; remove {base} and run again.")
        held_out = write_labelled_ct(source, seed)
        import_labelled(source, dataset, layout="msd", seed=seed, progress=False, test_cases=held_out)
    return dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", default="runs/site_fine_tune", help="the fine-tune's run folder (new)")
    parser.add_argument("--cache_dir", default=str(ROOT / "cache"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the inserted lesions and the splits")
    args, rest = parser.parse_known_args(argv)
    dataset = ensure_dataset(Path(args.cache_dir), args.seed)
    summary = json.loads((dataset / "import_report.json").read_text())
    splits = {}
    for case in summary.get("cases", []):
        splits.setdefault(case["split"], []).append(case["case_id"])
    print("dataset " + str(dataset) + ": " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(splits.items())))
    code = fine_tune.main(
        ["--dataset_dir", str(dataset), "--run_dir", args.run_dir, "--cache_dir", args.cache_dir, *rest]
    )
    raise SystemExit(code)


if __name__ == "__main__":
    main()
