"""ZIM network: shapes, gradients, masked attention, ablation switches, SAM weights, checkpoints."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import Sam

from zim_lightning.benchmarking import build_stock_sam
from zim_lightning.models import CheckpointError, Zim, load_sam_weights, zim_model_registry
from zim_lightning.models.build import ZIM_VARIANTS, build_zim, network_from_spec
from zim_lightning.models.checkpoint import weights_loaded_later
from zim_lightning.models.converter import converter_model_registry
from zim_lightning.models.pixel_decoder import PYRAMID_STRIDES, HierarchicalPixelDecoder, sam_output_upscaling
from zim_lightning.models.transformer import KeyMask, MaskableAttention

BOX_COORDS = torch.tensor([[[200.0, 150.0], [700.0, 600.0], [-0.5, -0.5]]])
BOX_LABELS = torch.tensor([[2.0, 3.0, -1.0]])
POINT_COORDS = torch.tensor([[[400.0, 300.0], [820.0, 100.0], [-0.5, -0.5]]])
POINT_LABELS = torch.tensor([[1.0, 0.0, -1.0]])


def tiny(**kwargs) -> Zim:
    torch.manual_seed(0)
    return zim_model_registry["tiny"](**kwargs).eval()


def random_images(batch: int, height: int = 1024, width: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


@pytest.fixture(scope="module")
def tiny_encoded():
    """A tiny hierarchical ZIM and the encoding of one 1024x768 image."""
    model = tiny()
    with torch.no_grad():
        emb, feats = model.encode_image(random_images(1, 1024, 768))
    return model, emb, feats


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_sam_sizes_shapes_on_meta_device(variant):
    with torch.device("meta"):
        model = zim_model_registry[variant]()
        emb, feats = model.encode_image(torch.zeros(2, 3, 1024, 1024))
        coords, labels = BOX_COORDS.to("meta").expand(2, -1, -1), BOX_LABELS.to("meta").expand(2, -1)
        logits, iou = model.decode(emb, feats, coords, labels, multimask_output=True)
    assert emb.shape == (2, 256, 64, 64)
    assert [tuple(f.shape[-3:]) for f in feats] == [(16, 512, 512), (32, 256, 256), (64, 128, 128)]
    assert logits.shape == (2, 4, 512, 512) and iou.shape == (2, 4)
    assert model.image_encoder.patch_embed.proj.out_channels == ZIM_VARIANTS[variant]["encoder_embed_dim"]
    assert set(zim_model_registry) == set(ZIM_VARIANTS)  # every size has its builder
    assert zim_model_registry[variant].__name__ == f"build_zim_{variant}"  # importable by that name


@pytest.mark.parametrize("pixel_decoder, side", [("hierarchical", 512), ("sam", 256)])
def test_tiny_shapes_and_finite(pixel_decoder, side):
    model = tiny(pixel_decoder=pixel_decoder)
    coords = torch.cat([BOX_COORDS, POINT_COORDS])
    labels = torch.cat([BOX_LABELS, POINT_LABELS])
    with torch.no_grad():
        emb, feats = model.encode_image(random_images(2, 1024, 800))
        single = model.decode(emb, feats, coords, labels)
        multi = model.decode(emb, feats, coords, labels, multimask_output=True)
    assert single[0].shape == (2, 1, side, side) and single[1].shape == (2, 1)
    assert multi[0].shape == (2, 4, side, side) and multi[1].shape == (2, 4)
    assert torch.isfinite(multi[0]).all() and torch.isfinite(multi[1]).all()
    # multimask_output=False is mask 0 of the four.
    assert torch.equal(single[0], multi[0][:, :1]) and torch.equal(single[1], multi[1][:, :1])
    assert emb.shape == (2, 64, 64, 64)
    if pixel_decoder == "sam":
        # Unused by SAM's pixel decoder; kept (zero channels) so the decoder keeps seven inputs.
        assert [tuple(f.shape) for f in feats] == [(2, 0, 512, 512), (2, 0, 256, 256), (2, 0, 128, 128)]
    else:
        assert [tuple(f.shape) for f in feats] == [(2, 8, 512, 512), (2, 8, 256, 256), (2, 16, 128, 128)]


@pytest.mark.parametrize("pixel_decoder", ["hierarchical", "sam"])
def test_every_parameter_receives_gradient(pixel_decoder):
    model = tiny(pixel_decoder=pixel_decoder).train()
    # One image, a box and a point prompt set decoded together: both attention modes in one pass.
    emb, feats = model.encode_image(random_images(1))
    coords = torch.cat([BOX_COORDS, POINT_COORDS])
    labels = torch.cat([BOX_LABELS, POINT_LABELS])
    logits, iou = model.decode(emb, feats, coords, labels, multimask_output=True)
    (logits.sigmoid().mean() + iou.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert not no_grad and not zero, (no_grad, zero)


def test_forward_is_encode_then_decode(tiny_encoded):
    model, emb, feats = tiny_encoded
    images = random_images(1, 1024, 768)
    with torch.no_grad():
        out = model(images, BOX_COORDS, BOX_LABELS, multimask_output=True)
        logits, iou = model.decode(emb, feats, BOX_COORDS, BOX_LABELS, multimask_output=True)
    assert set(out) == {"logits", "iou"}
    assert torch.allclose(out["logits"], logits, atol=1e-5) and torch.allclose(out["iou"], iou, atol=1e-5)


def test_decode_broadcasts_one_embedding_over_prompt_sets(tiny_encoded):
    model, emb, feats = tiny_encoded
    coords = torch.cat([BOX_COORDS, POINT_COORDS])
    labels = torch.cat([BOX_LABELS, POINT_LABELS])
    with torch.no_grad():
        batched, iou = model.decode(emb, feats, coords, labels, multimask_output=True)
        for i in range(2):
            alone, alone_iou = model.decode(
                emb, feats, coords[i : i + 1], labels[i : i + 1], multimask_output=True
            )
            assert torch.allclose(batched[i : i + 1], alone, atol=1e-5)
            assert torch.allclose(iou[i : i + 1], alone_iou, atol=1e-5)


def test_preprocess_normalises_and_pads():
    model = tiny()
    images = torch.full((1, 3, 600, 1024), 255, dtype=torch.uint8)
    x = model.preprocess(images)
    assert x.shape == (1, 3, 1024, 1024)
    expected = (255 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert torch.allclose(x[0, :, 0, 0], expected)
    assert (x[:, :, 600:] == 0).all()
    with pytest.raises(ValueError, match="at most 1024"):
        model.preprocess(torch.zeros(1, 3, 1100, 900))
    with pytest.raises(ValueError, match="Bx3xHxW"):
        model.preprocess(torch.zeros(1, 1024, 1024, 3))


def test_decode_rejects_bad_prompt_shapes(tiny_encoded):
    model, emb, feats = tiny_encoded
    with pytest.raises(ValueError, match="point_coords"):
        model.decode(emb, feats, torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="point_labels"):
        model.decode(emb, feats, torch.zeros(1, 3, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="attn_mask"):
        model.decode(emb, feats, BOX_COORDS, BOX_LABELS, attn_mask=torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="at least one prompt point"):
        model.decode(emb, feats, torch.zeros(1, 0, 2), torch.zeros(1, 0))
    with pytest.raises(ValueError, match=r"Bx3x1024x1024 normalised, padded images \(see preprocess"):
        model.encode_preprocessed(torch.zeros(1, 3, 1024, 768))  # resized but not padded


# --- prompt-aware masked attention ------------------------------------------------------------------


def naive_masked_attention(layer: MaskableAttention, q, k, v, attn_map, box_sample):
    """softmax(QK^T/sqrt(d) + M_b) V for boxes, softmax(M_p * QK^T/sqrt(d)) V for points, written plainly."""
    heads = layer.num_heads
    qp, kp, vp = layer.q_proj(q), layer.k_proj(k), layer.v_proj(v)
    b, nq, c = qp.shape
    nk = kp.shape[1]
    qh = qp.reshape(b, nq, heads, c // heads).transpose(1, 2)
    kh = kp.reshape(b, nk, heads, c // heads).transpose(1, 2)
    vh = vp.reshape(b, nk, heads, c // heads).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(c // heads)  # b x heads x nq x nk
    weights = []
    for i in range(b):
        m = attn_map[i].flatten()
        if m.max() <= 0:
            m = torch.ones_like(m)  # fully masked row: un-masked
        if box_sample[i]:
            row = logits[i] + torch.where(m > 0, 0.0, float("-inf"))
        else:
            row = logits[i] * m
        weights.append(row.softmax(-1))
    weights = torch.stack(weights)
    out = (weights @ vh).transpose(1, 2).reshape(b, nq, c)
    return layer.out_proj(out), weights


def random_attention_inputs(seed=0, side=8):
    torch.manual_seed(seed)
    layer = MaskableAttention(32, 4, downsample_rate=2)
    q = torch.randn(4, 5, 32)
    k = torch.randn(4, side * side, 32)
    v = torch.randn(4, side * side, 32)
    attn_map = torch.zeros(4, side, side)
    attn_map[0, 2:5, 1:6] = 1  # box
    attn_map[1] = torch.rand(side, side)  # soft point map
    attn_map[2] = 0  # box off the grid: would be fully masked
    attn_map[3] = 0  # points off the grid
    box_sample = torch.tensor([True, False, True, False])
    return layer, q, k, v, attn_map, box_sample


def test_masked_attention_equals_naive_reference():
    layer, q, k, v, attn_map, box_sample = random_attention_inputs()
    with torch.no_grad():
        ours = layer(q, k, v, KeyMask.from_attention_map(attn_map, box_sample))
        reference, weights = naive_masked_attention(layer, q, k, v, attn_map, box_sample)
        plain = layer(q, k, v)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, reference, atol=1e-5)
    # Fully masked rows fall back to plain attention, without NaN.
    assert torch.allclose(ours[2:], plain[2:], atol=1e-5)
    # Masks do change the output for the box and the point sample.
    assert not torch.allclose(ours[:2], plain[:2], atol=1e-3)
    # Box: attention weight outside the box is exactly zero.
    outside = attn_map[0].flatten() == 0
    assert (weights[0][..., outside] == 0).all()


def test_box_attention_ignores_keys_outside_the_box():
    layer, q, k, v, attn_map, box_sample = random_attention_inputs(seed=1)
    mask = KeyMask.from_attention_map(attn_map, box_sample)
    outside = attn_map[0].flatten() == 0
    k2, v2 = k.clone(), v.clone()
    k2[0, outside] = torch.randn(int(outside.sum()), 32) * 10
    v2[0, outside] = torch.randn(int(outside.sum()), 32) * 10
    with torch.no_grad():
        assert torch.allclose(layer(q, k, v, mask)[0], layer(q, k2, v2, mask)[0], atol=1e-6)


def test_point_mode_scales_logits():
    # A map of constant value s scales every logit by s: equal to plain attention with q scaled by s.
    layer, q, k, v, _, _ = random_attention_inputs(seed=2)
    s = 0.3
    attn_map = torch.full((4, 8, 8), s)
    mask = KeyMask.from_attention_map(attn_map, torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        ours = layer(q, k, v, mask)
        heads, c = layer.num_heads, layer.internal_dim
        qh = layer.q_proj(q).reshape(4, 5, heads, c // heads).transpose(1, 2)
        kh = layer.k_proj(k).reshape(4, 64, heads, c // heads).transpose(1, 2)
        vh = layer.v_proj(v).reshape(4, 64, heads, c // heads).transpose(1, 2)
        weights = (s * (qh @ kh.transpose(-1, -2)) / math.sqrt(c // heads)).softmax(-1)
        expected = layer.out_proj((weights @ vh).transpose(1, 2).reshape(4, 5, c))
    assert torch.allclose(ours, expected, atol=1e-5)


def test_key_mask_is_detached():
    attn_map = torch.rand(2, 8, 8, requires_grad=True)
    mask = KeyMask.from_attention_map(attn_map, torch.tensor([True, False]))
    assert not mask.scale.requires_grad and not mask.bias.requires_grad


def test_every_token_to_image_attention_is_masked(tiny_encoded):
    """With a box, the tokens can read the image only through masked token-to-image attention (in each
    two-way block and the final one): the IoU scores ignore the image outside the box entirely."""
    model, emb, feats = tiny_encoded
    coords = torch.tensor([[[200.0, 300.0], [500.0, 640.0]]])  # cells x 12..31, y 18..40
    labels = torch.tensor([[2.0, 3.0]])
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[18:41, 12:32] = False
    noisy = emb + torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)) * 3 * outside
    with torch.no_grad():
        _, iou = model.decode(emb, feats, coords, labels, multimask_output=True)
        _, noisy_iou = model.decode(noisy, feats, coords, labels, multimask_output=True)
        _, plain_iou = tiny(masked_attention=False).decode(
            noisy, feats, coords, labels, multimask_output=True
        )
    torch.testing.assert_close(noisy_iou, iou, atol=0, rtol=0)
    _, unmasked_iou = tiny(masked_attention=False).decode(emb, feats, coords, labels, multimask_output=True)
    assert (plain_iou - unmasked_iou).abs().max() > 1e-3  # without the mask the noise is seen


def test_box_off_grid_gives_finite_logits_equal_to_unmasked(tiny_encoded):
    model, emb, feats = tiny_encoded
    coords = torch.tensor([[[1100.0, 1100.0], [1200.0, 1300.0]]])
    labels = torch.tensor([[2.0, 3.0]])
    with torch.no_grad():
        logits, iou = model.decode(emb, feats, coords, labels)
        unmasked, _ = model.decode(emb, feats, coords, labels, attn_mask=torch.ones(1, 64, 64))
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()
    assert torch.allclose(logits, unmasked, atol=1e-5)


def test_absent_points_change_nothing_unlike_the_padding_point(tiny_encoded):
    # Training fills prompts to one length with absent points (-2), so a training box or click decodes
    # exactly as the same prompt does at inference, where it has no filler.
    model, emb, feats = tiny_encoded
    box = (torch.tensor([[[200.0, 150.0], [700.0, 600.0]]]), torch.tensor([[2.0, 3.0]]))
    click = (torch.tensor([[[400.0, 300.0], [-0.5, -0.5]]]), torch.tensor([[1.0, -1.0]]))

    def filled(prompt, label, count=3):
        coords, labels = prompt
        return torch.cat([coords, torch.zeros(1, count, 2)], 1), torch.cat(
            [labels, torch.full((1, count), label)], 1
        )

    with torch.no_grad():
        for prompt in (box, click):
            alone, iou = model.decode(emb, feats, *prompt)
            absent, absent_iou = model.decode(emb, feats, *filled(prompt, -2.0))
            torch.testing.assert_close(absent, alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(absent_iou, iou, atol=1e-5, rtol=0)
            padded, _ = model.decode(emb, feats, *filled(prompt, -1.0))
            assert (padded - alone).abs().max() > 1e-3  # padding points are tokens that count
        # one batch of a box and a click, filled to one length, decodes as each alone
        both = [filled(box, -2.0, 1), filled(click, -2.0, 1)]
        batch, _ = model.decode(
            emb, feats, torch.cat([c for c, _ in both]), torch.cat([lab for _, lab in both])
        )
        for row, prompt in enumerate((box, click)):
            torch.testing.assert_close(
                batch[row : row + 1], model.decode(emb, feats, *prompt)[0], atol=1e-5, rtol=0
            )


def test_prompt_positions_are_encoded_in_float32_under_bf16_autocast(tiny_encoded):
    model = tiny_encoded[0]
    coords = torch.tensor([[[1000.0, 37.0], [3.0, 999.0], [512.0, 512.0]]])
    labels = torch.tensor([[1.0, 0.0, 2.0]])
    tokens, dense = model.prompt_encoder(coords, labels), model.prompt_encoder.get_dense_pe()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens_bf16, dense_bf16 = model.prompt_encoder(coords, labels), model.prompt_encoder.get_dense_pe()
    # bf16 features of a click near x = 1000 are off by about a 2-pixel shift's worth
    torch.testing.assert_close(tokens_bf16, tokens)
    torch.testing.assert_close(dense_bf16, dense)


# --- ablation switches ------------------------------------------------------------------------------


def test_pixel_decoder_switch_changes_the_architecture():
    hier = {n: p.shape for n, p in tiny(pixel_decoder="hierarchical").named_parameters()}
    sam = {n: p.shape for n, p in tiny(pixel_decoder="sam").named_parameters()}
    only_hier, only_sam = set(hier) - set(sam), set(sam) - set(hier)
    assert only_hier and all(
        n.startswith(("feature_pyramid.", "mask_decoder.pixel_decoder.")) for n in only_hier
    )
    assert only_sam and all(n.startswith("mask_decoder.output_upscaling.") for n in only_sam)


def _period_two_ratio(out: torch.Tensor, margin: int) -> float:
    """How much the horizontal steps of ``out`` alternate from one pixel to the next (0: smooth)."""
    steps = out[..., margin:-margin, margin:-margin].diff(dim=-1)
    even, odd = steps[..., 0::2], steps[..., 1::2]
    n = min(even.shape[-1], odd.shape[-1])
    return ((even[..., :n] - odd[..., :n]).abs().mean() / steps.abs().mean()).item()


def test_hierarchical_decoder_upsamples_smoothly_where_sams_transposed_convolutions_alternate():
    # The paper's reason for the hierarchical decoder: SAM's transposed convolutions (kernel = stride)
    # leave a period-2 pattern (checkerboard). Fed an embedding that ramps linearly across the image
    # (and no image features), the hierarchical decoder's bilinear steps give a smooth output; the
    # SAM decoder's steps alternate. Nearest-neighbour upsampling would alternate too.
    hier_ratios, sam_ratios = [], []
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        hier = HierarchicalPixelDecoder(embed_dim=32, feature_channels=(8, 8, 8), stage_channels=(16, 8, 4))
        sam = sam_output_upscaling(32)
        slopes, offsets = torch.randn(2, 32, 1, 1, generator=generator)
        embedding = (slopes * torch.linspace(-1, 1, 8) + offsets).expand(32, 8, 8)[None].contiguous()
        feats = tuple(torch.zeros(1, 8, 128 // s, 128 // s) for s in PYRAMID_STRIDES)  # a 128 input
        with torch.no_grad():
            out = hier(embedding, feats)
            assert out.shape == (1, 4, 64, 64)
            hier_ratios.append(_period_two_ratio(out, margin=12))
            sam_ratios.append(_period_two_ratio(sam(embedding), margin=6))
    assert sum(hier_ratios) / 4 < 0.5 < 1.2 < sum(sam_ratios) / 4, (hier_ratios, sam_ratios)


def test_masked_attention_switch_changes_the_output(tiny_encoded):
    model, emb, feats = tiny_encoded
    state = model.state_dict()
    plain = tiny(masked_attention=False)
    plain.load_state_dict(state)  # same parameters: the switch changes only the attention
    with torch.no_grad():
        for coords, labels in ((BOX_COORDS, BOX_LABELS), (POINT_COORDS, POINT_LABELS)):
            masked_out, _ = model.decode(emb, feats, coords, labels)
            plain_out, _ = plain.decode(emb, feats, coords, labels)
            assert not torch.allclose(masked_out, plain_out, atol=1e-3)
            # An all-ones map leaves the attention unchanged: masked == plain.
            ones, _ = model.decode(emb, feats, coords, labels, attn_mask=torch.ones(1, 64, 64))
            assert torch.allclose(ones, plain_out, atol=1e-5)


def test_unknown_pixel_decoder_is_rejected():
    with pytest.raises(ValueError, match="pixel_decoder"):
        zim_model_registry["tiny"](pixel_decoder="unet")


def test_a_patch_size_the_decoders_cannot_take_is_refused_when_built():
    with pytest.raises(ValueError, match="patch_size must be 16"):
        Zim(**ZIM_VARIANTS["tiny"], image_size=256, patch_size=8)


# --- SAM weights ------------------------------------------------------------------------------------


def tiny_sam() -> Sam:
    """A segment-anything Sam built with SAM's own classes at the sizes of our tiny variant."""
    sam = build_stock_sam("tiny").eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sam.parameters():  # SAM zero-initialises rel-pos and pos-embed: make every weight count
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05 + p)
    return sam


