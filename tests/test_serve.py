"""The matting server's JSON API, over real HTTP, with the tiny ZIM (random weights)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from zim_lightning.models.build import zim_model_registry
from zim_lightning.predictor import ZimPredictor
from zim_lightning.serve import ImageStore, MattingApp, RequestError, create_server
from zim_lightning.serve.store import decode_image, parse_prompt

MAX_UPLOAD = 1 << 20


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return zim_model_registry["tiny"]().eval()


def serve(app: MattingApp) -> tuple[object, str]:
    server = create_server(app, host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"{host}:{port}"


@pytest.fixture(scope="module")
def address(model: torch.nn.Module) -> Iterator[str]:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), max_images=4, max_side=4096)
    server, address = serve(MattingApp(store=store, model_name="tiny", max_upload_bytes=MAX_UPLOAD))
    yield address
    server.shutdown()
    server.server_close()


def call(address: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request on a fresh connection: (status, parsed JSON or raw bytes, headers)."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        if response.getheader("Content-Type", "").startswith("application/json"):
            payload = json.loads(payload)
        return response.status, payload, dict(response.getheaders())
    finally:
        connection.close()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photo() -> np.ndarray:
    """A real photograph (scikit-image's coffee cup), halved to keep post-processing cheap."""
    return np.ascontiguousarray(data.coffee()[::2, ::2])


@pytest.fixture(scope="module")
def uploaded(address: str) -> dict:
    status, body, _ = call(address, "POST", "/api/images", png(photo()), {"X-Filename": quote("cöffee.png")})
    assert status == 200, body
    return body


def predict(address: str, image_id: str, prompt: dict):
    return call(
        address,
        "POST",
        f"/api/images/{image_id}/predict",
        json.dumps(prompt).encode(),
        {"Content-Type": "application/json"},
    )


def decode_png(data_url_or_bytes: str | bytes) -> Image.Image:
    if isinstance(data_url_or_bytes, str):
        import base64

        prefix = "data:image/png;base64,"
        assert data_url_or_bytes.startswith(prefix)
        data_url_or_bytes = base64.b64decode(data_url_or_bytes[len(prefix) :])
    return Image.open(io.BytesIO(data_url_or_bytes))


def test_upload_predict_and_download(address: str, uploaded: dict) -> None:
    height, width = photo().shape[:2]
    assert (uploaded["width"], uploaded["height"]) == (width, height)
    assert uploaded["name"] == "cöffee.png"
    image_id = uploaded["image_id"]

    # The same bytes again reuse the cached embedding: same id, no second encoding.
    status, again, _ = call(address, "POST", "/api/images", png(photo()))
    assert status == 200 and again["image_id"] == image_id and again["encode_ms"] == uploaded["encode_ms"]

    point = {"points": [[width / 2, height / 2, 1], [10, 10, 0]]}
    status, by_point, _ = predict(address, image_id, point)
    assert status == 200, by_point
    alpha = np.asarray(decode_png(by_point["alpha"]))
    assert alpha.shape == (height, width) and alpha.dtype == np.uint8
    assert 0.0 <= by_point["alpha_mean"] <= 1.0
    assert abs(alpha.mean() / 255 - by_point["alpha_mean"]) < 0.01

    status, by_box, _ = predict(address, image_id, {"box": [20, 30, width - 40, height - 20]})
    assert status == 200, by_box
    assert not np.array_equal(np.asarray(decode_png(by_box["alpha"])), alpha)

    prompt = quote(json.dumps(point))
    status, body, headers = call(
        address, "GET", f"/api/images/{image_id}/download?kind=alpha&prompt={prompt}"
    )
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    downloaded = decode_png(body)
    assert downloaded.mode == "L" and np.array_equal(np.asarray(downloaded), alpha)

    status, body, _ = call(address, "GET", f"/api/images/{image_id}/download?kind=cutout&prompt={prompt}")
    cutout = decode_png(body)
    assert status == 200 and cutout.mode == "RGBA"
    rgba = np.asarray(cutout)
    assert np.array_equal(rgba[..., 3], alpha) and np.array_equal(rgba[..., :3], photo())

    status, body, headers = call(address, "GET", f"/api/images/{image_id}/image")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (width, height)


@pytest.mark.parametrize(
    "prompt",
    [
        {"points": [[0.7, 0.25, 1]]},  # a lone click: the first output too, unless --multimask
        {"points": [[0.2, 0.6, 1], [0.9, 0.1, 0]]},
        {"box": [0.1, 0.05, 0.6, 0.9]},
    ],
)
def test_served_alpha_is_the_predictors_for_the_same_prompt(
    model: torch.nn.Module, address: str, uploaded: dict, prompt: dict
) -> None:
    # Off-diagonal prompts on a non-square image: swapped X and Y, or another frame, would differ.
    height, width = photo().shape[:2]
    assert height != width
    predictor = ZimPredictor(model)
    predictor.set_image(photo())
    if "box" in prompt:
        x1, y1, x2, y2 = prompt["box"]
        prompt = {"box": [x1 * width, y1 * height, x2 * width, y2 * height]}
        masks, _, _ = predictor.predict(box=np.array(prompt["box"]), multimask_output=False)
    else:
        prompt = {"points": [[x * width, y * height, label] for x, y, label in prompt["points"]]}
        points = np.array(prompt["points"])
        masks, _, _ = predictor.predict(
            point_coords=points[:, :2], point_labels=points[:, 2], multimask_output=False
        )
    status, body, _ = predict(address, uploaded["image_id"], prompt)
    assert status == 200, body
    expected = np.round(np.clip(masks[0], 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(decode_png(body["alpha"])), expected)


def test_multimask_store_keeps_the_best_output_of_a_lone_click(model: torch.nn.Module) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), multimask=True)
    entry = store.add(png(photo()), name="p.png")
    height, width = photo().shape[:2]
    prediction = store.predict(entry, store.parse(entry, {"points": [[0.7 * width, 0.25 * height, 1]]}))
    predictor = ZimPredictor(model)
    predictor.set_image(photo())
    masks, iou, _ = predictor.predict(
        point_coords=np.array([[0.7 * width, 0.25 * height]]),
        point_labels=np.array([1]),
        multimask_output=True,
    )
    best = int(np.argmax(iou))
    assert prediction.iou == pytest.approx(float(iou[best]))
    np.testing.assert_array_equal(
        prediction.alpha, np.round(np.clip(masks[best], 0, 1) * 255).astype(np.uint8)
    )
    assert prediction.alpha_mean == pytest.approx(float(np.clip(masks[best], 0, 1).mean()), abs=1e-6)


