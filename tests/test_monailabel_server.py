"""MONAI Label app: a real ``monailabel start_server`` on loopback, serving the bundle with a free-text prompt.

Checks: ``/info`` lists the model and its prompt option; ``POST /infer/lsms`` with ``candidates`` off returns the
same mask (and record) as ``python -m monai.bundle run inference`` for the same case and prompt; two prompts give two
masks, each on its own lesion; with ``candidates`` on (the default) every candidate is its own segment, the chosen
ones making up the same answer, with the parsed query and the explanation; an empty or over-long prompt is a clear
422; 8 concurrent requests all succeed; the server stops cleanly.

MONAI Label is optional (``requirements-monailabel.txt``): the module is skipped only when it cannot be imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip(
    "monailabel",
    reason="MONAI Label is optional: see monailabel_app/README.md (pip install -r requirements-monailabel.txt)",
)
requests = pytest.importorskip("requests")
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402  (a MONAI Label dependency)

from custom.data.synthetic import generate_dataset  # noqa: E402
from custom.text import DEFAULT_MAX_TOKENS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "monailabel_app"
INFERENCE_CONFIG = REPO / "bundle" / "configs" / "inference.json"
MODEL = "lsms"

START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
CONCURRENT_REQUESTS = 8
#: A referred lesion counts as found ("hit") with Dice >= 0.1 (lesion-wise metrics of the design notes).
HIT_DICE = 0.1


# ---------------------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _monailabel_command() -> list[str]:
    script = Path(sys.executable).with_name("monailabel")
    if not script.is_file():
        found = shutil.which("monailabel")
        if not found:
            pytest.fail("the 'monailabel' command is not installed beside this Python; reinstall monailabel")
        script = Path(found)
    return [str(script)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pick_case(datalist: Path):
    """A case and two expressions that refer to two different single lesions, the largest such pair.

    Expressions that name a lobe or a density are preferred over purely positional ones.
    """
    data = json.loads(datalist.read_text())
    best = None
    for split in ("test", "validation", "training"):
        for case in data.get(split, []):
            volumes = {a["id"]: a["volume_ml"] for a in case.get("lesion_attributes", [])}
            by_target: dict[int, list] = {}
            for e in case["expressions"]:
                if len(e["targets"]) == 1:
                    by_target.setdefault(e["targets"][0], []).append(e)
            ids = sorted(by_target, key=lambda i: -volumes.get(i, 0.0))[:2]
            if len(ids) == 2:
                score = min(volumes.get(i, 0.0) for i in ids)
                if best is None or score > best[0]:
                    named = lambda e: bool({"region", "density"} & set(e.get("query", {})))  # noqa: E731
                    chosen = [sorted(by_target[i], key=lambda e: not named(e))[0]
                              for i in ids]  # fmt: skip
                    best = (score, case, chosen[0], chosen[1])
    if best is None:
        pytest.fail(f"no case in {datalist} has two expressions that refer to two different lesions")
    return best[1:]


def _record_beside(mask_path: Path) -> dict:
    """The bundle's JSON record written beside a mask (the one whose ``outputs.mask`` names it)."""
    stem = mask_path.name.split("_mask.")[0]
    candidates = [mask_path.with_name(f"{stem}_record.json"), mask_path.with_name(f"{stem}.json")]
    candidates += sorted(mask_path.parent.glob("*.json"))
    for path in candidates:
        if path.is_file():
            record = json.loads(path.read_text())
            outputs = record.get("outputs")
            if not isinstance(outputs, dict) or outputs.get("mask") in (None, mask_path.name):
                return record
    pytest.fail(f"no JSON record beside {mask_path}")


