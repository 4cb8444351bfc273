"""Text-free outputs: dense targets, text-free samples, the 3-channel loss, liver focus and lesion detection metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from custom.detection.inferers import OUTSIDE_LOGIT, ReferringSliceInferer, liver_box, slice_context
from custom.detection.postprocessing import LiverRegiond, SplitOutputsd, liver_region
from custom.losses import LSMSLoss
from custom.metrics import match_candidate_detections, match_detections, summarize_detection
from custom.networks import BertTextEncoder, lsms_tiny
from custom.transforms import RandDropTextd, ReferredMaskd, ReferringSlicesd


@pytest.fixture(scope="module")
def text_encoder():
    return BertTextEncoder()


def dense_case():
    """(1, 6, 5, 4) instance map with lesions 1 and 2 and a liver around them."""
    instances = torch.zeros(1, 6, 5, 4)
    instances[0, 1, 1, 0], instances[0, 3, 3, 2] = 1, 2
    liver = torch.zeros(1, 6, 5, 4)
    liver[0, :5, :4, :3] = 1
    return {"lesions": instances, "liver": liver, "targets": [2], "case_id": "c1"}


def test_dense_targets_are_referred_liver_and_all_lesions():
    label = ReferredMaskd(dense=True)(dense_case())["label"]
    assert label.shape == (3, 6, 5, 4)
    assert label[0].sum() == 1 and label[0, 3, 3, 2] == 1
    assert label[1].sum() == 5 * 4 * 3
    assert label[2].sum() == 2 and label[2, 1, 1, 0] == 1
    with pytest.raises(ValueError, match="no liver mask.*dense=False"):
        ReferredMaskd(dense=True)({k: v for k, v in dense_case().items() if k != "liver"})


def test_text_free_samples_answer_all_lesions_and_take_their_slices():
    data = ReferredMaskd(dense=True)(dense_case())
    data["attention_mask"] = torch.ones(8, dtype=torch.long)
    data["image"] = torch.rand(1, 6, 5, 4)
    dropped = RandDropTextd(prob=1.0)(data)
    assert dropped["attention_mask"].sum() == 0
    torch.testing.assert_close(dropped["label"][0], dropped["label"][2])
    kept = RandDropTextd(prob=0.0)(data)
    assert kept["attention_mask"].sum() == 8 and kept["label"][0].sum() == 1
    slices = ReferringSlicesd(keys=["image", "label"], negative_ratio=0.0)(dropped)
    assert sorted(s["slice_index"] for s in slices) == [0, 2]
    assert all(s["label"].shape == (3, 6, 5) for s in slices)
    with pytest.raises(ValueError, match="dense label"):
        RandDropTextd(prob=1.0)({"label": torch.zeros(1, 2, 2, 2), "attention_mask": torch.ones(4)})


def test_a_text_free_sample_in_a_text_batch_equals_the_no_text_network(text_encoder):
    torch.manual_seed(0)
    net = lsms_tiny(text_encoder=text_encoder, out_channels=3).eval()
    tokens = text_encoder.tokenize(["the largest lesion", "the cyst in the left lobe"])
    tokens["attention_mask"][1] = 0
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        mixed = net(image, **tokens)
        no_text = net(image[1:])
        with_text = net(image[:1], **{k: v[:1] for k, v in tokens.items()})
    assert mixed.shape == (2, 3, 64, 64)
    torch.testing.assert_close(mixed[1:], no_text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[:1], with_text, atol=1e-5, rtol=1e-4)
    assert (no_text - net(image[1:], **{k: v[:1] for k, v in tokens.items()})).abs().max() > 1e-5


def test_three_channel_loss_supervises_every_channel_and_skips_text_free_contrast(text_encoder):
    torch.manual_seed(0)
    net = lsms_tiny(text_encoder=text_encoder, out_channels=3)
    tokens = text_encoder.tokenize(["the largest lesion", "all lesions"])
    tokens["attention_mask"][1] = 0
    target = torch.zeros(2, 3, 64, 64)
    target[:, 1, 10:50, 10:50] = 1
    target[:, 2, 20:26, 20:26] = 1
    target[0, 0, 20:26, 20:26] = 1
    output = net(torch.rand(2, 1, 64, 64), **tokens, return_embeddings=True)
    assert output["text_present"].tolist() == [True, False]
    loss = LSMSLoss()(output, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.head[1].weight.grad[1:].abs().sum() > 0
    dense_only = LSMSLoss(dense_weight=0.0, contrastive_weight=0.0)(output, target)
    assert loss > dense_only
    with pytest.raises(ValueError, match="3 output channels but the target has 1"):
        LSMSLoss()(output, target[:, :1])


def test_a_missed_small_lesion_costs_as_much_as_a_missed_large_one_with_the_size_weighted_term():
    import torch.nn.functional as F

    from custom.losses import LesionSizeWeightedBCE

    target = torch.zeros(2, 1, 40, 40)
    target[0, 0, 2:4, 2:4] = 1  # 4 pixels
    target[1, 0, 10:30, 10:30] = 1  # 400 pixels
    weights = LesionSizeWeightedBCE(reference_area=80.0).weights(target)
    assert torch.allclose(weights[0, 0, 2:4, 2:4], torch.full((2, 2), 80.0**0.5 / 2))
    assert float(weights[1].max()) == 1.0 and float(weights[0, 0, 0, 0]) == 1.0
    weighted = LesionSizeWeightedBCE(reference_area=80.0)
    missed_small = torch.where(target[:1] > 0, -4.0, -4.0)  # everything predicted background
    missed_large = torch.full_like(target[1:], -4.0)
    plain_ratio = F.binary_cross_entropy_with_logits(missed_small, target[:1]) / F.binary_cross_entropy_with_logits(
        missed_large, target[1:]
    )
    weighted_ratio = weighted(missed_small, target[:1]) / weighted(missed_large, target[1:])
    assert weighted_ratio > 2 * plain_ratio
    logits = torch.randn(2, 3, 40, 40, requires_grad=True)
    dense = torch.cat([target, target, target], 1)
    with_term = LSMSLoss(small_lesion_weight=1.0, contrastive_weight=0.0)(logits, dense)
    assert with_term > LSMSLoss(contrastive_weight=0.0)(logits, dense)
    with pytest.raises(ValueError, match="reference_area"):
        LesionSizeWeightedBCE(reference_area=0)


def test_split_outputs_names_each_channel_and_a_one_channel_network_fills_the_first():
    output = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 2, 2, 2)
    split = SplitOutputsd("pred")({"pred": output})
    assert split["pred"].shape == (1, 2, 2, 2) and float(split["lesions_prob"].max()) == 2.0
    assert set(SplitOutputsd("pred")({"pred": output[:1]})) == {"pred"}


def test_liver_region_keeps_the_largest_liver_grown_by_the_margin_and_says_when_there_is_none():
    liver = np.zeros((20, 20, 10))
    liver[5:10, 6:12, 2:5] = 0.9
    liver[15:17, 15:17, 8] = 0.9  # a small second component (e.g. the spleen) is left out
    region, description = liver_region(liver, spacing=(2.0, 2.0, 5.0), margin_mm=2.0)
    assert region[4:11, 6:12, 2:5].all() and region[5:10, 5:13, 2:5].all() and region[15, 15, 8] == 0
    assert region.sum() == 5 * 6 * 3 + 2 * (5 + 6) * 3  # one voxel in-plane on each side, none along z (5 mm)
    assert description["liver_found"] and description["liver_volume_ml"] == pytest.approx(5 * 6 * 3 * 20 / 1000)
    assert description["box_voxels"] == [[5, 10], [6, 12], [2, 5]]
    nothing, description = liver_region(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0))
    assert not nothing.any() and description == {"liver_found": False}

    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    data = {
        "pred": MetaTensor(torch.ones(1, 20, 20, 10), affine=affine),
        "liver_prob": MetaTensor(torch.as_tensor(liver[None]), affine=affine),
    }
    restricted = LiverRegiond("pred", margin_mm=2.0)(data)
    assert restricted["pred"].sum() == region.sum() and restricted["liver_region"]["liver_found"]
    assert torch.equal(restricted["liver_region_mask"], torch.as_tensor(region))
    # another expression of the same volume reuses the region it is given (here with an empty liver output)
    reused = LiverRegiond("pred")(
        {
            **data,
            "liver_prob": data["liver_prob"] * 0,
            **{k: restricted[k] for k in ("liver_region", "liver_region_mask")},
        }
    )
    assert reused["pred"].sum() == region.sum() and reused["liver_region"] == restricted["liver_region"]
    data["liver_prob"] = data["liver_prob"] * 0
    none_found = LiverRegiond("pred")(data)
    assert none_found["pred"].sum() == 0 and none_found["liver_region"] == {"liver_found": False}
    assert "liver_region" not in LiverRegiond("pred")({"pred": torch.ones(1, 2, 2, 2)})


class CountingNetwork(torch.nn.Module):
    """Channel 0: 5 with text, 1 without; channel 1 (liver): the image; channel 2: zeros. Counts slices seen."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.slices = 0

    def forward(self, image, input_ids=None, attention_mask=None):
        self.slices += image.shape[0]
        referred = torch.full_like(image[:, :1], 5.0 if input_ids is not None else 1.0)
        return torch.cat([referred, self.scale * (image[:, :1] * 20 - 10), torch.zeros_like(image[:, :1])], 1)