@pytest.fixture(scope="module")
def sam_and_path(tmp_path_factory):
    torch.manual_seed(3)
    sam = tiny_sam()
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_sam_weights_give_sams_embedding_and_shared_weights(sam_and_path):
    sam, path = sam_and_path
    model = zim_model_registry["tiny"](sam_checkpoint=str(path)).eval()
    images = random_images(1, 1024, 900, seed=4)
    with torch.no_grad():
        ours, _ = model.encode_image(images)
        theirs = sam.image_encoder(sam.preprocess(images.float()[0]).unsqueeze(0))
    assert torch.allclose(ours, theirs, atol=1e-4)
    sam_state = sam.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith(("prompt_encoder.", "mask_decoder.transformer.", "mask_decoder.output_hyper")):
            assert torch.equal(tensor, sam_state[name]), name


def test_load_report_lists_new_and_unused_parameters(sam_and_path):
    sam, _ = sam_and_path
    model = tiny()
    report = load_sam_weights(model, sam.state_dict())
    assert report.initialised and all(
        n.startswith(("feature_pyramid.", "mask_decoder.pixel_decoder.")) for n in report.initialised
    )
    assert any(n.startswith("mask_decoder.output_upscaling.") for n in report.unused)
    assert any(n.startswith("prompt_encoder.mask_downscaling.") for n in report.unused)
    assert set(report.loaded) | set(report.unused) == set(sam.state_dict())
    sam_arch = tiny(masked_attention=False, pixel_decoder="sam")
    full = load_sam_weights(sam_arch, sam.state_dict())
    assert full.initialised == []  # SAM's architecture: SAM's weights fill every parameter
    assert all(n.startswith("prompt_encoder.mask_downscaling.") for n in full.unused)


