"""ZimPredictor: shapes and ranges at the original size, batched decoding, official equivalence, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zim_lightning.models import zim_model_registry
from zim_lightning.predictor import ZimPredictor

HEIGHT, WIDTH = 300, 450  # non-square: resized to 683x1024, padded to 1024x1024


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    img[80:220, 120:330] = (200, 40, 40)  # an object, so prompts see different content
    return img


@pytest.fixture(scope="module")
def predictor(image) -> ZimPredictor:
    torch.manual_seed(0)
    p = ZimPredictor(zim_model_registry["tiny"]().eval())
    p.set_image(image)
    return p


def test_outputs_at_original_size(predictor):
    masks, iou, low_res = predictor.predict(box=np.array([100, 60, 350, 240]))
    assert masks.shape == (4, HEIGHT, WIDTH) and iou.shape == (4,) and low_res.shape == (4, 512, 512)
    assert masks.dtype == np.float32 and 0 <= masks.min() and masks.max() <= 1
    assert predictor.input_size == (683, 1024) and predictor.original_size == (HEIGHT, WIDTH)
    single, single_iou, _ = predictor.predict(
        np.array([[200.0, 150.0], [20.0, 20.0]]), np.array([1, 0]), multimask_output=False
    )
    assert single.shape == (1, HEIGHT, WIDTH) and single_iou.shape == (1,)
    logits, _, _ = predictor.predict(
        np.array([[200.0, 150.0], [20.0, 20.0]]), np.array([1, 0]), return_logits=True
    )
    assert np.allclose(1 / (1 + np.exp(-logits[:1])), single, atol=1e-5)
    assert predictor.get_image_embedding().shape == (1, 64, 64, 64)


def test_points_and_box_together(predictor):
    points, labels = np.array([[200.0, 150.0]]), np.array([1])
    box = np.array([100, 60, 350, 240])
    both, _, _ = predictor.predict(points, labels, box)
    box_only, _, _ = predictor.predict(box=box)
    assert both.shape == (4, HEIGHT, WIDTH)
    assert not np.allclose(both, box_only)  # the point is a token of the decoder too
    # segment-anything's 4th positional argument is mask_input: here the rest are keyword-only, so a
    # call written for SamPredictor fails instead of taking its mask input for multimask_output
    with pytest.raises(TypeError):
        predictor.predict(points, labels, None, None, True)


@pytest.mark.slow
def test_predict_torch_batch_equals_single_calls(predictor):
    rng = np.random.default_rng(1)
    x1 = rng.uniform(0, WIDTH - 60, 16)
    y1 = rng.uniform(0, HEIGHT - 60, 16)
    boxes = np.stack([x1, y1, x1 + rng.uniform(10, 60, 16), y1 + rng.uniform(10, 60, 16)], axis=1)
    singles = [predictor.predict(box=b, multimask_output=False) for b in boxes]
    batch_boxes = torch.as_tensor(
        predictor.transform.apply_boxes(boxes, predictor.original_size), dtype=torch.float32
    )
    masks, iou, low_res = predictor.predict_torch(None, None, batch_boxes, multimask_output=False)
    assert masks.shape == (16, 1, HEIGHT, WIDTH) and iou.shape == (16, 1)
    for i, (m, s, lr) in enumerate(singles):
        assert np.allclose(masks[i].numpy(), m, atol=1e-5)
        assert np.allclose(iou[i].numpy(), s, atol=1e-5)
        assert np.allclose(low_res[i].numpy(), lr, atol=1e-4)


@pytest.mark.parametrize("shape", [(240, 320), (1300, 1700), (1024, 1024)])  # up, down, no resize
def test_tensor_resize_gives_the_pil_matte(predictor, shape):
    from skimage import data

    photo = np.tile(data.astronaut(), (3, 4, 1))[: shape[0], : shape[1]]  # a photograph, tiled
    box = np.array([0.2 * shape[1], 0.1 * shape[0], 0.7 * shape[1], 0.9 * shape[0]])
    results = {}
    for resize in ("pil", "tensor"):
        other = ZimPredictor(predictor.model, resize=resize)
        other.set_image(photo)
        assert other.input_size == predictor.transform.get_preprocess_shape(*shape, 1024)
        results[resize] = other.predict(box=box, multimask_output=False)[0], other.get_image_embedding()
    (pil, pil_embedding), (tensor, tensor_embedding) = results["pil"], results["tensor"]
    assert ((pil - tensor) ** 2).mean() < 1e-8  # Pillow's pixels but for rare one-level differences
    assert (tensor_embedding - pil_embedding).abs().mean() < 1e-3  # of values about 1 in size
    if shape == (1024, 1024):  # not resized either way
        assert torch.equal(tensor_embedding, pil_embedding)
    with pytest.raises(ValueError, match="resize must be one of"):
        ZimPredictor(predictor.model, resize="cv2")


def test_bgr_input_gives_the_same_embedding(predictor, image):
    other = ZimPredictor(predictor.model)
    other.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert torch.equal(other.get_image_embedding(), predictor.get_image_embedding())


def test_set_torch_image_takes_an_image_resized_to_the_frame_as_sam_predictor(predictor, image):
    other = ZimPredictor(predictor.model)
    size = image.shape[:2]
    other.set_torch_image(predictor.to_frame(image).float(), size)  # what set_image encodes
    assert torch.equal(other.get_image_embedding(), predictor.get_image_embedding())
    box = np.array([40, 30, 200, 180])
    np.testing.assert_array_equal(other.predict(box=box)[0], predictor.predict(box=box)[0])
    frame = other.transform.get_preprocess_shape(*size, other.model.image_size)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), frame, mode="bilinear", antialias=True
    )
    other.set_torch_image(resized, size)  # a float image resized elsewhere
    assert other.predict(box=box)[0].shape == (4, *size)  # four mattes at the original size
    with pytest.raises(ValueError, match=r"transformed_image must be 1x3x683x1024 .* got \(3, 683, 1024\)"):
        other.set_torch_image(resized[0], size)
    # segment-anything's apply_image_torch takes its frame from the batch and channel sizes: 341x1024
    sam_resized = other.transform.apply_image_torch(resized)
    with pytest.raises(ValueError, match=r"got \(1, 3, 341, 1024\)"):
        other.set_torch_image(sam_resized, size)


def test_matches_official_predictor_given_the_same_network(predictor, image):
    """Official pre/post-processing around our network (ONNX wrappers replaced by stubs) = ours."""
    official_zim = pytest.importorskip(
        "zim_anything.modeling.zim", reason="official zim_anything not installed"
    )
    official_predictor = pytest.importorskip("zim_anything.predictor")
    model = predictor.model

    def encoder(image_tensor):
        return model.encode_preprocessed(image_tensor)

    class Decoder:  # what the official ONNX decoder wrapper feeds the network
        num_mask_tokens = 4

        def __call__(self, interm_feats, image_embeddings, points, boxes, attn_mask):
            if boxes is not None:
                coords = boxes.reshape(-1, 2, 2)
                labels = torch.tensor([[2.0, 3.0]]).expand(coords.shape[0], 2)
            else:
                coords = torch.cat([points[0], torch.full((points[0].shape[0], 1, 2), -0.5)], dim=1)
                labels = torch.cat([points[1], -torch.ones(points[1].shape[0], 1)], dim=1)
            return model.decode(
                image_embeddings, interm_feats, coords, labels, attn_mask, multimask_output=True
            )

    theirs = official_predictor.ZimPredictor(official_zim.Zim(encoder, Decoder()))
    with torch.no_grad():
        theirs.set_image(image)
        for prompt in (
            {"box": np.array([100, 60, 350, 240])},
            {"point_coords": np.array([[200.0, 150.0], [20.0, 280.0]]), "point_labels": np.array([1, 0])},
        ):
            their_masks, their_iou, _ = theirs.predict(**prompt, multimask_output=True)
            our_masks, our_iou, _ = predictor.predict(**prompt, multimask_output=True)
            assert np.allclose(our_masks, their_masks, atol=1e-5)
            assert np.allclose(our_iou, their_iou, atol=1e-5)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((HEIGHT, WIDTH), dtype=np.uint8), "HxWx3"),
        (np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8), "HxWx3"),
        (np.zeros((HEIGHT, WIDTH, 3), dtype=np.float32), "uint8"),
        (np.full((HEIGHT, WIDTH, 3), 300, dtype=np.int16), "uint8"),
        (np.zeros((1, 3000, 3), dtype=np.uint8), r"3000x1 \(WxH\) pixels is too elongated"),
    ],
)
def test_bad_images_are_rejected(bad, match):
    p = ZimPredictor(zim_model_registry["tiny"]())
    with pytest.raises(ValueError, match=match):
        p.set_image(bad)
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(np.zeros((4, 4, 3), dtype=np.uint8), image_format="RGBA")


def test_predict_before_set_image():
    p = ZimPredictor(zim_model_registry["tiny"]())
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=np.array([0, 0, 10, 10]))
    with pytest.raises(RuntimeError, match="set_image"):
        p.get_image_embedding()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"box": np.array([300, 60, 100, 240])}, "x2 >= x1"),
        ({"box": np.array([100, 240, 350, 60])}, "x2 >= x1 and y2 >= y1"),
        ({"box": np.array([500, 10, 600, 50])}, "outside"),
        ({"box": np.array([-50, -40, -10, -5])}, "outside"),
        ({"box": np.array([10, 400, 50, 500])}, "outside"),  # below the image, x inside
        ({"box": np.array([10, -50, 50, -5])}, "outside"),  # above it
        ({"box": np.array([1, 2, 3])}, "box must be a length-4"),
        (
            {"point_coords": np.array([1.0, 2.0]), "point_labels": np.array([1])},
            "point_coords must be an Nx2",
        ),
        ({"point_coords": np.array([[1.0, 2.0, 3.0]]), "point_labels": np.array([1])}, "Nx2"),
        ({"point_coords": np.array([[1.0, 2.0]]), "point_labels": np.array([2])}, "point_labels must be 1"),
        (
            {"point_coords": np.array([[1.0, 2.0]]), "point_labels": np.array([1, 0])},
            "2 entries but point_coords",
        ),
        ({"point_coords": np.array([[1.0, 2.0]]), "point_labels": np.array([[1]])}, "length-N"),
        ({"point_coords": np.array([[1.0, 2.0]])}, "together"),
        ({}, "at least one prompt"),
        ({"point_coords": np.array([[np.nan, 2.0]]), "point_labels": np.array([1])}, "finite"),
        ({"point_coords": np.array([[1e39, 5.0]]), "point_labels": np.array([1])}, "float32"),  # inf in it
        ({"box": np.array([0.0, np.inf, 100.0, 100.0])}, "box must be finite"),
        ({"box": np.array([0.0, 0.0, 1e39, 30.0])}, "float32"),
    ],
)
def test_bad_prompts_are_rejected(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(**kwargs)


def test_bad_torch_prompts_are_rejected(predictor):
    coords, labels = torch.zeros(2, 3, 2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="boxes must have as many rows"):
        predictor.predict_torch(coords, labels, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="point_labels must be BxN"):
        predictor.predict_torch(coords, torch.ones(2, 2))
    with pytest.raises(ValueError, match="boxes must be Bx4"):
        predictor.predict_torch(None, None, torch.zeros(4))
    with pytest.raises(ValueError, match="1 \\(foreground\\), 0 \\(background\\), or -2 / -1"):
        predictor.predict_torch(coords, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="at least one point labelled 0 or 1"):
        predictor.predict_torch(coords, torch.tensor([[1.0, 0.0, -1.0], [-1.0, -1.0, -1.0]]))
    # values: what predict() refuses, predict_torch refuses too, rather than decoding all-NaN mattes
    with pytest.raises(ValueError, match="point_coords must be finite"):
        predictor.predict_torch(torch.tensor([[[float("nan"), 10.0]]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="boxes must be finite"):
        predictor.predict_torch(None, None, torch.tensor([[0.0, float("inf"), 100.0, 100.0]]))
    with pytest.raises(ValueError, match="x2 >= x1 and y2 >= y1"):
        predictor.predict_torch(
            None, None, torch.tensor([[10.0, 10.0, 50.0, 50.0], [500.0, 10.0, 10.0, 50.0]])
        )
    with pytest.raises(TypeError, match="point_coords must be a torch.Tensor .* predict\\(\\) takes NumPy"):
        predictor.predict_torch(np.zeros((1, 1, 2)), np.ones((1, 1)))
    with pytest.raises(TypeError, match="boxes must be a torch.Tensor"):
        predictor.predict_torch(None, None, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="point_coords must be finite"):  # float64 beyond float32's range
        predictor.predict_torch(torch.tensor([[[1e39, 5.0]]], dtype=torch.float64), torch.ones(1, 1))


def test_torch_prompts_on_the_edge_of_valid_are_decoded(predictor):
    # a zero-width box (around a one-pixel-wide mask, as SAM's batched_mask_to_box gives), and with a
    # box, a row whose points are all padding: the box is its prompt
    masks, _, _ = predictor.predict_torch(None, None, torch.tensor([[10.0, 10.0, 10.0, 40.0]]))
    assert masks.shape[0] == 1
    coords, labels = torch.tensor([[[30.0, 20.0]], [[0.0, 0.0]]]), torch.tensor([[1.0], [-1.0]])
    boxes = torch.tensor([[5.0, 5.0, 50.0, 40.0], [10.0, 10.0, 60.0, 50.0]])
    masks, _, _ = predictor.predict_torch(coords, labels, boxes, multimask_output=False)
    assert masks.shape[0] == 2


def test_point_sets_of_different_lengths_batch_with_absent_or_padding_points(predictor):
    coords = torch.tensor([[[100.0, 120.0], [300.0, 200.0]], [[250.0, 90.0], [0.0, 0.0]]])
    for filler in (-2.0, -1.0):  # -2: each row as alone; -1: SamPredictor's padding, a token that counts
        labels = torch.tensor([[1.0, 0.0], [1.0, filler]])
        masks, iou, _ = predictor.predict_torch(coords, labels, multimask_output=False)
        second = (coords[1:, :1], labels[1:, :1]) if filler == -2.0 else (coords[1:], labels[1:])
        for row, (c, lab) in enumerate([(coords[:1], labels[:1]), second]):
            single, single_iou, _ = predictor.predict_torch(c, lab, multimask_output=False)
            torch.testing.assert_close(masks[row : row + 1], single, atol=1e-5, rtol=0)
            torch.testing.assert_close(iou[row : row + 1], single_iou, atol=1e-5, rtol=0)


def test_bf16_precision_gives_the_fp32_matte_in_float32(predictor, image):
    fast = ZimPredictor(predictor.model, precision="bf16")
    fast.set_image(image)
    box = np.array([100, 60, 350, 240])
    masks, iou, low_res = fast.predict(box=box, multimask_output=False)
    reference, _, _ = predictor.predict(box=box, multimask_output=False)
    assert masks.dtype == iou.dtype == low_res.dtype == np.float32
    mse = float(np.mean((masks - reference) ** 2))
    assert 0 < mse < 1e-4  # bf16 really ran (not bit-equal), within the fast-path agreement bound
    with pytest.raises(ValueError, match="precision must be one of"):
        ZimPredictor(predictor.model, precision="fp8")


def test_a_bf16_predictor_keeps_the_heads_in_float32_in_its_own_calls_only(predictor, image):
    from zim_lightning import speed

    net = predictor.model
    fast = ZimPredictor(net, precision="bf16")
    fast.set_image(image)
    box = np.array([100, 60, 350, 240])
    masks, _, _ = fast.predict(box=box, multimask_output=False)
    assert net.float32_heads is False  # the model is left as it was (it may also train)
    coords = torch.as_tensor(fast.transform.apply_boxes(box[None], fast.original_size), dtype=torch.float32)
    labels = torch.tensor([[2.0, 3.0]])

    def by_hand(heads: bool) -> np.ndarray:
        with torch.no_grad(), speed.autocast("cpu", "bf16"):
            net.float32_heads = heads
            try:
                embedding, feats = net.encode_image(fast.to_frame(image))
                logits, _ = net.decode(embedding, feats, coords.view(1, 2, 2), labels)
            finally:
                net.float32_heads = False
        full = net.postprocess_masks(logits.float(), fast.input_size, fast.original_size)
        return full.sigmoid()[0, 0].numpy()

    np.testing.assert_array_equal(masks[0], by_hand(True))
    assert not np.array_equal(masks[0], by_hand(False))


def test_negative_integer_images_are_refused(predictor: ZimPredictor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.full((8, 8, 3), -1, np.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prompts_from_the_host_reach_a_gpu_model_intact(predictor: ZimPredictor, image) -> None:
    # On a GPU the prompts are copied through pinned memory without waiting (predictor._to_device): the
    # decode must see them as the CPU model does, even when the caller refills its buffer at once.
    import copy

    gpu = ZimPredictor(copy.deepcopy(predictor.model).cuda())
    gpu.set_image(image)
    prompt = {"point_coords": np.array([[200, 150], [50, 40]]), "point_labels": np.array([1, 0])}
    for kwargs in (
        prompt,
        {"box": np.array([120, 80, 330, 220])},
        {**prompt, "box": np.array([0, 0, 449, 299])},
    ):
        expected, _, _ = predictor.predict(**kwargs, multimask_output=False)
        got, _, _ = gpu.predict(**kwargs, multimask_output=False)
        np.testing.assert_allclose(
            got, expected, atol=2e-2
        )  # TF32 convolutions on the GPU; a wrong prompt moves it by far more
    coords = torch.tensor([[[300.0, 200.0]]]).pin_memory()
    labels = torch.ones(1, 1).pin_memory()
    reference = gpu.predict_torch(coords.clone(), labels.clone(), multimask_output=False)[0].cpu()
    masks = gpu.predict_torch(coords, labels, multimask_output=False)[0]
    coords.fill_(0.0)  # the caller reuses its buffer before the GPU has read it
    torch.testing.assert_close(masks.cpu(), reference, atol=1e-5, rtol=0)