def test_liver_focus_answers_inside_the_liver_box_only_and_shares_the_text_free_pass():
    image = torch.zeros(1, 1, 16, 16, 6)
    image[0, 0, 4:8, 5:9, 1:3] = 1  # the liver: logit +10
    network = CountingNetwork()
    inferer = ReferringSliceInferer(
        roi_size=(-1, -1), sw_batch_size=4, spatial_dim=2, focus_channel=1, focus_margin=(1, 1, 1)
    )
    text = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    output = inferer(image, network, **text)
    inside = (0, 0, slice(3, 9), slice(4, 10), slice(0, 4))
    assert (output[inside] == 5.0).all()
    assert (output[0, 0] == 5.0).sum() == 6 * 6 * 4 and (output[0, 0][output[0, 0] != 5.0] == OUTSIDE_LOGIT).all()
    assert network.slices == 6 + 4  # every slice without text, then the 4 slices of the box with it
    inferer(image, network, **text)
    assert network.slices == 6 + 4 + 4  # the text-free pass of the same volume is reused
    with torch.no_grad():
        network.scale.mul_(1.0)  # new weights: the text-free pass runs again
    no_text = inferer(image, network)
    assert network.slices == 6 + 4 + 4 + 6 and (no_text[inside] == 1.0).all()
    empty = inferer(torch.zeros(1, 1, 16, 16, 6), network, **text)
    assert (empty[0, 0] == OUTSIDE_LOGIT).all()
    assert liver_box(np.zeros((3, 3, 3), bool)) is None


