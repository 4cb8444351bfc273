"""LSMS network, text encoder and joint loss: shapes, text conditioning, gradients, loss behaviour, state dicts."""

import pytest
import torch

from custom.losses import LSMSLoss, PixelSentenceContrastiveLoss
from custom.networks import LSMS, BertTextEncoder, lsms_tiny
from custom.networks.decoders import pre_norm_encoder_layer
from custom.networks.weights import STEM_WEIGHT

EXPRESSIONS = ["the largest hypodense lesion in the right lobe", "the small cyst in the left lobe"]


@pytest.fixture(scope="module")
def text_encoder():
    return BertTextEncoder()


@pytest.fixture(scope="module")
def tokens(text_encoder):
    return text_encoder.tokenize(EXPRESSIONS)


def make_tiny(text_encoder, **overrides):
    torch.manual_seed(0)
    return lsms_tiny(text_encoder=text_encoder, **overrides)


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (100, 130), (33, 47)])
def test_output_shape_equals_input_shape(text_encoder, tokens, size):
    net = make_tiny(text_encoder).eval()
    image = torch.rand(2, 1, *size)
    with torch.no_grad():
        assert net(image, **tokens).shape == (2, 1, *size)
        assert net(image).shape == (2, 1, *size)


def test_different_expressions_give_different_logits_and_same_expression_equal(text_encoder, tokens):
    net = make_tiny(text_encoder).eval()
    image = torch.rand(1, 1, 64, 64).expand(2, -1, -1, -1)
    with torch.no_grad():
        different = net(image, **tokens)
        same_twice = net(image, tokens["input_ids"][:1].repeat(2, 1), tokens["attention_mask"][:1].repeat(2, 1))
    same_gap = (same_twice[0] - same_twice[1]).abs().max()
    different_gap = (different[0] - different[1]).abs().max()
    assert same_gap <= 1e-7
    assert different_gap > 1e-6 and different_gap > 100 * same_gap


def test_text_batch_of_one_broadcasts_over_image_batch(text_encoder, tokens):
    net = make_tiny(text_encoder).eval()
    image = torch.rand(4, 1, 64, 64)
    one = {k: v[:1] for k, v in tokens.items()}
    repeated = {k: v[:1].repeat(4, 1) for k, v in tokens.items()}
    with torch.no_grad():
        torch.testing.assert_close(net(image, **one), net(image, **repeated))


def test_text_batch_must_be_one_or_image_batch(text_encoder, tokens):
    net = make_tiny(text_encoder).eval()
    with pytest.raises(ValueError, match="text batch"):
        net(torch.rand(3, 1, 64, 64), **tokens)


def test_padding_tokens_do_not_change_the_output(text_encoder):
    net = make_tiny(text_encoder).eval()
    image = torch.rand(1, 1, 64, 64)
    short = text_encoder.tokenize(EXPRESSIONS[:1], max_length=16)
    long = text_encoder.tokenize(EXPRESSIONS[:1], max_length=32)
    with torch.no_grad():
        torch.testing.assert_close(net(image, **short), net(image, **long), atol=1e-5, rtol=1e-4)


def test_every_trainable_parameter_gets_a_gradient_and_frozen_text_encoder_none(text_encoder, tokens):
    net = make_tiny(text_encoder).train()
    target = torch.zeros(2, 1, 64, 64)
    target[0, :, 20:36, 24:40] = 1
    output = net(torch.rand(2, 1, 64, 64), **tokens, return_embeddings=True)
    LSMSLoss(contrastive_weight=0.5)(output, target).backward()
    missing = [
        n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad is None for p in net.text_encoder.parameters())
    assert not any(p.requires_grad for p in net.text_encoder.parameters())


def test_top_text_layers_can_be_fine_tuned(tokens):
    encoder = BertTextEncoder(freeze=True, trainable_layers=1)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    last = len(encoder.model.encoder.layer) - 1
    assert trainable and all(f"encoder.layer.{last}." in n for n in trainable)
    words, sentence = encoder(**tokens)
    (words.sum() + sentence.sum()).backward()
    assert all(p.grad is not None for n, p in encoder.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match="trainable_layers"):
        BertTextEncoder(trainable_layers=99)


