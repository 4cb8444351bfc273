"""The metrics of custom.metrics and the volume-level referral step, on hand-made volumes with known answers."""

import numpy as np
import pytest

from custom.detection.postprocessing import select_referred_components
from custom.metrics import axial_axis, dice_3d, match_lesions, score_expression, summarize


def two_lesions():
    instances = np.zeros((20, 20, 10), np.int16)
    instances[2:6, 2:6, 2:5] = 1  # 48 voxels over 3 slices
    instances[10:18, 10:18, 4:8] = 2  # 256 voxels over 4 slices
    return instances


def test_dice_3d_known_values_and_empty_agreement():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert dice_3d(a, b) == 1.0
    a[0, 0, :2] = True
    assert dice_3d(a, b) == 0.0
    b[0, 0, 1:3] = True
    assert dice_3d(a, b) == pytest.approx(0.5)


def test_axial_axis_follows_the_affine_not_the_array_order():
    assert axial_axis(np.diag([1.0, 1.0, 3.0, 1.0])) == 2
    sagittal_first = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [-2.5, 0, 0, 0], [0, 0, 0, 1]], float)
    assert axial_axis(sagittal_first) == 0


def test_perfect_prediction_scores_one_and_counts_slices():
    instances = two_lesions()
    scores = score_expression(instances == 2, instances, [2], np.eye(4), kind="size")
    assert scores.dice == 1.0 and scores.hit and not scores.predicted_empty
    assert len(scores.slices) == 4 and all(i == u for i, u in scores.slices)
    assert scores.lesions == {"targets": 1, "targets_hit": 1, "components": 1, "components_matched": 1}


def test_wrong_lesion_is_a_miss_and_a_false_positive():
    instances = two_lesions()
    scores = score_expression(instances == 1, instances, [2], np.eye(4), kind="location")
    assert scores.dice == 0.0 and not scores.hit
    assert scores.lesions["components"] - scores.lesions["components_matched"] == 1


def test_lesion_match_threshold_is_dice_point_one():
    instances = two_lesions()
    pred = np.zeros_like(instances, bool)
    pred[10:18, 10:18, 4] = True  # 64 of 256 voxels: Dice 2*64/320 = 0.4
    assert match_lesions(pred, instances, [2])["targets_hit"] == 1
    pred[:] = False
    pred[10:12, 10:12, 4] = True  # 4 voxels: Dice 8/260 < 0.1
    assert match_lesions(pred, instances, [2])["targets_hit"] == 0


def test_summary_overall_and_per_kind():
    instances = two_lesions()
    affine = np.eye(4)
    scores = [
        score_expression(instances == 2, instances, [2], affine, "a", "largest", "size"),
        score_expression(instances == 1, instances, [2], affine, "a", "lower", "location"),
        score_expression(np.zeros_like(instances, bool), instances, [], affine, "a", "a cyst", "negative"),
        score_expression(instances == 1, instances, [], affine, "b", "a cyst", "negative"),
    ]
    summary = summarize(scores)
    overall = summary["overall"]
    assert overall["dice_3d"] == pytest.approx(0.5)
    assert overall["negatives_empty_rate"] == pytest.approx(0.5)
    assert overall["positive_hit_rate"] == pytest.approx(0.5)
    assert overall["slice_samples"] == 8
    assert overall["mIoU"] == pytest.approx(0.5) and overall["P@0.9"] == pytest.approx(0.5)
    # lesion 1 (z 2..4) shares slice 4 with lesion 2 (z 4..7): 16 extra union pixels there
    assert overall["oIoU"] == pytest.approx(256 / (256 + 256 + 16))
    assert overall["instance_precision"] == pytest.approx(1 / 3)
    assert overall["false_positives_per_case"] == pytest.approx(1.0)
    assert set(summary["by_kind"]) == {"size", "location", "negative"}
    assert summary["by_kind"]["size"]["dice_3d"] == 1.0
    assert overall["false_positives_per_expression"] == pytest.approx(2 / 4)
    assert summary["by_selector"] == {}  # no expression carries a selector