class LesionNetwork(torch.nn.Module):
    """Channel 0: the slice's position in the image's third channel plus 5 with text; channel 1 (liver): the image's
    first channel; channel 2 (all lesions): its second one. Counts slices seen."""

    def __init__(self) -> None:
        super().__init__()
        self.slices = 0

    def forward(self, image, input_ids=None, attention_mask=None):
        self.slices += image.shape[0]
        referred = image[:, 2:3] + (5.0 if input_ids is not None else 0.0)
        return torch.cat([referred, image[:, :1] * 20 - 10, image[:, 1:2] * 20 - 10], 1)


def test_referring_pass_runs_on_the_slices_that_hold_lesion_candidates_only_with_the_same_evidence():
    image = torch.zeros(1, 3, 16, 16, 12)
    image[0, 0, 3:12, 3:12, 1:9] = 1  # the liver on slices 1..8
    image[0, 1, 6:8, 6:8, 5] = 1  # one lesion, on slice 5 only
    image[0, 2] = torch.arange(12.0)  # which slice the network saw
    text = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    settings = {"roi_size": (-1, -1), "sw_batch_size": 4, "spatial_dim": 2, "focus_channel": 1}
    whole_box = ReferringSliceInferer(**settings, focus_margin=(1, 1, 1))(image, LesionNetwork(), **text)
    network = LesionNetwork()
    inferer = ReferringSliceInferer(**settings, focus_margin=(1, 1, 1), lesion_channel=2, lesion_threshold=0.5)
    output = inferer(image, network, **text)
    assert network.slices == 12 + 3  # the text-free pass, then slice 5 of the liver's box and its neighbours
    answered = (output[0, 0] != OUTSIDE_LOGIT).any(0).any(0)
    assert answered.nonzero().flatten().tolist() == [4, 5, 6]
    assert torch.equal(output[..., 4:7], whole_box[..., 4:7])  # the same evidence where candidates can be
    assert torch.equal(output[:, 1:], whole_box[:, 1:])  # text-free channels untouched
    no_lesion = image.clone()
    no_lesion[0, 1] = 0
    network = LesionNetwork()
    empty = inferer(no_lesion, network, **text)
    assert network.slices == 12 and (empty[0, 0] == OUTSIDE_LOGIT).all()  # no candidate, no referring pass
    assert torch.equal(inferer(image, LesionNetwork())[:, 0, 3:12, 3:12, 1:9], whole_box[:, 0, 3:12, 3:12, 1:9] - 5)
    two_apart = image.clone()
    two_apart[0, 1, 6:8, 6:8, 5] = 0
    two_apart[0, 1, 6:8, 6:8, 2] = two_apart[0, 1, 4:6, 8:10, 7] = 1  # lesions on slices 2 and 7
    network = LesionNetwork()
    output = inferer(two_apart, network, **text)
    answered = (output[0, 0] != OUTSIDE_LOGIT).any(0).any(0)
    assert answered.nonzero().flatten().tolist() == [1, 2, 3, 6, 7, 8] and network.slices == 12 + 6
    assert torch.equal(output[:, 0, ..., [1, 2, 3, 6, 7, 8]], whole_box[:, 0, ..., [1, 2, 3, 6, 7, 8]])