def test_page_and_examples_are_served(address: str) -> None:
    status, page, _ = call(address, "GET", "/")
    assert status == 200 and b'src="app.js"' in page
    status, script, headers = call(address, "GET", "/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"window.zim" in script
    status, info, _ = call(address, "GET", "/api/info")
    assert status == 200 and info["model"] == "tiny" and "astronaut" in info["examples"]
    status, thumb, _ = call(address, "GET", "/api/examples/astronaut.jpg")
    assert status == 200 and max(Image.open(io.BytesIO(thumb)).size) <= 160


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/api/images", b"this is not an image", 400, "not an image"),
        ("POST", "/api/images", b"", 400, "empty"),
        ("POST", "/api/images", png(np.zeros((2, 5000, 3), np.uint8)), 400, "5000x2"),
        ("POST", "/api/images", png(np.zeros((1, 3000, 3), np.uint8)), 400, "too elongated"),
        ("POST", "/api/images", b"x" * (MAX_UPLOAD + 1), 413, "exceeds"),
        ("POST", "/api/images/0123456789abcdef/predict", b'{"points": [[1, 1, 1]]}', 404, "unknown"),
        ("GET", "/api/images/0123456789abcdef/image", None, 404, "unknown"),
        ("POST", "/api/examples/nope", None, 404, "unknown"),
        ("GET", "/../../etc/passwd", None, 404, "no such page"),
        ("DELETE", "/api/images", None, 405, "not allowed"),
    ],
)
def test_rejects_bad_requests(address: str, method: str, path: str, body, status: int, words: str) -> None:
    got, payload, _ = call(address, method, path, body)
    assert got == status and words in payload["error"], payload


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"{}", "at least one point or a box"),
        (b'{"points": [[1e6, 5, 1]]}', "outside"),
        (b'{"points": [[-1, 5, 1]]}', "outside"),
        (b'{"points": [[5, 5, 7]]}', "label"),
        (b'{"points": [[5, 5]]}', "expected [x, y, label]"),
        (b'{"points": [["a", 5, 1]]}', "finite number"),
        (b'{"points": [[NaN, 5, 1]]}', "finite number"),
        (b'{"points": "here"}', "list"),
        (b'{"box": [50, 50, 10, 10]}', "x1 < x2"),
        (b'{"box": [0, 0, 10]}', "[x1, y1, x2, y2]"),
        (b'{"points": ' + json.dumps([[1, 1, 1]] * 65).encode() + b"}", "at most 64"),
    ],
)
def test_rejects_bad_prompts_then_still_serves(
    address: str, uploaded: dict, prompt: bytes, words: str
) -> None:
    path = f"/api/images/{uploaded['image_id']}/predict"
    status, payload, _ = call(address, "POST", path, prompt, {"Content-Type": "application/json"})
    assert status == 400 and words in payload["error"], payload
    status, payload, _ = predict(address, uploaded["image_id"], {"points": [[5, 5, 1]]})
    assert status == 200 and "alpha" in payload


