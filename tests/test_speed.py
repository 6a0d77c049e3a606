"""The speed switches compute the same function as the plain path: fast ViT attention backends against
segment-anything's encoder, SAM weights in the fast variants, activation checkpointing, channels-last,
bf16 autocast, and the torch.compile wiring."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, Sam

from zim_lightning import benchmarking, speed
from zim_lightning.models.build import ZIM_VARIANTS, load_sam_weights, zim_model_registry
from zim_lightning.models.image_encoder import ImageEncoder
from zim_lightning.models.vit_attention import ATTENTION_BACKENDS, ViTAttention
from zim_lightning.models.zim import Zim

# Off CUDA flex runs its eager reference on purpose (tests); its "use torch.compile" advice is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# A small encoder that still has every case: windows that need padding (8 % 3 != 0), a global block,
# two heads, relative positions.
SMALL_ENCODER = {
    "image_size": 128,
    "patch_size": 16,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": (1,),
    "out_chans": 16,
    "window_size": 3,
}
FAST_BACKENDS = [b for b in ATTENTION_BACKENDS if b != "eager"]
# flex has no CPU backward; triton_relpos trains on CPU through its sdpa_fold fallback.
TRAINABLE_ON_CPU = ["sdpa", "sdpa_fold", "triton_relpos"]


def stock_encoder(seed: int = 0) -> ImageEncoderViT:
    """segment-anything's encoder at SMALL_ENCODER's sizes, every weight random (rel-pos included)."""
    torch.manual_seed(seed)
    cfg = SMALL_ENCODER
    encoder = ImageEncoderViT(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=4.0,
        out_chans=cfg["out_chans"],
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg["window_size"],
        global_attn_indexes=cfg["global_attn_indexes"],
    )
    with torch.no_grad():  # SAM zero-initialises rel-pos and pos-embed: make them count
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0.0, 0.5)
    return encoder


def ours_from(stock: ImageEncoderViT, attention: str, **kwargs) -> ImageEncoder:
    ours = ImageEncoder(**SMALL_ENCODER, attention=attention, **kwargs)
    ours.load_state_dict(stock.state_dict(), strict=True)  # SAM's keys, every one of them
    return ours


def forward_backward(
    encoder: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    out = encoder(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("attention", FAST_BACKENDS)
def test_fast_attention_equals_segment_anything_encoder(attention):
    stock = stock_encoder().eval()
    ours = ours_from(stock, attention).eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = stock(x), ours(x)
    assert got.shape == expected.shape == (2, 16, 8, 8)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", TRAINABLE_ON_CPU)
def test_fast_attention_gradients_equal_segment_anything(attention):
    stock = stock_encoder()
    ours = ours_from(stock, attention)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    expected, expected_grads = forward_backward(stock, x)
    got, grads = forward_backward(ours, x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=1e-3, msg=name)
    # The relative-position tables get a gradient through the fast paths too.
    assert grads["blocks.1.attn.rel_pos_h"].abs().sum() > 0


def test_flex_refuses_to_train_on_cpu_with_a_clear_message():
    ours = ours_from(stock_encoder(), "flex")
    with pytest.raises(NotImplementedError, match="attention='flex' cannot train on cpu"):
        ours(torch.randn(1, 3, 128, 128))


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_fold"])
def test_activation_checkpointing_gives_the_plain_gradients(attention):
    stock = stock_encoder(seed=5)
    plain = ours_from(stock, attention)
    recomputed = ours_from(stock, attention, activation_checkpointing=True)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    # Count the tensors autograd keeps for the backward pass (checkpointed regions keep their own,
    # invisible to an outer hook, and only the block inputs are stored).
    saved: dict[str, int] = {"plain": 0, "recomputed": 0}
    for name, encoder in (("plain", plain), ("recomputed", recomputed)):

        def pack(t, name=name):
            saved[name] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = encoder(x)
        del out
    assert saved["recomputed"] < saved["plain"] / 2, saved
    expected, expected_grads = forward_backward(plain, x)
    got, grads = forward_backward(recomputed, x)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_switches_reject_unknown_values_and_models_without_targets():
    with pytest.raises(ValueError, match="attention must be one of"):
        ImageEncoder(**SMALL_ENCODER, attention="fast")
    with pytest.raises(ValueError, match="no ViTAttention"):
        speed.set_attention(torch.nn.Linear(2, 2), "sdpa")
    with pytest.raises(ValueError, match="no ImageEncoder"):
        speed.set_activation_checkpointing(torch.nn.Linear(2, 2), True)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        speed.compile_model(torch.nn.Linear(2, 2), mode="fastest")
    with pytest.raises(ValueError, match=r"compile backend must be one of .*'inductor'.*got 'fast'"):
        speed.compile_model(torch.nn.Linear(2, 2), parts=None, backend="fast")
    with pytest.raises(ValueError, match="'reduce-overhead' is an inductor mode"):
        speed.compile_model(torch.nn.Linear(2, 2), parts=None, mode="reduce-overhead", backend="aot_eager")
    with pytest.raises(ValueError, match="precision must be one of"):
        with speed.autocast("cpu", "fp8"):
            pass


# --- the whole network -----------------------------------------------------------------------------

# The tiny variant at a 256 input (16x16 embedding): every part of the real network, seconds on CPU.
SIDE = 256


def small_zim(*, logit_scale: float = 1.0, **kwargs) -> Zim:
    """The tiny Zim at SIDE with random rel-pos tables (SAM starts them at zero, which would hide the
    backends' bias handling), the mask hypernetworks' last layers scaled by ``logit_scale``."""
    torch.manual_seed(0)
    model = Zim(**ZIM_VARIANTS["tiny"], image_size=SIDE, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
            mlp.layers[-1].bias.mul_(logit_scale)
    return model


def small_sam() -> Sam:
    """A segment-anything Sam at the small Zim's sizes, random weights."""
    torch.manual_seed(7)
    sam = benchmarking.build_stock_sam("tiny", image_size=SIDE).eval()
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0.0, 0.5)
    return sam