def two_level_inferer(**overrides) -> ReferringSliceInferer:
    settings = {"roi_size": (-1, -1), "sw_batch_size": 8, "spatial_dim": 2, "focus_channel": 1}
    settings.update(focus_margin=(1, 1, 1), coarse_factor=2, coarse_step_mm=8.0, coarse_margin_mm=2.0)
    return ReferringSliceInferer(**{**settings, **overrides})


def test_two_level_text_free_pass_runs_on_the_coarse_livers_box_and_grows_it_to_hold_the_liver():
    image = torch.zeros(1, 3, 40, 40, 40)
    image[0, 0, 10:20, 10:20, 4:21] = 1  # the liver (the network's liver channel is the first image channel)
    image[0, 0, 10, 10, 21:36] = 1  # a one-voxel neck further down, too thin for the 2x pooled coarse pass
    image[0, 2] = torch.rand(40, 40, 40)
    volume = MetaTensor(image, affine=torch.eye(4))  # 1 mm voxels: the coarse pass reads every 8th slice
    network = LesionNetwork()
    output = two_level_inferer()(volume, network)
    whole = ReferringSliceInferer(roi_size=(-1, -1), sw_batch_size=8, spatial_dim=2)(volume, LesionNetwork())
    # coarse: slices 0, 8, .. 32; liver on 8 and 16 -> box x, y 5..25 (margin 1 + slack 2 + pooling 2) and z 0..28
    # (margin 1 + slack 2 + step 8); the liver found there reaches z 35: the box grows in z, new slices only
    assert network.slices == 5 + 28 + 11
    box = (slice(5, 25), slice(5, 25), slice(0, 39))
    torch.testing.assert_close(output[(slice(None), slice(1, 3), *box)], whole[(slice(None), slice(1, 3), *box)])
    outside = torch.ones(40, 40, 40, dtype=torch.bool)
    outside[box] = False
    assert (output[0, 1:, outside] == OUTSIDE_LOGIT).all()
    assert isinstance(output, MetaTensor) and torch.equal(output.affine, volume.affine)

    image[0, 0, 20:30, 10:11, 20] = 1  # a thin arm in plane, beyond the box: it grows in plane, all slices again
    network = LesionNetwork()
    output = two_level_inferer()(MetaTensor(image, affine=torch.eye(4)), network)
    assert network.slices == 5 + 28 + 39 + 40  # x to 30 and z to 39, then x to 35 and z to 40, each time 5 past it
    liver = output[0, 1] >= 0
    assert torch.equal(liver, image[0, 0] > 0)  # the whole liver, nothing cut

    long_arm = torch.zeros(1, 3, 80, 40, 40)
    long_arm[0, 0, 10:20, 10:20, 4:21] = 1
    long_arm[0, 0, 20:78, 10, 12] = 1  # one voxel thick, 58 long: unseen by the coarse pass, reached by growing
    output = two_level_inferer()(MetaTensor(long_arm, affine=torch.eye(4)), LesionNetwork())
    assert torch.equal(output[0, 1] >= 0, long_arm[0, 0] > 0)

    network = LesionNetwork()
    no_liver = two_level_inferer()(MetaTensor(torch.zeros(1, 3, 40, 40, 40), affine=torch.eye(4)), network)
    assert network.slices == 5 + 40  # no liver in the coarse pass: every whole slice, as with one level
    assert (no_liver[0, 1] < 0).all()
    network = LesionNetwork()
    two_level_inferer()(image, network)  # a plain tensor: no voxel size for the coarse grid, whole slices
    assert network.slices == 40
    with pytest.raises(ValueError, match="coarse_factor"):
        two_level_inferer(coarse_factor=0)


