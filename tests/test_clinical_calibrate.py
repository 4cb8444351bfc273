"""Calibration command: evaluation CSVs in, operating point written into a config, test report printed."""

import csv
import json

import pytest

from custom.clinical.calibrate import main, read_features, write_rule
from custom.clinical.not_present import NotPresentRule


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "text", "targets", "max_probability", "volume_ml"])
        writer.writeheader()
        writer.writerows(rows)


def rows(positive_probabilities, negative_probabilities):
    out = [
        {"case_id": "a", "text": "p", "targets": "1", "max_probability": p, "volume_ml": 2.0}
        for p in positive_probabilities
    ]
    out += [
        {"case_id": "a", "text": "n", "targets": "", "max_probability": p, "volume_ml": 2.0 if p >= 0.5 else 0.0}
        for p in negative_probabilities
    ]
    return out


def test_read_features_splits_by_targets(tmp_path):
    write_csv(tmp_path / "v.csv", rows([0.9, 0.8], [0.3]))
    positives, negatives = read_features(tmp_path / "v.csv")
    assert [f["max_probability"] for f in positives] == [0.9, 0.8] and len(negatives) == 1


def test_calibration_separates_and_writes_the_operating_point(tmp_path, capsys):
    write_csv(tmp_path / "v.csv", rows([0.9, 0.85, 0.8, 0.95], [0.3, 0.6, 0.65, 0.2]))
    write_csv(tmp_path / "t.csv", rows([0.9, 0.7], [0.62, 0.1]))
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"prompt": "x", "not_present_rule": NotPresentRule().to_dict()}))
    main(["--validation", str(tmp_path / "v.csv"), "--test", str(tmp_path / "t.csv"), "--write", str(config)])
    rule = json.loads(config.read_text())["not_present_rule"]
    assert 0.65 < rule["min_max_probability"] <= 0.8
    assert json.loads(config.read_text())["prompt"] == "x"
    printed = capsys.readouterr().out
    assert "test: sensitivity 0.500 (1/2), specificity 1.000 (2/2)" in printed


def test_write_rule_refuses_a_config_without_the_entry(tmp_path):
    config = tmp_path / "train.json"
    config.write_text("{}")
    with pytest.raises(ValueError, match="not_present_rule"):
        write_rule(NotPresentRule(), config)


def test_several_validation_csvs_are_read_together(tmp_path, capsys):
    write_csv(tmp_path / "v1.csv", rows([0.9, 0.85], [0.3, 0.6]))
    write_csv(tmp_path / "v2.csv", rows([0.8, 0.95], [0.65, 0.2]))
    main(["--validation", str(tmp_path / "v1.csv"), str(tmp_path / "v2.csv")])
    printed = capsys.readouterr().out
    assert "(4 positive, 4 negative expressions)" in printed