def test_a_refused_request_never_leaves_its_body_to_be_read_as_the_next_request(address: str) -> None:
    # The unknown image is refused before its body is read; a body that is itself a request must not
    # be answered (request smuggling), and the client's next request must not be garbled.
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        inner = f"GET /api/info HTTP/1.1\r\nHost: {address}\r\n\r\n".encode()
        connection.request("POST", "/api/images/0123456789abcdef/predict", body=inner)
        response = connection.getresponse()
        assert response.status == 404 and response.getheader("Connection") == "close"
        response.read()
        assert connection.sock is None  # closed after the refusal: nothing more is read from it
    finally:
        connection.close()
    # a refusal after the body was read keeps the connection
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/api/images", body=b"not an image")
        response = connection.getresponse()
        assert response.status == 400 and response.getheader("Connection") != "close"
        response.read()
        connection.request("GET", "/api/info")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["model"] == "tiny"
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("method", "headers", "words"),
    [
        ("GET", {"Host": "evil.example:7860"}, "Host 'evil.example:7860'"),  # DNS rebinding
        ("POST", {"Origin": "http://evil.example"}, "other sites"),  # a cross-site form or fetch
        ("POST", {"Origin": "null"}, "other sites"),  # a sandboxed page or a local file
    ],
)
def test_refuses_requests_from_other_web_pages(address: str, method: str, headers: dict, words: str) -> None:
    path = "/api/info" if method == "GET" else "/api/examples/nope"
    status, payload, _ = call(address, method, path, None, headers)
    assert status == 403 and words in payload["error"], payload
    # the page's own requests name this server
    status, _, _ = call(
        address,
        method,
        "/api/info" if method == "GET" else "/api/examples/nope",
        None,
        {"Origin": f"http://{address}"},
    )
    assert status == (200 if method == "GET" else 404)
    status, _, _ = call(address, "GET", "/api/info", None, {"Host": f"localhost:{address.split(':')[1]}"})
    assert status == 200