def test_cached_text_features_equal_fresh_ones(tokens):
    cached, fresh = BertTextEncoder(cache_size=16), BertTextEncoder(cache_size=0)
    batch = {k: torch.cat([v, v.flip(0)]) for k, v in tokens.items()}
    real_tokens = batch["attention_mask"].bool()  # padding positions are masked out downstream
    for _ in range(2):  # first call fills the cache, second reads it
        (words, sentence), (fresh_words, fresh_sentence) = cached(**batch), fresh(**batch)
        torch.testing.assert_close(words[real_tokens], fresh_words[real_tokens], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sentence, fresh_sentence, atol=1e-5, rtol=1e-4)
    assert len(cached._cache) == 2


def test_a_full_text_cache_keeps_the_expressions_the_batch_still_reads(tokens):
    cached = BertTextEncoder(cache_size=2)
    first, second = ({k: v[i : i + 1] for k, v in tokens.items()} for i in range(2))
    cached(**first)
    cached(**second)  # the cache is full now
    text_free = {k: torch.zeros_like(v) for k, v in first.items()}  # no text: an empty key
    both = {k: torch.cat([first[k], text_free[k]]) for k in first}
    words, sentence = cached(**both)  # one cached expression and a new one overflow the cache
    fresh_words, fresh_sentence = BertTextEncoder(cache_size=0)(**both)
    torch.testing.assert_close(sentence, fresh_sentence, atol=1e-5, rtol=1e-4)
    assert len(cached._cache) <= 2


def test_loss_is_finite_on_empty_target_and_zero_contrastive_term(text_encoder, tokens):
    net = make_tiny(text_encoder).train()
    output = net(torch.rand(2, 1, 64, 64), **tokens, return_embeddings=True)
    empty = torch.zeros(2, 1, 64, 64)
    loss = LSMSLoss()(output, empty)
    assert torch.isfinite(loss) and loss > 0
    contrastive = PixelSentenceContrastiveLoss()(output["pixel_embeddings"], output["sentence_embedding"], empty)
    assert contrastive.item() == 0.0
    loss.backward()


def test_contrastive_loss_prefers_pixels_aligned_with_the_sentence():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :4] = 1
    sentence = torch.tensor([[1.0, 0.0]])
    aligned = torch.stack([target[0, 0], 1 - target[0, 0]])[None]  # positives point to the sentence
    opposed = aligned.flip(1)
    loss = PixelSentenceContrastiveLoss(temperature=0.1)
    assert loss(aligned, sentence, target) < loss(opposed, sentence, target)


def test_loss_decreases_on_a_tiny_overfit_run(text_encoder, tokens):
    net = make_tiny(text_encoder, drop_path_rate=0.0).train()
    torch.manual_seed(1)
    image = torch.rand(2, 1, 64, 64) * 0.2
    target = torch.zeros(2, 1, 64, 64)
    target[0, :, 10:26, 10:26] = 1
    target[1, :, 36:54, 30:50] = 1
    image = image + 0.6 * target
    loss_fn = LSMSLoss(contrastive_weight=0.1)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(net(image, **tokens, return_embeddings=True), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_state_dict_round_trip_gives_identical_outputs(text_encoder, tokens):
    net = make_tiny(text_encoder).eval()
    torch.manual_seed(3)
    other = lsms_tiny(text_encoder=BertTextEncoder()).eval()
    image = torch.rand(2, 1, 64, 64)
    other.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net(image, **tokens), other(image, **tokens), rtol=0, atol=0)


