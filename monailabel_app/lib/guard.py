"""The app's gate in front of MONAI Label's server: what a client may ask, answered before MONAI Label reads it.

MONAI Label's server offers every feature of every app (training, sessions, uploads, model files, logs, OHIF, ...)
and answers 500 for most of those this app does not implement. :class:`RequestGuard` wraps the whole server
(``guard_requests``) and, for each HTTP request:

1. refuses (403) requests from other machines, with a ``Host`` header that is not a loopback name (DNS
   rebinding) or from web pages of other sites (``Origin``), unless ``--conf allow_remote true``;
2. refuses (404, or 405 for another method) every endpoint the app does not offer, with a detail saying why;
3. refuses (403) datastore writes and deletes unless ``--conf datastore_writes true``, and then ids and tags that
   are not plain names (422); refuses (403) ``GET /logs/`` unless ``--conf logs true``; offers training
   (``POST /train/lsms``, ``GET``/``DELETE /train/``) only with ``--conf training true`` (404 otherwise);
4. reads an inference request's query and body (at most :data:`MAX_INFER_BODY` bytes) and refuses (4xx) those
   whose options MONAI Label would ignore or fail on (a body that is not a form, a malformed form, unknown
   fields, ``params`` that are not a JSON object, uploads, sessions), so that a client's prompt is never lost
   silently; reads a training request's query and JSON body the same way and refuses (4xx) unknown options and
   values out of range (``lib/train.py``) before a training process starts. The body is replayed to the server
   unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse

from lib.datastore import WRITES_OFF, name_problem
from lib.network import is_loopback
from lib.options import AppOptions
from lib.train import train_options_problem

#: Largest inference request body read (a prompt and options; images come from the datastore).
MAX_INFER_BODY = 1 << 20

OPEN, INFER, WRITE, LOGS, TRAIN = "open", "infer", "write", "logs", "train"

#: What the app offers: (methods, path below MONAI Label's API prefix, kind). GET also allows HEAD.
API_ROUTES = (
    ("GET", r"/info/?", OPEN),
    ("GET POST", r"/auth(/|/token|/token/valid)?", OPEN),  # MONAI Label's login, there with MONAI_LABEL_AUTH_ENABLE
    ("POST", r"/infer/(?!wsi/|wsi_v2/)[^/]+", INFER),
    ("POST", r"/activelearning/[^/]+", OPEN),
    ("GET", r"/datastore/?", OPEN),
    ("GET", r"/datastore/(image|label)(/info)?", OPEN),
    ("PUT DELETE", r"/datastore/?", WRITE),
    ("PUT DELETE", r"/datastore/(image|label)", WRITE),
    ("PUT", r"/datastore/(image|label)/info", WRITE),
    ("PUT", r"/datastore/updatelabelinfo", WRITE),
    ("GET", r"/logs/?", LOGS),
    ("POST", r"/train/lsms", TRAIN),  # with --conf training true only
    ("GET DELETE", r"/train/?", TRAIN),  # the status and the stop of the training run
)
#: The API's own pages (not below the API prefix): Swagger UI, ReDoc, the OpenAPI schema, the icon.
PAGE_ROUTES = (("GET", r"/|/docs|/openapi\.json|/favicon\.ico", OPEN),)

#: Why MONAI Label features are not offered: (path below the API prefix, detail).
NOT_OFFERED = (
    (r"/train(/.*)?", "Training is not offered by this server. Start it with --conf training true --conf "
     "datastore_writes true to fine-tune on the submitted labels (POST /train/lsms), or train with the bundle "
     "(see monailabel_app/README.md, 'Training on submitted labels')."),
    (r"/batch(/.*)?", "Batch inference is not offered by this app. Send one POST /infer/lsms?image=<id> per study."),
    (r"/scoring(/.*)?", "Scoring is not offered by this app. Use GET /datastore/ to list the studies."),
    (r"/model(/.*)?", "Model files are neither served nor replaced over HTTP by this app. The bundle's weights "
     "are read from disk on the server (--conf bundle_path)."),
    (r"/session(/.*)?", "Sessions (uploaded images) are not offered by this app. Put the study in the studies "
     "folder on the server and pass its id: ?image=<id>."),
    (r"/(ohif|proxy)(/.*)?", "The OHIF viewer and its DICOMweb proxy are not offered by this app. Use 3D Slicer "
     "or the HTTP API (monailabel_app/README.md)."),
    (r"/infer/(wsi|wsi_v2)(/.*)?", "Whole-slide (pathology) inference is not offered by this app. Use POST "
     "/infer/lsms?image=<id>."),
    (r"/logs/gpu/?", "GPU information is not served by this app. Run nvidia-smi on the server."),
    (r"/datastore/dataset/?", "The dataset archive is not offered by this app: each download leaves a copy of "
     "every study in the server's temporary folder. Copy the studies folder on the server instead."),
)  # fmt: skip
OFFERED = (
    "It answers GET /info/, POST /infer/<model>?image=<id>, GET /datastore/ and POST /activelearning/<strategy> "
    "(see monailabel_app/README.md)."
)

#: The answer to ``/train/...`` paths other than the offered ones, with ``--conf training true``.
TRAIN_PATHS = (
    "This server trains the model 'lsms' only: POST /train/lsms starts a run, GET /train/ shows its status, "
    "DELETE /train/ stops it."
)

LOGS_OFF = (
    "The server log is not served: it holds every request, prompt and study id. Start the server with "
    "--conf logs true to serve it, or read monailabel_app/logs/app.log on the server."
)

#: Query parameters of an inference request, the outputs offered, and the body types that carry a form.
INFER_QUERY = {"image", "output"}
INFER_OUTPUTS = ("image", "json", "all")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
SEND_PARAMS = (
    "Send the options as JSON in the form field 'params', e.g. -F 'params={\"prompt\": \"the largest lesion\"}'."
)

#: Query parameters of a training request (``enqueue``: wait for the running one to end, instead of 429).
TRAIN_QUERY = {"enqueue"}
YES_NO = ("true", "false", "1", "0", "yes", "no", "on", "off")
SEND_OPTIONS = 'Send the options as a JSON object, e.g. -H "Content-Type: application/json" -d \'{"epochs": 5}\'.'

#: The checksum algorithms of ``HEAD /datastore/image?check_sum=<algorithm>:<hex>`` (MONAI Label's
#: ``file_checksum``; another one is a 500 there).
CHECKSUM_ALGORITHMS = ("SHA256", "SHA512", "MD5")

#: Query parameters that name a study, a label or a tag in a datastore write.
NAME_QUERY = {"image": "study id", "id": "study id", "label": "label id", "tag": "label tag"}


@dataclass(frozen=True)
class Route:
    """One row of :data:`API_ROUTES`, compiled: the methods allowed on the paths ``pattern`` matches."""

    methods: frozenset
    pattern: re.Pattern
    kind: str


def compile_routes(rows: Iterable[tuple], prefix: str = "") -> List[Route]:
    """:class:`Route` objects for ``(methods, path pattern, kind)`` rows, their paths below ``prefix``."""
    routes = []
    for methods, pattern, kind in rows:
        allowed = set(methods.split()) | ({"HEAD"} if "GET" in methods.split() else set())
        routes.append(Route(frozenset(allowed), re.compile(re.escape(prefix) + f"(?:{pattern})"), kind))
    return routes


class Refusal(Exception):
    """A request the guard answers itself: status, detail and extra headers."""

    def __init__(self, status: int, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers

    async def send(self, scope, receive, send) -> None:
        """Answer ``{"detail": ...}`` with the refusal's status."""
        await JSONResponse({"detail": self.detail}, status_code=self.status, headers=self.headers)(scope, receive, send)


