"""MONAI Label app, training: label submission, fine-tuning into a kept version, and the weights that answer next.

Fast checks (no server): the training request options and their limits; ``--conf training`` and what the guard
answers with it off and on; the versions folder (numbers only grow, the served-version pointer, ``stats``); the
stable split of each study; a whole run of the train task with a stand-in for ``custom.fine_tune`` (the version
served only when ``better``; a refusal with fewer than 3 labelled studies).

Two server checks: a server asked for training without datastore writes does not start; and a real
``monailabel start_server`` with ``--conf datastore_writes true --conf training true`` on 3 small phantom CTs.
Labels are submitted with ``PUT /datastore/label`` (1 = liver, 2 = lesion); a run with only 2 labelled studies
ends in a clear error; with 3, ``POST /train/lsms`` (1 epoch, no replay cases) writes version v1 with its
``comparison.json``; the next inference answers with v1's weights when ``better``, else with the bundle's; and the
served-version pointer is read on every request.

MONAI Label is optional (``requirements-monailabel.txt``): the module is skipped only when it cannot be imported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
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

from custom.data.phantom import PhantomOptions, render_phantom  # noqa: E402
from tests.test_monailabel_server import APP_DIR, MODEL, START_TIMEOUT_S, Server, _mask_and_json  # noqa: E402

if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))  # the app's own modules: lib.train, lib.guard, ...

from lib import guard as guard_module  # noqa: E402
from lib.options import AppOptions  # noqa: E402
from lib.train import (  # noqa: E402
    TRAIN_OPTIONS,
    LSMSFineTune,
    TrainingError,
    TrainOptionError,
    assign_splits,
    train_options,
)
from lib.versions import BUNDLE, VersionStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE_MODELS = REPO / "bundle" / "models"
TINY_SCHEDULE = {"epochs": 1, "referral_epochs": 1, "replay_cases": 0}
TRAIN_TIMEOUT_S = 1500
REQUEST_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------- small labelled studies
def make_study(folder: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A small phantom CT with two liver lesions (8 mm slices) and its label map (1 = liver, 2 = lesion)."""
    options = PhantomOptions(slice_thickness=(8.0,), lesion_count_weights=(0.0, 0.0, 1.0))
    phantom = render_phantom(np.random.default_rng(seed), options)
    label = (phantom.liver > 0).astype(np.uint8) + (phantom.lesions > 0).astype(np.uint8)
    image_path, label_path = folder / f"{name}.nii.gz", folder / "labels_to_submit" / f"{name}.nii.gz"
    label_path.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(image_path))
    nib.save(nib.Nifti1Image(label, phantom.affine), str(label_path))
    return image_path, label_path


class FakeDatastore:
    """What the train task reads of MONAI Label's datastore: study ids, CT files and ``final`` labels."""

    def __init__(self, studies: dict):
        self.studies = studies  # id -> (image, label or None)

    def list_images(self):
        return list(self.studies)

    def get_image_uri(self, image_id):
        return str(self.studies[image_id][0])

    def get_label_uri(self, label_id, label_tag):
        label = self.studies[label_id][1]
        return str(label) if label and label_tag == "final" else ""


FAKE_FINE_TUNE = """
import argparse, json, pathlib, shutil, sys
parser = argparse.ArgumentParser()
for name in ("dataset_dir", "run_dir", "initial_weights", "initial_scorer", "epochs", "referral_epochs",
             "replay_cases", "bundle_dir", "cache_dir"):
    parser.add_argument("--" + name)
args = parser.parse_args()
better = pathlib.Path(sys.argv[0]).with_name("better").read_text().strip() == "true"
datalist = json.loads((pathlib.Path(args.dataset_dir) / "datalist.json").read_text())
models = pathlib.Path(args.run_dir) / "models"
models.mkdir(parents=True)
shutil.copyfile(args.initial_weights, models / "model.pt")
shutil.copyfile(args.initial_scorer, models / "referral_scorer.pt")
comparison = {"split": "test", "metric": "dice_3d", "initial": {"dice_3d": 0.5}, "better": better,
              "fine_tuned": {"dice_3d": 0.6 if better else 0.4}, "started_from": args.initial_weights,
              "splits": {name: [c["case_id"] for c in datalist[name]] for name in ("training", "validation", "test")}}
(pathlib.Path(args.run_dir) / "comparison.json").write_text(json.dumps(comparison))
print("fine-tuned", flush=True)
"""