def test_summary_per_selector():
    instances = two_lesions()
    scores = [
        score_expression(instances == 2, instances, [2], np.eye(4), "a", "the largest", "size", selector="largest"),
        score_expression(instances == 1, instances, [1], np.eye(4), "a", "the smallest", "size", selector="smallest"),
        score_expression(instances == 2, instances, [1], np.eye(4), "b", "the smaller", "size", selector="smallest"),
    ]
    by_selector = summarize(scores)["by_selector"]
    assert set(by_selector) == {"largest", "smallest"}
    assert by_selector["smallest"]["expressions"] == 2 and by_selector["smallest"]["dice_3d"] == pytest.approx(0.5)
    assert scores[0].row()["selector"] == "largest"


def test_referral_step_keeps_strong_components_and_drops_weak_ones():
    probabilities = np.zeros((20, 20, 10), np.float32)
    probabilities[2:6, 2:6, 2:5] = 0.95
    probabilities[10:18, 10:18, 4:8] = 0.55  # weak evidence on a lesion that was not asked for
    mask = select_referred_components(probabilities, relative_evidence=0.8)
    assert mask[2:6, 2:6, 2:5].all() and not mask[10:18, 10:18, 4:8].any()
    both = select_referred_components(probabilities, relative_evidence=0.0)
    assert both.sum() == 48 + 256
    probabilities[10:18, 10:18, 4:8] = 0.9  # similar evidence: both referred ("all lesions")
    assert select_referred_components(probabilities, relative_evidence=0.8).sum() == 48 + 256


def test_referral_step_drops_specks_and_keeps_empty_empty():
    probabilities = np.zeros((10, 10, 5), np.float32)
    assert not select_referred_components(probabilities).any()
    probabilities[1, 1, 1] = 0.99
    assert not select_referred_components(probabilities, min_voxels=2).any()


def test_shuffled_texts_come_from_other_cases_and_keep_targets():
    from custom.data.datalist import shuffle_texts

    items = [{"case_id": c, "text": f"{c}-{i}", "targets": [i]} for c in "abc" for i in range(3)]
    shuffled = shuffle_texts(items, seed=0)
    assert [s["targets"] for s in shuffled] == [i["targets"] for i in items]
    assert all(not s["text"].startswith(s["case_id"]) for s in shuffled)
    assert shuffle_texts(items, seed=None) is items


def test_prepare_batch_can_withhold_the_text():
    import torch

    from custom.engines import ReferringPrepareBatch

    batch = {
        "image": torch.zeros(1, 1, 4, 4),
        "label": torch.zeros(1, 1, 4, 4),
        "input_ids": torch.ones(1, 3, dtype=torch.long),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
    }
    _, _, _, with_text = ReferringPrepareBatch(network_kwargs={"return_embeddings": True})(batch)
    assert set(with_text) == {"input_ids", "attention_mask", "return_embeddings"}
    _, _, _, without_text = ReferringPrepareBatch(text_keys={})(batch)
    assert without_text == {}


def test_results_table_lists_metrics_and_kinds_per_model():
    from benchmarks.results_table import table

    instances = two_lesions()
    good = summarize([score_expression(instances == 2, instances, [2], np.eye(4), "a", "t", "size")])
    bad = summarize([score_expression(instances == 1, instances, [2], np.eye(4), "a", "t", "size")])
    text = table({"model": good, "control": bad})
    assert "| 3D Dice | 1.000 | 0.000 |" in text
    assert "selector" not in text  # none held by 4 expressions
    many = summarize(
        [score_expression(instances == 2, instances, [2], np.eye(4), "a", "t", "size", selector="largest")] * 4
    )
    assert "| 3D Dice, selector largest (4) | 1.000 | n/a |" in table({"model": many, "control": bad})
    assert "| 3D Dice, size | 1.000 | 0.000 |" in text and "| 3D Dice, negative | n/a | n/a |" in text