class ContextNetwork(torch.nn.Module):
    """Channel 0 the slice's own (centre) first window, so the output shows which slice sat in the centre; the liver
    channel from the same centre slice; records the channel count it saw."""

    def __init__(self, context_slices: int) -> None:
        super().__init__()
        self.centre = context_slices
        self.channels = set()

    def forward(self, image, input_ids=None, attention_mask=None):
        self.channels.add(image.shape[1])
        centre = image[:, self.centre : self.centre + 1]
        return torch.cat([centre, centre * 20 - 10, torch.zeros_like(centre)], 1)


def test_context_slices_at_inference_are_the_training_layout_also_inside_the_liver_box():
    volume = torch.arange(2 * 3 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 3, 5)
    expanded = slice_context(volume, 1)
    training = ReferringSlicesd(keys=["image"], label_key="label", context_slices=1)
    for z in range(5):
        assert torch.equal(expanded[0, ..., z], training._slice(volume[0], z, 1))
    assert torch.equal(slice_context(volume, 0), volume)
    for step in (2, 3):  # every step-th slice with its context, as the coarse pass reads them
        assert torch.equal(slice_context(volume, 1, step), expanded[..., ::step])
        assert torch.equal(slice_context(volume, 0, step), volume[..., ::step])

    image = torch.zeros(1, 2, 16, 16, 8)
    image[0, 0, 4:8, 5:9, 2:5] = torch.tensor([0.6, 0.7, 0.8])  # the liver, each slice its own value
    network = ContextNetwork(context_slices=1)
    inferer = ReferringSliceInferer(
        roi_size=(-1, -1), sw_batch_size=4, spatial_dim=2, focus_channel=1, focus_margin=(1, 1, 0), context_slices=1
    )
    text = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    output = inferer(image, network, **text)
    assert network.channels == {6}
    assert torch.equal(output[0, 0, 4:8, 5:9, 2:5], image[0, 0, 4:8, 5:9, 2:5])  # each slice in the centre
    assert (output[0, 0, :, :, [0, 1, 5, 6, 7]] == OUTSIDE_LOGIT).all()


def test_detection_matches_lesions_counts_false_positives_and_summarizes_by_size_and_density():
    instances = np.zeros((20, 20, 5), np.int64)
    instances[2:6, 2:6, 1:3] = 1  # 32 voxels
    instances[10:12, 10:12, 2] = 2  # 4 voxels, missed
    pred = np.zeros_like(instances, bool)
    pred[2:6, 2:6, 1:2] = True  # half of lesion 1
    pred[15:17, 15:17, 4] = True  # touches no lesion
    lesions, false_positives = match_detections(pred, instances, voxel_ml=0.1)
    assert false_positives == 1
    assert lesions[0] == {
        "id": 1,
        "volume_ml": pytest.approx(3.2),
        "dice": pytest.approx(2 * 16 / 48),
        "found": True,
        "covered": pytest.approx(0.5),
    }
    assert lesions[1]["found"] is False and lesions[1]["dice"] == 0.0 and lesions[1]["volume_ml"] == pytest.approx(0.4)
    assert lesions[1]["covered"] == 0.0
    summary = summarize_detection(
        [{**lesions[0], "density": "hypodense"}, {**lesions[1], "density": "hyperdense"}],
        [false_positives, 0],
        [0.9, 1.0],
    )
    groups = summary["by_density_and_size"]
    assert groups["all"]["all"]["recall"] == 0.5
    assert groups["hypodense"]["1-5ml"]["recall"] == 1.0 and groups["hyperdense"]["<1ml"]["recall"] == 0.0
    assert groups["hyperdense"][">=1ml"]["lesions"] == 0
    assert summary["false_positives_per_case"] == 0.5 and summary["liver_dice"] == pytest.approx(0.95)