@pytest.mark.parametrize("attention", FAST_BACKENDS)
def test_sam_state_dict_loads_into_fast_zim_and_gives_sams_embedding(attention):
    zim = speed.set_attention(small_zim(), attention)
    sam = small_sam()
    report = load_sam_weights(zim, sam.state_dict())
    assert "image_encoder.blocks.1.attn.rel_pos_h" in report.loaded
    x = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, _ = zim.encode_preprocessed(x)
        theirs = sam.image_encoder(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples: a box, and a positive plus a negative click (padded to 2 points each)."""
    coords = torch.tensor([[[30.0, 40.0], [200.0, 180.0]], [[120.0, 100.0], [20.0, 230.0]]])
    labels = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    return coords, labels


def alpha(zim: Zim, images: torch.Tensor, precision: str) -> torch.Tensor:
    coords, labels = prompts()
    with torch.no_grad(), speed.autocast("cpu", precision):
        logits = zim(images, coords, labels)["logits"]
    return torch.sigmoid(logits.float())


@pytest.fixture(scope="module")
def images_and_plain_alpha():
    """Images, the logit scale that spreads the plain path's logits to a standard deviation of 6 (alphas
    near 0 and 1, as a matte's; random logits stay near 0, where every alpha is about 0.5 and any
    error hides), and the plain fp32 alpha."""
    images = torch.randint(
        0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        logits = speed.set_attention(small_zim(), "eager")(images, *prompts())["logits"]
    scale = 6.0 / logits.std().item()
    plain = alpha(speed.set_attention(small_zim(logit_scale=scale), "eager"), images, "fp32")
    assert plain.var() > 0.1  # spread
    return images, scale, plain


@pytest.mark.parametrize(
    ("attention", "precision"),
    [("sdpa", "fp32"), ("sdpa_fold", "fp32"), ("flex", "fp32"), ("sdpa_fold", "bf16"), ("sdpa", "bf16")],
)
def test_fast_alpha_agrees_with_plain_fp32(images_and_plain_alpha, attention, precision):
    images, scale, plain = images_and_plain_alpha
    fast = speed.to_channels_last(speed.set_attention(small_zim(logit_scale=scale), attention))
    speed.set_float32_heads(fast, True)  # as ZimPredictor(precision="bf16") does
    assert fast.feature_pyramid.levels[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    got = alpha(fast, images, precision)
    assert got.shape == plain.shape
    mse = torch.mean((got - plain) ** 2).item()
    assert mse < 1e-5, f"{attention}/{precision}: alpha MSE {mse:.2e} against the plain fp32 path"
    if precision == "fp32":
        assert mse < 1e-10  # same function: only float32 round-off


def test_float32_heads_keep_bf16_from_moving_the_alpha(images_and_plain_alpha):
    images, scale, plain = images_and_plain_alpha
    fast = speed.set_attention(small_zim(logit_scale=scale), "sdpa_fold")
    everything = torch.mean((alpha(fast, images, "bf16") - plain) ** 2).item()  # pyramid, decoder in bf16
    heads = torch.mean((alpha(speed.set_float32_heads(fast, True), images, "bf16") - plain) ** 2).item()
    assert heads < everything / 10, (heads, everything)
    assert torch.equal(
        alpha(fast, images, "fp32"), alpha(speed.set_float32_heads(fast, False), images, "fp32")
    )
    with pytest.raises(ValueError, match="no float32_heads switch"):
        speed.set_float32_heads(torch.nn.Linear(2, 2), True)


def test_compile_model_wires_the_parts_in_place_and_keeps_keys():
    zim = small_zim()
    keys = list(zim.state_dict())
    speed.compile_model(zim, mode="max-autotune-no-cudagraphs")
    compiled = {name for name, module in zim.named_modules() if module._compiled_call_impl is not None}
    assert compiled == set(speed.ZIM_COMPILED_PARTS)
    assert list(zim.state_dict()) == keys  # checkpoints keep their names (no "_orig_mod.")
    with pytest.raises(ValueError, match="none of"):
        speed.compile_model(zim, parts=("not_a_part",))


def test_compile_inference_makes_one_graph_of_each_call_and_keeps_the_outputs():
    from torch._dynamo.utils import counters

    zim = small_zim().eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, SIDE, SIDE * 3 // 4), generator=generator).to(torch.uint8)
    coords, labels = torch.tensor([[[70.0, 50.0], [180.0, 160.0]]]), torch.tensor([[2.0, 3.0]])
    with torch.no_grad():
        embedding, feats = zim.encode_image(image)
        logits, iou = zim.decode(embedding, feats, coords, labels)
        keys = list(zim.state_dict())
        torch._dynamo.reset()
        counters.clear()
        speed.compile_inference(zim, backend="aot_eager")
        got_embedding, got_feats = zim.encode_image(image)
        got_logits, got_iou = zim.decode(got_embedding, got_feats, coords, labels)
    # one graph per call, nothing left to eager code between the parts
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(
        counters["graph_break"]
    )
    torch.testing.assert_close(got_embedding, embedding)
    torch.testing.assert_close(got_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_iou, iou, atol=1e-5, rtol=0)
    assert list(zim.state_dict()) == keys
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="inductor mode"):
        speed.compile_inference(small_zim(), mode="reduce-overhead", backend="aot_eager")


def test_calls_under_cuda_graphs_start_a_step_and_return_copies():
    # Under cudagraph trees the next replay overwrites a graph's outputs: the image embedding a
    # predictor keeps for many decodes must be a copy.
    buffer = torch.arange(4.0)
    call = speed._step_and_copy(lambda: (buffer, {"iou": buffer}))
    out, extra = call()
    assert torch.equal(out, buffer) and out.data_ptr() != buffer.data_ptr()
    assert extra["iou"].data_ptr() != buffer.data_ptr()


def test_reports_survive_a_cut_off_run_and_errors_without_a_message(tmp_path, capsys):
    path = tmp_path / "report.json"
    report = {"benchmark": "x", "results": [{"config": "a"}]}
    benchmarking.emit_report(report, path, complete=False)
    assert json.loads(path.read_text()) == {**report, "complete": False}
    assert capsys.readouterr().out == ""  # only the final report goes to stdout
    report["results"].append({"config": "b"})
    benchmarking.emit_report(report, path)
    assert json.loads(capsys.readouterr().out)["complete"] is True
    assert json.loads(path.read_text())["results"] == [{"config": "a"}, {"config": "b"}]
    assert benchmarking.describe_error(AssertionError()) == "AssertionError"
    assert benchmarking.describe_error(RuntimeError("CUDA error\nmore")) == "RuntimeError: CUDA error"


def test_set_attention_reaches_every_vit_block():
    zim = small_zim()
    modules = [m for m in zim.modules() if isinstance(m, ViTAttention)]
    assert len(modules) == ZIM_VARIANTS["tiny"]["encoder_depth"]
    speed.set_attention(zim, "flex")
    assert {m.backend for m in modules} == {"flex"}
    assert zim.image_encoder.attention == "flex"


def test_registry_builders_take_the_speed_switches():
    zim = zim_model_registry["tiny"](attention="flex", activation_checkpointing=True)
    assert zim.image_encoder.attention == "flex"
    assert zim.image_encoder.activation_checkpointing
    with pytest.raises(ValueError, match="attention must be one of"):
        zim_model_registry["tiny"](attention="fastest")


def test_compile_model_passes_the_mode_to_inductor(monkeypatch) -> None:
    from zim_lightning.speed import compile_model

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    compile_model(torch.nn.Linear(2, 2), mode="max-autotune", parts=None, backend="inductor")
    assert calls and calls[0].get("mode") == "max-autotune"
