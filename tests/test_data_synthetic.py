"""Synthetic dataset: determinism, orientation invariance, realism, atomic writing, CLI, summary, default cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from custom.data import default_dataset, synthetic
from custom.data.datalist import SPLITS, load_datalist, validate_datalist
from custom.data.summary import main as summary_main
from custom.data.summary import summarize
from custom.data.synthetic import generate_case, generate_dataset

REPO = Path(__file__).resolve().parents[1]
KEYS = ["image", "lesions", "liver"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def all_cases(datalist: Path) -> list[dict]:
    data = json.loads(datalist.read_text())
    return data["training"] + data["validation"] + data["test"]


def load_ras(case: dict, base: Path) -> dict:
    loader = Compose([LoadImaged(KEYS, image_only=True), EnsureChannelFirstd(KEYS), Orientationd(KEYS, axcodes="RAS")])
    return loader({key: str(base / case[key]) for key in KEYS})


def test_same_seed_same_bytes_and_other_seed_other_data(tmp_path):
    first = generate_dataset(tmp_path / "a", num_cases=3, seed=2).parent
    second = generate_dataset(tmp_path / "b", num_cases=3, seed=2, workers=2).parent
    other = generate_dataset(tmp_path / "c", num_cases=3, seed=3).parent
    hashes = file_hashes(first)
    assert len(hashes) == 10  # datalist + 3 x (image, lesions, liver)
    assert hashes == file_hashes(second)
    other_hashes = file_hashes(other)
    assert set(other_hashes) == set(hashes)
    assert all(other_hashes[name] != digest for name, digest in hashes.items())


@pytest.fixture(scope="module")
def ras_and_lps(tmp_path_factory):
    """The same case (6 lesions) saved in RAS and in LPS."""
    root = tmp_path_factory.mktemp("orientation")
    return {
        code: (generate_case(root / code, index=0, seed=2, orientation=code), root / code) for code in ("RAS", "LPS")
    }


def test_lps_and_ras_give_the_same_expressions_targets_and_attributes(ras_and_lps):
    (ras, ras_dir), (lps, lps_dir) = ras_and_lps["RAS"], ras_and_lps["LPS"]
    assert "".join(nib.aff2axcodes(nib.load(ras_dir / ras["image"]).affine)) == "RAS"
    assert "".join(nib.aff2axcodes(nib.load(lps_dir / lps["image"]).affine)) == "LPS"
    assert len(ras["lesion_attributes"]) == 6
    assert ras["expressions"] == lps["expressions"]
    for a, b in zip(ras["lesion_attributes"], lps["lesion_attributes"]):
        assert {k: v for k, v in a.items() if not isinstance(v, (float, list))} == {
            k: v for k, v in b.items() if not isinstance(v, (float, list))
        }
        np.testing.assert_allclose(a["centroid_ras_mm"], b["centroid_ras_mm"], atol=0.11)
        assert abs(a["longest_axial_diameter_mm"] - b["longest_axial_diameter_mm"]) <= 0.11
    for key in ("x_range", "y_range", "z_range", "dome"):
        np.testing.assert_allclose(ras["liver_frame"][key], lps["liver_frame"][key], atol=0.011)


def test_lps_and_ras_load_to_the_same_arrays(ras_and_lps):
    (ras, ras_dir), (lps, lps_dir) = ras_and_lps["RAS"], ras_and_lps["LPS"]
    stored_ras = np.asarray(nib.load(ras_dir / ras["image"]).dataobj)
    stored_lps = np.asarray(nib.load(lps_dir / lps["image"]).dataobj)
    assert not np.array_equal(stored_ras, stored_lps)  # really stored differently
    np.testing.assert_array_equal(stored_ras, stored_lps[::-1, ::-1, :])
    a, b = load_ras(ras, ras_dir), load_ras(lps, lps_dir)
    for key in KEYS:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
        np.testing.assert_allclose(a[key].affine.numpy(), b[key].affine.numpy(), atol=1e-4)


def test_right_means_the_patients_right_in_world_coordinates(ras_and_lps):
    for code, (case, folder) in ras_and_lps.items():
        image = nib.load(folder / case["image"])
        liver = np.asarray(nib.load(folder / case["liver"]).dataobj) > 0
        body = np.asarray(image.dataobj) > -500
        liver_x = nib.affines.apply_affine(image.affine, np.argwhere(liver))[:, 0].mean()
        body_x = nib.affines.apply_affine(image.affine, np.argwhere(body))[:, 0].mean()
        assert liver_x > body_x + 20, code  # the liver lies on the patient's right (+x in RAS)
        first_axis_towards_right = np.argwhere(liver)[:, 0].mean() > np.argwhere(body)[:, 0].mean()
        assert first_axis_towards_right == (code == "RAS")  # array indices alone would get LPS wrong
        right = [a for a in case["lesion_attributes"] if a["lobe"] == "right"]
        left = [a for a in case["lesion_attributes"] if a["lobe"] == "left"]
        assert right and left
        assert min(a["centroid_ras_mm"][0] for a in right) > max(a["centroid_ras_mm"][0] for a in left)


def test_cases_look_like_abdominal_ct(small_dataset):
    cases = all_cases(small_dataset)
    orientations = {case["orientation"] for case in cases}
    assert orientations <= {"RAS", "LPS", "LAS"}
    for case in cases:
        image = nib.load(small_dataset.parent / case["image"])
        assert image.get_data_dtype() == np.int16
        spacing = image.header.get_zooms()
        assert 1.3 <= spacing[0] == spacing[1] <= 1.5 and spacing[2] in (3.0, 4.0, 5.0)
        assert 28 <= image.shape[2] <= 70 and 180 <= image.shape[0] <= 300
        hu = np.asarray(image.dataobj)
        liver = np.asarray(nib.load(small_dataset.parent / case["liver"]).dataobj) > 0
        lesions = np.asarray(nib.load(small_dataset.parent / case["lesions"]).dataobj)
        assert hu.min() >= -1024 and (hu < -900).mean() > 0.05  # air around the body and in bowel / lungs
        assert ((hu > -150) & (hu < -50)).mean() > 0.05  # fat
        assert (hu > 300).sum() > 1000  # bone
        assert 60 < case["liver_hu"] < 140 and 0.8 < liver.sum() * np.prod(spacing) / 1e6 < 3.5  # litres
        assert np.all(liver[lesions > 0]) and len(case["lesion_attributes"]) <= 6
        assert all(4 <= a["longest_axial_diameter_mm"] <= 70 for a in case["lesion_attributes"])


def test_lesion_sizes_in_the_datalist_are_those_of_the_clinical_record(small_dataset):
    """The words of a size expression ("the 3 cm lesion") and the record of its answer measure alike."""
    from custom.clinical.measurements import measure_lesions as measure_record

    checked = 0
    for case in all_cases(small_dataset):
        lesions = nib.load(small_dataset.parent / case["lesions"])
        ids = np.asarray(lesions.dataobj)
        for attributes in case["lesion_attributes"]:
            (record,) = measure_record(ids == attributes["id"], np.zeros(ids.shape), lesions.affine)
            assert attributes["longest_axial_diameter_mm"] == round(record["longest_axial_diameter_mm"], 1)
            assert attributes["volume_ml"] == round(record["volume_ml"], 3)
            checked += 1
    assert checked > 0


def test_expression_mix(small_dataset):
    expressions = [e for case in all_cases(small_dataset) for e in case["expressions"]]
    kinds = [e["kind"] for e in expressions]
    assert {"location", "size", "density", "count", "negative"} == set(kinds)
    assert 0.1 < kinds.count("negative") / len(kinds) < 0.4
    assert all(len(e["targets"]) >= 2 for e in expressions if e["kind"] == "count")
    assert len({e["id"] for e in expressions}) == len(expressions)


def test_existing_folder_is_not_overwritten_and_failures_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_dataset(out, num_cases=3)
    assert (out / "keep.txt").read_text() == "user file"

    def broken_case(out_dir, index, seed, **kwargs):
        if index == 1:
            raise RuntimeError("disk full")
        return generate_case(out_dir, index, seed, **kwargs)

    monkeypatch.setattr(synthetic, "generate_case", broken_case)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset(tmp_path / "fresh", num_cases=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_options_are_named(tmp_path):
    with pytest.raises(TypeError, match="slice_thicknes"):
        generate_dataset(tmp_path / "x", num_cases=3, slice_thicknes=(3.0,))
    with pytest.raises(ValueError, match="at least 3 cases"):
        generate_dataset(tmp_path / "y", num_cases=2)


def test_command_line_and_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "custom.data.synthetic", "--out", str(out), "--cases", "3", "--seed", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Generated 3 cases in" in result.stdout
    datalist = out / "datalist.json"
    validate_datalist(datalist)
    summary = summarize(datalist)
    cases = all_cases(datalist)
    assert sum(s["cases"] for s in summary.values()) == 3
    assert sum(s["expressions"] for s in summary.values()) == sum(len(c["expressions"]) for c in cases)
    assert sum(s["slices"] for s in summary.values()) == sum(nib.load(out / c["image"]).shape[2] for c in cases)
    summary_main([str(datalist)])
    printed = capsys.readouterr().out
    for word in ("training", "validation", "test", "total", "negative", "neg. share", "slices"):
        assert word in printed
    total_line = next(line for line in printed.splitlines() if line.strip().startswith("total"))
    assert total_line.split()[1:4] == [
        "3",
        str(sum(len(c["lesion_attributes"]) for c in cases)),
        str(sum(len(c["expressions"]) for c in cases)),
    ]


def test_default_dataset_is_generated_once_even_by_concurrent_callers(tmp_path, monkeypatch):
    calls = []
    real = default_dataset.generate_dataset

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(default_dataset, "generate_dataset", counting)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(default_dataset.ensure_default_dataset(tmp_path, num_cases=3)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert results[0].is_file() and results[0].name == "datalist.json"
    validate_datalist(results[0])
    assert default_dataset.ensure_default_dataset(tmp_path, num_cases=3) == results[0]
    assert len(calls) == 1


def test_extra_training_cases_come_from_another_seed_with_their_own_ids(tmp_path):
    extra = default_dataset.extra_training_cases(tmp_path, num_cases=3, seed=1)
    default = default_dataset.ensure_default_dataset(tmp_path, num_cases=3)
    assert len({c["case_id"] for c in extra}) == 3
    assert all(c["case_id"].startswith("seed1-case_") and Path(c["image"]).is_file() for c in extra)
    default_images = {Path(c["image"]).read_bytes() for split in SPLITS for c in load_datalist(default, split)}
    assert not default_images & {Path(c["image"]).read_bytes() for c in extra}
    assert default_dataset.extra_training_cases(tmp_path, num_cases=0) == []
    with pytest.raises(ValueError, match="seed other than"):
        default_dataset.extra_training_cases(tmp_path, num_cases=3, seed=default_dataset.DEFAULT_SEED)


def test_extra_cases_with_generator_options_get_their_own_folder_and_follow_the_options(tmp_path):
    options = {
        "kind_weights": [0.0, 0.0, 1.0],
        "diameter_range": {"cyst": [5, 9], "metastasis": [8, 9], "hyperdense": [5, 9]},
    }
    assert default_dataset.default_dataset_dir(tmp_path, 3, 2).name == "lsms_synthetic_v1_n3_seed2"
    optioned = default_dataset.default_dataset_dir(tmp_path, 3, 2, options)
    assert optioned.name.startswith("lsms_synthetic_v1_n3_seed2_") and optioned != default_dataset.default_dataset_dir(
        tmp_path, 3, 2, {**options, "kind_weights": [1.0, 0.0, 0.0]}
    )
    cases = default_dataset.extra_training_cases(tmp_path, num_cases=3, seed=2, options=options)
    assert (optioned / "datalist.json").is_file() and len(cases) == 3
    lesions = [a for case in cases for a in case["lesion_attributes"]]
    assert lesions and all(a["kind"] == "hyperdense" and a["longest_axial_diameter_mm"] < 14 for a in lesions)
    assert all(c["case_id"].startswith("seed2-case_") for c in cases)


def test_a_killed_generation_leaves_no_temporary_folder_after_the_next_run(tmp_path):
    target = default_dataset.default_dataset_dir(tmp_path, num_cases=3)
    stale = [tmp_path / f".{target.name}.tmp-4242-deadbeef", tmp_path / f".{target.name}.old-cafe0123"]
    for folder in stale:
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "case_000.nii.gz").write_bytes(b"half written")
    other = tmp_path / ".another_dataset.tmp-1-abc"
    other.mkdir()
    datalist = default_dataset.ensure_default_dataset(tmp_path, num_cases=3)
    assert datalist.is_file() and not any(folder.exists() for folder in stale)
    assert other.is_dir()  # only this dataset's leftovers are removed


def test_progress_bars_show_on_a_terminal_only_and_when_asked():
    import io

    from custom.data.io import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown, piped, off = Terminal(), io.StringIO(), Terminal()
    for stream, enabled in ((shown, True), (piped, True), (off, False)):
        assert list(progress_bar(range(3), enabled=enabled, file=stream, desc="Generating cases")) == [0, 1, 2]
    assert "Generating cases" in shown.getvalue() and "3/3" in shown.getvalue()
    assert piped.getvalue() == "" and off.getvalue() == ""