def test_candidate_detection_gives_a_merged_candidate_to_one_lesion_only():
    instances = np.zeros((12, 4, 2), np.int64)
    instances[0:6, :, 0], instances[6:8, :, 0] = 1, 2  # 24 and 8 voxels, touching
    instances[10:12, :, 1] = 3
    merged = np.zeros_like(instances, np.int32)
    merged[0:8, :, 0] = 1  # one candidate over lesions 1 and 2: it stands for lesion 1
    merged[10:12, :, 0] = 2  # next to lesion 3, touching nothing
    lesions, unmatched = match_candidate_detections(merged, instances, voxel_ml=0.1)
    assert unmatched == 1
    assert lesions[0]["dice"] == pytest.approx(2 * 24 / (24 + 32)) and lesions[0]["found"]
    assert lesions[1]["dice"] == 0.0 and not lesions[1]["found"] and not lesions[2]["found"]
    components, _ = match_detections(merged > 0, instances, voxel_ml=0.1)
    assert components[1]["found"]  # as a binary component, the merged one finds both lesions
    assert components[1]["covered"] == 1.0 and components[2]["covered"] == 0.0
    split = merged.copy()
    split[6:8, :, 0] = 3
    lesions, _ = match_candidate_detections(split, instances, voxel_ml=0.1)
    assert lesions[0]["dice"] == 1.0 and lesions[1]["dice"] == 1.0


class ChannelCounter:
    """A transform that records how many channels ``pred`` has when it passes."""

    def __init__(self) -> None:
        self.channels: list[int] = []

    def __call__(self, data):
        self.channels.append(int(data["pred"].shape[0]))
        return data


class LoadPhantom(MapTransform):
    """Stands for loading: records the path and gives a (1, 24, 20, 6) volume with a bright "liver" box."""

    def __init__(self) -> None:
        super().__init__("image")
        self.loaded: list[str] = []

    def __call__(self, data):
        self.loaded.append(data["image"])
        volume = torch.zeros(1, 24, 20, 6)
        volume[0, 4:18, 3:15, 1:5] = 1.0
        return {**data, "image": MetaTensor(volume, affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))}


def test_per_volume_work_is_done_once_and_every_expression_gets_the_same_results():
    from monai.transforms import Activationsd, Compose, CopyItemsd, Invertd, Spacingd

    from custom.detection.postprocessing import PerVolumeOutputsd
    from custom.referral.choose import LesionCandidatesd
    from custom.transforms import PerVolumeCompose

    load = LoadPhantom()
    volume_steps = [load, CopyItemsd("image", names="hounsfield"), Spacingd("image", pixdim=(2.0, 2.0, -1))]
    shared_pre, plain_pre = PerVolumeCompose(volume_steps, keys=["image"]), Compose(volume_steps)
    counter = ChannelCounter()

    def channel_steps(pre):
        return [
            counter,
            Activationsd("pred", sigmoid=True),
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            SplitOutputsd("pred"),
            LiverRegiond(["pred", "lesions_prob"], margin_mm=2.0),
            LesionCandidatesd("lesions_prob", min_voxels=1),
        ]

    shared_post, plain_post = PerVolumeOutputsd("pred", channel_steps(shared_pre)), Compose(channel_steps(plain_pre))
    generator = torch.Generator().manual_seed(0)
    results = []
    all_lesions = torch.randn(1, 12, 10, 6, generator=generator)  # text-free channels: the same for every text
    for text in ("the cyst", "all lesions", "the largest lesion"):
        referred = torch.randn(1, 12, 10, 6, generator=generator)
        for pre, post in ((shared_pre, shared_post), (plain_pre, plain_post)):
            item = pre({"image": "ct.nii.gz", "text": text})
            liver = (item["image"] > 0.5).float() * 8 - 4
            pred = MetaTensor(torch.cat([referred, liver, all_lesions]), meta=item["image"].meta)
            pred.applied_operations = item["image"].applied_operations
            results.append(post({**item, "pred": pred}))
    assert load.loaded == ["ct.nii.gz"] * 4  # once shared, three times plain
    assert counter.channels == [3, 3, 1, 3, 1, 3]  # shared: channel 0 only after the first expression
    for shared, plain in zip(results[::2], results[1::2]):
        assert shared["text"] == plain["text"]
        for key in ("pred", "liver_prob", "lesions_prob"):
            torch.testing.assert_close(torch.as_tensor(shared[key]), torch.as_tensor(plain[key]))
        assert shared["liver_region"] == plain["liver_region"] and shared["liver_region"]["liver_found"]
        torch.testing.assert_close(shared["lesion_candidates"]["map"], plain["lesion_candidates"]["map"])
        assert shared["lesion_candidates"]["attributes"] == plain["lesion_candidates"]["attributes"]
    assert results[0]["lesion_candidates"]["map"].max() > 0
    assert results[2]["lesion_candidates"] is results[0]["lesion_candidates"]  # found once for the volume
    assert not torch.equal(results[0]["pred"], results[2]["pred"])  # each expression keeps its own channel 0

    other = shared_pre({"image": "other.nii.gz", "text": "the cyst"})  # another volume is loaded anew
    assert load.loaded[-1] == "other.nii.gz" and other["text"] == "the cyst"