class Server:
    """``monailabel start_server`` as a child process, with its log in a file.

    Args:
        studies: the studies folder.
        work: a folder for the log and MONAI Label's sessions.
        host: ``--host``; None: not given (the app's default address).
        conf: more ``--conf`` options (``models lsms`` is always given).
    """

    def __init__(self, studies: Path, work: Path, host: str | None = "127.0.0.1", conf: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        env = dict(os.environ)
        env["MONAILABEL_PYEXE"] = sys.executable  # the 'monailabel' script runs ${MONAILABEL_PYEXE:-python}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["MONAI_LABEL_SESSION_PATH"] = str(work / "sessions")
        env["MONAI_LABEL_AUTO_UPDATE_SCORING"] = "false"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        command = _monailabel_command() + [
            "start_server", "--app", str(APP_DIR), "--studies", str(studies), "--port", str(self.port),
            "--conf", "models", MODEL,
        ]  # fmt: skip
        command += ["--host", host] if host is not None else []
        for key, value in (conf or {}).items():
            command += ["--conf", key, str(value)]
        self._log = open(self.log_path, "wb")
        # cwd outside the repository: the app must find the bundle and the custom package by itself
        self.process = subprocess.Popen(command, cwd=work, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.returncode = None
        self.killed = False

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        pytest.fail(f"monailabel start_server not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> int:
        """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it does not end in time; returns the exit code.

        The ``monailabel`` script ``exec``s Python, so the child process is the server itself.
        """
        if self.returncode is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    self.process.kill()
                    self.process.wait(timeout=STOP_TIMEOUT_S)
            self.returncode = self.process.returncode
            self._log.close()
        return self.returncode


def _infer(url: str, image_id: str, params: dict, output: str | None = None, timeout: float = REQUEST_TIMEOUT_S):
    query = {"image": image_id}
    if output:
        query["output"] = output
    return requests.post(
        f"{url}/infer/{MODEL}", params=query, files={"params": (None, json.dumps(params))}, timeout=timeout
    )


def _mask_and_json(response, tmp_dir: Path, name: str):
    """Split MONAI Label's multipart answer (``params`` JSON + ``image`` mask file)."""
    assert response.status_code == 200, response.text[:2000]
    decoder = MultipartDecoder(response.content, response.headers["content-type"])
    result, mask_path = None, None
    for part in decoder.parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        elif 'name="image"' in disposition:
            mask_path = tmp_dir / f"{name}.nii.gz"
            mask_path.write_bytes(part.content)
    assert result is not None and mask_path is not None, "expected a 'params' part and an 'image' part"
    return nib.load(mask_path), result


def _volatile(key: str) -> bool:
    return any(word in key.lower() for word in ("path", "file", "time", "date", "output", "latenc", "version"))


def _stable(value):
    """A record without the entries that name files or times (they differ between two runs by design)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("monailabel")


@pytest.fixture(scope="module")
def study(work):
    """Synthetic cases from the data generator; the chosen case's image is copied into the studies folder."""
    # thick slices keep each inference short on a CPU (the bundle resamples in-plane to its own spacing anyway)
    datalist = generate_dataset(work / "dataset", num_cases=3, seed=5, slice_thickness=(8.0,))
    case, first, second = _pick_case(datalist)
    studies = work / "studies"
    studies.mkdir()
    image = studies / Path(case["image"]).name
    shutil.copyfile(datalist.parent / case["image"], image)
    image_id = image.name[: -len(".nii.gz")]
    lesions = np.asarray(nib.load(datalist.parent / case["lesions"]).dataobj)
    source = nib.load(image)
    with_nan = np.asanyarray(source.dataobj).astype(np.float32)
    with_nan[:, :, with_nan.shape[2] // 2] = np.nan
    nib.save(nib.Nifti1Image(with_nan, source.affine), str(studies / "case_with_nan.nii.gz"))
    outside = work / "outside_the_studies.nii.gz"
    shutil.copyfile(image, outside)
    return {
        "studies": studies,
        "image": image,
        "image_id": image_id,
        "sha256": _sha256(image),
        "expressions": [first, second],
        "lesions": lesions,
        "nan_image_id": "case_with_nan",
        "outside": outside,
    }


@pytest.fixture(scope="module")
def server(study, work, request):
    srv = Server(study["studies"], work)
    request.addfinalizer(srv.stop)  # also on failure
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def reference(study, work):
    """What ``python -m monai.bundle run inference`` writes for the study and each of the two prompts."""
    if not INFERENCE_CONFIG.is_file():
        pytest.fail(f"{INFERENCE_CONFIG} is missing: the app serves the bundle's inference config")
    refs = []
    for n, expression in enumerate(study["expressions"]):
        out = work / f"cli_{n}"
        command = [
            sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(INFERENCE_CONFIG),
            "--image", str(study["image"]), "--prompt", expression["text"], "--output_dir", str(out),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        masks = sorted(out.rglob("*_mask.nii.gz"))
        assert len(masks) == 1, f"expected one mask under {out}, found {masks}"
        refs.append({"mask": nib.load(masks[0]), "record": _record_beside(masks[0])})
    return refs


@pytest.fixture(scope="module")
def answers(server, study, work):
    """The server's answers (mask, JSON) for the two prompts, one request each, the referred mask only."""
    return [
        _mask_and_json(
            _infer(server.url, study["image_id"], {"prompt": e["text"], "candidates": False}), work, f"answer_{n}"
        )
        for n, e in enumerate(study["expressions"])
    ]


# ---------------------------------------------------------------------------------------------------- tests
def test_info_lists_model_and_prompt_option(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert MODEL in info["models"], info["models"].keys()
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    # displayable_configs -> the model's "config": what 3D Slicer's MONAI Label module shows as editable options
    assert isinstance(model["config"].get("prompt"), str)
    assert model["config"].get("candidates") is True
    assert model["prompt"]["max_tokens"] == DEFAULT_MAX_TOKENS
    assert info["datastore"]["total"] == 2


@pytest.mark.parametrize("n", [0, 1], ids=["prompt_a", "prompt_b"])
def test_infer_equals_bundle_cli(study, reference, answers, n):
    expression, (mask, result), ref = study["expressions"][n], answers[n], reference[n]
    image = nib.load(study["image"])
    # the study's own geometry
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    # the same mask and record as the bundle's command line
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(ref["mask"].dataobj))
    np.testing.assert_allclose(mask.affine, ref["mask"].affine, atol=1e-5)
    assert result["prompt"] == expression["text"]
    assert result["found"] == ref["record"]["found"]
    assert _stable(result["record"]) == _stable(ref["record"])
    # the input is never modified
    assert _sha256(study["image"]) == study["sha256"]


def test_two_prompts_two_masks_each_on_its_lesion(study, answers):
    masks = []
    for expression, (mask, result) in zip(study["expressions"], answers):
        assert result["found"] is True, (expression, result["record"])
        masks.append(np.asarray(mask.dataobj) > 0)
    assert not np.array_equal(masks[0], masks[1]), "two different prompts gave the same mask"
    # Each mask is the bundle's answer for its own prompt (test_infer_equals_bundle_cli) and hits the lesion that
    # prompt refers to, by the lesion-wise "hit" of the design notes (Dice >= 0.1 with the referred lesion).
    # How exactly the model separates the lesions is its accuracy, measured by the bundle's evaluation.
    lesions = study["lesions"]
    for expression, mask in zip(study["expressions"], masks):
        dice = {int(i): round(_dice(mask, lesions == i), 3) for i in np.unique(lesions) if i}
        assert dice[expression["targets"][0]] >= HIT_DICE, f"{expression['text']!r}: Dice per lesion {dice}"


def test_candidates_are_segments_the_chosen_ones_the_answer(server, study, reference, work):
    expression = study["expressions"][0]
    labels, result = _mask_and_json(
        _infer(server.url, study["image_id"], {"prompt": expression["text"]}), work, "candidates"
    )
    values = np.asarray(labels.dataobj)
    record, names = result["record"], result["label_names"]
    numbers = {c["candidate"] for c in record["referral"]["candidates"]}
    assert len(numbers) >= 2 and set(names.values()) == numbers and set(np.unique(values)) - {0} <= numbers
    chosen = {d["label"] for d in result["candidates"] if d["chosen"]}
    assert chosen and all(
        expression["text"][:20] in d["name"] if d["chosen"] else "not chosen" in d["name"] for d in result["candidates"]
    )
    assert all({"score", "volume_ml"} <= set(d) for d in result["candidates"])
    cli = np.asarray(reference[0]["mask"].dataobj) > 0
    assert _dice(np.isin(values, sorted(chosen)), cli) >= 0.98  # the chosen candidates are the answer
    assert result["query"]["text"] == expression["text"] and result["explanation"]


@pytest.mark.parametrize(
    "prompt, message",
    [("", "empty"), ("   ", "empty"), ("lesion " * (2 * DEFAULT_MAX_TOKENS), "tokens"), (42, "text")],
    ids=["empty", "blank", "over_token_limit", "not_text"],
)
def test_bad_prompt_is_a_clear_422(server, study, prompt, message):
    response = _infer(server.url, study["image_id"], {"prompt": prompt}, output="json", timeout=60)
    assert response.status_code == 422, (response.status_code, response.text[:500])
    assert message in response.json()["detail"]


def test_unknown_image_is_404(server):
    response = _infer(server.url, "no_such_case", {"prompt": "the largest lesion"}, output="json", timeout=60)
    assert response.status_code == 404, (response.status_code, response.text[:500])
    assert "no_such_case" in response.json()["detail"]


def _raw_infer(url: str, model: str = MODEL, query: dict | None = None, params: str = "{}"):
    return requests.post(f"{url}/infer/{model}", params=query or {}, files={"params": (None, params)},
                         timeout=REQUEST_TIMEOUT_S)  # fmt: skip


def _verbatim(text: str):
    def check(response, marker: Path):
        assert not marker.exists(), "the prompt was executed on the server"
        decoder = MultipartDecoder(response.content, response.headers["content-type"])
        result = next(
            json.loads(p.content) for p in decoder.parts if b'name="params"' in p.headers[b"Content-Disposition"]
        )
        assert result["prompt"] == text and result["record"]["expression"] == text

    return check


def _bad_requests(study, marker: Path):
    """(name, send(url) -> response, expected status, detail words or a check of a 200 answer)."""
    image = study["image_id"]
    code = f"$__import__('os').mkdir('{marker}')"  # 32 tokens at most, so that it reaches the bundle
    return [
        ("prompt that is Python", lambda url: _infer(url, image, {"prompt": code}), 200, _verbatim(code)),
        ("prompt that is a reference", lambda url: _infer(url, image, {"prompt": "@checkpoint"}), 200,
         _verbatim("@checkpoint")),
        ("prompt that is a macro", lambda url: _infer(url, image, {"prompt": "%bundle_root"}), 200,
         _verbatim("%bundle_root")),
        ("prompt that is an import", lambda url: _infer(url, image, {"prompt": "$import antigravity"}), 200,
         _verbatim("$import antigravity")),
        ("params that are not JSON", lambda url: _raw_infer(url, query={"image": image}, params="{not json"), 422,
         "JSON object"),
        ("params that are a JSON list", lambda url: _raw_infer(url, query={"image": image}, params="[1, 2]"), 422,
         "JSON object"),
        ("unknown model", lambda url: _raw_infer(url, model="spleen", query={"image": image},
                                                 params='{"prompt": "a lesion"}'), 404, "Unknown model"),
        ("no image", lambda url: _raw_infer(url, params='{"prompt": "a lesion"}'), 422, "image id"),
        ("unknown image id", lambda url: _infer(url, "no_such_case", {"prompt": "a lesion"}), 404, "no_such_case"),
        ("server path outside the studies", lambda url: _infer(url, str(study["outside"]), {"prompt": "a lesion"}), 404,
         "datastore"),
        ("image path smuggled in params", lambda url: _infer(url, image, {"prompt": "a lesion",
                                                                            "image": str(study["outside"])}), 404,
         "datastore"),
        ("study with NaN voxels", lambda url: _infer(url, study["nan_image_id"], {"prompt": "a lesion"}), 422, "NaN"),
        ("empty prompt", lambda url: _infer(url, image, {"prompt": ""}), 422, "empty"),
    ]  # fmt: skip


def test_concurrent_requests_with_bad_ones_all_answered_and_nothing_runs(server, study, reference, work):
    """8 concurrent inferences and every bad request at the same time: no failure, no 500, nothing executed."""
    texts = [e["text"] for e in study["expressions"]]
    marker = Path(f"/tmp/x{os.getpid()}s")  # a short path: the prompt that would create it must fit 32 tokens
    bad = _bad_requests(study, marker)

    def good(n):
        response = _infer(server.url, study["image_id"], {"prompt": texts[n % 2], "candidates": False})
        mask, result = _mask_and_json(response, work, f"c{n}")
        return ("good", n, np.asarray(mask.dataobj), result)

    def send_bad(item):
        name, send, status, expected = item
        return ("bad", name, send(server.url), (status, expected))

    with ThreadPoolExecutor(max_workers=CONCURRENT_REQUESTS + len(bad)) as pool:
        futures = [pool.submit(good, n) for n in range(CONCURRENT_REQUESTS)] + [pool.submit(send_bad, b) for b in bad]
        results = [f.result() for f in futures]
    goods = [r for r in results if r[0] == "good"]
    assert len(goods) == CONCURRENT_REQUESTS
    for _, n, data, result in goods:
        assert result["prompt"] == texts[n % 2]
        np.testing.assert_array_equal(data, np.asarray(reference[n % 2]["mask"].dataobj))
    wrong = []
    for _, name, response, (status, expected) in (r for r in results if r[0] == "bad"):
        if response.status_code != status:
            wrong.append((name, response.status_code, response.text[:300]))
        elif callable(expected):
            expected(response, marker)
        elif expected not in response.json()["detail"]:
            wrong.append((name, response.status_code, response.text[:300]))
    assert not wrong, wrong
    assert not marker.exists()
    assert _sha256(study["image"]) == study["sha256"]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200, "the server must stay up"
    assert "Internal Server Error" not in server.log_tail(200000)


def test_server_stops_cleanly(server):
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    code = server.stop()
    assert not server.killed, f"the server did not end within {STOP_TIMEOUT_S} s of SIGTERM:\n{server.log_tail()}"
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit status 0 or "terminated by SIGTERM"
    assert code in (0, -signal.SIGTERM), f"exit code {code}:\n{server.log_tail()}"
    assert "Application shutdown complete" in server.log_tail(20000)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/info/", timeout=5)