# ---------------------------------------------------------------------------------------------- request parts
def _header(scope, name: bytes) -> Optional[str]:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _hostname(value: str) -> Optional[str]:
    """The host name of a ``Host`` header or an ``Origin`` (None when it has none or is malformed)."""
    try:
        return urlsplit(value if "//" in value else f"//{value}").hostname
    except ValueError:
        return None


def _path(scope) -> str:
    """The request path below uvicorn's ``--root_path``."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


def _names(names: List[str], most: int = 3) -> str:
    """Names for a message: quoted, each cut to 40 characters, at most ``most`` of them."""
    shown = [repr(name if len(name) <= 40 else name[:37] + "...") for name in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def _query(scope) -> Dict[str, List[str]]:
    """The query parameters, each with all its values (empty ones included)."""
    return parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


# ---------------------------------------------------------------------------------------------- checks
def remote_problem(scope) -> Optional[str]:
    """Why a request must be refused on a server for this machine only (another machine, site or name), or None."""
    client = scope.get("client")
    if client and not is_loopback(client[0]):
        return (
            f"Requests from other machines ({client[0]}) are refused: this server serves this machine only. Start "
            "it with --conf allow_remote true, behind authentication, to serve other machines (see "
            "monailabel_app/README.md)."
        )
    host = _header(scope, b"host")
    if host is not None and not is_loopback(_hostname(host)):
        return (
            f"The Host header {host!r} does not name this machine's loopback interface, as a web page of another site "
            "reaching the server through its own domain name would. Use http://127.0.0.1:<port>/."
        )
    origin = _header(scope, b"origin")
    if origin is not None and not is_loopback(_hostname(origin)):
        return (
            f"Requests from web pages of other sites are refused (Origin {origin!r}). Open the page from this server, "
            "or see 'Serving other machines' in monailabel_app/README.md."
        )
    return None


def write_query_problem(path: str, method: str, query: Dict[str, List[str]]) -> Optional[str]:
    """Why the ids and tags of an allowed datastore write are not plain names, or None."""
    if method == "PUT" and re.search(r"/datastore(/image)?/?$", path) and not query.get("image"):
        return (
            "Pass the study id: PUT /datastore/image?image=<id> (the id is never taken from the uploaded file's name)."
        )
    for key, what in NAME_QUERY.items():
        for value in query.get(key, []):
            problem = name_problem(value, what)
            if problem:
                return problem
    return None


def checksum_problem(query: Dict[str, List[str]]) -> Optional[str]:
    """Why a ``check_sum`` query parameter names an algorithm MONAI Label cannot compute, or None."""
    for value in query.get("check_sum", []):
        algorithm = value.split(":")[0] if ":" in value else "SHA256"
        if algorithm not in CHECKSUM_ALGORITHMS:
            return f"check_sum algorithm {algorithm!r} is not supported. Use SHA256:<hex>, SHA512:<hex> or MD5:<hex>."
    return None


def infer_query_problem(query: Dict[str, List[str]]) -> Optional[str]:
    """Why an inference request's query is refused (sessions, unknown parameters, no image, other outputs), or None."""
    if any(query.get("session_id", [])):
        return (
            "Sessions (uploaded images) are not offered by this app. Pass the study id: POST /infer/<model>?image=<id>."
        )
    unknown = sorted(set(query) - INFER_QUERY - {"session_id"})  # an empty session_id is no session
    if unknown:
        return (
            f"Unknown query parameter(s) {_names(unknown)}: MONAI Label would ignore them. Pass only "
            f"image=<id> and output=image, json or all. {SEND_PARAMS}"
        )
    images = query.get("image", [])
    if len(images) != 1 or not images[0]:
        return "Pass the image id of one study: POST /infer/<model>?image=<id> (see GET /datastore/)."
    outputs = query.get("output", [])
    if len(outputs) > 1 or any(output not in INFER_OUTPUTS for output in outputs):
        return (
            f"output={_names(outputs)} is not offered by this app. Use output=image, json or all (the default: both)."
        )
    return None


