"""`zim-lightning serve`: interactive matting in the browser over a small JSON API.

A person uploads or picks a picture, clicks positive and negative points or drags a box, and sees the
matte at once: the image is encoded once (on upload) and each prompt runs only ZIM's light decoder (paper,
Sec. 3). The page is plain HTML and JavaScript (``static/``) served by the standard library's
``ThreadingHTTPServer``, so the server needs no web framework.

API (JSON unless stated; errors are ``{"error": message}`` with status 400, 403, 404, 405, 411, 413 or 500;
403 for a request naming another host on a loopback server, or a POST from another site's page):

- ``GET /api/info``: model name, bundled example names, limits.
- ``POST /api/images``: body = the raw bytes of an image file (``X-Filename`` header optional); answers
  ``{image_id, name, width, height, encode_ms}``.
- ``POST /api/examples/<name>``: the same for a bundled photograph; ``GET /api/examples/<name>.jpg``
  shows its thumbnail.
- ``GET /api/images/<id>/image``: the image as JPEG.
- ``POST /api/images/<id>/predict``: body ``{"points": [[x, y, label], ...], "box": [x1, y1, x2, y2]}``,
  (X, Y) in original image pixels, label 1 positive / 0 negative; answers ``{alpha: PNG data URL of the
  8-bit alpha at the image's size, iou, decode_ms, alpha_mean}``.
- ``GET /api/images/<id>/download?kind=alpha|cutout&prompt=<JSON>``: the alpha PNG or the RGBA cut-out
  for that prompt, as an attachment.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import PurePath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image

from zim_lightning.serve.store import ImageEntry, ImageStore, Prediction, RequestError

logger = logging.getLogger(__name__)

#: Bundled example photographs: name -> scikit-image loader (all ship inside scikit-image).
EXAMPLES: dict[str, str] = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
}

#: Static files of the page: request path -> (file in ``static/``, content type).
STATIC_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}

#: The largest JSON body accepted (a prompt is a few hundred bytes).
MAX_JSON_BYTES = 1 << 20
#: Refused bodies up to this size are read and dropped so the client sees the error (see ``_discard``).
MAX_DISCARD_BYTES = 256 << 20
THUMBNAIL_SIDE = 160
CONNECTION_TIMEOUT_S = 120
#: Host names a server bound to a loopback address answers to (any other is a DNS-rebinding page's).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def load_example(name: str) -> np.ndarray:
    """A bundled photograph as HxWx3 uint8 RGB.

    Raises:
        RequestError: 404 if ``name`` is not one of :data:`EXAMPLES`.
    """
    if name not in EXAMPLES:
        raise RequestError(404, f"example {name!r}: unknown; expected one of {', '.join(EXAMPLES)}")
    from skimage import data

    image = np.asarray(getattr(data, EXAMPLES[name])())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 HxW (grey) or HxWx4 (RGBA) array as PNG."""
    buffer = io.BytesIO()
    # compress_level 1: the matte goes back on every click; speed matters more than bytes on loopback.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class MattingApp:
    """The server's state: the image store, the model's name, the request limits and the page.

    Args:
        store: encoded images and the lock around the network.
        model_name: shown on the page.
        max_upload_bytes: the largest upload accepted.
    """

    def __init__(self, *, store: ImageStore, model_name: str, max_upload_bytes: int = 20 << 20) -> None:
        self.store = store
        self.model_name = model_name
        self.max_upload_bytes = max_upload_bytes
        self._thumbnails: dict[str, bytes] = {}
        self._thumbnails_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "examples": list(EXAMPLES),
            "max_upload_bytes": self.max_upload_bytes,
            "max_side": self.store.max_side,
            "max_points": self.store.max_points,
        }

    def thumbnail(self, name: str) -> bytes:
        with self._thumbnails_lock:
            if name not in self._thumbnails:
                picture = Image.fromarray(load_example(name))
                picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buffer = io.BytesIO()
                picture.save(buffer, format="JPEG", quality=85)
                self._thumbnails[name] = buffer.getvalue()
            return self._thumbnails[name]

    def add_example(self, name: str) -> ImageEntry:
        return self.store.add_array(load_example(name), name=name, image_id=f"example-{name}")

    def predict(self, entry: ImageEntry, payload: Any) -> tuple[Prediction, dict[str, Any]]:
        prediction = self.store.predict(entry, self.store.parse(entry, payload))
        body = {
            "image_id": entry.image_id,
            "alpha": "data:image/png;base64," + base64.b64encode(png_bytes(prediction.alpha)).decode("ascii"),
            "iou": round(prediction.iou, 4),
            "decode_ms": round(prediction.decode_ms, 1),
            "alpha_mean": round(prediction.alpha_mean, 6),
            "width": entry.width,
            "height": entry.height,
        }
        return prediction, body

    def download(self, entry: ImageEntry, kind: str, prompt_text: str) -> tuple[bytes, str]:
        """The alpha PNG or the RGBA cut-out for a prompt, and its file name."""
        if kind not in ("alpha", "cutout"):
            raise RequestError(400, f"kind: expected 'alpha' or 'cutout', got {kind!r}")
        try:
            payload = json.loads(prompt_text)
        except json.JSONDecodeError as error:
            raise RequestError(400, f"prompt: not valid JSON ({error.msg})") from None
        alpha = self.store.predict(entry, self.store.parse(entry, payload)).alpha
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePath(entry.name).stem) or "image"
        if kind == "alpha":
            return png_bytes(alpha), f"{stem}_alpha.png"
        return png_bytes(np.dstack([entry.image, alpha])), f"{stem}_cutout.png"