def test_phone_jpegs_with_a_multi_picture_block_are_accepted() -> None:
    picture = Image.fromarray(np.full((12, 16, 3), 120, np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="MPO", save_all=True, append_images=[picture])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    image = decode_image(buffer.getvalue(), max_side=64)
    assert image.shape == (12, 16, 3) and abs(int(image[6, 8, 0]) - 120) <= 2


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--port", "99999", "0 to 65535"),
        ("--max-images", "0", "at least 1"),
        ("--max-upload-mb", "-1", "positive"),
        ("--max-side", "0", "at least 1"),
    ],
)
def test_main_refuses_bad_options(flag: str, value: str, words: str, capsys) -> None:
    from zim_lightning.serve.server import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", flag, value])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_bad_download_requests(address: str, uploaded: dict) -> None:
    base = f"/api/images/{uploaded['image_id']}/download"
    status, payload, _ = call(
        address, "GET", f"{base}?kind=mask&prompt={quote(json.dumps({'box': [1, 1, 9, 9]}))}"
    )
    assert status == 400 and "kind" in payload["error"]
    status, payload, _ = call(address, "GET", f"{base}?kind=alpha&prompt=%7Bbroken")
    assert status == 400 and "not valid JSON" in payload["error"]


def test_concurrent_prompts_all_answer(address: str, uploaded: dict) -> None:
    """The model lock serialises decoder calls from the server's threads; none fails or mixes up."""
    prompts = [{"points": [[20 + 30 * i, 40 + 10 * i, 1]]} for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: predict(address, uploaded["image_id"], p), prompts))
    assert all(status == 200 for status, _, _ in results)
    # Each answer is the matte of its own prompt: repeating one alone gives the same alpha.
    status, alone, _ = predict(address, uploaded["image_id"], prompts[2])
    assert status == 200 and alone["alpha"] == results[2][1]["alpha"]


@pytest.mark.slow  # two image encodings
def test_least_recently_used_image_is_dropped(model: torch.nn.Module) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), max_images=1)
    first = store.add(png(np.full((24, 32, 3), 90, np.uint8)), name="first.png")
    second = store.add(png(np.full((24, 32, 3), 200, np.uint8)), name="second.png")
    assert store.get(second.image_id) is second
    with pytest.raises(RequestError, match="unknown or expired") as error:
        store.get(first.image_id)
    assert error.value.status == 404


def test_main_refuses_a_missing_checkpoint_before_building(tmp_path, capsys):
    from zim_lightning.serve.server import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "tiny", "--checkpoint", str(tmp_path / "missing.ckpt"), "--port", "0"])
    assert exit_info.value.code == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_a_point_below_the_image_is_refused() -> None:
    with pytest.raises(RequestError) as error:
        parse_prompt({"points": [[5, 60, 1]]}, width=100, height=50, max_points=8)
    assert error.value.status == 400


def test_an_image_used_recently_is_not_the_one_dropped(model: torch.nn.Module) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), max_images=2)
    first, second = (store.add_array(np.full((4, 4, 3), v, np.uint8), name=str(v)) for v in (1, 2))
    store.get(first.image_id)  # the person clicks on the first image again
    store.add_array(np.full((4, 4, 3), 3, np.uint8), name="3")
    assert store.get(first.image_id) is first
    with pytest.raises(RequestError):
        store.get(second.image_id)


def test_an_upload_with_only_its_long_side_too_large_is_refused() -> None:
    with pytest.raises(RequestError) as error:
        decode_image(png(np.zeros((5, 20, 3), np.uint8)), max_side=10)
    assert error.value.status == 400


def test_download_file_names_are_safe_header_values() -> None:
    import re
    from types import SimpleNamespace

    store = SimpleNamespace(
        parse=lambda entry, payload: payload,
        predict=lambda entry, prompt: SimpleNamespace(alpha=np.zeros((2, 2), np.uint8)),
        max_side=64,
        max_points=8,
    )
    app = MattingApp(store=store, model_name="stub")
    entry = SimpleNamespace(name='a"b\r\nSet-Cookie: x=1 €.png', image=np.zeros((2, 2, 3), np.uint8))
    for kind in ("alpha", "cutout"):
        _, filename = app.download(entry, kind, '{"box": [0, 0, 1, 1]}')
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", filename), filename


# ---------------------------------------------------------------- predictor / automatic


# ----------------------------------------------------------------------------- mutation round 10: edges


def refused(payload: dict, *, width: int = 100, height: int = 50, max_points: int = 8) -> RequestError:
    with pytest.raises(RequestError) as error:
        parse_prompt(payload, width=width, height=height, max_points=max_points)
    assert error.value.status == 400
    return error.value