def params_problem(params) -> Optional[str]:
    """What is wrong with an inference request's ``params`` form field (a JSON object), or None."""
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


def form_problem(form) -> Optional[str]:
    """What is wrong with the form of an inference request (no field, other fields than ``params``), or None."""
    fields = [key for key, _ in form.multi_items()]
    if not fields:
        return f"The request body holds no form field (a malformed form?): its options would be lost. {SEND_PARAMS}"
    unknown = sorted(set(fields) - {"params"})
    if {"file", "label"} & set(unknown):
        return "Uploaded images and labels are not read by this app. Pass the id of a study: ?image=<id>."
    if unknown:
        return f"Unknown form field(s) {_names(unknown)}: MONAI Label would ignore them. {SEND_PARAMS}"
    if len(fields) > 1:
        return "Send the form field 'params' once."
    return params_problem(form.get("params"))


def train_query_problem(query: Dict[str, List[str]]) -> Optional[str]:
    """Why a training request's query is refused (a run in the server process, unknown parameters), or None."""
    if any(value.strip().lower() not in ("false", "0", "no", "off") for value in query.get("run_sync", [])):
        return (
            "run_sync is not offered: a run takes minutes and would hold the server until it ends. Send POST "
            "/train/lsms and follow the run with GET /train/."
        )
    unknown = sorted(set(query) - TRAIN_QUERY - {"run_sync"})
    if unknown:
        return f"Unknown query parameter(s) {_names(unknown)}. Pass only enqueue=true or false. {SEND_OPTIONS}"
    for value in query.get("enqueue", []):
        if value.strip().lower() not in YES_NO:
            return f"enqueue={_names([value])} is not a yes/no value. Pass enqueue=true or enqueue=false."
    return None


