"""Transforms: HU windows, referred mask, volume-to-slice samples, tokenisation, expression choice, full pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose, DeleteItemsd, EnsureChannelFirstd, LoadImaged, Orientationd, Resized
from monai.utils import set_determinism

from custom.data.datalist import expand_expressions, load_datalist
from custom.text import DEFAULT_MAX_TOKENS
from custom.transforms import HUWindowd, RandSelectExpressiond, ReferredMaskd, ReferringSlicesd, Tokenized


@pytest.fixture(scope="module")
def tokenizer_transform():
    return Tokenized()


def test_hu_window_maps_window_edges_to_0_and_1():
    hu = MetaTensor(torch.tensor([-1000.0, -160.0, 40.0, 240.0, 1000.0]).reshape(1, 5, 1, 1))
    out = HUWindowd("image", windows=[[40, 400], [60, 160]])({"image": hu})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (2, 5, 1, 1) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].flatten(), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(out[1].flatten(), [0.0, 0.0, 0.375, 1.0, 1.0])
    with pytest.raises(ValueError, match="width > 0"):
        HUWindowd("image", windows=[[40, 0]])


def test_referred_mask_is_the_union_of_targets():
    instances = torch.zeros(1, 4, 4, 2)
    instances[0, 0, 0, 0], instances[0, 1, 1, 1], instances[0, 2, 2, 0] = 1, 2, 3
    transform = ReferredMaskd()
    label = transform({"lesions": instances, "targets": [1, 3]})["label"]
    assert label.shape == (1, 4, 4, 2) and label.dtype == torch.float32
    assert label.sum() == 2 and label[0, 0, 0, 0] == 1 and label[0, 2, 2, 0] == 1 and label[0, 1, 1, 1] == 0
    assert transform({"lesions": instances, "targets": []})["label"].sum() == 0
    with pytest.raises(ValueError, match=r"case_007.*target id 9.*ids present: \[1, 2, 3\]"):
        transform({"lesions": instances, "targets": [9], "case_id": "case_007"})
    assert ReferredMaskd(allow_absent_targets=True)({"lesions": instances, "targets": [9]})["label"].sum() == 0


def slice_volume(depth=10, channels=2):
    """(C, 4, 3, D) volume whose value is the slice index (plus 100 * channel)."""
    z = torch.arange(depth, dtype=torch.float32).reshape(1, 1, 1, depth)
    return (z + 100 * torch.arange(channels).reshape(-1, 1, 1, 1)).expand(channels, 4, 3, depth).clone()


def slice_data(label_slices, liver_slices=range(2, 9), depth=10):
    label = torch.zeros(1, 4, 3, depth)
    label[..., list(label_slices)] = 1
    liver = torch.zeros(1, 4, 3, depth)
    liver[..., list(liver_slices)] = 1
    return {
        "image": slice_volume(depth),
        "label": label,
        "liver": liver,
        "lesions": label.clone(),
        "text": "the cyst",
        "kind": "density",
        "case_id": "c1",
        "input_ids": torch.ones(DEFAULT_MAX_TOKENS),
    }


def test_slices_hold_targets_plus_a_share_of_liver_slices_without_them():
    transform = ReferringSlicesd(keys=["image", "label"], negative_ratio=1.0)
    transform.set_random_state(0)
    samples = transform(slice_data([4, 5, 6]))
    indices = [s["slice_index"] for s in samples]
    assert len(samples) == 6 and {4, 5, 6} <= set(indices)
    assert set(indices) - {4, 5, 6} <= {2, 3, 7, 8}  # inside the liver's z-range
    for sample in samples:
        z = sample["slice_index"]
        assert sample["image"].shape == (2, 4, 3) and sample["label"].shape == (1, 4, 3)
        assert sample["image"][0, 0, 0] == z and sample["image"][1, 0, 0] == 100 + z
        assert bool(sample["label"].any()) == (z in (4, 5, 6))
        assert sample["text"] == "the cyst" and sample["case_id"] == "c1" and sample["input_ids"].shape == (32,)
        assert "lesions" not in sample and "liver" not in sample  # volumes are not copied into slices
    half = ReferringSlicesd(keys=["image", "label"], negative_ratio=0.3)(slice_data([4, 5, 6]))
    assert len(half) == 4


def test_negative_expressions_give_every_liver_slice_and_no_liver_gives_every_slice():
    samples = ReferringSlicesd(keys=["image", "label"])(slice_data([]))
    assert [s["slice_index"] for s in samples] == list(range(2, 9))
    assert all(s["label"].sum() == 0 for s in samples)
    data = slice_data([])
    del data["liver"]
    assert len(ReferringSlicesd(keys=["image", "label"])(data)) == 10


def test_every_lesion_brings_a_slice_and_the_referent_keeps_at_most_half():
    data = slice_data(range(2, 8), liver_slices=range(10))
    lesions = data["label"].clone()  # the referent, id 1, on slices 2..7
    lesions[0, 0, 0, 9] = 2  # a one-voxel lesion on slice 9
    lesions[0, 1, 1, 0:2] = 3  # a small lesion on slices 0 and 1
    data["lesions"] = lesions
    transform = ReferringSlicesd(keys=["image", "label"], negative_ratio=0.25, max_samples=4, lesion_key="lesions")
    plain = ReferringSlicesd(keys=["image", "label"], negative_ratio=0.25, max_samples=4)
    plain_holds_slice_9 = []
    for seed in range(20):
        transform.set_random_state(seed)
        indices = {s["slice_index"] for s in transform(data)}
        assert (
            len(indices) == 4 and 9 in indices and len(indices & {0, 1}) == 1 and len(indices & set(range(2, 8))) == 2
        )
        plain.set_random_state(seed)
        plain_holds_slice_9.append(9 in {s["slice_index"] for s in plain(data)})
    assert not all(plain_holds_slice_9)  # without the lesion map a small lesion is often left out

    negative = {**data, "label": torch.zeros_like(data["label"])}
    transform.set_random_state(0)
    indices = {s["slice_index"] for s in transform(negative)}  # one slice of each of the 3 lesions, 1 other
    assert len(indices) == 4 and 9 in indices and indices & {0, 1} and indices & set(range(2, 8))


def test_context_slices_are_channels_with_replicated_edges():
    transform = ReferringSlicesd(keys=["image", "label"], negative_ratio=0.0, context_slices=1)
    samples = transform(slice_data([0, 9], liver_slices=range(10)))
    first, last = samples
    assert first["image"].shape == (6, 4, 3) and first["label"].shape == (1, 4, 3)
    assert first["image"][:, 0, 0].tolist() == [0, 0, 1, 100, 100, 101]
    assert last["image"][:, 0, 0].tolist() == [8, 9, 9, 108, 109, 109]


def test_max_samples_is_a_reproducible_random_subset():
    transform = ReferringSlicesd(keys=["image", "label"], negative_ratio=1.0, max_samples=3)
    picks = []
    for _ in range(2):
        transform.set_random_state(7)
        picks.append([s["slice_index"] for s in transform(slice_data([3, 4, 5, 6]))])
    assert picks[0] == picks[1] and len(picks[0]) == 3 and picks[0] == sorted(picks[0])
    transform.set_random_state(8)
    others = {tuple(s["slice_index"] for s in transform(slice_data([3, 4, 5, 6]))) for _ in range(10)}
    assert len(others) > 1


def test_slice_affine_points_at_the_slice():
    affine = torch.diag(torch.tensor([1.5, 1.5, 4.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 20.0, -300.0], dtype=torch.float64)
    data = slice_data([5])
    data["image"] = MetaTensor(data["image"], affine=affine)
    sample = ReferringSlicesd(keys=["image", "label"], negative_ratio=0.0)(data)[0]
    assert isinstance(sample["image"], MetaTensor)
    assert float(sample["image"].affine[2, 3]) == -300.0 + 4.0 * 5


def test_tokenizer_pads_to_max_length_and_loads_once(tokenizer_transform):
    out = tokenizer_transform({"text": "the largest hypodense lesion in the right lobe"})
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (DEFAULT_MAX_TOKENS,) and mask.shape == (DEFAULT_MAX_TOKENS,)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    tokens = tokenizer_transform.tokenizer.convert_ids_to_tokens(ids[: int(mask.sum())].tolist())
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "right" in tokens and "lobe" in tokens
    assert int(mask.sum()) < DEFAULT_MAX_TOKENS and int(ids[int(mask.sum()) :].abs().sum()) == 0  # padding
    loaded = tokenizer_transform.tokenizer
    tokenizer_transform({"text": "all cysts"})
    assert tokenizer_transform.tokenizer is loaded
    long_text = " ".join(["lesion"] * 100)
    assert tokenizer_transform({"text": long_text})["attention_mask"].sum() == DEFAULT_MAX_TOKENS
    with pytest.raises(TypeError, match="string"):
        tokenizer_transform({"text": None})


def test_random_expression_choice_is_reproducible():
    case = {
        "case_id": "c",
        "expressions": [
            {"text": f"e{i}", "targets": [i] if i else [], "kind": "size", "id": f"c-{i}"} for i in range(5)
        ],
        "lesion_attributes": [{"id": 1}],
    }
    transform = RandSelectExpressiond()
    transform.set_random_state(3)
    first = transform(case)
    transform.set_random_state(3)
    assert transform(case) == first
    assert first["text"] == f"e{first['targets'][0] if first['targets'] else 0}"
    assert "expressions" not in first and "lesion_attributes" not in first and first["expression_id"].startswith("c-")


def test_pipeline_from_datalist_to_batches(small_dataset, tokenizer_transform):
    items = expand_expressions(load_datalist(small_dataset, "training"))
    items = [next(i for i in items if i["targets"]), next(i for i in items if not i["targets"])]
    keys = ["image", "lesions", "liver"]
    pipeline = Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS"),
            HUWindowd("image", windows=[[60, 160], [40, 400]]),
            ReferredMaskd(),
            tokenizer_transform,
            DeleteItemsd(keys="targets"),
            ReferringSlicesd(keys=["image", "label"], negative_ratio=0.5, context_slices=1, max_samples=4),
            Resized(keys=["image", "label"], spatial_size=(64, 64), mode=["bilinear", "nearest"]),
        ]
    )
    set_determinism(0)
    loader = DataLoader(Dataset(items, pipeline), batch_size=2, collate_fn=list_data_collate)
    batch = next(iter(loader))
    set_determinism(None)
    count = batch["image"].shape[0]
    assert 2 <= count <= 8 and batch["image"].shape == (count, 6, 64, 64) and batch["label"].shape == (count, 1, 64, 64)
    assert batch["input_ids"].shape == (count, DEFAULT_MAX_TOKENS) and len(batch["kind"]) == count
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    positive = [k != "negative" for k in batch["kind"]]
    assert any(positive) and not all(positive)
    label_sums = batch["label"].sum(dim=(1, 2, 3))
    assert all(s == 0 for s, p in zip(label_sums, positive) if not p)
    assert any(s > 0 for s, p in zip(label_sums, positive) if p)


def test_compact_copy_is_int16_only_when_every_value_survives_and_keeps_the_metadata():
    from custom.transforms import CompactCopyd

    affine = torch.diag(torch.tensor([-0.7, -0.7, 2.5, 1.0]))
    whole = MetaTensor(torch.randint(-1024, 3000, (1, 6, 5, 40)).float(), affine=affine, meta={"filename_or_obj": "a"})
    fractional = whole.clone()
    fractional[0, 1, 2, 37] += 0.5  # one value in the last slab
    huge = whole.clone()
    huge[0, 0, 0, 0] = 40000.0
    out = CompactCopyd(["a", "b", "c"], ["a_hu", "b_hu", "c_hu"])({"a": whole, "b": fractional, "c": huge})
    assert out["a_hu"].dtype == torch.int16 and torch.equal(out["a_hu"].float(), whole)
    assert out["b_hu"].dtype == torch.float32 and torch.equal(out["b_hu"], fractional)
    assert out["c_hu"].dtype == torch.float32 and torch.equal(out["c_hu"], huge)
    assert torch.equal(out["a_hu"].affine, whole.affine) and out["a_hu"].meta["filename_or_obj"] == "a"
    assert out["a_hu"].data_ptr() != whole.data_ptr() and out["a"] is whole


def test_a_batch_of_one_is_collated_as_monai_collates_it_without_copying_the_volume():
    from monai.data import decollate_batch

    from custom.engines import collate_without_copy

    image = MetaTensor(torch.rand(1, 5, 6, 7), affine=torch.diag(torch.tensor([-1.0, -1, 2, 1])))
    item = Orientationd("image", axcodes="RAS")({"image": image, "text": "the lesion", "ids": torch.arange(4), "n": 3})
    expected, collated = list_data_collate([item]), collate_without_copy([item])
    assert collated.keys() == expected.keys() and collated["text"] == expected["text"]
    for key in ("image", "ids", "n"):
        assert torch.equal(collated[key], expected[key])
    assert torch.equal(collated["image"].affine, expected["image"].affine) and collated["image"].is_batch
    assert collated["image"].applied_operations == expected["image"].applied_operations
    assert collated["image"].data_ptr() == item["image"].data_ptr()
    back, reference = decollate_batch(collated)[0], decollate_batch(expected)[0]
    assert torch.equal(back["image"], reference["image"]) and torch.equal(
        back["image"].affine, reference["image"].affine
    )
    assert back["image"].applied_operations == reference["image"].applied_operations
    two = collate_without_copy([item, item])
    assert two["image"].shape[0] == 2 and two["image"].data_ptr() != item["image"].data_ptr()