_IMAGE_ROUTE = re.compile(r"^/api/images/([A-Za-z0-9_-]{1,64})/(image|predict|download)$")
_EXAMPLE_ROUTE = re.compile(r"^/api/examples/([a-z0-9_-]{1,32})(\.jpg)?$")


class MattingRequestHandler(BaseHTTPRequestHandler):
    """The JSON API and the page of the :class:`MattingApp` its server carries (``server.app``)."""

    server_version = "zim-lightning"
    protocol_version = "HTTP/1.1"
    # Seconds a connection may stay silent (idle keep-alive, or a stalled upload) before it is closed.
    timeout = CONNECTION_TIMEOUT_S
    _body_read = False  # whether this request's body has been read (set per request)

    @property
    def app(self) -> MattingApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    # --- responses -------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None):
        # A body left unread (a request refused before its body was needed, or a GET with a body)
        # would be read as the next request on this connection: close it instead, and say so.
        declared = self.headers.get("Content-Length", "0").strip() not in ("", "0")
        if not self._body_read and (declared or self.headers.get("Transfer-Encoding")):
            self.close_connection = True
        self.send_response(status)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # --- request bodies --------------------------------------------------------------------
    def _body(self, limit: int) -> bytes:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):  # with a Content-Length too, the two could disagree
            raise RequestError(411, "chunked uploads are not supported; send a Content-Length alone")
        if length_text is None:
            raise RequestError(411, "missing Content-Length header")
        # digits only: int() also takes "1_0", "+5" and spaces, which a proxy in front may read otherwise
        if re.fullmatch(r"-?[0-9]+", length_text.strip()) is None:
            raise RequestError(400, f"Content-Length: not an integer ({length_text!r})")
        length = int(length_text)
        if length < 0:
            raise RequestError(400, f"Content-Length: negative ({length})")
        if length > limit:
            self._discard(length)
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
        self._body_read = True
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        # Reading a refused body lets the client, still sending, receive the error; bodies too big
        # to read through are left unread and the connection is closed instead.
        self.close_connection = True
        if length > MAX_DISCARD_BYTES:
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return
            length -= len(chunk)

    def _json_body(self) -> Any:
        data = self._body(MAX_JSON_BYTES)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"request body: not valid JSON ({error})") from None

    # --- dispatch --------------------------------------------------------------------------
    def _check_origin(self) -> None:
        # A web page the person visits can send requests here too: one that renamed itself to a
        # loopback address (DNS rebinding) still sends its own Host, and a cross-site POST carries
        # the page's Origin. Refuse both; the app's own page sends neither.
        host = self.headers.get("Host", "")
        if _is_loopback(self.server.server_address[0]):
            name = urlsplit(f"//{host}").hostname or ""
            if name not in LOOPBACK_HOSTS:
                self.close_connection = True
                raise RequestError(403, f"Host {host!r}: this server answers only at localhost or 127.0.0.1")
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and urlsplit(origin).netloc != host:
            self.close_connection = True
            raise RequestError(403, f"Origin {origin!r}: requests from other sites are refused")

    def _dispatch(self, handler: Callable[[], None]) -> None:
        self._body_read = False
        try:
            self._check_origin()
            handler()
        except RequestError as error:
            self._error(error.status, error.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 (one bad request must never stop the server)
            logger.exception("internal error on %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._error(500, f"internal error: {type(error).__name__}: {error}")
            except OSError:
                logger.debug("could not send the error response to %s", self.address_string())

    def do_GET(self) -> None:  # noqa: N802 (the base class's naming)
        self._dispatch(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch(self._not_allowed)

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch(self._not_allowed)

    def _not_allowed(self) -> None:
        self.close_connection = True
        raise RequestError(405, f"method {self.command} not allowed")

    def _get(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            body = resources.files("zim_lightning.serve").joinpath("static", name).read_bytes()
            self._send(200, body, content_type)
            return
        if path == "/api/info":
            self._json(200, self.app.info())
            return
        match = _EXAMPLE_ROUTE.match(path)
        if match and match.group(2):
            self._send(200, self.app.thumbnail(match.group(1)), "image/jpeg")
            return
        match = _IMAGE_ROUTE.match(path)
        if match and match.group(2) == "image":
            self._send(200, self.app.store.get(match.group(1)).jpeg, "image/jpeg")
            return
        if match and match.group(2) == "download":
            entry = self.app.store.get(match.group(1))
            query = parse_qs(url.query)
            kind = query.get("kind", ["alpha"])[0]
            prompt = query.get("prompt", [""])[0]
            body, filename = self.app.download(entry, kind, prompt)
            self._send(200, body, "image/png", {"Content-Disposition": f'attachment; filename="{filename}"'})
            return
        raise RequestError(404, f"no such page: {path}")

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/images":
            data = self._body(self.app.max_upload_bytes)
            # The page sends the file name percent-encoded: header values must be Latin-1.
            name = PurePath(unquote(self.headers.get("X-Filename", "") or "upload")).name[:128] or "upload"
            entry = self.app.store.add(data, name=name)
            self._json(200, entry.describe())
            return
        match = _EXAMPLE_ROUTE.match(path)
        if match and not match.group(2):
            self._json(200, self.app.add_example(match.group(1)).describe())
            return
        match = _IMAGE_ROUTE.match(path)
        if match and match.group(2) == "predict":
            entry = self.app.store.get(match.group(1))
            _, body = self.app.predict(entry, self._json_body())
            self._json(200, body)
            return
        self.close_connection = True
        raise RequestError(404, f"no such endpoint: POST {path}")


class MattingHTTPServer(ThreadingHTTPServer):
    """One thread per connection, serving ``app``; errors outside a request's handler are logged, never
    raised."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: MattingApp) -> None:
        self.app = app
        super().__init__(address, MattingRequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            # A browser closing a kept-alive connection between requests is routine.
            logger.debug("connection from %s closed: %s", client_address, error)
        else:
            logger.exception("error on the connection from %s", client_address)


class MattingHTTPServer6(MattingHTTPServer):
    """:class:`MattingHTTPServer` on an IPv6 address."""

    address_family = socket.AF_INET6


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def create_server(app: MattingApp, *, host: str = "127.0.0.1", port: int = 7860) -> MattingHTTPServer:
    """A threading HTTP server for ``app``, bound but not yet serving (port 0 picks a free port; an
    IPv6 ``host`` such as ``::1`` binds an IPv6 socket)."""
    server_class = MattingHTTPServer6 if ":" in host else MattingHTTPServer
    return server_class((host, port), app)


def build_app(
    model: Any,
    *,
    model_name: str,
    device: str | None = None,
    max_images: int = 8,
    max_upload_bytes: int = 20 << 20,
    max_side: int = 8192,
    precision: str = "fp32",
    multimask: bool = False,
) -> MattingApp:
    """Wrap a built ZIM network in an app (moved to ``device``, cuda when available, in eval mode;
    ``precision`` as :class:`~zim_lightning.predictor.ZimPredictor`'s, ``multimask`` as
    :class:`~zim_lightning.serve.store.ImageStore`'s)."""
    import torch

    from zim_lightning.predictor import ZimPredictor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    store = ImageStore(
        predictor_factory=lambda: ZimPredictor(model, precision=precision),
        max_images=max_images,
        max_side=max_side,
        multimask=multimask,
    )
    return MattingApp(store=store, model_name=model_name, max_upload_bytes=max_upload_bytes)


def main(argv: list[str] | None = None) -> int:
    from zim_lightning.command_checks import device_for_command
    from zim_lightning.model_options import (
        add_precision_argument,
        add_zim_arguments,
        describe_model,
        zim_for_command,
    )

    parser = argparse.ArgumentParser(
        prog="zim-lightning serve", description="Interactive matting in the browser (local web page)."
    )
    add_zim_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--max-images", type=int, default=8, help="encoded images kept in memory")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted")
    parser.add_argument("--max-side", type=int, default=8192, help="largest image side accepted, pixels")
    add_precision_argument(parser)
    parser.add_argument(
        "--multimask",
        action="store_true",
        help="a lone click keeps the best of four mattes by the IoU head, as SAM's demos (only for models "
        "trained with --model.init_args.multimask=true --model.init_args.iou_weight=1; the paper's loss "
        "trains the first matte alone)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: expected 0 to 65535, got {args.port}")
    if args.max_images < 1:
        parser.error(f"--max-images: expected at least 1, got {args.max_images}")
    if not 0 < args.max_upload_mb < float("inf"):
        parser.error(f"--max-upload-mb: expected a positive size, got {args.max_upload_mb}")
    if args.max_side < 1:
        parser.error(f"--max-side: expected at least 1 pixel, got {args.max_side}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = device_for_command(parser, args.device)
    app = build_app(
        zim_for_command(parser, args),
        model_name=describe_model(args),
        device=device,
        max_images=args.max_images,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_side=args.max_side,
        precision=args.precision,
        multimask=args.multimask,
    )
    try:
        server = create_server(app, host=args.host, port=args.port)
    except OSError as error:  # the port is taken, the address is not this machine's or does not resolve
        parser.error(f"--host {args.host} --port {args.port}: cannot listen there ({error})")
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"zim-lightning serve: model {describe_model(args)} at http://{shown}:{port}/ (Ctrl+C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
