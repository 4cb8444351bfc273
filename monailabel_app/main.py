"""MONAI Label app that serves this repository's LSMS bundle (referring lesion segmentation with a free-text prompt).

Start it from anywhere (see README.md beside this file)::

    monailabel start_server --app monailabel_app --studies /path/to/studies --conf models lsms

``--conf`` options:

- ``models``: ``lsms`` (the default, and the only model; ``all`` means the same).
- ``bundle_path``: the bundle folder; default: the ``bundle/`` folder of this repository. The bundle is used from
  disk as it is: nothing is downloaded from the model zoo.
- ``config_file``: the inference config in ``<bundle_path>/configs``; default ``inference.json``.
"""

import json
import logging
import os
import traceback
from typing import Dict
from urllib.parse import parse_qs

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from starlette.responses import JSONResponse

from lib.infer import LSMSReferringInfer

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.realpath(__file__))
#: The bundle of this repository (``<repo>/bundle``); its Python components are ``<repo>/custom``.
DEFAULT_BUNDLE_PATH = os.path.join(os.path.dirname(APP_DIR), "bundle")
MODEL_NAME = "lsms"


class MyApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        conf = dict(conf or {})
        self.bundle_path = os.path.realpath(os.path.expanduser(conf.get("bundle_path", DEFAULT_BUNDLE_PATH)))
        self.config_file = conf.get("config_file", "inference.json")

        models = [m.strip() for m in conf.get("models", MODEL_NAME).split(",") if m.strip()]
        unknown = [m for m in models if m not in (MODEL_NAME, "all")]
        if unknown:
            raise ValueError(f"Unknown model(s) {unknown}; this app serves only '{MODEL_NAME}' (--conf models lsms).")
        if not os.path.isdir(self.bundle_path):
            raise FileNotFoundError(f"Bundle folder not found: {self.bundle_path} (set it with --conf bundle_path).")
        guard_infer_route()

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LSMS referring lesion segmentation",
            description="Type a sentence; get the 3D mask and the measurements of the lesion(s) it refers to.",
            version="1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = LSMSReferringInfer(self.bundle_path, config_file=self.config_file, conf=self.conf)
        logger.info(f"+++ Adding Inferer:: {MODEL_NAME} => bundle {self.bundle_path} (valid: {task.is_valid()})")
        return {MODEL_NAME: task}

    def infer(self, request, datastore=None):
        """Check the model and the image before MONAI Label runs the request.

        Only images of the studies datastore are read: an image id, never a server path (MONAI Label would read
        any existing path, or an uploaded file). Unknown models and images are 404s with a clear detail.
        """
        request = dict(request)
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"Unknown model '{model}'; this server serves '{MODEL_NAME}'.")
        image_id = request.get("image")
        store = datastore or self.datastore()
        if not isinstance(image_id, str) or image_id not in set(store.list_images()):
            raise HTTPException(
                status_code=404,
                detail=f"Image '{image_id}' is not in this server's studies datastore; pass the id of a study "
                "listed by GET /datastore/ (server paths and uploaded files are not read).",
            )
        request["image_id"] = image_id  # MONAI Label replaces "image" by the file path
        return super().infer(request, store)


def _refuse_malformed_params(route_app):
    """Wrap the ASGI app of ``POST /infer/{model}``: answer 422 for ``params`` that are not a JSON object.

    MONAI Label parses ``params`` with ``json.loads`` inside the route, so a malformed value would be a 500; a
    request without an image id is answered 422 here too (MONAI Label would say 500).
    """

    async def app(scope, receive, send):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope.get("type") == "http" and not (query.get("image") or query.get("session_id")):
            detail = "Pass the image id of a study: POST /infer/<model>?image=<id> (see GET /datastore/)."
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)
            return
        try:
            await route_app(scope, receive, send)
        except (TypeError, ValueError) as err:
            if not _raised_reading_params(err):
                raise
            detail = f"'params' must be a JSON object such as {{\"prompt\": \"the largest lesion\"}} ({err})."
            await JSONResponse({"detail": detail}, status_code=422)(scope, receive, send)

    return app


def _raised_reading_params(err: BaseException) -> bool:
    """Whether ``err`` came from MONAI Label's route reading ``params`` (``json.loads``, ``request.update``)."""
    frames = traceback.extract_tb(err.__traceback__)
    names = [frame.name for frame in frames]
    if "run_inference" not in names:
        return False
    after = frames[len(names) - 1 - names[::-1].index("run_inference") + 1 :]
    return all(f"{os.sep}json{os.sep}" in frame.filename for frame in after)


def guard_infer_route() -> None:
    """Install :func:`_refuse_malformed_params` on the running server's infer route (once)."""
    try:
        from monailabel.app import app as server
    except ImportError:  # pragma: no cover - the app is used without MONAI Label's server
        return
    for route in server.router.routes:
        if getattr(route, "path", None) == "/infer/{model}" and not getattr(route.app, "_lsms_guarded", False):
            route.app = _refuse_malformed_params(route.app)
            route.app._lsms_guarded = True
