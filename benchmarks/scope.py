"""Scope benchmark: out-of-scope CT gets "not present" with a reason; real livers are found and answer no lesion.

Usage::

    python -m benchmarks.scope [--split validation] [--checkpoint bundle/models/model.pt] [--out scope.json]

Every input runs through the inference workflow of ``bundle/configs/inference.json`` (``UserDataWorkflow``, the
shipped weights unless ``--checkpoint``) with the prompt "all lesions in the liver":

- out of scope, real (``data/realct/README.md``, ``pydicom-data``): head CT slices, a chest slice, a brain perfusion
  frame, and the TotalSegmentator CT cut to its pelvis and to its lower abdomen below the liver;
- out of scope, generated: each phantom case of ``--split`` cut to its slices above and below its liver;
- in scope, real: the abdominal slice ``explicit_VR-UN.dcm`` (its traced liver outline), the three dcmqi slices
  and the TotalSegmentator CT whole and cut to its liver slab (their liver labels);
- in scope, generated: each phantom case of ``--split`` whole.

Printed, per input: the answer (found, lesions answered, the scope reason or the refusal) and, where a liver label
exists, the liver Dice on the pipeline's grid; then the summary: out-of-scope inputs answered with a lesion, inputs
in scope taken as out of scope, lesions answered on real livers without lesions, the liver Dice of each real liver.
Refused inputs (unreadable geometry) count as answered with nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing
from skimage.draw import polygon2mask

import custom.detection.postprocessing as postprocessing
from custom.clinical.dicom_series import load_clinical_image
from custom.data.datalist import load_datalist
from custom.data.default_dataset import ensure_default_dataset
from custom.errors import InputError
from custom.user_inputs import UserDataWorkflow

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "data" / "realct"
PROMPT = "all lesions in the liver"
#: Slices of the TotalSegmentator CT: the liver is in slices 82-111 (``data/realct/totalseg_liver.nii.gz``).
TOTALSEG_CUTS = {"pelvis": (0, 40), "lower abdomen": (40, 78), "liver slab": (82, 112)}


def pydicom_file(name: str) -> Path:
    import data_store
    from pydicom.data import get_testdata_file

    path = Path(data_store.__file__).parent / "data" / name
    return path if path.is_file() else Path(get_testdata_file(name))


def cut_slices(image: nib.Nifti1Image, start: int, stop: int, out: Path) -> Path:
    """Slices ``start:stop`` of a NIfTI volume, positioned where they lie in the whole."""
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, start]) + image.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, start:stop], affine), str(out))
    return out


def _dicom_folder(files: list[Path], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy(file, out)
    return out


def build_inputs(work: Path, split: str) -> list[dict]:
    """The inputs: ``{"name", "image", "in_scope", "liver" (label path, optional), "outline" (optional)}``."""
    items = []
    for name, label in (("693_UNCI.dcm", "head"), ("693_J2KR.dcm", "head"), ("J2K_pixelrep_mismatch.dcm", "head"),
                        ("CT_small.dcm", "chest"), ("eCT_Supplemental.dcm", "brain perfusion")):  # fmt: skip
        folder = _dicom_folder([pydicom_file(name)], work / Path(name).stem)
        items.append({"name": f"{label} slice {name}", "image": str(folder), "in_scope": False})
    totalseg = nib.load(REAL / "totalseg_example_ct.nii.gz")
    liver = nib.load(REAL / "totalseg_liver.nii.gz")
    for part in ("pelvis", "lower abdomen"):
        path = cut_slices(totalseg, *TOTALSEG_CUTS[part], work / f"totalseg_{part.replace(' ', '_')}.nii.gz")
        items.append({"name": f"TotalSegmentator CT, {part} (no liver)", "image": str(path), "in_scope": False})
    for case in load_datalist(ensure_default_dataset(ROOT / "cache"), split):
        image = nib.load(case["image"])
        slices = np.flatnonzero(np.asanyarray(nib.load(case["liver"]).dataobj).any(axis=(0, 1)))
        for part, (start, stop) in (("below", (0, slices[0])), ("above", (slices[-1] + 1, image.shape[2]))):
            if stop - start >= 5:
                path = cut_slices(image, start, stop, work / f"{case['case_id']}_{part}.nii.gz")
                items.append({"name": f"phantom {case['case_id']} {part} its liver", "image": str(path),
                              "in_scope": False})  # fmt: skip
        items.append({"name": f"phantom {case['case_id']}", "image": case["image"], "liver": case["liver"],
                      "in_scope": True})  # fmt: skip
    explicit = _dicom_folder([pydicom_file("explicit_VR-UN.dcm")], work / "explicit_VR-UN")
    items.append({"name": "real slice explicit_VR-UN.dcm", "image": str(explicit), "in_scope": True, "real": True,
                  "outline": str(REAL / "explicit_VR-UN_liver_outline.json")})  # fmt: skip
    dcmqi = _dicom_folder(sorted((REAL / "dcmqi_ct_3slice").glob("*.dcm")), work / "dcmqi")
    items.append({"name": "real dcmqi 3 slices", "image": str(dcmqi), "in_scope": True, "real": True,
                  "liver": str(REAL / "dcmqi_liver.nii.gz")})  # fmt: skip
    slab = cut_slices(totalseg, *TOTALSEG_CUTS["liver slab"], work / "totalseg_liver_slab.nii.gz")
    slab_liver = cut_slices(liver, *TOTALSEG_CUTS["liver slab"], work / "totalseg_liver_slab_label.nii.gz")
    items.append({"name": "real TotalSegmentator liver slab", "image": str(slab), "in_scope": True, "real": True,
                  "liver": str(slab_liver)})  # fmt: skip
    whole = str(REAL / "totalseg_example_ct.nii.gz")
    items.append({"name": "real TotalSegmentator CT (pelvis to mid-liver)", "image": whole, "in_scope": True,
                  "real": True, "liver": str(REAL / "totalseg_liver.nii.gz")})  # fmt: skip
    return items


class LiverCapture:
    """Keeps the text-free liver probabilities of the last volume that ``LiverRegiond`` saw."""

    def __init__(self) -> None:
        self.liver = None
        self._call = postprocessing.LiverRegiond.__call__

    def __enter__(self):
        capture, call = self, self._call

        def wrapped(transform, data):
            capture.liver = data.get(transform.liver_key)
            return call(transform, data)

        postprocessing.LiverRegiond.__call__ = wrapped
        return self

    def __exit__(self, *exc) -> None:
        postprocessing.LiverRegiond.__call__ = self._call


def label_on_grid(item: dict, spacing: float) -> np.ndarray | None:
    """The item's liver label on the pipeline's grid (RAS, ``spacing`` mm in-plane), or None."""
    if item.get("outline"):
        image = load_clinical_image(item["image"])
        vertices = json.loads(Path(item["outline"]).read_text())["liver"]
        rows_columns = polygon2mask(image.shape[1:3][::-1], [(r, c) for c, r in vertices])
        label = image.clone()
        label.array = rows_columns.T[None, :, :, None].astype(np.float32)  # the reader's (columns, rows) order
    elif item.get("liver"):
        label = Compose([LoadImage(image_only=True), EnsureChannelFirst()])(item["liver"])
    else:
        return None
    label = Orientation(axcodes="RAS")(label)
    label = Spacing(pixdim=[spacing, spacing, -1], mode="nearest")(label)
    return np.asarray(label[0]) > 0.5


def run_one(item: dict, out: Path, overrides: dict) -> dict:
    """The record of one input (or its refusal), with the liver Dice where a label exists."""
    workflow = UserDataWorkflow(str(ROOT / "bundle/configs/inference.json"), data={"image": item["image"],
                                "prompt": PROMPT}, output_dir=str(out), **overrides)  # fmt: skip
    try:
        with LiverCapture() as capture:
            workflow.initialize()
            workflow.run()
    except Exception as err:
        if isinstance(err, InputError) or isinstance(err.__cause__, InputError):
            return {"refused": str(err).splitlines()[0][:160]}
        raise
    finally:
        workflow.finalize()
    record = json.loads(next(out.rglob("*.json")).read_text())
    result = {
        "found": record["found"],
        "lesions": int(record.get("n_lesions") or 0),
        "reason": (record.get("liver_region") or {}).get("scope", {}).get("reason"),
    }
    label = label_on_grid(item, float(workflow.parser["in_plane_spacing"]))
    if label is not None and capture.liver is not None:
        predicted = np.asarray(torch.as_tensor(capture.liver)[0].cpu()) >= 0.5
        if predicted.shape == label.shape:
            result["liver_dice"] = float(2 * (predicted & label).sum() / max(predicted.sum() + label.sum(), 1))
        else:
            result["liver_dice_error"] = f"grids differ: {predicted.shape} vs {label.shape}"
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="validation", choices=("training", "validation", "test"))
    parser.add_argument("--checkpoint", default=None, help="weights (default: the shipped model.pt)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    overrides = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    results = []
    with tempfile.TemporaryDirectory(prefix="lsms-scope-") as folder:
        work = Path(folder)
        for n, item in enumerate(build_inputs(work / "inputs", args.split)):
            result = {**{k: item[k] for k in ("name", "in_scope")}, **run_one(item, work / f"out{n}", overrides)}
            result["real"] = bool(item.get("real"))
            results.append(result)
            answer = (
                result.get("refused") or result.get("reason") or f"found {result['found']}, {result['lesions']} lesions"
            )
            dice = f", liver Dice {result['liver_dice']:.3f}" if "liver_dice" in result else ""
            print(f"{'in ' if item['in_scope'] else 'out'} | {item['name']}: {answer}{dice}", flush=True)
    out_of_scope = [r for r in results if not r["in_scope"]]
    in_scope = [r for r in results if r["in_scope"]]
    real = [r for r in in_scope if r["real"]]
    summary = {
        "out_of_scope_inputs": len(out_of_scope),
        "out_of_scope_with_lesions": sum(r.get("lesions", 0) > 0 for r in out_of_scope),
        "out_of_scope_lesions_answered": sum(r.get("lesions", 0) for r in out_of_scope),
        "out_of_scope_not_present_with_reason": sum(bool(r.get("reason")) for r in out_of_scope),
        "out_of_scope_refused": sum("refused" in r for r in out_of_scope),
        "in_scope_inputs": len(in_scope),
        "in_scope_taken_out_of_scope": sum(bool(r.get("reason")) for r in in_scope),
        "real_livers_lesions_answered": {r["name"]: r.get("lesions", 0) for r in real},
        "real_livers_dice": {r["name"]: round(r["liver_dice"], 3) for r in real if "liver_dice" in r},
        "phantom_liver_dice_mean": float(
            np.mean([r["liver_dice"] for r in in_scope if not r["real"] and "liver_dice" in r] or [np.nan])
        ),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "inputs": results}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
