"""MONAI Label app as a hostile client sees it: real ``monailabel start_server`` processes, and what they refuse.

Checks: started the documented way (no ``--host``) the server listens on 127.0.0.1 only, and it refuses to start on
0.0.0.0 without ``--conf allow_remote true``; datastore writes and deletes are 403 (with a detail) unless
``--conf datastore_writes true``, and ids and tags that are not plain names are 4xx even then; ``GET /logs/`` is 403
unless ``--conf logs true``; an inference request whose options would be lost (random bytes, a malformed form,
unknown fields, uploads, sessions) is 4xx, never an answer to the default prompt; endpoints the app does not offer
(training, batch inference, scoring, model files, sessions, OHIF, ...) are 404/405, never 500. After every request
the folder around the server, the studies folder included, is compared with its state before: nothing written or
deleted unless the request was allowed to.

Two servers (one as started by default, one with the options opened) and one refused start; no inference runs.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import importlib.util
import io
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip(
    "monailabel",
    reason="MONAI Label is optional: see monailabel_app/README.md (pip install -r requirements-monailabel.txt)",
)
requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")  # a MONAI Label dependency
uvicorn = pytest.importorskip("uvicorn")  # a MONAI Label dependency

from tests.test_monailabel_server import APP_DIR, START_TIMEOUT_S, Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The bundle's own sample CT: a real study, so that a request the app failed to refuse would get an answer.
SAMPLE = REPO / "bundle" / "sample" / "sample_case.nii.gz"
TIMEOUT_S = 60
WRITES_OFF = "--conf datastore_writes true"
NOT_PLAIN = "not a plain name"


# ---------------------------------------------------------------------------------------- helpers
def _tiny_nifti() -> bytes:
    """A small NIfTI volume (gzip), for uploads."""
    return gzip.compress(nib.Nifti1Image(np.full((8, 8, 4), -1000, dtype=np.int16), np.eye(4)).to_bytes())


TINY = _tiny_nifti()
RANDOM = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
FORM = b'--abc\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"prompt": "the largest lesion"}\r\n--abc--\r\n'


def _multipart(boundary: str = "abc") -> dict:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _params(params: dict | str, **files) -> dict:
    """``requests`` keyword arguments for a multipart body with ``params`` (and other parts)."""
    text = params if isinstance(params, str) else json.dumps(params)
    return {"files": {"params": (None, text), **files}}


def _upload(field: str, name: str = "x.nii.gz", data: bytes = TINY) -> dict:
    return {"files": {field: (name, io.BytesIO(data))}}


def _tree(root: Path, skip: tuple = ()) -> dict:
    """Every file and folder under ``root`` (but ``skip``): relative path -> sha256 of a file, or 'dir'."""
    tree = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if any(relative == s or relative.startswith(s + "/") for s in skip):
            continue
        tree[relative] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


class Site:
    """A server on ``<root>/work/studies`` (one study, ``case_a``): ``../../x`` from the studies folder is ``<root>/x``.

    ``tree()`` is everything under ``<root>`` but the server's own log and session folder.
    """

    def __init__(self, root: Path, host: str | None, conf: dict | None = None):
        self.root = root
        self.work = root / "work"
        self.studies = self.work / "studies"
        self.studies.mkdir(parents=True)
        shutil.copyfile(SAMPLE, self.studies / "case_a.nii.gz")
        self.server = Server(self.studies, self.work, host=host, conf=conf)
        self.url = self.server.url

    def start(self) -> "Site":
        self.server.wait_ready()
        self.settle(quiet_s=0.5)
        self.before = self.tree()
        return self

    def tree(self) -> dict:
        return _tree(self.root, skip=("work/server.log", "work/sessions"))

    def settle(self, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Wait until no file changes for ``quiet_s``: MONAI Label's file watcher rewrites its index after a write."""
        deadline, tree = time.monotonic() + timeout_s, self.tree()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            tree, previous = self.tree(), tree
            if tree == previous:
                return
        pytest.fail(f"files around the server still change {timeout_s} s after the last write")

    def send(self, method: str, path: str, **kwargs):
        return requests.request(method, f"{self.url}{path}", timeout=TIMEOUT_S, **kwargs)