def train_body_problem(scope, body: bytes) -> Optional[Tuple[int, str]]:
    """(status, detail) when a training request's body is not a JSON object of known options in range, or None.

    An empty body (or ``null``) is accepted: the run takes the default options.
    """
    if not body.strip():
        return None
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        return 415, f"The request body is '{content_type}', not JSON: its options would be lost. {SEND_OPTIONS}"
    try:
        params = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        return 422, f"The request body is not JSON ({err}). {SEND_OPTIONS}"
    problem = train_options_problem(params)
    return (422, problem) if problem else None


async def infer_body_problem(scope, body: bytes) -> Optional[Tuple[int, str]]:
    """(status, detail) when an inference request's body is not a form holding only a JSON ``params``, or None.

    An empty body is accepted: the request has no options, and the bundle's default prompt is answered.
    """
    if not body:
        return None
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if content_type not in FORM_TYPES:
        kind = f"'{content_type}'" if content_type else "of no declared type"
        return 415, f"The request body is {kind}, not a form: its options would be lost. {SEND_PARAMS}"

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form()
    except Exception as err:  # python-multipart's errors for a malformed body
        reason = getattr(err, "detail", None) or f"{type(err).__name__}: {err}"
        return 422, f"The request body is not a readable form ({reason}). {SEND_PARAMS}"
    try:
        problem = form_problem(form)
    finally:
        await form.close()
    return (422, problem) if problem else None


# ---------------------------------------------------------------------------------------------- the guard
class RequestGuard:
    """ASGI wrapper around MONAI Label's server that refuses what the app does not offer or allow (module doc).

    Args:
        app: the server's ASGI application (its middleware stack).
        options: the app's ``--conf`` options (:class:`lib.options.AppOptions`).
        api_prefix: MONAI Label's ``MONAI_LABEL_API_STR``.
    """

    def __init__(self, app, options: AppOptions, api_prefix: str = ""):
        self.app = app
        self.options = options
        self.routes = compile_routes(API_ROUTES, api_prefix) + compile_routes(PAGE_ROUTES)
        self.not_offered = [(re.compile(re.escape(api_prefix) + p), d) for p, d in NOT_OFFERED]
        self.not_offered.append((re.compile(r"/reload/?"), "Reloading the app over HTTP is not offered. Restart it."))
        self.train_path = re.compile(re.escape(api_prefix) + r"/train(/.*)?")

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        try:
            kind = self.check(scope)
            if kind == INFER and scope.get("method") == "POST":
                receive = await self.check_infer(scope, receive)
            elif kind == TRAIN and scope.get("method") == "POST":
                receive = await self.check_train(scope, receive)
        except Refusal as refusal:
            await refusal.send(scope, receive, send)
            return
        if receive is not None:  # None: the client left while sending its request
            await self.app(scope, receive, send)

    def route_kind(self, method: str, path: str) -> str:
        """The kind of an offered request; :class:`Refusal` 404 (not offered) or 405 (other methods) otherwise."""
        matched = [route for route in self.routes if route.pattern.fullmatch(path) and self.offers(route.kind)]
        for route in matched:
            if method in route.methods or method == "OPTIONS":
                return route.kind
        if matched:
            allowed = sorted(set().union(*(route.methods for route in matched)) - {"HEAD"})
            detail = f"{method} is not allowed on {path}. Use {' or '.join(allowed)}."
            raise Refusal(405, detail, {"Allow": ", ".join(allowed)})
        reason = next((detail for pattern, detail in self.not_offered if pattern.fullmatch(path)), None)
        if self.options.training and self.train_path.fullmatch(path):
            reason = f"{method} {path} is not offered. {TRAIN_PATHS}"
        raise Refusal(404, reason or f"{method} {path} is not offered by this app. {OFFERED}")

    def offers(self, kind: str) -> bool:
        """Whether requests of ``kind`` are offered at all (training: with ``--conf training true`` only)."""
        return kind != TRAIN or self.options.training

    def check(self, scope) -> str:
        """The kind of a request that may go on (see :data:`API_ROUTES`); :class:`Refusal` otherwise."""
        if not self.options.allow_remote:
            problem = remote_problem(scope)
            if problem:
                raise Refusal(403, problem)
        method, path = scope.get("method", "GET"), _path(scope)
        kind = self.route_kind(method, path)
        if method == "OPTIONS":
            return kind
        if kind == WRITE:
            if not self.options.datastore_writes:
                raise Refusal(403, WRITES_OFF)
            problem = write_query_problem(path, method, _query(scope))
            if problem:
                raise Refusal(422, problem)
        if kind == LOGS and not self.options.logs:
            raise Refusal(403, LOGS_OFF)
        problem = checksum_problem(_query(scope))
        if problem:
            raise Refusal(422, problem)
        return kind

    async def check_infer(self, scope, receive):
        """Check an inference request's query and body; return a ``receive`` that replays the body read.

        Returns None when the client disconnected before sending the whole body.
        """
        problem = infer_query_problem(_query(scope))
        if problem:
            raise Refusal(422, problem)
        body = await _read_body(receive)
        if body is None:
            return None
        found = await infer_body_problem(scope, body)
        if found:
            raise Refusal(*found)
        return _replaying(body, receive)

    async def check_train(self, scope, receive):
        """Check a training request's query and JSON options; return a ``receive`` that replays the body read.

        Returns None when the client disconnected before sending the whole body.
        """
        problem = train_query_problem(_query(scope))
        if problem:
            raise Refusal(422, problem)
        body = await _read_body(receive)
        if body is None:
            return None
        found = train_body_problem(scope, body)
        if found:
            raise Refusal(*found)
        return _replaying(body, receive)