def test_load_weights_starts_a_network_from_a_saved_file_and_names_a_mismatch(text_encoder, tokens, tmp_path):
    from custom.networks import ShippedWeights
    from custom.networks.weights import CheckpointError, load_weights

    net = make_tiny(text_encoder).eval()
    path = tmp_path / "model.pt"
    torch.save(ShippedWeights(net).state_dict(), path)
    torch.manual_seed(5)
    other = lsms_tiny(text_encoder=text_encoder).eval()
    assert load_weights(other, path) is other
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(image, **tokens), other(image, **tokens), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="does not match the network"):
        load_weights(lsms_tiny(text_encoder=text_encoder, out_channels=3), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(other, tmp_path / "missing.pt")
    detailed = lsms_tiny(text_encoder=text_encoder, detail_channels=8).eval()
    with pytest.raises(CheckpointError, match="does not match the network"):
        load_weights(detailed, path)  # the file has no detail head
    assert load_weights(detailed, path, may_lack=["detail"]) is detailed  # the head keeps its zero correction
    with torch.no_grad():
        torch.testing.assert_close(detailed(image, **tokens), net(image, **tokens), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="does not match the network"):
        load_weights(lsms_tiny(text_encoder=text_encoder, in_channels=2), path, may_lack=["detail"])


def shipped_network(text_encoder, channels_last: bool, detail_channels: int | None = None) -> LSMS:
    """LSMS-tiny in evaluation mode with the shipped weights, its input and output channels and its detail head's
    width read from them (``detail_channels`` gives the width of a head the shipped weights may lack)."""
    shipped = torch.load("bundle/models/model.pt", map_location="cpu", weights_only=True)
    shipped_detail = shipped.get("detail.correction.weight")
    network = lsms_tiny(
        in_channels=shipped[STEM_WEIGHT].shape[1],
        out_channels=len(shipped["head.1.bias"]),
        text_encoder=text_encoder,
        channels_last=channels_last,
        detail_channels=shipped_detail.shape[1] if shipped_detail is not None else detail_channels or 0,
    ).eval()
    network.load_state_dict(shipped, strict=False)
    return network


@pytest.mark.parametrize("windows, context_slices", [((2, 3), (0, 0)), ((2, 2), (0, 2)), ((2, 3), (0, 1))])
def test_widened_weights_start_with_the_outputs_of_the_original_network(
    text_encoder, tokens, windows, context_slices, tmp_path
):
    """Widening the shipped weights to more HU windows or neighbouring slices (python -m custom.training widen):
    the widened network gives the original logits for the original channels, whatever the new channels hold, and
    the file is written once, never over the weights it reads."""
    from custom.clinical.errors import OutputExistsError
    from custom.training import main as training_main
    from custom.training import widen_weights

    original = shipped_network(text_encoder, channels_last=True)
    (w0, w1), (c0, c1) = windows, context_slices
    k1 = 2 * c1 + 1
    out = tmp_path / "widened.pt"
    assert training_main(["widen", "--windows", str(w0), str(w1), "--context_slices", str(c0), str(c1),
                          "--out", str(out)]) == 0  # fmt: skip
    widened = lsms_tiny(in_channels=w1 * k1, out_channels=original.head[1].out_channels, text_encoder=text_encoder)
    widened.load_state_dict(torch.load(out, weights_only=True), strict=False)
    widened.eval()
    torch.manual_seed(2)
    image = torch.rand(2, w0, 96, 80) * 2 - 0.5
    wide_image = torch.rand(2, w1 * k1, 96, 80) * 2 - 0.5  # new windows and slices hold anything
    for w in range(w0):
        wide_image[:, w * k1 + c1] = image[:, w]
    with torch.inference_mode():
        torch.testing.assert_close(widened(wide_image, **tokens), original(image, **tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(OutputExistsError):
        widen_weights("bundle/models/model.pt", out, windows, context_slices)
    assert training_main(["widen", "--windows", "3", "2", "--out", str(out.with_name("narrower.pt"))]) == 1


def test_a_detail_head_starts_with_the_outputs_of_the_network_without_it_then_refines_them(text_encoder, tokens):
    """A stride-2 detail head added to trained weights starts at zero correction (same logits), gives logits of the
    input's size, and once its correction is non-zero changes the logits where the image has detail."""
    plain = shipped_network(text_encoder, channels_last=True)
    if plain.detail is not None:  # the shipped weights have a head: compare with a network without one
        plain = lsms_tiny(
            in_channels=plain.encoder.embeddings[0].layers[0].in_channels,
            out_channels=plain.head[1].out_channels,
            text_encoder=text_encoder,
        ).eval()
        plain.load_state_dict(shipped_network(text_encoder, True).state_dict(), strict=False)
    detailed = lsms_tiny(
        in_channels=plain.encoder.embeddings[0].layers[0].in_channels,
        out_channels=plain.head[1].out_channels,
        text_encoder=text_encoder,
        detail_channels=8,
    ).eval()
    missing, unexpected = detailed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("detail.") for key in missing)
    image = torch.rand(2, detailed.encoder.embeddings[0].layers[0].in_channels, 97, 83) * 2 - 0.5
    with torch.inference_mode():
        for text in (tokens, {}):
            before = plain(image, **text)
            after = detailed(image, **text)
            assert after.shape == before.shape == (2, plain.head[1].out_channels, 97, 83)
            torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
        torch.nn.init.normal_(detailed.detail.correction.weight, std=0.5)
        changed = (detailed(image) - plain(image)).abs()
    assert changed.amax() > 0.1


def test_channels_last_layout_gives_the_outputs_of_the_nchw_layout_for_the_shipped_weights(text_encoder, tokens):
    """The layout changes speed only: same weights, same logits and embeddings (float tolerance), with and without
    text; a checkpoint of either layout loads into the other."""
    networks = {channels_last: shipped_network(text_encoder, channels_last) for channels_last in (False, True)}
    in_channels = networks[True].encoder.embeddings[0].layers[0].in_channels
    conv = next(m.weight for m in networks[True].encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1
                and m.in_channels > 1 and m.kernel_size != (1, 1))  # fmt: skip
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    image = torch.rand(2, in_channels, 96, 80) * 2 - 0.5
    with torch.inference_mode():
        for text in (tokens, {}):
            nchw = networks[False](image, **text, return_embeddings=True)
            nhwc = networks[True](image, **text, return_embeddings=True)
            for key in ("logits", "pixel_embeddings"):
                assert nhwc[key].is_contiguous()
                torch.testing.assert_close(nhwc[key], nchw[key], rtol=1e-4, atol=1e-4)
            assert nchw["logits"].abs().max() > 1.0  # real weights: not a comparison of near-zero outputs
    networks[False].load_state_dict(networks[True].state_dict(), strict=True)


@pytest.mark.parametrize("detail_channels", [None, 8], ids=["as_shipped", "detail_head"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_folded_batch_norms_and_layer_scales_give_the_shipped_networks_outputs(
    text_encoder, tokens, channels_last, detail_channels
):
    """Inference folds the batch norms and layer scales into the convolutions: no batch norm or layer scale left,
    the same logits and embeddings within float tolerance with and without text, and folding twice changes nothing.
    A detail head the weights lack gets random weights and batch-norm statistics, so its folding is checked too."""
    from custom.networks.folding import fold_batch_norms

    network = shipped_network(text_encoder, channels_last, detail_channels)
    if detail_channels and "detail.correction.weight" not in torch.load("bundle/models/model.pt", weights_only=True):
        torch.manual_seed(4)
        for name, value in network.detail.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5 if "running_var" in name else torch.randn_like(value) * 0.3)
    in_channels = network.encoder.embeddings[0].layers[0].in_channels
    image = torch.rand(2, in_channels, 96, 80) * 2 - 0.5
    with torch.inference_mode():
        expected = [network(image, **text, return_embeddings=True) for text in (tokens, {})]
    folded = fold_batch_norms(network)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(name.endswith(("scale1", "scale2")) for name, _ in folded.named_parameters())
    fold_batch_norms(folded)
    with torch.inference_mode():
        for text, before in zip((tokens, {}), expected):
            after = folded(image, **text, return_embeddings=True)
            for key in ("logits", "pixel_embeddings"):
                torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)
            assert before["logits"].abs().max() > 1.0


@pytest.mark.parametrize("text_dim", [48, 32], ids=["text_wider", "text_as_wide"])
def test_pixel_word_attention_in_inference_equals_the_multihead_attention_it_runs(text_dim):
    from custom.networks.svla import PixelWordAttention

    torch.manual_seed(0)
    module = PixelWordAttention(32, text_dim, num_heads=2)
    x, words = torch.randn(3, 32, 5, 6), torch.randn(3, 7, text_dim)
    word_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], dtype=torch.bool)
    with torch.no_grad():
        trained_path = module.train()(x, words, word_mask)
        fused_path = module.eval()(x, words, word_mask)
    torch.testing.assert_close(fused_path, trained_path, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # padding tokens are left out: other values there change nothing
        padded = words.clone()
        padded[~word_mask] = 100.0
        torch.testing.assert_close(module(x, padded, word_mask), fused_path, rtol=1e-5, atol=1e-5)


def test_full_scale_decoder_merge_equals_the_concatenation_it_replaces():
    from custom.networks.decoders import FullScaleDecoder

    torch.manual_seed(0)
    decoder = FullScaleDecoder((8, 16, 24, 32), channels=16, num_heads=2).eval()
    for module in decoder.modules():  # non-trivial batch norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    features = [torch.randn(2, c, 32 // 2**i, 40 // 2**i) for i, c in enumerate((8, 16, 24, 32))]
    with torch.no_grad():
        (p1,) = decoder.align_fine(features[:1], features[0].shape[-2:])
        coarse = decoder.cross_scale(decoder.align_coarse(features[1:], features[2].shape[-2:]))
        context = decoder.fuse_coarse(torch.cat(coarse, dim=1))
        context = torch.nn.functional.interpolate(context, size=(32, 40), mode="bilinear", align_corners=False)
        expected = decoder.merge(torch.cat([p1, context], dim=1))
        torch.testing.assert_close(decoder(features), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_decoder_attention_equals_the_transformer_layer_it_runs(training):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True).train(training)  # fmt: skip
    x = torch.randn(3, 50, 32)
    with torch.inference_mode(not training):
        torch.testing.assert_close(pre_norm_encoder_layer(layer, x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ablation",
    [dict(use_multi_kernel=False), dict(use_language=False), dict(decoder="fpn")],
    ids=["no-multi-kernel", "no-language", "fpn-decoder"],
)
def test_ablations_build_run_and_differ_in_parameters(text_encoder, tokens, ablation):
    full = make_tiny(text_encoder)
    net = make_tiny(text_encoder, **ablation).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 64), **tokens).shape == (2, 1, 64, 64)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(net) < count(full)
    if not ablation.get("use_language", True):
        assert net.text_encoder is None