@pytest.mark.parametrize("box_at_corner", [False, True])
def test_box_inversion_equals_inverting_the_whole_grid(box_at_corner):
    from monai.transforms import Compose, Invertd, Orientationd, Spacingd

    from custom.detection.postprocessing import BoxInvertd

    affine = np.array([[-0.7, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])  # LPS-like
    preprocessing = Compose([Orientationd("image", "RAS"), Spacingd("image", pixdim=[1.5, 1.5, -1], mode="bilinear")])
    image = preprocessing({"image": MetaTensor(torch.zeros(1, 60, 50, 14), affine=torch.as_tensor(affine))})["image"]
    generator = torch.Generator().manual_seed(0)
    output = torch.rand(3, *image.shape[1:], generator=generator)
    referred = torch.full(image.shape[1:], torch.sigmoid(torch.tensor(OUTSIDE_LOGIT)).item())
    box = (slice(0, 12), slice(0, 9), slice(0, 5)) if box_at_corner else (slice(8, 20), slice(5, 14), slice(3, 9))
    referred[box] = torch.rand(referred[box].shape, generator=generator)
    output[0] = referred
    data = {"image": image, "pred": MetaTensor(output, affine=image.affine)}

    whole = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)(data)["pred"]
    boxed = BoxInvertd("pred", preprocessing, orig_keys="image")(data)["pred"]
    assert boxed.shape == whole.shape == (3, 60, 50, 14)
    assert torch.allclose(boxed.as_tensor(), whole.as_tensor(), atol=1e-6)
    assert np.allclose(boxed.affine.numpy(), affine) and np.allclose(whole.affine.numpy(), affine)
    one_channel = BoxInvertd("pred", preprocessing, orig_keys="image")({**data, "pred": data["pred"][:1]})["pred"]
    assert torch.allclose(one_channel.as_tensor(), whole.as_tensor()[:1], atol=1e-6)


def test_an_answer_goes_back_to_the_input_grid_as_whole_grid_resampling_gives_it_and_leaves_its_neighbour_out():
    from monai.transforms import Compose, Invertd, Orientationd, Spacingd

    from custom.detection.postprocessing import AnswerToInputGridd

    affine = np.array([[-0.7, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])  # LPS-like
    preprocessing = Compose([Orientationd("image", "RAS"), Spacingd("image", pixdim=[1.5, 1.5, -1], mode="bilinear")])
    image = preprocessing({"image": MetaTensor(torch.zeros(1, 60, 50, 14), affine=torch.as_tensor(affine))})["image"]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[1:]], indexing="ij"), -1).astype(np.float32)

    def blob(center, radius):
        return np.exp(-(((grid - np.asarray(center)) / np.asarray(radius)) ** 2).sum(-1))

    # two lesions touching along x, and a third one apart; probabilities on the network grid
    lesions = np.maximum.reduce(
        [blob((10, 12, 6), (3, 3, 2)), blob((15, 12, 6), (3, 3, 2)), blob((22, 24, 8), (3, 4, 2))]
    )
    candidates = np.zeros(lesions.shape, np.int32)
    candidates[(lesions >= 0.5) & (grid[..., 0] <= 12)] = 1  # the touching pair, split at x = 12.5
    candidates[(lesions >= 0.5) & (grid[..., 0] > 12) & (grid[..., 1] < 18)] = 2
    candidates[(lesions >= 0.5) & (grid[..., 1] >= 18)] = 3
    referred = np.random.default_rng(0).random(lesions.shape).astype(np.float32)

    def answer(chosen, nifti_layout=False):
        mask = torch.as_tensor(np.isin(candidates, chosen), dtype=torch.float32)[None]
        data = {
            "image": image,
            "mask": MetaTensor(mask, affine=image.affine),
            "lesions_prob": MetaTensor(torch.as_tensor(lesions)[None], affine=image.affine),
            "pred": MetaTensor(torch.as_tensor(referred)[None], affine=image.affine),
        }
        step = AnswerToInputGridd(
            "mask",
            preprocessing,
            prob_key="lesions_prob",
            threshold=0.5,
            evidence_keys="pred",
            nifti_layout=nifti_layout,
        )
        return step(data)

    whole = {
        name: Invertd("x", preprocessing, orig_keys="image", nearest_interp=False)(
            {"image": image, "x": MetaTensor(torch.as_tensor(values)[None], affine=image.affine)}
        )["x"][0].numpy()
        for name, values in (("lesions", lesions), ("referred", referred))
    }
    apart = answer([3])
    assert apart["mask"].shape == (1, 60, 50, 14) and np.allclose(apart["mask"].affine.numpy(), affine)
    laid_out = answer([3], nifti_layout=True)["mask"][0].numpy()  # same values, first axis fastest in memory
    assert np.array_equal(laid_out, apart["mask"][0].numpy()) and laid_out.flags.f_contiguous
    found = apart["mask"][0].numpy() > 0
    # the lone lesion: exactly its component of the whole-grid resampling thresholded
    components, _ = ndimage.label(whole["lesions"] >= 0.5, structure=np.ones((3, 3, 3), bool))
    lone = components == np.bincount(components[found]).argmax()
    assert found.sum() > 100 and np.array_equal(found, lone)
    evidence = apart["pred"][0].numpy()
    assert np.allclose(evidence[found], whole["referred"][found], atol=1e-5)  # the record's figures inside it

    pair = answer([1, 2])["mask"][0].numpy() > 0
    first = answer([1])["mask"][0].numpy() > 0
    assert first.sum() > 50 and (first <= pair).all()
    assert (first & found).sum() == 0  # the lone lesion is not part of another answer
    assert first.sum() < 0.75 * pair.sum()  # its touching neighbour stays out of the answer
    empty = answer([])["mask"]
    assert empty.shape == (1, 60, 50, 14) and empty.sum() == 0


