"""The matting page in a real headless browser (Debian's chromium driven by Playwright).

Needs /usr/bin/chromium and the `playwright` Python package (`.ci/install-browser` installs both; no
browser download). Set ZIM_SERVE_SCREENSHOT=docs/images/serve.png to save the page for the README.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from zim_lightning.models.build import zim_model_registry
from zim_lightning.predictor import ZimPredictor
from zim_lightning.serve import ImageStore, MattingApp, create_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Colours of the README screenshot are reduced to this many to keep the file small.
SCREENSHOT_COLOURS = 128

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (run .ci/install-browser)"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs the playwright Python package (run .ci/install-browser)"
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    torch.manual_seed(0)
    model = zim_model_registry["tiny"]().eval()
    store = ImageStore(predictor_factory=lambda: ZimPredictor(model), max_images=2)
    server = create_server(MattingApp(store=store, model_name="tiny"), host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 680}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(base_url)
        page.errors = errors
        yield page
        browser.close()


def wait_for_matte(page, after_seq: int) -> dict:
    """Wait until the page has applied the answer to a prompt change made after ``after_seq``."""
    page.wait_for_function(
        "seq => window.zim.seq > seq && window.zim.completed === window.zim.seq", arg=after_seq
    )
    return page.evaluate("window.zim.lastResult")


def seq(page) -> int:
    return page.evaluate("window.zim.seq")


def test_click_box_undo_download(page, tmp_path: Path) -> None:
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    page.wait_for_selector(".examples img >> nth=3")  # the example thumbnails loaded from /api/info
    assert page.text_content("#model-name") == "model: tiny"

    page.set_input_files("#file-input", str(photo))
    page.wait_for_function("window.zim.imageId !== null && window.zim.width === 512")
    view = page.locator("#view").bounding_box()
    scale = view["width"] / 512

    def at(x: float, y: float) -> tuple[float, float]:
        return view["x"] + x * scale, view["y"] + y * scale

    before = seq(page)
    page.mouse.click(*at(250, 180))
    clicked = wait_for_matte(page, before)
    assert clicked["width"] == 512 and clicked["height"] == 512
    assert clicked["pageAlphaMean"] > 0.0  # the matte the page decoded is not empty
    assert abs(clicked["pageAlphaMean"] - clicked["alpha_mean"]) < 0.01
    points = page.evaluate("window.zim.points")
    assert (
        len(points) == 1 and points[0][2] == 1 and abs(points[0][0] - 250) < 2 and abs(points[0][1] - 180) < 2
    )

    before = seq(page)
    page.mouse.click(*at(60, 470), button="right")
    negative = wait_for_matte(page, before)
    assert [p[2] for p in page.evaluate("window.zim.points")] == [1, 0]
    assert negative["alpha"] != clicked["alpha"]

    before = seq(page)
    page.mouse.move(*at(120, 60))
    page.mouse.down()
    page.mouse.move(*at(300, 250), steps=6)
    page.mouse.move(*at(400, 500), steps=6)
    page.mouse.up()
    boxed = wait_for_matte(page, before)
    box = page.evaluate("window.zim.box")
    assert box is not None and abs(box[0] - 120) < 2 and abs(box[3] - 500) < 2
    assert boxed["alpha"] != negative["alpha"]  # the box changes the matte

    if os.environ.get("ZIM_SERVE_SCREENSHOT"):
        shot = Image.open(io.BytesIO(page.screenshot()))
        # Octree quantisation keeps small saturated marks (the points) that median cut merges away.
        small = shot.convert("RGB").quantize(SCREENSHOT_COLOURS, method=Image.Quantize.FASTOCTREE)
        small.save(os.environ["ZIM_SERVE_SCREENSHOT"], optimize=True)

    with page.expect_download() as download_info:
        page.click("#download-alpha")
    download = download_info.value
    assert download.suggested_filename == "astronaut_alpha.png"
    alpha = Image.open(download.path())
    assert alpha.mode == "L" and alpha.size == (512, 512)
    alpha_mean = np.asarray(alpha, dtype=np.float64).mean() / 255
    assert abs(alpha_mean - boxed["alpha_mean"]) < 0.01  # the download is the matte on screen

    cutout = page.request.get(page.evaluate("document.getElementById('download-cutout').href"))
    assert cutout.ok
    rgba = np.asarray(Image.open(io.BytesIO(cutout.body())))
    assert rgba.shape == (512, 512, 4) and np.array_equal(rgba[..., 3], np.asarray(alpha))

    before = seq(page)
    page.click("#undo")
    undone = wait_for_matte(page, before)
    assert page.evaluate("window.zim.box") is None
    assert undone["alpha"] == negative["alpha"]  # undo restores the previous prompts' matte

    before = seq(page)
    page.click("#reset")
    page.wait_for_function("s => window.zim.completed > s", arg=before)
    assert page.evaluate("window.zim.points") == [] and page.evaluate("window.zim.lastResult") is None
    assert page.errors == []


def test_example_and_error_message(page) -> None:
    page.click(".examples img[data-name='cat']")
    page.wait_for_function("window.zim.name === 'cat'")
    assert page.evaluate("[window.zim.width, window.zim.height]") == [451, 300]

    # A file that is not an image: the server answers 400 and the page says why, and keeps working.
    page.set_input_files(
        "#file-input", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}]
    )
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "not an image" in page.text_content("#status")
    before = seq(page)
    view = page.locator("#view").bounding_box()
    page.mouse.click(view["x"] + view["width"] / 2, view["y"] + view["height"] / 2)
    assert wait_for_matte(page, before)["width"] == 451
    assert page.errors == []