# ---------------------------------------------------------------- prompt parsing (no model)
@pytest.mark.parametrize("point", [[True, 5, 1], [5, False, 1], [5, 5, True]])
def test_booleans_are_not_numbers(point: list) -> None:
    assert "finite number" in refused({"points": [point]}).message


def test_a_fractional_label_is_refused() -> None:
    assert "label" in refused({"points": [[5, 5, 0.5]]}).message


def test_points_on_the_far_edges_are_inside() -> None:  # X in [0, width], Y in [0, height]
    prompt = parse_prompt({"points": [[100, 50, 1], [0, 0, 0]]}, width=100, height=50, max_points=8)
    np.testing.assert_array_equal(prompt.point_coords, [[100, 50], [0, 0]])
    np.testing.assert_array_equal(prompt.point_labels, [1, 0])


def test_exactly_max_points_are_accepted() -> None:
    prompt = parse_prompt({"points": [[1, 1, 1]] * 8}, width=100, height=50, max_points=8)
    assert prompt.point_coords.shape == (8, 2)
    assert "at most 8" in refused({"points": [[1, 1, 1]] * 9}).message


def test_null_points_with_a_box_is_a_box_prompt() -> None:  # "either key may be missing or null"
    prompt = parse_prompt({"points": None, "box": [1, 2, 30, 40]}, width=100, height=50, max_points=8)
    assert prompt.point_coords is None and prompt.box.tolist() == [1, 2, 30, 40]


@pytest.mark.parametrize("box", [[10, 10, 10, 20], [10, 10, 20, 10]])
def test_an_empty_box_is_refused(box: list) -> None:
    assert "x1 < x2" in refused({"box": box}).message


def test_a_box_below_a_wide_image_is_refused() -> None:  # y2 checked against the height
    refused({"box": [0, 0, 10, 60]}, width=100, height=50)


def test_a_point_with_extra_values_is_refused() -> None:
    assert "expected [x, y, label]" in refused({"points": [[5, 5, 1, 9]]}).message


# ---------------------------------------------------------------- upload decoding (no model)
def test_formats_outside_the_list_are_refused() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, format="PPM")
    with pytest.raises(RequestError) as error:
        decode_image(buffer.getvalue(), max_side=64)
    assert error.value.status == 400 and "PPM not accepted" in error.value.message


def test_an_image_exactly_max_side_is_accepted() -> None:
    assert decode_image(png(np.zeros((5, 10, 3), np.uint8)), max_side=10).shape == (5, 10, 3)


def test_a_decompression_bomb_header_is_a_400() -> None:
    data = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = struct.pack(">II", 30000, 30000) + bytes(data[24:29])  # 900 Mpx declared
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(RequestError) as error:
        decode_image(bytes(data), max_side=64)
    assert error.value.status == 400


# ---------------------------------------------------------------- the store (tiny model)
def test_max_images_zero_is_refused(model) -> None:
    with pytest.raises(ValueError, match="max_images"):
        ImageStore(predictor_factory=lambda: ZimPredictor(model), max_images=0)


def test_uploading_the_same_bytes_again_keeps_that_image(model) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), max_images=2)
    first, second = (store.add(png(np.full((8, 8, 3), v, np.uint8)), name=str(v)) for v in (1, 2))
    assert store.add(png(np.full((8, 8, 3), 1, np.uint8)), name="again") is first
    store.add(png(np.full((8, 8, 3), 3, np.uint8)), name="3")
    assert store.get(first.image_id) is first
    with pytest.raises(RequestError):
        store.get(second.image_id)