def test_an_answer_after_other_preprocessing_goes_back_through_the_whole_grid_inversion():
    from monai.transforms import Compose, Invertd, Spacingd

    from custom.detection.postprocessing import AnswerToInputGridd

    preprocessing = Compose([Spacingd("image", pixdim=[1.5, 1.5, -1], mode="bilinear")])  # no Orientationd
    loaded = MetaTensor(torch.zeros(1, 40, 36, 8), affine=torch.diag(torch.tensor([0.7, 0.8, 2.5, 1.0])))
    image = preprocessing({"image": loaded})["image"]
    lesions = torch.zeros(image.shape[1:])
    lesions[5:9, 6:10, 2:5] = 0.9
    data = {
        "image": image,
        "mask": MetaTensor((lesions > 0.5).float()[None], affine=image.affine),
        "lesions_prob": MetaTensor(lesions[None], affine=image.affine),
    }
    answer = AnswerToInputGridd("mask", preprocessing, prob_key="lesions_prob")(data)["mask"]
    whole = Invertd("x", preprocessing, orig_keys="image", nearest_interp=False)(
        {"image": image, "x": MetaTensor(lesions[None], affine=image.affine)}
    )["x"]
    assert answer.shape == (1, 40, 36, 8) and answer.dtype == torch.uint8
    assert torch.equal(answer[0].bool(), whole[0] >= 0.5) and answer.sum() > 0
    assert np.allclose(np.asarray(answer.affine), np.diag([0.7, 0.8, 2.5, 1.0]))


def test_the_liver_box_margin_in_mm_covers_as_many_slices_as_their_thickness_needs():
    settings = {"roi_size": (-1, -1), "sw_batch_size": 4, "spatial_dim": 2, "focus_channel": 1, "focus_margin_mm": 8}
    image = torch.zeros(1, 3, 16, 16, 12)
    image[0, 0, 6:10, 6:10, 5:7] = 1  # the liver on slices 5 and 6
    image[0, 2] = torch.arange(12.0)
    text = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    for thickness, slices in ((4.0, [3, 4, 5, 6, 7, 8]), (2.0, list(range(1, 11)))):
        affine = torch.diag(torch.tensor([2.0, 2.0, thickness, 1.0]))
        output = ReferringSliceInferer(**settings)(MetaTensor(image, affine=affine), LesionNetwork(), **text)
        answered = (output[0, 0] != OUTSIDE_LOGIT).any(0).any(0)
        assert answered.nonzero().flatten().tolist() == slices  # 8 mm: 2 slices of 4 mm, 4 of 2 mm
        rows = (output[0, 0] != OUTSIDE_LOGIT).any(1).any(1).nonzero().flatten().tolist()
        assert rows == list(range(2, 14))  # 8 mm in-plane: 4 pixels of 2 mm on either side