def test_sam_architecture_reproduces_sam_logits(sam_and_path):
    sam, path = sam_and_path
    model = zim_model_registry["tiny"](
        sam_checkpoint=str(path), masked_attention=False, pixel_decoder="sam"
    ).eval()
    images = random_images(1, seed=5)
    box = torch.tensor([[150.0, 220.0, 610.0, 800.0]])
    points = torch.tensor([[[300.0, 400.0], [700.0, 200.0]]])
    point_labels = torch.tensor([[1.0, 0.0]])
    with torch.no_grad():
        # The embeddings agree (test above); decode SAM's so that only the decoders are compared here.
        sam_emb = sam.image_encoder(sam.preprocess(images.float()[0]).unsqueeze(0))
        emb, feats = sam_emb, ()  # SAM's pixel decoder ignores the image features
        pe = sam.prompt_encoder.get_dense_pe()
        # Box: two corners labelled 2, 3 (no padding, as SAM embeds a box alone).
        ours, ours_iou = model.decode(emb, feats, box.reshape(1, 2, 2), torch.tensor([[2.0, 3.0]]))
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        theirs, theirs_iou = sam.mask_decoder(sam_emb, pe, sparse, dense, multimask_output=False)
        assert torch.allclose(ours, theirs, atol=1e-3) and torch.allclose(ours_iou, theirs_iou, atol=1e-4)
        # Points: SAM appends a padding point; ours receives it explicitly (the official decoder's).
        padded = torch.cat([points, torch.full((1, 1, 2), -0.5)], dim=1)
        padded_labels = torch.cat([point_labels, -torch.ones(1, 1)], dim=1)
        ours, _ = model.decode(emb, feats, padded, padded_labels, multimask_output=True)
        sparse, dense = sam.prompt_encoder(points=(points, point_labels), boxes=None, masks=None)
        single, _ = sam.mask_decoder(sam_emb, pe, sparse, dense, multimask_output=False)
        multi, _ = sam.mask_decoder(sam_emb, pe, sparse, dense, multimask_output=True)
    assert torch.allclose(ours, torch.cat([single, multi], dim=1), atol=1e-3)
    assert ours.abs().mean() > 1e-2  # not trivially zero