def _check_refused(site: Site, method: str, path: str, kwargs: dict, status: int, words: str) -> None:
    """Send a request; check its status and detail, and that no file around the server changed."""
    before = site.tree()
    response = site.send(method, path, **kwargs)
    assert response.status_code == status, (response.status_code, response.text[:500])
    if method != "HEAD":  # an answer to HEAD has no body
        assert words in response.json()["detail"], response.json()
    assert site.tree() == before, "a refused request changed files around the server"
    assert "Internal Server Error" not in site.server.log_tail(200000)


def _load_network_module():
    """``monailabel_app/lib/network.py`` (it imports nothing of the app)."""
    spec = importlib.util.spec_from_file_location("lsms_app_network", APP_DIR / "lib" / "network.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def closed(tmp_path_factory, request):
    """The server started the documented way: no ``--host``, no option opened."""
    site = Site(tmp_path_factory.mktemp("closed"), host=None)
    request.addfinalizer(site.server.stop)
    return site.start()


@pytest.fixture(scope="module")
def opened(tmp_path_factory, request):
    """A server on 127.0.0.1 with datastore writes, the log and other machines allowed."""
    conf = {"datastore_writes": "true", "logs": "true", "allow_remote": "true"}
    site = Site(tmp_path_factory.mktemp("opened"), host="127.0.0.1", conf=conf)
    request.addfinalizer(site.server.stop)
    return site.start()


# ---------------------------------------------------------------------------------------- where it listens
def test_listens_on_loopback_only_by_default(closed):
    process = psutil.Process(closed.server.process.pid)  # the 'monailabel' script execs Python: the server itself
    connections = getattr(process, "net_connections", None) or process.connections
    listening = {c.laddr.ip for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening
    assert f"Uvicorn running on http://127.0.0.1:{closed.server.port}" in closed.server.log_tail(200000)


def test_refuses_all_interfaces_without_allow_remote(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    server = Server(studies, tmp_path, host="0.0.0.0")
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    started = server.process.poll() is None
    code = server.stop()
    log = server.log_tail(20000)
    assert not started, f"the server ran on 0.0.0.0 without --conf allow_remote true:\n{log}"
    assert code != 0
    assert "--conf allow_remote true" in log and "--host 127.0.0.1" in log, log
    assert "Uvicorn running" not in log, log


@pytest.mark.parametrize(
    "argv, given",
    [
        (["start_server", "--app", "a", "--studies", "s"], False),
        (["start_server", "--app", "a", "--host", "0.0.0.0"], True),
        (["start_server", "--app", "a", "-i", "0.0.0.0"], True),
        (["start_server", "--app", "a", "--host=0.0.0.0"], True),
        (["start_server", "--app", "a", "--conf", "models", "lsms", "--hos", "10.0.0.1"], True),
    ],
    ids=["none", "long", "short", "equals", "abbreviated"],
)
def test_host_given_reads_monailabel_command_line(argv, given):
    network = _load_network_module()
    program = "/venv/lib/python3.11/site-packages/monailabel/main.py"  # sys.argv[0] of python -m monailabel.main
    assert network.host_given([program] + argv) is given
    assert network.host_given(["/usr/bin/uvicorn", "monailabel.app:app"]) is True


def test_bind_address_moved_or_refused():
    network = _load_network_module()
    program = "/venv/lib/python3.11/site-packages/monailabel/main.py"
    default, asked = [program, "start_server"], [program, "start_server", "--host", "0.0.0.0"]
    for argv, allow_remote, workers, expected in [
        (default, False, 1, "127.0.0.1"),  # monailabel's default address: moved to loopback
        (asked, False, 1, None),  # asked for: refused
        (default, False, 2, None),  # workers share a socket opened before the app: refused
        (asked, True, 1, "0.0.0.0"),  # allowed
    ]:
        config = uvicorn.Config("monailabel.app:app", host="0.0.0.0", port=8000, workers=workers)
        if expected is None:
            with pytest.raises(network.BindAddressError, match="--conf allow_remote true"):
                network.check_bind_address(allow_remote, argv)
            assert config.host == "0.0.0.0"
        else:
            assert network.check_bind_address(allow_remote, argv) == expected
            assert config.host == expected
        del config
        gc.collect()


# ---------------------------------------------------------------------------------------- refused by default
CLOSED_REQUESTS = [
    # the datastore: writes and deletes
    ("delete study", "DELETE", "/datastore/image?id=case_a", {}, 403, WRITES_OFF),
    ("upload outside", "PUT", "/datastore/image?image=../../x", _upload("file"), 403, WRITES_OFF),
    ("upload plain", "PUT", "/datastore/image?image=case_b", _upload("file"), 403, WRITES_OFF),
    ("upload deprecated", "PUT", "/datastore/?image=case_b", _upload("file"), 403, WRITES_OFF),
    ("delete deprecated", "DELETE", "/datastore/?id=case_a", {}, 403, WRITES_OFF),
    ("label tag outside", "PUT", "/datastore/label?image=case_a&tag=../../../x", _upload("label"), 403, WRITES_OFF),
    ("label plain", "PUT", "/datastore/label?image=case_a&tag=final", _upload("label"), 403, WRITES_OFF),
    ("delete label", "DELETE", "/datastore/label?id=case_a&tag=final", {}, 403, WRITES_OFF),
    ("image info", "PUT", "/datastore/image/info?image=case_a", {"files": {"info": (None, "{}")}}, 403, WRITES_OFF),
    ("label info", "PUT", "/datastore/label/info?label=case_a&tag=final", {"files": {"info": (None, "{}")}}, 403,
     WRITES_OFF),
    ("save answer as label", "POST", "/infer/lsms?image=case_a",
     _params({"prompt": "a lesion", "save_label": True, "label_tag": "../../../x"}), 403, WRITES_OFF),
    # the log
    ("log", "GET", "/logs/", {}, 403, "--conf logs true"),
    ("GPU info", "GET", "/logs/gpu", {}, 404, "nvidia-smi"),
    # features the app does not offer (MONAI Label answered 500 for most)
    ("train", "POST", "/train/lsms", {}, 404, "Training is not offered"),
    ("train status", "GET", "/train/", {}, 404, "Training is not offered"),
    ("train stop", "DELETE", "/train/", {}, 404, "Training is not offered"),
    ("batch infer", "POST", "/batch/infer/lsms", {}, 404, "Batch inference is not offered"),
    ("batch infer stop", "DELETE", "/batch/infer", {}, 404, "Batch inference is not offered"),
    ("scoring", "POST", "/scoring/epistemic", {}, 404, "Scoring is not offered"),
    ("scoring all", "POST", "/scoring/", {}, 404, "Scoring is not offered"),
    ("unknown strategy", "POST", "/activelearning/first", {}, 404, "strategy 'first'"),
    ("model download", "GET", "/model/lsms", {}, 404, "Model files"),
    ("model upload", "PUT", "/model/lsms", _upload("file", "x.pt"), 404, "Model files"),
    ("model delete", "DELETE", "/model/lsms", {}, 404, "Model files"),
    ("session upload", "PUT", "/session/", _upload("files"), 404, "Sessions"),
    ("session", "GET", "/session/abc", {}, 404, "Sessions"),
    ("OHIF", "GET", "/ohif/", {}, 404, "OHIF"),
    ("OHIF file", "GET", "/ohif/index.html", {}, 404, "OHIF"),
    ("DICOMweb proxy", "GET", "/proxy/dicom/qido/studies", {}, 404, "OHIF"),
    ("WSI", "POST", "/infer/wsi/lsms?image=case_a", {}, 404, "Whole-slide"),
    ("WSI v2", "POST", "/infer/wsi_v2/lsms?image=case_a", {}, 404, "Whole-slide"),
    ("dataset archive", "GET", "/datastore/dataset", {}, 404, "archive"),
    ("reload", "POST", "/reload", {}, 404, "Restart"),
    ("unknown path", "GET", "/nothing/here", {}, 404, "not offered"),
    ("infer by GET", "GET", "/infer/lsms?image=case_a", {}, 405, "Use POST"),
    ("checksum algorithm", "HEAD", "/datastore/image?image=case_a&check_only=true&check_sum=FOO:abc", {}, 422, ""),
    # inference requests whose options would be lost
    ("random bytes", "POST", "/infer/lsms?image=case_a", {"data": RANDOM}, 415, "not a form"),
    ("random bytes as a form", "POST", "/infer/lsms?image=case_a", {"data": RANDOM, "headers": _multipart("xyz")},
     422, "not a readable form"),
    ("form, wrong boundary", "POST", "/infer/lsms?image=case_a", {"data": FORM, "headers": _multipart("xyz")}, 422,
     "not a readable form"),
    ("form, truncated", "POST", "/infer/lsms?image=case_a", {"data": FORM[:-12], "headers": _multipart()}, 422,
     "no form field"),
    ("form, no boundary", "POST", "/infer/lsms?image=case_a",
     {"data": FORM, "headers": {"Content-Type": "multipart/form-data"}}, 422, "not a readable form"),
    ("JSON body", "POST", "/infer/lsms?image=case_a", {"json": {"prompt": "the largest lesion"}}, 415,
     "application/json"),
    ("prompt as its own field", "POST", "/infer/lsms?image=case_a", {"files": {"prompt": (None, "a lesion")}}, 422,
     "'prompt'"),
    ("params in the query", "POST", '/infer/lsms?image=case_a&params={"prompt":"a lesion"}', _params({}), 422,
     "'params'"),
    ("params twice", "POST", "/infer/lsms?image=case_a",
     {"files": [("params", (None, '{"prompt": "a"}')), ("params", (None, '{"prompt": "b"}'))]}, 422, "once"),
    ("uploaded image", "POST", "/infer/lsms?image=case_a", _params({}, file=("x.nii.gz", io.BytesIO(TINY))), 422,
     "Uploaded images"),
    ("session id", "POST", "/infer/lsms?session_id=abc", _params({}), 422, "Sessions"),
    ("DICOM SEG output", "POST", "/infer/lsms?image=case_a&output=dicom_seg", _params({}), 422, "dicom_seg"),
    ("two images", "POST", "/infer/lsms?image=case_a&image=case_b", _params({}), 422, "one study"),
    # another site or name (a web page of another site, DNS rebinding)
    ("foreign Host", "GET", "/info/", {"headers": {"Host": "evil.example"}}, 403, "Host header"),
    ("foreign Origin", "POST", "/infer/lsms?image=case_a",
     {**_params({"prompt": "a lesion"}), "headers": {"Origin": "http://evil.example"}}, 403, "Origin"),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, kwargs, status, words", [r[1:] for r in CLOSED_REQUESTS], ids=[r[0] for r in CLOSED_REQUESTS]
)
def test_refused_by_default(closed, method, path, kwargs, status, words):
    _check_refused(closed, method, path, kwargs, status, words)
    assert closed.tree() == closed.before


def test_reads_still_answered_by_default(closed):
    """What 3D Slicer does without writing (study list, Next Sample, download) works, and writes nothing."""
    assert closed.send("GET", "/info/").status_code == 200
    assert "case_a" in closed.send("GET", "/datastore/?output=all").json()["objects"]
    sample = closed.send("POST", "/activelearning/random")
    assert sample.status_code == 200 and sample.json()["id"] == "case_a", sample.text[:500]
    image = closed.send("GET", "/datastore/image?image=case_a")
    assert image.status_code == 200 and image.content == SAMPLE.read_bytes()
    assert closed.tree() == closed.before, "reading changed files around the server"


# ---------------------------------------------------------------------------------------- opened by --conf
def test_opened_writes_plain_names(opened):
    studies = opened.studies
    response = opened.send("PUT", "/datastore/image?image=case_b", **_upload("file"))
    assert response.status_code == 200, response.text[:500]
    assert (studies / "case_b.nii.gz").read_bytes() == TINY
    assert "case_b" in opened.send("GET", "/datastore/?output=all").json()["objects"]
    response = opened.send("PUT", "/datastore/label?image=case_b&tag=final", **_upload("label"))
    assert response.status_code == 200, response.text[:500]
    assert (studies / "labels" / "final" / "case_b.nii.gz").read_bytes() == TINY
    response = opened.send("DELETE", "/datastore/image?id=case_b")
    assert response.status_code == 200, response.text[:500]
    assert not (studies / "case_b.nii.gz").exists() and not (studies / "labels" / "final" / "case_b.nii.gz").exists()
    opened.settle()
    left = set(opened.tree()) ^ set(opened.before)
    assert not left, f"files left behind or removed: {left}"


OPENED_REQUESTS = [
    ("upload outside", "PUT", "/datastore/image?image=../../x", _upload("file"), 422, NOT_PLAIN),
    ("upload into a folder", "PUT", "/datastore/image?image=a/b", _upload("file"), 422, NOT_PLAIN),
    ("upload hidden", "PUT", "/datastore/image?image=.hidden", _upload("file"), 422, NOT_PLAIN),
    ("upload dot-dot", "PUT", "/datastore/image?image=..", _upload("file"), 422, NOT_PLAIN),
    ("upload absolute", "PUT", "/datastore/image?image=/tmp/x", _upload("file"), 422, NOT_PLAIN),
    ("upload, id from file name", "PUT", "/datastore/image", _upload("file", "..x.nii.gz"), 422, "Pass the study id"),
    ("upload not NIfTI", "PUT", "/datastore/image?image=case_c", _upload("file", "x.json", b"{}"), 422, ".nii.gz"),
    ("label tag outside", "PUT", "/datastore/label?image=case_a&tag=../../../x", _upload("label"), 422, NOT_PLAIN),
    ("label of a path", "PUT", "/datastore/label?image=../case_a&tag=final", _upload("label"), 422, NOT_PLAIN),
    ("label of no study", "PUT", "/datastore/label?image=no_such&tag=final", _upload("label"), 404, "no_such"),
    ("delete a path", "DELETE", "/datastore/image?id=../work/studies/case_a", {}, 422, NOT_PLAIN),
    ("delete no study", "DELETE", "/datastore/image?id=no_such", {}, 404, "no_such"),
    ("delete label outside", "DELETE", "/datastore/label?id=case_a&tag=../x", {}, 422, NOT_PLAIN),
    ("info of a path", "PUT", "/datastore/image/info?image=../x", {"files": {"info": (None, "{}")}}, 422, NOT_PLAIN),
    ("info not JSON", "PUT", "/datastore/image/info?image=case_a", {"files": {"info": (None, "{bad")}}, 422,
     "malformed JSON"),
    ("info a JSON list", "PUT", "/datastore/image/info?image=case_a", {"files": {"info": (None, "[1]")}}, 422,
     "JSON object"),
    ("upload params not JSON", "PUT", "/datastore/image?image=case_d",
     {"files": {"params": (None, "{bad"), "file": ("x.nii.gz", io.BytesIO(TINY))}}, 422, "malformed JSON"),
    ("upload params a JSON list", "PUT", "/datastore/image?image=case_d",
     {"files": {"params": (None, "[1]"), "file": ("x.nii.gz", io.BytesIO(TINY))}}, 422, "JSON object"),
    ("save answer outside", "POST", "/infer/lsms?image=case_a",
     _params({"prompt": "a lesion", "save_label": True, "label_tag": "../../../x"}), 422, NOT_PLAIN),
    ("unknown strategy", "POST", "/activelearning/first", {}, 404, "strategy 'first'"),
    ("train", "POST", "/train/lsms", {}, 404, "Training is not offered"),
    ("random bytes", "POST", "/infer/lsms?image=case_a", {"data": RANDOM}, 415, "not a form"),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, kwargs, status, words", [r[1:] for r in OPENED_REQUESTS], ids=[r[0] for r in OPENED_REQUESTS]
)
def test_opened_still_refuses(opened, method, path, kwargs, status, words):
    _check_refused(opened, method, path, kwargs, status, words)


def test_opened_serves_log_and_other_names(opened):
    log = opened.send("GET", "/logs/?lines=50&text=true")
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain"), log.text[:500]
    assert log.text.strip()
    # allow_remote: the server may be reached by another name (a reverse proxy, a DNS name)
    assert opened.send("GET", "/info/", headers={"Host": "lsms.example"}).status_code == 200
