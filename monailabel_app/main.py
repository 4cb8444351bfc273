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
from typing import Dict, Optional
from urllib.parse import parse_qs

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from starlette.requests import Request
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
        guard_infer_requests()

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


#: Largest request body read by :class:`InferRequestCheck` (a prompt and options; images come from the datastore).
MAX_INFER_BODY = 1 << 20


def _infer_request_problem(query: Dict[str, list], form) -> Optional[str]:
    """What is wrong with an infer request's image id and ``params``, or None."""
    if not (query.get("image") or query.get("session_id")):
        return "Pass the image id of a study: POST /infer/<model>?image=<id> (see GET /datastore/)."
    params = form.get("params")
    if params is None or params == "":
        return None
    if not isinstance(params, str):
        return "'params' must be a form field holding a JSON object, not a file."
    try:
        value = json.loads(params)
    except json.JSONDecodeError as err:
        value, detail = None, f" ({err})"
    else:
        detail = ""
    if not isinstance(value, dict):
        return f'\'params\' must be a JSON object such as {{"prompt": "the largest lesion"}}{detail}.'
    return None


class InferRequestCheck:
    """ASGI wrapper around the server: answers 422 for ``POST /infer/...`` requests MONAI Label would fail on with
    a 500 (``params`` that are not a JSON object, no image id), before MONAI Label reads them.

    The body (at most :data:`MAX_INFER_BODY` bytes) is read once, checked, and replayed to the server unchanged.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or not scope.get("path", "").startswith("/infer/")
        ):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_INFER_BODY:
                detail = "The request is too large: send the prompt in 'params' and the image as a datastore id."
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            form = await Request(scope, replay).form()
        except Exception as err:  # a body that is not a form
            problem = f"The request body is not a form ({type(err).__name__}); send 'params' as a form field."
        else:
            problem = _infer_request_problem(query, form)
        if problem is not None:
            await JSONResponse({"detail": problem}, status_code=422)(scope, receive, send)
            return
        replayed = False
        await self.app(scope, replay, send)


def guard_infer_requests() -> None:
    """Put :class:`InferRequestCheck` in front of the running server (once)."""
    try:
        from monailabel.app import app as server
    except ImportError:  # pragma: no cover - the app is used without MONAI Label's server
        return
    if server.middleware_stack is None:
        server.middleware_stack = server.build_middleware_stack()
    if not isinstance(server.middleware_stack, InferRequestCheck):
        server.middleware_stack = InferRequestCheck(server.middleware_stack)