def test_tiny_variant_trainable_parameters_in_range(text_encoder):
    trainable = sum(p.numel() for p in make_tiny(text_encoder).parameters() if p.requires_grad)
    assert 3e6 <= trainable <= 6e6, trainable


def test_invalid_sizes_are_named():
    with pytest.raises(ValueError, match="decoder"):
        LSMS(use_language=False, decoder="unet")
    with pytest.raises(ValueError, match="4 entries"):
        LSMS(use_language=False, depths=(1, 1, 1))


def test_output_bias_starts_predictions_at_the_foreground_prior(text_encoder):
    from monai.networks.nets import UNet

    from custom.networks import init_output_bias

    net = make_tiny(text_encoder)
    init_output_bias(net, 0.01)
    assert torch.allclose(net.head[-1].bias, torch.logit(torch.tensor([0.01])))
    net.eval()
    with torch.no_grad():
        assert float(torch.sigmoid(net(torch.rand(1, 1, 64, 64))).mean()) < 0.05
    unet = UNet(2, 1, 1, (8, 16, 32), (2, 2), num_res_units=2).eval()
    with torch.no_grad():
        before = float(torch.sigmoid(unet(torch.rand(1, 1, 32, 32))).mean())
        after = float(torch.sigmoid(init_output_bias(unet, 0.01)(torch.rand(1, 1, 32, 32))).mean())
    assert before > 0.2 and after < 0.05
    with pytest.raises(ValueError, match="foreground_prior"):
        init_output_bias(net, 1.0)
    with pytest.raises(ValueError, match="output channels"):
        init_output_bias(torch.nn.Linear(2, 1))