def test_files_differing_only_late_are_different_images(model) -> None:  # the id hashes all bytes
    def bmp(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="BMP")
        return buffer.getvalue()

    a = np.zeros((32, 32, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 255  # BMP rows are stored bottom-up: the top row comes last in the file
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    first, second = store.add(bmp(a), name="a.bmp"), store.add(bmp(b), name="b.bmp")
    assert first.image_id != second.image_id and second.image[0, 0].tolist() == [255, 255, 255]


def test_the_cache_tells_labels_apart(model) -> None:
    image = np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8)
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    entry = store.add_array(image, name="r")
    positive = store.predict(entry, store.parse(entry, {"points": [[16, 12, 1]]})).alpha
    negative = store.predict(entry, store.parse(entry, {"points": [[16, 12, 0]]})).alpha
    predictor = ZimPredictor(model)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(
        point_coords=np.array([[16.0, 12.0]]), point_labels=np.array([0]), multimask_output=False
    )
    np.testing.assert_array_equal(negative, np.round(np.clip(masks[0], 0, 1) * 255).astype(np.uint8))
    assert not np.array_equal(positive, negative)


def test_a_repeated_prompt_reuses_the_last_prediction(model) -> None:  # (performance only)
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    entry = store.add_array(np.full((16, 16, 3), 7, np.uint8), name="g")
    prompt = store.parse(entry, {"box": [1, 1, 9, 9]})
    assert store.predict(entry, prompt) is store.predict(entry, store.parse(entry, {"box": [1, 1, 9, 9]}))


def test_prediction_waits_for_the_model_lock(model) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    entry = store.add_array(np.full((16, 16, 3), 9, np.uint8), name="g")
    prompt = store.parse(entry, {"points": [[4, 4, 1]]})
    results = []
    with store.model_lock:
        worker = threading.Thread(target=lambda: results.append(store.predict(entry, prompt)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not results  # blocked while another request holds the network
    worker.join(30)
    assert len(results) == 1


def test_multimask_applies_only_to_a_lone_point(model) -> None:
    image = np.random.default_rng(1).integers(0, 255, (24, 32, 3), np.uint8)
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), multimask=True)
    entry = store.add_array(image, name="r")
    points = np.array([[8.0, 6.0], [24.0, 18.0]])
    got = store.predict(entry, store.parse(entry, {"points": [[8, 6, 1], [24, 18, 1]]}))
    predictor = ZimPredictor(model)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(
        point_coords=points, point_labels=np.array([1, 1]), multimask_output=False
    )
    np.testing.assert_array_equal(got.alpha, np.round(np.clip(masks[0], 0, 1) * 255).astype(np.uint8))


# ---------------------------------------------------------------- HTTP
def raw(address: str, method: str, path: str, headers: dict, body: bytes = b"", timeout: float = 10):
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.putrequest(method, path)
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_missing_or_negative_content_length(address: str) -> None:
    status, payload = raw(address, "POST", "/api/images", {})
    assert status == 411 and "Content-Length" in payload["error"]
    status, payload = raw(address, "POST", "/api/images", {"Content-Length": "-1"}, timeout=5)
    assert status == 400 and "negative" in payload["error"]


def test_an_upload_exactly_at_the_limit_is_read(model) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    server, where = serve(MattingApp(store=store, model_name="tiny", max_upload_bytes=64))
    try:
        status, payload, _ = call(where, "POST", "/api/images", b"x" * 64)
        assert status == 400 and "not an image" in payload["error"]
        status, payload, _ = call(where, "POST", "/api/images", b"x" * 65)
        assert status == 413
    finally:
        server.shutdown()
        server.server_close()


def test_a_json_body_over_one_mebibyte_is_413(address: str, uploaded: dict) -> None:
    body = b'{"points": [[1, 1, 1]], "pad": "' + b"x" * (1 << 20) + b'"}'
    status, payload, _ = call(address, "POST", f"/api/images/{uploaded['image_id']}/predict", body)
    assert status == 413 and "exceeds" in payload["error"]


def test_head_answers_headers_only_and_keeps_the_connection(address: str) -> None:
    _, info, get_headers = call(address, "GET", "/api/info")
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("HEAD", "/api/info")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b""
        assert response.getheader("Content-Length") == get_headers["Content-Length"]
        connection.request("GET", "/api/info")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read()) == info
    finally:
        connection.close()
    # on the wire: the headers and nothing after them (http.client drops stray bytes, a proxy would not)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"HEAD /api/info HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"\r\n\r\n"), received[-80:]


