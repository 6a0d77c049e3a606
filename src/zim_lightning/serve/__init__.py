"""Interactive matting in the browser (`zim-lightning serve`).

``server`` holds the HTTP layer and the command, ``store`` the encoded images and prompt checks, and
``static/`` the page (plain HTML, CSS and JavaScript).
"""

from zim_lightning.serve.server import MattingApp, build_app, create_server, main
from zim_lightning.serve.store import ImageStore, RequestError

__all__ = ["ImageStore", "MattingApp", "RequestError", "build_app", "create_server", "main"]