def _replaying(body: bytes, receive):
    """A ``receive`` that gives the server the body already read, then what the client sends after it."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _read_body(receive) -> Optional[bytes]:
    """The whole request body, at most :data:`MAX_INFER_BODY` bytes (:class:`Refusal` 413 beyond); None when the
    client disconnected first."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > MAX_INFER_BODY:
            raise Refusal(413, "The request is too large. Send the prompt in 'params' and the image as a datastore id.")
    return body


async def malformed_form_json(request: Request, exc: Exception):
    """HTTP 422 for the JSON form fields (``params``, ``info``) of a datastore write that MONAI Label cannot use.

    MONAI Label's datastore endpoints read them with ``json.loads`` and add the user name to them: malformed JSON
    (``JSONDecodeError``) or JSON that is not an object (``TypeError``) is a 500 there. The same errors of any other
    request are left to MONAI Label (a 500: a server fault, not the client's).
    """
    if request.method not in ("PUT", "DELETE") or "/datastore" not in request.url.path:
        raise exc
    if isinstance(exc, json.JSONDecodeError):
        detail = f"A form field holds malformed JSON ({exc}). Send 'params' or 'info' as a JSON object."
    else:
        detail = f"A form field is not a JSON object ({exc}). Send 'params' or 'info' as a JSON object."
    return JSONResponse({"detail": detail}, status_code=422)


def guard_requests(options: AppOptions) -> None:
    """Put :class:`RequestGuard` in front of the running MONAI Label server (once; later calls set its options),
    and answer unusable JSON in datastore writes with 422 (:func:`malformed_form_json`)."""
    try:
        from monailabel.app import app as server
        from monailabel.config import settings
    except ImportError:  # pragma: no cover - the app is used without MONAI Label's server
        return
    if json.JSONDecodeError not in server.exception_handlers:
        server.add_exception_handler(json.JSONDecodeError, malformed_form_json)
        server.add_exception_handler(TypeError, malformed_form_json)
        server.middleware_stack = None  # the handlers are copied into the stack when it is built
    if server.middleware_stack is None:
        server.middleware_stack = server.build_middleware_stack()
    if isinstance(server.middleware_stack, RequestGuard):
        server.middleware_stack.options = options
    else:
        server.middleware_stack = RequestGuard(server.middleware_stack, options, settings.MONAI_LABEL_API_STR)