def test_shape_mismatch_names_what_is_missing_unexpected_and_of_another_shape():
    from zim_lightning.models.checkpoint import load_exactly, shape_mismatch

    own = {"a": (1,), "b": (2,), "c": (3,)}
    assert shape_mismatch(own, dict(own)) is None
    assert shape_mismatch(own, {"a": (1,), "c": (4,), "d": (5,)}) == (
        "1 missing: b; 1 unexpected: d; 1 with another shape: c (4,) vs (3,)"  # saved vs the network's
    )
    many = {f"k{i}": (1,) for i in range(7)}
    assert shape_mismatch(many, {}) == "7 missing: k0, k1, k2, k3, k4 (+2 more)"
    with pytest.raises(CheckpointError, match=r"\(1 missing: bias\)"):
        load_exactly(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}, source="w.pt")


def test_sam_checkpoint_of_another_size_is_rejected(tmp_path):
    with torch.device("meta"):
        vit_b_state = sam_model_registry["vit_b"]().state_dict()
        vit_b = zim_model_registry["vit_b"]()
        vit_l = zim_model_registry["vit_l"]()
    report = load_sam_weights(vit_b, vit_b_state)  # SAM vit_b's keys land on ZIM vit_b, strictly
    assert len(report.loaded) == len(vit_b_state) - len(report.unused)
    with pytest.raises(CheckpointError, match="ViT size"):
        load_sam_weights(vit_l, vit_b_state)
    small = tiny()
    with pytest.raises(CheckpointError, match="with another shape"):
        load_sam_weights(
            small, {**tiny_sam().state_dict(), "image_encoder.pos_embed": torch.zeros(1, 64, 64, 32)}
        )
    with pytest.raises(CheckpointError, match="is a ZIM checkpoint; give it as checkpoint="):
        load_sam_weights(small, tiny().state_dict())  # ZIM's own weights given as SAM's
    saved = tmp_path / "zim.pt"  # ...and as a file
    torch.save(tiny().state_dict(), saved)
    with pytest.raises(CheckpointError, match="is a ZIM checkpoint; give it as checkpoint="):
        load_sam_weights(small, str(saved))
    fit = tmp_path / "last.ckpt"  # a trained ZIM without ZIM-only tensors (the SAM pixel decoder ablation)
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in tiny(pixel_decoder="sam").state_dict().items()}}, fit
    )
    with pytest.raises(CheckpointError, match="is a Lightning checkpoint .* give it as checkpoint="):
        load_sam_weights(tiny(pixel_decoder="sam"), str(fit))