def test_put_is_not_allowed(address: str) -> None:
    status, payload, _ = call(address, "PUT", "/api/images", png(np.zeros((8, 8, 3), np.uint8)))
    assert status == 405 and "not allowed" in payload["error"]


def test_a_post_from_another_port_is_another_site(address: str) -> None:
    host, port = address.split(":")
    other = f"http://{host}:{int(port) + 1 if int(port) < 65535 else 1}"
    status, payload, _ = call(address, "POST", "/api/examples/nope", None, {"Origin": other})
    assert status == 403 and "other sites" in payload["error"]


def test_a_server_on_all_interfaces_answers_any_host_name(model) -> None:
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    server = create_server(MattingApp(store=store, model_name="tiny"), host="0.0.0.0", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        status, _, _ = call(f"127.0.0.1:{port}", "GET", "/api/info", None, {"Host": f"myhost.lan:{port}"})
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_an_ipv6_loopback_server_answers_at_its_address(model) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6")
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model))
    server = create_server(MattingApp(store=store, model_name="tiny"), host="::1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        connection = http.client.HTTPConnection("::1", port, timeout=10)
        connection.request("GET", "/api/info")  # Host: [::1]:port
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        server.shutdown()
        server.server_close()


def test_download_defaults_to_the_alpha(address: str, uploaded: dict) -> None:
    prompt = quote(json.dumps({"box": [10, 10, 60, 60]}))
    status, body, headers = call(
        address, "GET", f"/api/images/{uploaded['image_id']}/download?prompt={prompt}"
    )
    assert status == 200 and Image.open(io.BytesIO(body)).mode == "L"
    assert headers["Content-Disposition"].endswith('_alpha.png"')


def test_an_uploaded_file_name_keeps_only_its_last_part(address: str) -> None:
    status, body, _ = call(
        address,
        "POST",
        "/api/images",
        png(np.full((8, 8, 3), 5, np.uint8)),
        {"X-Filename": "..%2Fdir%2Fevil.png"},
    )
    assert status == 200 and body["name"] == "evil.png"


def test_responses_forbid_content_sniffing(address: str) -> None:
    for path in ("/api/info", "/nope"):
        _, _, headers = call(address, "GET", path)
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_an_example_without_jpg_is_not_a_page(address: str) -> None:
    status, payload, _ = call(address, "GET", "/api/examples/astronaut")
    assert status == 404


def test_an_oversized_upload_still_gets_its_413(address: str) -> None:  # the refused body is read
    status, payload, headers = call(address, "POST", "/api/images", b"x" * (8 * MAX_UPLOAD))
    assert status == 413 and "exceeds" in payload["error"] and headers["Connection"] == "close"


# the two defects round 10 found: a huge JSON integer (OverflowError, a 500) and a loose Content-Length


@pytest.mark.parametrize("payload", [{"points": [[10**400, 5, 1]]}, {"box": [0, 0, 10**400, 5]}])
def test_a_huge_integer_is_a_400_not_an_overflow(payload: dict) -> None:
    with pytest.raises(RequestError) as error:
        parse_prompt(payload, width=100, height=50, max_points=8)
    assert error.value.status == 400


def test_a_huge_integer_prompt_over_http_is_a_400(address: str, uploaded: dict) -> None:
    body = b'{"points": [[' + b"9" * 400 + b", 5, 1]]}"
    status, payload, _ = call(address, "POST", f"/api/images/{uploaded['image_id']}/predict", body)
    assert status == 400, payload


def test_content_length_must_be_digits(address: str) -> None:
    status, payload = raw(address, "POST", "/api/images", {"Content-Length": "1_0"}, b"0123456789")
    assert status == 400 and "Content-Length" in payload["error"]


def test_a_content_length_beside_transfer_encoding_is_refused(address: str) -> None:
    # the two could disagree (request smuggling behind a proxy): only a Content-Length alone is read
    headers = {"Content-Length": "10", "Transfer-Encoding": "chunked"}
    status, payload = raw(address, "POST", "/api/images", headers, b"0123456789")
    assert status == 411 and "chunked" in payload["error"]