# ---------------------------------------------------------------------------------------- request options
def test_train_options_defaults_and_limits():
    defaults = {name: default for name, (default, _, _) in TRAIN_OPTIONS.items()}
    assert train_options(None) == defaults == train_options({})
    assert train_options({"epochs": 2, "referral_epochs": "3", "replay_cases": 0, "client_id": "slicer"}) == {
        **defaults,
        **{"epochs": 2, "referral_epochs": 3, "replay_cases": 0},
    }
    for params, words in [
        ({"epochs": 0}, "'epochs' is 0; it must be a whole number from 1"),
        ({"epochs": 10**6}, "'epochs'"),
        ({"epochs": 1.5}, "whole number"),
        ({"epochs": True}, "whole number"),
        ({"replay_cases": -1}, "'replay_cases'"),
        ({"referral_epochs": "two"}, "'referral_epochs'"),
        ({"max_epochs": 3}, "Unknown training option(s) 'max_epochs'"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(TrainOptionError) as caught:
            train_options(params)
        assert words in str(caught.value), (params, str(caught.value))


def test_training_needs_datastore_writes():
    with pytest.raises(ValueError, match="--conf datastore_writes true"):
        AppOptions.from_conf({"training": "true"})
    with pytest.raises(ValueError, match="--conf training true or false"):
        AppOptions.from_conf({"training": "maybe", "datastore_writes": "true"})
    assert AppOptions.from_conf({"training": "yes", "datastore_writes": "true"}).training
    assert not AppOptions.from_conf({}).training


# ---------------------------------------------------------------------------------------- the guard
async def _echo(scope, receive, send):
    """An ASGI app standing for MONAI Label's server: answers 200 with the body it received."""
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def _ask(options: AppOptions, method: str, path: str, query: str = "", body: bytes = b"", content_type=None):
    """(status, body) of one request through the guard in front of :func:`_echo`."""
    guard = guard_module.RequestGuard(_echo, options)
    headers = [(b"host", b"127.0.0.1:8000")] + ([(b"content-type", content_type.encode())] if content_type else [])
    scope = {"type": "http", "method": method, "path": path, "query_string": query.encode(), "headers": headers,
             "client": ("127.0.0.1", 5000), "root_path": ""}  # fmt: skip
    sent, answer = [False], {}

    async def receive():
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] = answer.get("body", b"") + message.get("body", b"")

    asyncio.run(guard(scope, receive, send))
    return answer["status"], answer.get("body", b"")


def _detail(body: bytes) -> str:
    return json.loads(body)["detail"]


OFF = AppOptions(datastore_writes=True)
ON = AppOptions(datastore_writes=True, training=True)
JSON = "application/json"


@pytest.mark.parametrize("method, path", [("POST", "/train/lsms"), ("GET", "/train/"), ("DELETE", "/train/")])
def test_guard_training_off_is_404_naming_the_option(method, path):
    status, body = _ask(OFF, method, path, body=b'{"epochs": 1}', content_type=JSON)
    assert status == 404
    assert "Training is not offered" in _detail(body) and "--conf training true" in _detail(body)


@pytest.mark.parametrize(
    "method, path, query, body, content_type, status, words",
    [
        ("POST", "/train/lsms", "", b'{"epochs": 0}', JSON, 422, "'epochs' is 0"),
        ("POST", "/train/lsms", "", b'{"replay_cases": 5000}', JSON, 422, "from 0 to 1000"),
        ("POST", "/train/lsms", "", b'{"max_epochs": 1}', JSON, 422, "Unknown training option"),
        ("POST", "/train/lsms", "", b"[1]", JSON, 422, "JSON object"),
        ("POST", "/train/lsms", "", b"{not json", JSON, 422, "not JSON"),
        ("POST", "/train/lsms", "", b"epochs=1", "application/x-www-form-urlencoded", 415, "not JSON"),
        ("POST", "/train/lsms", "run_sync=true", b"", None, 422, "run_sync"),
        ("POST", "/train/lsms", "device=cuda", b"", None, 422, "Unknown query parameter"),
        ("POST", "/train/lsms", "enqueue=maybe", b"", None, 422, "enqueue"),
        ("POST", "/train/spleen", "", b"", None, 404, "trains the model 'lsms' only"),
        ("GET", "/train/lsms", "", b"", None, 405, "Use POST"),
        ("POST", "/train/", "", b"", None, 405, "Use DELETE or GET"),
    ],
    ids=["epochs 0", "replay out of range", "unknown option", "list", "not json", "form", "run_sync", "unknown query",
         "enqueue not yes/no", "other model", "GET model", "POST all"],
)  # fmt: skip
def test_guard_training_on_refuses_bad_requests(method, path, query, body, content_type, status, words):
    answered, text = _ask(ON, method, path, query, body, content_type)
    assert answered == status, text
    assert words in _detail(text)


def test_guard_training_on_passes_good_requests_unchanged():
    body = b'{"epochs": 1, "referral_epochs": 1, "replay_cases": 0, "client_id": "user-xyz"}'
    assert _ask(ON, "POST", "/train/lsms", "enqueue=true", body, JSON) == (200, body)
    assert _ask(ON, "POST", "/train/lsms", "", b"", None) == (200, b"")
    assert _ask(ON, "GET", "/train/", "check_if_running=true")[0] == 200
    assert _ask(ON, "DELETE", "/train/")[0] == 200
    # the other refusals stay as they were
    assert _ask(ON, "GET", "/logs/")[0] == 403
    assert _ask(ON, "POST", "/batch/infer/lsms")[0] == 404


# ---------------------------------------------------------------------------------------- versions and splits
def test_versions_grow_and_pointer_serves_only_complete_versions(tmp_path):
    store = VersionStore(tmp_path / "lsms", BUNDLE_MODELS)
    assert store.served().version == BUNDLE and store.stats()["served"] == BUNDLE
    assert store.new_version()[0] == "v1"
    (store.versions_dir / "v3").mkdir()  # a folder left by another run: its number is never reused
    name, folder = store.new_version()
    assert name == "v4" and folder.is_dir() and not any(folder.iterdir())
    with pytest.raises(FileNotFoundError, match="v4"):
        store.serve("v4")  # no weights files yet
    (folder / "models").mkdir()
    for file in ("model.pt", "referral_scorer.pt"):
        (folder / "models" / file).write_bytes(b"weights")
    store.record("v4", {"version": "v4", "status": "done", "fine_tuned": 0.7})
    store.serve("v4")
    assert store.served().version == "v4" and store.served().model == folder / "models" / "model.pt"
    stats = store.stats()
    assert stats["served"] == "v4" and stats["best_metric"] == 0.7
    assert [v["version"] for v in stats["versions"]] == ["v4", "v3", "v1"]
    assert stats["versions"][1]["status"] == "incomplete" and not stats["versions"][1]["served"]
    store.pointer.write_text('{"version": "../../etc"}')  # a pointer that names no version: the bundle answers
    assert store.served().version == BUNDLE


def test_splits_are_stable_across_runs():
    first = assign_splits(["a", "b", "c"], {})
    assert sorted(first.values()) == ["test", "training", "validation"]
    later = assign_splits(["a", "b", "c", "d", "e"], first)
    assert all(later[s] == first[s] for s in first), "a study keeps its split"
    assert later["d"] == later["e"] == "training"
    assert assign_splits(["a", "c", "x"], {"a": "training", "b": "test", "c": "validation"})["x"] == "test"


# ---------------------------------------------------------------------------------------- the task, fine_tune stood in
@pytest.fixture(scope="module")
def three_studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studies")
    return {f"case_{n}": make_study(folder, f"case_{n}", seed) for n, seed in enumerate((31, 32, 33))}


def test_train_task_keeps_versions_and_serves_only_better(tmp_path, three_studies):
    script = tmp_path / "fake" / "fine_tune.py"
    script.parent.mkdir()
    script.write_text(FAKE_FINE_TUNE)
    store = VersionStore(tmp_path / "model" / "lsms", BUNDLE_MODELS)
    task = LSMSFineTune(str(REPO / "bundle"), store, str(REPO), command=[sys.executable, str(script)])
    request = {"model": MODEL, "local_rank": 0, "gpus": "all", **TINY_SCHEDULE}

    two = FakeDatastore({**three_studies, "case_2": (three_studies["case_2"][0], None)})
    with pytest.raises(TrainingError, match="at least 3 studies.*2 can be used"):
        task(request, two)
    assert store.names() == []

    (script.parent / "better").write_text("true")
    result = task(request, FakeDatastore(three_studies))
    assert result["version"] == "v1" and result["served"] == "v1" and result["initial_weights"] == BUNDLE
    assert sorted(s for split in result["studies"].values() for s in split) == sorted(three_studies)
    record = json.loads((store.versions_dir / "v1" / "version.json").read_text())
    assert record["status"] == "done" and record["better"] is True and record["fine_tuned"] == 0.6

    (script.parent / "better").write_text("false")
    result = task({**request, "epochs": "2"}, FakeDatastore(three_studies))
    assert result["version"] == "v2" and result["served"] == "v1" and result["initial_weights"] == "v1"
    comparison = json.loads((store.versions_dir / "v2" / "comparison.json").read_text())
    assert comparison["started_from"] == str(store.versions_dir / "v1" / "models" / "model.pt")
    splits = json.loads((store.root / "splits.json").read_text())
    assert {s: name for name, ids in result["studies"].items() for s in ids} == splits, "each study kept its split"
    assert comparison["splits"]["test"] == [f"lits_{s}" for s in result["studies"]["test"]]
    stats = task.stats()
    assert stats["served"] == "v1" and [v["version"] for v in stats["versions"]] == ["v2", "v1"]
    assert stats["versions"][0]["better"] is False and stats["versions"][1]["served"] is True
    assert not list((store.root / "work").iterdir()), "the run's staged studies and dataset are removed"

    with pytest.raises(TrainOptionError, match="'epochs'"):
        task({**request, "epochs": 0}, FakeDatastore(three_studies))


# ---------------------------------------------------------------------------------------- a real server
def test_server_refuses_to_start_training_without_writes(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    server = Server(studies, tmp_path, conf={"training": "true", "model_dir": str(tmp_path / "model")})
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    started = server.process.poll() is None
    code = server.stop()
    log = server.log_tail(20000)
    assert not started and code != 0, f"the server started with training but without datastore writes:\n{log}"
    assert "--conf training true needs --conf datastore_writes true" in log, log
    assert "Uvicorn running" not in log, log


@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    """A server with writes and training on, its versions in a folder of the test, on 3 phantom studies."""
    work = tmp_path_factory.mktemp("train_server")
    studies = work / "studies"
    studies.mkdir()
    labels = {}
    for n, seed in enumerate((41, 42, 43)):
        _, labels[f"case_{n}"] = make_study(studies, f"case_{n}", seed)
    for label in labels.values():  # labels reach the server by submission only
        label.rename(work / label.name)
    (studies / "labels_to_submit").rmdir()
    labels = {name: work / path.name for name, path in labels.items()}
    model_dir = work / "model"
    conf = {"datastore_writes": "true", "training": "true", "model_dir": str(model_dir)}
    server = Server(studies, work, conf=conf)
    request.addfinalizer(server.stop)
    server.wait_ready()
    return {"server": server, "url": server.url, "labels": labels, "versions": model_dir / "lsms" / "versions",
            "pointer": model_dir / "lsms" / "current.json"}  # fmt: skip


def _submit_label(url: str, study: str, label: Path) -> None:
    """3D Slicer's Submit Label: the label map as the study's ``final`` label."""
    with open(label, "rb") as f:
        files = {"label": (label.name, f), "params": (None, json.dumps({"label_info": []}))}
        response = requests.put(f"{url}/datastore/label", params={"image": study, "tag": "final"}, files=files,
                                timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text[:500]


def _train(url: str, params: dict) -> dict:
    """Start a run and wait for its end; the final task status (DONE, ERROR, ...)."""
    response = requests.post(f"{url}/train/{MODEL}", json=params, timeout=60)
    assert response.status_code == 200, response.text[:1000]
    task_id = response.json()["id"]
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/train/", timeout=60).json()
        if status["id"] == task_id and status["status"] not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(3)
    pytest.fail(f"training not done after {TRAIN_TIMEOUT_S} s")


def _infer(url: str, study: str, tmp_path: Path, name: str):
    response = requests.post(f"{url}/infer/{MODEL}", params={"image": study},
                             files={"params": (None, json.dumps({"prompt": "the largest lesion"}))},
                             timeout=REQUEST_TIMEOUT_S)  # fmt: skip
    return _mask_and_json(response, tmp_path, name)[1]


def test_submit_labels_train_and_infer_with_the_new_weights(site, tmp_path):
    url, labels = site["url"], site["labels"]
    info = requests.get(f"{url}/info/", timeout=60).json()
    assert info["trainers"][MODEL]["config"] == {name: d for name, (d, _, _) in TRAIN_OPTIONS.items()}
    assert info["train_stats"][MODEL]["served"] == BUNDLE and info["models"][MODEL]["weights_version"] == BUNDLE
    bad = requests.post(f"{url}/train/{MODEL}", json={**TINY_SCHEDULE, "epochs": 0}, timeout=60)
    assert bad.status_code == 422 and "'epochs'" in bad.json()["detail"]

    # two labelled studies: the run ends with a clear error, and no version is made
    for study in ("case_0", "case_1"):
        _submit_label(url, study, labels[study])
    status = _train(url, TINY_SCHEDULE)
    assert status["status"] == "ERROR", status
    assert any("at least 3 studies" in line and "2 can be used" in line for line in status["details"]), status
    assert not site["versions"].exists() or not any(site["versions"].iterdir())

    # the third label, then a run with a tiny schedule
    _submit_label(url, "case_2", labels["case_2"])
    status = _train(url, TINY_SCHEDULE)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    version = site["versions"] / "v1"
    comparison = json.loads((version / "comparison.json").read_text())
    assert comparison["metric"] == "dice_3d" and isinstance(comparison["better"], bool)
    assert (version / "models" / "model.pt").is_file() and (version / "models" / "referral_scorer.pt").is_file()
    record = json.loads((version / "version.json").read_text())
    assert record["status"] == "done" and record["options"] == TINY_SCHEDULE and record["initial_weights"] == BUNDLE
    assert record["fine_tuned"] == comparison["fine_tuned"]["dice_3d"]
    expected = "v1" if comparison["better"] else BUNDLE
    stats = requests.get(f"{url}/info/", timeout=60).json()["train_stats"][MODEL]
    assert stats["served"] == expected and stats["versions"][0]["version"] == "v1"
    assert site["pointer"].exists() == comparison["better"]

    # the next inference answers with the weights served now (the record names the weights file by its sha256)
    weights = {"v1": version / "models", BUNDLE: BUNDLE_MODELS}
    answer = _infer(url, "case_2", tmp_path, "after_training")
    assert answer["weights_version"] == expected
    assert _used_weights(answer) == _files_sha256(weights[expected])

    # the pointer is read on every request: moving it (as a promotion does) changes the weights of the next answer
    if comparison["better"]:
        site["pointer"].unlink()
        moved = BUNDLE
    else:
        site["pointer"].write_text(json.dumps({"version": "v1"}))
        moved = "v1"
    answer = _infer(url, "case_2", tmp_path, "pointer_moved")
    assert answer["weights_version"] == moved
    assert _used_weights(answer) == _files_sha256(weights[moved])
    assert _files_sha256(weights["v1"]) != _files_sha256(weights[BUNDLE]), "the fine-tuned weights are new weights"
    assert "Internal Server Error" not in site["server"].log_tail(200000)


def _used_weights(answer: dict) -> tuple:
    """The sha256 of the weights and scorer files the answer's record names (the bundle's provenance)."""
    provenance = answer["record"]["bundle"]
    return provenance["weights"]["sha256"], provenance["referral_scorer"]["sha256"]


def _files_sha256(models: Path) -> tuple:
    return tuple(
        hashlib.sha256((models / name).read_bytes()).hexdigest() for name in ("model.pt", "referral_scorer.pt")
    )