def test_paper_scale_networks_without_starting_weights_warn(caplog):
    random_start = "starts from RANDOM weights"
    with torch.device("meta"), caplog.at_level(logging.WARNING, logger="zim_lightning"):
        build_zim(variant="vit_b")
        assert "ZIM vit_b (no checkpoint or sam_checkpoint) " + random_start in caplog.text
        caplog.clear()
        converter_model_registry["converter_hiera_b_plus"]()
        assert "converter_hiera_b_plus (no checkpoint or backbone_checkpoint) " + random_start in caplog.text
        caplog.clear()
        build_zim(variant="tiny")  # tests and CPU demos start tiny networks from random weights
        converter_model_registry["converter_tiny"]()
        with weights_loaded_later():  # a caller that loads the weights next
            build_zim(variant="vit_b")
        # a run's network rebuilt from its config: the run's checkpoint brings the weights
        spec = {"class_path": "zim_lightning.models.build.build_zim", "init_args": {"variant": "vit_b"}}
        network_from_spec(spec, source="a test")
    assert random_start not in caplog.text


# --- our checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_wrong_variant(tmp_path):
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    state = model.state_dict()
    plain_path = tmp_path / "zim.pt"
    torch.save(state, plain_path)
    lightning_path = tmp_path / "zim.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "epoch": 3}, lightning_path)
    for path in (plain_path, lightning_path):
        loaded = zim_model_registry["tiny"](checkpoint=str(path))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="another model or architecture variant"):
        zim_model_registry["tiny"](checkpoint=str(plain_path), pixel_decoder="sam")
    with pytest.raises(ValueError, match="not both"):
        zim_model_registry["tiny"](checkpoint=str(plain_path), sam_checkpoint=str(plain_path))


def test_layer_norm_2d_equals_segment_anythings_on_low_variance_channels() -> None:
    from segment_anything.modeling.common import LayerNorm2d as SamLayerNorm2d

    from zim_lightning.models.common import LayerNorm2d

    x = 1e-3 * torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(LayerNorm2d(8)(x), SamLayerNorm2d(8)(x), atol=1e-5, rtol=1e-5)


class _TouchOnUnpickle:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path: Path) -> None:
    from zim_lightning.models.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"weight": torch.zeros(1), "payload": _TouchOnUnpickle(marker)}, evil)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_a_run_config_naming_backbone_weights_that_are_gone_still_rebuilds(tmp_path: Path) -> None:
    from zim_lightning.models.build import network_from_spec
    from zim_lightning.models.converter import MattingConverter

    spec = {
        "class_path": "zim_lightning.models.converter.build_converter_tiny",
        "init_args": {"checkpoint": None, "backbone_checkpoint": str(tmp_path / "moved" / "sam2.pt")},
    }
    net = network_from_spec(spec, source="test", expected=MattingConverter)
    assert isinstance(net, MattingConverter)
